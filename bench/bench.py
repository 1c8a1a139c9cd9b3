"""diffusers vs ddpm-worker on the same model, scheduler, steps, batch size and seeds.

    python bench/bench.py --bin target/release/ddpm-worker [--model DIR] [--scheduler ddim] [--steps 20]
                          [--num-samples 16] [--batch-size 8] [--rounds 3]

(`make bench` runs it with the project venv.) Prints, as ratios ddpm-worker / diffusers, for both of ddpm-worker's modes (exact: bit-identical to
diffusers; fast: `--fast`, channels-last and on the CPU one batch per core):
  * UNet forward time at the batch size (diffusers: `UNet2DModel.__call__`; ddpm-worker: `bench-unet`),
  * end-to-end images/s: sampling plus writing one PNG per sample and a grid (diffusers: the pipeline with
    one `torch.Generator` per sample, PIL `save`; ddpm-worker: `generate`, its manifest's sampling time).
Model loading is excluded on both sides. The two sides alternate, round after round, on the same machine,
and the medians are compared: on a shared machine only such side-by-side ratios mean anything.
Without --model, a random-weight google/ddpm-cifar10-32 architecture is made with `init-model`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMPipeline,
    UNet2DModel,
)
from diffusers.utils import make_image_grid
from PIL import Image


def load(model_dir: Path):
    root = model_dir
    if (root / "unet" / "config.json").is_file():
        return UNet2DModel.from_pretrained(root / "unet"), DDPMScheduler.from_pretrained(root / "scheduler")
    return UNet2DModel.from_pretrained(root), DDPMScheduler.from_pretrained(root)


def pipeline(unet, scheduler, kind):
    if kind == "ddim":
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    elif kind == "pndm":
        pipe = PNDMPipeline(unet=unet, scheduler=scheduler)
    elif kind == "dpmsolver":
        pipe = DDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config))
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_unet_ms(unet, batch, iterations, warmup=2):
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    with torch.no_grad():
        for i in range(warmup):
            unet(x, 500 - i)
        times = []
        for i in range(iterations):
            start = time.perf_counter()
            unet(x, 500 - i)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.mean(times)


def diffusers_end_to_end(pipe, args, out: Path):
    """Images/s of sampling + PNG writing, batch by batch, as a user would script it."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    kwargs = {"num_inference_steps": args.steps}
    if args.scheduler == "ddim":
        kwargs["eta"] = args.eta
    start = time.perf_counter()
    grid = []
    for first in range(0, args.num_samples, args.batch_size):
        seeds = range(args.seed + first, args.seed + min(first + args.batch_size, args.num_samples))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe(batch_size=len(generators), generator=generators, **kwargs).images
        for i, image in enumerate(images):
            image.save(out / "samples" / f"{first + i:08}.png")
            if len(grid) < 64:
                grid.append(image)
    cols = int(np.ceil(np.sqrt(len(grid))))
    rows = int(np.ceil(len(grid) / cols))
    grid += [grid[0].copy() for _ in range(rows * cols - len(grid))]
    make_image_grid(grid, rows=rows, cols=cols).save(out / "grid.png")
    return args.num_samples / (time.perf_counter() - start)


# The two ways ddpm-worker runs: bit-identical to diffusers, and throughput first (channels-last
# layout; on the CPU also one batch per core, each on its own thread).
MODES = {"exact": ([], []), "fast": (["--layout", "channels-last"], ["--fast"])}


def worker_unet_ms(args, model, mode):
    out = subprocess.run(
        [args.bin, "bench-unet", "--model", str(model), "--batch-size", str(args.batch_size),
         "--iterations", str(args.unet_iterations), "--warmup", "2", *MODES[mode][0]],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["mean_ms"]


def worker_end_to_end(args, model, out: Path, mode):
    cmd = [args.bin, "generate", "--model", str(model), "--scheduler", args.scheduler, "--steps", str(args.steps),
           "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--out", str(out), *MODES[mode][1]]
    if args.scheduler == "ddim":
        cmd += ["--eta", str(args.eta)]
    subprocess.run(cmd, check=True, capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["timings"]["images_per_second"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--scheduler", default="ddim", choices=["ddpm", "ddim", "pndm", "dpmsolver"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--unet-iterations", type=int, default=5)
    args = p.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([args.bin, "init-model", "--preset", "cifar10-32", "--out", str(model)],
                           check=True, capture_output=True)
        unet_model, scheduler = load(model)
        pipe = pipeline(unet_model, scheduler, args.scheduler)
        print(f"model {model}, scheduler {args.scheduler}, {args.steps} steps, {args.num_samples} samples, "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

        unet = {"diffusers": [], "exact": [], "fast": []}
        e2e = {"diffusers": [], "exact": [], "fast": []}
        for r in range(args.rounds):
            for mode in MODES:
                unet[mode].append(worker_unet_ms(args, model, mode))
            unet["diffusers"].append(diffusers_unet_ms(unet_model, args.batch_size, args.unet_iterations))
            for mode in MODES:
                e2e[mode].append(worker_end_to_end(args, model, tmp / f"{mode}{r}", mode))
            e2e["diffusers"].append(diffusers_end_to_end(pipe, args, tmp / f"py{r}"))
            print(f"round {r + 1}: UNet ms " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in unet.items())
                  + "; images/s " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in e2e.items()), flush=True)

        m = statistics.median
        print(f"\nmedians of {args.rounds} rounds, batch {args.batch_size}:")
        for mode in MODES:
            ours = [np.asarray(Image.open(tmp / f"{mode}0" / "samples" / f"{i:08}.png"), dtype=int)
                    for i in range(args.num_samples)]
            theirs = [np.asarray(Image.open(tmp / "py0" / "samples" / f"{i:08}.png"), dtype=int)
                      for i in range(args.num_samples)]
            same = sum(np.array_equal(a, b) for a, b in zip(ours, theirs))
            within = np.mean([np.mean(np.abs(a - b) <= 1) for a, b in zip(ours, theirs)])
            print(f"  {mode:5}: UNet forward {m(unet[mode]):.1f} ms vs diffusers {m(unet['diffusers']):.1f} ms"
                  f" -> ratio {m(unet[mode]) / m(unet['diffusers']):.3f} (lower is better); "
                  f"end to end {m(e2e[mode]):.3f} vs {m(e2e['diffusers']):.3f} images/s"
                  f" -> ratio {m(e2e[mode]) / m(e2e['diffusers']):.3f} (higher is better); "
                  f"PNGs identical to diffusers' {same}/{args.num_samples}, "
                  f"pixel values within 1/255: {within * 100:.2f}%")

if __name__ == "__main__":
    sys.exit(main())
