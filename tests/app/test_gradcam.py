"""The Grad-CAM maps: batch-independent, equal to pytorch-grad-cam's for both decisions, and defined for every
pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.model import ServedModel
from bench.gradcam_reference import as_loaded, pytorch_grad_cam_maps
from contract.explainers import Decided, PairMaps, decide, gradcam

from tests.app.conftest import TEST_MODEL_NAME
from tests.support.backbones import BACKBONES, served_model
from tests.support.images import class_pairs

PAIRS = 8


@pytest.fixture(scope="module", params=BACKBONES)
def served(model_store: Path, request: pytest.FixtureRequest) -> ServedModel:
    return served_model(model_store / TEST_MODEL_NAME, request.param, request)


@pytest.fixture(scope="module")
def batch(served: ServedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """PAIRS pairs, similar at even indices and dissimilar at odd ones (tiny decides them so: checked here)."""
    firsts, seconds, same = class_pairs(PAIRS)
    x1, x2 = (torch.stack([served.preprocess(image) for image in images]) for images in (firsts, seconds))
    assert decide(served.module, x1, x2, served.threshold).similar.tolist() == same
    return x1, x2


def explain_batch(served: ServedModel, x1: torch.Tensor, x2: torch.Tensor) -> tuple[Decided, PairMaps]:
    decided = decide(served.module, x1, x2, served.threshold)
    maps = gradcam.explain(served.module, decided.feature_maps1, decided.feature_maps2, decided.similar,
                           x1.shape[-2:])
    return decided, maps


def test_a_pair_is_explained_the_same_alone_and_in_a_batch(served: ServedModel, batch) -> None:
    x1, x2 = batch
    decided, together = explain_batch(served, x1, x2)
    for index in (0, 5):
        decided_alone, alone = explain_batch(served, x1[index:index + 1], x2[index:index + 1])
        assert torch.equal(decided_alone.similar[0], decided.similar[index])
        torch.testing.assert_close(decided_alone.scores[0], decided.scores[index], rtol=0, atol=1e-5)
        for name in PairMaps._fields:
            difference = (getattr(alone, name)[0] - getattr(together, name)[index]).abs().max()
            assert difference <= 1e-5, f"{name} of pair {index} differs by {difference:.2e}"


def _pearson(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


@pytest.fixture(scope="module")
def reference_maps() -> dict[tuple[int, bool], dict[str, np.ndarray]]:
    """pytorch-grad-cam's maps of model.pt by (pair, decision), computed once for both backbones' tests."""
    return {}


def test_maps_match_pytorch_grad_cam(served: ServedModel, batch, reference_maps) -> None:
    """Catches maps that differ from the reference implementation's, on similar and dissimilar pairs alike (an
    explainer that always took "similar" as the factual target would fail the dissimilar ones)."""
    x1, x2 = batch
    decided, ours = explain_batch(served, x1, x2)
    compared = {True: 0, False: 0}
    as_in_its_file = None
    for index in range(4):
        key = (index, bool(decided.similar[index]))
        if key not in reference_maps:
            if as_in_its_file is None:
                as_in_its_file = as_loaded(served)
            pair = (x1[index:index + 1], x2[index:index + 1])
            reference_maps[key] = pytorch_grad_cam_maps(as_in_its_file, *pair, key[1])
        for name, theirs in reference_maps[key].items():
            mine = getattr(ours, name)[index].numpy()
            assert theirs.shape == mine.shape
            if mine.max() == 0:  # no positive evidence: theirs must be blank too
                assert theirs.max() < 1e-3, f"pair {index} {name}"
                continue
            correlation = _pearson(mine, theirs)
            assert correlation >= 0.99, f"pair {index} {name}: r = {correlation:.4f}"
            compared[bool(decided.similar[index])] += 1
    # The comparison means something only if real maps were compared, for both decisions.
    assert compared[True] >= 3 and compared[False] >= 3, compared


def test_identical_images_get_finite_maps(served: ServedModel, batch) -> None:
    x1, _ = batch
    decided, result = explain_batch(served, x1, x1.clone())
    assert torch.isfinite(decided.scores).all()
    for name in PairMaps._fields:
        maps = getattr(result, name)
        assert torch.isfinite(maps).all(), name
        assert maps.min() >= 0 and maps.max() <= 1, name
        peaks = maps.amax(dim=(-2, -1))
        # Each map is either normalised to a peak of 1 or flagged blank (all zeros), nothing in between.
        assert torch.all((peaks == 1) | (peaks == 0)), name
    # The factual maps carry evidence: the score's gradient does not vanish for identical images.
    assert result.factual1.amax(dim=(-2, -1)).min() == 1
