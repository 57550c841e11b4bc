"""The deployment proof (deploy/proof.py) in CI: 3 replicas behind the compose nginx config on loopback, one
SIGTERMed and one SIGKILLed under load, and every client request still gets a correct 200."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local_cluster import NginxUnavailable
from deploy.proof import (
    CLEAN_EXIT_CODES,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_STORE,
    EXIT_SLACK_S,
    ProofSettings,
    run_proof,
)


@pytest.fixture(scope="module")
def proof_model(request: pytest.FixtureRequest) -> tuple[Path, str]:
    """The bundled default model when it is there (what the container ships), else the suite's small one."""
    if (DEFAULT_MODEL_STORE / DEFAULT_MODEL_NAME / "manifest.json").is_file():
        return DEFAULT_MODEL_STORE, DEFAULT_MODEL_NAME
    return request.getfixturevalue("model_store"), "tiny"


def test_every_request_is_answered_while_replicas_die(proof_model: tuple[Path, str]) -> None:
    store, name = proof_model
    settings = ProofSettings(model_store=store, model_name=name)
    try:
        report = run_proof(settings)
    except NginxUnavailable as reason:
        pytest.skip(f"no nginx for the load-balancer proof: {reason}")
    print(report.summary())  # the figures bench/RESULTS.md records; shown with `pytest -s`
    assert len(report.outcomes) == settings.similarity + settings.explain
    assert report.failures == []
    assert report.drain.drained > 0 and report.drain.problems == []
    assert report.drain.new_request_refused
    assert report.drain.exit_code in CLEAN_EXIT_CODES
    assert report.drain.exit_after_s is not None and report.drain.exit_after_s <= settings.drain_grace_s + EXIT_SLACK_S
    # With API keys and rate limits on, as deployed: a request without the key is refused.
    assert report.access.without_key_status == 401 and report.access.logs_with_the_key == []
    assert report.access.rate_limit_policy == f'"default";q={settings.rate_limit_burst};w=1'
    assert report.problems() == []
