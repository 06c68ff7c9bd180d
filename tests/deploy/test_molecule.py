"""The molecule default scenario: create a sandbox host, converge with
playbooks/deploy.yml, idempotence (second run changed=0), verify from
outside (incl. a cold boot), destroy."""
import os
import subprocess

import pytest

from deploy_helpers import REPO

pytestmark = pytest.mark.deploy


def test_molecule_default_scenario():
    r = subprocess.run(["molecule", "test", "-s", "default"], cwd=REPO, capture_output=True, text=True,
                       timeout=2400, env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "PY_COLORS": "0"})
    assert r.returncode == 0, (r.stdout[-8000:] + "\n" + r.stderr[-4000:])
