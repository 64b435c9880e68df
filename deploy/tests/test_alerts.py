"""The alert rules, checked and unit-tested with the real promtool (Debian's prometheus
package, installed by bootstrap): every alert in deploy/prometheus/alerts.yml fires on a
synthetic series in alerts-test.yml, and both checks fail on a broken input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.environ["RECSYS_KUBERNETES_VALIDATE"])  # for yaml

import yaml  # noqa: E402

PROMETHEUS = Path(__file__).resolve().parents[1] / "prometheus"
PROMTOOL = os.environ["RECSYS_PROMTOOL"]


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True)


def test_rules_are_valid_and_every_alert_fires_in_a_unit_test():
    checked = promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", PROMETHEUS / "alerts-test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((PROMETHEUS / "alerts-test.yml").read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing, f"alerts without a firing test: {alerts - firing}"


def test_both_checks_fail_on_a_broken_input(tmp_path: Path):
    broken_rules = tmp_path / "alerts.yml"
    text = (PROMETHEUS / "alerts.yml").read_text()
    broken_rules.write_text(text.replace("max(recsys_score_psi) > 0.25", "max(recsys_score_psi > 0.25", 1))
    assert promtool("check", "rules", broken_rules).returncode != 0
    # A unit test expecting the wrong label fails.
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path / "alerts.yml")
    wrong = (PROMETHEUS / "alerts-test.yml").read_text().replace("downstream: rank}", "downstream: recall}", 1)
    (tmp_path / "alerts-test.yml").write_text(wrong)
    assert promtool("test", "rules", tmp_path / "alerts-test.yml").returncode != 0
