"""Chaos scenario on one deployed sandbox host, shared by the chaos test
(tests/deploy/test_chaos.py asserts the targets) and `make chaos`
(benchmarks/chaos_figures.py prints the table).

A steady closed-loop load (N client threads, keep-alive, one photo per
request) runs through nginx while the scenario, in turn, SIGKILLs a random
worker, SIGKILLs the JVM, restarts the unit, reloads nginx and stops and boots
the whole host. Every request is recorded (start, end, status or error, body
type, Retry-After); each event owns the requests that ended between its start
and the next event's start.
"""
from __future__ import annotations

import http.client
import json
import random
import resource
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
PHOTO = (REPO / "files/samples/tshirt4.jpg").read_bytes()
CONFIG = "/etc/torchserve/config.properties"
# What the deployment owns; digests before and after must match.
DIGESTED = [CONFIG, "/etc/systemd/system/torchserve.service", "/etc/nginx/sites-available/torchserve.conf",
            "/opt/torchserve/model-store/*.mar"]
# The server closed a reused keep-alive connection before any response byte
# (nginx closes idle keep-alive connections on reload; over TLS that shows as
# an EOF): retried once on a fresh connection, as RFC 9112 9.3.1 allows for an
# idempotent PUT and browsers, urllib3 and curl do. Counted in the table.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError,
         ssl.SSLZeroReturnError)

# Run on the host as root: each model's workers (pid, status) from the
# management socket named in config.properties.
_WORKERS_PY = r"""
import http.client, json, socket, sys
cfg = dict(l.split("=", 1) for l in open(sys.argv[1]).read().splitlines() if "=" in l and not l.startswith("#"))
out = {}
for name in json.loads(cfg["models"]):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(cfg["management_address"][len("unix:"):])
        s.sendall(("GET /models/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name).encode())
        resp = http.client.HTTPResponse(s)
        resp.begin()
        desc = json.loads(resp.read())[0]
        out[name] = {"min": desc["minWorkers"], "batch": desc["batchSize"],
                     "workers": [[w["pid"], w["status"]] for w in desc["workers"]]}
    except Exception as e:
        out[name] = {"error": repr(e)}
    finally:
        s.close()
print(json.dumps(out))
"""


@dataclass
class Req:
    start: float
    end: float
    status: int          # HTTP status, 0 for a transport error
    kind: str            # "json", "html", "text", "empty" or the transport error
    retry_after: float | None
    retried: bool

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.kind == "json"

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def label(self) -> str:
        if not self.status:
            return self.kind
        return f"{self.status} {self.kind}" + (" +Retry-After" if self.retry_after is not None else "")


class Load:
    """N threads, each with its own keep-alive connection, PUT the photo in a
    closed loop until stopped."""

    def __init__(self, url: str, ca: str | None, clients: int, timeout: float):
        u = urlsplit(url)
        self.host, self.port, self.https = u.hostname, u.port, u.scheme == "https"
        self.path = u.path
        self.timeout = timeout
        self.ctx = ssl.create_default_context(cafile=ca) if self.https else None
        self.records: list[Req] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def connect(self) -> http.client.HTTPConnection:
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def once(self, conn: http.client.HTTPConnection) -> tuple[int, str, float | None]:
        conn.request("PUT", self.path, body=PHOTO, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.will_close:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        if not body:
            kind = "empty"
        elif "html" in ctype or body.lstrip()[:1] == b"<":
            kind = "html"
        else:
            try:
                json.loads(body)
                kind = "json"
            except ValueError:
                kind = "text"
        try:
            retry_after = float(resp.getheader("Retry-After", ""))
        except ValueError:
            retry_after = None
        return resp.status, kind, retry_after

    def client(self) -> None:
        conn, used = self.connect(), False
        while not self.stop_event.is_set():
            start, retried = time.monotonic(), False
            try:
                try:
                    status, kind, ra = self.once(conn)
                except STALE:
                    if not used:
                        raise
                    conn.close()
                    conn, retried = self.connect(), True
                    status, kind, ra = self.once(conn)
                used = conn.sock is not None  # still open for the next request
            except Exception as e:  # every transport failure is a record, not a crash
                conn.close()
                conn, used = self.connect(), False
                status, kind, ra = 0, _transport(e), None
            end = time.monotonic()
            rec = Req(start, end, status, kind, ra, retried)
            self.records.append(rec)
            if not rec.ok:
                # Like a client's retry loop: a short pause, or the server's
                # Retry-After capped at 1 s so the time to the next 200 stays sharp.
                time.sleep(max(0.05, min(ra or 0, 1.0)))
        conn.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(self.timeout + 10)

    def ok_since(self, t0: float) -> bool:
        """A good answer to a request sent after t0."""
        return any(r.ok and r.start >= t0 for r in reversed(self.records[-2000:]))


def _transport(e: Exception) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(e, ssl.SSLError):
        return f"tls-error {type(e).__name__}"
    if isinstance(e, STALE):
        return "reset"
    return type(e).__name__


@dataclass
class Event:
    name: str
    kind: str            # worker-kill, jvm-kill, restart, reload, reboot
    t0: float
    detail: str = ""
    service_back: float | None = None   # seconds until every worker is READY again (host-side view)
    # Filled from the load records:
    requests: int = 0
    failed: list[Req] = field(default_factory=list)
    retried: int = 0
    to_next_200: float | None = None
    p50: float | None = None             # median latency of the good answers

    def classes(self) -> str:
        c = Counter(r.label for r in self.failed)
        return ", ".join(f"{k} x{n}" for k, n in c.most_common()) or "-"


@dataclass
class Result:
    events: list[Event]
    baseline: Event
    batch_size: int
    workers: int
    clients: int
    seconds: float
    total_requests: int
    before: dict
    after: dict
    seed: int
    proxy_timeout: float
    client_cpu: float    # CPU seconds the load generator (this process) used

    def table(self) -> str:
        rows = [("event", "requests", "p50 ms", "failed", "next 200 (s)", "workers back (s)", "retried",
                 "failures by class")]
        for e in [self.baseline, *self.events]:
            rows.append((e.name, str(e.requests), "-" if e.p50 is None else f"{e.p50 * 1000:.0f}", str(len(e.failed)),
                         "-" if e.to_next_200 is None else f"{e.to_next_200:.2f}",
                         "-" if e.service_back is None else f"{e.service_back:.1f}",
                         str(e.retried), e.classes()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


class Chaos:
    def __init__(self, ssh_argv: list[str], sandbox_argv: list[str], host: str, url: str, ca: str | None,
                 clients: int = 64, proxy_timeout: float = 120, seed: int | None = None):
        self.ssh_argv, self.sandbox_argv, self.host = ssh_argv, sandbox_argv, host
        self.load = Load(url, ca, clients, proxy_timeout + 10)
        self.proxy_timeout = proxy_timeout
        self.clients = clients
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.events: list[Event] = []

    # ---- host-side probes ----------------------------------------------------
    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_argv + [command], capture_output=True, text=True, timeout=timeout)

    def workers(self) -> dict:
        r = self.ssh(f"python3 -c '{_WORKERS_PY}' {CONFIG}")
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {}

    def procs(self) -> list[dict]:
        """Every process on the host with its systemd unit."""
        out = self.ssh("ps -e -o pid=,ppid=,unit=,comm=,args=").stdout
        rows = []
        for line in out.splitlines():
            pid, ppid, unit, comm, args = (line.split(None, 4) + [""])[:5]
            rows.append({"pid": int(pid), "ppid": int(ppid), "unit": unit, "comm": comm, "args": args})
        return rows

    def snapshot(self) -> dict:
        procs = self.procs()
        ts = [p for p in procs if p["unit"] == "torchserve.service"]
        return {
            "digests": self.ssh("sha256sum " + " ".join(DIGESTED)).stdout,
            "active": self.ssh("systemctl is-active torchserve").stdout.strip(),
            "nginx_active": self.ssh("systemctl is-active nginx").stdout.strip(),
            "java": [p for p in procs if p["comm"] == "java"],
            "java_in_unit": [p for p in ts if p["comm"] == "java"],
            "wrappers": [p for p in ts if "bin/torchserve" in p["args"]],
            "workers": [p for p in procs if "model_service_worker" in p["args"]],
            "nginx_masters": [p for p in procs if p["comm"] == "nginx" and "master process" in p["args"]],
            "models": self.workers(),
        }

    def all_ready(self, exclude: set[int] = frozenset()) -> bool:
        models = self.workers()
        if not models:
            return False
        for m in models.values():
            if "error" in m:
                return False
            ready = [pid for pid, status in m["workers"] if status == "READY" and pid not in exclude]
            if len(ready) < m["min"]:
                return False
        return True

    def wait_back(self, ev: Event, exclude: set[int] = frozenset(), limit: float = 120) -> None:
        """Until every worker is READY again (none of `exclude`) and the load got a
        good answer to a request sent after the event; then a short settle so
        stragglers land in this event's window."""
        while time.monotonic() - ev.t0 < limit:
            if self.all_ready(exclude):
                if ev.service_back is None:
                    ev.service_back = time.monotonic() - ev.t0
                if self.load.ok_since(ev.t0):
                    break
            time.sleep(0.2)
        time.sleep(1.5)

    def event(self, name: str, kind: str) -> Event:
        ev = Event(name, kind, time.monotonic())
        self.events.append(ev)
        return ev

    # ---- events -----------------------------------------------------------------
    def kill_worker(self, i: int) -> None:
        models = self.workers()
        pids = [pid for m in models.values() for pid, status in m.get("workers", []) if status == "READY"]
        pid = self.rng.choice(pids)
        ev = self.event(f"worker SIGKILL {i}", "worker-kill")
        ev.detail = f"pid {pid}"
        self.ssh(f"kill -KILL {pid}")
        self.wait_back(ev, exclude={pid})

    def kill_jvm(self, i: int) -> None:
        java = [p["pid"] for p in self.procs() if p["unit"] == "torchserve.service" and p["comm"] == "java"]
        ev = self.event(f"JVM SIGKILL {i}", "jvm-kill")
        ev.detail = f"pid {java}"
        self.ssh(f"kill -KILL {' '.join(map(str, java))}")
        old = {pid for m in self.workers().values() for pid, _ in m.get("workers", [])}
        self.wait_back(ev, exclude=old)

    def restart(self) -> None:
        ev = self.event("systemctl restart torchserve", "restart")
        self.ssh("systemctl restart torchserve")
        self.wait_back(ev)

    def reload_nginx(self) -> None:
        ev = self.event("systemctl reload nginx", "reload")
        r = self.ssh("systemctl reload nginx")
        ev.detail = f"rc {r.returncode}"
        self.wait_back(ev)

    def reboot(self) -> None:
        ev = self.event("host stop + boot", "reboot")
        subprocess.run(self.sandbox_argv + ["stop", self.host], check=True, capture_output=True, timeout=120)
        stopped = time.monotonic() - ev.t0
        subprocess.run(self.sandbox_argv + ["start", self.host], check=True, capture_output=True, timeout=180)
        ev.detail = f"stop {stopped:.1f} s, boot {time.monotonic() - ev.t0 - stopped:.1f} s"
        self.wait_back(ev, limit=240)

    # ---- the run ------------------------------------------------------------------
    def run(self, worker_kills: int = 10, jvm_kills: int = 3, restart: bool = True, reload: bool = True,
            reboot: bool = True, warmup: float = 5) -> Result:
        before = self.snapshot()
        model = next(iter(before["models"].values()))
        t_start = time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.load.start()
        try:
            time.sleep(warmup)
            base_t0 = time.monotonic()
            self.wait_back(Event("-", "-", base_t0))
            for i in range(1, worker_kills + 1):
                self.kill_worker(i)
            for i in range(1, jvm_kills + 1):
                self.kill_jvm(i)
            if restart:
                self.restart()
            if reload:
                self.reload_nginx()
            if reboot:
                self.reboot()
            t_end = time.monotonic()
        finally:
            self.load.stop()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        after = self.snapshot()
        baseline = Event("steady load (baseline)", "baseline", t_start)
        windows = [(baseline, t_start + warmup / 2, self.events[0].t0 if self.events else t_end)]
        for ev, nxt in zip(self.events, self.events[1:] + [None]):
            windows.append((ev, ev.t0, nxt.t0 if nxt else t_end))
        for ev, lo, hi in windows:
            mine = [r for r in self.load.records if lo <= r.end < hi]
            ev.requests = len(mine)
            ev.failed = [r for r in mine if not r.ok]
            ev.retried = sum(r.retried for r in mine)
            # After the last failure (or the event itself), the next good answer.
            last_fail = max((r.end for r in ev.failed), default=lo)
            good = [r.end for r in self.load.records if r.ok and r.end > last_fail]
            ev.to_next_200 = (min(good) - lo) if good else None
            ok = sorted(r.latency for r in mine if r.ok)
            ev.p50 = ok[len(ok) // 2] if ok else None
        return Result(self.events, baseline, model["batch"], model["min"], self.clients,
                      time.monotonic() - t_start, len(self.load.records), before, after, self.seed,
                      self.proxy_timeout, ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
