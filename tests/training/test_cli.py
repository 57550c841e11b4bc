"""The command line reports a user's mistake as one line saying what to do, with exit status 2, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.__main__ import main


@pytest.mark.parametrize(("command", "expected"), [
    (["train", "--data", "{tmp}/missing"], "is not a folder; pass an image-folder dataset"),
    (["evaluate", "--model", "{tmp}/missing", "--data", "{tmp}"],
     "manifest.json is missing): point to a folder holding model.pt"),
    (["train", "--data", "{tmp}", "--unfreeze-last", "2"], "--unfreeze-last 2 needs --freeze-backbone"),
    (["train", "--data", "{tmp}", "--freeze-backbone", "--unfreeze-last", "8"],
     "--unfreeze-last must be between 0 and 7: resnet18 has 8 top-level layers"),
], ids=["train on a missing folder", "evaluate a missing model", "unfreeze without freezing",
        "unfreeze the whole backbone"])
def test_user_errors_are_one_line_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
                                           expected: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([arg.format(tmp=tmp_path) for arg in command])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"python -m training {command[0]}: error: ") and expected in message, message
    assert message.count("\n") == 1
