"""Resumable runs: a run interrupted mid-way and resumed makes the very model an uninterrupted run makes, and
`--resume` refuses, with a message that says what to do, a checkpoint the command cannot continue."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.conftest import TINY_TRAIN_ARGS, finish_training, run_training, start_training, train_command
from training.__main__ import main


def without_timings(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


# Each of the three runs on one torch thread: the uninterrupted run goes on beside the interrupted and the resumed
# ones, a core each, rather than before them (the runs' results are compared, so all three have the same threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_interrupted_run_resumes_to_the_uninterrupted_result(shapes_dataset: Path, tmp_path: Path) -> None:
    # the interrupted run is a process of its own (it gets Ctrl-C), so all three runs are
    uninterrupted_command = train_command(shapes_dataset, tmp_path / "uninterrupted")
    uninterrupted_run = start_training(uninterrupted_command, ONE_THREAD)
    try:
        log = tmp_path / "stderr.log"
        with log.open("w") as stderr:
            # A shell's background job starts ignoring SIGINT, and a child inherits that (Python then installs no
            # KeyboardInterrupt handler and the run goes on): the child is started with this process handling it.
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                process = start_training(train_command(shapes_dataset, tmp_path), ONE_THREAD, stderr)
            finally:
                signal.signal(signal.SIGINT, previous)
            checkpoint = tmp_path / "checkpoints" / "checkpoint.pt"
            deadline = time.monotonic() + 300
            while not checkpoint.exists():  # appears when the first epoch has finished
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
        message = log.read_text()
        assert "--resume" in message and "Traceback" not in message, message[-3000:]
        assert not (tmp_path / "shapes").exists(), "an interrupted run must not export"
        finished_epochs = len(torch.load(checkpoint, weights_only=False)["history"])

        run_training(train_command(shapes_dataset, tmp_path, "--resume"), ONE_THREAD)
        finish_training(uninterrupted_run, uninterrupted_command)
    finally:
        if uninterrupted_run.poll() is None:  # a failed assertion above: the run is of no use any more
            uninterrupted_run.kill()
            uninterrupted_run.wait()
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "shapes" / "manifest.json").read_text())
    assert 1 <= finished_epochs < len(uninterrupted["training"]["history"])
    resumed = json.loads((tmp_path / "shapes" / "manifest.json").read_text())
    assert without_timings(resumed["training"]["history"]) == without_timings(uninterrupted["training"]["history"])
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["threshold"] == uninterrupted["threshold"]


def test_resuming_a_finished_run_exports_the_same_model(trained: tuple[Path, dict[str, Any]], shapes_dataset: Path,
                                                        tmp_path: Path) -> None:
    model_dir, manifest = trained
    main(["train", "--data", str(shapes_dataset), "--name", "shapes", "--output", str(tmp_path / "again"),
          "--checkpoint-dir", str(model_dir.parent / "checkpoints"), "--resume", *TINY_TRAIN_ARGS])
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["training"]["history"] == manifest["training"]["history"]
    assert again["metrics"] == manifest["metrics"]
    assert again["threshold"] == manifest["threshold"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--epochs", "3"], "--epochs 2 in the checkpoint, 3 now"),
    (["--test-fraction", "0.3"], "data split sha256"),
    (["--checkpoint-dir", "{tmp}/nowhere"], "no checkpoint at"),
], ids=["changed schedule", "changed split", "no checkpoint"])
def test_resume_refuses_what_it_cannot_continue(trained: tuple[Path, dict[str, Any]], shapes_dataset: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                extra: list[str], expected: str) -> None:
    model_dir, _ = trained
    checkpoint = model_dir.parent / "checkpoints" / "checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--data", str(shapes_dataset), "--name", "shapes", "--output", str(tmp_path / "again"),
              "--checkpoint-dir", str(checkpoint.parent), "--resume", *TINY_TRAIN_ARGS,
              *(arg.format(tmp=tmp_path) for arg in extra)])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("python -m training train: error: ") and expected in message, message
    assert "start afresh" in message
    assert checkpoint.stat().st_mtime_ns == before and not (tmp_path / "again").exists()
