"""The Prometheus rules of the torchserve_monitoring role: `promtool check
rules` and the unit tests with synthetic series (`promtool test rules
tests/monitoring/rules_test.yml`). promtool comes from Debian's prometheus
package (`make promtool` unpacks it into .tools/ without starting a server)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "roles/torchserve_monitoring/files/torchserve_rules.yml"
UNIT_TESTS = REPO / "tests/monitoring/rules_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = shutil.which("promtool") or str(REPO / ".tools/promtool")
    assert os.access(tool, os.X_OK), "promtool not found: run `make promtool` (Debian's prometheus package)"
    return tool


def test_rules_are_valid(promtool):
    r = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_rules_fire_on_synthetic_series(promtool):
    r = subprocess.run([promtool, "test", "rules", UNIT_TESTS.name], cwd=UNIT_TESTS.parent,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_firing_unit_test():
    import yaml
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    assert alerts - fired == set(), "alerts without a test where they fire"
    assert alerts - quiet == set(), "alerts without a test where they stay quiet"
