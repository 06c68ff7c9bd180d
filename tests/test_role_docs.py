"""Role READMEs and the project README's variable tables are generated from
meta/argument_specs.yml (tools/role_docs.py) and must be current; a changed
spec makes them stale."""
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


@pytest.mark.parametrize("readme_path", ["roles/{role}/README.md", "README.md"])
@pytest.mark.parametrize("role", ROLES)
def test_readmes_list_every_variable(role, readme_path):
    readme = (REPO / readme_path.format(role=role)).read_text()
    options = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert [name for name in options if f"| `{name}` |" not in readme] == []


def test_a_changed_spec_makes_the_readme_stale(tmp_path):
    roles = shutil.copytree(REPO / "roles", tmp_path / "roles", symlinks=True)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    spec = roles / "torchserve_java/meta/argument_specs.yml"
    spec.write_text(spec.read_text().replace("default: 17", "default: 21"))
    r = subprocess.run(TOOL + ["--check", "--roles-dir", str(roles)], capture_output=True, text=True)
    assert r.returncode == 1 and "roles/torchserve_java/README.md" in r.stderr, r.stderr
    assert f"{tmp_path}/README.md" in r.stderr, "the project README's tables are stale too"
    assert "torchserve_nginx/README.md" not in r.stderr
    fixed = subprocess.run(TOOL + ["--roles-dir", str(roles)], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr
    for readme in (roles / "torchserve_java/README.md", tmp_path / "README.md"):
        assert "| `torchserve_java_min_major_version` | int | `21` |" in readme.read_text()
