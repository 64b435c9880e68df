"""The Helm chart, rendered and validated by the real tools (`deploy/local/bootstrap.sh`
installs them; their paths are in target/recsys.env): Helm 3's `helm lint --strict` and
`helm template` for every value set in helm/recsys/ci/ (the chart-testing convention),
every rendered manifest through `kubernetes-validate --strict`, every GRPCRoute against
the Gateway API CRD's schema, and each of these checks shown to fail on a broken input."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KUBERNETES_VALIDATE = os.environ["RECSYS_KUBERNETES_VALIDATE"]
sys.path.insert(0, KUBERNETES_VALIDATE)  # yaml and jsonschema come with it

import jsonschema  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "recsys"
HELM = os.environ["RECSYS_HELM"]
KUBERNETES_VERSION = "1.36.0"
VALUE_SETS = sorted((CHART / "ci").glob("*-values.yaml"))
GRPCROUTE_CRD = Path(__file__).parent / "crds" / "gateway.networking.k8s.io_grpcroutes.yaml"

# What each value set must render, beyond what every set renders.
EXPECTED_KINDS = {
    "default": {"Deployment": 4, "StatefulSet": 1, "Service": 5, "PodDisruptionBudget": 5, "ConfigMap": 2},
    "canary": {"Deployment": 5, "Service": 6, "GRPCRoute": 1},
    "redis": {"StatefulSet": 2, "Service": 6},
    "autoscaling": {"HorizontalPodAutoscaler": 4, "NetworkPolicy": 5, "ServiceMonitor": 1},
    "tls": {"Certificate": 5},
}


def helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *map(str, args)], capture_output=True, text=True, check=check)


def render(values: Path | None = None, *sets: str, chart: Path = CHART) -> str:
    args = ["template", "recsys", chart, "--namespace", "recsys"]
    if values is not None:
        args += ["-f", values]
    for assignment in sets:
        args += ["--set", assignment]
    return helm(*args).stdout


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kubernetes_validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, str(manifest)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": KUBERNETES_VALIDATE},
    )


def grpcroute_errors(route: dict) -> list[str]:
    crd = yaml.safe_load(GRPCROUTE_CRD.read_text())
    version = route["apiVersion"].split("/")[1]
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    return [error.message for error in jsonschema.Draft202012Validator(schema).iter_errors(route)]


def value_set_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


@pytest.mark.parametrize("values", VALUE_SETS, ids=value_set_id)
def test_value_set_lints_renders_and_validates(values: Path, tmp_path: Path):
    lint = helm("lint", "--strict", CHART, "-f", values, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    text = render(values)
    validated = kubernetes_validate(text, tmp_path)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    docs = documents(text)
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
        if doc["kind"] == "GRPCRoute":
            assert grpcroute_errors(doc) == []
    for kind, count in EXPECTED_KINDS[value_set_id(values)].items():
        assert kinds.get(kind) == count, f"{kind}: {kinds}"


def test_every_value_set_is_covered():
    assert {value_set_id(path) for path in VALUE_SETS} == set(EXPECTED_KINDS)


def test_the_canary_route_splits_by_weight_and_pins_by_header():
    route = next(doc for doc in documents(render(CHART / "ci" / "canary-values.yaml")) if doc["kind"] == "GRPCRoute")
    pinned, split = route["spec"]["rules"]
    assert pinned["matches"][0]["headers"] == [{"name": "x-recsys-track", "value": "canary"}]
    assert [(ref["name"], ref["weight"]) for ref in split["backendRefs"]] == [
        ("recsys-recsys-orchestrator", 90), ("recsys-canary-recsys-orchestrator", 10)]


def test_each_check_fails_on_a_broken_input(tmp_path: Path):
    # values.schema.json: a value out of range, a misspelled key.
    for bad in ["canary.sharePercent=150", "cannary.enabled=true", "feature.store.backend=postgres"]:
        assert helm("template", "recsys", CHART, "--set", bad, check=False).returncode != 0, bad
        assert helm("lint", CHART, "--set", bad, check=False).returncode != 0, bad
    # A required value the templates enforce.
    missing = helm("template", "recsys", CHART, "-f", CHART / "ci" / "tls-values.yaml",
                   "--set", "tls.certManager.issuerRef.name=", check=False)
    assert missing.returncode != 0 and "issuerRef.name is required" in missing.stderr
    # helm lint on a chart whose template dereferences a missing value.
    broken = tmp_path / "recsys"
    shutil.copytree(CHART, broken)
    with open(broken / "templates" / "services.yaml", "a") as template:
        template.write("\n{{ .Values.missing.field }}\n")
    assert helm("lint", broken, check=False).returncode != 0
    # kubernetes-validate --strict: a misspelled field in an otherwise valid manifest.
    text = render(CHART / "ci" / "default-values.yaml")
    misspelled = text.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:", 1)
    assert kubernetes_validate(misspelled, tmp_path).returncode != 0
    # The GRPCRoute schema: a negative weight and a parentRef without a name.
    route = next(doc for doc in documents(render(CHART / "ci" / "canary-values.yaml")) if doc["kind"] == "GRPCRoute")
    negative = copy.deepcopy(route)
    negative["spec"]["rules"][1]["backendRefs"][0]["weight"] = -5
    assert grpcroute_errors(negative)
    nameless = copy.deepcopy(route)
    del nameless["spec"]["parentRefs"][0]["name"]
    assert grpcroute_errors(nameless)


def test_the_chart_ships_the_documented_rules_file():
    # The chart cannot read outside its directory, so it carries a copy of the rules file
    # that `make run` serves; they must not drift apart.
    shipped = ROOT / "deploy" / "rerank" / "rules.toml"
    assert (CHART / "files" / "rules.toml").read_text() == shipped.read_text()
