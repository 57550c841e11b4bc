"""Schemathesis against the running service: the documented examples, then generated requests (valid and
invalid), for every operation of /openapi.json. No answer may be a 5xx, and every answer, problems included,
must have a documented status, content type, headers and body schema.

Repeatable: fixed seed, deterministic generation, no example database. Bounded: at most
FUZZED_REQUESTS_PER_OPERATION generated requests per operation (about 15 s in all on a 2-core CPU), on a server
of this module with a model that answers in a millisecond. The coverage and stateful phases are off: they
would multiply the run time, and this API has no state to walk through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi import checks

from app.main import app
from tests.app.failing_model import FAILING_MODEL_NAME

FUZZED_REQUESTS_PER_OPERATION = 300
CONFIG = SchemathesisConfig.from_dict({
    "seed": 20261130,
    "generation": {"deterministic": True, "database": "none", "max-examples": FUZZED_REQUESTS_PER_OPERATION},
    "phases": {
        "examples": {"enabled": True},
        "fuzzing": {"enabled": True},
        "coverage": {"enabled": False},
        "stateful": {"enabled": False},
    },
})
CHECKS = [
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def service(serve: Callable[..., AbstractContextManager[str]], failing_model_store: Path) -> Iterator[str]:
    """The service with tests/app/failing_model.py's 32 x 32 model: generated uploads are never single-colour
    images, so it fails on none of them; requests go to decoding and validation, what fuzzing can reach."""
    with serve(model_store=failing_model_store, model_name=FAILING_MODEL_NAME, max_batch_wait_ms=0) as url:
        yield url


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.trust_env = False  # loopback only, whatever proxies the environment names
        yield session


# Loaded at collection, from the app's own document: schemathesis' lazy `from_fixture` fails under pytest 9
# (it sets `Function._nodeid`). The fixture below checks that the server serves this very document.
schema = schemathesis.openapi.from_dict(app.openapi(), config=CONFIG)


@pytest.fixture(scope="module")
def documented_service(service: str, http: requests.Session) -> str:
    assert http.get(f"{service}/openapi.json").json() == app.openapi()
    return service


@schema.parametrize()
def test_every_answer_is_documented_and_none_is_a_5xx(
    case: schemathesis.Case, documented_service: str, http: requests.Session
) -> None:
    response = case.call(base_url=documented_service, session=http)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text}"
    case.validate_response(response, checks=CHECKS)
