"""Helpers for the deployment tests: a sandbox host reached over ssh and the
real playbook run against it."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".sandbox/pytest"
SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "pytest-host"]
HOST = "pytest-host1"
# Files the deployment owns: a preflight failure must leave them untouched.
WATCHED = [
    "/etc/torchserve/config.properties",
    "/etc/systemd/system/torchserve.service",
    "/etc/nginx/sites-available/torchserve.conf",
    "/opt/torchserve/model-store/fmnist.mar",
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
                "-e", "nginx_tls_enabled=true", *args]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800)

    def state(self) -> dict:
        """What must not move when a run is refused: file digests and PIDs."""
        digests = self.ssh("sha256sum " + " ".join(WATCHED)).stdout.split()[::2]
        props = self.ssh("systemctl show -P MainPID torchserve; systemctl show -P ExecMainStartTimestamp torchserve;"
                         " systemctl show -P MainPID nginx").stdout.splitlines()
        return {"files": dict(zip(WATCHED, digests)), "torchserve": props[:2], "nginx_pid": props[2]}

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.ports['nginx_https_port']}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.ports['nginx_http_port']}"


def recap(output: str, host: str) -> dict:
    """The PLAY RECAP counters of one host."""
    for line in output.splitlines():
        if line.startswith(host) and "changed=" in line:
            return {k: int(v) for k, v in (kv.split("=") for kv in line.split(":", 1)[1].split())}
    raise AssertionError(f"no recap for {host} in:\n{output[-3000:]}")
