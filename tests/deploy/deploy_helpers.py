"""Helpers for the deployment tests: a sandbox host reached over ssh and the
real playbook run against it."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / ".sandbox/pytest"
SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "pytest-host"]
HOST = "pytest-host1"
# Never-deployed hosts, one per test that needs a bare server, apart from the
# session's deployed host so its inventory never lists them together.
FRESH_SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(REPO / ".sandbox/pytest-fresh"),
                 "--prefix", "pytest-fresh"]
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

    def management(self, path: str) -> tuple[int, object]:
        """GET on TorchServe's own management socket (root may use it), as JSON."""
        script = ("import http.client, json, socket, sys\n"
                  "class C(http.client.HTTPConnection):\n"
                  "    def connect(self):\n"
                  "        self.sock = socket.socket(socket.AF_UNIX)\n"
                  "        self.sock.connect('/run/torchserve/management/management.sock')\n"
                  "c = C('localhost'); c.request('GET', sys.argv[1]); r = c.getresponse()\n"
                  "print(json.dumps([r.status, json.loads(r.read() or b'null')]))\n")
        r = subprocess.run(self.ssh_argv + ["python3", "-", path], input=script, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        status, body = json.loads(r.stdout)
        return status, body

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
