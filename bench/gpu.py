"""ddpm-worker against diffusers + torch.compile on one GPU, measured like for like, in one command.

    python bench/gpu.py --bin target/release/ddpm-worker [--device cuda] [--model DIR | --tiny]
                        [--stages forward e2e quality parity] [--dtypes fp16 bf16]
                        [--modes reduce-overhead max-autotune] [--batch-sizes 32 64 128] [--runs 5]
                        [--iterations 10] [--jobs ddpm1000 ddim50] [--e2e-runs 3] [--json FILE]

Model: the 256-family architecture (google/ddpm-ema-*-256; random weights from `init-model --preset
ddpm-256`) unless --model is given; `--tiny` uses `init-model --preset tiny` (16×16, 2 levels) with few
steps and samples, so that every stage runs on a CPU in minutes (a plumbing check, not a performance
figure).

Stages (--stages picks; the JSON, --json, is written after every stage, so a run stopped at its time
limit keeps what it measured):

  forward  UNet forward at each --batch-sizes, per --dtypes, fp16 against fp16 and bf16 against bf16:
           * diffusers eager (NCHW, as users run it);
           * diffusers channels-last under torch.compile(mode=M, fullgraph=True, dynamic=False) for each
             --modes M. Each (dtype, mode, batch) is its own compile: torch._dynamo.reset() first (which
             also drops the CUDA-graph trees), then dynamic=False, so no batch runs a dynamic-shape graph
             of another. The timestep goes in as a fixed-shape int64 tensor on the device (shape
             (batch,)), its value written in place before each call (fill_), never a Python int that
             Dynamo would specialise or make a SymInt. Warm-up: at least --warmup calls with different
             timestep values, continued (up to 30 calls) until two calls in a row were CUDA-graph replays
             (read from Inductor's CUDA-graph tree manager: path_state EXECUTION); each timed call is
             checked the same way and the count of replays is reported;
           * ours at default settings: `ddpm-bench unet --dtype D --fast` (eager) and `--fast
             --cuda-graphs`, and, as a separate row never compared as "ours", with cuDNN's autotuner
             (`--cudnn-benchmark`, off by default because its picks change images' last bits);
           Each row: --runs timed runs (ours: one process per run); a run is --iterations calls, each
           synchronised, and its figure the mean per call. Median and min–max of the runs per row, every
           run's figure (and every call's, where available) in the JSON. TFLOP/s from
           torch.utils.flop_counter's count; % of the datasheet dense bf16 peak (--datasheet-tflops, or
           known from the device name: 989 TFLOP/s for H100 SXM and H200) and of a measured bf16 8192³
           matrix product. Peak memory: diffusers, torch.cuda.max_memory_allocated and _reserved over the
           row; ours, the process's GPU memory sampled with nvidia-smi (per process where nvidia-smi can
           see it, else the device's used memory over its value before the process started) -- which
           includes the CUDA context and libtorch's cached blocks, so the comparable diffusers figure is
           its reserved memory plus the context (the context of this process is measured and printed).
  e2e      The jobs users run on the 256 family (--jobs): DDPM-1000 with 64 samples and DDIM-50 with 256
           samples, batch --e2e-batch-size, PNGs written.
           * diffusers: the compiled UNet of the forward stage at that batch (already warm: the e2e runs
             right after its forward rows, so no capture is paid) in a sampling loop a competent script
             would write: the scheduler's own step (DDPMScheduler / DDIMScheduler from the model folder)
             in float32, the timestep tensor as above, noise from one device generator, x_0 turned into
             uint8 on the device, and each PNG encoded and written by a
             concurrent.futures.ThreadPoolExecutor (os.cpu_count() threads) while the next batch samples.
             A job whose size is not a multiple of the batch pads its last batch (static shapes).
           * ours: a warm `serve` (one device thread; --dtype D --channels-last --cuda-graphs;
             --max-batch-size the job's batch), a warm-up job of the same batch shape first, then --e2e-runs
             timed rounds of each job; images/s from the job's manifest (first lease to manifest: samples,
             index, grids, shard records). And one `generate` run per job (--dtype D --fast --cuda-graphs)
             for its cold figures and its steady state: the batches after the first, from its run
             record's per-batch timings (sampling + handoff on the device thread; the first batch pays
             kernel selection and graph capture).
           PNG settings: ours, image-rs 0.25 `CompressionType::Fast` (png 0.18 `Compression::Fast`:
           fdeflate's fast mode) with adaptive filters; diffusers, PIL `compress_level=--png-level`
           (default 1, zlib's fastest level, the nearest PIL setting; PIL's own default is 6). The encoders
           differ, so the mean PNG size of each side is reported too.
           Also reported: time to first image (job start to the first PNG's mtime: for diffusers the
           sampling loop's start, for the service the SubmitJob call, for `generate` (cold) the process's
           start), peak memory as above, and cost per million images in GPU-hours (1e6 / images/s / 3600).
  quality  fp16 and bf16 images of a trained model (--quality-model, the demo digits, 16×16; DDIM 25
           steps, 64 samples, batch 16) against its fp32 images: share of pixel values within 2/255.
  parity   One fp32 UNet call (`ddpm-bench unet-output`) in both layouts against diffusers' on the same
           input and device (max |Δ|).
  lanes    (not run by default) `generate` with one and two lanes (DDIM 10 steps, 64 samples): same
           bytes, and the two-lane rate over one lane's.

On the CPU (`--device cpu`): fp32 only (and bf16 for the quality stage); CUDA graphs do not exist there,
so reduce-overhead and max-autotune are not run: one plain torch.compile (default mode) stands in for
them and the output says so; ours runs `--layout channels-last` (one lane with every core). Peak memory on
the CPU is the child's peak RSS (VmHWM), not GPU memory, and diffusers' is not reported.

Targets (issue 21): ours at default settings ≥ 1.3× the faster torch.compile mode at batch 32 and 64 in
each dtype; UNet ≥ 40 % of the datasheet dense bf16 peak; the service ≥ 1.3× the compiled diffusers
script end to end; fp16/bf16 ≥ 99 % of pixel values within 2/255 of fp32 on the trained model.

Device time: a full default run on one GPU takes well over 15 minutes (each ours row is --runs
processes; each compile of the 256-family UNet takes minutes, max-autotune the longest; DDPM-1000 with 64
samples is 2,000 forwards per side and round). Split it with --stages, --dtypes, --modes, --batch-sizes,
--jobs and --e2e-runs. Where the GPU machine has another torch than 2.13, build the binary against it with
bench/build-other-torch.sh.
"""

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; matched on the device name.
DATASHEET_BF16 = [("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.0), ("H100", 989.4),
                  ("A100", 312.0)]
JOBS = {  # name: (scheduler, steps, samples); --tiny scales them down.
    "ddpm1000": ("ddpm", 1000, 64),
    "ddim50": ("ddim", 50, 256),
}
TINY_JOBS = {"ddpm1000": ("ddpm", 20, 16), "ddim50": ("ddim", 5, 32)}


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def spread(values):
    """Median and min–max of a row's runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s, unit="ms", scale=1.0, digits=2):
    return (f"{s['median'] * scale:.{digits}f} {unit} (min {s['min'] * scale:.{digits}f}, "
            f"max {s['max'] * scale:.{digits}f}, n={s['n']})")


def datasheet_peak(name, override):
    if override:
        return override, "--datasheet-tflops"
    for key, tflops in DATASHEET_BF16:
        if key in name:
            return tflops, f"datasheet, dense bf16, matched '{key}'"
    return None, "unknown device: pass --datasheet-tflops"


def bf16_matmul_tflops(device):
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


def count_flops(unet, batch, device):
    from torch.utils.flop_counter import FlopCounterMode
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, device=device, dtype=unet.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, 500)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------
# Memory of a child process.

def nvidia_smi(*query):
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def gpu_used_mib(index):
    out = nvidia_smi("--query-gpu=memory.used", "-i", str(index))
    try:
        return float(out.strip().splitlines()[0])
    except (AttributeError, IndexError, ValueError):
        return None


def process_gpu_mib(pid):
    out = nvidia_smi("--query-compute-apps=pid,used_memory")
    if out is None:
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def rss_hwm_mib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Samples a child's memory every `interval` s while it runs: on CUDA, its GPU memory by nvidia-smi (per
    process where nvidia-smi sees the child's pid, else the device's used memory over its value when the
    sampler was made, before the child started); on the CPU its peak RSS (VmHWM)."""

    def __init__(self, device, interval=0.2):
        self.gpu = device.startswith("cuda")
        self.index = int(device.split(":")[1]) if ":" in device else 0
        self.baseline = gpu_used_mib(self.index) if self.gpu else None
        self.interval, self.pid = interval, None
        self.per_process = self.device_delta = self.rss = None
        self._stop = threading.Event()
        self._thread = None

    def watch(self, pid):
        self.pid = pid
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        if self.gpu:
            mine = process_gpu_mib(self.pid)
            if mine is not None:
                self.per_process = max(self.per_process or 0.0, mine)
            used = gpu_used_mib(self.index)
            if used is not None and self.baseline is not None:
                self.device_delta = max(self.device_delta or 0.0, used - self.baseline)
        else:
            hwm = rss_hwm_mib(self.pid)
            if hwm is not None:
                self.rss = max(self.rss or 0.0, hwm)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self):
        if self._thread is not None:
            self._sample()
            self._stop.set()
            self._thread.join()
        return self.result()

    def result(self):
        if not self.gpu:
            return {"peak_mib": self.rss, "method": "peak RSS (VmHWM, /proc), CPU memory"}
        if self.per_process is not None:
            return {"peak_mib": self.per_process,
                    "method": "nvidia-smi --query-compute-apps used_memory of the process, sampled every "
                              f"{self.interval} s (CUDA context and cached blocks included)"}
        if self.device_delta is not None:
            return {"peak_mib": self.device_delta,
                    "method": "nvidia-smi memory.used of the device over its value before the process, sampled "
                              f"every {self.interval} s (the process's pid was not visible to nvidia-smi)"}
        return {"peak_mib": None, "method": "nvidia-smi not available"}


def run_child(cmd, device, env=None):
    """Runs one of our commands, sampling its memory; on failure its stderr's end is shown before the error."""
    sampler = PeakMemory(device)
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env and {**os.environ, **env})
    sampler.watch(proc.pid)
    stdout, stderr = proc.communicate()
    memory = sampler.stop()
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}", flush=True)
        raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, stderr)
    return stdout, memory, started


# ---------------------------------------------------------------------------------------------------------
# UNet forward.

def cudagraph_state(device):
    """The state of Inductor's CUDA-graph tree after the last call: EXECUTION is a replay, RECORDING a capture,
    WARMUP an eager warm-up run. None where there is no tree (CPU, or not compiled with CUDA graphs)."""
    if not device.startswith("cuda"):
        return None
    try:
        from torch._inductor import cudagraph_trees
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        return manager.path_state.name if manager is not None else None
    except Exception:  # an internal API: its absence is reported, not fatal
        return "unknown"


class ForwardCaller:
    """Calls a diffusers UNet (eager or compiled) the way a careful user would: input and timestep are tensors of
    fixed shape on the device; each call writes the timestep's value in place."""

    def __init__(self, unet, batch, device, dtype, channels_last, compiled):
        size = unet.config.sample_size
        self.unet, self.device, self.compiled = unet, device, compiled
        gen = torch.Generator(device).manual_seed(0)
        self.x = torch.randn(batch, unet.config.in_channels, size, size, device=device, generator=gen,
                             dtype=torch.float32).to(dtype)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.t = torch.zeros(batch, dtype=torch.int64, device=device)

    def __call__(self, x, timestep):
        self.t.fill_(timestep)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.unet(x, self.t).sample

    def timed(self, timestep):
        start = time.perf_counter()
        self(self.x, timestep)
        sync(self.device)
        return time.perf_counter() - start, cudagraph_state(self.device) if self.compiled else None


def warm_up(caller, least, expect_replays):
    """Calls with varying timestep values until two in a row were CUDA-graph replays (where expected) and at
    least `least` calls ran; returns each warm-up call's seconds and state (the first includes compiling)."""
    calls = []
    for i in range(30):
        seconds, state = caller.timed((999 - 37 * i) % 1000)
        calls.append({"seconds": seconds, "state": state})
        replayed = [c["state"] == "EXECUTION" for c in calls[-2:]]
        if i + 1 >= least and (not expect_replays or (len(replayed) == 2 and all(replayed))):
            break
    return calls


def time_runs(caller, runs, iterations):
    """`runs` runs of `iterations` synchronised calls (timesteps 500, 499, … as `ddpm-bench unet`): each run's
    mean seconds per call, every call's seconds, and how many calls were not CUDA-graph replays."""
    per_run, per_call, not_replays = [], [], 0
    for r in range(runs):
        times = []
        for i in range(iterations):
            seconds, state = caller.timed(500 - i - r)
            times.append(seconds)
            not_replays += state not in (None, "EXECUTION")
        per_run.append(sum(times) / len(times))
        per_call.append(times)
    return per_run, per_call, not_replays


def ours_forward_runs(args, model, batch, dtype, extra):
    """--runs processes of `ddpm-bench unet`, each --iterations timed calls after 3 warm-up calls."""
    gpu = args.device.startswith("cuda")
    layout = ["--fast"] if gpu else ["--layout", "channels-last"]
    per_run, per_call, memory, raw = [], [], [], []
    for _ in range(args.runs):
        out, mem, _ = run_child([bench_bin(args.bin), "unet", "--model", str(model), "--device", args.device,
                                 "--batch-size", str(batch), "--iterations", str(args.iterations), "--warmup", "3",
                                 "--dtype", dtype, *layout, *extra], args.device)
        t = json.loads(out.strip().splitlines()[-1])
        raw.append(t)
        per_run.append(t["mean_ms"] / 1e3)
        if "times_ms" in t:
            per_call.append([v / 1e3 for v in t["times_ms"]])
        memory.append(mem)
    return per_run, per_call, memory, raw


def forward_row(result, key, name, batch, per_run, flops, peaks, extra):
    s = spread(per_run)
    row = {"name": name, "batch": batch, "runs_seconds": per_run, "seconds": s,
           "images_per_second": batch / s["median"], "tflops": flops / s["median"] / 1e12, **extra}
    for label, peak in peaks.items():
        if peak:
            row[f"percent_of_{label}"] = row["tflops"] / peak * 100
    result["forward"][key] = row
    shares = "".join(f", {row[f'percent_of_{label}']:.1f} % of {label}" for label, p in peaks.items() if p)
    print(f"  {name:58} batch {batch:<4} {fmt_spread(s, 'ms', 1e3)}  {row['images_per_second']:7.1f} images/s  "
          f"{row['tflops']:7.2f} TFLOP/s{shares}", flush=True)
    return row


def forward_stage(args, ctx, result, checks):
    gpu = args.device.startswith("cuda")
    peaks = {"datasheet bf16 peak": ctx["datasheet"], "measured bf16 matmul": ctx["matmul"]}
    unet32 = UNet2DModel.from_pretrained(ctx["model"]).to(args.device).eval()
    flops = {b: count_flops(unet32, b, args.device) for b in args.batch_sizes}
    del unet32
    for dtype in args.dtypes:
        rows = {b: {} for b in args.batch_sizes}
        # Ours first, while this process holds no model on the device.
        ours_rows = [("default", f"ours {dtype} --layout channels-last", [])]
        if gpu:
            ours_rows = [("eager", f"ours {dtype} --fast (no graphs)", []),
                         ("default", f"ours {dtype} --fast --cuda-graphs (default settings)", ["--cuda-graphs"]),
                         ("autotuner", f"ours {dtype} --fast --cuda-graphs --cudnn-benchmark (autotuner, not default)",
                          ["--cuda-graphs", "--cudnn-benchmark"])]
        for batch in args.batch_sizes:
            print(f"UNet forward, {dtype}, batch {batch} ({flops[batch] / 1e12:.3f} TFLOP), {args.runs} runs of "
                  f"{args.iterations} calls:", flush=True)
            for tag, name, extra in ours_rows:
                per_run, per_call, memory, raw = ours_forward_runs(args, ctx["model"], batch, dtype, extra)
                rows[batch][f"ours/{tag}"] = forward_row(
                    result, f"{dtype}/{batch}/ours/{tag}", name, batch, per_run, flops[batch], peaks,
                    {"per_call_seconds": per_call or None, "peak_memory": memory, "ddpm_bench": raw})
            ctx["save"](f"forward {dtype} ours")

        unet = UNet2DModel.from_pretrained(ctx["model"], torch_dtype=DTYPES[dtype]).to(args.device).eval()
        # Eager, NCHW, as users run it.
        for batch in args.batch_sizes:
            caller = ForwardCaller(unet, batch, args.device, DTYPES[dtype], channels_last=False, compiled=False)
            warm = warm_up(caller, args.warmup, expect_replays=False)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            per_run, per_call, _ = time_runs(caller, args.runs, args.iterations)
            rows[batch]["eager"] = forward_row(
                result, f"{dtype}/{batch}/diffusers/eager", f"diffusers {dtype} eager (NCHW)", batch, per_run,
                flops[batch], peaks, {"per_call_seconds": per_call, "warmup": warm, "peak_memory": torch_memory(gpu)})
            del caller
        ctx["save"](f"forward {dtype} diffusers eager")

        # Compiled, channels-last, one compile per (mode, batch).
        compiled_unet = unet.to(memory_format=torch.channels_last)
        for mode in ctx["modes"]:
            label = mode or "default"
            for batch in args.batch_sizes:
                torch._dynamo.reset()
                if gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                compiled = torch.compile(compiled_unet, mode=mode, fullgraph=True, dynamic=False)
                caller = ForwardCaller(compiled, batch, args.device, DTYPES[dtype], channels_last=True, compiled=True)
                warm = warm_up(caller, args.warmup, expect_replays=gpu)
                per_run, per_call, not_replays = time_runs(caller, args.runs, args.iterations)
                calls = args.runs * args.iterations
                name = f"diffusers {dtype} channels-last torch.compile({label})"
                row = forward_row(
                    result, f"{dtype}/{batch}/diffusers/compile-{label}", name, batch, per_run, flops[batch], peaks,
                    {"per_call_seconds": per_call, "warmup": warm, "peak_memory": torch_memory(gpu),
                     "compile_and_first_call_seconds": warm[0]["seconds"],
                     "timed_calls_not_replays": not_replays if gpu else None, "timed_calls": calls})
                rows[batch][f"compile-{label}"] = row
                states = [c["state"] for c in warm]
                print(f"    warm-up: {len(warm)} calls (first, with compiling: {warm[0]['seconds']:.1f} s)"
                      + (f", CUDA-graph states {states}; timed calls that were not replays: {not_replays}/{calls}"
                         if gpu else "; CPU: no CUDA graphs"), flush=True)
                if gpu:
                    checks.append((f"{name} batch {batch}: every timed call a CUDA-graph replay", not_replays == 0,
                                   f"{calls - not_replays}/{calls}"))
                if "e2e" in args.stages and batch == args.e2e_batch_size and dtype in args.e2e_dtypes:
                    # End to end with this compiled model now, while it is warm at this batch.
                    for job in ctx["jobs"]:
                        diffusers_e2e(args, ctx, result, compiled, dtype, label, job)
                del caller, compiled
                ctx["save"](f"forward {dtype} torch.compile({label}) batch {batch}")
        del unet, compiled_unet
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()

        # Like for like: ours at default settings against each diffusers row, same dtype, same batch.
        print(f"UNet forward, {dtype}, ratios of medians (diffusers time / ours time; > 1: ours faster):")
        for batch in args.batch_sizes:
            r = rows[batch]
            ours = r["ours/default"]["seconds"]["median"]
            compiled = {k: v for k, v in r.items() if k.startswith("compile-")}
            parts = [f"vs eager {r['eager']['seconds']['median'] / ours:.2f}x"]
            parts += [f"vs {k} {v['seconds']['median'] / ours:.2f}x" for k, v in compiled.items()]
            best = min(compiled.items(), key=lambda kv: kv[1]["seconds"]["median"], default=None)
            line = f"  batch {batch}: {r['ours/default']['name']}: " + ", ".join(parts)
            if "ours/autotuner" in r:
                line += (f"; autotuner row, separately: {r['ours/autotuner']['seconds']['median'] * 1e3:.2f} ms "
                         f"({r['ours/autotuner']['seconds']['median'] / ours:.3f}x ours' default time)")
            print(line, flush=True)
            if best:
                ratio = best[1]["seconds"]["median"] / ours
                result["forward"][f"{dtype}/{batch}/ratio"] = {
                    "ours_default_over_faster_compile": ratio, "faster_compile": best[0],
                    "ours_default_over_eager": r["eager"]["seconds"]["median"] / ours}
                if gpu and batch in (32, 64):
                    checks.append((f"{dtype} batch {batch}: ours (default settings) >= 1.3x diffusers "
                                   f"torch.compile (faster mode: {best[0]})", ratio >= 1.3, f"{ratio:.2f}x"))
            if gpu and ctx["datasheet"]:
                share = r["ours/default"]["percent_of_datasheet bf16 peak"]
                checks.append((f"{dtype} batch {batch}: UNet >= 40 % of the datasheet dense bf16 peak",
                               share >= 40, f"{share:.1f} %"))
        ctx["save"](f"forward {dtype}")


def torch_memory(gpu):
    if not gpu:
        return {"peak_mib": None, "method": "CPU: not measured for diffusers"}
    return {"max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
            "method": "torch.cuda.max_memory_allocated / max_memory_reserved over the row"}


# ---------------------------------------------------------------------------------------------------------
# End to end.

def first_png_time(folder: Path):
    times = [p.stat().st_mtime for p in folder.glob("*.png")]
    return min(times) if times else None


def png_mean_bytes(folder: Path):
    sizes = [p.stat().st_size for p in folder.glob("*.png")]
    return sum(sizes) / len(sizes) if sizes else None


def save_png(array, path, level):
    Image.fromarray(array).save(path, compress_level=level)


def diffusers_job(args, ctx, unet, dtype, job, out: Path, seed):
    """One job through the compiled UNet: batches in turn, PNGs written by a thread pool meanwhile."""
    kind, steps, samples = job
    batch, device = args.e2e_batch_size, args.device
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    scheduler = cls.from_pretrained(ctx["model"])
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    size, channels = unet.config.sample_size, unet.config.in_channels
    t = torch.zeros(batch, dtype=torch.int64, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    started_wall, started = time.time(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        pending = []
        for first in range(0, samples, batch):
            x = torch.randn(batch, channels, size, size, device=device, generator=gen, dtype=torch.float32)
            for step in timesteps:
                t.fill_(step)
                if ctx["gpu"]:
                    torch.compiler.cudagraph_mark_step_begin()
                model_in = x.to(DTYPES[dtype], memory_format=torch.channels_last)
                eps = unet(model_in, t).sample.float()
                x = scheduler.step(eps, step, x, generator=gen).prev_sample
            images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for i in range(min(batch, samples - first)):
                pending.append(pool.submit(save_png, images[i], out / "samples" / f"{first + i:08}.png",
                                           args.png_level))
        for f in pending:
            f.result()
    seconds = time.perf_counter() - started
    first_png = first_png_time(out / "samples")
    return {"seconds": seconds, "images_per_second": samples / seconds,
            "time_to_first_image_seconds": first_png - started_wall if first_png else None,
            "png_mean_bytes": png_mean_bytes(out / "samples")}


def job_name(job):
    kind, steps, samples = job
    return f"{kind.upper()}-{steps}, {samples} samples"


def cost_per_million(rate):
    return 1e6 / rate / 3600 if rate else None


def e2e_summary(runs, unit):
    rates = [r["images_per_second"] for r in runs]
    firsts = [r["time_to_first_image_seconds"] for r in runs if r.get("time_to_first_image_seconds") is not None]
    s = spread(rates)
    return {"images_per_second": s,
            "time_to_first_image_seconds": spread(firsts) if firsts else None,
            f"{unit}_hours_per_million_images": cost_per_million(s["median"])}


def print_e2e(name, summary, unit, extra=""):
    s = summary["images_per_second"]
    first = summary["time_to_first_image_seconds"]
    print(f"  {name:58} {fmt_spread(s, 'images/s', 1, 2)}; first image "
          f"{first['median']:.2f} s (min {first['min']:.2f}, max {first['max']:.2f}); "
          f"{summary[f'{unit}_hours_per_million_images']:.2f} {unit}-hours per million images{extra}"
          if first else f"  {name:58} {fmt_spread(s, 'images/s', 1, 2)}{extra}", flush=True)


def diffusers_e2e(args, ctx, result, compiled, dtype, mode, job_key):
    job = ctx["jobs"][job_key]
    gpu = ctx["gpu"]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for r in range(args.e2e_runs):
        out = ctx["tmp"] / f"py-{dtype}-{mode}-{job_key}-{r}"
        runs.append(diffusers_job(args, ctx, compiled, dtype, job, out, seed=r))
        shutil.rmtree(out)
    summary = e2e_summary(runs, ctx["unit"])
    summary.update({"runs": runs, "peak_memory": torch_memory(gpu), "png": f"PIL compress_level={args.png_level}",
                    "png_mean_bytes": statistics.mean(r["png_mean_bytes"] for r in runs)})
    key = f"{job_key}/{dtype}/diffusers compile-{mode}"
    result["e2e"][key] = summary
    print(f"end to end, {job_name(job)}, batch {args.e2e_batch_size}:")
    print_e2e(f"diffusers {dtype} torch.compile({mode}), threaded PNGs", summary, ctx["unit"],
              f"; {summary['png_mean_bytes'] / 1024:.1f} KiB per PNG")


def start_server(args, model: Path, data: Path, dtype):
    gpu = args.device.startswith("cuda")
    flags = ["--dtype", dtype, "--channels-last"] + (["--cuda-graphs"] if gpu else [])
    sampler = PeakMemory(args.device)
    device = "cuda:0" if args.device == "cuda" else args.device
    batch = str(args.e2e_batch_size)
    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--model", f"bench={model}",
         "--queue", f"sqlite:{data}/queue.sqlite", "--output", f"file:{data}/jobs", "--devices", device,
         "--max-batch-size", batch, "--default-batch-size", batch, *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"serve did not start: {line!r}")
    return proc, "http://" + line.split()[-1], sampler


def submit(args, url, job, batch, request_id, seed=0):
    kind, steps, samples = job
    started_wall = time.time()
    out = subprocess.run(
        [args.bin, "submit", "--server", url, "--model", "bench", "--scheduler", kind, "--steps", str(steps),
         "--num-samples", str(samples), "--seed", str(seed), "--batch-size", str(batch),
         "--request-id", request_id, "--wait"],
        check=True, capture_output=True, text=True).stdout
    manifest_uri = next(l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("manifest: "))
    manifest_path = Path(manifest_uri.strip().removeprefix("file://"))
    m = json.loads(manifest_path.read_text())
    seconds = (m["finalized_at_ms"] - m["started_at_ms"]) / 1000
    first_png = first_png_time(manifest_path.parent / "samples")
    return {"seconds": seconds, "images_per_second": samples / seconds,
            "time_to_first_image_seconds": first_png - started_wall if first_png else None,
            "png_mean_bytes": png_mean_bytes(manifest_path.parent / "samples"),
            "job_folder": str(manifest_path.parent)}


def generate_run(args, model, out: Path, job, batch, dtype):
    kind, steps, samples = job
    gpu = args.device.startswith("cuda")
    flags = ["--dtype", dtype, "--fast"] + (["--cuda-graphs"] if gpu else [])
    cmd = [args.bin, "generate", "--model", str(model), "--device", args.device, "--scheduler", kind,
           "--steps", str(steps), "--num-samples", str(samples), "--seed", "0", "--batch-size", str(batch),
           "--out", str(out), *flags]
    _, memory, started_wall = run_child(cmd, args.device)
    timings = json.loads((out / "shards" / "000000.json").read_text())["timings"]
    batches = timings.get("batches", [])
    rest = [b for b in batches if b["batch"] > 0]
    steady = (len(rest) * batch / sum(b["sampling_seconds"] + b["handoff_seconds"] for b in rest)) if rest else None
    first_png = first_png_time(out / "samples")
    return {"images_per_second_whole_run": timings["images_per_second"],
            "images_per_second_steady_state": steady,
            "steady_state_batches": len(rest),
            "batch_seconds": [b["sampling_seconds"] + b["handoff_seconds"] for b in batches],
            "load_seconds": timings.get("load_seconds"),
            "time_to_first_image_seconds_cold": first_png - started_wall if first_png else None,
            "png_mean_bytes": png_mean_bytes(out / "samples"), "peak_memory": memory}


def ours_e2e(args, ctx, result, checks):
    unit = ctx["unit"]
    for dtype in args.e2e_dtypes:
        data = ctx["tmp"] / f"service-{dtype}"
        proc, url, sampler = start_server(args, ctx["model"], data, dtype)
        try:
            # A warm-up job of each job's batch shape and scheduler: kernel selection and graph capture.
            for key, (kind, _, _) in ctx["jobs"].items():
                submit(args, url, (kind, 2, args.e2e_batch_size), args.e2e_batch_size, f"warm-{dtype}-{key}")
            sampler.watch(proc.pid)
            runs = {key: [] for key in ctx["jobs"]}
            for r in range(args.e2e_runs):
                for key, job in ctx["jobs"].items():
                    run = submit(args, url, job, args.e2e_batch_size, f"bench-{dtype}-{key}-{r}")
                    shutil.rmtree(run.pop("job_folder"), ignore_errors=True)
                    runs[key].append(run)
            memory = sampler.stop()
        finally:
            proc.terminate()
            proc.wait()
        for key, job in ctx["jobs"].items():
            summary = e2e_summary(runs[key], unit)
            summary.update({"runs": runs[key], "peak_memory": memory,
                            "png": "image-rs CompressionType::Fast (fdeflate), adaptive filters",
                            "png_mean_bytes": statistics.mean(r["png_mean_bytes"] for r in runs[key])})
            result["e2e"][f"{key}/{dtype}/ours service"] = summary
            gen = generate_run(args, ctx["model"], ctx["tmp"] / f"gen-{dtype}-{key}", job, args.e2e_batch_size, dtype)
            shutil.rmtree(ctx["tmp"] / f"gen-{dtype}-{key}")
            result["e2e"][f"{key}/{dtype}/ours generate"] = gen
            print(f"end to end, {job_name(job)}, batch {args.e2e_batch_size}:")
            print_e2e(f"ours {dtype} service (warm, {args.e2e_runs} rounds)", summary, unit,
                      f"; {summary['png_mean_bytes'] / 1024:.1f} KiB per PNG; peak memory "
                      f"{memory['peak_mib'] and round(memory['peak_mib'])} MiB ({memory['method']})")
            steady, cold = gen["images_per_second_steady_state"], gen["time_to_first_image_seconds_cold"]
            print(f"  ours {dtype} generate, one run: {gen['images_per_second_whole_run']:.2f} images/s whole run "
                  f"(first batch's capture included); steady state "
                  + (f"{steady:.2f} images/s over {gen['steady_state_batches']} batch(es) after the first"
                     if steady else "n/a (one batch)")
                  + (f"; cold first image {cold:.2f} s from process start" if cold is not None else "")
                  + f" (model load {gen['load_seconds']} s); peak memory "
                  f"{gen['peak_memory']['peak_mib'] and round(gen['peak_memory']['peak_mib'])} MiB", flush=True)
            ours = summary["images_per_second"]["median"]
            for k, v in result["e2e"].items():
                if k.startswith(f"{key}/{dtype}/diffusers"):
                    ratio = ours / v["images_per_second"]["median"]
                    print(f"  service over {k.split('/')[-1]} ({dtype}): {ratio:.2f}x (medians)", flush=True)
                    if ctx["gpu"]:
                        checks.append((f"{job_name(job)}, {dtype}: service >= 1.3x {k.split('/')[-1]} end to end",
                                       ratio >= 1.3, f"{ratio:.2f}x"))
        ctx["save"](f"e2e ours {dtype}")


# ---------------------------------------------------------------------------------------------------------
# Images: quality on a trained model, parity, lanes.

def pngs(folder: Path, n):
    return [np.asarray(Image.open(folder / "samples" / f"{i:08}.png"), dtype=int) for i in range(n)]


def simple_generate(args, model, out, batch, steps, samples, *flags):
    cmd = [args.bin, "generate", "--model", str(model), "--device", args.device, "--scheduler", "ddim",
           "--steps", str(steps), "--num-samples", str(samples), "--seed", "0", "--batch-size", str(batch),
           "--out", str(out), *flags]
    run_child(cmd, args.device)
    return json.loads((out / "shards" / "000000.json").read_text())["timings"]["images_per_second"]


def quality_stage(args, ctx, result, checks):
    tmp, n = ctx["tmp"], 64
    simple_generate(args, args.quality_model, tmp / "q-fp32", 16, 25, n)
    ref = pngs(tmp / "q-fp32", n)
    for dtype in (["fp16", "bf16"] if ctx["gpu"] else ["bf16"]):
        simple_generate(args, args.quality_model, tmp / f"q-{dtype}", 16, 25, n, "--dtype", dtype, "--fast")
        within = np.mean([np.mean(np.abs(a - b) <= 2) for a, b in zip(pngs(tmp / f"q-{dtype}", n), ref)])
        result["quality"][f"{args.quality_model.name}/{dtype}"] = within
        print(f"quality: {dtype} --fast pixel values of {args.quality_model.name} within 2/255 of fp32 (DDIM 25 "
              f"steps, {n} samples): {within * 100:.3f} %", flush=True)
        checks.append((f"{dtype} pixel values of {args.quality_model.name} within 2/255 of fp32 >= 99 %",
                       within >= 0.99, f"{within * 100:.3f} %"))


def parity_stage(args, ctx, result, checks):
    tmp = ctx["tmp"]
    unet32 = UNet2DModel.from_pretrained(ctx["model"]).to(args.device).eval()
    size = unet32.config.sample_size
    x = torch.randn(2, unet32.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    save_file({"sample": x}, tmp / "in.safetensors")
    for layout, limit in (("diffusers", 1e-4), ("channels-last", 1e-3)):
        run_child([bench_bin(args.bin), "unet-output", "--model", str(ctx["model"]), "--device", args.device,
                   "--input", str(tmp / "in.safetensors"), "--output", str(tmp / "out.safetensors"),
                   "--timestep", "500", "--layout", layout], args.device)
        ours = load_file(tmp / "out.safetensors")["output"]
        theirs = unet32(x.to(args.device), 500).sample.float().cpu()
        delta = (ours - theirs).abs().max().item()
        result["parity"][f"fp32/{layout}"] = delta
        print(f"parity: fp32 {layout} UNet output, max |delta| against diffusers {delta:.3g}", flush=True)
        checks.append((f"fp32 {layout} UNet output within {limit:g} of diffusers", delta <= limit, f"{delta:.3g}"))
    del unet32


def lanes_stage(args, ctx, result, checks):
    gpu, n = ctx["gpu"], 64
    for dtype in args.dtypes:
        rates = {}
        for lanes in (1, 2):
            flags = ["--dtype", dtype, "--fast", "--lanes", str(lanes)] + (["--cuda-graphs"] if gpu else [])
            rates[lanes] = simple_generate(args, ctx["model"], ctx["tmp"] / f"lanes-{dtype}-{lanes}",
                                           args.e2e_batch_size, 10, n, *flags)
        same = sum(np.array_equal(a, b) for a, b in zip(pngs(ctx["tmp"] / f"lanes-{dtype}-1", n),
                                                         pngs(ctx["tmp"] / f"lanes-{dtype}-2", n)))
        ratio = rates[2] / rates[1]
        result["lanes"][dtype] = {"images_per_second": rates, "same_images": same, "two_over_one": ratio}
        print(f"lanes, {dtype}: one {rates[1]:.2f}, two {rates[2]:.2f} images/s ({ratio:.3f}x); same bytes "
              f"{same}/{n} (one process each)", flush=True)
        checks.append((f"{dtype}: one lane and two lanes give the same images", same == n, f"{same}/{n}"))


# ---------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the ddpm-worker binary (ddpm-bench is taken from beside it)")
    p.add_argument("--model", type=Path, help="a diffusers UNet2DModel folder (default: init-model --preset ddpm-256)")
    p.add_argument("--tiny", action="store_true",
                   help="init-model --preset tiny, batches 8 16, e2e batch 8, DDPM 20 steps × 16 and DDIM 5 × 32 "
                        "samples: every stage on a CPU in minutes (plumbing, not performance)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--stages", nargs="+", default=["forward", "e2e", "quality", "parity"],
                   choices=["forward", "e2e", "quality", "parity", "lanes"])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "fp16", "bf16"],
                   help="forward stage precisions (default: fp16 bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--modes", nargs="+", default=["reduce-overhead", "max-autotune"],
                   choices=["reduce-overhead", "max-autotune", "default"],
                   help="torch.compile modes (on the CPU: one plain torch.compile instead)")
    p.add_argument("--batch-sizes", type=int, nargs="+")
    p.add_argument("--runs", type=int, default=5, help="timed runs per forward row (≥ 5 for reported figures)")
    p.add_argument("--iterations", type=int, default=10, help="calls per run")
    p.add_argument("--warmup", type=int, default=5, help="least warm-up calls (with varying timesteps)")
    p.add_argument("--jobs", nargs="+", default=["ddpm1000", "ddim50"], choices=list(JOBS))
    p.add_argument("--e2e-batch-size", type=int)
    p.add_argument("--e2e-dtypes", nargs="+", choices=["fp32", "fp16", "bf16"],
                   help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--e2e-runs", type=int, default=3, help="timed rounds of each job per side")
    p.add_argument("--png-level", type=int, default=1, help="PIL compress_level of the diffusers side")
    p.add_argument("--datasheet-tflops", type=float, help="the GPU's dense bf16 peak, if not known by name")
    p.add_argument("--quality-model", type=Path, default=Path(__file__).parent.parent / "demo" / "digits-16")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    torch.set_grad_enabled(False)
    gpu = args.device.startswith("cuda")
    args.dtypes = args.dtypes or (["fp16", "bf16"] if gpu else ["fp32"])
    args.e2e_dtypes = args.e2e_dtypes or (["fp16"] if gpu else ["fp32"])
    args.batch_sizes = args.batch_sizes or ([8, 16] if args.tiny else [32, 64, 128])
    args.e2e_batch_size = args.e2e_batch_size or (8 if args.tiny else 32)
    if "e2e" in args.stages:
        if "forward" not in args.stages:
            p.error("e2e runs the diffusers side on the forward stage's warm compiled model: add forward")
        if args.e2e_batch_size not in args.batch_sizes:
            p.error("--e2e-batch-size must be one of --batch-sizes")
        if not set(args.e2e_dtypes) <= set(args.dtypes):
            p.error("--e2e-dtypes must be among --dtypes")
    jobs = TINY_JOBS if args.tiny else JOBS
    # CUDA graphs exist only on CUDA: reduce-overhead and max-autotune are CUDA-graph modes.
    modes = [None if m == "default" else m for m in args.modes] if gpu else [None]

    device_name = torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, " \
                                                           f"{os.cpu_count()} cores)"
    datasheet, datasheet_source = datasheet_peak(device_name, args.datasheet_tflops) if gpu else (None, "CPU")
    result = {"meta": {
        "what": "bench/gpu.py" + (" -- CPU plumbing check with a tiny random model, not a performance figure"
                                  if not gpu or args.tiny else ""),
        "device": device_name, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(), "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
        "compile": ("torch.compile(mode=M, fullgraph=True, dynamic=False) after torch._dynamo.reset() for each "
                    "(dtype, mode, batch)" if gpu else
                    "CPU: CUDA graphs do not exist here, so reduce-overhead and max-autotune were not run; one plain "
                    "torch.compile(fullgraph=True, dynamic=False) (default mode, Inductor C++ backend) stands in, "
                    "after torch._dynamo.reset() for each (dtype, batch)"),
        "timestep": "int64 tensor of shape (batch,) on the device, value written in place (fill_) before each call",
        "png": {"ours": "image-rs 0.25 CompressionType::Fast = png 0.18 Compression::Fast (fdeflate), adaptive filters",
                "diffusers": f"PIL save(compress_level={args.png_level}), written by a ThreadPoolExecutor"},
        "datasheet_bf16_tflops": datasheet, "datasheet_source": datasheet_source,
        "jobs": {k: jobs[k] for k in args.jobs},
    }, "forward": {}, "e2e": {}, "quality": {}, "parity": {}, "lanes": {}}
    checks = []
    started = time.perf_counter()

    def save(stage):
        print(f"[{time.perf_counter() - started:7.1f} s] {stage} done", flush=True)
        result["checks"] = [{"check": n, "met": bool(ok), "value": v} for n, ok, v in checks]
        result["meta"]["elapsed_seconds"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    print(result["meta"]["what"])
    print(f"device {device_name}; torch {torch.__version__}; diffusers {diffusers.__version__}")
    print(f"compile: {result['meta']['compile']}")
    print(f"timestep: {result['meta']['timestep']}")
    print(f"PNG: ours {result['meta']['png']['ours']}; diffusers {result['meta']['png']['diffusers']}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "model"
            preset = "tiny" if args.tiny else "ddpm-256"
            subprocess.run([args.bin, "init-model", "--preset", preset, "--out", str(model)], check=True,
                           capture_output=True)
        ctx = {"model": model, "tmp": tmp, "gpu": gpu, "modes": modes, "save": save, "unit": "GPU" if gpu else "CPU",
               "jobs": {k: jobs[k] for k in args.jobs}, "datasheet": datasheet, "matmul": None}
        if gpu:
            torch.cuda.init()
            context = process_gpu_mib(os.getpid())
            result["meta"]["cuda_context_mib_of_this_process"] = context
            ctx["matmul"] = bf16_matmul_tflops(args.device)
            torch.cuda.empty_cache()
            result["meta"]["bf16_matmul_tflops"] = ctx["matmul"]
            print(f"bf16 peak: {datasheet} TFLOP/s ({datasheet_source}); a bf16 8192³ matmul here "
                  f"{ctx['matmul']:.1f} TFLOP/s; CUDA context of this process {context} MiB (nvidia-smi)", flush=True)
        else:
            print("CPU: torch.compile modes reduce-overhead and max-autotune need CUDA graphs; one plain "
                  "torch.compile (default mode) stands in for both. Peak memory: child RSS, not GPU memory.",
                  flush=True)

        if "forward" in args.stages:
            forward_stage(args, ctx, result, checks)
        if "e2e" in args.stages:
            ours_e2e(args, ctx, result, checks)
        if "quality" in args.stages and args.quality_model:
            quality_stage(args, ctx, result, checks)
            save("quality")
        if "parity" in args.stages:
            parity_stage(args, ctx, result, checks)
            save("parity")
        if "lanes" in args.stages:
            lanes_stage(args, ctx, result, checks)
            save("lanes")

    print("\ntargets:" if gpu else "\nchecks (CPU plumbing: the GPU targets are not evaluated here):")
    for name, ok, value in checks:
        print(f"  {'met ' if ok else 'MISS'} {name}: {value}")
    save("all")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
