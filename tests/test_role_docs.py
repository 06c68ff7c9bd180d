"""Role READMEs: the variables section is generated from meta/argument_specs.yml
(tools/role_docs.py) and must be current; a changed spec makes it stale."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(REPO / "tools/role_docs.py")]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if (p / "meta/argument_specs.yml").is_file())


def test_role_readmes_are_current():
    r = subprocess.run(TOOL + ["--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("role", ROLES)
def test_role_readme_lists_every_variable(role):
    readme = (REPO / f"roles/{role}/README.md").read_text()
    options = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert [name for name in options if f"| `{name}` |" not in readme] == []


def test_a_changed_spec_makes_the_readme_stale(tmp_path):
    roles = shutil.copytree(REPO / "roles", tmp_path / "roles", symlinks=True)
    spec = roles / "java/meta/argument_specs.yml"
    spec.write_text(spec.read_text().replace("default: 17", "default: 21"))
    r = subprocess.run(TOOL + ["--check", "--roles-dir", str(roles)], capture_output=True, text=True)
    assert r.returncode == 1 and "roles/java/README.md" in r.stderr, r.stderr
    assert "nginx/README.md" not in r.stderr
    fixed = subprocess.run(TOOL + ["--roles-dir", str(roles)], capture_output=True, text=True)
    assert fixed.returncode == 0 and "| `java_min_major_version` | int | `21` |" in (roles / "java/README.md").read_text()
