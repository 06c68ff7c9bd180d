"""Static checks of the Ansible code: yamllint, ansible-lint (production
profile), syntax check, and role defaults mirrored one to one by specs."""
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True)


def test_yamllint_clean():
    r = run("yamllint", "--strict", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ansible_lint_production_profile():
    r = run("ansible-lint", "--profile", "production")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_playbook_syntax():
    r = run("ansible-playbook", "--syntax-check", "-i", "inventory/example/hosts.yml", "playbooks/deploy.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_mirror_defaults(role):
    defaults = yaml.safe_load((REPO / f"roles/{role}/defaults/main.yml").read_text())
    specs = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) == set(options), (
        f"only in defaults: {set(defaults) - set(options)}; only in specs: {set(options) - set(defaults)}")
    assert all(name.startswith(f"{role}_") for name in defaults), "role variables carry the role prefix"
    assert all(opt.get("description") for opt in options.values()), "every option is described"
