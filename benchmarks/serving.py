#!/usr/bin/env python3
"""Serving figures (make bench): the deployed endpoint side by side with its peers.

Setups, one at a time (the others stopped), same payloads, loopback only:
  nginx     the deployed project through nginx (a sandbox host, reused or deployed)
  direct    the same TorchServe, same .mar and config.properties, without nginx: a
            second, test-only instance on the host whose inference address is
            loopback TCP instead of the Unix socket (wrk speaks no Unix sockets),
            while the deployed service is stopped
  article   the article's configuration: TorchServe defaults (batch 1, a worker per
            core, default threads and sync logging), the article's weights and a
            plain resize-to-28x28 handler (benchmarks/peers/article_handler.py)
  fastapi   FastAPI + uvicorn (httptools, uvloop, one worker per core) doing the
            deployed handler's work (benchmarks/peers/fastapi_app.py)
  inproc    no server: the handler's decode + preprocess + forward, batch 1, one
            thread, in one process ("inproc 1p") and one process per core ("inproc Np")
Load: wrk (one thread, keep-alive) at each concurrency, a warm-up run first,
then a measured run bounded in time. Payloads: 28x28 PNGs from the
Fashion-MNIST test set, and phone-style JPEGs derived from files/samples/.

Output: a Markdown table (printed and written to benchmarks/results/serving.md),
the raw figures (serving.json), plots (serving-throughput.png,
serving-latency.png) and the ratios to the serving targets (issue 11).

--sweep instead measures the direct instance under a grid of settings (batch
size, max batch delay, workers, torch threads, netty threads; one parameter at
a time from the role defaults, keeping each improvement) and prints the best:
settings with zero errors first, then the highest geometric mean of req/s at
c >= 32; within --sweep-margin (10 %) of it, p99 <= 3x p50 at c >= 32 and then the
lower c=1 median win. (The tail alone must not decide: on a busy machine a setting
16x slower had the tighter p99/p50.)
Written to benchmarks/results/sweep.md.

The sandbox host (state .sandbox/bench) is destroyed at the end unless
KEEP_HOSTS=1; a running, deployed one is reused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
STATE = REPO / ".sandbox/bench"
WORK = STATE / "serving"
SANDBOX = [sys.executable, str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "bench-host"]
HOST = "bench-host1"
VENV_BIN = Path(sys.executable).parent
DATA_DIR = Path(os.environ.get("FMNIST_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
CORES = os.cpu_count() or 1
# Offsets inside the host's claimed port block (sandbox/hosts.py uses 22, 43, 80).
PORT_DIRECT, PORT_ARTICLE, PORT_FASTAPI = 60, 65, 70
HOST_BENCH_DIR = "/var/lib/bench-ts"  # the direct instance's files on the host
DIRECT_UNIT = "bench-ts-direct"

SETUPS = ["nginx", "direct", "article", "fastapi", "inproc"]
LABELS = {
    "nginx": "project via nginx",
    "direct": "project TorchServe, no nginx",
    "article": "article config (TS defaults)",
    "fastapi": f"FastAPI+uvicorn ({CORES} workers)",
    "inproc 1p": "in-process, 1 process",
    f"inproc {CORES}p": f"in-process, {CORES} processes",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- payloads
def make_payloads(out: Path) -> dict[str, list[Path]]:
    """64 test-set PNGs (28x28, as the dataset stores them) and 12 phone-style JPEGs.

    The JPEGs are the sample photo files/samples/tshirt4.jpg (750x1000, grayscale,
    41 KB) re-encoded as phones write: RGB, 4:2:0, quality 85 or 92, at 100 %, 80 %
    and 60 % of its size, mirrored or not, each with a different crop of 0-6 %
    per side (seeded): about 400x540 to 720x950 pixels, 17-53 KB.
    """
    sys.path.insert(0, str(REPO / "model_src"))
    import random

    import train  # model_src/train.py: the IDX reader
    from PIL import Image, ImageOps

    png_dir, jpg_dir = out / "png", out / "photo"
    for d in (png_dir, jpg_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    images, _ = train.load_split(DATA_DIR, "test")
    for k, i in enumerate(range(0, 10_000, 10_000 // 64)):
        if k == 64:
            break
        Image.frombytes("L", (28, 28), images[i].numpy().tobytes()).save(png_dir / f"test{i:05d}.png")
    rng = random.Random(11)
    src = Image.open(REPO / "files/samples/tshirt4.jpg").convert("RGB")
    n = 0
    for scale in (1.0, 0.8, 0.6):
        for mirror in (False, True):
            for quality in (85, 92):
                img = ImageOps.mirror(src) if mirror else src
                w, h = img.size
                box = (round(w * rng.uniform(0, 0.06)), round(h * rng.uniform(0, 0.06)),
                       round(w * (1 - rng.uniform(0, 0.06))), round(h * (1 - rng.uniform(0, 0.06))))
                img = img.crop(box)
                img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
                img.save(jpg_dir / f"photo{n:02d}.jpg", quality=quality, subsampling="4:2:0")
                n += 1
    return {"png": sorted(png_dir.glob("*.png")), "photo": sorted(jpg_dir.glob("*.jpg"))}


def describe_payloads(payloads: dict[str, list[Path]]) -> dict[str, str]:
    from PIL import Image

    out = {}
    for name, files in payloads.items():
        sizes = [f.stat().st_size for f in files]
        dims = [Image.open(f).size for f in files]
        out[name] = (f"{len(files)} files, {min(d[0] for d in dims)}x{min(d[1] for d in dims)} to "
                     f"{max(d[0] for d in dims)}x{max(d[1] for d in dims)} px, "
                     f"{min(sizes) / 1000:.1f}-{max(sizes) / 1000:.1f} KB")
    return out


# --------------------------------------------------------------------------- CPU accounting
# CPU seconds (user + system) of a server's processes, by part, read from /proc. Run here for the
# local servers and with `python3 -c` on the sandbox host. argv: "units" (the host's nginx,
# torchserve and bench-ts-direct services, by their cgroup) or "session <sid>" (a local server
# started in its own session). CPU time per request is what a busy machine distorts least: it
# says where the work goes when the wall-clock figures cannot.
CPU_SCRIPT = r"""
import json, os, sys
tck, tot = os.sysconf("SC_CLK_TCK"), {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        cgroup = open(f"/proc/{pid}/cgroup").read() if sys.argv[1] == "units" else ""
    except OSError:
        continue
    comm, f = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
    if sys.argv[1] == "units":
        unit = next((u for u in ("nginx", "torchserve", "bench-ts-direct") if f"/{u}.service" in cgroup), None)
        if unit is None:
            continue
        part = "nginx" if unit == "nginx" else "frontend" if comm == "java" else "workers"
    elif f[3] == sys.argv[2]:
        part = "frontend" if comm == "java" else "workers" if comm.startswith("python") else comm
    else:
        continue
    tot[part] = tot.get(part, 0.0) + (int(f[11]) + int(f[12])) / tck
print(json.dumps(tot))
"""


def host_cpu(host) -> dict:
    return json.loads(host.ssh(f"python3 -c {shlex.quote(CPU_SCRIPT)} units"))


def local_cpu(sid: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CPU_SCRIPT, "session", str(sid)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)


def cpu_ms_per_request(before: dict, after: dict, requests_done: int) -> dict:
    return {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / max(1, requests_done)
            for k in sorted(set(before) | set(after))}


# --------------------------------------------------------------------------- load generator
def wrk(url: str, conns: int, seconds: float, files: list[Path]) -> dict:
    base, path = re.match(r"(https?://[^/]+)(/.*)", url).groups()
    cmd = ["wrk", "-t", "1", "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(BENCH / "wrk_bodies.lua"), base, "--", path, *map(str, files)]
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in r.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}")
    w = json.loads(line[len("WRKJSON "):])
    secs = w["duration_us"] / 1e6
    return {
        "rps": w["requests"] / secs, "requests": w["requests"],
        "errors": w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"],
        "non2xx": w["status"], "codes": w["codes"], "samples": w["samples"],
        "socket_errors": {k: w[k] for k in ("connect", "read", "write", "timeout") if w[k]},
        "p50": w["p50_us"] / 1000, "p95": w["p95_us"] / 1000, "p99": w["p99_us"] / 1000,
        "wrk_cpu_s": ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime,
    }


def drain(url: str, body_file: Path) -> None:
    """Wait until the requests wrk left in flight when it stopped are served: a server keeps working
    on them (TorchServe's queue is FIFO), and they would count against the next run's queue."""
    requests.put(url, data=body_file.read_bytes(), headers={"Content-Type": "application/octet-stream"}, timeout=120)


def measure(url: str, payloads: dict, conc: list[int], seconds: float, warmup: float, probe=None,
            cpu=None) -> list[dict]:
    """wrk at each concurrency and payload set; probe(), if given, is called after each warm-up and
    after each measured run, and the difference of its two answers is stored as the row's "server".
    cpu(), if given, returns the server's CPU seconds by part: the row's "cpu_ms" is the CPU time
    per request of each part, and of wrk."""
    rows = []
    for pname, files in payloads.items():
        for c in conc:
            if warmup > 0:
                wrk(url, c, warmup, files)
                drain(url, files[0])
            before = probe() if probe else None
            cpu_before = cpu() if cpu else None
            r = wrk(url, c, seconds, files)
            if cpu:
                r["cpu_ms"] = cpu_ms_per_request(cpu_before, cpu(), r["requests"])
                r["cpu_ms"]["wrk"] = r["wrk_cpu_s"] * 1000 / max(1, r["requests"])
            drain(url, files[0])
            r.update(payload=pname, c=c)
            if probe:
                r["server"] = probe(before)
            log(f"  {pname:5} c={c:<3} {r['rps']:8.1f} req/s  p50 {r['p50']:7.2f}  p99 {r['p99']:7.2f} ms  "
                f"errors {r['errors']}" + ("  CPU ms/req " + " ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms"].items())
                                           if r.get("cpu_ms") else ""))
            if not r["requests"]:
                log(f"  {pname} c={c}: no request completed within {seconds:g} s")
            rows.append(r)
    return rows


def settle(url: str, payloads: dict, seconds: float) -> None:
    """Load a server that may have just started (c=32, every payload set) before it is measured: a
    fresh JVM compiles TorchServe's hot paths for minutes, and its C2 compiler threads took up
    to 17 % of a core of the 2 during the first runs (measured per thread from /proc)."""
    if seconds > 0:
        for files in payloads.values():
            wrk(url, 32, seconds / len(payloads), files)
            drain(url, files[0])


def answers_agree(url: str, payloads: dict, expected: dict) -> dict[str, float]:
    """Share of payloads whose served label equals the deployed handler's own (in-process) label."""
    out = {}
    for pname, files in payloads.items():
        same = 0
        for f in files:
            r = requests.put(url, data=f.read_bytes(), headers={"Content-Type": "application/octet-stream"}, timeout=30)
            r.raise_for_status()
            same += r.json().get("label") == expected[f.name]
        out[pname] = same / len(files)
    return out


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 240.0, body: bytes = b"") -> None:
    """Poll until `url` answers 200 to a PUT of `body` (no fixed sleeps)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            r = requests.put(url, data=body, headers={"Content-Type": "application/octet-stream"}, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as e:
            last = type(e).__name__
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")


# --------------------------------------------------------------------------- the sandbox host
class Host:
    """A sandbox host: ssh, its claimed port block (base = its ssh port - 22), the public URL."""

    def __init__(self, ssh_argv: list[str], ports: dict):
        self.ssh_argv = ssh_argv
        self.port_base = int(ports["ssh"]) - 22
        self.nginx_url = f"http://127.0.0.1:{ports['torchserve_nginx_http_port']}/predictions/fmnist"

    @classmethod
    def from_sandbox(cls) -> "Host":
        info = json.loads(subprocess.run(SANDBOX + ["info", HOST], check=True, capture_output=True, text=True).stdout)
        return cls(info["ssh"], info["ports"])

    def port(self, offset: int) -> int:
        return self.port_base + offset

    def ssh(self, command: str, input: bytes | None = None, check: bool = True) -> str:
        r = subprocess.run(self.ssh_argv + [command], input=input, capture_output=True, timeout=600)
        if check and r.returncode != 0:
            raise RuntimeError(f"on {HOST}: {command!r} failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
        return r.stdout.decode()

    def put_file(self, data: bytes, dest: str, mode: str = "0644") -> None:
        self.ssh(f"install -m {mode} /dev/stdin {dest}", input=data)


class FreePorts:
    """Ports for the local servers when no sandbox host (and so no claimed port block) is needed."""

    def __init__(self):
        self.ports: dict[int, int] = {}

    def port(self, offset: int) -> int:
        if offset not in self.ports:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.ports[offset] = s.getsockname()[1]
        return self.ports[offset]

    def ssh(self, command: str, check: bool = True) -> str:
        return ""


def ensure_host(sample: bytes) -> Host:
    subprocess.run(SANDBOX + ["create", "--count", "1"], check=True)
    host = Host.from_sandbox()
    try:
        host.ssh("systemctl start torchserve", check=False)
        wait_http(host.nginx_url, timeout=60, body=sample)
        log(f"reusing the deployed host {HOST}")
    except RuntimeError:
        log(f"deploying {HOST} (ansible-playbook playbooks/deploy.yml)")
        r = subprocess.run(["ansible-playbook", "-i", str(STATE / "inventory.yml"), "playbooks/deploy.yml"], cwd=REPO,
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"deployment failed:\n{r.stdout[-4000:]}{r.stderr[-2000:]}")
        wait_http(host.nginx_url, timeout=120, body=sample)
    return host


# --------------------------------------------------------------------------- servers
def deployed_model() -> dict:
    """The example model entry (what the sandbox deployment serves)."""
    return yaml.safe_load((REPO / "playbooks/vars/fmnist.yml").read_text())["torchserve_models"][0]


def build_mar(export: Path, name: str, model_config: dict | None, handler: Path | None = None,
              weights: Path | None = None) -> Path:
    """torch-model-archiver as the deployment runs it, from the role's model entry (its handler,
    weights and extra files unless given; model-config.yaml only when given)."""
    m = deployed_model()
    extra = [REPO / f for f in m["extra_files"]] if handler is None else [REPO / "files/index_to_name.json"]
    export.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENV_BIN / "torch-model-archiver"), "--force", "--model-name", name, "--version", "1.0",
           "--model-file", str(REPO / m["model_file"]), "--serialized-file", str(weights or REPO / m["serialized_file"]),
           "--handler", str(handler or REPO / m["handler"]), "--extra-files", ",".join(map(str, extra)),
           "--export-path", str(export)]
    if model_config is not None:
        cfg = export / f"{name}-model-config.yaml"
        cfg.write_text(yaml.safe_dump(model_config))
        cmd += ["--config-file", str(cfg)]
    subprocess.run(cmd, check=True, capture_output=True)
    return export / f"{name}.mar"


@contextmanager
def direct_instance(host: Host, mar: bytes | None = None, model: dict | None = None, netty_threads: int = 0,
                    restore: bool = True, props: dict | None = None):
    """A test-only TorchServe on the host: the deployed config.properties and .mar, inference on loopback TCP.

    The deployed service is stopped meanwhile (one server on the CPUs at a time) and
    started again afterwards (unless restore=False). `mar` + `model` (sweep) replace
    the archive and its models= entry; netty_threads > 0 sets number_of_netty_threads;
    `props` sets any other config.properties keys.
    """
    port = host.port(PORT_DIRECT)
    conf = host.ssh("cat /etc/torchserve/config.properties")
    store = "/opt/torchserve/model-store"
    if mar is not None:
        store = f"{HOST_BENCH_DIR}/store"
    props, seen = [], set()
    overrides = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"unix:{HOST_BENCH_DIR}/run/management.sock",
        "metrics_address": f"unix:{HOST_BENCH_DIR}/run/metrics.sock",
        "grpc_inference_port": str(host.port(PORT_DIRECT + 1)),
        "grpc_management_port": str(host.port(PORT_DIRECT + 2)),
        "model_store": store,
        "allowed_urls": f"{store}/.*",
    }
    if mar is not None:
        overrides["load_models"] = "fmnist.mar"
    if model is not None:
        overrides["models"] = json.dumps({"fmnist": {"1.0": {
            "defaultVersion": True, "marName": "fmnist.mar", "minWorkers": model["workers"],
            "maxWorkers": model["workers"], "batchSize": model["batch_size"],
            "maxBatchDelay": model["max_batch_delay"], "responseTimeout": 30}}})
    if netty_threads:
        overrides["number_of_netty_threads"] = str(netty_threads)
    overrides.update(props or {})
    for line in conf.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in overrides:
            line = f"{key}={overrides[key]}"
            seen.add(key)
        props.append(line)
    props += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    host.ssh(f"systemctl stop torchserve {DIRECT_UNIT} 2>/dev/null; systemctl reset-failed {DIRECT_UNIT} 2>/dev/null; "
             f"rm -rf {HOST_BENCH_DIR} && install -d -o torchserve -g torchserve -m 0750 {HOST_BENCH_DIR} "
             f"{HOST_BENCH_DIR}/run {HOST_BENCH_DIR}/logs {HOST_BENCH_DIR}/tmp {HOST_BENCH_DIR}/store", check=False)
    host.put_file("\n".join(props).encode() + b"\n", f"{HOST_BENCH_DIR}/config.properties")
    # The deployed log settings too (TorchServe's own defaults log every request, several lines),
    # in this instance's folder; the handler's one line per batch is kept for the batch sizes.
    log4j = host.ssh("cat /etc/torchserve/log4j2.xml").replace("/var/log/torchserve", f"{HOST_BENCH_DIR}/logs")
    log4j = re.sub(r"\|batch size=[^)]*\)", ")", log4j)
    host.put_file(log4j.encode(), f"{HOST_BENCH_DIR}/log4j2.xml")
    if mar is not None:
        host.put_file(mar, f"{HOST_BENCH_DIR}/store/fmnist.mar")
    venv = "/opt/torchserve/venv"
    host.ssh(f"systemd-run --unit {DIRECT_UNIT} -p User=torchserve -p Group=torchserve "
             f"-p WorkingDirectory={HOST_BENCH_DIR} -p LimitNOFILE=65536 "
             f"--setenv PATH={venv}/bin:/usr/bin:/bin --setenv HOME={HOST_BENCH_DIR} "
             f"--setenv LOG_LOCATION={HOST_BENCH_DIR}/logs --setenv METRICS_LOCATION={HOST_BENCH_DIR}/logs "
             f"--setenv TEMP={HOST_BENCH_DIR}/tmp --setenv PYTHONDONTWRITEBYTECODE=1 "
             f"{venv}/bin/torchserve --start --foreground --ncs --ts-config {HOST_BENCH_DIR}/config.properties "
             f"--log-config {HOST_BENCH_DIR}/log4j2.xml")
    url = f"http://127.0.0.1:{port}/predictions/fmnist"
    try:
        wait_http(url, body=(REPO / "files/samples/tshirt4.jpg").read_bytes())
        yield url
    finally:
        host.ssh(f"systemctl stop {DIRECT_UNIT}; systemctl reset-failed {DIRECT_UNIT} 2>/dev/null"
                 + ("; systemctl start torchserve" if restore else ""), check=False)


def handler_log(host: Host, before: int | None = None):
    """The direct instance's handler log: its length, or (given the length before) the batch sizes
    and handler times (ms) of the batches logged since, from the handler's own
    `... batch size=N ... total_ms=T` lines."""
    log_file = f"{HOST_BENCH_DIR}/logs/torchserve.log"
    if before is None:
        return int(host.ssh(f"wc -l < {log_file}", check=False).strip() or 0)
    text = host.ssh(f"tail -n +{before + 1} {log_file}", check=False)
    batches = [(int(n), float(t)) for n, t in re.findall(r"batch size=(\d+).*?total_ms=([\d.]+)", text)]
    if not batches:
        return None
    sizes, times = sorted(b[0] for b in batches), sorted(b[1] for b in batches)
    return {"batches": len(batches), "mean_batch": sum(sizes) / len(sizes), "handler_ms_p50": times[len(times) // 2]}


@contextmanager
def local_server(cmd: list[str], url: str, cwd: Path, env: dict | None = None):
    """A server process on this machine, in its own process group, stopped by its PID.
    Yields its URL and a function giving its processes' CPU seconds."""
    out = open(cwd / "server.out", "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(url, proc=proc, body=(REPO / "files/samples/tshirt4.jpg").read_bytes())
        yield url, lambda: local_cpu(proc.pid)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{(cwd / 'server.out').read_text(errors='replace')[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process started here
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()


@contextmanager
def article_server(host: Host):
    """TorchServe defaults + the article's handler and weights, on loopback (this machine)."""
    root = WORK / "article"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("store", "logs", "tmp"):
        (root / d).mkdir(parents=True)
    build_mar(root / "store", "article", None, PEERS / "article_handler.py",
              REPO / "tests/fixtures/fashion_mnist_model.pth")
    p, m, x, gi, gm = (host.port(PORT_ARTICLE + i) for i in range(5))
    # Only addresses (loopback, no clash with other servers) and the model to load are set;
    # token auth is off because the article predates it (0.11.1) and it would only add a header.
    (root / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{p}", f"management_address=http://127.0.0.1:{m}",
        f"metrics_address=http://127.0.0.1:{x}", "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={gi}", "grpc_management_address=127.0.0.1", f"grpc_management_port={gm}",
        f"model_store={root / 'store'}", "load_models=article.mar", "disable_token_authorization=true", ""]))
    env = {"LOG_LOCATION": str(root / "logs"), "METRICS_LOCATION": str(root / "logs"), "TEMP": str(root / "tmp"),
           "TMPDIR": str(root / "tmp"), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    cmd = [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config",
           str(root / "config.properties")]
    with local_server(cmd, f"http://127.0.0.1:{p}/predictions/article", root, env) as server:
        yield server


@contextmanager
def fastapi_server(host: Host):
    root = WORK / "fastapi"
    root.mkdir(parents=True, exist_ok=True)
    p = host.port(PORT_FASTAPI)
    cmd = [str(VENV_BIN / "uvicorn"), "fastapi_app:app", "--app-dir", str(PEERS), "--host", "127.0.0.1",
           "--port", str(p), "--workers", str(CORES), "--http", "httptools", "--loop", "uvloop",
           "--no-access-log", "--log-level", "warning"]
    with local_server(cmd, f"http://127.0.0.1:{p}/predictions/fmnist", root) as server:
        yield server


def inprocess(files: list[Path], procs: int, seconds: float, warmup: float) -> dict:
    r = subprocess.run([sys.executable, str(PEERS / "inprocess.py"), "--procs", str(procs), "--seconds", str(seconds),
                        "--warmup", str(warmup), *map(str, files)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def fmt(v: float, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = ["| payload | setup | c | req/s | p50 ms | p95 ms | p99 ms | errors |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        c = "-" if r["c"] is None else str(r["c"])
        lines.append(f"| {r['payload']} | {LABELS[r['setup']]} | {c} | {fmt(r['rps'], 0)} | {fmt(r['p50'], 2)} | "
                     f"{fmt(r['p95'], 2)} | {fmt(r['p99'], 2)} | {r['errors']} |")
    return "\n".join(lines)


def server_cpu(row: dict) -> float | None:
    """TorchServe's CPU ms per request (frontend + workers), if measured."""
    cpu = row.get("cpu_ms")
    return cpu.get("frontend", 0.0) + cpu.get("workers", 0.0) if cpu else None


def cpu_table(rows: list[dict]) -> str:
    """CPU ms per request by part (server processes and wrk), at each concurrency of the HTTP setups."""
    parts = ["nginx", "frontend", "workers", "wrk"]
    lines = ["| payload | setup | c | " + " | ".join(parts) + " | total |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in parts) + " | ---: |"]
    for r in rows:
        cpu = r.get("cpu_ms")
        if not cpu:
            continue
        lines.append(f"| {r['payload']} | {LABELS[r['setup']]} | {'-' if r['c'] is None else r['c']} | " +
                     " | ".join(fmt(cpu.get(p), 2) for p in parts) + f" | {fmt(sum(cpu.values()), 2)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pick(rows, setup, payload, c=None):
    return next((r for r in rows if r["setup"] == setup and r["payload"] == payload and r["c"] == c), None)


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for the targets of issue 11 that this run covers."""
    out = []
    limit = f"inproc {CORES}p"

    def add(name, value, ok, fmtd=None):
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out.append((name, fmtd or f"{value:.2f}", "yes" if ok else "no"))

    for c in (32, 64):
        n = pick(rows, "nginx", "png", c)
        if not n:
            continue
        for other, target in (("article", 15), ("fastapi", 1.4)):
            o = pick(rows, other, "png", c)
            if o:
                add(f"png c={c}: nginx / {other} req/s (target >= {target}x)", div(n["rps"], o["rps"]),
                    div(n["rps"], o["rps"]) >= target, f"{div(n['rps'], o['rps']):.2f}x")
        lim = pick(rows, limit, "png")
        if lim:
            add(f"png c={c}: nginx / in-process {CORES} procs (target >= 0.8x)", div(n["rps"], lim["rps"]),
                div(n["rps"], lim["rps"]) >= 0.8, f"{div(n['rps'], lim['rps']):.2f}x")
        add(f"png c={c}: nginx p99 / p50 (target <= 3)", div(n["p99"], n["p50"]), div(n["p99"], n["p50"]) <= 3)
    n1, a1, f1 = pick(rows, "nginx", "png", 1), pick(rows, "article", "png", 1), pick(rows, "fastapi", "png", 1)
    if n1 and a1:
        add("png c=1: nginx p50 / article p50 (target <= 1.0)", div(n1["p50"], a1["p50"]), n1["p50"] <= a1["p50"])
    if n1 and f1:
        add("png c=1: nginx p50 / FastAPI p50 (reported)", div(n1["p50"], f1["p50"]), True,
            f"{div(n1['p50'], f1['p50']):.2f}x ({n1['p50']:.2f} vs {f1['p50']:.2f} ms)")
    n32, d32 = pick(rows, "nginx", "png", 32), pick(rows, "direct", "png", 32)
    if n32 and d32:
        cost = 1 - div(n32["rps"], d32["rps"])
        add("png c=32: nginx cost, 1 - nginx/direct req/s (target <= 5 %)", cost, cost <= 0.05, f"{cost * 100:.1f} %")
    p32, plim = pick(rows, "nginx", "photo", 32), pick(rows, limit, "photo")
    if p32 and plim:
        add(f"photo c=32: nginx / in-process {CORES} procs (target >= 0.9x)", div(p32["rps"], plim["rps"]),
            div(p32["rps"], plim["rps"]) >= 0.9, f"{div(p32['rps'], plim['rps']):.2f}x")
    # The same targets from CPU time per request (server processes; wrk and nginx included for the
    # project): capacity ratios that a busy machine distorts far less than req/s.
    for payload, c, other, target in (("png", 32, "fastapi", 1.4), ("png", 64, "fastapi", 1.4),
                                      ("png", 32, limit, 0.8), ("photo", 32, limit, 0.9)):
        n, o = pick(rows, "nginx", payload, c), pick(rows, other, payload, None if other == limit else c)
        if n and o and n.get("cpu_ms") and o.get("cpu_ms"):
            mine = sum(n["cpu_ms"].values())
            theirs = sum(o["cpu_ms"].values())
            add(f"{payload} c={c}: CPU per request, {LABELS[other]} / nginx (capacity ratio, target >= {target}x)",
                div(theirs, mine), div(theirs, mine) >= target,
                f"{div(theirs, mine):.2f}x ({theirs:.2f} vs {mine:.2f} ms)")
    errors = sum(r["errors"] for r in rows)
    add("errors in every measured run (target 0)", errors, errors == 0, str(errors))
    return out


def c1_breakdown(rows: list[dict], delay: int | None = None) -> list[str]:
    """Where a lone small request's time goes, from measured medians (differences of p50s). A lone
    request waits the whole max_batch_delay (`delay`, ms) for a batch that does not fill."""
    n, d, i = pick(rows, "nginx", "png", 1), pick(rows, "direct", "png", 1), pick(rows, "inproc 1p", "png")
    out = []
    if n and d:
        h = (d.get("server") or {}).get("handler_ms_p50")
        handler = h if h is not None else (i["p50"] if i else None)
        if handler is not None:
            src = "the handler's own total_ms in the worker" if h is not None else "the in-process call"
            wait = delay or 0
            out.append(f"c=1 png median {n['p50']:.2f} ms = nginx {n['p50'] - d['p50']:.2f} (nginx - direct) + "
                       f"batch wait {wait} (max_batch_delay) + TorchServe frontend and frontend-worker IPC "
                       f"{d['p50'] - handler - wait:.2f} + handler {handler:.2f} ({src})")
    f = pick(rows, "fastapi", "png", 1)
    if n and f:
        out.append(f"c=1 png gap to FastAPI: {n['p50']:.2f} vs {f['p50']:.2f} ms median")
    batches = [r for r in rows if r["setup"] == "direct" and r.get("server")]
    if batches:
        out.append("direct TorchServe, mean batch size per point: " + ", ".join(
            f"{r['payload']} c={r['c']} {r['server']['mean_batch']:.1f}" for r in batches))
    return out


def stall_check(rows: list[dict]) -> list[str]:
    """A server whose c=1 latency sits steadily near 40 ms while the work takes a few ms is held by
    delayed ACKs (the 40 ms timer of Linux), not by compute."""
    notes = []
    for r in rows:
        i = pick(rows, "inproc 1p", r["payload"])
        if r["c"] == 1 and i and i["p50"] < 10 and 36 <= r["p50"] <= 48 and r["p95"] <= 1.3 * r["p50"]:
            notes.append(f"WARNING {LABELS[r['setup']]} {r['payload']}: c=1 p50 {r['p50']:.1f} ms vs "
                         f"{i['p50']:.1f} ms of work: a transport stall (delayed ACK / Nagle), not compute")
    return notes


def plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payloads = sorted({r["payload"] for r in rows}, key=["png", "photo"].index)
    http = [s for s in SETUPS if s != "inproc" and any(r["setup"] == s for r in rows)]
    colors = dict(zip(SETUPS, ["tab:blue", "tab:cyan", "tab:red", "tab:green", "tab:gray"]))
    files = []
    fig, axes = plt.subplots(1, len(payloads), figsize=(6 * len(payloads), 4.5), squeeze=False)
    for ax, p in zip(axes[0], payloads):
        for s in http:
            pts = sorted((r["c"], r["rps"]) for r in rows if r["setup"] == s and r["payload"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=colors[s], label=LABELS[s])
        for key, style in (("inproc 1p", ":"), (f"inproc {CORES}p", "--")):
            r = pick(rows, key, p)
            if r:
                ax.axhline(r["rps"], color="gray", linestyle=style, label=LABELS[key])
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel("requests/s")
        ax.set_title(f"throughput, {p}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "serving-throughput.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(payloads), figsize=(6 * len(payloads), 4.5), squeeze=False)
    for ax, p in zip(axes[0], payloads):
        for s in http:
            pts = sorted((r["c"], r["p50"], r["p99"]) for r in rows
                         if r["setup"] == s and r["payload"] == p and r["requests"])
            ax.plot([x[0] for x in pts], [x[1] for x in pts], "o-", color=colors[s], label=f"{LABELS[s]} p50")
            ax.plot([x[0] for x in pts], [x[2] for x in pts], "v--", color=colors[s], alpha=0.7, label="p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(f"latency p50 (solid) and p99 (dashed), {p}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    files.append(out / "serving-latency.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


# --------------------------------------------------------------------------- modes
def expected_labels(payloads: dict) -> dict[str, str]:
    sys.path.insert(0, str(PEERS))
    import fmnist_inprocess

    p = fmnist_inprocess.load(threads=1)
    return {f.name: p.predict(f.read_bytes())[1]["label"] for files in payloads.values() for f in files}


def run_compare(args, host: Host, payloads: dict) -> None:
    expected = expected_labels(payloads)
    rows, agree = [], {}
    conc = args.concurrency

    def run_http(setup: str, url: str, probe=None, cpu=None):
        log(f"{LABELS[setup]}: {url}")
        agree[setup] = answers_agree(url, payloads, expected)
        settle(url, payloads, args.settle)
        for r in measure(url, payloads, conc, args.duration, args.warmup, probe, cpu):
            r["setup"] = setup
            rows.append(r)

    if "nginx" in args.setups:
        run_http("nginx", host.nginx_url, cpu=lambda: host_cpu(host))
    if "direct" in args.setups:
        with direct_instance(host) as url:
            run_http("direct", url, lambda before=None: handler_log(host, before), lambda: host_cpu(host))
    stopped = any(s in args.setups for s in ("article", "fastapi", "inproc"))
    if stopped:  # one server on the CPUs at a time
        host.ssh("systemctl stop torchserve", check=False)
    try:
        if "article" in args.setups:
            with article_server(host) as (url, cpu):
                run_http("article", url, cpu=cpu)
        if "fastapi" in args.setups:
            with fastapi_server(host) as (url, cpu):
                run_http("fastapi", url, cpu=cpu)
        if "inproc" in args.setups:
            for procs in sorted({1, CORES}):
                for pname, files in payloads.items():
                    r = inprocess(files, procs, args.duration, args.warmup)
                    r.update(setup=f"inproc {procs}p", payload=pname, c=None)
                    log(f"  in-process {procs}p {pname:5} {r['rps']:8.1f} calls/s  p50 {r['p50']:.2f} ms")
                    rows.append(r)
    finally:
        if stopped:
            host.ssh("systemctl start torchserve", check=False)

    rows.sort(key=lambda r: (["png", "photo"].index(r["payload"]),
                             [*SETUPS[:-1], "inproc 1p", f"inproc {CORES}p"].index(r["setup"]), r["c"] or 0))
    write_results(args, rows, agree, describe_payloads(payloads), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  args.load_before, os.getloadavg()[0])


def write_results(args, rows: list[dict], agree: dict, pay: dict, when: str, load_before: float,
                  load_end: float) -> None:
    """serving.md (table, CPU table, target ratios, notes), serving.json and the plots, into args.out."""
    args.out.mkdir(parents=True, exist_ok=True)
    md = [f"Serving figures, {when}, {CORES} cores, wrk on the same machine (1 thread, keep-alive), "
          f"{args.duration:g} s per point after a {args.warmup:g} s warm-up; load average before the run "
          f"{load_before:.2f}, after it {load_end:.2f}.", "",
          f"Payloads: png = {pay.get('png', '-')}; photo = {pay.get('photo', '-')}.", "",
          f"Command: `{args.command}`", "", table(rows), ""]
    cpu = cpu_table(rows)
    if cpu:
        md += ["CPU time per request, ms (user + system, from /proc; `frontend` = TorchServe's JVM, "
               "`workers` = the Python workers or server processes; less distorted by a busy machine "
               "than req/s):", "", cpu, ""]
    rat = ratios(rows)
    if rat:
        md += ["| target | measured | met |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rat] + [""]
    notes = c1_breakdown(rows, deployed_model()["max_batch_delay"]) + stall_check(rows)
    for setup, shares in agree.items():
        notes.append(f"{LABELS[setup]}: labels equal to the handler's in-process labels: " +
                     ", ".join(f"{p} {v * 100:.0f} %" for p, v in shares.items()))
    for r in rows:
        if r["errors"]:
            kinds = {**{f"HTTP {k}": v for k, v in r.get("codes", {}).items()}, **r.get("socket_errors", {})}
            notes.append(f"errors, {LABELS[r['setup']]} {r['payload']} c={r['c']}: " +
                         ", ".join(f"{k} {v}" for k, v in kinds.items()) +
                         "".join(f"; HTTP {k} said: {' '.join(v.split())[:120]}" for k, v in r.get("samples", {}).items()))
    md += [f"- {n}" for n in notes]
    text = "\n".join(md) + "\n"
    (args.out / "serving.md").write_text(text)
    (args.out / "serving.json").write_text(json.dumps({
        "when": when, "rows": rows, "payloads": pay, "agree": agree, "load_before": load_before,
        "load_end": load_end, "command": args.command, "duration": args.duration, "warmup": args.warmup}, indent=1))
    pngs = plots(rows, args.out)
    print("\n" + text)
    print("written: " + ", ".join(str(p) for p in [args.out / "serving.md", args.out / "serving.json", *pngs]))
    if load_end > 1.0:
        log(f"load average at the end {load_end:.2f}: figures from a busy machine are not comparable")


def run_sweep(args, host: Host, payloads: dict) -> None:
    """One parameter at a time from the role defaults; keep the best; print the winners."""
    m = deployed_model()
    best = {"workers": m["workers"], "batch_size": m["batch_size"], "max_batch_delay": m["max_batch_delay"],
            "intra_op_threads": m["handler_config"].get("intra_op_threads", 1), "netty_threads": 0}
    grid = {
        "batch_size": [1, 4, 8, 16, 32],
        # Not 0: TorchServe 0.12 takes maxBatchDelay 0 as "unset" and waits its default 100 ms.
        "max_batch_delay": [1, 2, 5, 10],
        "workers": [1, 2, 3, 4],
        "intra_op_threads": [1, 2],
        "netty_threads": [0, 1, 2, 4],
    }
    if args.sweep_params:
        grid = {k: v for k, v in grid.items() if k in args.sweep_params.split(",")}
    for item in filter(None, args.sweep_values.split(";")):
        name, _, values = item.partition("=")
        if name not in grid:
            sys.exit(f"--sweep-values: unknown parameter {name!r} (one of {', '.join(grid)})")
        grid[name] = [int(v) for v in values.split(",")]
    files = payloads["png"]
    mars: dict[tuple, bytes] = {}
    seen: dict[tuple, dict] = {}
    conc = args.concurrency

    def trial(cfg: dict) -> dict:
        key = tuple(sorted(cfg.items()))
        if key in seen:
            return seen[key]
        mc = {"minWorkers": cfg["workers"], "maxWorkers": cfg["workers"], "batchSize": cfg["batch_size"],
              "maxBatchDelay": cfg["max_batch_delay"], "responseTimeout": 30,
              "handler": {**m["handler_config"], "intra_op_threads": cfg["intra_op_threads"]}}
        mkey = tuple(sorted((k, str(v)) for k, v in mc.items()))
        if mkey not in mars:
            mars[mkey] = build_mar(WORK / "sweep", "fmnist", mc).read_bytes()
        log("trial " + " ".join(f"{k}={v}" for k, v in cfg.items()))
        with direct_instance(host, mar=mars[mkey], model=cfg, netty_threads=cfg["netty_threads"],
                             restore=False) as url:
            settle(url, {"png": files}, args.settle)
            res = {r["c"]: r for r in measure(url, {"png": files}, conc, args.duration, args.warmup,
                                              cpu=lambda: host_cpu(host))}
        hi = [res[c] for c in conc if c >= 32]
        clean = all(r["errors"] == 0 for r in res.values())
        ok = clean and all(r["p99"] <= 3 * r["p50"] for r in hi)
        score = math.exp(sum(math.log(r["rps"]) for r in hi) / len(hi)) if hi else 0.0
        seen[key] = {"cfg": dict(cfg), "res": res, "ok": ok, "clean": clean, "score": score, "c1_p50": res[min(conc)]["p50"]}
        return seen[key]

    def better(a: dict, b: dict) -> bool:
        """a beats b: no errors first; then throughput, unless within the margin: then the
        tail (p99 <= 3x p50), then the lower c=1 median."""
        if a["clean"] != b["clean"]:
            return a["clean"]
        if abs(a["score"] - b["score"]) > args.sweep_margin * max(a["score"], b["score"]):
            return a["score"] > b["score"]
        if a["ok"] != b["ok"]:
            return a["ok"]
        return a["c1_p50"] < b["c1_p50"]

    try:
        current = trial(best)
        for param, values in grid.items():
            for v in values:
                if v == best[param]:
                    continue
                t = trial({**best, param: v})
                if better(t, current):
                    current, best = t, dict(t["cfg"])
    finally:
        host.ssh("systemctl start torchserve", check=False)
    lines = ["| workers | torch threads | batch | delay ms | netty | " +
             " | ".join(f"c={c} req/s, p50/p99" for c in conc) + f" | TorchServe CPU ms/req at c={max(conc)} | ok |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---" for _ in conc) + " | ---: | --- |"]
    for t in seen.values():
        c = t["cfg"]
        lines.append(f"| {c['workers']} | {c['intra_op_threads']} | {c['batch_size']} | {c['max_batch_delay']} | "
                     f"{c['netty_threads'] or 'default'} | " +
                     " | ".join(f"{t['res'][k]['rps']:,.0f}, {t['res'][k]['p50']:.1f}/{t['res'][k]['p99']:.1f}"
                                for k in conc) +
                     f" | {fmt(server_cpu(t['res'][max(conc)]), 2)} | {'yes' if t['ok'] else 'no'} |")
    text = "\n".join(lines)
    b = best
    summary = (f"best: workers={b['workers']} intra_op_threads={b['intra_op_threads']} batch_size={b['batch_size']} "
               f"max_batch_delay={b['max_batch_delay']} number_of_netty_threads="
               f"{b['netty_threads'] or 'default'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(f"Sweep, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, png payloads, "
                                      f"direct TorchServe, {args.duration:g} s per point; command `{args.command}`\n\n"
                                      f"{text}\n\n{summary}\n")
    print("\n" + text + "\n\n" + summary)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per point (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each point (default 2)")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="seconds of load on each server before its first point (JIT warm-up; default 10)")
    ap.add_argument("--concurrency", help="comma list (default 1,8,32,64; with --sweep 1,32,64)")
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma list of {','.join(SETUPS)}")
    ap.add_argument("--payloads", default="png,photo", help="comma list of png,photo")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where results go (default benchmarks/results)")
    ap.add_argument("--sweep", action="store_true", help="sweep the TorchServe settings instead (png payloads)")
    ap.add_argument("--sweep-margin", type=float, default=0.10,
                    help="throughputs this close (fraction) count as equal in the sweep (default 0.10)")
    ap.add_argument("--sweep-values", default="",
                    help='other values to try, e.g. "workers=1,2,3;netty_threads=0,4"')
    ap.add_argument("--sweep-params", default="",
                    help="comma list of the parameters to sweep (default all: workers,intra_op_threads,"
                         "batch_size,max_batch_delay,netty_threads)")
    ap.add_argument("--render", type=Path,
                    help="only rewrite serving.md and the plots in --out from this serving.json (no measuring)")
    args = ap.parse_args()
    args.command = "python3 benchmarks/serving.py " + " ".join(sys.argv[1:])
    if args.render:
        data = json.loads(args.render.read_text())
        args.command = data.get("command", args.command)
        args.duration, args.warmup = data.get("duration", args.duration), data.get("warmup", args.warmup)
        write_results(args, data["rows"], data["agree"], data["payloads"], data["when"], data["load_before"],
                      data.get("load_end", float("nan")))
        return
    args.concurrency = [int(c) for c in (args.concurrency or ("1,32,64" if args.sweep else "1,8,32,64")).split(",")]
    args.setups = args.setups.split(",")
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        ap.error(f"unknown setups {sorted(unknown)}; choose from {SETUPS}")
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk (make deps installs it)")
    args.load_before = os.getloadavg()[0]
    if args.load_before > 0.5:
        log(f"load average {args.load_before:.2f}: something else is running, figures will be low")
    WORK.mkdir(parents=True, exist_ok=True)
    payloads = make_payloads(WORK / "payloads")
    payloads = {k: v for k, v in payloads.items() if k in args.payloads.split(",")}
    needs_host = args.sweep or any(s in args.setups for s in ("nginx", "direct"))
    host = None
    try:
        sample = (REPO / "files/samples/tshirt4.jpg").read_bytes()
        host = ensure_host(sample) if needs_host else FreePorts()
        if args.sweep:
            run_sweep(args, host, payloads)
        else:
            run_compare(args, host, payloads)
    finally:
        if needs_host and not os.environ.get("KEEP_HOSTS"):
            subprocess.run(SANDBOX + ["destroy"])


if __name__ == "__main__":
    main()
