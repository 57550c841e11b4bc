"""The model report in Chromium: the page links it when the model has one, and it renders under its own policy
(inline style and data: figures, nothing else) with every figure drawn."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, expect

from contract.manifest import REPORT_FILE
from tests.training.conftest import draw_shapes_dataset
from tests.web.conftest import running_service
from tests.web.test_web_page import opened
from training.__main__ import main


@pytest.fixture(scope="module")
def reported_url(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The suite's small model with a report made by `evaluate --report`, served."""
    store = tmp_path_factory.mktemp("reported_store")
    shutil.copytree(model_store / "tiny", store / "tiny")
    main(["evaluate", "--model", str(store / "tiny"), "--data",
          str(draw_shapes_dataset(tmp_path_factory.mktemp("shapes"), images_per_class=4)), "--report"])
    assert (store / "tiny" / REPORT_FILE).is_file()
    with running_service(store, "tiny", tmp_path_factory.mktemp("reported")) as url:
        yield url


def test_the_page_links_the_report_which_renders_every_figure(browser: Browser, reported_url: str) -> None:
    with opened(browser, reported_url) as page:
        link = page.locator("#model-report a")
        expect(link).to_be_visible()
        with page.context.expect_page() as opening:
            link.click()
        report = opening.value
        blocked: list[str] = []
        report.on("console", lambda message: _record_csp(message, blocked))
        report.wait_for_load_state()
        assert report.url == f"{reported_url}/model/report"
        expect(report.locator("h1")).to_contain_text("Model report: tiny")
        figures = report.locator("section img")
        assert figures.count() >= 6
        for figure in figures.all():
            assert figure.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0
        # the inline style sheet applies (the policy allows it): the page is one readable column
        assert report.evaluate("getComputedStyle(document.body).maxWidth") == "1024px"
        report.reload()  # the console listener sees a whole load
        report.wait_for_load_state()
        assert blocked == []


def test_a_model_without_a_report_gets_no_link(browser: Browser, request: pytest.FixtureRequest,
                                               tmp_path: Path) -> None:
    store: Path = request.getfixturevalue("model_store")
    with running_service(store, "tiny", tmp_path) as url, opened(browser, url) as page:
        expect(page.locator("#model-info")).to_contain_text("Model tiny")
        expect(page.locator("#model-report")).to_be_hidden()


def _record_csp(message: ConsoleMessage, blocked: list[str]) -> None:
    if "Content Security Policy" in message.text:
        blocked.append(message.text)
