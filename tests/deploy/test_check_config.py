"""roles/torchserve/files/check_config.py, the validator config.properties
must pass before it replaces the old one: the file the role rendered on the
deployed host passes, each kind of damage is refused with its own message."""
import subprocess
import sys

import pytest

from deploy_helpers import REPO

pytestmark = pytest.mark.deploy
CHECKER = REPO / "roles/torchserve/files/check_config.py"


def check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.properties"
    path.write_text(text)
    return subprocess.run([sys.executable, str(CHECKER), str(path)], capture_output=True, text=True, timeout=30)


def replace(text: str, key: str, value: str | None) -> str:
    """Set key=value (None removes the line)."""
    lines = [line for line in text.splitlines() if not line.startswith(key + "=")]
    return "\n".join(lines + ([f"{key}={value}"] if value is not None else [])) + "\n"


@pytest.fixture(scope="module")
def rendered(deployed_host) -> str:
    return deployed_host.ssh("cat /etc/torchserve/config.properties").stdout


def test_the_rendered_config_passes(rendered, tmp_path):
    r = check(tmp_path, rendered)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.parametrize("change, message", [
    (lambda t: replace(t, "model_store", None), "missing model_store"),
    (lambda t: replace(t, "models", None), "missing models"),
    (lambda t: t + "job_queue_size=7\n", "job_queue_size set twice"),
    (lambda t: t + "this line has no separator\n", "not key=value"),
    (lambda t: replace(t, "inference_address", "0.0.0.0:8080"), "inference_address: not an address"),
    (lambda t: replace(t, "management_address", "unix:"), "management_address: not an address"),
    (lambda t: replace(t, "grpc_inference_port", "70000"), "grpc_inference_port: not a port"),
    (lambda t: replace(t, "grpc_management_port", "seven"), "grpc_management_port: not a port"),
    (lambda t: replace(t, "grpc_management_port", "7070"), "grpc ports are equal (7070)"),
    (lambda t: replace(t, "models", '{"fmnist": {'), "models: not JSON"),
    (lambda t: replace(t, "load_models", "fmnist.mar,other.mar"), "load_models names 'other'"),
], ids=["no-model-store", "no-models", "duplicate-key", "no-separator", "tcp-inference", "empty-unix",
        "port-range", "port-text", "equal-grpc-ports", "models-json", "unknown-model"])
def test_a_damaged_config_is_refused(rendered, tmp_path, change, message):
    r = check(tmp_path, change(rendered))
    assert r.returncode == 1, r.stderr
    assert message in r.stderr and r.stderr.startswith("config.properties: "), r.stderr
