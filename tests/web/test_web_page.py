"""The page at / in headless Chromium against the real service: what a person sees is what the API says."""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect

from tests.app.failing_model import FAILING_MODEL_NAME, YELLOW, export_failing_model
from tests.conftest import DrawnPair
from tests.support.images import drawn_image, pair_files
from tests.support.model_folders import with_version1_module
from tests.web.conftest import FLOWERS, running_service

RESULT_TIMEOUT_MS = 120_000  # /explain on CPU while a training run may share the two cores
QUEUE_FILL_TIMEOUT_S = 20
OVERLAYS = "#overlays figure.factual img, #overlays figure.counterfactual img"


# Every Content-Security-Policy violation on the page, as the browser reports it to the page itself.
_RECORD_CSP_VIOLATIONS = """
    window.cspViolations = [];
    document.addEventListener("securitypolicyviolation", (event) => {
        window.cspViolations.push(`${event.effectiveDirective} blocked ${event.blockedURI || "inline code"}`);
    });
"""


@contextmanager
def opened(browser: Browser, url: str, **context_options: object) -> Iterator[Page]:
    """A fresh tab on the page; fails the test on any script error, any request that leaves the service, and
    any Content-Security-Policy violation (the page is served with the strict policy: that is checked too)."""
    context = browser.new_context(**context_options)
    context.add_init_script(_RECORD_CSP_VIOLATIONS)
    tab = context.new_page()
    script_errors: list[str] = []
    foreign_requests: list[str] = []
    console_csp: list[str] = []

    def check_request(request: Request) -> None:
        if not request.url.startswith((f"{url}/", "data:", "blob:")):  # blob: the previews of chosen files
            foreign_requests.append(request.url)

    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    tab.on("request", check_request)
    tab.on("console", lambda message: console_csp.append(message.text)
           if "Content Security Policy" in message.text else None)
    answer = tab.goto(f"{url}/")
    assert answer is not None and "default-src 'self'" in answer.headers["content-security-policy"]
    try:
        yield tab
        violations = tab.evaluate("window.cspViolations")
    finally:
        context.close()
    assert script_errors == [], "the page raised JavaScript errors"
    assert foreign_requests == [], "the page must work offline: it asked for something other than the service"
    assert violations == [] and console_csp == [], f"Content-Security-Policy violations: {violations + console_csp}"


@pytest.fixture
def page(browser: Browser, service_url: str) -> Iterator[Page]:
    with opened(browser, service_url, viewport={"width": 1280, "height": 900}) as tab:
        yield tab


def compare(page: Page, first: Path, second: Path) -> None:
    page.set_input_files("#image1", first)
    page.set_input_files("#image2", second)
    page.click("#compare")


def post_files(url: str, first: Path, second: Path, headers: dict[str, str] | None = None) -> httpx.Response:
    files = {"image1": (first.name, first.read_bytes()), "image2": (second.name, second.read_bytes())}
    return httpx.post(url, files=files, headers=headers, timeout=RESULT_TIMEOUT_MS / 1000)


def test_result_shows_the_services_score_four_overlays_and_the_model(
    page: Page, service_url: str, two_images: tuple[Path, Path], artifacts: Path
) -> None:
    model = httpx.get(f"{service_url}/model").json()
    expect(page.locator("#model-info")).to_contain_text(
        f"Model {model['name']}, version {model['version']}, threshold {model['threshold']:.2f}"
    )
    # Remember whether the progress indicator ever showed: the answer may come too fast to catch it by polling.
    page.evaluate("""() => {
        const progress = document.getElementById("progress");
        new MutationObserver(() => { if (!progress.hidden) window.progressShown = true; })
            .observe(progress, { attributes: true });
    }""")

    compare(page, *two_images)
    expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)

    assert page.evaluate("window.progressShown") is True
    expected = post_files(f"{service_url}/similarity", *two_images).json()
    shown = float(page.inner_text("#score"))
    assert shown == pytest.approx(expected["score"], abs=5e-4), "the page shows the score to 3 decimals"
    decision = "Similar:" if expected["similar"] else "Not similar:"
    expect(page.locator("#decision")).to_contain_text(decision)

    overlays = page.locator(OVERLAYS)
    expect(overlays).to_have_count(4)
    for overlay in overlays.all():
        assert overlay.evaluate("img => img.decode().then(() => img.naturalWidth * img.naturalHeight)") > 0
        box = overlay.bounding_box()
        assert box is not None and box["width"] > 0 and box["height"] > 0
        assert overlay.get_attribute("alt")
    downloads = page.locator("#overlays a.download")
    expect(downloads).to_have_count(4)
    for link in downloads.all():
        assert link.get_attribute("href").startswith("data:image/")
        assert link.get_attribute("download")

    page.screenshot(path=artifacts / "result.png", full_page=True)


def test_changing_colours_or_opacity_redraws_the_overlays(page: Page, two_images: tuple[Path, Path]) -> None:
    compare(page, *two_images)
    expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)

    expect_redrawn_after(page, lambda: page.select_option("#colormap", "viridis"))
    # fill fires "input" then "change", as dragging and releasing the slider does.
    expect_redrawn_after(page, lambda: page.fill("#opacity", "0.9"))
    expect(page.locator("#opacity-value")).to_have_text("0.90")


def expect_redrawn_after(page: Page, change: Callable[[], None]) -> None:
    """`change` makes the first overlay show another picture: the page asked the service to redraw it."""
    before = page.locator(OVERLAYS).first.get_attribute("src")
    change()
    page.wait_for_function(
        f"before => document.querySelector('{OVERLAYS}').getAttribute('src') !== before",
        arg=before,
        timeout=RESULT_TIMEOUT_MS,
    )
    expect(page.locator(OVERLAYS)).to_have_count(4)


@pytest.mark.parametrize(
    ("name", "content", "plain_words"),
    [
        ("notes.txt", b"this is text, not an image\n", "is not an image"),
        # Just over the service's default MAX_UPLOAD_BYTES (10 MB).
        ("huge.jpg", b"\xff\xd8\xff" + bytes(10 * 1024 * 1024), "too large"),
    ],
    ids=["text file", "too large"],
)
def test_a_refused_upload_shows_the_services_message_in_plain_words(
    page: Page, service_url: str, two_images: tuple[Path, Path], tmp_path: Path,
    name: str, content: bytes, plain_words: str,
) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)

    compare(page, two_images[0], bad)
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=RESULT_TIMEOUT_MS)

    problem = post_files(f"{service_url}/explain", two_images[0], bad).json()
    expect(error).to_contain_text(plain_words)
    expect(error).to_contain_text(problem["detail"])
    expect(page.locator("#result")).to_be_hidden()


@pytest.fixture
def busy_service_url(tmp_path: Path) -> Iterator[str]:
    """A service on the failing test model (an all-yellow pair keeps it busy a second or more) whose queue holds
    one pair: while the model is busy and one request waits, the next one is refused as busy (503), with a
    Retry-After of 3 s (not the default 1 s: the page must read it)."""
    store = export_failing_model(tmp_path / "model_store")
    settings = {"QUEUE_CAPACITY": "1", "DRAIN_GRACE_S": "0", "RETRY_AFTER_S": "3"}
    with running_service(store, FAILING_MODEL_NAME, tmp_path, **settings) as url:
        yield url


@contextmanager
def queue_kept_full(url: str) -> Iterator[None]:
    """Inside, clients keep posting yellow pairs to /explain: one runs, one waits in the queue, and one is refused
    and retries at once, to take the place in the queue as soon as it frees. On leaving, they stop; each must have
    been served at least once, or refused."""
    stop = threading.Event()

    def keep_posting() -> list[int]:
        statuses = []
        with httpx.Client(base_url=url, timeout=RESULT_TIMEOUT_MS / 1000, trust_env=False) as client:
            while not stop.is_set():
                statuses.append(client.post("/explain", files=pair_files(YELLOW, YELLOW)).status_code)
        return statuses

    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(keep_posting) for _ in range(3)]
        wait_for_queue_depth(url, 1)
        yield
        stop.set()
        statuses = [status for client in clients for status in client.result()]
    assert set(statuses) <= {200, 503} and 200 in statuses, f"the other clients got {statuses}"


def test_a_busy_service_asks_to_retry_and_retry_works(
    browser: Browser, busy_service_url: str, two_images: tuple[Path, Path]
) -> None:
    with opened(browser, busy_service_url) as page:
        with queue_kept_full(busy_service_url):
            compare(page, *two_images)
            error = page.locator("#error")
            expect(error).to_be_visible(timeout=RESULT_TIMEOUT_MS)
            expect(error).to_contain_text("busy")
            expect(error).to_contain_text("retry in 3 seconds")  # the service's RETRY_AFTER_S

        page.click("#retry")
        expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        expect(error).to_be_hidden()


def wait_for_queue_depth(url: str, depth: int) -> None:
    """Until the service's /metrics shows `depth` pairs waiting in the explain queue."""
    line = f'siamcam_queue_depth{{queue="explain"}} {float(depth)}'
    deadline = time.monotonic() + QUEUE_FILL_TIMEOUT_S
    while line not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"the explain queue never held {depth} pair(s)"
        time.sleep(0.05)


def test_a_phone_sized_screen_fits_without_sideways_scrolling(
    browser: Browser, service_url: str, two_images: tuple[Path, Path], artifacts: Path
) -> None:
    phone_sized = {"viewport": {"width": 375, "height": 740}, "is_mobile": True, "has_touch": True}
    with opened(browser, service_url, **phone_sized) as phone:
        compare(phone, *two_images)
        expect(phone.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)

        assert phone.evaluate("document.documentElement.scrollWidth") <= 375
        # Original, factual and counterfactual stay side by side, one row per image.
        figures = phone.locator("#overlays .row").first.locator("figure").all()
        tops = {round(figure.bounding_box()["y"]) for figure in figures}
        assert len(figures) == 3 and len(tops) == 1
        phone.screenshot(path=artifacts / "result-phone.png", full_page=True)


def test_every_control_is_labelled_and_reachable_with_the_keyboard(
    page: Page, two_images: tuple[Path, Path]
) -> None:
    # The mode's radio group is one stop (its checked button); the other mode's pickers are hidden, hence skipped.
    controls = ["mode-pair", "image1", "image2", "opacity", "colormap", "method"]
    for control in [*controls, "mode-rank", "query", "candidates"]:
        assert page.evaluate(f"document.getElementById('{control}').labels.length") > 0, f"{control} has no label"

    reached = []
    for _ in controls:
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
    assert reached == controls

    # Compare is disabled, hence skipped by Tab, until both images are chosen.
    page.set_input_files("#image1", two_images[0])
    page.set_input_files("#image2", two_images[1])
    page.focus("#method")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "compare"


def test_dropping_two_images_on_one_picker_fills_both(page: Page, two_images: tuple[Path, Path]) -> None:
    files = [{"name": path.name, "b64": base64.b64encode(path.read_bytes()).decode()} for path in two_images]
    dropped = page.evaluate_handle("""files => {
        const transfer = new DataTransfer();
        for (const { name, b64 } of files) {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            transfer.items.add(new File([bytes], name));
        }
        return transfer;
    }""", files)

    page.dispatch_event("#picker1", "drop", {"dataTransfer": dropped})

    for preview, path in zip(["#preview1", "#preview2"], two_images):
        expect(page.locator(preview)).to_be_visible()
        expect(page.locator(preview)).to_have_attribute("alt", re.compile(re.escape(path.name)))
    expect(page.locator("#compare")).to_be_enabled()


def test_the_policy_is_enforced_and_a_violation_fails_the_check(browser: Browser, service_url: str) -> None:
    """The CSP check of `opened` can fail: an inline style injected into the page is blocked and reported."""
    with pytest.raises(AssertionError, match="Content-Security-Policy violations"):
        with opened(browser, service_url) as page:
            page.evaluate("""() => {
                const style = document.createElement("style");
                style.textContent = "body { background: red; }";
                document.head.append(style);
            }""")
            page.wait_for_function("window.cspViolations.length > 0")
            assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(255, 0, 0)"


API_KEY = "web-test-key-0123456789abcdef"


@pytest.fixture
def keyed_service_url(served_model: tuple[Path, str], tmp_path: Path) -> Iterator[str]:
    with running_service(*served_model, tmp_path, API_KEYS=API_KEY) as url:
        yield url


def test_the_page_asks_for_a_key_keeps_it_for_the_session_and_compares(
    browser: Browser, keyed_service_url: str, two_images: tuple[Path, Path]
) -> None:
    with opened(browser, keyed_service_url) as page:
        key_form, message = page.locator("#key-form"), page.locator("#key-message")
        expect(key_form).to_be_visible()  # /model answered 401 as the page loaded
        expect(message).to_contain_text("needs an API key")
        page.fill("#api-key", "not-the-key")
        page.click("#key-submit")
        expect(message).to_contain_text("did not accept")
        page.fill("#api-key", API_KEY)
        page.keyboard.press("Enter")
        expect(key_form).to_be_hidden()
        expect(page.locator("#model-info")).to_contain_text("Model ")

        compare(page, *two_images)
        expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        expected = post_files(f"{keyed_service_url}/similarity", *two_images,
                              headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert float(page.inner_text("#score")) == pytest.approx(expected["score"], abs=5e-4)
        expect(page.locator(OVERLAYS)).to_have_count(4)
        # Kept in this tab's session storage only: nothing persistent, no cookie.
        assert page.evaluate("sessionStorage.getItem('siamcam.apiKey')") == API_KEY
        assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []


def test_the_api_documentation_works_in_the_browser(browser: Browser, service_url: str) -> None:
    """/docs and /redoc are served without the page's CSP (their inline start-up scripts need it) and work."""
    context = browser.new_context()
    try:
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        answer = tab.goto(f"{service_url}/docs")
        assert answer is not None and answer.headers["x-content-type-options"] == "nosniff"
        expect(tab.locator(".opblock-summary-path", has_text="/similarity")).to_be_visible()
        tab.goto(f"{service_url}/redoc")
        expect(tab.get_by_text("/similarity").first).to_be_attached()
        assert errors == []
    finally:
        context.close()


@pytest.fixture(scope="module")
def version_1_service_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[str]:
    """A model exported before format version 2: Grad-CAM only."""
    store = tmp_path_factory.mktemp("version_1")
    with_version1_module(request.getfixturevalue("model_store") / "tiny", store / "old")
    with running_service(store, "old", store) as url:
        yield url


def test_the_decision_is_shown_in_words_either_way(browser: Browser, contributions_service_url: str,
                                                   decided_pair: DrawnPair) -> None:
    """Catches a page that always says "Similar" (or reads the decision off the wrong field): on a pair the model
    decides "not similar" it must say so, with the score the API gives."""
    url = contributions_service_url
    with opened(browser, url) as page:
        compare(page, decided_pair.image1, decided_pair.image2)
        expect(page.locator("#result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
        expected = post_files(f"{url}/similarity", decided_pair.image1, decided_pair.image2).json()
        assert expected["similar"] == decided_pair.similar
        assert float(page.inner_text("#score")) == pytest.approx(expected["score"], abs=5e-4)
        words = "Similar:" if decided_pair.similar else "Not similar:"
        expect(page.locator("#decision")).to_have_text(re.compile(f"^{words}"))
        expect(page.locator(OVERLAYS)).to_have_count(4)


@pytest.mark.parametrize("model", ["format version 1", "format version 2"])
def test_a_model_without_contributions_offers_grad_cam_only(browser: Browser, request: pytest.FixtureRequest,
                                                           model: str, two_images: tuple[Path, Path]) -> None:
    """Catches a page that offers exact contributions to a model that cannot give them (or withholds them from
    one that can): the choice follows GET /model's explain_methods, and Grad-CAM still works."""
    url = request.getfixturevalue("version_1_service_url" if model == "format version 1"
                                  else "contributions_service_url")
    methods = httpx.get(f"{url}/model").json()["explain_methods"]
    assert methods == (["gradcam"] if model == "format version 1" else ["gradcam", "contributions"])
    with opened(browser, url) as page:
        expect(page.locator("#model-info")).to_contain_text("Model ")
        for method in ("gradcam", "contributions"):
            option = page.locator(f"#method option[value={method}]")
            if method in methods:
                expect(option).to_be_enabled()
            else:
                expect(option).to_be_disabled()
        compare(page, *two_images)
        expect(page.locator(OVERLAYS)).to_have_count(4, timeout=RESULT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def rank_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A query and four candidates: a rose against two roses and two daisies of the shared flowers dataset when
    it is present, else drawn ones."""
    if FLOWERS.is_dir():
        roses, daisies = (sorted((FLOWERS / kind).glob("*.jpg")) for kind in ("Rose", "Daisy"))
        return roses[0], [daisies[1], roses[1], daisies[2], roses[2]]
    folder = tmp_path_factory.mktemp("rank_images")
    paths = [folder / f"drawn-{seed}.png" for seed in range(5)]
    for seed, path in enumerate(paths):
        drawn_image(seed + 20, (160, 120)).save(path, "PNG")
    return paths[0], paths[1:]


def rank_on_page(page: Page, query: Path, candidates: list[Path]) -> None:
    page.check('input[name="mode"][value="rank"]')
    page.set_input_files("#query", query)
    page.set_input_files("#candidates", candidates)
    page.click("#rank")


def test_one_against_many_lists_the_services_ranking_and_explains_the_best(
    page: Page, service_url: str, rank_images: tuple[Path, list[Path]], artifacts: Path
) -> None:
    query, candidates = rank_images
    expect(page.locator("#rank")).to_be_hidden()
    rank_on_page(page, query, candidates)
    expect(page.locator("#compare")).to_be_hidden()
    expect(page.locator("#candidate-thumbnails img")).to_have_count(len(candidates))
    expect(page.locator("#rank-result")).to_be_visible(timeout=RESULT_TIMEOUT_MS)

    files = [("query", (query.name, query.read_bytes())),
             *(("candidates", (path.name, path.read_bytes())) for path in candidates)]
    expected = httpx.post(f"{service_url}/rank", files=files, data={"explain_top": "0"},
                          timeout=RESULT_TIMEOUT_MS / 1000).json()["candidates"]
    items = page.locator("#ranking li")
    expect(items).to_have_count(len(candidates))
    for item, answer in zip(items.all(), expected, strict=True):
        assert item.get_attribute("data-index") == str(answer["index"])
        assert float(item.locator(".ranked-score").inner_text()) == pytest.approx(answer["score"], abs=5e-4)
        assert item.locator(".ranked-name").inner_text() == candidates[answer["index"]].name
        assert item.locator(".ranked-decision").inner_text() == ("similar" if answer["similar"] else "not similar")
        thumbnail = item.locator("img")
        assert thumbnail.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0

    best = candidates[expected[0]["index"]].name
    expect(page.locator("#best-decision")).to_contain_text(best)
    overlays = page.locator("#rank-overlays figure.factual img, #rank-overlays figure.counterfactual img")
    expect(overlays).to_have_count(4)
    for overlay in overlays.all():
        assert overlay.evaluate("img => img.decode().then(() => img.naturalWidth * img.naturalHeight)") > 0
    expect(page.locator("#rank-overlays .row-title").nth(1)).to_contain_text(best)
    page.screenshot(path=artifacts / "rank.png", full_page=True)

    page.check('input[name="mode"][value="pair"]')
    expect(page.locator("#rank-result")).to_be_hidden()
    expect(page.locator("#compare")).to_be_visible()


def test_one_against_many_names_an_unreadable_candidate(
    page: Page, rank_images: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    query, candidates = rank_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(candidates[0].read_bytes()[:300])
    rank_on_page(page, query, [candidates[0], broken])
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(error).to_contain_text("candidates[1] (broken.png)")
    expect(page.locator("#rank-result")).to_be_hidden()
