"""The control plane at fleet size: shards per second that a three-server NATS JetStream cluster and its
workers sustain with 1, 8, 32 and 64 workers, measured on one machine with the simulated device.

    python bench/fleet.py --bin target/release/ddpm-worker --nats-server venv/bin/nats-server
                          [--workers 1,8,32,64] [--batch-ms 200] [--shards-per-worker 20]
                          [--submit-rate 5] [--out raw.jsonl]

(`make bench-fleet` runs it; the binary must be built with the `test-support` feature, which the simulated
device needs.) Three nats-servers on loopback with routes (R3 stream and KV, `sync_interval: always`, as in
production) and N `serve` workers, each naming all three servers in --queue, with one simulated device: a
batch takes --batch-ms and its images are a pure function of the seeds (tiny 16×16 model, PNGs written to
a local folder, shard records, grids and the manifest all real). Each N gets its own queue namespace and a
warm-up job, --idle-seconds with nothing queued, then one measured job of N × --shards-per-worker shards (one batch of 2 samples each) while a
client submits one-sample jobs at --submit-rate per second and times each SubmitJob.

Per N it prints one JSON line:
  * shards_per_s: shards / (manifest finalized_at_ms - started_at_ms); ideal_shards_per_s = N / batch time;
    efficiency = their ratio; retried_shards (attempt > 1) and finalize_lag_s (last shard record to
    manifest);
  * overhead_ms_per_shard: N × duration / shards - batch time: what a worker spends per shard besides
    sampling (lease, noise, PNGs, record, heartbeats, waiting on the queue);
  * submit_ms p50/p99/max of the SubmitJob calls made during the job;
  * NATS messages and bytes per shard: those of the workers' own connections (/connz: what the clients
    send and receive) and those of the three servers in all (/varz: routes and replication included);
  * CPU cores busy during the job: the three nats-servers (and the busiest of them), all workers, and
    the machine (/proc); nats-server CPU per shard;
  * idle: the cluster's messages per second and nats-server cores while the N workers wait with nothing
    queued (each polls the queue and runs its reaper pass).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from ddpm_worker_client import Client

CLK = os.sysconf("SC_CLK_TCK")


def free_ports(n):
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Cluster:
    """Three nats-servers with routes between them, JetStream on each."""

    def __init__(self, binary: str, root: Path):
        ports = free_ports(9)
        self.client_ports, self.monitor_ports = ports[:3], ports[6:]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in ports[3:6])
        self.procs, self.pid_files = [], []
        for i in range(3):
            d = root / f"n{i}"
            d.mkdir()
            pid = d / "nats.pid"
            (d / "nats.conf").write_text(
                f'server_name: n{i}\nlisten: "127.0.0.1:{ports[i]}"\nhttp: "127.0.0.1:{ports[6 + i]}"\n'
                f'pid_file: "{pid}"\nmax_payload: 8MB\n'
                f'jetstream {{ store_dir: "{d / "store"}", sync_interval: always }}\n'
                f'cluster {{ name: ddpm, listen: "127.0.0.1:{ports[3 + i]}", routes: [{routes}] }}\n')
            log = open(d / "nats.log", "w")
            self.procs.append(subprocess.Popen([binary, "-c", str(d / "nats.conf")], stdout=log, stderr=log))
            self.pid_files.append(pid)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if all(self.monitor(i, "/healthz?js-enabled-only=true").get("status") == "ok" for i in range(3)):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            sys.exit("the NATS cluster did not start")
        time.sleep(2)  # a meta leader

    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def monitor(self, i: int, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[i]}{path}", timeout=10) as r:
            return json.loads(r.read())

    def pids(self):
        return [p.pid for p in self.procs]

    def totals(self) -> dict:
        """Messages and bytes in and out of the three servers (clients, routes, replication)."""
        t = {"in_msgs": 0, "out_msgs": 0, "in_bytes": 0, "out_bytes": 0}
        for i in range(3):
            v = self.monitor(i, "/varz")
            for k in t:
                t[k] += v[k]
        return t

    def worker_traffic(self) -> dict:
        """Messages and bytes the workers' own connections sent and received, by connection name."""
        per = {}
        for i in range(3):
            for c in self.monitor(i, "/connz?limit=4096").get("connections") or []:
                if c.get("name", "").startswith("ddpm-worker "):
                    # in_*: what the server received from the client (the worker sent).
                    per[c["name"]] = (c["in_msgs"], c["out_msgs"], c["in_bytes"], c["out_bytes"])
        return per

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_busy() -> tuple:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def start_workers(args, n: int, queue: str, model: Path, root: Path):
    env = dict(os.environ, DDPM_TEST_SIMULATED_BATCH_MS=str(args.batch_ms),
               RUST_LOG=os.environ.get("DDPM_FLEET_LOG", "warn"))
    procs = []
    for i in range(n):
        data = root / f"w{i}"
        data.mkdir(parents=True)
        procs.append(subprocess.Popen(
            [args.bin, "serve", "--listen", "127.0.0.1:0", "--model", f"tiny={model}", "--queue", queue,
             "--nats-replicas", "3", "--output", f"file:{root}/jobs", "--batches-per-shard", "1",
             "--cpu-threads", "1", "--scratch-dir", str(data / "scratch"), "--lease-seconds", "60"],
            stdout=subprocess.PIPE, stderr=open(data / "serve.log", "w"), text=True, env=env, cwd=data))
    addrs = []
    for i, p in enumerate(procs):
        line = p.stdout.readline()
        if not line.startswith("listening on "):
            for q in procs:
                q.kill()
            log = (root / f"w{i}" / "serve.log").read_text()[-3000:]
            sys.exit(f"worker {i} did not start: {line!r}\n{log}")
        addrs.append(line.split()[-1])
    return procs, addrs


def wait_done(client: Client, job_id: str, limit: float = 1800) -> object:
    deadline = time.time() + limit
    while time.time() < deadline:
        job = client.get(job_id)
        if job.state not in ("QUEUED", "RUNNING"):
            assert job.state == "SUCCEEDED", job.state
            return job
        time.sleep(0.25)
    sys.exit(f"job {job_id} did not end within {limit} s")


class Submitter(threading.Thread):
    """One-sample jobs at a steady rate, each SubmitJob timed."""

    def __init__(self, addr: str, rate: float):
        super().__init__(daemon=True)
        self.client, self.period = Client(f"http://{addr}"), 1.0 / rate if rate > 0 else float("inf")
        self.latencies, self.stop_at, self.ids = [], None, []

    def run(self):
        nxt = time.perf_counter()
        while self.stop_at is None and self.period != float("inf"):
            t = time.perf_counter()
            job = self.client.submit("tiny", 1, scheduler="ddim", steps=2, batch_size=1, seed=0)
            self.latencies.append((time.perf_counter() - t) * 1e3)
            self.ids.append(job.id)
            nxt += self.period
            time.sleep(max(0.0, nxt - time.perf_counter()))


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else None


def measure(args, cluster: Cluster, n: int, model: Path, root: Path) -> dict:
    ns = f"fleet{n}"
    procs, addrs = start_workers(args, n, f"{cluster.urls()}/{ns}", model, root / ns)
    try:
        client = Client(f"http://{addrs[0]}", timeout=60)
        # Warm-up: every worker leases, samples and records at least once.
        warm = client.submit("tiny", 2 * n * 2, scheduler="ddim", steps=4, batch_size=2, seed=0)
        wait_done(client, warm.id)
        shards = n * args.shards_per_worker
        # What the fleet costs the cluster with nothing to do (polling, heartbeats, reaper passes).
        idle_totals0, idle_nats0, idle_t0 = cluster.totals(), [cpu_seconds(p) for p in cluster.pids()], time.time()
        time.sleep(args.idle_seconds)
        idle_totals1, idle_nats1 = cluster.totals(), [cpu_seconds(p) for p in cluster.pids()]
        idle_s = time.time() - idle_t0
        idle = {"seconds": round(idle_s, 1),
                "cluster_msgs_per_s": round(sum(idle_totals1[k] - idle_totals0[k] for k in ("in_msgs", "out_msgs")) / idle_s),
                "nats_cores": round((sum(idle_nats1) - sum(idle_nats0)) / idle_s, 3)}
        traffic0, totals0 = cluster.worker_traffic(), cluster.totals()
        nats0 = [cpu_seconds(p) for p in cluster.pids()]
        workers0 = sum(cpu_seconds(p.pid) for p in procs)
        machine0 = machine_busy()
        submitter = Submitter(addrs[-1], args.submit_rate)
        started = time.time()
        job = client.submit("tiny", 2 * shards, scheduler="ddim", steps=4, batch_size=2, seed=0)
        submitter.start()
        done = wait_done(client, job.id)
        wall = time.time() - started
        submitter.stop_at = time.time()
        submitter.join()
        traffic1, totals1 = cluster.worker_traffic(), cluster.totals()
        nats_each = [cpu_seconds(p) - c for p, c in zip(cluster.pids(), nats0)]
        nats_cpu = sum(nats_each)
        workers_cpu = sum(cpu_seconds(p.pid) for p in procs) - workers0
        machine1 = machine_busy()
        for jid in submitter.ids:
            wait_done(client, jid)
        manifest = done.manifest()
        duration = (manifest["finalized_at_ms"] - manifest["started_at_ms"]) / 1000
        assert len(manifest["shards"]) == shards, len(manifest["shards"])
        batch_s = args.batch_ms / 1e3
        names = set(traffic0) & set(traffic1)
        delta = [sum(traffic1[k][j] - traffic0[k][j] for k in names) for j in range(4)]
        workers_used = len({s["worker"] for s in manifest["shards"]})
        folder = root / ns / "jobs" / job.id
        last_record = max(f.stat().st_mtime for f in (folder / "shards").iterdir())
        finalize_lag = (folder / "manifest.json").stat().st_mtime - last_record
        return {
            "workers": n, "workers_that_ran_shards": workers_used, "batch_ms": args.batch_ms,
            "shards": shards, "duration_s": round(duration, 3), "wall_s": round(wall, 3),
            "retried_shards": sum(1 for s in manifest["shards"] if s.get("attempt", 1) > 1),
            "finalize_lag_s": round(finalize_lag, 3),
            "shards_per_s": round(shards / duration, 2), "ideal_shards_per_s": round(n / batch_s, 2),
            "efficiency": round(shards / duration / (n / batch_s), 3),
            "overhead_ms_per_shard": round((n * duration / shards - batch_s) * 1e3, 1),
            "submit_ms": {"n": len(submitter.latencies), "p50": round(pct(submitter.latencies, 50) or 0, 1),
                          "p99": round(pct(submitter.latencies, 99) or 0, 1),
                          "max": round(max(submitter.latencies, default=0), 1)},
            "worker_msgs_per_shard": {"sent": round(delta[0] / shards, 1), "received": round(delta[1] / shards, 1)},
            "worker_bytes_per_shard": {"sent": round(delta[2] / shards), "received": round(delta[3] / shards)},
            "cluster_msgs_per_shard": round(sum(totals1[k] - totals0[k] for k in ("in_msgs", "out_msgs")) / shards, 1),
            "cluster_bytes_per_shard": round(sum(totals1[k] - totals0[k] for k in ("in_bytes", "out_bytes")) / shards),
            "nats_cpu_ms_per_shard": {"all_three": round(nats_cpu / shards * 1e3, 2),
                                      "busiest": round(max(nats_each) / shards * 1e3, 2)},
            "idle": idle,
            "cores_busy": {"nats_servers": round(nats_cpu / wall, 2),
                           "nats_busiest": round(max(nats_each) / wall, 2), "workers": round(workers_cpu / wall, 2),
                           "machine": round((machine1[0] - machine0[0]) / (machine1[1] - machine0[1]) * os.cpu_count(), 2),
                           "machine_cores": os.cpu_count()},
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--nats-server", required=True)
    ap.add_argument("--workers", default="1,8,32,64")
    ap.add_argument("--batch-ms", type=int, default=200)
    ap.add_argument("--shards-per-worker", type=int, default=20)
    ap.add_argument("--submit-rate", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--out")
    ap.add_argument("--keep", action="store_true", help="keep the servers' folders and logs (printed)")
    args = ap.parse_args()
    holder = None if args.keep else tempfile.TemporaryDirectory(prefix="fleet-")
    tmp = holder.name if holder else tempfile.mkdtemp(prefix="fleet-")
    if args.keep:
        print(f"keeping {tmp}", flush=True)
    if True:
        root = Path(tmp)
        model = root / "tiny-model"
        subprocess.run([args.bin, "init-model", "--preset", "tiny", "--out", str(model), "--seed", "1"],
                       check=True, capture_output=True)
        cluster = Cluster(args.nats_server, root)
        rows = []
        try:
            for n in (int(x) for x in args.workers.split(",")):
                row = measure(args, cluster, n, model, root)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            cluster.stop()
    print(f"{'workers':>7} {'shards/s':>9} {'ideal':>7} {'eff':>6} {'ovh ms':>7} {'submit p50/p99':>15} "
          f"{'msgs/shard':>10} {'nats cores':>10} {'worker cores':>12}")
    for r in rows:
        print(f"{r['workers']:>7} {r['shards_per_s']:>9} {r['ideal_shards_per_s']:>7} {r['efficiency']:>6} "
              f"{r['overhead_ms_per_shard']:>7} {r['submit_ms']['p50']:>7}/{r['submit_ms']['p99']:<7} "
              f"{r['cluster_msgs_per_shard']:>10} {r['cores_busy']['nats_servers']:>10} {r['cores_busy']['workers']:>12}")


if __name__ == "__main__":
    main()
