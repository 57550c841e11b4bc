"""/explain with method=contributions over real HTTP on the real small model, and version-1 models, which are
still served with Grad-CAM and refuse contributions with a clear 422."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from app.inference import region_name
from app.model import ModelLoadError, load_model
from app.schemas import SPREAD_FACTOR
from app.settings import Settings
from tests.app.conftest import TEST_MODEL_NAME
from tests.conftest import DECISIONS
from tests.support.images import class_image, drawn_image, encode, pair_files
from tests.support.model_folders import with_version1_module
from tests.support.service import serve_in_thread

EXIF_ORIENTATION = 0x0112
ROTATED_90 = 6  # EXIF: the stored pixels are turned 90 degrees clockwise to stand upright


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


def _rotated_jpeg(colour: str, stored_size: tuple[int, int]) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90
    return encode(class_image(colour, 41, stored_size), "JPEG", quality=92, exif=exif.tobytes())


@pytest.mark.parametrize("decision", DECISIONS)
def test_contributions_decompose_the_returned_score_exactly(client: httpx.Client, model_store: Path,
                                                            decision: str) -> None:
    """Catches contributions that do not add up to the score returned with them, totals or a factual target
    that do not follow the decision (a red and a red shape: similar; a red and a blue one: dissimilar), and
    match boxes not in the upright original's pixels."""
    # image1 is 96 x 72; image2 is stored 96 x 72 but upright 72 x 96 (EXIF): boxes are in upright pixels.
    other = "red" if decision == "similar" else "blue"
    files = pair_files(encode(class_image("red", 40, (96, 72)), "PNG"), _rotated_jpeg(other, (96, 72)))
    response = client.post("/explain", files=files, data={"method": "contributions",
                                                           "include_correspondence": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"] == "contributions" and body["similar"] == (decision == "similar")
    found = body["contributions"]
    rows, columns = found["grid"]
    assert (rows, columns) == (4, 4)  # tiny's cells are 32 px at 128 x 128

    # The raw logit is the returned score's (through the model's own squash and sigmoid) ...
    module = load_model(model_store / TEST_MODEL_NAME, "cpu").module
    assert float(module.score_of_raw(torch.tensor([found["raw_logit"]]))) == pytest.approx(body["score"], abs=1e-6)
    assert float(module.score_of_raw(torch.tensor(found["threshold_raw_logit"], dtype=torch.float64))) == \
        pytest.approx(body["threshold"], abs=1e-9)
    # ... and exactly the sum of the correspondence matrix plus the offset.
    matrix = torch.tensor(found["correspondence"])
    assert matrix.shape == (rows * columns, rows * columns)
    assert float(matrix.sum()) + found["offset"] == pytest.approx(found["raw_logit"], rel=1e-4, abs=1e-4)
    distance = found["raw_logit"] - found["threshold_raw_logit"]
    for image in ("image1", "image2"):
        totals = found[image]
        assert totals["positive"] >= 0 >= totals["negative"]
        assert totals["positive"] + totals["negative"] == pytest.approx(distance, rel=1e-4, abs=1e-4)
        assert (totals["positive"] > -totals["negative"]) == body["similar"]

    matches = found["matches"]
    assert len(matches) == 5  # the default top_matches
    assert matches[0]["contribution"] == pytest.approx(float(matrix.max()), abs=1e-6)
    positive_total = float(matrix.clamp(min=0).sum())
    for match in matches:
        (row1, col1), (row2, col2) = match["image1_cell"], match["image2_cell"]
        assert match["contribution"] == pytest.approx(float(matrix[row1 * columns + col1, row2 * columns + col2]),
                                                      abs=1e-6)
        assert match["share"] == pytest.approx(match["contribution"] / positive_total, rel=1e-4)
        # The grid is stretched over each whole original: 24 x 18 px cells on image 1, 18 x 24 px on image 2.
        assert match["image1_box"] == [24 * col1, 18 * row1, 24 * (col1 + 1), 18 * (row1 + 1)]
        assert match["image2_box"] == [18 * col2, 24 * row2, 18 * (col2 + 1), 24 * (row2 + 1)]
        # In words, on the 4 x 4 grid: rows and columns 0 | 1, 2 | 3 fall in the thirds (upper, middle, lower).
        assert match["image1_region"] == region_name(match["image1_cell"], (rows, columns))
    # What the matches carry together, and how to read them, from the matrix itself.
    assert found["positive_evidence"] == pytest.approx(positive_total, rel=1e-4)
    assert found["matches_share"] == pytest.approx(sum(match["share"] for match in matches), rel=1e-6)
    stands_out = float(matrix.max()) / positive_total >= SPREAD_FACTOR / (rows * columns) ** 2
    assert found["evidence"] == ("not_similar" if not body["similar"] else
                                 "concentrated" if stands_out else "spread")
    # The overlays are drawn from the contributions, over the upright originals.
    factual = body["explanations"]["factual"]
    assert (factual["target"], body["explanations"]["counterfactual"]["target"]) == \
        ((decision, "dissimilar") if decision == "similar" else (decision, "similar"))
    assert (factual["image2"]["width"], factual["image2"]["height"]) == (72, 96)


def test_regions_are_named_by_the_third_of_the_image_their_centre_falls_in() -> None:
    names = [[region_name((row, column), (7, 7)) for column in range(7)] for row in range(7)]
    assert names[0] == ["upper left"] * 2 + ["upper centre"] * 3 + ["upper right"] * 2
    assert names[3] == ["middle left"] * 2 + ["centre"] * 3 + ["middle right"] * 2
    assert [row[6] for row in names] == ["upper right"] * 2 + ["middle right"] * 3 + ["lower right"] * 2
    assert region_name((0, 0), (1, 1)) == "centre"
    assert [region_name((0, column), (1, 4)) for column in range(4)] == [
        "middle left", "centre", "centre", "middle right"]


def test_contributions_are_the_same_pair_for_pair_as_a_direct_call(client: httpx.Client, model_store: Path) -> None:
    first, second = drawn_image(42, (120, 80)), drawn_image(43, (64, 64))
    files = pair_files(encode(first, "PNG"), encode(second, "PNG"))
    body = client.post("/explain", files=files, data={"method": "contributions", "top_matches": "3"}).json()
    assert len(body["contributions"]["matches"]) == 3 and body["contributions"]["correspondence"] is None
    gradcam = client.post("/explain", files=files).json()
    assert gradcam["method"] == "gradcam" and gradcam["contributions"] is None
    assert gradcam["score"] == pytest.approx(body["score"], abs=1e-6)
    assert client.post("/explain", files=files, data={"method": "contributions", "top_matches": "0"}
                       ).json()["contributions"]["matches"] == []


@pytest.mark.parametrize(("form", "field"), [({"method": "lime"}, "body.method"),
                                             ({"method": "contributions", "top_matches": "51"}, "body.top_matches"),
                                             ({"method": "contributions", "top_matches": "-1"}, "body.top_matches")])
def test_bad_contribution_options_are_refused(client: httpx.Client, form: dict[str, str], field: str) -> None:
    files = pair_files(encode(drawn_image(44), "PNG"), encode(drawn_image(45), "PNG"))
    assert field in _problem(client.post("/explain", files=files, data=form), 422)["detail"]
    assert client.post("/explain", files=files, data={"method": "contributions"}).status_code == 200


def test_a_version_1_model_is_served_with_grad_cam_and_refuses_contributions(model_store: Path,
                                                                             tmp_path: Path) -> None:
    with_version1_module(model_store / TEST_MODEL_NAME, tmp_path / "old")
    files = pair_files(encode(drawn_image(46), "PNG"), encode(drawn_image(47), "JPEG"))
    with serve_in_thread(Settings(model_store=tmp_path, model_name="old", max_batch_wait_ms=10)) as url, \
            httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        model = client.get("/model").json()
        assert model["format_version"] == 1 and model["explain_methods"] == ["gradcam"]
        explained = client.post("/explain", files=files)
        assert explained.status_code == 200, explained.text
        assert explained.json()["method"] == "gradcam" and explained.json()["contributions"] is None
        problem = _problem(client.post("/explain", files=files, data={"method": "contributions"}), 422)
        assert problem["type"] == "urn:siamcam:problem:method-unavailable"
        assert "format_version 1" in problem["detail"] and "re-export it" in problem["detail"]
        assert "python -m training upgrade --model" in problem["detail"]
        assert "method=gradcam" in problem["detail"]
        # The refusal cost nothing and broke nothing: the service keeps serving.
        assert client.post("/similarity", files=files).status_code == 200
        assert client.post("/explain", files=files).status_code == 200


def test_a_version_2_manifest_on_a_model_without_the_version_2_methods_is_refused(model_store: Path,
                                                                                 tmp_path: Path) -> None:
    with_version1_module(model_store / TEST_MODEL_NAME, tmp_path / "mislabelled", format_version=2)
    with pytest.raises(ModelLoadError, match="lacks the contract method.s. embed_cells, .* of format version 2"):
        load_model(tmp_path / "mislabelled", "cpu")
