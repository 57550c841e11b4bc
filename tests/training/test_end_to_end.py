"""Train on the drawn shapes, export, reload the TorchScript file as the service does, and check the contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.torchscript import load_torchscript
from tests.training.conftest import TINY_CLASSIFY_EPOCHS, TINY_PAIR_EPOCHS, train_command
from training.__main__ import main


def test_manifest_describes_the_file_and_the_run(trained: tuple[Path, dict[str, Any]]) -> None:
    model_dir, manifest = trained
    assert manifest["sha256"] == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    assert manifest["input_size"] == [32, 32]
    assert manifest["dataset"]["classes"] == ["circle", "square", "triangle"]
    assert sum(manifest["dataset"]["images"].values()) == 90
    assert len(manifest["dataset"]["split"]["sha256"]) == 64
    assert manifest["training"]["command"].startswith("python -m training train --data ")
    stages = [record["stage"] for record in manifest["training"]["history"]]
    assert stages == ["classify"] * TINY_CLASSIFY_EPOCHS + ["pairs"] * TINY_PAIR_EPOCHS
    assert 0 < manifest["threshold"] < 1


def test_metrics_beat_chance(trained: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = trained
    for split in ("validation", "test"):
        metrics = manifest["metrics"][split]
        assert metrics["pairs"] == 2 * manifest["dataset"]["images"][split]
        assert metrics["roc_auc"] > 0.75, metrics
        assert metrics["accuracy"] > 0.65, metrics
        assert sum(map(sum, metrics["confusion_matrix"])) == metrics["pairs"]


def test_exported_file_keeps_the_contract(trained: tuple[Path, dict[str, Any]]) -> None:
    model_dir, manifest = trained
    module = load_torchscript(model_dir / "model.pt", manifest["format_version"])
    x = torch.randn(3, 3, *manifest["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feature_maps = module.features(x)
        embeddings = module.embed(feature_maps)
        scores = module.similarity(embeddings, embeddings.flip(0))
        forward = module(x, x.flip(0))
    fm = manifest["feature_map"]
    assert tuple(feature_maps.shape) == (3, fm["channels"], fm["height"], fm["width"])
    assert tuple(embeddings.shape) == (3, manifest["embedding_dim"])
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    torch.testing.assert_close(forward, scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("identical", [False, True], ids=["different images", "identical images"])
def test_score_gradient_reaches_both_images(trained: tuple[Path, dict[str, Any]], identical: bool) -> None:
    """The service explains a pair through d score / d features: it must be finite and non-zero for both sides."""
    model_dir, manifest = trained
    module = load_torchscript(model_dir / "model.pt", manifest["format_version"])
    generator = torch.Generator().manual_seed(2)
    x1 = torch.randn(1, 3, *manifest["input_size"], generator=generator)
    x2 = x1.clone() if identical else torch.randn(1, 3, *manifest["input_size"], generator=generator)
    f1 = module.features(x1).detach().requires_grad_()
    f2 = module.features(x2).detach().requires_grad_()
    module.similarity(module.embed(f1), module.embed(f2)).sum().backward()
    for gradient in (f1.grad, f2.grad):
        assert gradient is not None and bool(torch.isfinite(gradient).all())
        assert float(gradient.abs().max()) > 0


def test_evaluate_reproduces_the_recorded_test_metrics(trained: tuple[Path, dict[str, Any]], shapes_dataset: Path,
                                                       tmp_path: Path) -> None:
    model_dir, manifest = trained
    main(["evaluate", "--model", str(model_dir), "--data", str(shapes_dataset), "--split", "test",
          "--json", str(tmp_path / "metrics.json")])
    measured = json.loads((tmp_path / "metrics.json").read_text())["test"]
    assert measured["confusion_matrix"] == manifest["metrics"]["test"]["confusion_matrix"]
    assert measured["roc_auc"] == pytest.approx(manifest["metrics"]["test"]["roc_auc"], abs=1e-6)



def test_mixed_precision_trains_and_exports_a_float32_model(trained: tuple[Path, dict[str, Any]],
                                                            shapes_dataset: Path, tmp_path: Path) -> None:
    """`--amp` runs the steps under bfloat16 autocast (the CUDA default; asked for here on CPU, so this path is
    tested without a GPU). The exported file must still be a float32 model that keeps the contract."""
    _, float32_manifest = trained
    assert float32_manifest["training"]["mixed_precision"] is False  # the default on CPU
    main(train_command(shapes_dataset, tmp_path, "--amp"))
    manifest = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    assert manifest["training"]["mixed_precision"] is True
    history = manifest["training"]["history"]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in history)
    assert manifest["metrics"]["test"]["roc_auc"] > 0.75, manifest["metrics"]
    module = load_torchscript(tmp_path / "shapes" / "model.pt", manifest["format_version"])
    x = torch.randn(2, 3, *manifest["input_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feature_maps = module.features(x)
        scores = module(x, x.flip(0))
    assert feature_maps.dtype == torch.float32 and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
