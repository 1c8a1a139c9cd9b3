"""GPU checks and benchmarks, side by side with diffusers on the same device, in one command.

    python bench/gpu.py --bin target/release/ddpm-worker [--device cuda] [--batch-sizes 32 64] [--steps 10]
                        [--json FILE]

On the 256-family architecture (google/ddpm-ema-*-256, random weights from `init-model --preset ddpm-256`)
unless --model is given:
  1. peak: a bf16 8192³ matrix product's TFLOP/s on this device, measured first (the "% of bf16 peak" below);
  2. UNet forward at each batch size, images/s and TFLOP/s (FLOPs as torch.utils.flop_counter counts them):
     diffusers fp16 eager (NCHW, as users run it); ddpm-worker fp16 in the diffusers layout, fp16 `--fast`
     with the channels-last norm as libtorch ops (DDPM_FUSED_GROUP_NORM=0), and fp16 / bf16 `--fast`
     (channels-last, fused group norm), eager, replaying CUDA graphs, and with cuDNN's autotuner
     (`ddpm-bench unet`);
  3. end to end (DDIM, --steps, writing PNGs): diffusers fp16 eager pipeline vs `generate` in fp32 (exact)
     and `--fast` fp16 and bf16 with CUDA graphs, one thread and two threads (`--lanes 2`) sharing the GPU;
     images of one lane and two lanes byte-identical;
  4. fp16 and bf16 images of a trained model (--quality-model, the demo digits) vs its fp32 images (share of
     pixel values within 2/255, target ≥ 99 %; random weights amplify rounding through sampling, so their
     share is only reported);
  5. parity: one UNet call in fp32 (`ddpm-bench unet-output`) vs diffusers' on the same input and device (max |Δ|,
     target ≤ 1e-4);
  6. last, as compiling is slow: diffusers fp16 channels-last under torch.compile (--compile-mode);
then the targets: ≥ 1.5× diffusers fp16 eager images/s, ≥ 50 % of bf16 peak in the UNet, two threads
within 5 % of linear.

`--device cpu` with a small `--model` runs the same steps on the CPU (fp32, and bf16 for step 4), to check
this script where no GPU is. The JSON (--json) is written after every step. Where the GPU machine has
another torch than 2.13, build the binary against it with bench/build-other-torch.sh.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import load_file, save_file


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bf16_peak_tflops(device):
    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def flops(unet, batch, device):
    from torch.utils.flop_counter import FlopCounterMode
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, 500)
    return counter.get_total_flops()


def time_diffusers_unet(unet, batch, device, iterations, channels_last=False):
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for i in range(3):
            unet(x, 500 - i)
        sync(device)
        start = time.perf_counter()
        for i in range(iterations):
            unet(x, 500 - i)
        sync(device)
    return (time.perf_counter() - start) / iterations


def run(cmd, env=None):
    """Runs one of our commands; on failure its stderr's end is shown before the error."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env and {**os.environ, **env})
    if done.returncode != 0:
        print(f"FAILED ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-3000:]}", flush=True)
        done.check_returncode()
    return done.stdout


def ours_unet(args, model, batch, *flags, env=None):
    out = run([bench_bin(args.bin), "unet", "--model", str(model), "--device", args.device,
               "--batch-size", str(batch), "--iterations", str(args.iterations), "--warmup", "3", *flags], env=env)
    t = json.loads(out.strip().splitlines()[-1])
    return t["mean_ms"] / 1e3, t


def run_record(out: Path) -> dict:
    """The shard record of a whole `generate` run (shard 0): its device, layout and timings."""
    return json.loads((out / "shards" / "000000.json").read_text())


def generate(args, model, out, batch, *flags, samples=None):
    cmd = [args.bin, "generate", "--model", str(model), "--device", args.device, "--scheduler", "ddim",
           "--steps", str(args.steps), "--num-samples", str(samples or args.num_samples), "--seed", "0",
           "--batch-size", str(batch), "--out", str(out), *flags]
    run(cmd)
    timings = run_record(out)["timings"]
    generate.last = timings
    return timings["images_per_second"]


def batch_summary(timings):
    """Where `generate`'s sampling time went: the first batch (kernel selection, graph capture) and the rest."""
    batches = timings.get("batches", [])
    if len(batches) < 2:
        return ""
    rest = batches[1:]
    return (f" [batch 0 {batches[0]['sampling_seconds']:.2f} s; others: sampling "
            f"{statistics.median(b['sampling_seconds'] for b in rest):.3f} s, handoff "
            f"{statistics.median(b['handoff_seconds'] for b in rest):.3f} s (medians)]")


def diffusers_end_to_end(unet, scheduler, args, batch, out: Path):
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    pipe(batch_size=batch, num_inference_steps=2, generator=torch.Generator().manual_seed(0))  # warm-up
    sync(args.device)
    start = time.perf_counter()
    for first in range(0, args.num_samples, batch):
        generators = [torch.Generator().manual_seed(s) for s in range(first, min(first + batch, args.num_samples))]
        images = pipe(batch_size=len(generators), generator=generators, num_inference_steps=args.steps).images
        for i, image in enumerate(images):
            image.save(out / "samples" / f"{first + i:08}.png")
    return args.num_samples / (time.perf_counter() - start)


def pngs(folder: Path, n):
    return [np.asarray(Image.open(folder / "samples" / f"{i:08}.png"), dtype=int) for i in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--json", type=Path)
    p.add_argument("--quality-model", type=Path, default=Path(__file__).parent.parent / "demo" / "digits-16",
                   help="a trained model whose fp16/bf16 images are compared with its fp32 images")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode for diffusers' compiled UNet, timed last ('none' skips it)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    gpu = args.device.startswith("cuda")
    half = ["fp16", "bf16"] if gpu else []
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu"}
    checks = []
    started = time.perf_counter()

    def save(stage):
        # Written after every stage, so a run stopped at its time limit still leaves what it measured.
        print(f"[{time.perf_counter() - started:6.1f} s] {stage} done", flush=True)
        result["checks"] = [{"check": n, "met": bool(ok), "value": v} for n, ok, v in checks]
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([args.bin, "init-model", "--preset", "ddpm-256", "--out", str(model)], check=True,
                           capture_output=True)
        peak = bf16_peak_tflops(args.device)
        result["bf16_peak_tflops"] = peak
        print(f"device {result['device']}; bf16 matmul peak {peak and round(peak, 1)} TFLOP/s", flush=True)

        unet32 = UNet2DModel.from_pretrained(model).to(args.device).eval()
        scheduler = DDIMScheduler.from_pretrained(model)
        unet16 = UNet2DModel.from_pretrained(model, torch_dtype=torch.float16).to(args.device).eval() if gpu else None

        # 2. UNet forward.
        for batch in args.batch_sizes:
            f = flops(unet32, batch, args.device)
            rows = {}
            base_model = unet16 if gpu else unet32
            rows["diffusers eager"] = time_diffusers_unet(base_model, batch, args.device, args.iterations)
            if gpu:
                # The diffusers layout (NCHW, no fused paths), as diffusers eager runs.
                rows["ours fp16 NCHW"] = ours_unet(args, model, batch, "--dtype", "fp16")[0]
            if gpu:
                # The channels-last norm as libtorch ops instead of the fused kernels (src/cuda/group_norm.cu).
                rows["ours fp16 ops group norm"] = ours_unet(args, model, batch, "--dtype", "fp16", "--fast",
                                                             env={"DDPM_FUSED_GROUP_NORM": "0"})[0]
            for dtype in half or ["fp32"]:
                for graphs in ([False, True] if gpu else [False]):
                    flags = ["--dtype", dtype, "--fast"] + (["--cuda-graphs"] if graphs else [])
                    rows[f"ours {dtype}{' graphs' if graphs else ''}"] = ours_unet(args, model, batch, *flags)[0]
                if gpu:
                    # cuDNN's autotuner: faster kernels, picked per process (images may differ in last bits).
                    flags = ["--dtype", dtype, "--fast", "--cuda-graphs", "--cudnn-benchmark"]
                    rows[f"ours {dtype} graphs cudnn-benchmark"] = ours_unet(args, model, batch, *flags)[0]
            print(f"UNet forward, batch {batch} ({f / 1e12:.2f} TFLOP):", flush=True)
            base = rows["diffusers eager"]
            for name, seconds in rows.items():
                tflops = f / seconds / 1e12
                share = f", {tflops / peak * 100:.1f} % of bf16 peak" if peak else ""
                print(f"  {name:34} {seconds * 1e3:8.2f} ms  {batch / seconds:8.1f} images/s  {tflops:7.2f} TFLOP/s"
                      f"{share}  {base / seconds:.2f}x diffusers eager", flush=True)
                result[f"unet/{batch}/{name}"] = {"seconds": seconds, "tflops": tflops}
            if peak:
                best = max(f / s / 1e12 for n, s in rows.items() if n.startswith("ours"))
                checks.append((f"UNet >= 50 % of bf16 peak at batch {batch}", best >= 0.5 * peak,
                               f"{best / peak * 100:.1f} %"))

        save("UNet forward")

        # 3. End to end, and 4. images: fp32 exact, each half precision, one and two lanes.
        batch = args.batch_sizes[0]
        py = diffusers_end_to_end(unet16 if gpu else unet32, scheduler, args, batch, tmp / "py")
        print(f"end to end, DDIM {args.steps} steps, {args.num_samples} samples, batch {batch}: "
              f"diffusers {'fp16 ' if gpu else ''}eager {py:.2f} images/s", flush=True)
        result["e2e/diffusers"] = py
        fp32 = tmp / "fp32"
        fp32_rate = generate(args, model, fp32, batch)
        print(f"  ours fp32 exact: {fp32_rate:.2f} images/s = {fp32_rate / py:.2f}x diffusers"
              f"{batch_summary(generate.last)}", flush=True)
        result["e2e/fp32/exact"] = fp32_rate
        runs = {}
        for dtype in half or ["fp32"]:
            for lanes in (1, 2):
                flags = ["--dtype", dtype, "--fast", "--lanes", str(lanes)] + (["--cuda-graphs"] if gpu else [])
                out = tmp / f"{dtype}-{lanes}"
                try:
                    runs[(dtype, lanes)] = generate(args, model, out, batch, *flags)
                except subprocess.CalledProcessError:
                    checks.append((f"{dtype} fast, {lanes} lane(s) runs", False, "failed"))
                    continue
                print(f"  ours {dtype} fast{' graphs' if gpu else ''}, {lanes} lane(s): "
                      f"{runs[(dtype, lanes)]:.2f} images/s = {runs[(dtype, lanes)] / py:.2f}x diffusers"
                      f"{batch_summary(generate.last)}", flush=True)
                result[f"e2e/{dtype}/{lanes}"] = runs[(dtype, lanes)]
            if (dtype, 1) not in runs:
                continue
            one = pngs(tmp / f"{dtype}-1", args.num_samples)
            if (dtype, 2) in runs:
                two = pngs(tmp / f"{dtype}-2", args.num_samples)
                same = sum(np.array_equal(a, b) for a, b in zip(one, two))
                checks.append((f"{dtype}: one lane and two lanes give the same images", same == args.num_samples,
                               f"{same}/{args.num_samples}"))
                ratio = runs[(dtype, 2)] / runs[(dtype, 1)]
                checks.append((f"{dtype}: two lanes on one GPU >= 0.95x one lane", ratio >= 0.95, f"{ratio:.3f}x"))
            if gpu:
                # Random weights: rounding differences grow through sampling (on the CPU, bf16 vs fp32
                # on a random cifar10-32 gives ~11 %), so this is reported, not a target; the target
                # is checked on the trained --quality-model below.
                ref = pngs(fp32, args.num_samples)
                within = np.mean([np.mean(np.abs(a - b) <= 2) for a, b in zip(one, ref)])
                print(f"  {dtype} pixel values within 2/255 of fp32 (random weights): {within * 100:.2f} %")
                result[f"pixels/random/{dtype}"] = within
        best = max(runs.values(), default=0.0)
        checks.append(("end to end >= 1.5x diffusers fp16 eager" if gpu else "end to end >= 1.5x diffusers",
                       best / py >= 1.5, f"{best / py:.2f}x"))

        save("end to end")

        # fp16/bf16 images of a trained model against its fp32 images (the exact layout).
        if args.quality_model:
            q = dict(samples=64)
            qargs = argparse.Namespace(**{**vars(args), "steps": 25})
            generate(qargs, args.quality_model, tmp / "q-fp32", 16, **q)
            ref = pngs(tmp / "q-fp32", 64)
            for dtype in half or ["bf16"]:
                generate(qargs, args.quality_model, tmp / f"q-{dtype}", 16, "--dtype", dtype, "--fast", **q)
                within = np.mean([np.mean(np.abs(a - b) <= 2) for a, b in zip(pngs(tmp / f"q-{dtype}", 64), ref)])
                result[f"pixels/{args.quality_model.name}/{dtype}"] = within
                checks.append((f"{dtype} pixel values of {args.quality_model.name} within 2/255 of fp32 >= 99 %",
                               within >= 0.99, f"{within * 100:.3f} %"))
            save("trained model's pixels")

        # fp32 parity of one UNet call on the same input and device.
        size = unet32.config.sample_size
        x = torch.randn(2, unet32.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
        save_file({"sample": x}, tmp / "in.safetensors")
        for layout, limit in (("diffusers", 1e-4), ("channels-last", 1e-3)):
            run([bench_bin(args.bin), "unet-output", "--model", str(model), "--device", args.device, "--input",
                            str(tmp / "in.safetensors"), "--output", str(tmp / "out.safetensors"), "--timestep", "500",
                            "--layout", layout])
            ours = load_file(tmp / "out.safetensors")["output"]
            theirs = unet32(x.to(args.device), 500).sample.float().cpu()
            delta = (ours - theirs).abs().max().item()
            result[f"parity/fp32/{layout}"] = delta
            checks.append((f"fp32 {layout} UNet output within {limit:g} of diffusers", delta <= limit, f"{delta:.3g}"))
        save("parity")

        # diffusers fp16 channels-last under torch.compile (as diffusers' docs advise), last: compiling is slow.
        if gpu and args.compile_mode != "none":
            compiled = UNet2DModel.from_pretrained(model, torch_dtype=torch.float16).to(args.device).eval()
            compiled = compiled.to(memory_format=torch.channels_last)
            compiled = torch.compile(compiled, mode=args.compile_mode, fullgraph=True)
            for batch in args.batch_sizes:
                f = flops(unet32, batch, args.device)
                seconds = time_diffusers_unet(compiled, batch, args.device, args.iterations, channels_last=True)
                ours = min(v["seconds"] for k, v in result.items() if k.startswith(f"unet/{batch}/ours"))
                print(f"UNet forward, batch {batch}: diffusers fp16 channels-last torch.compile({args.compile_mode}) "
                      f"{seconds * 1e3:.2f} ms, {batch / seconds:.1f} images/s, {f / seconds / 1e12:.2f} TFLOP/s; "
                      f"ours best {seconds / ours:.2f}x", flush=True)
                result[f"unet/{batch}/diffusers compiled {args.compile_mode}"] = {
                    "seconds": seconds, "tflops": f / seconds / 1e12}
            save("torch.compile")

    print("\ntargets:")
    for name, ok, value in checks:
        print(f"  {'met ' if ok else 'MISS'} {name}: {value}")
    save("all")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
