"""The same job through a warm `serve` and through `generate`, alternating, in each layout.

    python bench/pipeline.py --bin BIN [--preset tiny] [--scheduler ddim] [--steps 2] [--num-samples 8192]
                             [--batch-size 256] [--formats files,webdataset] [--rounds 3] [--out FILE]

(`make bench-pipeline` runs it with these defaults: the job of issue 20.) Per round and layout, `generate`
runs the job, then the service runs it (one device thread with every core, as `generate` has; SQLite queue,
local folder). Both figures are images/s over the job's samples:
  * generate: its shard record's (`shards/000000.json`) `timings.images_per_second` (first noise draw to
    the last sample stored; model load, grids and manifest excluded);
  * service: the job's manifest, `num_samples / (finalized_at - started_at)`: first lease to the manifest
    (sampling, storing, shard records, grids and manifest included).
The device's own view comes from the service's /metrics: `ddpm_device_busy_seconds` (each batch) and
`ddpm_device_idle_seconds` (each gap before a batch while work was waiting), summed over the job.
Every raw figure is printed as one JSON line per run; the summary is the medians and their ratio.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def metric_sums(url: str) -> dict:
    """Sum of every `_sum`/`_count` series of the device histograms, across devices."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    sums = {}
    for line in text.splitlines():
        m = re.match(r"^(ddpm_device_(?:busy|idle)_seconds_(?:sum|count))(?:\{[^}]*\})? (\S+)$", line)
        if m:
            sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(2))
    return sums


def start_server(args, model: Path, data: Path):
    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{args.metrics_port}",
         "--model", f"bench={model}", "--queue", f"sqlite:{data}/queue.sqlite", "--output", f"file:{data}/jobs",
         "--scratch-dir", f"{data}/scratch", "--model-cache", f"{data}/models", "--devices", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"serve did not start: {line!r}")
    url = "http://" + line.split()[-1]
    # Ready once the device is warm.
    for _ in range(600):
        if subprocess.run([args.bin, "list", "--server", url], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    return proc, url


def run_record(out: Path) -> dict:
    """The shard record of a whole `generate` run (shard 0): its device, layout and timings."""
    return json.loads((out / "shards" / "000000.json").read_text())


def run_generate(args, model: Path, out: Path, fmt: str) -> dict:
    subprocess.run(
        [args.bin, "generate", "--model", str(model), "--scheduler", args.scheduler, "--steps", str(args.steps),
         "--num-samples", str(args.num_samples), "--seed", "0", "--batch-size", str(args.batch_size),
         "--format", fmt, "--out", str(out)],
        check=True, capture_output=True,
    )
    r = run_record(out)
    return {"images_per_second": r["timings"]["images_per_second"],
            "seconds": r["sampling_seconds"]}


def run_service(args, url: str, fmt: str, tag: str) -> dict:
    metrics = f"http://127.0.0.1:{args.metrics_port}/metrics"
    before = metric_sums(metrics)
    out = subprocess.run(
        [args.bin, "submit", "--server", url, "--model", "bench", "--scheduler", args.scheduler,
         "--steps", str(args.steps), "--num-samples", str(args.num_samples), "--seed", "0",
         "--batch-size", str(args.batch_size), "--format", fmt, "--request-id", tag, "--wait"],
        check=True, capture_output=True, text=True,
    ).stdout
    after = metric_sums(metrics)
    manifest_uri = next(l.split(" ", 1)[1] for l in out.splitlines() if l.startswith("manifest: "))
    m = json.loads(Path(manifest_uri.removeprefix("file://")).read_text())
    seconds = (m["finalized_at_ms"] - m["started_at_ms"]) / 1000
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    busy = delta.get("ddpm_device_busy_seconds_sum", 0.0)
    idle = delta.get("ddpm_device_idle_seconds_sum", 0.0)
    return {"images_per_second": args.num_samples / seconds, "seconds": seconds, "shards": m["totals"]["shards"],
            "device_busy_seconds": busy, "device_idle_seconds": idle,
            "batches": delta.get("ddpm_device_busy_seconds_count", 0.0),
            "idle_over_busy": idle / busy if busy else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path, help="a model folder (default: init-model --preset PRESET)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--formats", default="files,webdataset")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--metrics-port", type=int, default=19464)
    p.add_argument("--out", type=Path, help="also write the raw lines and the summary here")
    args = p.parse_args()
    formats = args.formats.split(",")
    lines = []

    def emit(record):
        lines.append(json.dumps(record))
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([args.bin, "init-model", "--preset", args.preset, "--out", str(model)],
                           check=True, capture_output=True)
        proc, url = start_server(args, model, tmp / "service")
        runs = {f: {"generate": [], "service": []} for f in formats}
        try:
            for r in range(args.rounds):
                for fmt in formats:
                    g = run_generate(args, model, tmp / f"generate-{fmt}-{r}", fmt)
                    emit({"round": r, "format": fmt, "side": "generate", **g})
                    s = run_service(args, url, fmt, f"bench-{fmt}-{r}")
                    emit({"round": r, "format": fmt, "side": "service", **s})
                    runs[fmt]["generate"].append(g["images_per_second"])
                    runs[fmt]["service"].append(s["images_per_second"])
        finally:
            proc.terminate()
            proc.wait()

    summary = {
        "job": {"preset": args.preset, "scheduler": args.scheduler, "steps": args.steps,
                "num_samples": args.num_samples, "batch_size": args.batch_size, "rounds": args.rounds},
        "formats": {
            fmt: {"generate_median": statistics.median(v["generate"]),
                  "service_median": statistics.median(v["service"]),
                  "service_over_generate": statistics.median(v["service"]) / statistics.median(v["generate"]),
                  "per_round_ratio": [s / g for s, g in zip(v["service"], v["generate"])]}
            for fmt, v in runs.items()
        },
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n" + json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
