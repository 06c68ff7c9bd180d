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


def spec_defaults(options: dict) -> dict:
    """Each option's spec default; a dict or list of dicts with sub-options
    gives its sub-options' defaults instead (compared one level down)."""
    return {name: spec_defaults(opt["options"]) if "options" in opt else opt.get("default")
            for name, opt in options.items()}


def disagreements(specs: dict, values: dict, where: str) -> list[str]:
    out = []
    for name, spec in specs.items():
        if isinstance(spec, dict):
            continue  # sub-options: compared against their own source of defaults
        if name in values and values[name] != spec:
            out.append(f"{where}{name}: defaults {values[name]!r} != specs {spec!r}")
    return out


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_defaults_equal_role_defaults(role):
    """The specs document the defaults the role really uses: every value
    equal (Jinja defaults as the same template string), and the model-entry
    sub-option defaults equal the ones the role fills in (vars/main.yml)."""
    defaults = yaml.safe_load((REPO / f"roles/{role}/defaults/main.yml").read_text())
    specs = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"]
    wrong = []
    for entry, spec in specs.items():
        options = spec.get("options", {})
        wrong += disagreements(spec_defaults(options), defaults, f"{entry}: ")
        missing = [n for n, o in options.items() if "options" not in o and "default" not in o and n in defaults]
        wrong += [f"{entry}: {n}: no default in the specs" for n in missing]
        for name, opt in options.items():
            if "options" not in opt:
                continue
            assert name in SUBOPTION_DEFAULTS, f"{name}: where does the role fill in its sub-option defaults?"
            role_vars = yaml.safe_load((REPO / f"roles/{role}/vars/main.yml").read_text())
            filled = role_vars[SUBOPTION_DEFAULTS[name]]
            sub = {k: v for k, v in spec_defaults(opt["options"]).items() if v is not None}
            assert sub == filled, f"{entry}: {name} sub-option defaults: specs {sub} != vars/main.yml {filled}"
    assert not wrong, "\n".join(wrong)
