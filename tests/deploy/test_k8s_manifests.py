"""deploy/k8s/: every manifest validates against the Kubernetes 1.37 schemas (kubernetes-validate, offline),
the GPU overlay too once its patch is applied, and the pieces agree with each other and with the app."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import prometheus_client
import pytest
import yaml

import app.metrics  # noqa: F401  (registers the app's metrics with prometheus_client)
from app.security import PROTECTED_PATHS, parse_keys_file
from app.settings import Settings
from deploy.nginx_config import compose_environment

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37"


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def all_resources() -> list[dict[str, Any]]:
    """The resources kustomization.yaml lists."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    return [load_yaml(K8S_DIR / name) for name in kustomization["resources"]]


def base_resources(name: str = "siamcam") -> dict[str, dict[str, Any]]:
    """The resources named `name` (the service's own, or its Redis: `siamcam-redis`), by kind."""
    return {resource["kind"]: resource for resource in all_resources() if resource["metadata"]["name"] == name}


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


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    """Literal values; None for those taken from elsewhere (valueFrom: a Secret)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S_DIR / "kustomization.yaml")["resources"])
    present = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml",
                                                                 "prometheus-adapter-values.yaml"}
    assert listed == present


# (name, kind) of every base resource, each validated by the test below.
BASE_RESOURCES = [
    ("siamcam", "Deployment"), ("siamcam", "Service"), ("siamcam", "PodDisruptionBudget"),
    ("siamcam", "HorizontalPodAutoscaler"), ("siamcam", "Ingress"),
    ("siamcam-redis", "Deployment"), ("siamcam-redis", "Service"), ("siamcam-redis", "NetworkPolicy"),
]


@pytest.mark.parametrize(("name", "kind"), BASE_RESOURCES)
def test_base_manifest_validates_against_kubernetes_schema(name: str, kind: str) -> None:
    resource = base_resources(name)[kind]
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_every_listed_manifest_is_validated() -> None:
    listed = {(resource["metadata"]["name"], resource["kind"]) for resource in all_resources()}
    assert listed == set(BASE_RESOURCES)


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


def test_api_keys_come_from_a_generated_secret_that_holds_no_key() -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    (generator,) = kustomization["secretGenerator"]
    (file_name,) = generator["files"]
    lines = [line for line in (K8S_DIR / file_name).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+:[0-9a-f]{64}", line) for line in lines), \
        "only `id:sha256` lines may be committed, never a key"
    assert len(parse_keys_file("\n".join(lines), file_name)) == len(lines)
    deployment = base_resources()["Deployment"]
    container = api_container(deployment)
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [mount for mount in container["volumeMounts"]
                if volumes[mount["name"]].get("secret", {}).get("secretName") == generator["name"]]
    assert mount["readOnly"] is True
    # Readable by the app's user: through its group when the file is not world-readable.
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    keys_volume = volumes[mount["name"]]
    if not keys_volume["secret"].get("defaultMode", 0o644) & 0o004:
        assert keys_volume["secret"]["defaultMode"] & 0o040 and pod_security["fsGroup"] == pod_security["runAsGroup"]
    assert env_of(container)["API_KEYS_FILE"] == f"{mount['mountPath']}/{file_name}"
    (token,) = [item for item in container["env"] if item["name"] == "METRICS_TOKEN"]
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["optional"] is True


def test_ingress_limits_match_the_compose_balancer_and_sit_above_the_app() -> None:
    annotations = base_resources()["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    rps, multiplier = int(annotations[prefix + "limit-rps"]), int(annotations[prefix + "limit-burst-multiplier"])
    connections = int(annotations[prefix + "limit-connections"])
    lb = compose_environment("lb", environ={})
    assert f"{rps}r/s" == lb["LB_RATE_PER_CLIENT"]
    assert rps * multiplier == int(lb["LB_BURST_PER_CLIENT"])
    assert connections == int(lb["LB_CONNECTIONS_PER_CLIENT"])
    assert annotations[prefix + "proxy-body-size"] == lb["CLIENT_MAX_BODY_SIZE"]
    app_env = env_of(api_container(base_resources()["Deployment"]))
    compose_api = compose_environment("api", environ={})
    for name in ("RATE_LIMIT_PER_S", "RATE_LIMIT_BURST"):
        assert app_env[name] == compose_api[name], f"{name}: Kubernetes and compose differ"
    assert rps >= float(app_env["RATE_LIMIT_PER_S"]) and rps * multiplier >= int(app_env["RATE_LIMIT_BURST"])
    assert app_env["FORWARDED_ALLOW_IPS"] not in ("*", None), "forwarded addresses trusted from anyone"


def test_ingress_routes_the_public_paths_but_not_metrics() -> None:
    (rule,) = base_resources()["Ingress"]["spec"]["rules"]
    paths = {item["path"]: item for item in rule["http"]["paths"]}
    service = base_resources()["Service"]
    for path in (*PROTECTED_PATHS, "/", "/healthz", "/readyz", "/static", "/docs", "/redoc"):
        assert path in paths, path
        backend = paths[path]["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] == service["spec"]["ports"][0]["name"]
    assert all(not (item["path"] == "/" and item["pathType"] == "Prefix") and not item["path"].startswith("/metrics")
               for item in paths.values()), "/metrics is scraped per pod, never through the balancer"


def test_every_pod_counts_rate_limits_in_the_one_redis() -> None:
    redis = base_resources("siamcam-redis")
    deployment, service = redis["Deployment"], redis["Service"]
    assert deployment["spec"]["replicas"] == 1, "two Redis would each count alone"
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].split(":")[0] == "redis", "the official image"
    args = container["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no", "no persistence"
    assert container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    # The Service reaches the Redis pods, on the port the pods name.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # The app's pods point at that Service, with a store the app accepts.
    storage = env_of(api_container(base_resources()["Deployment"]))["RATE_LIMIT_STORAGE"]
    parsed = urlsplit(storage)
    assert (parsed.scheme, parsed.hostname, parsed.port) == ("redis", service["metadata"]["name"], port["port"])
    assert Settings(_env_file=None, rate_limit_storage=storage).rate_limit_storage == storage
    # Only the app's pods may reach the password-less Redis; the app's own selectors do not catch Redis pods.
    policy = redis["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    app_pods = base_resources()["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= app_pods.items()
    for selector in (base_resources()["Service"]["spec"]["selector"],
                     base_resources()["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= pod_labels.items()
