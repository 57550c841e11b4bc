"""Render deploy/nginx/siamcam.conf.template the way the nginx image does, from docker-compose.yml's values.

docker-compose.yml is the one place where the balancer's values live. In a container, the nginx image's
entrypoint substitutes them (envsubst). Here, for the loopback proof, this module reads the same values from the
compose file and substitutes them the same way, so that the proof runs the configuration compose deploys,
except for the two things that must differ on one machine: which replicas the upstream names and which port
nginx listens on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = REPO_ROOT / "deploy" / "nginx" / "siamcam.conf.template"
COMPOSE_PATH = REPO_ROOT / "docker-compose.yml"
BALANCER_SERVICE = "lb"

# ${NAME} as the nginx image's envsubst sees it; nginx's own variables ($host, $request_id) are lowercase.
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
# Compose interpolation as used in docker-compose.yml: ${NAME:-default} or ${NAME}.
_COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# One `server host:port params;` entry of API_UPSTREAM_SERVERS.
_SERVER_ENTRY = re.compile(r"server\s+([^\s;]+)([^;]*);")


class TemplateError(ValueError):
    pass


def template_placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))


def render(template: str, values: dict[str, str]) -> str:
    """Substitute ${NAME} for each NAME in values, like envsubst; every placeholder must have a value."""
    missing = template_placeholders(template) - values.keys()
    if missing:
        raise TemplateError(f"no value for {sorted(missing)} in the nginx template: add them to the lb service's "
                            f"environment in {COMPOSE_PATH.name}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _interpolate(value: str, environ: dict[str, str]) -> str:
    return _COMPOSE_VARIABLE.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)


def compose_environment(service: str = BALANCER_SERVICE, compose_path: Path = COMPOSE_PATH,
                        environ: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment in docker-compose.yml, with ${NAME:-default} resolved as compose would."""
    environ = dict(os.environ) if environ is None else environ
    compose = yaml.safe_load(compose_path.read_text())
    raw = compose["services"][service]["environment"]
    return {name: _interpolate(str(value), environ) for name, value in raw.items()}


def with_upstreams(upstream_servers: str, addresses: list[str]) -> str:
    """Replace the replica address(es) in compose's API_UPSTREAM_SERVERS, keeping each entry's parameters.

    Compose names one host (the `api` service, which Docker's DNS resolves to every replica); on one machine
    each replica has its own port, so the one entry becomes one entry per address, with the same
    max_fails/fail_timeout.
    """
    entries = _SERVER_ENTRY.findall(upstream_servers)
    if len(entries) != 1:
        raise TemplateError(f"expected one `server host:port params;` entry in API_UPSTREAM_SERVERS, got "
                            f"{upstream_servers!r}")
    _, params = entries[0]
    return " ".join(f"server {address}{params};" for address in addresses)


def render_for_loopback(replica_ports: list[int], listen_port: int) -> str:
    """The compose configuration, balancing over 127.0.0.1:<replica_ports> and listening on 127.0.0.1."""
    values = compose_environment()
    values["API_UPSTREAM_SERVERS"] = with_upstreams(values["API_UPSTREAM_SERVERS"],
                                                    [f"127.0.0.1:{port}" for port in replica_ports])
    values["LISTEN_PORT"] = f"127.0.0.1:{listen_port}"
    return render(TEMPLATE_PATH.read_text(), values)
