"""How well the class-conditional demo model (demo/digits-16-labeled) draws the digit it is asked for, with
diffusers as the reference and classifier-free guidance (Ho & Salimans 2022):

    python scripts/demo/labeled_reference.py demo/digits-16-labeled [--out DIR]

Samples with DPMSolverMultistepScheduler (DPM-Solver++, 25 steps, from_config of the folder's
scheduler_config.json, as scripts/demo/diffusers_reference.py does) 200 samples, 20 per class: sample i
asks for class i // 20 and draws its initial noise [1, 1, 16, 16] from its own
torch.Generator().manual_seed(i), seeds 0..199. Each step runs one doubled batch, the requested classes and
the null class (labels.json's null_class), and combines the two predictions as

    ε = ε_u + w · (ε_c − ε_u)

so w = 1 is the conditional model alone (no guidance) and w > 1 guides. Reported per case:
  agreement   the share of samples whose most likely class under the digits classifier
              (scripts/demo/digits.py's, the one scripts/demo/score_digits.py scores with) is the class
              asked for; per class too
  score       score_digits.py's figures for those samples
and, for the same 200 noises with every label the null class and no guidance, score_digits.py's
unconditional figures. Prints one JSON object (and writes it, with the samples as PNGs, under --out).

On the CPU in float32, libtorch held to its AVX2 kernels as the other demo scripts are; deterministic.
"""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402
import score_digits  # noqa: E402

PER_CLASS = 20
STEPS = 25
# (name, w): "conditional" is ε_c alone (w = 1 in the formula above); the rest guide.
GUIDED = [("conditional", 1.0), ("w1.5", 1.5), ("w2", 2.0), ("w3", 3.0)]


@torch.no_grad()
def sample(unet, scheduler_config, labels: torch.Tensor, null_class: int, w: float | None) -> np.ndarray:
    """One sample per label, sample i from seed i. w None: labels alone, one pass (no guidance). Else
    one doubled batch per step, [labels; null], combined as ε_u + w (ε_c − ε_u). → (N, 16, 16) uint8."""
    n = len(labels)
    scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(STEPS)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(n)])
    x = x * scheduler.init_noise_sigma
    null = torch.full_like(labels, null_class)
    for t in scheduler.timesteps:
        if w is None:
            eps = unet(x, t, class_labels=labels).sample
        else:
            both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
            eps_c, eps_u = both.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
    # As DDPMPipeline with output_type "pil": [-1, 1] → [0, 1], then (× 255).round() to bytes.
    images = (x / 2 + 0.5).clamp(0, 1)[:, 0].numpy()
    return digits.to_uint8(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, help="write results.json and the samples (CASE/NNN_cC.png) here")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    labels_meta = json.loads((args.model / "labels.json").read_text())
    names, null_class = labels_meta["names"], labels_meta["null_class"]
    unet = UNet2DModel.from_pretrained(args.model).eval()
    assert unet.config.num_class_embeds == len(names) + 1, unet.config
    config = DDPMScheduler.from_pretrained(args.model).config

    classes = len(names)
    labels = torch.arange(classes).repeat_interleave(PER_CLASS)  # sample i asks for class i // 20
    clf, _, _ = digits.classifier()

    results = {"model": str(args.model), "scheduler": f"DPMSolverMultistepScheduler, {STEPS} steps",
               "samples": len(labels), "seeds": f"0..{len(labels) - 1}", "guidance": "eps_u + w (eps_c - eps_u)",
               "cases": {}}
    cases = [(name, w if name != "conditional" else None, labels) for name, w in GUIDED]
    cases.append(("unconditional", None, torch.full_like(labels, null_class)))
    for name, w, case_labels in cases:
        images = sample(unet, config, case_labels, null_class, w)
        scored = score_digits.score(images)
        entry = {"w": 1.0 if name == "conditional" else (0.0 if name == "unconditional" else w)}
        if name != "unconditional":
            top = clf.classes_[clf.predict_proba(digits.features(images)).argmax(axis=1)]
            hit = top == labels.numpy()
            entry["agreement"] = float(hit.mean())
            entry["agreement_by_class"] = {names[c]: float(hit[labels.numpy() == c].mean()) for c in range(classes)}
        entry["score"] = scored
        results["cases"][name] = entry
        if args.out:
            folder = args.out / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, (im, c) in enumerate(zip(images, case_labels.tolist())):
                Image.fromarray(im).save(folder / f"{i:03d}_c{c}.png")
        print(f"{name}: " + (f"agreement {entry['agreement']:.3f}, " if "agreement" in entry else "")
              + f"mean_top_prob {scored['mean_top_prob']:.3f}, in_distribution {scored['in_distribution']:.3f}, "
              f"frechet {scored['frechet_distance']:.2f}", file=sys.stderr, flush=True)

    guided = {n: e["agreement"] for n, e in results["cases"].items() if n.startswith("w")}
    best = max(guided, key=lambda n: (guided[n], -results["cases"][n]["w"]))  # ties: the smaller w
    results["best_guided"] = {"case": best, "w": results["cases"][best]["w"], "agreement": guided[best]}
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
