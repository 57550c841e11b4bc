"""The matches view (method=contributions) in headless Chromium against the real service: what it says in words
follows the API's answer, its pictures are as large as the overlays, and its labels never cover one another nor
leave their picture."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.web.conftest import DEFAULT_MODEL_NAME, FLOWERS
from tests.web.test_web_page import OVERLAYS, RESULT_TIMEOUT_MS, compare, opened

DESKTOP = {"viewport": {"width": 1280, "height": 900}}
PHONE = {"viewport": {"width": 375, "height": 740}, "is_mobile": True, "has_touch": True}


@pytest.fixture
def default_model_url(service_url: str, served_model: tuple[Path, str]) -> str:
    if served_model[1] != DEFAULT_MODEL_NAME or not FLOWERS.is_dir():
        pytest.skip("needs the bundled default model and the flowers dataset (two sunflowers, a rose and a tulip)")
    return service_url


def flower(kind: str, index: int) -> Path:
    return sorted((FLOWERS / kind).glob("*.jpg"))[index]


def explained(url: str, first: Path, second: Path) -> dict:
    """What the page asks for, asked directly: the answer the page must put in words."""
    files = {"image1": (first.name, first.read_bytes()), "image2": (second.name, second.read_bytes())}
    answer = httpx.post(f"{url}/explain", files=files, timeout=RESULT_TIMEOUT_MS / 1000,
                        data={"method": "contributions", "include_correspondence": "true"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def show_matches(page: Page, first: Path, second: Path) -> None:
    page.select_option("#method", "contributions")
    compare(page, first, second)
    expect(page.locator("#matches")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    # every label placed (app.js places them once its picture is laid out)
    page.wait_for_function("""() => [...document.querySelectorAll('.match-label')].every(label => label.style.left)
                              && [...document.querySelectorAll('.match-frame img')].every(img => img.complete)""")


def percent(share: float) -> str:
    return f"{100 * share:.{2 if share < 0.01 else 1}f}%"


def rank_list(ranks: list[int]) -> str:
    """The label of a region that is part of these listed pairs: runs of three or more as a range."""
    parts, start = [], 0
    while start < len(ranks):
        end = start
        while end + 1 < len(ranks) and ranks[end + 1] == ranks[end] + 1:
            end += 1
        parts += [f"{ranks[start]}–{ranks[end]}"] if end - start >= 2 else [str(r) for r in ranks[start:end + 1]]
        start = end + 1
    return ", ".join(parts)


def assert_labels_fit(page: Page, matches: list[dict], near_their_boxes: bool) -> None:
    """One label per region of a listed pair, naming its pairs; inside the picture, none over another."""
    for index in (1, 2):
        view = f"#match-view{index}"
        cells: dict[tuple[int, int], list[int]] = {}
        for rank, match in enumerate(matches, start=1):
            cells.setdefault(tuple(match[f"image{index}_cell"]), []).append(rank)
        labels = page.locator(f"{view} .match-label")
        expect(labels).to_have_count(len(cells))
        expect(page.locator(f"{view} .match-box")).to_have_count(len(cells))
        assert sorted(labels.all_inner_texts()) == sorted(rank_list(ranks) for ranks in cells.values())
        picture = page.locator(f"{view} img").bounding_box()
        boxes = [label.bounding_box() for label in labels.all()]
        for box in boxes:
            assert picture["x"] - 0.5 <= box["x"] and box["x"] + box["width"] <= picture["x"] + picture["width"] + 0.5
            assert picture["y"] - 0.5 <= box["y"] and box["y"] + box["height"] <= picture["y"] + picture["height"] + 0.5
        for a, b in itertools.combinations(boxes, 2):
            assert (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                    or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"]), f"labels overlap: {a} {b}"
        if near_their_boxes:  # on a wide screen each label sits on its own region's box
            for label in labels.all():
                cell = label.get_attribute("data-cell")
                region = page.locator(f'{view} .match-box[data-cell="{cell}"]').bounding_box()
                own = label.bounding_box()
                assert (own["x"] < region["x"] + region["width"] and region["x"] < own["x"] + own["width"]
                        and own["y"] < region["y"] + region["height"] and region["y"] < own["y"] + own["height"])


def assert_words_follow_the_answer(page: Page, contributions: dict) -> None:
    summary = page.locator("#matches-summary")
    listed = page.locator("#match-list li")
    if contributions["evidence"] == "concentrated":
        expect(summary).to_contain_text(f"carry {percent(contributions['matches_share'])} of the evidence")
        expect(listed).to_have_count(len(contributions["matches"]))
        for item, match in zip(listed.all(), contributions["matches"]):
            text = item.inner_text()
            assert text.startswith(f"The {match['image1_region']} of the first image with the "
                                   f"{match['image2_region']} of the second")
            assert percent(match["share"]) in text and "[" not in text  # pixels only in the tooltip
            pixels = ", ".join(map(str, match["image1_box"]))
            assert item.get_attribute("title").startswith(f"first image pixels [{pixels}]")
    else:
        expected = "judged not similar" if contributions["evidence"] == "not_similar" else "spread thin"
        expect(summary).to_contain_text(expected)
        expect(listed).to_have_count(0)
        expect(page.locator("#match-list")).to_be_hidden()
        expect(page.locator(".match-label, .match-box")).to_have_count(0)


def test_two_sunflowers_matches_are_listed_in_words_and_labelled_without_overlap(
    browser: Browser, default_model_url: str, artifacts: Path
) -> None:
    first, second = flower("Sunflower", 0), flower("Sunflower", 1)
    contributions = explained(default_model_url, first, second)["contributions"]
    # The default model: the strongest pair carries about 12 times its even share (model_store/README.md).
    assert contributions["evidence"] == "concentrated"
    for name, options in (("desktop", DESKTOP), ("phone", PHONE)):
        with opened(browser, default_model_url, **options) as page:
            show_matches(page, first, second)
            assert_words_follow_the_answer(page, contributions)
            assert_labels_fit(page, contributions["matches"], near_their_boxes=name == "desktop")
            assert page.evaluate("document.documentElement.scrollWidth") <= options["viewport"]["width"]
            # The match pictures are at least as large as the overlays above them.
            overlay = page.locator(OVERLAYS).first.bounding_box()
            for view in ("#match-view1", "#match-view2"):
                assert page.locator(f"{view} img").bounding_box()["width"] >= overlay["width"] - 0.5
            page.screenshot(path=artifacts / f"matches-{name}.png", full_page=True)
            # A narrower window: the labels are placed again, still apart and inside.
            page.set_viewport_size({"width": options["viewport"]["width"] - 60, "height": 740})
            page.wait_for_timeout(200)
            assert_labels_fit(page, contributions["matches"], near_their_boxes=False)


def test_a_rose_and_a_tulip_get_a_sentence_not_a_list_of_matches(browser: Browser, default_model_url: str) -> None:
    first, second = flower("Rose", 0), flower("Tulip", 0)
    answer = explained(default_model_url, first, second)
    assert answer["similar"] is False and answer["contributions"]["evidence"] == "not_similar"
    with opened(browser, default_model_url, **DESKTOP) as page:
        show_matches(page, first, second)
        assert_words_follow_the_answer(page, answer["contributions"])
        expect(page.locator("#matches-summary")).to_contain_text("factual maps above")
        # the regions can still be explored
        expect(page.locator("#match-view1 .cell")).to_have_count(answer["contributions"]["grid"][0] *
                                                                  answer["contributions"]["grid"][1])


def test_exact_contributions_follow_the_answer_and_hovering_a_region_lights_up_its_matches(
    browser: Browser, contributions_service_url: str, two_images: tuple[Path, Path], artifacts: Path
) -> None:
    url = contributions_service_url
    with opened(browser, url, **DESKTOP) as page:
        expect(page.locator("#model-info")).to_contain_text("Model tiny")
        assert page.locator("#method option[value=contributions]").is_enabled()
        show_matches(page, *two_images)
        contributions = explained(url, *two_images)["contributions"]
        rows, columns = contributions["grid"]
        expect(page.locator("#overlays figure img")).to_have_count(6)  # the originals and four overlays
        for view in ("#match-view1", "#match-view2"):
            expect(page.locator(f"{view} .cell")).to_have_count(rows * columns)
        assert_words_follow_the_answer(page, contributions)
        if contributions["evidence"] == "concentrated":
            assert_labels_fit(page, contributions["matches"], near_their_boxes=True)

        # Hovering a region of image 1 lights up image 2 by that region's row of the correspondence matrix,
        # strongest where the matrix is largest; hovering a region of image 2 uses its column.
        correspondence = contributions["correspondence"]
        first = contributions["matches"][0]
        for source, other, cell in (("#match-view1", "#match-view2", first["image1_cell"]),
                                    ("#match-view2", "#match-view1", first["image2_cell"])):
            index = cell[0] * columns + cell[1]
            page.locator(f"{source} .cell").nth(index).hover()
            expect(page.locator(f"{source} .cell.source")).to_have_count(1)
            values = correspondence[index] if source == "#match-view1" else [row[index] for row in correspondence]
            strengths = [float(s) for s in page.locator(f"{other} .cell").evaluate_all(
                "cells => cells.map(cell => cell.dataset.strength)")]
            peak = max(max(values), 0)
            expected = [max(v, 0) / peak if peak > 0 else 0 for v in values]
            assert strengths == pytest.approx(expected, abs=1e-3)
            assert strengths.index(max(strengths)) == values.index(max(values))
        page.screenshot(path=artifacts / "contributions.png", full_page=True)

        # Back to Grad-CAM: the page asks again and the matches go away.
        page.select_option("#method", "gradcam")
        expect(page.locator("#matches")).to_be_hidden(timeout=RESULT_TIMEOUT_MS)
        expect(page.locator(OVERLAYS)).to_have_count(4)
