"""Dockerfile, .dockerignore, docker-compose files and the nginx template: checked by reading them, since this
machine has no Docker engine; deploy/proof.py runs the nginx part for real."""

from __future__ import annotations

import ast
import fnmatch
import ipaddress
import re
from pathlib import Path

import pytest
import yaml

from app.security import PROTECTED_PATHS
from app.settings import Settings
from deploy.nginx_config import (
    TEMPLATE_PATH,
    TemplateError,
    compose_environment,
    render,
    render_for_loopback,
    template_placeholders,
    with_upstreams,
)

REPO = Path(__file__).resolve().parents[2]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_dockerfile_is_multi_stage_and_runs_the_service_as_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [args for op, args in instructions if op == "CMD"]
    command = yaml.safe_load(cmd)  # exec form: a JSON list, so that the service is PID 1 and gets SIGTERM
    assert command[:3] == ["python", "-m", "app"]  # app/container.py: fronts and one model owner
    # uvicorn's own workers would each load a copy of the model; --reload is for development
    assert "--workers" not in command and "--reload" not in command
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "/healthz" in healthcheck and "curl" not in healthcheck


def test_dockerfile_bakes_in_the_default_model() -> None:
    copies = [args.split() for op, args in dockerfile_instructions() if op == "COPY"]
    assert ["model_store/flowers/", "/srv/model_store/flowers/"] in copies
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    assert "MODEL_STORE=/srv/model_store" in env and "MODEL_NAME=flowers" in env


def test_dockerfile_copies_every_repository_package_the_service_imports() -> None:
    """A package of ours that app/ imports but the image lacks would fail only when the container starts."""
    imported = set()
    for module in (REPO / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            imported.update(name.split(".")[0] for name in names)
    ours = {name for name in imported if (REPO / name / "__init__.py").is_file() or (REPO / name).is_dir()}
    assert "contract" in ours and "training" not in ours
    copies = [args.split() for op, args in dockerfile_instructions() if op == "COPY"]
    for package in ours:
        assert [f"{package}/", f"/srv/{package}/"] in copies, package


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching pattern wins, `!` re-includes,
    a pattern also covers everything below a matching folder)."""
    ignored = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", ""))
               for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_local_state() -> None:
    sources = [args.split()[0] for op, args in dockerfile_instructions()
               if op == "COPY" and not args.startswith("--from")]
    assert sources, "the Dockerfile copies files from the build context"
    for source in sources:
        assert not dockerignored(source.rstrip("/") + "/x.py" if source.endswith("/") else source), source
    for local in (".venv/bin/python", ".git/HEAD", "runs/x/log.txt", "tests/conftest.py",
                  "app/__pycache__/main.cpython-311.pyc", "model_store/tiny/model.pt"):
        assert dockerignored(local), local


def test_compose_runs_replicas_behind_nginx_with_the_template() -> None:
    services = compose()["services"]
    assert services["api"]["deploy"]["replicas"] == "${REPLICAS:-3}"
    mounts = services["lb"]["volumes"]
    assert "./deploy/nginx/siamcam.conf.template:/etc/nginx/templates/default.conf.template:ro" in mounts
    assert services["lb"]["depends_on"]["api"]["condition"] == "service_healthy"


def test_compose_gives_the_template_every_value_it_needs() -> None:
    placeholders = template_placeholders(TEMPLATE_PATH.read_text())
    assert set(compose_environment(environ={})) == placeholders


def test_gpu_override_reserves_an_nvidia_device() -> None:
    api = compose("docker-compose.gpu.yml")["services"]["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert api["environment"]["DEVICE"] == "cuda"


def test_loopback_rendering_keeps_compose_health_check_parameters() -> None:
    rendered = render_for_loopback([8101, 8102, 8103], 8100)
    servers = re.findall(r"server (\S+) max_fails=(\d+) fail_timeout=(\w+);", rendered)
    assert [address for address, _, _ in servers] == ["127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103"]
    assert "listen 127.0.0.1:8100 default_server;" in rendered
    assert "proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;" in rendered
    assert not template_placeholders(rendered)


def test_rendering_refuses_a_missing_value() -> None:
    with pytest.raises(TemplateError, match="LISTEN_PORT"):
        render("listen ${LISTEN_PORT};", {})
    with pytest.raises(TemplateError, match="one `server"):
        with_upstreams("server a:1; server b:2;", ["127.0.0.1:1"])


def nginx_bytes(size: str) -> int:
    """nginx size syntax: 512, 64k, 21m, 1g."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].isalpha() else int(size)


def seconds(duration: str) -> float:
    """The durations used here: 60s, 2m, 45s (nginx and compose agree on these)."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(duration[:-1]) * units[duration[-1]]


def test_compose_defaults_are_the_app_defaults() -> None:
    """docs/deployment.md states the balancer's limits against the app's defaults: compose must not drift from them."""
    defaults = Settings(_env_file=None)
    api = compose_environment("api", environ={})
    assert int(api["MAX_UPLOAD_BYTES"]) == defaults.max_upload_bytes
    assert float(api["REQUEST_TIMEOUT_S"]) == defaults.request_timeout_s
    assert float(api["DRAIN_GRACE_S"]) == defaults.drain_grace_s


def test_balancer_limits_and_stop_grace_fit_the_app() -> None:
    compose_api = compose_environment("api", environ={})
    api = Settings(_env_file=None, max_upload_bytes=compose_api["MAX_UPLOAD_BYTES"],
                   request_timeout_s=compose_api["REQUEST_TIMEOUT_S"], drain_grace_s=compose_api["DRAIN_GRACE_S"])
    lb = compose_environment("lb", environ={})
    # The app, not nginx, answers an oversize upload; nginx cuts off only what the app would refuse anyway.
    assert api.max_body_bytes < nginx_bytes(lb["CLIENT_MAX_BODY_SIZE"]) <= 2 * api.max_body_bytes
    many_images = max(api.max_body_bytes_by_path["/embed"], api.max_body_bytes_by_path["/rank"])
    assert many_images < nginx_bytes(lb["CLIENT_MAX_MANY_IMAGES_BODY_SIZE"]) <= 2 * many_images
    # A healthy replica answers (200, or its own 504) before nginx gives up on it.
    assert seconds(lb["PROXY_TIMEOUT"]) >= api.request_timeout_s + 15
    stop_grace = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]["stop_grace_period"]
    assert seconds(stop_grace.split(":-")[1].rstrip("}")) >= api.drain_grace_s + 10


def rate(value: str) -> float:
    """nginx rates: 50r/s, 600r/m."""
    number, unit = re.fullmatch(r"(\d+)r/([sm])", value).groups()
    return int(number) / (1 if unit == "s" else 60)


def test_balancer_limits_per_client_sit_above_the_apps_per_key_limits() -> None:
    compose_api = compose_environment("api", environ={})
    api = Settings(_env_file=None, rate_limit_per_s=compose_api["RATE_LIMIT_PER_S"],
                   rate_limit_burst=compose_api["RATE_LIMIT_BURST"])
    lb = compose_environment("lb", environ={})
    assert api.rate_limit_per_s is not None and api.rate_limit_burst is not None, "compose turns the app's limits on"
    # One address may carry several keys: the balancer's share per address is at least one key's.
    assert rate(lb["LB_RATE_PER_CLIENT"]) >= api.rate_limit_per_s
    assert int(lb["LB_BURST_PER_CLIENT"]) >= api.rate_limit_burst
    # A client that waits for its answers never has more requests pending than connections: with the burst
    # above that, the balancer's rate only paces such a client (limit_req without nodelay), never refuses it.
    assert int(lb["LB_BURST_PER_CLIENT"]) >= int(lb["LB_CONNECTIONS_PER_CLIENT"])
    rendered = render_for_loopback([8101], 8100)
    assert f"rate={lb['LB_RATE_PER_CLIENT']};" in rendered
    # Ends at the burst: no `nodelay`.
    assert f"limit_req zone=siamcam_requests burst={lb['LB_BURST_PER_CLIENT']};" in rendered
    assert f"limit_conn siamcam_connections {lb['LB_CONNECTIONS_PER_CLIENT']};" in rendered
    # The limited locations are the app's limited endpoints.
    (limited,) = re.findall(r"location ~ \^/\(([a-z|/]+)\)\$", rendered)
    assert {f"/{path}" for path in limited.split("|")} == set(PROTECTED_PATHS)


def compose_default(value: str) -> str:
    """The default of a compose `${NAME:-default}` value."""
    return re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value).group(1)


def test_replicas_trust_forwarded_addresses_from_the_balancer_only() -> None:
    (cmd,) = [args for op, args in dockerfile_instructions() if op == "CMD"]
    command = yaml.safe_load(cmd)
    assert "--proxy-headers" in command and "--forwarded-allow-ips" not in command, \
        "FORWARDED_ALLOW_IPS comes from the environment, so that compose and Kubernetes can set it"
    env = " ".join(args for op, args in dockerfile_instructions() if op == "ENV")
    assert "FORWARDED_ALLOW_IPS=127.0.0.1" in env
    services = compose()["services"]
    trusted = compose_environment("api", environ={})["FORWARDED_ALLOW_IPS"]
    assert services["lb"]["networks"]["default"]["ipv4_address"] == "${LB_ADDRESS:-%s}" % trusted
    (pool,) = compose()["networks"]["default"]["ipam"]["config"]
    subnet, dynamic = (ipaddress.ip_network(compose_default(pool[key])) for key in ("subnet", "ip_range"))
    address = ipaddress.ip_address(trusted)
    assert address in subnet and address not in dynamic, "the balancer's address cannot go to a replica"
    rendered = render_for_loopback([8101], 8100)
    # nginx is the edge: it replaces a client's own X-Forwarded-For instead of appending to it.
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in rendered
    assert "proxy_set_header X-Real-IP $remote_addr;" in rendered


def test_compose_replicas_share_one_health_checked_redis_for_their_rate_limits() -> None:
    services = compose()["services"]
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis", "the official image"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    command = redis["command"]
    # Counts live a window long: nothing is saved, so a restart starts empty instead of loading a stale file.
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert "volumes" not in redis and "ports" not in redis, "not persisted, reached by the replicas only"
    api = services["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    storage = compose_environment("api", environ={})["RATE_LIMIT_STORAGE"]
    settings = Settings(_env_file=None, rate_limit_storage=storage)
    assert settings.rate_limit_storage == "redis://redis:6379/0", "every replica counts in the redis service"
