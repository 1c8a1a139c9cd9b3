"""Trains the demo model of `make run` (demo/digits-16): a small diffusers UNet2DModel on scikit-learn's
bundled handwritten digits, framed to 16×16 in one channel (scripts/demo/digits.py says how).

Run with the project venv (scripts/requirements.txt pins torch and diffusers, scripts/requirements-demo.txt
scikit-learn):

    python scripts/demo/train_digits.py --out demo/digits-16

Seeded, on the CPU, with one torch thread and libtorch held to its AVX2 kernels (as the parity fixtures
are), so a rerun with the same seed, steps and versions writes the same bytes: the thread count and the
kernel set decide the order of float sums, and so the last bits of every update.

Writes a flat diffusers folder as the google/ddpm-* repos have it: config.json,
diffusion_pytorch_model.safetensors (the EMA weights), scheduler_config.json, and training.json (command,
versions, seed, steps, loss summary, wall time).

With --labeled it trains the class-conditional sibling (demo/digits-16-labeled):

    python scripts/demo/train_digits.py --labeled --out demo/digits-16-labeled

The same UNet with `num_class_embeds=11` (diffusers adds an nn.Embedding(11, time_embed_dim) to the time
embedding): classes 0..9 are the digits (load_digits' targets), class 10 the null class of
classifier-free guidance (Ho & Salimans 2022). Each training example's label is replaced by the null class
with probability --label-dropout (0.1), drawn from a generator of its own (seeded --seed + 1), so the
batches, noise and timesteps are the very draws of the unlabeled run with the same seed. It also writes
labels.json: {"names": ["0",...,"9"], "null_class": 10}. The unlabeled path draws nothing more and writes
the same bytes as before the option existed.
"""

import os

# Before torch is imported: libtorch reads it once.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import sklearn  # noqa: E402
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__


NUM_DIGITS = 10
NULL_CLASS = NUM_DIGITS  # the unconditional class of classifier-free guidance


def make_unet(seed: int, labeled: bool = False) -> UNet2DModel:
    """701,345 parameters: two levels (32, 64 wide), one resnet per level and side, one full-width
    attention head in the 8×8 level (attention_head_dim null, written out in config.json so readers
    do not fall back to diffusers' default of 8-dim heads). Labeled: 702,753, the class embedding's
    11 × 128 more (class_embed_type None → an nn.Embedding added to the time embedding)."""
    torch.manual_seed(seed)
    # Unlabeled: no class keywords at all, so the config and weights are those of before --labeled.
    labeled_kwargs = {"num_class_embeds": NUM_DIGITS + 1, "class_embed_type": None} if labeled else {}
    return UNet2DModel(
        sample_size=digits.SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        # 32 and 64 channels: diffusers' default 32 groups would leave one channel per group at 32 wide.
        norm_num_groups=8,
        **labeled_kwargs,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine to zero at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.999, help="the EMA decay's ceiling")
    parser.add_argument("--labeled", action="store_true",
                        help="class-conditional: 10 digit classes and null class 10 (classifier-free guidance)")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="with --labeled: the probability that an example's label becomes the null class")
    args = parser.parse_args()

    # One thread: the result must not depend on how many cores the machine has.
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)

    images, targets = digits.real_digits()
    data = torch.from_numpy(images).float().unsqueeze(1) * 2.0 - 1.0  # (1797, 1, 16, 16) in [-1, 1]
    targets = torch.from_numpy(targets)  # (1797,) int64, 0..9

    unet = make_unet(args.seed, args.labeled)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scheduler = DDPMScheduler()  # diffusers' defaults: 1000 steps, linear betas 1e-4..0.02, epsilon
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    # Every random draw of training comes from this generator, after the weights' initialisation.
    g = torch.Generator().manual_seed(args.seed)
    # Labeled only: the label dropout's draws, apart from g so that g's stream is the unlabeled run's.
    g_drop = torch.Generator().manual_seed(args.seed + 1) if args.labeled else None
    alphas_cumprod = scheduler.alphas_cumprod

    losses = []
    dropped = 0  # labeled: examples trained as the null class
    started = time.monotonic()
    unet.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = torch.randint(0, len(data), (args.batch,), generator=g)
        x0 = data[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if args.labeled:
            labels = targets[idx]
            drop = torch.rand((args.batch,), generator=g_drop) < args.label_dropout
            labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
            dropped += int(drop.sum())
            pred = unet(xt, t, class_labels=labels).sample
        else:
            pred = unet(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # EMA with the usual warm-up of its decay, so early (random) weights fade out within a run this short.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = float(np.mean(losses[-50:]))
            print(f"step {step:5d}  loss {loss.item():.4f}  mean(last 50) {recent:.4f}  "
                  f"{time.monotonic() - started:.0f} s", flush=True)
    wall = time.monotonic() - started

    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out, safe_serialization=True)
    scheduler.save_pretrained(args.out)
    # save_pretrained writes diffusers' own keys; the config must keep attention_head_dim: null explicit.
    config = json.loads((args.out / "config.json").read_text())
    assert "attention_head_dim" in config and config["attention_head_dim"] is None, config
    if args.labeled:
        assert config["num_class_embeds"] == NUM_DIGITS + 1 and config["class_embed_type"] is None, config
        names = ",".join(f'"{d}"' for d in range(NUM_DIGITS))
        (args.out / "labels.json").write_text(f'{{"names": [{names}], "null_class": {NULL_CLASS}}}\n')

    window = 100
    summary = {
        "command": "python scripts/demo/train_digits.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch": args.batch,
        "optimizer": {"name": "AdamW", "peak_lr": args.lr, "weight_decay": 0.01, "warmup_steps": args.warmup,
                      "schedule": "linear warmup, cosine to 0"},
        "ema": {"decay_max": args.ema, "decay": "min(decay_max, (1 + step) / (10 + step))"},
        "data": "sklearn load_digits, 1797 images 8x8 -> 12x12 bilinear in a black 16x16 frame, [-1, 1]",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "loss": {
            "first_100_mean": float(np.mean(losses[:window])),
            "last_100_mean": float(np.mean(losses[-window:])),
            "min": float(np.min(losses)),
            # Means over consecutive tenths of the run: the curve's shape without every value.
            "by_tenth": [float(np.mean(c)) for c in np.array_split(np.array(losses), 10)],
        },
        "wall_seconds": round(wall, 1),
        "machine": platform.machine(),
    }
    if args.labeled:
        summary["labels"] = {
            "num_class_embeds": NUM_DIGITS + 1,
            "class_embed_type": None,
            "classes": "0..9 the digits (load_digits targets), 10 the null class",
            "null_class": NULL_CLASS,
            "label_dropout": args.label_dropout,
            "dropout_draws": "torch.rand(batch) < label_dropout per step, torch.Generator seeded seed + 1",
            "dropped_share": dropped / (args.steps * args.batch),
        }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} in {wall:.0f} s; last {window} steps' mean loss {summary['loss']['last_100_mean']:.4f}")


if __name__ == "__main__":
    main()
