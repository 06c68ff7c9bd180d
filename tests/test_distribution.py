"""Each role's preflight refuses a distribution or release it has no data
for, by name, before any change; Debian 12 passes. The facts are faked (no
host needed): a local play whose ansible_facts come from extra vars."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_MODEL = yaml.safe_load((REPO / "playbooks/vars/fmnist.yml").read_text())
ROLES = ["torchserve_java", "torchserve", "torchserve_nginx"]


# The playbook's pre_tasks run each role's preflight.yml; a user's play applies the role whole.
CALLS = {
    "preflight": """  tasks:
    - name: Run the role's preflight
      ansible.builtin.include_role:
        name: {role}
        tasks_from: preflight.yml
""",
    "role": """  roles:
    - role: {role}
""",
}


def preflight(role: str, facts: dict, tmp_path: Path, call: str = "preflight",
              extra_vars: dict | None = None) -> subprocess.CompletedProcess:
    play = tmp_path / "preflight.yml"
    play.write_text("""---
- name: Preflight with faked facts
  hosts: localhost
  connection: local
  gather_facts: false
""" + CALLS[call].format(role=role))
    extra = tmp_path / "facts.json"
    extra.write_text(json.dumps({"ansible_facts": facts, "ansible_python_interpreter": sys.executable,
                                 "torchserve_model_src_root": str(REPO), **EXAMPLE_MODEL, **(extra_vars or {})}))
    return subprocess.run([str(Path(sys.executable).with_name("ansible-playbook")), "-i", "localhost,",
                           str(play), "-e", f"@{extra}"], cwd=REPO, capture_output=True, text=True, timeout=300)


BASE = {"os_family": "Debian", "service_mgr": "systemd", "fqdn": "test.example", "tcp_listen": []}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("distribution,release", [("Ubuntu", "24"), ("Debian", "13"), ("Debian", "11")])
def test_preflight_refuses_unsupported_release_by_name(role, distribution, release, call, tmp_path):
    r = preflight(role, {**BASE, "distribution": distribution, "distribution_major_version": release}, tmp_path, call)
    assert r.returncode != 0
    assert f"{role} role: {distribution} {release} is not supported (supported: Debian 12)" in r.stdout, r.stdout[-3000:]
    assert f"roles/{role}/vars/{distribution}-{release}.yml" in r.stdout


@pytest.mark.parametrize("role", ["torchserve_java", "torchserve"])
def test_preflight_accepts_debian_12_and_loads_its_data(role, tmp_path):
    r = preflight(role, {**BASE, "distribution": "Debian", "distribution_major_version": "12"}, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Load the distribution's data" in r.stdout and "is not supported" not in r.stdout


def test_preflight_refuses_a_zero_batch_delay(tmp_path):
    """TorchServe 0.12 reads maxBatchDelay 0 as unset and waits its default 100 ms."""
    model = {"name": "m", "mar": "files/m.mar", "max_batch_delay": 0}
    r = preflight("torchserve", {**BASE, "distribution": "Debian", "distribution_major_version": "12"}, tmp_path,
                  extra_vars={"torchserve_models": [model]})
    assert r.returncode != 0
    assert "model m is not valid" in r.stdout and "max_batch_delay >= 1" in r.stdout, r.stdout[-3000:]


def test_preflight_asks_for_a_model_when_none_is_given(tmp_path):
    """The role ships no model: an empty list is refused before any change, saying what to give."""
    r = preflight("torchserve", {**BASE, "distribution": "Debian", "distribution_major_version": "12"}, tmp_path,
                  extra_vars={"torchserve_models": []})
    assert r.returncode != 0
    assert "torchserve_models is empty: give at least one model" in r.stdout, r.stdout[-3000:]
