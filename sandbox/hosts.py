#!/usr/bin/env python3
"""Local "bare servers" for trying and testing the deployment.

Each host is a Debian 12 root file system booted by systemd-nspawn with
systemd as PID 1 and sshd on its own loopback port (key-only root login).
The hosts share the outer network namespace, so every host gets its own
block of ports; the inventory this tool writes carries them as host vars.

    hosts.py create [--count N]      boot N hosts (safe to re-run), write inventory
    hosts.py create --count 3 --balancers 1
                                     a fleet: 3 servers and a balancer (PREFIX-lb1)
    hosts.py list                    name, state, PID, ports
    hosts.py info NAME               one host as JSON (ports, PID, ssh command)
    hosts.py shell NAME [CMD...]     ssh into a host (or run CMD there)
    hosts.py stop NAME | start NAME  power a host off / boot it again
    hosts.py destroy [NAME]          stop (by recorded PID) and remove what this tool made

State lives in --state-dir (default: .sandbox/default in the repo); the
debootstrap root is cached in --cache-dir and copied per host.
Needs root, systemd-container and debootstrap.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# What a freshly installed small Debian 12 server has: systemd, sshd, sudo,
# python3 (for Ansible) and iproute2 (ss, for listen_ports_facts).
PACKAGES = "systemd,systemd-sysv,dbus,python3,openssh-server,sudo,ca-certificates,iproute2"
# Port blocks: block k owns [BASE + k*100, BASE + k*100 + 99].
BLOCK_BASE, BLOCK_COUNT = 20000, 400
PORT_OFFSETS = {
    "ssh": 22,
    "torchserve_nginx_http_port": 80,
    "torchserve_nginx_https_port": 43,
    # Metrics (torchserve_metrics role) and monitoring (torchserve_monitoring).
    "torchserve_metrics_port": 91,
    "torchserve_metrics_stub_status_port": 92,
    "torchserve_metrics_nginx_exporter_port": 93,
    "torchserve_metrics_node_exporter_port": 94,
    "torchserve_monitoring_port": 95,
    "torchserve_monitoring_blackbox_port": 96,
}
# A balancer's public ports, in its own block.
BALANCER_PORT_OFFSETS = {
    "ssh": 22,
    "torchserve_balancer_http_port": 80,
    "torchserve_balancer_https_port": 43,
    # Its metrics listener and node exporter (when turned on).
    "torchserve_balancer_metrics_port": 91,
    "torchserve_balancer_metrics_node_exporter_port": 94,
}
BOOT_TIMEOUT = 90
# The example model entry, shared with the example inventory.
MODEL_VARS = REPO / "playbooks/vars/fmnist.yml"


def log(msg: str) -> None:
    print(f"[sandbox] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"[sandbox] error: {msg}", file=sys.stderr)
    sys.exit(1)


class Sandbox:
    def __init__(self, state_dir: Path, cache_dir: Path, prefix: str, group: str = "torchserve_servers"):
        self.state = state_dir.resolve()
        self.cache = cache_dir.resolve()
        self.prefix = prefix
        self.group = group
        self.hosts_dir = self.state / "hosts"
        self.key = self.state / "id_ed25519"
        self.inventory = self.state / "inventory.yml"
        self.known_hosts = self.state / "known_hosts"
        self.model_vars = self.state / "group_vars/torchserve_servers/fmnist.yml"
        self.claims = self.cache / "port-blocks"

    # ---- cached root file system -------------------------------------
    def rootfs(self) -> Path:
        root = self.cache / f"{SUITE}-rootfs"
        stamp = root / ".sandbox-packages"
        if stamp.is_file() and stamp.read_text() == PACKAGES:
            return root
        for tool in ("debootstrap", "systemd-nspawn", "ssh-keygen"):
            if not shutil.which(tool):
                die(f"{tool} not found: apt-get install debootstrap systemd-container openssh-client")
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.cache / f"{SUITE}-rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"debootstrap {SUITE} into {root} (once, ~1 min)")
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(tmp)],
            check=True, stdout=subprocess.DEVNULL,
        )
        # Host keys and machine-id are made per host, never shared.
        for f in (tmp / "etc/ssh").glob("ssh_host_*"):
            f.unlink()
        (tmp / "etc/machine-id").write_text("")
        (tmp / ".sandbox-packages").write_text(PACKAGES)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        return root

    # ---- per-host records ----------------------------------------------
    def host_dir(self, name: str) -> Path:
        return self.hosts_dir / name

    def record(self, name: str) -> dict:
        rec = json.loads((self.host_dir(name) / "host.json").read_text())
        # Hosts made before the roles' variables were prefixed (0.1.0) recorded
        # nginx_http_port/nginx_https_port.
        ports = rec.get("ports", {})
        for old in ("nginx_http_port", "nginx_https_port"):
            if old in ports:
                ports.setdefault(f"torchserve_{old}", ports.pop(old))
        return rec

    def names(self) -> list[str]:
        if not self.hosts_dir.is_dir():
            return []
        return sorted(p.name for p in self.hosts_dir.iterdir() if (p / "host.json").is_file())

    def pid(self, name: str) -> int | None:
        """PID of this host's systemd-nspawn if it is still that process."""
        pid_file = self.host_dir(name) / "nspawn.pid"
        if not pid_file.is_file():
            return None
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        rootfs = str(self.host_dir(name) / "rootfs").encode()
        if cmdline and cmdline[0].endswith(b"systemd-nspawn") and rootfs in cmdline:
            return pid
        return None

    # ---- port blocks -------------------------------------------------------
    @staticmethod
    def port_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
        return True

    def claim_block(self, name: str) -> int:
        """A port block no other sandbox host owns and whose ports are free."""
        self.claims.mkdir(parents=True, exist_ok=True)
        owner = f"{self.host_dir(name)}\n"
        for k in range(1, BLOCK_COUNT):
            claim = self.claims / f"{k}"
            if claim.exists():
                holder = claim.read_text()
                if holder == owner:
                    return k
                if Path(holder.strip()).is_dir():
                    continue
                claim.unlink()  # left over by a removed state dir
            base = BLOCK_BASE + k * 100
            if not all(self.port_free(base + off) for off in PORT_OFFSETS.values()):
                continue
            try:
                with open(claim, "x") as f:
                    f.write(owner)
            except FileExistsError:
                continue
            return k
        die("no free port block left")
        return 0

    def release_block(self, name: str) -> None:
        owner = f"{self.host_dir(name)}\n"
        if self.claims.is_dir():
            for claim in self.claims.iterdir():
                if claim.read_text() == owner:
                    claim.unlink()

    # ---- commands ------------------------------------------------------------
    def ensure_key(self) -> None:
        if not self.key.is_file():
            self.state.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sandbox", "-f", str(self.key)],
                check=True,
            )

    def provision(self, name: str, role: str = "server") -> None:
        """Copy the cached root and make it this host's own."""
        hdir = self.host_dir(name)
        block = self.claim_block(name)
        offsets = BALANCER_PORT_OFFSETS if role == "balancer" else PORT_OFFSETS
        ports = {k: BLOCK_BASE + block * 100 + off for k, off in offsets.items()}
        tmp = hdir / "rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.rootfs()), str(tmp)], check=True)
        (tmp / "etc/hostname").write_text(f"{name}\n")
        with open(tmp / "etc/hosts", "a") as f:
            f.write(f"127.0.1.1 {name}\n")
        (tmp / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
        subprocess.run(["ssh-keygen", "-A", "-f", str(tmp)], check=True, stdout=subprocess.DEVNULL)
        (tmp / "etc/ssh/sshd_config.d/sandbox.conf").write_text(
            f"Port {ports['ssh']}\nListenAddress 127.0.0.1\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
        )
        ssh_dir = tmp / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(f"{self.key}.pub", ssh_dir / "authorized_keys")
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        tmp.rename(hdir / "rootfs")
        (hdir / "host.json").write_text(json.dumps({"name": name, "block": block, "ports": ports, "role": role}))

    @staticmethod
    def cgroup_roots() -> list[Path]:
        """The hierarchies systemd tracks units in: cgroup2 and v1 name=systemd."""
        roots = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            _, where, kind, opts = line.split()[:4]
            if kind == "cgroup2" or (kind == "cgroup" and "name=systemd" in opts.split(",")):
                roots.append(Path(where))
        return roots

    def cgroups(self, name: str) -> list[Path]:
        # Each host gets its own subtree. Without one, every host shares the
        # outer root cgroup, so two hosts' torchserve.service share a cgroup
        # and systemd cannot kill one host's unit (it sees foreign PIDs as 0).
        leaf = f"sandbox-{name}-{self.record(name)['block']}"
        return [root / leaf for root in self.cgroup_roots()]

    def remove_cgroups(self, name: str) -> None:
        for top in self.cgroups(name):
            if not top.is_dir():
                continue
            try:  # children first; each is empty once the host is off
                for sub in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                    sub.rmdir()
                top.rmdir()
            except OSError as e:
                log(f"{name}: could not remove cgroup {top}: {e}")

    def boot(self, name: str) -> None:
        if self.pid(name):
            return
        hdir = self.host_dir(name)
        console = open(hdir / "console.log", "ab")
        # --register=no --keep-unit: the outer machine has no systemd/dbus.
        # CAP_NET_ADMIN: as on a real server, so units with PrivateNetwork=
        # can bring up their own loopback.
        cgroups = self.cgroups(name)
        for cg in cgroups:
            cg.mkdir(exist_ok=True)

        def enter_own_cgroups() -> None:  # runs in the child, before exec
            for cg in cgroups:
                (cg / "cgroup.procs").write_text("0")

        proc = subprocess.Popen(
            ["systemd-nspawn", "-b", "-D", str(hdir / "rootfs"), "-M", name,
             "--register=no", "--keep-unit", "--console=read-only",
             "--capability=CAP_NET_ADMIN"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=enter_own_cgroups,
        )
        (hdir / "nspawn.pid").write_text(f"{proc.pid}\n")
        # Until exec() completes, /proc/PID/cmdline is still ours.
        deadline = time.monotonic() + 10
        while not self.pid(name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        log(f"{name}: booting (nspawn PID {proc.pid})")

    def ssh_argv(self, name: str) -> list[str]:
        port = self.record(name)["ports"]["ssh"]
        return ["ssh", "-i", str(self.key), "-p", str(port),
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                "root@127.0.0.1"]

    def wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if not self.pid(name):
                die(f"{name}: systemd-nspawn exited; see {self.host_dir(name) / 'console.log'}")
            r = subprocess.run(self.ssh_argv(name) + ["systemctl is-system-running --wait"],
                               capture_output=True, text=True)
            if r.returncode == 0 or r.stdout.strip() == "degraded":
                log(f"{name}: up ({r.stdout.strip()})")
                return
            time.sleep(1)
        die(f"{name}: not reachable over ssh after {BOOT_TIMEOUT}s; see {self.host_dir(name) / 'console.log'}")

    def write_known_hosts(self) -> None:
        """Each host's own public keys (made at provision), so ssh checks them."""
        lines = []
        for name in self.names():
            port = self.record(name)["ports"]["ssh"]
            for pub in sorted((self.host_dir(name) / "rootfs/etc/ssh").glob("ssh_host_*_key.pub")):
                kind, key = pub.read_text().split()[:2]
                lines.append(f"[127.0.0.1]:{port} {kind} {key}")
        self.known_hosts.write_text("".join(f"{line}\n" for line in lines))

    def role(self, name: str) -> str:
        return self.record(name).get("role", "server")

    def connection_vars(self) -> list[str]:
        return [
            "        ansible_user: root",
            f"        ansible_ssh_private_key_file: {self.key}",
            "        ansible_ssh_common_args: >-",
            f"          -o StrictHostKeyChecking=yes -o UserKnownHostsFile={self.known_hosts}",
            "          -o LogLevel=ERROR",
        ]

    def host_entry(self, name: str, port_vars: list[str]) -> list[str]:
        """A host's inventory lines: ssh on loopback, and its ports as host vars
        (hosts made before a port was added lack it)."""
        ports = self.record(name)["ports"]
        return ([f"        {name}:", "          ansible_host: 127.0.0.1", f"          ansible_port: {ports['ssh']}"]
                + [f"          {k}: {ports[k]}" for k in port_vars if k in ports])

    def write_inventory(self) -> None:
        lines = ["# Written by sandbox/hosts.py: local nspawn hosts. Do not edit.",
                 "all:", "  children:", f"    {self.group}:", "      hosts:"]
        servers = [n for n in self.names() if self.role(n) == "server"]
        balancers = [n for n in self.names() if self.role(n) == "balancer"]
        for name in servers:
            lines += self.host_entry(name, [k for k in PORT_OFFSETS if k != "ssh"])
        lines += ["      vars:", *self.connection_vars(),
            "        # The hosts share the machine's network namespace: nginx on all",
            "        # addresses would listen on every interface of the machine.",
            '        torchserve_nginx_listen_addresses: ["127.0.0.1"]',
            "        # Metrics, when turned on: loopback only, scraped from loopback.",
            '        torchserve_metrics_listen_addresses: ["127.0.0.1"]',
            '        torchserve_metrics_allowed_networks: ["127.0.0.1"]',
            "        # The sandbox hosts reach no Python index: install from a",
            "        # wheelhouse built on the controller.",
            "        torchserve_pip_mode: wheelhouse",
            f"        torchserve_wheelhouse_controller_dir: {REPO / '.cache/wheelhouse'}",
            "        # The example model (group_vars/torchserve_servers/fmnist.yml links",
            "        # to playbooks/vars/fmnist.yml); its paths start at the repository.",
            f"        torchserve_model_src_root: {REPO}",
        ]
        if balancers:
            lines += ["    torchserve_balancers:", "      hosts:"]
            for name in balancers:
                lines += self.host_entry(name, [k for k in BALANCER_PORT_OFFSETS if k != "ssh"])
            lines += ["      vars:", *self.connection_vars(),
                      "        # Public on loopback only, like the servers' nginx. The servers",
                      "        # see the balancer as 127.0.0.1 (ansible_host): every host shares",
                      "        # the machine's loopback, so that is the address they trust for",
                      "        # X-Forwarded-For; on real servers it is the balancer's own.",
                      '        torchserve_balancer_listen_addresses: ["127.0.0.1"]',
                      '        torchserve_balancer_metrics_listen_addresses: ["127.0.0.1"]',
                      '        torchserve_balancer_metrics_allowed_networks: ["127.0.0.1"]']
        self.inventory.write_text("\n".join(lines) + "\n")
        # Only for model servers: a monitoring host's state dir, used beside a
        # server's inventory, must not change that server's model.
        if self.group == "torchserve_servers":
            self.write_model_vars(fleet=bool(balancers))
        log(f"inventory: {self.inventory}")

    def write_model_vars(self, fleet: bool) -> None:
        """The example model for the servers' group: a link to the shared entry;
        a fleet gets a copy with one worker per server (small hosts)."""
        link = self.model_vars
        link.parent.mkdir(parents=True, exist_ok=True)
        if fleet:
            text, n = re.subn(r"^(\s+workers:) \d+$", r"\1 1", MODEL_VARS.read_text(), flags=re.M)
            if n != 1:
                die(f"{MODEL_VARS}: expected one 'workers:' line, found {n}")
            if link.is_symlink():
                link.unlink()
            link.write_text(f"# Written by sandbox/hosts.py from {MODEL_VARS.relative_to(REPO)}: one worker"
                            " per fleet server. Do not edit.\n" + text)
        elif not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(MODEL_VARS)

    def create(self, count: int, balancers: int = 0) -> None:
        if os.geteuid() != 0:
            die("must run as root (systemd-nspawn)")
        self.ensure_key()
        roles = {f"{self.prefix}{i}": "server" for i in range(1, count + 1)}
        roles.update({f"{self.prefix}-lb{i}": "balancer" for i in range(1, balancers + 1)})
        names = list(roles)
        for name in names:
            if not (self.host_dir(name) / "host.json").is_file():
                self.provision(name, roles[name])
            self.boot(name)
        self.write_known_hosts()
        for name in names:
            self.wait_ready(name)
        self.write_inventory()

    def start(self, name: str) -> None:
        self.require(name)
        self.boot(name)
        self.wait_ready(name)

    def stop(self, name: str, timeout: float = 60) -> None:
        pid = self.pid(name)
        if not pid:
            self.remove_cgroups(name)
            return
        # SIGTERM makes nspawn ask the container's systemd for a clean poweroff.
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid(name):
            time.sleep(0.5)
        if self.pid(name):
            log(f"{name}: no clean poweroff in {timeout}s, killing nspawn PID {pid}")
            os.killpg(pid, signal.SIGKILL)
            while self.pid(name):
                time.sleep(0.2)
        (self.host_dir(name) / "nspawn.pid").unlink(missing_ok=True)
        self.remove_cgroups(name)
        log(f"{name}: stopped")

    def destroy(self, names: list[str]) -> None:
        """Remove the named hosts (default: all); with none left, also the key,
        inventory and known_hosts this tool wrote. Nothing else in the state
        directory is touched; it is removed only if that leaves it empty."""
        for name in names or self.names():
            self.stop(name)
            self.release_block(name)
            shutil.rmtree(self.host_dir(name), ignore_errors=True)
            log(f"{name}: removed")
        if self.names():
            self.write_known_hosts()
            self.write_inventory()
            return
        for path in (self.key, Path(f"{self.key}.pub"), self.inventory, self.known_hosts, self.model_vars):
            path.unlink(missing_ok=True)
        for folder in (self.hosts_dir, self.model_vars.parent, self.model_vars.parent.parent, self.state):
            try:
                folder.rmdir()
            except OSError:  # absent, or holds files this tool did not write
                pass

    def require(self, name: str) -> None:
        if name not in self.names():
            die(f"no host {name!r} in {self.state} (have: {', '.join(self.names()) or 'none'})")

    def list(self) -> None:
        print(f"{'NAME':<16}{'STATE':<10}{'PID':<9}{'SSH':<7}{'HTTP':<7}{'HTTPS':<7}")
        for name in self.names():
            rec, pid = self.record(name), self.pid(name)
            p = rec["ports"]
            kind = "balancer" if rec.get("role") == "balancer" else "nginx"
            print(f"{name:<16}{'running' if pid else 'stopped':<10}{pid or '-'!s:<9}"
                  f"{p['ssh']:<7}{p[f'torchserve_{kind}_http_port']:<7}{p[f'torchserve_{kind}_https_port']:<7}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path,
                    default=Path(os.environ.get("SANDBOX_STATE_DIR", REPO / ".sandbox/default")))
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("SANDBOX_CACHE_DIR", "/var/cache/torchserve-sandbox")))
    ap.add_argument("--prefix", default=os.environ.get("SANDBOX_PREFIX", "ts-host"),
                    help="host names are PREFIX1..PREFIXN")
    ap.add_argument("--group", default="torchserve_servers",
                    help="inventory group of the hosts (e.g. torchserve_monitoring)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("--count", type=int, default=1, help="servers (PREFIX1..PREFIXN)")
    c.add_argument("--balancers", type=int, default=0, help="balancers in front (PREFIX-lb1..)")
    sub.add_parser("list")
    sub.add_parser("inventory", help="print the inventory path")
    i = sub.add_parser("info", help="print a host's record (name, ports, PID) as JSON")
    i.add_argument("name")
    s = sub.add_parser("shell")
    s.add_argument("name")
    s.add_argument("command", nargs=argparse.REMAINDER)
    for verb in ("stop", "start"):
        sub.add_parser(verb).add_argument("name")
    d = sub.add_parser("destroy")
    d.add_argument("names", nargs="*")
    args = ap.parse_args()

    sb = Sandbox(args.state_dir, args.cache_dir, args.prefix, args.group)
    if args.cmd == "create":
        sb.create(args.count, args.balancers)
    elif args.cmd == "list":
        sb.list()
    elif args.cmd == "inventory":
        print(sb.inventory)
    elif args.cmd == "info":
        sb.require(args.name)
        print(json.dumps({**sb.record(args.name), "pid": sb.pid(args.name),
                          "ssh": sb.ssh_argv(args.name), "inventory": str(sb.inventory)}))
    elif args.cmd == "shell":
        sb.require(args.name)
        os.execvp("ssh", sb.ssh_argv(args.name) + ["-t"] * (not args.command) + args.command)
    elif args.cmd == "stop":
        sb.require(args.name)
        sb.stop(args.name)
    elif args.cmd == "start":
        sb.start(args.name)
    elif args.cmd == "destroy":
        for n in args.names:
            sb.require(n)
        sb.destroy(args.names)


if __name__ == "__main__":
    main()
