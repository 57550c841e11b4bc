"""The dataset side: scanning, splitting by image, the paper's pairs, and the errors a user can run into."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATASETS
from tests.training.conftest import SHAPES, draw_shapes_dataset
from training.data import MIN_IMAGES_TO_SPLIT, SPLITS, DatasetError, make_pairs, scan_image_folder, split_by_image

AIRBNB = SHARED_DATASETS / "airbnb"


def test_split_is_by_image_disjoint_stratified_and_seeded(shapes_dataset: Path) -> None:
    folder = scan_image_folder(shapes_dataset)
    split = split_by_image(folder.labels, 0.2, 0.2, seed=3)
    sets = {name: set(split.indices[name]) for name in SPLITS}
    assert sets["train"].isdisjoint(sets["validation"]) and sets["train"].isdisjoint(sets["test"])
    assert sets["validation"].isdisjoint(sets["test"])
    assert set().union(*sets.values()) == set(range(len(folder.paths)))
    for name in ("validation", "test"):
        assert Counter(folder.labels[i] for i in split.indices[name]) == {label: 6 for label in range(len(SHAPES))}
    assert split_by_image(folder.labels, 0.2, 0.2, seed=3) == split
    other = split_by_image(folder.labels, 0.2, 0.2, seed=4)
    assert other != split and other.fingerprint(folder) != split.fingerprint(folder)


def test_pairs_never_leave_their_split(shapes_dataset: Path) -> None:
    """Pairs index positions within one split's list, so they can only join images of that split."""
    folder = scan_image_folder(shapes_dataset)
    split = split_by_image(folder.labels, 0.2, 0.2, seed=0)
    for name in SPLITS:
        indices = split.indices[name]
        first, second, _ = make_pairs([folder.labels[i] for i in indices], np.random.default_rng(0))
        used = {indices[p] for p in np.concatenate([first, second])}
        assert used <= set(indices)
        for other in SPLITS:
            if other != name:
                assert used.isdisjoint(split.indices[other])


def test_pairs_follow_the_paper_protocol() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    first, second, target = make_pairs(labels, np.random.default_rng(7))
    assert len(target) == 2 * len(labels)
    for position in range(len(labels)):
        mine = first == position
        assert sorted(target[mine].tolist()) == [0.0, 1.0]  # one similar and one dissimilar partner each
    for a, b, t in zip(first, second, target):
        assert (labels[a] == labels[b]) == bool(t)
        if t:
            assert a != b  # a similar partner is another image whenever the class has one
    again = make_pairs(labels, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip((first, second, target), again))


def test_unreadable_files_are_skipped_counted_and_named(tmp_path: Path) -> None:
    root = draw_shapes_dataset(tmp_path / "data", images_per_class=4)
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UserWarning, match="skipped 2 unreadable") as caught:
        folder = scan_image_folder(root)
    assert "broken.png" in str(caught[0].message) and "notes.txt" in str(caught[0].message)
    assert sorted(folder.skipped) == ["circle/notes.txt", "square/broken.png"]
    assert len(folder.paths) == 4 * len(SHAPES)
    assert folder.counts() == {shape: 4 for shape in SHAPES}


def test_empty_class_is_a_clear_error(tmp_path: Path) -> None:
    root = draw_shapes_dataset(tmp_path / "data", images_per_class=4)
    (root / "hexagon").mkdir()
    with pytest.raises(DatasetError, match="hexagon holds no readable image"):
        scan_image_folder(root)


def test_single_class_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "data"
    draw_shapes_dataset(tmp_path / "full", images_per_class=4)
    root.mkdir()
    (tmp_path / "full" / "circle").rename(root / "circle")
    with pytest.raises(DatasetError, match="at least two classes"):
        scan_image_folder(root)


def test_classes_too_small_to_split_are_used_for_training_only(tmp_path: Path) -> None:
    root = draw_shapes_dataset(tmp_path / "data", images_per_class=10)
    for extra in sorted((root / "triangle").iterdir())[2:]:
        extra.unlink()
    folder = scan_image_folder(root)
    split = split_by_image(folder.labels, 0.2, 0.2, seed=0)
    triangle = folder.classes.index("triangle")
    assert split.training_only == [triangle]
    triangles = {i for i, label in enumerate(folder.labels) if label == triangle}
    assert len(triangles) == 2 and triangles <= set(split.indices["train"])
    for name in ("validation", "test"):
        assert Counter(folder.labels[i] for i in split.indices[name]) == {0: 2, 1: 2}
    assert sorted(sum(split.indices.values(), [])) == list(range(len(folder.paths)))


def test_classes_too_small_for_the_fractions_are_a_clear_error(tmp_path: Path) -> None:
    """Three images in each of three classes leave a test split of two images: not one per class."""
    folder = scan_image_folder(draw_shapes_dataset(tmp_path / "data", images_per_class=3))
    with pytest.raises(DatasetError, match="add images to the smallest class"):
        split_by_image(folder.labels, 0.2, 0.2, seed=0)


@pytest.mark.skipif(not AIRBNB.is_dir(), reason=f"the paper's AirBnB dataset is not at {AIRBNB}")
def test_the_papers_airbnb_rooms_split_with_their_rare_rooms_in_training() -> None:
    folder = scan_image_folder(AIRBNB)
    split = split_by_image(folder.labels, 0.15, 0.15, seed=0)
    rare = {name for name, count in folder.counts().items() if count < MIN_IMAGES_TO_SPLIT}
    assert rare and {folder.classes[label] for label in split.training_only} == rare
    for name in ("validation", "test"):
        classes = {folder.classes[folder.labels[i]] for i in split.indices[name]}
        assert not classes & rare and len(classes) >= 2, classes
