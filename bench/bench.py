"""diffusers vs ddpm-worker on the same model, scheduler, steps, batch size and seeds.

    python bench/bench.py --bin target/release/ddpm-worker [--model DIR] [--schedulers ddpm ddim pndm dpmsolver]
                          [--steps 20] [--num-samples 16] [--batch-size 8] [--rounds 3] [--json FILE]

(`make bench` runs it with the project venv.) Prints, as ratios ddpm-worker / diffusers, for ddpm-worker's modes
(exact: bit-identical to diffusers; fast: `--fast`, channels-last, fused and on the CPU one batch per core;
fast-bf16: the same with a bfloat16 UNet):
  * UNet forward throughput at the batch size (diffusers: `UNet2DModel.__call__`; ddpm-worker: `ddpm-bench unet`),
    and each side's GFLOP/s against the 3×3-convolution peak measured in the same run on the model's own
    convolution shapes, run the way that side runs them (`ddpm-bench unet --conv-peak`; FLOPs as
    `torch.utils.flop_counter` counts them, checked against diffusers' count),
  * end-to-end images/s for every scheduler: sampling plus writing one PNG per sample and a grid (diffusers:
    the pipeline with one `torch.Generator` per sample, PIL `save`; ddpm-worker: `generate`, its shard
    record's sampling time),
and the targets: fast ≥ 1.5× diffusers end to end, exact ≥ 1.0× on every scheduler, the fast UNet ≥ 90 % of
the (fp32) convolution peak.
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


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))


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


def diffusers_flops(unet, batch):
    """FLOPs of one forward as torch counts them (convolutions, matrix products, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, 500)
    return counter.get_total_flops()


def diffusers_end_to_end(pipe, args, scheduler, out: Path):
    """Images/s of sampling + PNG writing, batch by batch, as a user would script it."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    kwargs = {"num_inference_steps": args.steps}
    if scheduler == "ddim":
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
    (out / "grids").mkdir(exist_ok=True)
    make_image_grid(grid, rows=rows, cols=cols).save(out / "grids" / "00000.png")
    return args.num_samples / (time.perf_counter() - start)


# The ways ddpm-worker runs: bit-identical to diffusers; throughput first (channels-last layout and
# fused kernels; on the CPU also one batch per core, each on its own thread); and that in bfloat16
# (oneDNN's AVX512-BF16/AMX kernels: twice the FLOP rate where the CPU has them, images within a few
# levels of fp32's).
MODES = {"exact": [], "fast": ["--fast"], "fast-bf16": ["--fast", "--dtype", "bf16"]}


def worker_unet(args, model, mode, conv_peak=False):
    out = subprocess.run(
        [bench_bin(args.bin), "unet", "--model", str(model), "--batch-size", str(args.batch_size),
         "--iterations", str(args.unet_iterations), "--warmup", "2", *MODES[mode],
         *(["--conv-peak"] if conv_peak else [])],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_record(out: Path) -> dict:
    """The shard record of a whole `generate` run (shard 0): its device, layout and timings."""
    return json.loads((out / "shards" / "000000.json").read_text())


def worker_end_to_end(args, model, out: Path, mode, scheduler):
    cmd = [args.bin, "generate", "--model", str(model), "--scheduler", scheduler, "--steps", str(args.steps),
           "--num-samples", str(args.num_samples), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
           "--out", str(out), *MODES[mode]]
    if scheduler == "ddim":
        cmd += ["--eta", str(args.eta)]
    subprocess.run(cmd, check=True, capture_output=True)
    return run_record(out)["timings"]["images_per_second"]


def compare_pngs(a: Path, b: Path, n):
    ours = [np.asarray(Image.open(a / "samples" / f"{i:08}.png"), dtype=int) for i in range(n)]
    theirs = [np.asarray(Image.open(b / "samples" / f"{i:08}.png"), dtype=int) for i in range(n)]
    same = sum(np.array_equal(x, y) for x, y in zip(ours, theirs))
    within = np.mean([np.mean(np.abs(x - y) <= 1) for x, y in zip(ours, theirs)])
    return same, within


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--schedulers", nargs="+", default=["ddpm", "ddim", "pndm", "dpmsolver"],
                   choices=["ddpm", "ddim", "pndm", "dpmsolver"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--unet-iterations", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the medians and ratios here")
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
        print(f"model {model}, schedulers {' '.join(args.schedulers)}, {args.steps} steps, {args.num_samples} "
              f"samples, batch {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

        # FLOPs: ours must count what torch counts, or the GFLOP/s below compare different things.
        torch_flops = diffusers_flops(unet_model, args.batch_size)
        peaks = {mode: worker_unet(args, model, mode, conv_peak=True) for mode in ("exact", "fast")}
        our_flops = peaks["exact"]["flops"]
        # torch's counter has no formula for the CPU attention kernel: compare without those products.
        without = our_flops - peaks["exact"]["attention_flops"]
        print(f"FLOPs per forward at batch {args.batch_size}: ddpm-worker {our_flops:.6g} ({without:.6g} without "
              f"the attention products), torch.utils.flop_counter on diffusers (CPU: no attention products) "
              f"{torch_flops:.6g}" + ("" if without == torch_flops else "  <-- MISMATCH"), flush=True)
        for mode, t in peaks.items():
            cp = t["conv_peak"]
            shapes = ", ".join(f"{s['shape']}: {s['gflops_per_second']:.0f}" for s in cp["shapes"])
            print(f"3x3 conv peak as {mode} runs ({t['lanes']} lane(s) x {t['threads_per_lane']} thread(s)): "
                  f"{cp['gflops_per_second']:.1f} GFLOP/s at {cp['shape']} (GFLOP/s by [Cin, Cout, H, W]: {shapes})",
                  flush=True)

        unet = {"diffusers": [], **{mode: [] for mode in MODES}}
        e2e = {(side, s): [] for s in args.schedulers for side in ("diffusers", *MODES)}
        for r in range(args.rounds):
            for mode in MODES:
                t = worker_unet(args, model, mode)
                unet[mode].append(t["gflops_per_second"])
            ms = diffusers_unet_ms(unet_model, args.batch_size, args.unet_iterations)
            unet["diffusers"].append(our_flops / ms / 1e6)
            for sched in args.schedulers:
                pipe = pipeline(unet_model, scheduler, sched)
                for mode in MODES:
                    e2e[(mode, sched)].append(worker_end_to_end(args, model, tmp / f"{mode}-{sched}-{r}", mode, sched))
                e2e[("diffusers", sched)].append(
                    diffusers_end_to_end(pipe, args, sched, tmp / f"py-{sched}-{r}"))
            print(f"round {r + 1}: UNet GFLOP/s " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in unet.items())
                  + "; images/s " + ", ".join(f"{k[1]}/{k[0]} {v[-1]:.3f}" for k, v in e2e.items()), flush=True)

        m = statistics.median
        result = {"batch_size": args.batch_size, "steps": args.steps, "num_samples": args.num_samples,
                  "rounds": args.rounds, "flops_per_forward": our_flops, "torch_flops_per_forward": torch_flops,
                  "unet_gflops_per_second": {k: m(v) for k, v in unet.items()},
                  "conv_peak_gflops_per_second": {k: t["conv_peak"]["gflops_per_second"] for k, t in peaks.items()},
                  "images_per_second": {f"{s}/{side}": m(v) for (side, s), v in e2e.items()}}
        print(f"\nmedians of {args.rounds} rounds, batch {args.batch_size}:")
        # diffusers runs as exact mode does (NCHW, all threads in one forward): its peak is exact's.
        for side, peak_of in (("diffusers", "exact"), ("exact", "exact"), ("fast", "fast"), ("fast-bf16", "fast")):
            peak = result["conv_peak_gflops_per_second"][peak_of]
            g = result["unet_gflops_per_second"][side]
            print(f"  UNet {side:9}: {g:6.1f} GFLOP/s = {g / peak * 100:5.1f} % of the fp32 conv peak as fast runs "
                  f"({peak:.1f}); {g / result['unet_gflops_per_second']['diffusers']:.3f}x diffusers"
                  if side == "fast-bf16" else
                  f"  UNet {side:9}: {g:6.1f} GFLOP/s = {g / peak * 100:5.1f} % of the conv peak as it runs "
                  f"({peak:.1f}); {g / result['unet_gflops_per_second']['diffusers']:.3f}x diffusers")
        fraction = result["unet_gflops_per_second"]["fast"] / result["conv_peak_gflops_per_second"]["fast"]
        result["fast_unet_fraction_of_peak"] = fraction
        checks = [("fast UNet >= 90 % of the conv peak", fraction >= 0.9, f"{fraction * 100:.1f} %")]
        for sched in args.schedulers:
            base = m(e2e[("diffusers", sched)])
            for mode, target in (("exact", 1.0), ("fast", 1.5), ("fast-bf16", 1.5)):
                ratio = m(e2e[(mode, sched)]) / base
                result[f"ratio/{sched}/{mode}"] = ratio
                same, within = compare_pngs(tmp / f"{mode}-{sched}-0", tmp / f"py-{sched}-0", args.num_samples)
                print(f"  {sched:9} {mode:9}: {m(e2e[(mode, sched)]):.3f} vs diffusers {base:.3f} images/s -> "
                      f"{ratio:.3f}x; PNGs identical to diffusers' {same}/{args.num_samples}, "
                      f"pixel values within 1/255: {within * 100:.2f}%")
                checks.append((f"{sched} {mode} >= {target}x diffusers", ratio >= target, f"{ratio:.3f}x"))
        print("\ntargets:")
        for name, ok, value in checks:
            print(f"  {'met ' if ok else 'MISS'} {name}: {value}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
