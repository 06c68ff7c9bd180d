"""A real sandbox host (systemd-nspawn, systemd as PID 1, sshd), deployed once
per session with TLS on by the real playbook, then checked from outside."""
import json
import os
import subprocess

import pytest

from deploy_helpers import FRESH_SANDBOX, HOST, SANDBOX, Host


@pytest.fixture(scope="session")
def deployed_host() -> Host:
    subprocess.run(SANDBOX + ["create", "--count", "1"], check=True, timeout=600)
    try:
        info = json.loads(subprocess.run(SANDBOX + ["info", HOST], check=True, capture_output=True,
                                         text=True).stdout)
        host = Host(HOST, info["ports"], info["ssh"], info["inventory"])
        r = host.playbook()
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        yield host
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(SANDBOX + ["destroy"], timeout=300)


@pytest.fixture(scope="session")
def host_ca(deployed_host: Host, tmp_path_factory) -> str:
    """The host's self-signed certificate, fetched over ssh, to verify TLS with."""
    pem = deployed_host.ssh("cat /etc/nginx/tls/torchserve.crt").stdout
    path = tmp_path_factory.mktemp("tls") / "host.crt"
    path.write_text(pem)
    return str(path)


@pytest.fixture
def fresh_host() -> Host:
    """A bare server no playbook has touched (its own state dir), removed after.
    One kept by KEEP_HOSTS from an earlier run is replaced: it is not fresh."""
    subprocess.run(FRESH_SANDBOX + ["destroy"], check=True, timeout=300)
    subprocess.run(FRESH_SANDBOX + ["create", "--count", "1"], check=True, timeout=600)
    try:
        info = json.loads(subprocess.run(FRESH_SANDBOX + ["info", "pytest-fresh1"], check=True, capture_output=True,
                                         text=True).stdout)
        yield Host("pytest-fresh1", info["ports"], info["ssh"], info["inventory"])
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(FRESH_SANDBOX + ["destroy"], timeout=300)


def pytest_collection_modifyitems(items):
    """Chaos tests kill, restart and reboot the shared host: run them after
    every other test; the fleet (its own hosts, the heaviest load) after them
    (stable order otherwise)."""
    items.sort(key=lambda item: (item.get_closest_marker("fleet") is not None,
                                 item.get_closest_marker("chaos") is not None))
