"""GET /model/report: the served model's report.html, under a policy that lets it render and run nothing; a 404
saying how to make one when its folder has none; behind the API key like /model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from app.headers import REPORT_CONTENT_SECURITY_POLICY
from contract.manifest import REPORT_FILE
from tests.app.conftest import TEST_MODEL_NAME
from tests.support.report_page import ReportPage
from tests.training.conftest import draw_shapes_dataset
from training.__main__ import main

KEY = "report-test-key-0123456789"


@pytest.fixture(scope="module")
def reported_store(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the suite's model store whose model has a report, made by `evaluate --report` as a user would."""
    store = tmp_path_factory.mktemp("reported_store")
    shutil.copytree(model_store / TEST_MODEL_NAME, store / TEST_MODEL_NAME)
    dataset = draw_shapes_dataset(tmp_path_factory.mktemp("shapes"), images_per_class=4)
    main(["evaluate", "--model", str(store / TEST_MODEL_NAME), "--data", str(dataset), "--report"])
    return store


def test_the_report_is_served_as_it_was_written_under_its_own_policy(
    serve: Callable[..., AbstractContextManager[str]], reported_store: Path
) -> None:
    written = (reported_store / TEST_MODEL_NAME / REPORT_FILE).read_bytes()
    with serve(model_store=reported_store) as url:
        answer = httpx.get(f"{url}/model/report")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        assert answer.content == written
        # Its inline style and data: figures may load, nothing else: no script, no other source.
        policy = answer.headers["content-security-policy"]
        assert policy == REPORT_CONTENT_SECURITY_POLICY and "default-src 'none'" in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert len(ReportPage(answer.text).images["roc"]) == 1
        assert httpx.get(f"{url}/model").json()["report"] == "/model/report"
        # /docs lists the report and its description links to it
        schema = httpx.get(f"{url}/openapi.json").json()
        assert "text/html" in schema["paths"]["/model/report"]["get"]["responses"]["200"]["content"]
        assert "(/model/report)" in schema["info"]["description"]


def test_a_model_without_a_report_gets_a_404_that_says_how_to_make_one(client: httpx.Client) -> None:
    answer = client.get("/model/report")
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == "urn:siamcam:problem:no-model-report"
    assert f"({TEST_MODEL_NAME}) has no report" in problem["detail"]
    assert "python -m training evaluate" in problem["detail"] and "--report" in problem["detail"]
    assert client.get("/model").json()["report"] is None
    assert client.get("/healthz").status_code == 200


def test_the_report_needs_the_api_key_when_keys_are_configured(
    serve: Callable[..., AbstractContextManager[str]], reported_store: Path
) -> None:
    with serve(model_store=reported_store, api_keys=KEY) as url:
        assert httpx.get(f"{url}/model/report").status_code == 401
        answer = httpx.get(f"{url}/model/report", headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.text.startswith("<!doctype html>")
