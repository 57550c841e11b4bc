"""PRECISION (contract/precision.py): fp32 serves as before; bf16 and fp16 run the backbone under autocast while the
head, Grad-CAM's gradients and the exact contributions stay fp32. Through the real service (uvicorn processes
started with PRECISION), through the batch runners on the suite's small model, and on real photos with the
default model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.model import ServedModel, explain_pairs, load_model, score_pairs
from app.settings import REPO_MODEL_STORE, Settings
from contract.backbone import AutocastBackbone
from contract.precision import PRECISIONS, Precision
from deploy.local_cluster import Replica
from tests.app.conftest import TEST_MODEL_NAME
from tests.conftest import SHARED_DATASETS, DrawnPair, drawn_pair
from tests.support.service import running_service
from training.data import decode_images
from training.evaluate import evaluation_set

REDUCED: tuple[Precision, ...] = ("bf16", "fp16")
# The largest |score - fp32 score| accepted on the suite's small model (its drawn pairs differed by up to 1.2e-3 in
# bf16 and 9e-5 in fp16 on this CPU); fp32 is exact, whatever the batch.
TINY_TOLERANCE: dict[Precision, float] = {"fp32": 1e-6, "bf16": 0.01, "fp16": 0.001}
# On the default model's pairs of photos, the largest and the mean |score - fp32 score| accepted: over its whole test
# split (1,096 pairs) this CPU measured bf16 0.060 and 0.0041, fp16 0.0075 and 0.00047 (`python -m
# bench.precision_bench`, bench/RESULTS.md, "Reduced precision"); these leave room for another CPU's kernels.
FLOWERS_TOLERANCE: dict[Precision, tuple[float, float]] = {"bf16": (0.1, 0.01), "fp16": (0.02, 0.002)}
# A pair this far from the threshold in fp32 keeps its decision in every precision.
CLEARLY_DECIDED = 0.1
SEEDS = (0, 1, 2)


def _pairs(folder: Path) -> list[DrawnPair]:
    return [drawn_pair(decision, folder, seed) for decision in ("similar", "dissimilar") for seed in SEEDS]


def _pictures(model: ServedModel, pairs: list[DrawnPair]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([model.picture(pair.image1.read_bytes(), "image1", None) for pair in pairs],
            [model.picture(pair.image2.read_bytes(), "image2", None) for pair in pairs])


@pytest.fixture(scope="module")
def fp32_model(model_store: Path) -> ServedModel:
    return load_model(model_store / TEST_MODEL_NAME, "cpu")


@pytest.mark.parametrize("precision", REDUCED)
def test_the_backbone_really_computes_in_reduced_precision_and_hands_on_fp32(
    model_store: Path, fp32_model: ServedModel, precision: Precision, tmp_path: Path
) -> None:
    """Catches a reduced precision that silently runs in fp32 (oneDNN's prepacked convolutions ignore autocast)."""
    reduced = load_model(model_store / TEST_MODEL_NAME, "cpu", precision)
    assert isinstance(reduced.module, AutocastBackbone) and reduced.precision == precision
    pictures1, _ = _pictures(fp32_model, _pairs(tmp_path))
    x = fp32_model.preprocessing.normalize(torch.stack(pictures1))
    with torch.inference_mode():
        exact, rounded = fp32_model.module.features(x), reduced.module.features(x)
    assert rounded.dtype == torch.float32
    assert not torch.equal(rounded, exact), f"{precision} computed exactly what fp32 computes"
    torch.testing.assert_close(rounded, exact, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("precision", REDUCED)
def test_explanations_stay_finite_and_exact_in_reduced_precision(model_store: Path, precision: Precision,
                                                                 tmp_path: Path) -> None:
    reduced = load_model(model_store / TEST_MODEL_NAME, "cpu", precision)
    pairs = _pairs(tmp_path)
    pictures1, pictures2 = _pictures(reduced, pairs)
    scores = score_pairs(reduced, pictures1, pictures2)
    for method in reduced.methods:
        explained = explain_pairs(reduced, pictures1, pictures2, method)
        for pair, result, score in zip(pairs, explained, scores, strict=True):
            assert result.similar == pair.similar and result.score == pytest.approx(score, abs=1e-6)
            for heatmap in result.maps:
                assert bool(np.isfinite(heatmap).all()) and 0 <= float(heatmap.min()) <= float(heatmap.max()) <= 1
            assert float(result.maps.factual1.max()) > 0, "no evidence at all for the decision"
            if method == "contributions":
                found = result.contributions
                assert found is not None and bool(np.isfinite(found.correspondence).all())
                # exact in fp32: each image's contributions sum to the raw logit less the threshold's
                for relative in (found.relative1, found.relative2):
                    assert float(relative.sum()) == pytest.approx(found.raw_logit - found.threshold_raw_logit,
                                                                  abs=1e-4)
                assert float(reduced.module.score_of_raw(torch.tensor(found.raw_logit))) == pytest.approx(
                    score, abs=1e-6)


@pytest.fixture(scope="module", params=PRECISIONS)
def precision_replica(request: pytest.FixtureRequest, model_store: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Precision, Replica]]:
    """The service started as a user starts it with PRECISION; COMPILE=auto in a reduced precision, which must
    serve the TorchScript backbone without compiling anything."""
    precision: Precision = request.param
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "PRECISION": precision,
           "COMPILE": "off" if precision == "fp32" else "auto",
           "COMPILE_CACHE_DIR": str(tmp_path_factory.mktemp("no_package"))}
    with running_service(env, tmp_path_factory.mktemp(f"precision_{precision}") / "uvicorn.log") as replica:
        yield precision, replica


def test_the_service_scores_and_explains_in_the_precision_it_is_given(
    precision_replica: tuple[Precision, Replica], fp32_model: ServedModel, tmp_path: Path
) -> None:
    precision, replica = precision_replica
    lines = [json.loads(line) for line in replica.log_path.read_text().splitlines() if line.startswith("{")]
    (ready,) = [line for line in lines if line["message"] == "ready"]
    assert (ready["precision"], ready["backbone"]) == (precision, "torchscript")
    if precision != "fp32":
        assert any(f"under {precision} autocast" in line["message"] for line in lines)
    pairs = _pairs(tmp_path)
    expected = score_pairs(fp32_model, *_pictures(fp32_model, pairs))
    with httpx.Client(base_url=replica.url, timeout=60, trust_env=False) as client:
        for pair, fp32_score in zip(pairs, expected, strict=True):
            answer = client.post("/similarity", files=pair.files)
            assert answer.status_code == 200, answer.text
            scored = answer.json()
            assert scored["similar"] == pair.similar
            assert abs(scored["score"] - fp32_score) <= TINY_TOLERANCE[precision], (scored["score"], fp32_score)
            explained = client.post("/explain", files=pair.files,
                                    data={"method": "contributions", "include_correspondence": "true"})
            assert explained.status_code == 200, explained.text
            body = explained.json()
            assert body["score"] == pytest.approx(scored["score"], abs=1e-6) and body["similar"] == pair.similar
            contributions = body["contributions"]
            correspondence = [value for row in contributions["correspondence"] for value in row]
            assert all(math.isfinite(value) for value in correspondence)
            assert sum(correspondence) + contributions["offset"] == pytest.approx(contributions["raw_logit"],
                                                                                  abs=1e-4)
            gradcam = client.post("/explain", files=pair.files)
            assert gradcam.status_code == 200 and gradcam.json()["similar"] == pair.similar


def test_an_unknown_precision_is_refused_saying_which_there_are(model_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'fp32', 'bf16' or 'fp16'"):
        Settings(_env_file=None, precision="fp64")
    env = {"MODEL_STORE": str(model_store), "MODEL_NAME": TEST_MODEL_NAME, "PRECISION": "fp64"}
    with running_service(env, tmp_path / "uvicorn.log", wait_ready=False) as replica:
        replica.process.wait(timeout=120)
    log = replica.log_path.read_text()
    assert replica.process.returncode != 0
    assert "precision" in log and "'fp32', 'bf16' or 'fp16'" in log, log


FLOWERS_MODEL = REPO_MODEL_STORE / "flowers"
FLOWERS = SHARED_DATASETS / "flowers"
FLOWER_PAIRS = 16


@pytest.mark.skipif(not FLOWERS.is_dir() or not (FLOWERS_MODEL / "model.pt").is_file(),
                    reason=f"needs the flowers dataset at {FLOWERS} and the default model at {FLOWERS_MODEL}")
@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_precision_scores_real_photos_close_to_fp32(precision: Precision) -> None:
    """The default model on pairs of its test split: scores within FLOWERS_TOLERANCE, and the decision of every pair
    clearly away from the threshold unchanged."""
    exact = load_model(FLOWERS_MODEL, "cpu")
    reduced = load_model(FLOWERS_MODEL, "cpu", precision)
    chosen = evaluation_set(exact.manifest, FLOWERS, "test", exact.manifest.training["seed"])
    # evenly spread over the split's pairs: similar and dissimilar ones of every class
    picked = range(0, len(chosen.pairs[0]), len(chosen.pairs[0]) // FLOWER_PAIRS)[:FLOWER_PAIRS]
    first, second = chosen.pairs[0][list(picked)], chosen.pairs[1][list(picked)]
    pictures = decode_images([chosen.paths[index] for index in [*first, *second]], exact.input_size)
    pictures1, pictures2 = list(pictures[:FLOWER_PAIRS]), list(pictures[FLOWER_PAIRS:])
    expected = torch.tensor(score_pairs(exact, pictures1, pictures2))
    measured = torch.tensor(score_pairs(reduced, pictures1, pictures2))
    largest, mean = FLOWERS_TOLERANCE[precision]
    difference = (measured - expected).abs()
    assert float(difference.max()) <= largest and float(difference.mean()) <= mean, difference
    assert not torch.equal(measured, expected), f"{precision} scored exactly as fp32"
    threshold = exact.threshold
    clear = (expected - threshold).abs() > CLEARLY_DECIDED
    assert int(clear.sum()) >= FLOWER_PAIRS // 2, "too few clearly decided pairs to check"
    assert torch.equal((measured >= threshold)[clear], (expected >= threshold)[clear])
