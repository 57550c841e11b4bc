"""DistributedDataParallel for real: two CPU processes on the gloo backend, launched by torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from contract.torchscript import load_torchscript
from tests.training.conftest import TINY_TRAIN_ARGS

REPO = Path(__file__).resolve().parents[2]


def test_two_process_gloo_training_exports_a_working_model(shapes_dataset: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training", "train",
         "--data", str(shapes_dataset), "--name", "shapes", "--output", str(tmp_path / "shapes"),
         "--checkpoint-dir", str(tmp_path / "checkpoints"), *TINY_TRAIN_ARGS],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={"PATH": str(torchrun.parent), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    manifest = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
    assert manifest["metrics"]["test"]["roc_auc"] > 0.6, manifest["metrics"]
    module = load_torchscript(tmp_path / "shapes" / "model.pt", manifest["format_version"])
    assert hasattr(module, "features") and hasattr(module, "embed") and hasattr(module, "similarity")
