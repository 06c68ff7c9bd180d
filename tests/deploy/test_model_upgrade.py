"""Model upgrades without a restart, on one sandbox host of its own
(.sandbox/pytest-upgrade), while 8 client threads predict through nginx:

1. a new version is registered beside the old one, checked and made the
   default; no request fails and the JVM keeps its PID;
2. an archive whose weights do not load and
3. a version whose canary answers the wrong label are rolled back: the play
   fails naming host, model, version and reason, the old version serves on;
4. playbooks/rollback.yml sets the previous (kept) version back.

Figures (requests, failures, p50/p99 before vs during, duration) are printed
(`-s`)."""
from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from deploy_helpers import REPO, Host, recap, sandbox_host

pytestmark = pytest.mark.deploy
STATE = REPO / ".sandbox/pytest-upgrade"
SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "pytest-upg"]
HOST = "pytest-upg1"
MODEL = yaml.safe_load((REPO / "playbooks/vars/fmnist.yml").read_text())["torchserve_models"][0]
IMAGE = (REPO / "files/samples/tshirt4.jpg").read_bytes()
CLIENTS = 8


@pytest.fixture(scope="module")
def host() -> Host:
    with sandbox_host(SANDBOX, HOST) as h:
        yield h


@pytest.fixture(scope="module")
def ca(host: Host, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tls") / "host.crt"
    path.write_text(host.ssh("cat /etc/nginx/tls/torchserve.crt").stdout)
    return str(path)


class Load:
    """CLIENTS keep-alive clients PUT a photo through nginx until stopped (at
    most `limit` seconds); every answer but a 200 with the right label fails."""

    def __init__(self, url: str, ca: str, limit: float = 600):
        self.url, self.ca, self.limit = url, ca, limit
        self.stop = threading.Event()
        self.samples: list[tuple[float, float, bool, str]] = []  # start, seconds, ok, what
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self):
        s = requests.Session()
        end = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = s.put(self.url, data=IMAGE, verify=self.ca, timeout=30,
                          headers={"Content-Type": "application/octet-stream"})
                ok = r.status_code == 200 and r.json().get("label") == MODEL["smoke_test"]["label"]
                what = "" if ok else f"{r.status_code} {r.text[:200]}"
            except (requests.RequestException, ValueError) as e:
                ok, what = False, repr(e)[:200]
            with self.lock:
                self.samples.append((t0, time.monotonic() - t0, ok, what))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def window(self, start: float, end: float) -> dict:
        got = [s for s in self.samples if start <= s[0] < end]
        lat = sorted(s[1] for s in got)
        q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
        return {"sent": len(got), "failed": sum(not s[2] for s in got), "p50_ms": round(q[49] * 1000, 1),
                "p99_ms": round(q[98] * 1000, 1), "errors": sorted({s[3] for s in got if not s[2]})[:5]}


def under_load(host: Host, ca: str, label: str, run) -> tuple[subprocess.CompletedProcess, dict]:
    """Baseline load for 5 s, then `run()` (a playbook) under the same load; figures printed."""
    with Load(f"{host.https}/predictions/fmnist", ca) as load:
        t0 = time.monotonic()
        time.sleep(5)
        t1 = time.monotonic()
        r = run()
        t2 = time.monotonic()
    before, during = load.window(t0, t1), load.window(t1, t2)
    figures = {"case": label, "duration_s": round(t2 - t1, 1), "before": before, "during": during}
    print("\nFIGURES " + json.dumps(figures))
    return r, figures


def playbook(host: Host, tmp_path: Path, **model) -> subprocess.CompletedProcess:
    extra = tmp_path / "model.json"
    extra.write_text(json.dumps({"torchserve_models": [MODEL | model]}))
    return host.playbook("-e", f"@{extra}")


def main_pid(host: Host) -> str:
    return host.ssh("systemctl show -P MainPID torchserve").stdout.strip()


def versions(host: Host) -> tuple[str, list[str]]:
    """(default version, every registered version) of fmnist, from TorchServe itself."""
    status, default = host.management("/models/fmnist")
    assert status == 200, default
    status, every = host.management("/models/fmnist/all")
    assert status == 200, every
    return default[0]["modelVersion"], sorted(v["modelVersion"] for v in every)


def config_versions(host: Host) -> tuple[str, list[str]]:
    props = dict(line.split("=", 1) for line in host.ssh("cat /etc/torchserve/config.properties").stdout.splitlines()
                 if "=" in line and not line.startswith("#"))
    return props["load_models"], sorted(json.loads(props["models"])["fmnist"])


def flat(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stdout + r.stderr).split())  # the YAML callback folds long messages


def test_upgrade_to_a_new_version_without_a_restart(host, ca, tmp_path):
    assert versions(host) == ("1.0", ["1.0"])
    pid = main_pid(host)
    r, figures = under_load(host, ca, "upgrade 1.0 -> 1.1", lambda: playbook(host, tmp_path, version="1.1"))
    assert r.returncode == 0, r.stdout[-6000:]
    assert figures["during"]["failed"] == 0 and figures["before"]["failed"] == 0, figures
    assert figures["during"]["sent"] > 0, figures
    assert main_pid(host) == pid, "the JVM was restarted"
    assert "Restart torchserve" not in r.stdout, "the restart handler ran"
    assert versions(host) == ("1.1", ["1.1"])
    assert config_versions(host) == ("fmnist-1.1.mar", ["1.1"])
    # The earlier archive stays for rollbacks.
    assert host.ssh("ls /opt/torchserve/model-store").stdout.split() == ["fmnist-1.0.mar", "fmnist-1.1.mar"]
    again = playbook(host, tmp_path, version="1.1")
    assert again.returncode == 0 and recap(again.stdout, host.name)["changed"] == 0, again.stdout[-3000:]
    # A restart comes up on the new version.
    host.ssh("systemctl restart torchserve")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ok = requests.put(f"{host.https}/predictions/fmnist", data=IMAGE, verify=ca, timeout=30)
        if ok.status_code == 200:
            break
        time.sleep(1)
    assert ok.status_code == 200 and ok.json()["label"] == MODEL["smoke_test"]["label"], ok.text
    assert main_pid(host) != pid
    assert versions(host) == ("1.1", ["1.1"])


def test_an_archive_that_does_not_load_is_rolled_back(host, ca, tmp_path):
    assert versions(host)[0] == "1.1", "needs the upgrade above"
    broken = tmp_path / "truncated.pth"
    broken.write_bytes((REPO / MODEL["serialized_file"]).read_bytes()[:20000])
    pid, config = main_pid(host), host.ssh("sha256sum /etc/torchserve/config.properties").stdout
    r, figures = under_load(host, ca, "archive that does not load (1.2)",
                            lambda: playbook(host, tmp_path, version="1.2", serialized_file=str(broken)))
    assert r.returncode != 0
    out = flat(r)
    assert (f"torchserve role: {host.name}: model fmnist version 1.2 was rolled back (1.1 serves again,"
            " config.properties unchanged): failed to load") in out, out[-4000:]
    assert figures["during"]["failed"] == 0, figures
    assert main_pid(host) == pid
    assert versions(host) == ("1.1", ["1.1"])
    assert host.ssh("sha256sum /etc/torchserve/config.properties").stdout == config
    # The refused archive is not kept as a way back.
    assert host.ssh("ls /opt/torchserve/model-store").stdout.split() == ["fmnist-1.0.mar", "fmnist-1.1.mar"]


def test_a_wrong_canary_answer_is_rolled_back(host, ca, tmp_path):
    assert versions(host)[0] == "1.1", "needs the upgrade above"
    pid, config = main_pid(host), host.ssh("sha256sum /etc/torchserve/config.properties").stdout
    wrong = {"image": MODEL["smoke_test"]["image"], "label": "Bag"}
    r, figures = under_load(host, ca, "canary with the wrong label (1.3)",
                            lambda: playbook(host, tmp_path, version="1.3", smoke_test=wrong))
    assert r.returncode != 0
    out = flat(r)
    assert (f"torchserve role: {host.name}: model fmnist version 1.3 was rolled back (1.1 serves again,"
            f' config.properties unchanged): canary {MODEL["smoke_test"]["image"]} came back as "T-shirt/top",'
            ' expected "Bag"') in out, out[-4000:]
    assert figures["during"]["failed"] == 0, figures
    assert main_pid(host) == pid
    assert versions(host) == ("1.1", ["1.1"])
    assert host.ssh("sha256sum /etc/torchserve/config.properties").stdout == config
    # The refused archive is not kept as a way back.
    assert host.ssh("ls /opt/torchserve/model-store").stdout.split() == ["fmnist-1.0.mar", "fmnist-1.1.mar"]


def test_rollback_playbook_sets_the_previous_version_back(host, ca):
    assert versions(host)[0] == "1.1", "needs the upgrade above"
    pid = main_pid(host)
    r, figures = under_load(host, ca, "playbooks/rollback.yml (1.1 -> 1.0)", lambda: subprocess.run(
        ["ansible-playbook", "-i", host.inventory, "playbooks/rollback.yml"],
        cwd=REPO, capture_output=True, text=True, timeout=900))
    assert r.returncode == 0, r.stdout[-6000:]
    assert figures["during"]["failed"] == 0, figures
    assert main_pid(host) == pid
    # The newest archive older than the serving one's.
    assert versions(host) == ("1.0", ["1.0"])
    assert config_versions(host) == ("fmnist-1.0.mar", ["1.0"])
    # From 1.0 the only kept archive is newer (1.1): nothing to go back to, a clear refusal.
    again = subprocess.run(["ansible-playbook", "-i", host.inventory, "playbooks/rollback.yml"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode != 0
    assert f"torchserve role: {host.name}: model fmnist: no kept archive of an earlier version (serving 1.0)" \
        in flat(again), flat(again)[-3000:]
    assert versions(host) == ("1.0", ["1.0"])
    # The inventory's version (1.0) serves: a deploy changes nothing.
    back = host.playbook()
    assert back.returncode == 0 and recap(back.stdout, host.name)["changed"] == 0, back.stdout[-3000:]


def test_a_stopped_server_starts_on_the_new_version(host, tmp_path):
    """No running server, no management API: the service simply starts with the
    new config; back to the default version (running) goes through the API."""
    assert versions(host)[0] == "1.0"
    host.ssh("systemctl stop torchserve")
    r = playbook(host, tmp_path, version="1.1")
    assert r.returncode == 0, r.stdout[-6000:]
    assert versions(host) == ("1.1", ["1.1"])
    assert config_versions(host) == ("fmnist-1.1.mar", ["1.1"])
    pid = main_pid(host)
    back = host.playbook()
    assert back.returncode == 0, back.stdout[-6000:]
    assert main_pid(host) == pid
    assert versions(host) == ("1.0", ["1.0"])
