"""The compiled backbone (COMPILE=auto): served only where it scores as model.pt does, TorchScript otherwise, with one
log line saying why. Every test shares the package compiled once a session (`compiled_backbone_cache`)."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
import torch

from app.backbone import largest_score_difference, with_compiled_backbone
from app.model import ServedModel, load_model, score_pairs
from contract.compiled import BACKBONE_PROGRAM_FILE, CompiledBackbone, machine_tag, package_path
from contract.manifest import read_manifest
from contract.torchscript import load_torchscript, quiet_torchscript, sha256_of
from tests.app.conftest import TEST_MODEL_NAME
from tests.support.images import drawn_image, encode, pair_files
from tests.support.model_folders import copy_of_model
from training.__main__ import main as training_main

WARNING_LOGGER = "app.backbone"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(model_store: Path) -> Path:
    return model_store / TEST_MODEL_NAME


@pytest.fixture(scope="module")
def compiled(model_dir: Path, compiled_backbone_cache: Path) -> ServedModel:
    return with_compiled_backbone(load_model(model_dir, "cpu"), compiled_backbone_cache)


def _fallback_reason(caplog: pytest.LogCaptureFixture) -> str:
    (warning,) = [record.getMessage() for record in caplog.records
                  if record.name == WARNING_LOGGER and record.levelno == logging.WARNING]
    assert warning.startswith("serving the TorchScript backbone: "), warning
    return warning


def test_the_session_package_is_compiled_for_this_machine_and_torch(model_dir: Path,
                                                                     compiled_backbone_cache: Path) -> None:
    manifest = read_manifest(model_dir)
    assert manifest.backbone_program is not None
    assert manifest.backbone_program.sha256 == sha256_of(model_dir / BACKBONE_PROGRAM_FILE)
    package = package_path(compiled_backbone_cache, manifest.backbone_program.sha256, torch.device("cpu"))
    assert package.is_file() and machine_tag(torch.device("cpu")) in package.name
    assert torch.__version__.replace("+", "-") in package.name
    assert [path.name for path in compiled_backbone_cache.iterdir()] == [package.name], "no partial file is left"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the tag's own flags are read on x86")
def test_the_machine_tag_names_every_instruction_set_inductor_compiles_for() -> None:
    """Catches a tag that leaves out what a package was compiled for: a package made on an AVX-512 machine would
    then be picked (and crash) on one with the same tag but only AVX2."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    tag = machine_tag(torch.device("cpu"))
    assert set(str(pick_vec_isa()).split()) <= set(tag.split("-")[2].split("+")), tag


def test_loading_a_package_imports_no_inductor(model_dir: Path, compiled_backbone_cache: Path) -> None:
    """Catches start-up paying for Inductor's import again (1.5-2 s, issue 23's start-up budget is 2 s): a fresh
    process loads the session's package and runs it without torch._inductor in sys.modules."""
    manifest = read_manifest(model_dir)
    assert manifest.backbone_program is not None
    package = package_path(compiled_backbone_cache, manifest.backbone_program.sha256, torch.device("cpu"))
    script = "\n".join([
        "import sys, torch",
        "from pathlib import Path",
        "from contract.compiled import CompiledBackbone",
        "from contract.torchscript import load_torchscript",
        f"module = load_torchscript(Path({str(model_dir / 'model.pt')!r}), {manifest.format_version})",
        f"backbone = CompiledBackbone(module, {str(package)!r}, torch.device('cpu'))",
        f"maps = backbone.features(torch.zeros(2, 3, *{tuple(manifest.input_size)}))",
        "print(tuple(maps.shape), 'torch._inductor' in sys.modules)",
    ])
    ran = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    shape, inductor = ran.stdout.split(") ")
    assert shape.startswith("(2, ") and inductor.strip() == "False", ran.stdout


def test_the_compiled_backbone_is_served_and_scores_as_torchscript(compiled: ServedModel, model_dir: Path) -> None:
    assert compiled.backbone == "compiled" and isinstance(compiled.module, CompiledBackbone)
    as_in_its_file = load_torchscript(model_dir / "model.pt", compiled.manifest.format_version)
    pictures = [compiled.picture(encode(drawn_image(seed)), "image", None) for seed in range(6)]
    scores = torch.tensor(score_pairs(compiled, pictures[:3], pictures[3:]))
    with torch.no_grad():
        x1, x2 = (compiled.preprocessing.normalize(torch.stack(half)) for half in (pictures[:3], pictures[3:]))
        expected = as_in_its_file(x1, x2)
        torch.testing.assert_close(compiled.module.features(x1), as_in_its_file.features(x1), rtol=0, atol=1e-4)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)


def test_a_pair_scores_the_same_alone_and_in_a_batch_with_the_compiled_backbone(compiled: ServedModel) -> None:
    generator = torch.Generator().manual_seed(3)
    pictures = list(torch.randint(0, 256, (10, 3, *compiled.input_size), generator=generator, dtype=torch.uint8))
    together = score_pairs(compiled, pictures[:5], pictures[5:])
    alone = [score_pairs(compiled, [first], [second])[0] for first, second in zip(pictures[:5], pictures[5:])]
    assert max(abs(a - b) for a, b in zip(alone, together)) <= 1e-6
    assert len(set(together)) == 5, "distinct pairs, distinct scores: the comparison means something"


def _with_other_backbone_weights(source: Path, folder: Path) -> Path:
    """A copy of `source` (its backbone program too) whose model.pt's first layer has other weights: other feature
    maps than the program's, so other scores than the compiled backbone's."""
    manifest = copy_of_model(source, folder)
    with quiet_torchscript(), torch.no_grad():
        module = torch.jit.load(str(folder / "model.pt"))
        first_layer = next(module.parameters())  # the backbone's first convolution: it is registered first
        first_layer.mul_(-2.0)
        module.save(str(folder / "model.pt"))
    manifest["sha256"] = sha256_of(folder / "model.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_compiled_backbone_that_scores_differently_is_refused(model_dir: Path, compiled_backbone_cache: Path,
                                                               tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # The program's sha256 is unchanged, so the session's package is found; model.pt's backbone is another one.
    folder = _with_other_backbone_weights(model_dir, tmp_path / "other")
    served = with_compiled_backbone(load_model(folder, "cpu"), compiled_backbone_cache)
    assert served.backbone == "torchscript"
    assert "scores up to" in _fallback_reason(caplog)
    assert largest_score_difference(served, served) == 0, "a backbone is never refused against itself"


@pytest.mark.parametrize(("change", "reason"), [
    ("no program", "has no backbone program"),
    ("corrupt program", "does not match its manifest's sha256"),
])
def test_a_folder_without_a_usable_program_is_served_with_torchscript(model_dir: Path, compiled_backbone_cache: Path,
                                                                      tmp_path: Path, change: str, reason: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "model"
    if change == "no program":
        copy_of_model(model_dir, folder, backbone_program=None)
        (folder / BACKBONE_PROGRAM_FILE).unlink()
    else:
        copy_of_model(model_dir, folder)
        with (folder / BACKBONE_PROGRAM_FILE).open("r+b") as program:
            program.seek(100)
            program.write(b"corrupt")
    served = with_compiled_backbone(load_model(folder, "cpu"), compiled_backbone_cache)
    assert served.backbone == "torchscript"
    assert reason in _fallback_reason(caplog)


def test_the_service_loads_the_compiled_package_at_start_up_and_serves_with_it(
        serve: Callable[..., AbstractContextManager[str]], compiled_backbone_cache: Path, compiled: ServedModel,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=WARNING_LOGGER)
    files = pair_files(encode(drawn_image(1)), encode(drawn_image(2)))
    with serve(compile="auto", compile_cache_dir=compiled_backbone_cache) as url, \
            httpx.Client(base_url=url, timeout=120, trust_env=False) as client:
        answer = client.post("/similarity", files=files)
        explained = client.post("/explain", files=files, data={"method": "contributions"})
    assert answer.status_code == 200 and explained.status_code == 200, (answer.text, explained.text)
    messages = [record.getMessage() for record in caplog.records if record.name == WARNING_LOGGER]
    assert messages == ["serving the compiled backbone"], "loaded, not compiled again, and checked"
    pictures = [compiled.picture(encode(drawn_image(seed)), "image", None) for seed in (1, 2)]
    (expected,) = score_pairs(compiled, pictures[:1], pictures[1:])
    assert answer.json()["score"] == pytest.approx(expected, abs=1e-6)
    assert explained.json()["score"] == pytest.approx(expected, abs=1e-6)


def test_the_compile_command_reports_the_package_it_finds_or_what_is_missing(
        model_dir: Path, compiled_backbone_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    training_main(["compile", "--model", str(model_dir), "--cache", str(compiled_backbone_cache)])
    assert "already there" in capsys.readouterr().out
    copy_of_model(model_dir, tmp_path / "old", backbone_program=None)
    with pytest.raises(SystemExit) as stopped:
        training_main(["compile", "--model", str(tmp_path / "old"), "--cache", str(tmp_path / "cache")])
    assert stopped.value.code == 2
    assert "python -m training upgrade --model" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
