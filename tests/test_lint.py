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


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_defaults_equal_role_defaults(role):
    """The specs document the defaults the role really uses: every value
    equal (Jinja defaults as the same template string)."""
    defaults = yaml.safe_load((REPO / f"roles/{role}/defaults/main.yml").read_text())
    specs = yaml.safe_load((REPO / f"roles/{role}/meta/argument_specs.yml").read_text())["argument_specs"]
    wrong = []
    for entry, spec in specs.items():
        for name, opt in spec.get("options", {}).items():
            if "default" not in opt:
                wrong.append(f"{entry}: {name}: no default in the specs (defaults: {defaults.get(name)!r})")
            elif opt["default"] != defaults.get(name):
                wrong.append(f"{entry}: {name}: defaults {defaults.get(name)!r} != specs {opt['default']!r}")
    assert not wrong, "\n".join(wrong)


def test_model_entry_gets_the_specs_sub_option_defaults(tmp_path):
    """A torchserve_models entry is filled with the sub-option defaults of the
    argument specs (their only place), as the role's tasks see it."""
    play = tmp_path / "fill.yml"
    play.write_text(f"""---
- name: Fill a minimal model entry as the torchserve role does
  hosts: localhost
  connection: local
  gather_facts: false
  vars:
    role_path: {REPO}/roles/torchserve
  tasks:
    - name: Load the role's defaults and internal variables
      ansible.builtin.include_vars:
        file: "{{{{ item }}}}"
      loop: [{REPO}/roles/torchserve/defaults/main.yml, {REPO}/roles/torchserve/vars/main.yml]
    - name: Show the filled entry
      ansible.builtin.copy:
        content: "{{{{ ([_torchserve_model_defaults] | product([{{'name': 'm', 'mar': 'm.mar', 'workers': 3}}])
                     | map('ansible.builtin.combine') | first) | to_json }}}}"
        dest: {tmp_path}/filled.json
        mode: "0644"
""")
    r = run("ansible-playbook", str(play))
    assert r.returncode == 0, r.stdout[-3000:]
    filled = yaml.safe_load((tmp_path / "filled.json").read_text())
    spec = yaml.safe_load((REPO / "roles/torchserve/meta/argument_specs.yml").read_text())
    sub = spec["argument_specs"]["main"]["options"]["torchserve_models"]["options"]
    expected = {k: o["default"] for k, o in sub.items() if "default" in o}
    assert expected and filled == {**expected, "name": "m", "mar": "m.mar", "workers": 3}, filled
