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


# Options with sub-options: the vars/main.yml dict the role combines each entry with.
SUBOPTION_DEFAULTS = {"torchserve_models": "_torchserve_model_defaults"}


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_defaults_equal_role_defaults(role):
    """The specs document the defaults the role really uses: every value
    equal (Jinja defaults as the same template string), and the sub-option
    defaults of a list of dicts equal the ones the role fills into each
    entry (vars/main.yml)."""
    defaults = yaml.safe_load((REPO / f"roles/{role}/defaults/main.yml").read_text())
    role_vars = yaml.safe_load((REPO / f"roles/{role}/vars/main.yml").read_text()) if (
        REPO / f"roles/{role}/vars/main.yml").exists() else {}
    specs = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"]
    wrong = []
    for entry, spec in specs.items():
        for name, opt in spec.get("options", {}).items():
            if "default" not in opt:
                wrong.append(f"{entry}: {name}: no default in the specs (defaults: {defaults.get(name)!r})")
            elif opt["default"] != defaults.get(name):
                wrong.append(f"{entry}: {name}: defaults {defaults.get(name)!r} != specs {opt['default']!r}")
            if "options" in opt:
                filled = role_vars.get(SUBOPTION_DEFAULTS.get(name, ""))
                sub = {k: o["default"] for k, o in opt["options"].items() if "default" in o}
                if sub != filled:
                    wrong.append(f"{entry}: {name} sub-option defaults: specs {sub} != vars/main.yml {filled}")
    assert not wrong, "\n".join(wrong)
