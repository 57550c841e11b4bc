"""The committed default model: the file matches its manifest and keeps the contract the service relies on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from contract.torchscript import load_torchscript
from tests.conftest import SHARED_DATASETS
from training.data import scan_image_folder, split_by_image

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "model_store" / "flowers"
FLOWERS = SHARED_DATASETS / "flowers"

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.pt").exists(),
    reason=f"no default model at {DEFAULT_MODEL}: train it with `make default-model`",
)


def test_default_model_matches_its_manifest_and_keeps_the_contract() -> None:
    manifest = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    assert hashlib.sha256((DEFAULT_MODEL / "model.pt").read_bytes()).hexdigest() == manifest["sha256"]
    assert (DEFAULT_MODEL / "model.pt").stat().st_size <= 50 * 2**20
    module = load_torchscript(DEFAULT_MODEL / "model.pt", manifest["format_version"])
    x = torch.randn(2, 3, *manifest["input_size"], generator=torch.Generator().manual_seed(0))
    feature_maps = module.features(x).detach().requires_grad_()
    fm = manifest["feature_map"]
    assert tuple(feature_maps.shape) == (2, fm["channels"], fm["height"], fm["width"])
    embeddings = module.embed(feature_maps)
    assert tuple(embeddings.shape) == (2, manifest["embedding_dim"])
    # a pair of identical images must still have a gradient: the service explains it through this score
    scores = module.similarity(embeddings, embeddings.detach())
    assert bool(((scores > 0) & (scores < 1)).all())
    scores.sum().backward()
    assert bool(torch.isfinite(feature_maps.grad).all()) and float(feature_maps.grad.abs().max()) > 0
    for split in ("validation", "test"):
        assert set(manifest["metrics"][split]) >= {"accuracy", "roc_auc", "precision", "recall", "confusion_matrix"}


@pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"the flowers dataset is not at {FLOWERS}")
def test_default_models_split_is_made_again_exactly() -> None:
    """`evaluate --split test` re-makes the model's split from its manifest: the splitter must not drift."""
    recorded = json.loads((DEFAULT_MODEL / "manifest.json").read_text())["dataset"]["split"]
    folder = scan_image_folder(FLOWERS)
    split = split_by_image(folder.labels, recorded["validation_fraction"], recorded["test_fraction"], recorded["seed"])
    assert split.fingerprint(folder) == recorded["sha256"]
