"""Helpers for the deployment tests: a sandbox host reached over ssh and the
real playbook run against it."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".sandbox/pytest"
SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "pytest-host"]
HOST = "pytest-host1"
MANAGEMENT_SOCKET = "/run/torchserve/management/management.sock"
# An HTTP call over a Unix socket, run on the host (a minimal server has no curl).
UNIX_HTTP = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX); self.sock.settimeout(30); self.sock.connect(sys.argv[1])
c = C("localhost", timeout=30); c.request(sys.argv[3], sys.argv[2]); r = c.getresponse()
print(json.dumps({"status": r.status, "body": r.read().decode()}))
"""
# Never-deployed hosts, one per test that needs a bare server, apart from the
# session's deployed host so its inventory never lists them together.
FRESH_SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(REPO / ".sandbox/pytest-fresh"),
                 "--prefix", "pytest-fresh"]
# Files the deployment owns: a preflight failure must leave them untouched.
WATCHED = [
    "/etc/torchserve/config.properties",
    "/etc/systemd/system/torchserve.service",
    "/etc/nginx/sites-available/torchserve.conf",
    "/opt/torchserve/model-store/fmnist-1.0.mar",
]


@dataclass
class Host:
    name: str
    ports: dict
    ssh_argv: list
    inventory: str

    def ssh(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.ssh_argv + [command], capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {command!r} -> {r.returncode}: {r.stderr}")
        return r

    def playbook(self, *args: str) -> subprocess.CompletedProcess:
        """ansible-playbook deploy.yml against this host with the TLS settings."""
        argv = ["ansible-playbook", "-i", self.inventory, "playbooks/deploy.yml",
                "-e", "torchserve_nginx_tls_enabled=true", *args]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)

    def state(self) -> dict:
        """What must not move when a run is refused: file digests, the enabled
        site, leftover backups, PIDs, and the config nginx runs with (its
        worker PIDs change on every reload; MainPID does not)."""
        digests = self.ssh("sha256sum " + " ".join(WATCHED)).stdout.split()[::2]
        props = self.ssh("systemctl show -P MainPID torchserve; systemctl show -P ExecMainStartTimestamp torchserve;"
                         " systemctl show -P MainPID nginx").stdout.splitlines()
        nginx_pid = props[2]
        nginx = self.ssh(
            "readlink /etc/nginx/sites-enabled/torchserve.conf; echo ---; ls -A /etc/nginx/sites-enabled;"
            " echo ---; find /etc/nginx -name '*~' | sort; echo ---;"
            f" ps -o pid= --ppid {nginx_pid} | sort -n", check=False).stdout
        return {"files": dict(zip(WATCHED, digests)), "torchserve": props[:2], "nginx_pid": nginx_pid,
                "nginx": nginx}

    def unix_http(self, socket_path: str, path: str, method: str = "GET", user: str | None = None) -> dict:
        """An HTTP call on a Unix socket of the host, as root or `user`:
        {"status", "body"}, or {"status": None, "error"} when it cannot connect."""
        run_as = f"runuser -u {user} -- " if user else ""
        r = self.ssh(f"{run_as}python3 -c {shlex.quote(UNIX_HTTP)} {socket_path} {shlex.quote(path)} {method}",
                     check=False)
        if r.returncode != 0:
            return {"status": None, "error": r.stderr}
        return json.loads(r.stdout)

    def management(self, path: str) -> tuple[int, object]:
        """GET on TorchServe's own management socket (root may use it), as JSON."""
        r = self.unix_http(MANAGEMENT_SOCKET, path)
        assert r["status"] is not None, r["error"]
        return r["status"], json.loads(r["body"] or "null")

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.ports['torchserve_nginx_https_port']}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['torchserve_nginx_http_port']}"


def recap(output: str, host: str) -> dict:
    """The PLAY RECAP counters of one host."""
    for line in output.splitlines():
        if line.startswith(host) and "changed=" in line:
            return {k: int(v) for k, v in (kv.split("=") for kv in line.split(":", 1)[1].split())}
    raise AssertionError(f"no recap for {host} in:\n{output[-3000:]}")


def sandbox_info(sandbox: list[str], name: str) -> dict:
    """One host's record from the sandbox tool (ports, ssh command, inventory)."""
    return json.loads(subprocess.run(sandbox + ["info", name], check=True, capture_output=True, text=True).stdout)


def sandbox_as_host(sandbox: list[str], name: str) -> Host:
    info = sandbox_info(sandbox, name)
    return Host(name, info["ports"], info["ssh"], info["inventory"])


@contextlib.contextmanager
def sandbox_host(sandbox: list[str], name: str, deploy: bool = True, fresh: bool = False):
    """One sandbox host made with the tool command `sandbox` (its own state
    dir), deployed by the playbook unless `deploy` is false, removed after
    unless KEEP_HOSTS is set. `fresh` first removes one kept from an earlier run."""
    if fresh:
        subprocess.run(sandbox + ["destroy"], check=True, timeout=300)
    subprocess.run(sandbox + ["create", "--count", "1"], check=True, timeout=600)
    try:
        host = sandbox_as_host(sandbox, name)
        if deploy:
            r = host.playbook()
            assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        yield host
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(sandbox + ["destroy"], timeout=300)
