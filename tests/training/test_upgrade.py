"""`python -m training upgrade`: a model of an earlier format re-exported in the current one, same weights and
scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contract.compiled import BACKBONE_PROGRAM_FILE, run_program
from contract.manifest import FORMAT_VERSION, read_manifest
from contract.torchscript import load_torchscript, sha256_of
from tests.support.model_folders import copy_of_model
from training.__main__ import main
from training.export import export_model
from training.model import IMAGENET, build_siamese

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def resnet_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding `small`, an untrained resnet18 Siamese network at 64 x 64 px: upgrading rebuilds the
    network from its manifest's backbone, one of training's (the suite's `tiny` model, set by hand, is not)."""
    torch.manual_seed(0)
    store = tmp_path_factory.mktemp("resnet_store")
    export_model(build_siamese("resnet18", embedding_dim=64), store / "small", {
        "name": "small", "version": "0.0.1", "backbone": "resnet18", "input_size": [64, 64],
        "resize_policy": "stretch", "normalization": IMAGENET.model_dump(), "threshold": 0.5, "metrics": {},
        "dataset": {"name": "none (untrained test model)"}, "training": {"command": "tests/training/test_upgrade.py"},
    })
    return store


def _relabelled(store: Path, folder: Path, **changes: object) -> Path:
    """The store's `small` model under a manifest with these fields changed, as an earlier export would have it."""
    copy_of_model(store / "small", folder, **changes)
    return folder


def _scores(folder: Path) -> torch.Tensor:
    manifest = read_manifest(folder)
    module = load_torchscript(folder / "model.pt", manifest.format_version)
    generator = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(3, 3, *manifest.input_size, generator=generator) for _ in range(2))
    with torch.no_grad():
        return module(x1, x2)


def test_a_version_1_folder_is_upgraded_in_place_with_the_same_scores_and_its_history(resnet_store: Path,
                                                                                      tmp_path: Path) -> None:
    folder = _relabelled(resnet_store, tmp_path / "old", format_version=1, metrics={"test": {"accuracy": 0.75}})
    before = _scores(folder)
    main(["upgrade", "--model", str(folder)])
    upgraded = read_manifest(folder)
    assert upgraded.format_version == FORMAT_VERSION == 2
    assert upgraded.sha256 == sha256_of(folder / "model.pt")
    assert upgraded.metrics == {"test": {"accuracy": 0.75}}, "the scores did not change, so neither do the metrics"
    assert upgraded.model_extra["upgraded_from"]["format_version"] == 1
    assert torch.equal(_scores(folder), before)
    assert not (tmp_path / "old.upgrading").exists()
    assert upgraded.backbone_program is not None
    assert upgraded.backbone_program.sha256 == sha256_of(folder / upgraded.backbone_program.file)
    # and the upgraded file offers what version 2 promises
    module = load_torchscript(folder / "model.pt", 2)
    features = module.features(torch.zeros(1, 3, *upgraded.input_size))
    assert torch.allclose(module.embed_cells(features).sum(dim=(1, 2)), module.embed(features), atol=1e-5)


def test_a_current_folder_without_a_backbone_program_gets_one_from_its_own_weights(resnet_store: Path,
                                                                                  tmp_path: Path) -> None:
    folder = _relabelled(resnet_store, tmp_path / "current", backbone_program=None)
    (folder / BACKBONE_PROGRAM_FILE).unlink()
    before = read_manifest(folder)
    model_file = (folder / "model.pt").read_bytes()
    main(["upgrade", "--model", str(folder)])
    upgraded = read_manifest(folder)
    assert (folder / "model.pt").read_bytes() == model_file, "model.pt is left as it is"
    assert upgraded.model_dump(exclude={"backbone_program"}) == before.model_dump(exclude={"backbone_program"})
    assert upgraded.backbone_program is not None
    assert upgraded.backbone_program.sha256 == sha256_of(folder / BACKBONE_PROGRAM_FILE)
    module = load_torchscript(folder / "model.pt", upgraded.format_version)
    x = torch.randn(3, 3, *upgraded.input_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(run_program(folder / BACKBONE_PROGRAM_FILE, x), module.features(x), rtol=0,
                                   atol=1e-5)


def test_the_committed_default_model_upgrades_to_the_same_scores(tmp_path: Path) -> None:
    default = REPO / "model_store" / "flowers"
    if not (default / "model.pt").is_file():
        pytest.skip(f"no default model at {default}: train it with `make default-model`")
    main(["upgrade", "--model", str(default), "--output", str(tmp_path / "flowers")])
    assert read_manifest(tmp_path / "flowers").format_version == FORMAT_VERSION
    assert torch.allclose(_scores(tmp_path / "flowers"), _scores(default), atol=1e-6)


def test_a_file_that_is_not_what_its_manifest_says_is_refused_in_one_line(resnet_store: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = _relabelled(resnet_store, tmp_path / "mislabelled", format_version=1, backbone="resnet34")
    manifest_before = (folder / "manifest.json").read_text()
    with pytest.raises(SystemExit) as stopped:
        main(["upgrade", "--model", str(folder)])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "does not hold a resnet34 Siamese network" in message and message.count("\n") == 1, message
    assert (folder / "manifest.json").read_text() == manifest_before, "nothing was changed"
