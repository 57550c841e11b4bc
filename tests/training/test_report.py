"""report.html (training/report.py): written by every training run and by `evaluate --report`, self-contained,
with every figure, its numbers those of the model's own pairs."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from contract.manifest import REPORT_FILE
from tests.support.report_page import ReportPage, decoded, svg_text
from tests.training.conftest import TINY_CLASSIFY_EPOCHS, TINY_PAIR_EPOCHS
from training.__main__ import main
from training.report import ScoredPairs, class_pair_accuracy

FIGURES = ("roc", "score-histograms", "reliability", "confusion-matrix", "class-pairs", "learning-curves")


def test_training_writes_a_self_contained_report_with_every_figure(trained: tuple[Path, dict[str, Any]]) -> None:
    model_dir, manifest = trained
    html = (model_dir / REPORT_FILE).read_text()
    page = ReportPage(html)
    # Nothing to fetch and nothing to run: every image inline, no script, no style sheet or font from elsewhere.
    assert "://" not in html and "url(" not in html
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert page.fetched and all(url.startswith("data:image/") for url in page.fetched)

    for figure in FIGURES:
        assert len(page.images[figure]) == 1, figure
    threshold = f"{manifest['threshold']:.4f}"
    assert f"threshold {threshold}" in svg_text(page.images["roc"][0])
    assert f"threshold {threshold}" in svg_text(page.images["score-histograms"][0])
    confusion = manifest["metrics"]["test"]["confusion_matrix"]
    drawn = svg_text(page.images["confusion-matrix"][0])
    assert all(str(count) in drawn.split() for row in confusion for count in row)
    assert str(confusion) in html  # the summary table: the test split, as the manifest recorded it
    # one point per epoch of every stage the run recorded
    assert len(manifest["training"]["history"]) == TINY_CLASSIFY_EPOCHS + TINY_PAIR_EPOCHS
    assert "validation ROC AUC" in svg_text(page.images["learning-curves"][0])
    assert "Not measured for this model" in page.absent["faithfulness"]

    gallery = page.images["gallery"]
    assert gallery and len(gallery) % 2 == 0  # two images a pair
    for url in gallery:
        picture = Image.open(io.BytesIO(decoded(url)))
        assert picture.format == "JPEG" and list(picture.size[::-1]) == manifest["input_size"]


def test_accuracy_per_pair_of_classes_counts_each_pair_once_under_its_two_classes() -> None:
    # images: classes 0, 0, 1, 2; pairs (0,1) similar, (0,2) dissimilar 0/1, (1,3) dissimilar 0/2, (2,3) 1/2,
    # (3,2) 2/1 again; scores decide similar at >= 0.5
    pairs = (np.array([0, 0, 1, 2, 3]), np.array([1, 2, 3, 3, 2]), np.array([1, 0, 0, 0, 0], dtype=np.float32))
    scored = ScoredPairs("test", torch.zeros(4, 3, 2, 2, dtype=torch.uint8), [0, 0, 1, 2], pairs,
                         np.array([0.9, 0.7, 0.1, 0.2, 0.6]))
    accuracy, counts = class_pair_accuracy(scored, 3, threshold=0.5)
    assert counts.tolist() == [[1, 1, 1], [1, 0, 2], [1, 2, 0]]
    assert accuracy[0, 0] == 1 and accuracy[0, 1] == 0 and accuracy[0, 2] == 1
    assert accuracy[1, 2] == accuracy[2, 1] == 0.5
    assert np.isnan(accuracy[1, 1]) and np.isnan(accuracy[2, 2])
    # every pair counted once: the upper triangle's counts and hits give the overall accuracy back
    upper = np.triu_indices(3)
    assert counts[upper].sum() == 5
    assert np.nansum((accuracy * counts)[upper]) / 5 == pytest.approx(3 / 5)


def test_evaluate_report_says_when_a_model_recorded_no_history(model_store: Path, shapes_dataset: Path,
                                                              tmp_path: Path) -> None:
    """The suite's untrained `tiny` model has no training history: the report still has every other figure."""
    model = tmp_path / "tiny"
    shutil.copytree(model_store / "tiny", model)
    assert not (model / REPORT_FILE).exists()
    main(["evaluate", "--model", str(model), "--data", str(shapes_dataset), "--report"])
    page = ReportPage((model / REPORT_FILE).read_text())
    assert "records no per-epoch history" in page.absent["learning-curves"]
    assert page.images["learning-curves"] == []
    for figure in FIGURES[:-1]:
        assert len(page.images[figure]) == 1, figure
    assert "holds images the model was trained on" in (model / REPORT_FILE).read_text()  # --split all
