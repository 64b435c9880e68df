"""Static checks of the Helm chart: a real `helm lint` (Helm's Go library from PyPI)."""

import copy
from pathlib import Path

import pytest

from helm_lint import lint

CHART = Path(__file__).resolve().parents[2] / "helm" / "recsys"
ERROR = 3


def errors(result: dict) -> list:
    return [m for m in result["Messages"] if m["Severity"] >= ERROR]


def test_chart_lints_without_errors():
    result = lint(CHART, {})
    assert result["TotalChartsLinted"] == 1
    assert errors(result) == [], result


def test_broken_template_is_caught(tmp_path):
    # The check is real: a template that dereferences a missing value fails lint.
    broken = tmp_path / "recsys"
    import shutil
    shutil.copytree(CHART, broken)
    with open(broken / "templates" / "services.yaml", "a") as f:
        f.write("\n{{ .Values.missing.field }}\n")
    assert errors(lint(broken, {}))


def test_the_chart_ships_the_documented_rules_file():
    # The chart cannot read outside its directory, so it carries a copy of the rules file
    # that `make run` serves; they must not drift apart.
    shipped = CHART.parents[1] / "deploy" / "rerank" / "rules.toml"
    assert (CHART / "files" / "rules.toml").read_text() == shipped.read_text()


def test_chart_lints_with_mtls_admin_tokens_and_the_canary():
    # Every security template renders: per-service TLS Secrets (cert-manager Certificates),
    # the admin-token Secret mount, exec probes that present a certificate, the admin port.
    values = {
        "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "recsys-ca"}}},
        "admin": {"tokenSecret": "recsys-admin-tokens"},
        "canary": {"enabled": True, "bundleVersion": "v2"},
    }
    assert errors(lint(CHART, values)) == []
    # (Lint mode does not enforce `required`: cert-manager without an issuer is caught by
    # `helm template`, which this Python lint cannot run.)
