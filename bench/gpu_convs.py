"""The UNet's convolutions alone: how much of a forward's time cuDNN's kernels take, and at what share of the
bf16 matmul peak they run, on one CUDA device.

    python bench/gpu_convs.py --model DIR [--batch-size 32] [--dtype bf16] [--ours-ms 61.0]

Every Conv2d call of one diffusers UNet forward is recorded (input and weight shapes, stride, padding) at
the batch size; each distinct call is then timed alone with torch's `conv2d`, channels-last, in the dtype
(cuDNN's heuristics, no autotuning, as ddpm-worker runs by default), and weighted by how often the forward
makes it. The sum is what the forward would take if it were nothing but its convolutions: with
`--ours-ms` (a `ddpm-bench unet` mean), the rest of our forward is that minus the sum. The FLOPs are counted as
2·(output elements)·(C_in/groups)·k_h·k_w (plus nothing for the bias).
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel


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
    args = p.parse_args()
    torch.set_grad_enabled(False)
    device = "cuda"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
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

    peak = bf16_peak_tflops(device)
    rows = []
    total_ms, total_flops = 0.0, 0.0
    for key, count in calls.items():
        shape, wshape, stride, padding, groups = key
        inp = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        weight = torch.randn(wshape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        bias = torch.randn(wshape[0], device=device, dtype=dtype)
        for _ in range(3):
            F.conv2d(inp, weight, bias, stride, padding, 1, groups)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iterations):
            F.conv2d(inp, weight, bias, stride, padding, 1, groups)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.iterations
        tflops = flops_of[key] / (ms / 1e3) / 1e12
        rows.append({"input": shape, "weight": wshape, "stride": stride, "calls": count, "ms": ms,
                     "tflops": tflops, "share_of_peak": tflops / peak})
        total_ms += ms * count
        total_flops += flops_of[key] * count

    rows.sort(key=lambda r: -r["ms"] * r["calls"])
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.1f} TFLOP/s; {args.dtype}, batch {args.batch_size}, "
          f"{sum(calls.values())} convolutions in {len(calls)} shapes")
    for r in rows[:12]:
        print(f"  {str(r['input']):24} w {str(r['weight']):22} s{r['stride'][0]} x{r['calls']:<2} "
              f"{r['ms']:7.3f} ms  {r['tflops']:7.1f} TFLOP/s  {r['share_of_peak'] * 100:5.1f} % of peak")
    conv_tflops = total_flops / (total_ms / 1e3) / 1e12
    print(f"all convolutions: {total_ms:.2f} ms, {total_flops / 1e12:.2f} TFLOP, {conv_tflops:.1f} TFLOP/s, "
          f"{conv_tflops / peak * 100:.1f} % of peak")
    result = {"device": torch.cuda.get_device_name(), "peak_tflops": peak, "dtype": args.dtype,
              "batch_size": args.batch_size, "conv_ms": total_ms, "conv_tflop": total_flops / 1e12,
              "conv_share_of_peak": conv_tflops / peak, "shapes": rows}
    if args.ours_ms:
        print(f"ours {args.ours_ms:.2f} ms: convolutions {total_ms / args.ours_ms * 100:.1f} %, the rest "
              f"{args.ours_ms - total_ms:.2f} ms")
        result["ours_ms"] = args.ours_ms
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
