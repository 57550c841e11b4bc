"""Exact contributions (format version 2): the raw logit is the sum of the correspondence matrix plus the offset,
the maps are drawn from the threshold-relative contributions, and pairs never influence each other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.model import ServedModel
from contract.explainers import PairMaps, cell_box, contributions, decide
from contract.torchscript import TorchScriptError, load_torchscript, save_torchscript
from tests.support.backbones import BACKBONES, served_model
from tests.support.images import class_pairs

PAIRS = 8
RELATIVE = 1e-4


@pytest.fixture(scope="module", params=BACKBONES)
def served(model_store: Path, request: pytest.FixtureRequest) -> ServedModel:
    return served_model(model_store / "tiny", request.param, request)


@pytest.fixture(scope="module")
def batch(served: ServedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """PAIRS pairs, similar at even indices and dissimilar at odd ones (tiny decides them so: checked here)."""
    firsts, seconds, same = class_pairs(PAIRS, seed=100)
    x1, x2 = (torch.stack([served.preprocess(image) for image in images]) for images in (firsts, seconds))
    assert decide(served.module, x1, x2, served.threshold).similar.tolist() == same
    return x1, x2


def _explain(served: ServedModel, x1: torch.Tensor, x2: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, contributions.Contributions]:
    decided = decide(served.module, x1, x2, served.threshold)
    assert served.threshold_raw_logit is not None
    found = contributions.explain(served.module, decided.feature_maps1, decided.feature_maps2, decided.similar,
                                  served.threshold_raw_logit, served.input_size)
    return decided.scores, decided.similar, found


@pytest.fixture(scope="module")
def explained(served: ServedModel, batch) -> tuple[torch.Tensor, torch.Tensor, contributions.Contributions]:
    return _explain(served, *batch)


def test_embed_cells_sum_to_the_embedding(served: ServedModel, batch) -> None:
    with torch.no_grad():
        feature_maps = served.module.features(batch[0])
        cells = served.module.embed_cells(feature_maps)
        embeddings = served.module.embed(feature_maps)
    manifest = served.manifest
    assert cells.shape == (PAIRS, manifest.feature_map.height, manifest.feature_map.width, manifest.embedding_dim)
    torch.testing.assert_close(cells.sum(dim=(1, 2)), embeddings, rtol=RELATIVE, atol=RELATIVE)


def test_the_correspondence_matrix_and_offset_sum_to_the_raw_logit_of_the_score(served: ServedModel,
                                                                                explained) -> None:
    scores, _, found = explained
    cells = served.manifest.feature_map.height * served.manifest.feature_map.width
    assert found.correspondence.shape == (PAIRS, cells, cells)
    total = found.correspondence.sum(dim=(1, 2)) + found.offset
    assert ((total - found.raw_logits).abs() <= RELATIVE * found.raw_logits.abs().clamp(min=1)).all()
    # The raw logit is the score's, through the model's own squash and sigmoid.
    torch.testing.assert_close(served.module.score_of_raw(found.raw_logits), scores, rtol=0, atol=1e-6)
    # The offset is not a stand-in for everything: the cells carry the logit's variation between pairs.
    assert float(found.raw_logits.std()) > 0 and float(found.correspondence.abs().sum()) > 0


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.93])
def test_the_threshold_raw_logit_is_where_the_score_crosses_the_threshold(served: ServedModel,
                                                                          threshold: float) -> None:
    raw = contributions.threshold_raw_logit(served.module, threshold)
    assert float(served.module.score_of_raw(torch.tensor(raw, dtype=torch.float64))) == pytest.approx(threshold,
                                                                                                     abs=1e-12)


def test_a_threshold_no_score_reaches_is_refused(served: ServedModel) -> None:
    with pytest.raises(contributions.ThresholdUnreachable, match="no score reaches the threshold 1.0"):
        contributions.threshold_raw_logit(served.module, 1.0)


def test_each_images_contributions_add_up_to_the_distance_from_the_threshold(served: ServedModel,
                                                                             explained) -> None:
    """Catches totals that do not add up, or whose sign does not follow the decision: above the threshold for
    the similar pairs, below it for the dissimilar ones."""
    _, similar, found = explained
    for index in range(PAIRS):
        pair = found.pair(index)
        distance = pair.raw_logit - pair.threshold_raw_logit
        assert (distance > 0) == bool(similar[index]), f"pair {index}"
        for image in (1, 2):
            positive, negative = pair.totals(image)
            assert positive >= 0 >= negative
            assert positive + negative == pytest.approx(distance, rel=RELATIVE, abs=RELATIVE)
            # the side of the decision outweighs the other
            assert (positive > -negative) == bool(similar[index]), f"pair {index} image {image}"


def test_a_pair_has_the_same_contributions_alone_and_in_a_batch(served: ServedModel, batch, explained) -> None:
    x1, x2 = batch
    _, similar, together = explained
    for index in (0, 5):
        _, similar_alone, alone = _explain(served, x1[index:index + 1], x2[index:index + 1])
        assert bool(similar_alone[0]) == bool(similar[index])
        for name in ("correspondence", "raw_logits", "relative1", "relative2"):
            difference = (getattr(alone, name)[0] - getattr(together, name)[index]).abs().max()
            assert difference <= 1e-5, f"{name} of pair {index} differs by {difference:.2e}"
        for name in PairMaps._fields:
            difference = (getattr(alone.maps, name)[0] - getattr(together.maps, name)[index]).abs().max()
            assert difference <= 1e-5, f"{name} of pair {index} differs by {difference:.2e}"


def test_maps_show_the_part_pushing_toward_the_decision_and_the_part_against_it(explained) -> None:
    _, similar, found = explained
    rows, columns = found.relative1.shape[1:]
    compared = 0
    for index in range(PAIRS):
        for image, relative in ((1, found.relative1[index]), (2, found.relative2[index])):
            toward = relative * (1.0 if similar[index] else -1.0)
            for name, evidence in ((f"factual{image}", toward), (f"counterfactual{image}", -toward)):
                drawn = getattr(found.maps, name)[index]
                assert torch.isfinite(drawn).all() and drawn.min() >= 0 and drawn.max() <= 1, name
                positive = evidence.clamp(min=0)
                if positive.max() == 0:  # nothing pushes this way: a blank map, flagged by its zero peak
                    assert drawn.max() == 0, name
                    continue
                assert drawn.max() == pytest.approx(1.0), name
                # Each cell's block of the drawn map follows the cell's contribution.
                per_cell = drawn.unflatten(0, (rows, -1)).unflatten(2, (columns, -1)).mean(dim=(1, 3))
                # (its strongest cell is one of the strongest: a uniform shape makes cells of equal evidence)
                strongest = float(positive.flatten()[per_cell.argmax()])
                assert strongest >= 0.9 * float(positive.max()), f"pair {index} {name}"
                correlation = torch.corrcoef(torch.stack([per_cell.flatten(), positive.flatten()]))[0, 1]
                assert correlation > 0.9, f"pair {index} {name}: r = {float(correlation):.3f}"
                compared += 1
    assert compared >= 2 * PAIRS  # factual and counterfactual evidence both occur
    assert 0 < int(similar.sum()) < PAIRS  # for both decisions


def test_top_matches_are_the_shapes_of_a_similar_pair_and_the_backgrounds_of_a_dissimilar_one(
        served: ServedModel, batch, explained) -> None:
    """Catches matches taken from the wrong end of the matrix, or from the wrong image's cells. tiny's cells
    carry how much of each colour they hold: two cells of one colour match most (the shapes of a similar pair);
    in a pair of two colours, the cells with the least of either colour (the backgrounds) match most."""
    x1, x2 = batch
    _, similar, found = explained
    with torch.no_grad():
        colour1, colour2 = (served.module.features(x).amax(dim=1).flatten(1) for x in (x1, x2))
    for index in range(PAIRS):
        top = found.pair(index).top_matches(1)[0]
        columns = found.pair(index).grid[1]
        cells = (top.cell1[0] * columns + top.cell1[1], top.cell2[0] * columns + top.cell2[1])
        for colour, cell in zip((colour1[index], colour2[index]), cells, strict=True):
            pick = colour.max() if similar[index] else colour.min()
            assert float(colour[cell]) == pytest.approx(float(pick), abs=0.1 * float(colour.max())), f"pair {index}"


def test_top_matches_are_the_largest_entries_of_the_correspondence_matrix(explained) -> None:
    _, _, found = explained
    pair = found.pair(1)
    matrix = pair.correspondence
    columns = pair.grid[1]
    matches = pair.top_matches(5)
    assert len(matches) == 5
    assert matches[0].contribution == pytest.approx(float(matrix.max()), abs=0)
    assert [match.contribution for match in matches] == sorted((m.contribution for m in matches), reverse=True)
    positive_total = float(np.clip(matrix, 0, None).sum())
    for match in matches:
        row = match.cell1[0] * columns + match.cell1[1]
        column = match.cell2[0] * columns + match.cell2[1]
        assert float(matrix[row, column]) == match.contribution
        assert match.share == pytest.approx(match.contribution / positive_total)
    assert pair.top_matches(0) == [] and len(pair.top_matches(10**6)) == matrix.size


@pytest.mark.parametrize(("grid", "size"), [((4, 4), (96, 72)), ((7, 7), (97, 70)), ((4, 6), (5, 300))])
def test_cell_boxes_tile_the_whole_original(grid: tuple[int, int], size: tuple[int, int]) -> None:
    width, height = size
    covered = torch.zeros(height, width, dtype=torch.int64)
    for row in range(grid[0]):
        for col in range(grid[1]):
            x0, y0, x1, y1 = cell_box(row, col, grid, size)
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
            covered[y0:y1, x0:x1] += 1
    assert bool((covered == 1).all())
    if size == (96, 72):  # a grid that divides the image: every box is one quarter of each side
        assert cell_box(2, 1, grid, size) == (24, 36, 48, 54)


class _Version1Only(nn.Module):
    """The four methods of format version 1, and none of version 2's."""

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def embed(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return feature_maps.mean(dim=(2, 3))

    @torch.jit.export
    def similarity(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((e1 * e2).sum(dim=1))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.embed(x1), self.embed(x2))


def test_the_methods_required_depend_on_the_format_version(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_torchscript(_Version1Only(), path)
    assert hasattr(load_torchscript(path, 1), "features")
    with pytest.raises(TorchScriptError, match="lacks the contract method.s. embed_cells, raw_logit, score_of_raw, "
                       "raw_of_score, pair_weight, offset of format version 2"):
        load_torchscript(path, 2)
