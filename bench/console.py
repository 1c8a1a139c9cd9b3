"""What watching costs: a job's sampling throughput with and without 100 console viewers on it.

    python bench/console.py --bin target/release/ddpm-worker [--model demo/digits-16] [--viewers 100]
                            [--scheduler dpmsolver] [--steps 25] [--num-samples 512] [--batch-size 16]
                            [--rounds 3] [--out raw.jsonl]

(`make bench-console` runs it.) One warm `serve --console` (SQLite queue, local folder, the CPU; no tokens,
on loopback) runs the same job once per round without viewers and once with `--viewers` event streams
open on its page (`/console/api/jobs/<id>/events`), alternating. Each viewer does what the job page
does: reads every `job` event and fetches each grid once, as soon as the event says it is written. With
one batch per shard, every batch is a progress event for every viewer. Throughput is the manifest's:
num_samples / (finalized_at - started_at). The viewers run on the same machine (threads of this
process), so their own CPU is counted against the service too; each line also has the CPU seconds the
server and the viewers spent on the job (/proc and process_time). Prints one JSON line per job, then
the medians and their ratio (watched / unwatched; the target is >= 0.95).
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def start_server(args, data: Path):
    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--model", f"bench={args.model}", "--console",
         "--queue", f"sqlite:{data}/queue.sqlite", "--output", f"file:{data}/jobs", "--devices", "cpu",
         "--batches-per-shard", "1", "--scratch-dir", str(data / "scratch")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        sys.exit(f"serve did not start: {line!r}")
    return proc, line.split()[-1]


def submit(args, addr: str, tag: str) -> str:
    out = subprocess.run(
        [args.bin, "submit", "--server", f"http://{addr}", "--model", "bench", "--scheduler", args.scheduler,
         "--steps", str(args.steps), "--num-samples", str(args.num_samples), "--seed", "0",
         "--batch-size", str(args.batch_size), "--request-id", tag, "--output", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)["jobId"]


def wait(args, addr: str, job_id: str) -> dict:
    out = subprocess.run(
        [args.bin, "status", "--server", f"http://{addr}", job_id, "--wait", "--output", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    job = json.loads(out.strip().splitlines()[-1])
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    return job


class Viewer(threading.Thread):
    """One browser on the job's page: its event stream, and each grid fetched once when written."""

    def __init__(self, addr: str, job_id: str):
        super().__init__(daemon=True)
        self.addr, self.job_id = addr, job_id
        self.events = 0
        self.grids = set()
        self.error = None

    def run(self):
        try:
            host, port = self.addr.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=600)
            conn.request("GET", f"/console/api/jobs/{self.job_id}/events")
            response = conn.getresponse()
            assert response.status == 200, response.status
            files = http.client.HTTPConnection(host, int(port), timeout=60)
            event, data = None, []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and event:
                    if event == "job":
                        self.events += 1
                        view = json.loads("".join(data))
                        for grid in view["grids"]:
                            if grid["written"] and grid["path"] not in self.grids:
                                files.request("GET", f"/console/api/jobs/{self.job_id}/files/{grid['path']}")
                                body = files.getresponse().read()
                                assert body[:4] == b"\x89PNG", body[:40]
                                self.grids.add(grid["path"])
                    event, data = None, []
        except Exception as e:  # reported by the round
            self.error = repr(e)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manifest_rate(job: dict, num_samples: int) -> float:
    m = json.loads(Path(job["manifestUri"].removeprefix("file://")).read_text())
    return num_samples / ((m["finalized_at_ms"] - m["started_at_ms"]) / 1000)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "demo" / "digits-16")
    p.add_argument("--viewers", type=int, default=100)
    p.add_argument("--scheduler", default="dpmsolver")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="also append the raw lines to this file")
    args = p.parse_args()

    rates = {"unwatched": [], "watched": []}
    cpu = {"unwatched": [], "watched": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_server(args, Path(tmp))
        try:
            # Warm-up: the model's first batches, not timed.
            wait(args, addr, submit(args, addr, "warm-up"))
            for r in range(args.rounds):
                for side in ("unwatched", "watched"):
                    server_cpu, own_cpu = cpu_seconds(proc.pid), time.process_time()
                    job_id = submit(args, addr, f"round-{r}-{side}")
                    viewers = [Viewer(addr, job_id) for _ in range(args.viewers if side == "watched" else 0)]
                    for v in viewers:
                        v.start()
                    job = wait(args, addr, job_id)
                    for v in viewers:
                        v.join(60)
                    errors = [v.error for v in viewers if v.error or v.is_alive()]
                    assert not errors, errors[:3]
                    server_cpu, own_cpu = cpu_seconds(proc.pid) - server_cpu, time.process_time() - own_cpu
                    rate = manifest_rate(job, args.num_samples)
                    rates[side].append(rate)
                    cpu[side].append(server_cpu)
                    line = {"round": r, "side": side, "viewers": len(viewers), "images_per_second": rate,
                            "server_cpu_seconds": round(server_cpu, 2), "viewers_cpu_seconds": round(own_cpu, 2),
                            "events_per_viewer": statistics.median([v.events for v in viewers]) if viewers else 0,
                            "grids_per_viewer": statistics.median([len(v.grids) for v in viewers]) if viewers else 0}
                    print(json.dumps(line), flush=True)
                    if args.out:
                        with args.out.open("a") as f:
                            f.write(json.dumps(line) + "\n")
        finally:
            proc.terminate()
            proc.wait()
    summary = {
        "job": {"model": str(args.model), "scheduler": args.scheduler, "steps": args.steps,
                "num_samples": args.num_samples, "batch_size": args.batch_size, "batches_per_shard": 1},
        "unwatched_median": statistics.median(rates["unwatched"]),
        "unwatched_spread": [min(rates["unwatched"]), max(rates["unwatched"])],
        "watched_median": statistics.median(rates["watched"]),
        "watched_spread": [min(rates["watched"]), max(rates["watched"])],
        "watched_over_unwatched": statistics.median(rates["watched"]) / statistics.median(rates["unwatched"]),
        # The server's own CPU per job: what the viewers cost it, apart from the machine's noise.
        "server_cpu_seconds_unwatched_median": statistics.median(cpu["unwatched"]),
        "server_cpu_seconds_watched_median": statistics.median(cpu["watched"]),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
