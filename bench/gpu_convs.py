"""The UNet's convolutions alone: how much of a forward's time cuDNN's kernels take, and at what share of the
bf16 matmul peak they run, on one CUDA device.

    python bench/gpu_convs.py --model DIR [--batch-size 32] [--dtype bf16] [--ours-ms 61.0]

Every Conv2d call of one diffusers UNet forward is recorded (input and weight shapes, stride, padding) at
the batch size; each distinct call is then timed alone with torch's `conv2d`, channels-last, in the dtype
(cuDNN's heuristics, no autotuning, as ddpm-worker runs by default), and weighted by how often the forward
makes it. The sum is what diffusers' convolutions take when each runs alone; it is not a ceiling for our
forward, which runs them differently, so three sums are printed:
  * cuDNN conv2d with its bias, every call (diffusers' way; the figure earlier results reported);
  * the same without the bias (libtorch's cuDNN path adds a convolution's bias in a pass of its own);
  * as ddpm-worker's `--fast` path runs them: 3×3 convolutions by cuDNN, the 1×1 shortcuts as one matrix
    product over the NHWC rows (`linear`, src/model/resnet.rs), bias included.
With `--ours-ms` (a `ddpm-bench unet` mean), the rest of our forward is that minus the last sum. The FLOPs
are counted as 2·(output elements)·(C_in/groups)·k_h·k_w (plus nothing for the bias). Shares are given of the
measured bf16 matmul peak and of the datasheet's dense bf16 peak (--datasheet-tflops, or known from the device
name: 989.4 TFLOP/s for H100 SXM and H200). `--device cpu` runs the same code on the CPU (a plumbing check,
wall-clock timing, no peak).
"""

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel


DATASHEET_BF16 = [("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.0), ("H100", 989.4),
                  ("A100", 312.0)]


def timed_ms(fn, iterations, device):
    """Mean milliseconds of `fn` over `iterations` calls after 3 warm-up calls (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if device == "cpu":
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - start) * 1e3 / iterations
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def bf16_peak_tflops(device):
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--ours-ms", type=float, help="our UNet forward at this batch size and dtype (ddpm-bench unet)")
    p.add_argument("--json", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--datasheet-tflops", type=float, help="the GPU's dense bf16 peak, if not known by name")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if device == "cpu":
        dtype = torch.float32
    unet = UNet2DModel.from_pretrained(args.model, torch_dtype=dtype).to(device).eval()

    calls = collections.Counter()
    flops_of = {}

    def record(module, inputs, output):
        x = inputs[0]
        key = (tuple(x.shape), tuple(module.weight.shape), module.stride, module.padding, module.groups)
        calls[key] += 1
        k = module.weight.shape
        flops_of[key] = 2 * output.numel() * (k[1]) * k[2] * k[3]

    hooks = [m.register_forward_hook(record) for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    size = unet.config.sample_size
    x = torch.randn(args.batch_size, unet.config.in_channels, size, size, device=device, dtype=dtype)
    unet(x, 500)
    for h in hooks:
        h.remove()

    gpu = device != "cpu"
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = bf16_peak_tflops(device) if gpu else None
    datasheet = args.datasheet_tflops or next((t for k, t in DATASHEET_BF16 if k in name), None) if gpu else None
    rows = []
    totals = {"conv2d with bias": 0.0, "conv2d without bias": 0.0, "ours: 1x1 as linear": 0.0}
    total_flops = 0.0
    for key, count in calls.items():
        shape, wshape, stride, padding, groups = key
        inp = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(wshape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        bias = torch.randn(wshape[0], device=device, dtype=dtype)
        ms = timed_ms(lambda: F.conv2d(inp, weight, bias, stride, padding, 1, groups), args.iterations, device)
        ms_nobias = timed_ms(lambda: F.conv2d(inp, weight, None, stride, padding, 1, groups), args.iterations, device)
        ours_ms = ms
        pointwise = wshape[2:] == (1, 1) and stride == (1, 1) and groups == 1
        if pointwise:
            # The channels-last memory viewed as (N·H·W, C_in) rows, one matrix product with the bias.
            b, c, h, w = shape
            rows_in = inp.permute(0, 2, 3, 1).reshape(b * h * w, c)
            w2 = weight.reshape(wshape[0], wshape[1])
            ours_ms = timed_ms(lambda: F.linear(rows_in, w2, bias), args.iterations, device)
        tflops = flops_of[key] / (ms / 1e3) / 1e12
        rows.append({"input": shape, "weight": wshape, "stride": stride, "calls": count, "ms": ms,
                     "ms_without_bias": ms_nobias, "ms_as_ours": ours_ms, "ours_path": "linear" if pointwise else
                     "conv2d", "tflops": tflops, "share_of_peak": tflops / peak if peak else None,
                     "share_of_datasheet": tflops / datasheet if datasheet else None})
        totals["conv2d with bias"] += ms * count
        totals["conv2d without bias"] += ms_nobias * count
        totals["ours: 1x1 as linear"] += ours_ms * count
        total_flops += flops_of[key] * count

    def shares(tflops):
        out = []
        if peak:
            out.append(f"{tflops / peak * 100:.1f} % of the measured bf16 matmul peak")
        if datasheet:
            out.append(f"{tflops / datasheet * 100:.1f} % of the datasheet dense bf16 peak ({datasheet} TFLOP/s)")
        return ", ".join(out)

    rows.sort(key=lambda r: -r["ms"] * r["calls"])
    print(f"{name}: bf16 matmul peak {peak and round(peak, 1)} TFLOP/s; datasheet {datasheet}; {args.dtype if gpu else 'fp32'}, "
          f"batch {args.batch_size}, {sum(calls.values())} convolutions in {len(calls)} shapes")
    for r in rows[:12]:
        print(f"  {str(r['input']):24} w {str(r['weight']):22} s{r['stride'][0]} x{r['calls']:<2} "
              f"{r['ms']:7.3f} ms (no bias {r['ms_without_bias']:7.3f}, as ours {r['ms_as_ours']:7.3f} "
              f"{r['ours_path']})  {r['tflops']:7.1f} TFLOP/s  {shares(r['tflops'])}")
    for label, ms in totals.items():
        tflops = total_flops / (ms / 1e3) / 1e12
        print(f"all convolutions, {label}: {ms:.2f} ms, {total_flops / 1e12:.2f} TFLOP, {tflops:.1f} TFLOP/s"
              + (f", {shares(tflops)}" if gpu else ""))
    result = {"device": name, "peak_tflops": peak, "datasheet_tflops": datasheet, "dtype": args.dtype,
              "batch_size": args.batch_size, "conv_ms": totals["conv2d with bias"], "totals_ms": totals,
              "conv_tflop": total_flops / 1e12, "shapes": rows}
    if args.ours_ms:
        ours_convs = totals["ours: 1x1 as linear"]
        print(f"ours {args.ours_ms:.2f} ms: its convolutions run our way {ours_convs / args.ours_ms * 100:.1f} %, "
              f"the rest {args.ours_ms - ours_convs:.2f} ms")
        result["ours_ms"] = args.ours_ms
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
