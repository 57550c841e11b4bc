"""The committed default model: the file matches its manifest and keeps the contract the service relies on."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from bench.paper_table import DEFAULT_RECIPE, RECIPES
from contract.manifest import REPORT_FILE
from contract.torchscript import load_torchscript
from tests.conftest import SHARED_DATASETS
from tests.support.report_page import ReportPage
from training.data import scan_image_folder, split_by_image

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "model_store" / "flowers"
FLOWERS = SHARED_DATASETS / "flowers"

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.pt").exists(),
    reason=f"no default model at {DEFAULT_MODEL}: train it with `make default-model`",
)


def test_default_model_matches_its_manifest_and_keeps_the_contract() -> None:
    manifest = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    assert hashlib.sha256((DEFAULT_MODEL / "model.pt").read_bytes()).hexdigest() == manifest["sha256"]
    assert (DEFAULT_MODEL / "model.pt").stat().st_size <= 30 * 10**6
    # maps of at least 7 x 7 cells: an input of at least 224 px on a backbone of stride 32
    assert min(manifest["input_size"]) >= 224
    assert min(manifest["feature_map"]["height"], manifest["feature_map"]["width"]) >= 7
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


# How much better than a random order of cells each explanation's order must do on the default model (areas
# under the curves over the fraction of cells, in [0, 1]).
FAITHFULNESS_MARGIN = 0.02


def test_both_explanations_beat_a_random_order_on_the_default_model() -> None:
    manifest = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    measured = manifest["metrics"].get("faithfulness")
    if manifest["format_version"] < 2 or measured is None:
        pytest.skip("the default model has no faithfulness figures: re-export it as format version 2 and run "
                    "`python -m training evaluate --model model_store/flowers --data ../shared/datasets/flowers "
                    "--split test --faithfulness`")
    for method in ("gradcam", "contributions"):
        assert measured["deletion"][method] <= measured["deletion"]["random"] - FAITHFULNESS_MARGIN, measured
        assert measured["insertion"][method] >= measured["insertion"]["random"] + FAITHFULNESS_MARGIN, measured


def test_the_docs_quote_the_default_models_faithfulness_as_measured() -> None:
    """Catches documentation that quotes the figures of an earlier model (the README quoted 0.770 / 0.916 while the
    manifest said 0.7599 / 0.8961)."""
    measured = json.loads((DEFAULT_MODEL / "manifest.json").read_text())["metrics"].get("faithfulness")
    if measured is None:
        pytest.skip("the default model has no faithfulness figures")
    text = " ".join((REPO / "docs" / "training.md").read_text().split())
    quoted = re.search(r"deletion (\d\.\d+) for both methods against (\d\.\d+) for the random order \(lower is "
                       r"better\), insertion (\d\.\d+) against (\d\.\d+)", text)
    assert quoted, "docs/training.md no longer quotes the default model's faithfulness in the expected words"
    expected = (measured["deletion"]["contributions"], measured["deletion"]["random"],
                measured["insertion"]["contributions"], measured["insertion"]["random"])
    assert [float(value) for value in quoted.groups()] == pytest.approx(expected, abs=5e-4)


def test_make_default_model_trains_the_paper_tables_recipe() -> None:
    """`make default-model` and bench/paper_table.py's recipe of the default model must not drift apart, and the
    committed model must have been trained by that command."""
    lines = (REPO / "Makefile").read_text().split("default-model: install\n", 1)[1].split("\n")
    recipe: list[str] = []
    for line in lines:
        recipe += shlex.split(line.strip().removesuffix("\\"))
        if not line.endswith("\\"):
            break
    data_at = recipe.index("--data")
    assert recipe[recipe.index("-m") + 1:data_at] == ["training", "train"]
    assert tuple(recipe[data_at + 2:]) == RECIPES[DEFAULT_RECIPE]
    command = json.loads((DEFAULT_MODEL / "manifest.json").read_text())["training"]["command"]
    assert shlex.split(command)[6:] == list(RECIPES[DEFAULT_RECIPE])


def test_the_default_model_has_its_report_on_its_test_split() -> None:
    """The bundled model's report.html (GET /model/report) is this model's, on the held-back test split, with
    every figure: its learning curves and faithfulness figures included."""
    manifest = json.loads((DEFAULT_MODEL / "manifest.json").read_text())
    html = (DEFAULT_MODEL / REPORT_FILE).read_text()
    assert f"sha256 {manifest['sha256'][:12]}" in " ".join(html.split())
    assert "--split test" in html and "<strong>test</strong> split" in html
    page = ReportPage(html)
    for figure in ("roc", "score-histograms", "reliability", "confusion-matrix", "class-pairs", "learning-curves",
                   "faithfulness"):
        assert len(page.images[figure]) == 1, f"{figure} missing: redraw it with the command in model_store/README.md"
    assert str(manifest["metrics"]["test"]["confusion_matrix"]) in html  # its figures are the recorded test split's
