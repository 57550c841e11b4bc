"""Deletion and insertion curves (`python -m training evaluate --faithfulness`): their mechanics on the small
test model, the explanations beating a random order there, and the measurement on a model trained on a grid of
cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from app.model import load_model
from contract.manifest import REPORT_FILE, read_manifest
from tests.support.images import class_pairs, drawn_image
from tests.support.report_page import ReportPage, svg_text
from tests.training.conftest import run_training, train_command
from training import faithfulness
from training.__main__ import main


def test_cell_masks_tile_the_input() -> None:
    masks = faithfulness.cell_masks((3, 4), (50, 70))
    assert masks.shape == (12, 50, 70)
    assert bool((masks.sum(dim=0) == 1).all())


def test_areas_are_over_the_fraction_of_cells() -> None:
    falling = torch.linspace(1, 0, 17)[None]
    assert float(faithfulness.area(falling)) == pytest.approx(0.5)
    assert float(faithfulness.area(torch.full((1, 5), 0.3))) == pytest.approx(0.3)


def test_curves_start_and_end_where_they_must(model_store: Path) -> None:
    served = load_model(model_store / "tiny", "cpu")
    x1 = torch.stack([served.preprocess(drawn_image(seed)) for seed in (60, 61)])
    x2 = torch.stack([served.preprocess(drawn_image(seed)) for seed in (62, 63)])
    assert served.threshold_raw_logit is not None
    similar, orders = faithfulness.cell_orders(served.module, x1, x2, served.threshold, served.threshold_raw_logit,
                                               torch.Generator().manual_seed(0))
    cells = served.manifest.feature_map.height * served.manifest.feature_map.width
    for order in orders.values():  # every order is a permutation of the cells
        assert torch.equal(order.sort(dim=1).values, torch.arange(cells).expand(2, -1))
    with torch.no_grad():
        scores = served.module(x1, x2)
    decided = torch.where(similar, scores, 1 - scores)
    masks = faithfulness.cell_masks((4, 4), served.input_size)
    deletion = faithfulness.curves(served.module, x1, x2, similar, orders["contributions"], masks, "deletion")
    insertion = faithfulness.curves(served.module, x1, x2, similar, orders["contributions"], masks, "insertion")
    assert deletion.shape == insertion.shape == (2, cells + 1)
    # Nothing deleted and everything inserted: the pair as it is; everything deleted and nothing inserted:
    # image 1 in its mean colour.
    torch.testing.assert_close(deletion[:, 0], decided, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion[:, -1], decided, atol=1e-5, rtol=0)
    torch.testing.assert_close(deletion[:, -1], insertion[:, 0], atol=1e-5, rtol=0)


# How much better than a random order of cells each explanation must do on the suite's small model: on these 6
# pairs both measured deletion 0.695 against 0.823 and insertion 0.900 against 0.835.
SMALL_MODEL_MARGIN = 0.03


def test_both_explanations_beat_a_random_order_on_the_small_model(model_store: Path) -> None:
    """Catches rankings that are no better than chance (an explanation of the wrong target, or of the wrong
    image, ranks the cells that matter last): measured now, on pairs of both decisions, not read from a
    manifest. tiny's decision rests on the cells its shapes cover, so deleting the cells an explanation puts
    first must lower the decided class's probability sooner than a random order, and inserting them raise it
    sooner."""
    served = load_model(model_store / "tiny", "cpu")
    firsts, seconds, same = class_pairs(6, seed=300)
    x1, x2 = (torch.stack([served.preprocess(image) for image in images]) for images in (firsts, seconds))
    assert served.threshold_raw_logit is not None
    measured = faithfulness.measure(served.module, served.manifest, served.threshold_raw_logit, [x1], [x2], seed=0)
    assert measured["pairs"] == 6 and measured["grid"] == [4, 4] and 0 < sum(same) < 6
    for method in ("gradcam", "contributions"):
        assert measured["deletion"][method] <= measured["deletion"]["random"] - SMALL_MODEL_MARGIN, measured
        assert measured["insertion"][method] >= measured["insertion"]["random"] + SMALL_MODEL_MARGIN, measured


def test_faithfulness_needs_a_format_version_2_model(model_store: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(model_store / "tiny", tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--model", str(tmp_path / "old"), "--data", str(tmp_path), "--faithfulness"])
    assert exited.value.code == 2
    assert "which need format version 2: re-export the model" in capsys.readouterr().err


def test_evaluate_records_faithfulness_in_the_manifest(shapes_dataset: Path, tmp_path: Path) -> None:
    # At 64 x 64 px the resnet18 grid is 2 x 2: cells to rank (the suite's other tiny runs have one cell). The
    # training runs in a process of its own, so that the model is the same whichever tests ran before (see
    # run_training): on 36 pairs of 4 cells the margins over the random order are two to three hundredths
    # (deletion 0.929 against 0.950, insertion 0.985 against 0.957). Evaluating a saved model does not depend on
    # that state, so it runs here.
    run_training(train_command(shapes_dataset, tmp_path, "--input-size", "64"))
    model = tmp_path / "shapes"
    main(["evaluate", "--model", str(model), "--data", str(shapes_dataset), "--split", "test", "--faithfulness",
          "--report", "--json", str(tmp_path / "metrics.json")])
    measured = json.loads((tmp_path / "metrics.json").read_text())["faithfulness"]
    recorded = read_manifest(model).metrics["faithfulness"]
    assert recorded == measured
    assert recorded["split"] == "test" and recorded["grid"] == [2, 2]
    assert recorded["pairs"] == json.loads((tmp_path / "metrics.json").read_text())["test"]["pairs"]
    for curve in ("deletion", "insertion"):
        assert set(recorded[curve]) == {"gradcam", "contributions", "random"}
        assert all(0 <= value <= 1 for value in recorded[curve].values())
    # The exact contributions rank cells better than chance on a trained model: deleting their most important
    # cells first lowers the decided class's probability sooner, inserting them first raises it sooner.
    for method in ("gradcam", "contributions"):
        assert recorded["deletion"][method] < recorded["deletion"]["random"], recorded
        assert recorded["insertion"][method] > recorded["insertion"]["random"], recorded

    # The mean curves are recorded too, and the model report (--report) draws them with their areas.
    drawn = svg_text(ReportPage((model / REPORT_FILE).read_text()).images["faithfulness"][0])
    for curve in ("deletion", "insertion"):
        for order, recorded_area in recorded[curve].items():
            values = torch.tensor(recorded["curves"][curve][order])
            assert len(values) == 4 + 1  # after deleting or inserting 0, 1, ..., 4 cells
            # the mean of the pairs' areas is the area under their mean curve
            assert float(faithfulness.area(values[None])) == pytest.approx(recorded_area, abs=2e-4)
            assert f"({recorded_area:.4f})" in drawn
