"""`--check --diff` on a deployed host: runs without errors, predicts no change,
and really changes nothing (same files, same TorchServe process)."""
import pytest

from deploy_helpers import recap

pytestmark = pytest.mark.deploy


def test_check_diff_on_deployed_host_changes_nothing(deployed_host):
    before = deployed_host.state()
    r = deployed_host.playbook("--check", "--diff")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    counts = recap(r.stdout, deployed_host.name)
    assert counts["changed"] == 0 and counts["failed"] == 0, counts
    assert deployed_host.state() == before
