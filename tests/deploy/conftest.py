"""A real sandbox host (systemd-nspawn, systemd as PID 1, sshd), deployed once
per session with TLS on by the real playbook, then checked from outside."""

import pytest

from deploy_helpers import FRESH_SANDBOX, HOST, SANDBOX, Host, sandbox_host


@pytest.fixture(scope="session")
def deployed_host() -> Host:
    with sandbox_host(SANDBOX, HOST) as host:
        yield host


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
    with sandbox_host(FRESH_SANDBOX, "pytest-fresh1", deploy=False, fresh=True) as host:
        yield host


def pytest_collection_modifyitems(items):
    """Chaos tests kill, restart and reboot the shared host: run them after
    every other test; the fleet (its own hosts, the heaviest load) after them
    (stable order otherwise)."""
    items.sort(key=lambda item: (item.get_closest_marker("fleet") is not None,
                                 item.get_closest_marker("chaos") is not None))
