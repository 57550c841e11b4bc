"""Schemathesis against the running service: the documented examples, then generated requests (valid and
invalid), for every operation of /openapi.json. No answer may be a 5xx, and every answer, problems included,
must have a documented status, content type, headers and body schema.

Repeatable: fixed seed, deterministic generation, no example database. Bounded: at most
FUZZED_REQUESTS_PER_OPERATION generated requests per operation (about 25 s in all on a shared 2-core CPU), on
a server of this module with a model that answers in a millisecond. The coverage and stateful phases are off: they
would multiply the run time, and this API has no state to walk through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi import checks

from app.main import app
from app.schemas import IMAGE_MEDIA_TYPES
from tests.app.failing_model import FAILING_MODEL_NAME
from tests.support.images import drawn_image, encode

FUZZED_REQUESTS_PER_OPERATION = 200
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
_PILLOW_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF",
                   "image/bmp": "BMP", "image/tiff": "TIFF"}


def _drawn_images(pillow_format: str) -> st.SearchStrategy[bytes]:
    """Real images of one format, drawn at sizes from 24 px (drawn_image's least) up."""
    sides = st.integers(24, 160)
    return st.builds(lambda seed, width, height: encode(drawn_image(seed, (width, height)), pillow_format),
                     st.integers(0, 2**16), sides, sides)


# The documented `encoding` of the uploads names these media types: schemathesis then sends real images in
# its valid requests (random bytes in its invalid ones), so that 200 answers are checked against their schema.
assert set(_PILLOW_FORMATS) == set(IMAGE_MEDIA_TYPES)
for media_type, pillow_format in _PILLOW_FORMATS.items():
    schemathesis.openapi.media_type(media_type, _drawn_images(pillow_format))

# Where /embed and /rank take a list of images, schemathesis draws one image (the media type registered above)
# and sends it without a file name, as a plain form field; as a list of one, it is sent as a file.
LISTS_OF_IMAGES = ("images", "candidates")


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    if isinstance(case.body, dict):
        for field in LISTS_OF_IMAGES:
            if isinstance(case.body.get(field), bytes):
                case.body[field] = [case.body[field]]
    return case


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


# Enough drawn requests of each kind to meet a scored and a refused one (a few seconds).
GENERATED_PER_MODE = 12


@pytest.mark.parametrize("path", ["/similarity", "/explain", "/embed", "/rank"])
def test_generated_requests_are_both_scored_and_refused(path: str, documented_service: str,
                                                        http: requests.Session) -> None:
    """Catches a fuzzing that never reaches the model (e.g. uploads that are never real images, so that every
    request is refused before inference) or never sends an invalid request. It draws its own requests from the
    strategies the fuzzing above uses, so it checks something whatever ran before it (alone, with -k, --lf):
    the valid ones must be scored (200), the invalid ones refused (422)."""
    operation = schema[path]["POST"]
    for mode, expected in ((GenerationMode.POSITIVE, 200), (GenerationMode.NEGATIVE, 422)):
        seen: Counter[int] = Counter()

        @hypothesis.settings(max_examples=GENERATED_PER_MODE, derandomize=True, database=None, deadline=None,
                             phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=operation.as_strategy(mode))
        def send(case: schemathesis.Case) -> None:
            case = map_case(None, case)  # as the fuzzing's cases are
            seen[case.call(base_url=documented_service, session=http).status_code] += 1

        send()
        assert seen[expected] > 0, (path, mode.value, seen)
        assert all(status < 500 for status in seen), (path, mode.value, seen)
