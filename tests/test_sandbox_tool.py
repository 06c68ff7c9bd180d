"""sandbox/hosts.py without booting anything: `destroy` removes only what the
tool wrote, and the inventory and known_hosts it writes pin nginx to loopback
and each host's own key. (Booting and ssh are covered by tests/deploy.)"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "sandbox/hosts.py"
spec = importlib.util.spec_from_file_location("sandbox_hosts", TOOL)
hosts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hosts)


def fake_host(sb, name: str, block: int) -> str:
    """A provisioned, powered-off host as the tool records it (no rootfs copy)."""
    ssh_dir = sb.host_dir(name) / "rootfs/etc/ssh"
    ssh_dir.mkdir(parents=True)
    key = f"AAAAC3NzaC1lZDI1NTE5AAAA{name}"
    (ssh_dir / "ssh_host_ed25519_key.pub").write_text(f"ssh-ed25519 {key} root@{name}\n")
    ports = {k: hosts.BLOCK_BASE + block * 100 + off for k, off in hosts.PORT_OFFSETS.items()}
    (sb.host_dir(name) / "host.json").write_text(json.dumps({"name": name, "block": block, "ports": ports}))
    (sb.claims).mkdir(parents=True, exist_ok=True)
    (sb.claims / str(block)).write_text(f"{sb.host_dir(name)}\n")
    return key


@pytest.fixture
def sandbox(tmp_path):
    sb = hosts.Sandbox(tmp_path / "state", tmp_path / "cache", "t-host")
    sb.state.mkdir()
    for tool_file in (sb.key, Path(f"{sb.key}.pub")):
        tool_file.write_text("key\n")
    return sb


def run_tool(sb, *args):
    return subprocess.run([sys.executable, str(TOOL), "--state-dir", str(sb.state), "--cache-dir", str(sb.cache),
                           *args], capture_output=True, text=True, timeout=60)


def test_destroy_keeps_files_it_did_not_write(sandbox):
    fake_host(sandbox, "t-host1", 301)
    sandbox.write_inventory()
    sandbox.write_known_hosts()
    (sandbox.state / "notes.txt").write_text("mine\n")
    (sandbox.state / "hosts/README").write_text("mine too\n")
    r = run_tool(sandbox, "destroy")
    assert r.returncode == 0, r.stderr
    left = sorted(str(p.relative_to(sandbox.state)) for p in sandbox.state.rglob("*"))
    assert left == ["hosts", "hosts/README", "notes.txt"]
    assert not (sandbox.claims / "301").exists()


def test_destroy_removes_an_emptied_state_dir(sandbox):
    fake_host(sandbox, "t-host1", 302)
    sandbox.write_inventory()
    sandbox.write_known_hosts()
    r = run_tool(sandbox, "destroy")
    assert r.returncode == 0, r.stderr
    assert not sandbox.state.exists()
    assert sandbox.cache.is_dir()  # the shared cache is never the tool's to remove here


def test_destroying_one_host_keeps_the_other_in_inventory_and_known_hosts(sandbox):
    fake_host(sandbox, "t-host1", 303)
    key2 = fake_host(sandbox, "t-host2", 304)
    r = run_tool(sandbox, "destroy", "t-host1")
    assert r.returncode == 0, r.stderr
    inv = yaml.safe_load(sandbox.inventory.read_text())
    assert list(inv["all"]["children"]["torchserve_servers"]["hosts"]) == ["t-host2"]
    assert sandbox.known_hosts.read_text() == f"[127.0.0.1]:{hosts.BLOCK_BASE + 30422} ssh-ed25519 {key2}\n"
    assert sandbox.key.is_file()


def test_inventory_binds_nginx_to_loopback_and_checks_host_keys(sandbox):
    key = fake_host(sandbox, "t-host1", 305)
    sandbox.write_inventory()
    sandbox.write_known_hosts()
    inv = yaml.safe_load(sandbox.inventory.read_text())["all"]["children"]["torchserve_servers"]
    assert inv["vars"]["torchserve_nginx_listen_addresses"] == ["127.0.0.1"]
    common = inv["vars"]["ansible_ssh_common_args"]
    assert "StrictHostKeyChecking=yes" in common and f"UserKnownHostsFile={sandbox.known_hosts}" in common
    assert "StrictHostKeyChecking=no" not in common and "/dev/null" not in common
    port = inv["hosts"]["t-host1"]["ansible_port"]
    assert sandbox.known_hosts.read_text() == f"[127.0.0.1]:{port} ssh-ed25519 {key}\n"
    argv = sandbox.ssh_argv("t-host1")
    assert "StrictHostKeyChecking=yes" in argv and f"UserKnownHostsFile={sandbox.known_hosts}" in argv


def test_fleet_inventory_has_both_groups_balancer_ports_and_one_worker_per_server(sandbox):
    fake_host(sandbox, "t-host1", 306)
    fake_host(sandbox, "t-host2", 307)
    fake_host(sandbox, "t-host-lb1", 308)
    rec = json.loads((sandbox.host_dir("t-host-lb1") / "host.json").read_text())
    rec["role"] = "balancer"
    rec["ports"] = {k: hosts.BLOCK_BASE + 308 * 100 + off for k, off in hosts.BALANCER_PORT_OFFSETS.items()}
    (sandbox.host_dir("t-host-lb1") / "host.json").write_text(json.dumps(rec))
    sandbox.write_inventory()
    groups = yaml.safe_load(sandbox.inventory.read_text())["all"]["children"]
    assert list(groups["torchserve_servers"]["hosts"]) == ["t-host1", "t-host2"]
    lb = groups["torchserve_balancers"]["hosts"]["t-host-lb1"]
    assert lb["torchserve_balancer_http_port"] == hosts.BLOCK_BASE + 30880
    assert lb["torchserve_balancer_https_port"] == hosts.BLOCK_BASE + 30843
    assert groups["torchserve_balancers"]["vars"]["torchserve_balancer_listen_addresses"] == ["127.0.0.1"]
    assert "StrictHostKeyChecking=yes" in groups["torchserve_balancers"]["vars"]["ansible_ssh_common_args"]
    # A fleet's servers run one worker each; a single server keeps the shared entry.
    assert not sandbox.model_vars.is_symlink()
    models = yaml.safe_load(sandbox.model_vars.read_text())["torchserve_models"]
    assert [m["workers"] for m in models] == [1]
    r = run_tool(sandbox, "destroy", "t-host-lb1")
    assert r.returncode == 0, r.stderr
    assert "torchserve_balancers" not in yaml.safe_load(sandbox.inventory.read_text())["all"]["children"]
    assert sandbox.model_vars.is_symlink() and sandbox.model_vars.resolve() == hosts.MODEL_VARS
