"""diffusers' own samples of a model folder, the golden side of tests/demo_quality.rs's parity test: the
demo model through `ddpm-worker generate` must give these pixels exactly.

    python scripts/demo/diffusers_reference.py MODEL_DIR OUT_DIR

Runs DDPMPipeline (DDPM, 100 steps), DDIMPipeline (η = 0, 50 steps) and DDPMPipeline with
DPMSolverMultistepScheduler.from_config (DPM-Solver++, 25 steps), each on one batch of 4 with one
torch.Generator per sample seeded 0, 1, 2, 3 (what `generate --seed 0 --num-samples 4 --batch-size 4`
does), on the CPU in float32, libtorch held to its AVX2 kernels as for the parity fixtures
(tests/fixtures/gen_fixtures.py). Writes OUT_DIR/<case>.safetensors with "uint8": the bytes of the
pipeline's PIL images (mode "L" for a one-channel model), NHWC, and OUT_DIR/cases.json listing the cases.
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)
from safetensors.torch import save_file  # noqa: E402

SEEDS = [0, 1, 2, 3]
# name, `generate --scheduler`, pipeline, steps
CASES = [
    ("ddpm_100", "ddpm", "ddpm", 100),
    ("ddim_50", "ddim", "ddim", 50),
    ("dpmsolver_25", "dpmsolver", "dpmsolver", 25),
]


def main():
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    unet = UNet2DModel.from_pretrained(model).eval()
    cases = []
    for name, scheduler_arg, kind, steps in CASES:
        scheduler = DDPMScheduler.from_pretrained(model)
        if kind == "dpmsolver":
            pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config))
        elif kind == "ddim":
            pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
        else:
            pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"eta": 0.0} if kind == "ddim" else {}
        images = pipe(
            batch_size=len(SEEDS),
            generator=[torch.Generator().manual_seed(s) for s in SEEDS],
            num_inference_steps=steps,
            output_type="pil",
            **kwargs,
        ).images
        pixels = np.stack([np.asarray(im) for im in images])
        if pixels.ndim == 3:  # mode "L": (N, H, W) → NHWC with C = 1
            pixels = pixels[..., None]
        save_file({"uint8": torch.from_numpy(np.ascontiguousarray(pixels))}, out / f"{name}.safetensors")
        cases.append({"name": name, "scheduler": scheduler_arg, "steps": steps, "seeds": SEEDS,
                      "mode": images[0].mode})
    (out / "cases.json").write_text(json.dumps({"torch": torch.__version__, "cases": cases}, indent=2))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
