"""The model as the service serves it, with either backbone: the oracle tests run on both."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.backbone import with_compiled_backbone
from app.model import ServedModel, load_model

BACKBONES = ("torchscript", "compiled")


def served_model(model_dir: Path, backbone: str, request: pytest.FixtureRequest) -> ServedModel:
    """The model in `model_dir` on the CPU with this backbone; "compiled" loads the session's package
    (`compiled_backbone_cache` in tests/conftest.py), and fails the test if the service would refuse it."""
    model = load_model(model_dir, "cpu")
    if backbone == "compiled":
        model = with_compiled_backbone(model, request.getfixturevalue("compiled_backbone_cache"))
        assert model.backbone == "compiled", "the service refused the compiled backbone: its log says why"
    return model
