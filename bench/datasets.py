"""Dataset output at scale: a large job of the `tiny` preset in each layout, and finalize at growing sizes.

    python bench/datasets.py [--bin BIN] [--samples 100000] [--formats files,webdataset,parquet]
                             [--finalize-sizes 10000,100000,1000000] [--keep]

Two parts, all figures in one JSON object on stdout (a table on stderr):

  * throughput: for each layout, a fresh `serve` (SQLite queue, local directory, one CPU device thread
    with every core, the random-weight `tiny` preset: 16x16 RGB, DDIM 1 step, batch size 256) runs one
    job of --samples samples. Measured: wall time from SubmitJob to SUCCEEDED (`submit --wait`), samples/s,
    peak RSS of the `serve` process (VmHWM from /proc when the job ends), and the objects the job
    wrote (files under its folder). Targets: webdataset >= 1.5x the samples/s of files; at most 100
    objects per 100,000 samples (plus grids) for webdataset and parquet.
  * writer: the output path without sampling: for each layout, `ddpm-bench finalize --prepare` writes --samples
    synthetic 16x16 images through the real shard writer (encode, spool, upload, index, record) into a
    local directory, 10,000 samples per shard. Measured: samples/s, objects, peak RSS.
  * finalize: for each size in --finalize-sizes, `ddpm-bench finalize` writes a synthetic
    webdataset job (8x8 images, 10,000 samples per shard) with the real shard writer in one process,
    then finalizes it (reads every shard record, writes the manifest) in a fresh process whose time and
    peak RSS are reported. Target: finalize memory flat in the number of samples.

Every wait is bounded; servers listen on 127.0.0.1 on free ports and are killed at the end.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))


def default_bin() -> str:
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/ddpm-worker/target")
    return str(Path(target) / "release" / "ddpm-worker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def throughput(binary: str, model: Path, work: Path, fmt: str, samples: int, timeout: float) -> dict:
    data = work / f"serve-{fmt}"
    port = free_port()
    log = open(work / f"serve-{fmt}.log", "w")
    server = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--model", f"tiny={model}",
         "--queue", f"sqlite:{data}/queue.sqlite", "--output", f"file:{data}/jobs",
         "--devices", "cpu", "--max-batch-size", "1024"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([binary, "list", "--server", url], capture_output=True)
            if probe.returncode == 0:
                break
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"serve did not start: {(work / f'serve-{fmt}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        started = time.time()
        submit = subprocess.run(
            [binary, "submit", "--server", url, "--model", "tiny", "--scheduler", "ddim", "--steps", "1",
             "--num-samples", str(samples), "--batch-size", "256", "--seed", "0", "--format", fmt, "--wait",
             "--timeout-seconds", "30"],
            capture_output=True, text=True, timeout=timeout)
        wall = time.time() - started
        if submit.returncode != 0:
            raise RuntimeError(f"the {fmt} job failed: {submit.stdout}{submit.stderr}")
        rss = peak_rss_mib(server.pid)
        (job_dir,) = [p for p in (data / "jobs").iterdir() if p.is_dir() and not p.name.startswith(".")]
        manifest = json.loads((job_dir / "manifest.json").read_text())
        objects = count_files(job_dir)
        grids = len(manifest["grids"])
        return {
            "format": fmt, "samples": samples, "wall_seconds": round(wall, 2),
            "samples_per_second": round(samples / wall, 1), "serve_peak_rss_mib": round(rss, 1),
            "objects": objects, "objects_without_grids": objects - grids, "grids": grids,
            "shards": manifest["totals"]["shards"], "data_files": manifest["totals"]["data_files"],
            "data_bytes": manifest["totals"]["data_bytes"],
        }
    finally:
        server.kill()
        server.wait()
        log.close()


def writer(binary: str, model: Path, work: Path, fmt: str, samples: int) -> dict:
    """The output path alone: `ddpm-bench finalize --prepare` writes a synthetic job of 16x16 images (the
    tiny preset's size) through the real shard writer, 10 shards one after another, no sampling."""
    store = work / f"writer-{fmt}"
    shards = max(1, samples // 10_000)
    ran = json.loads(subprocess.run(
        [bench_bin(binary), "finalize", "--dir", str(store), "--model", str(model), "--samples", str(samples),
         "--shards", str(shards), "--format", fmt, "--side", "16", "--prepare"],
        check=True, capture_output=True, text=True).stdout)
    objects = count_files(store)
    shutil.rmtree(store, ignore_errors=True)
    return {"format": fmt, "samples": samples, "shards": shards, "seconds": round(ran["seconds"], 2),
            "samples_per_second": round(samples / ran["seconds"], 1), "objects": objects,
            "peak_rss_mib": round(ran["peak_rss_mib"], 1)}


def finalize(binary: str, model: Path, work: Path, samples: int) -> dict:
    store = work / f"finalize-{samples}"
    shards = max(1, samples // 10_000)
    common = [bench_bin(binary), "finalize", "--dir", str(store), "--model", str(model), "--samples", str(samples),
              "--shards", str(shards), "--format", "webdataset"]
    prepared = json.loads(subprocess.run(common + ["--prepare"], check=True, capture_output=True, text=True).stdout)
    ran = json.loads(subprocess.run(common, check=True, capture_output=True, text=True).stdout)
    shutil.rmtree(store, ignore_errors=True)
    return {"samples": samples, "shards": shards, "prepare_seconds": round(prepared["seconds"], 1),
            "finalize_seconds": round(ran["seconds"], 3), "finalize_peak_rss_mib": round(ran["peak_rss_mib"], 1),
            "finalize_rss_over_baseline_mib": round(ran["peak_rss_mib"] - ran["baseline_rss_mib"], 1),
            "manifest_bytes": ran["manifest_bytes"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=default_bin())
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--formats", default="files,webdataset,parquet")
    p.add_argument("--finalize-sizes", default="10000,100000,1000000")
    p.add_argument("--timeout", type=float, default=3600, help="bound on each job")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ddpm-bench-datasets-"))
    try:
        model = work / "tiny"
        subprocess.run([args.bin, "init-model", "--preset", "tiny", "--out", str(model), "--seed", "0"],
                       check=True, capture_output=True)
        result = {"throughput": [], "writer": [], "finalize": []}
        for fmt in [f for f in args.formats.split(",") if f]:
            r = throughput(args.bin, model, work, fmt, args.samples, args.timeout)
            result["throughput"].append(r)
            print(json.dumps(r), file=sys.stderr)
        for fmt in [f for f in args.formats.split(",") if f]:
            r = writer(args.bin, model, work, fmt, args.samples)
            result["writer"].append(r)
            print(json.dumps(r), file=sys.stderr)
        for n in [int(s) for s in args.finalize_sizes.split(",") if s]:
            r = finalize(args.bin, model, work, n)
            result["finalize"].append(r)
            print(json.dumps(r), file=sys.stderr)
        by = {r["format"]: r for r in result["throughput"]}
        checks = {}
        if "files" in by and "webdataset" in by:
            ratio = by["webdataset"]["samples_per_second"] / by["files"]["samples_per_second"]
            checks["webdataset_over_files"] = round(ratio, 2)
            checks["webdataset_speed_target_met"] = ratio >= 1.5
        wr = {r["format"]: r for r in result["writer"]}
        if "files" in wr and "webdataset" in wr:
            checks["writer_webdataset_over_files"] = round(
                wr["webdataset"]["samples_per_second"] / wr["files"]["samples_per_second"], 2)
        for fmt in ("webdataset", "parquet"):
            if fmt in by:
                per_100k = by[fmt]["objects_without_grids"] * 100_000 / by[fmt]["samples"]
                checks[f"{fmt}_objects_per_100k"] = round(per_100k, 1)
                checks[f"{fmt}_objects_target_met"] = per_100k <= 100
        if len(result["finalize"]) >= 2:
            rss = [r["finalize_peak_rss_mib"] for r in result["finalize"]]
            checks["finalize_rss_growth"] = round(rss[-1] / rss[0], 2)
        result["checks"] = checks
        print(json.dumps(result, indent=1))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
