"""The service's overhead and SubmitJob latency, measured against `generate` on the same machine.

    python bench/service.py --bin target/release/ddpm-worker [--model DIR] [--scheduler ddim] [--steps 20]
                            [--num-samples 32] [--batch-size 8] [--rounds 3] [--clients 200] [--per-client 10]
                            [--device cuda:0 [--half fp16|bf16]]

(`make bench-service` runs it.) Two measurements:
  * images/s of one job run by `generate` and by a warm `serve` (one CPU device thread with every core, as
    `generate` has), alternating round after round; `generate`'s figure is its shard record's sampling time
    (sampling and PNG writes, model load excluded), the service's is the job's manifest from its first lease
    to its manifest (sampling, PNG writes, shard records, grids and manifest). The ratio of the medians is
    the service's cost; the target is ≥ 0.97.
  * SubmitJob latency with `--clients` concurrent gRPC clients each submitting `--per-client` one-sample
    jobs (`ddpm-bench submit`), against a fresh server with its SQLite queue on local disk.
Without --model, a random-weight google/ddpm-cifar10-32 architecture is made with `init-model`. On a GPU
(`--device cuda:0`), `--half` runs both in that precision, channels-last, with CUDA graphs.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))


def start_server(args, model: Path, data: Path, extra=()):
    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--model", f"bench={model}",
         "--queue", f"sqlite:{data}/queue.sqlite", "--output", f"file:{data}/jobs", "--devices", args.device,
         *serve_flags(args), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"serve did not start: {line!r}")
    return proc, "http://" + line.split()[-1]


def serve_flags(args):
    return ["--dtype", args.half, "--channels-last", "--cuda-graphs"] if args.half else []


def run_record(out: Path) -> dict:
    """The shard record of a whole `generate` run (shard 0): its device, layout and timings."""
    return json.loads((out / "shards" / "000000.json").read_text())


def generate_rate(args, model: Path, out: Path) -> float:
    half = ["--dtype", args.half, "--fast", "--cuda-graphs"] if args.half else []
    cmd = [args.bin, "generate", "--model", str(model), "--scheduler", args.scheduler, "--steps", str(args.steps),
           "--num-samples", str(args.num_samples), "--seed", "0", "--batch-size", str(args.batch_size),
           "--device", args.device, "--out", str(out), *half]
    subprocess.run(cmd, check=True, capture_output=True)
    return run_record(out)["timings"]["images_per_second"]


def service_rate(args, url: str, data: Path, round_: int) -> float:
    out = subprocess.run(
        [args.bin, "submit", "--server", url, "--model", "bench", "--scheduler", args.scheduler,
         "--steps", str(args.steps), "--num-samples", str(args.num_samples), "--seed", "0",
         "--batch-size", str(args.batch_size), "--request-id", f"bench-{round_}", "--wait"],
        check=True, capture_output=True, text=True,
    ).stdout
    manifest_uri = next(l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("manifest: "))
    m = json.loads(Path(manifest_uri.removeprefix("file://")).read_text())
    seconds = (m["finalized_at_ms"] - m["started_at_ms"]) / 1000
    return args.num_samples / seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu, or one CUDA device such as cuda:0")
    p.add_argument("--half", choices=["fp16", "bf16"], help="on CUDA: this precision, channels-last, CUDA graphs")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([args.bin, "init-model", "--preset", "cifar10-32", "--out", str(model)],
                           check=True, capture_output=True)

        proc, url = start_server(args, model, tmp / "service")
        gen, svc = [], []
        try:
            for r in range(args.rounds):
                gen.append(generate_rate(args, model, tmp / f"generate-{r}"))
                svc.append(service_rate(args, url, tmp / "service", r))
                print(f"round {r}: generate {gen[-1]:.2f} images/s, service {svc[-1]:.2f} images/s",
                      file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait()

        # Latency: a fresh server, so the queue holds only this test's jobs.
        proc, url = start_server(args, model, tmp / "latency")
        try:
            time.sleep(1)
            out = subprocess.run([bench_bin(args.bin), "submit", "--server", url, "--model", "bench",
                                  "--clients", str(args.clients), "--per-client", str(args.per_client)],
                                 check=True, capture_output=True, text=True).stdout
            latency = json.loads(out)
        finally:
            proc.terminate()
            proc.wait()

    result = {
        "job": {"scheduler": args.scheduler, "steps": args.steps, "num_samples": args.num_samples,
                "batch_size": args.batch_size, "rounds": args.rounds},
        "generate_images_per_second": statistics.median(gen),
        "service_images_per_second": statistics.median(svc),
        "service_over_generate": statistics.median(svc) / statistics.median(gen),
        "submit_latency": latency,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
