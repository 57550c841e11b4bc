"""deploy/k8s/: every manifest validates against the Kubernetes 1.37 schemas (kubernetes-validate, offline),
the GPU overlay too once its patch is applied, and the pieces agree with each other and with the app."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import prometheus_client
import pytest
import yaml

import app.metrics  # noqa: F401  (registers the app's metrics with prometheus_client)

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def base_resources() -> dict[str, dict[str, Any]]:
    """The resources kustomization.yaml lists, by kind."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    resources = [load_yaml(K8S_DIR / name) for name in kustomization["resources"]]
    return {resource["kind"]: resource for resource in resources}


def strategic_merge(base: Any, patch: Any) -> Any:
    """The subset of kubectl's strategic merge that our patch uses: maps merge, lists of named items (containers,
    env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                  for i in base + patch):
        by_name = {item["name"]: item for item in base}
        merged_items = [strategic_merge(by_name[item["name"]], item) if item["name"] in by_name else item
                        for item in patch]
        patched_names = {item["name"] for item in patch}
        return [item for item in base if item["name"] not in patched_names] + merged_items
    return copy.deepcopy(patch)


def gpu_deployment() -> dict[str, Any]:
    overlay = load_yaml(K8S_DIR / "gpu" / "kustomization.yaml")
    assert overlay["resources"] == ["../"], "the GPU overlay builds on the base manifests"
    (patch_ref,) = overlay["patches"]
    patch = load_yaml(K8S_DIR / "gpu" / patch_ref["path"])
    return strategic_merge(base_resources()["Deployment"], patch)


def api_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S_DIR / "kustomization.yaml")["resources"])
    present = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml",
                                                                 "prometheus-adapter-values.yaml"}
    assert listed == present


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
def test_base_manifest_validates_against_kubernetes_schema(kind: str) -> None:
    resource = base_resources()[kind]
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_gpu_deployment_validates_and_reserves_one_gpu() -> None:
    deployment = gpu_deployment()
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container = api_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["DEVICE"] == "cuda"
    # The patch adds to the base; it must not lose the probes or the rest of the environment.
    base = api_container(base_resources()["Deployment"])
    assert env_of(base).items() <= env_of(container).items()
    assert container["readinessProbe"] == base["readinessProbe"]


def test_a_broken_manifest_is_rejected() -> None:
    """The validator really checks: a probe with a misspelt field must fail."""
    deployment = copy.deepcopy(base_resources()["Deployment"])
    api_container(deployment)["readinessProbe"]["httpGett"] = {"path": "/readyz", "port": "http"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_startup_and_readiness_on_readyz_liveness_on_healthz() -> None:
    container = api_container(base_resources()["Deployment"])
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "a model load may take minutes"


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    deployment = base_resources()["Deployment"]
    container = api_container(deployment)
    (pre_stop_sleep,) = [int(arg) for arg in container["lifecycle"]["preStop"]["exec"]["command"][1:]]
    drain = float(env_of(container)["DRAIN_GRACE_S"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop_sleep + drain + 10


def test_service_pdb_and_hpa_point_at_the_deployment() -> None:
    resources = base_resources()
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert resources["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port_names = {port["name"] for port in api_container(deployment)["ports"]}
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] in port_names
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def hpa_queue_metric() -> str:
    metrics = base_resources()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods", "Resource"], "queue metric first, CPU as the fallback"
    assert metrics[1]["resource"]["name"] == "cpu"
    return metrics[0]["pods"]["metric"]["name"]


def test_prometheus_adapter_publishes_the_metric_the_hpa_uses() -> None:
    metric = hpa_queue_metric()
    (rule,) = load_yaml(K8S_DIR / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert re.match(rf"^{metric}\{{", rule["seriesQuery"])
    assert rule["name"]["as"] == metric
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_hpa_scales_on_a_gauge_the_app_exports() -> None:
    metric = hpa_queue_metric()
    assert f"# TYPE {metric} gauge" in prometheus_client.generate_latest().decode()
