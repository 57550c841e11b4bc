"""`manifest.json`: what training writes beside `model.pt` and what the service reads before loading it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

# Version 2 adds the model methods that make the exact contributions possible; version 1 is still served,
# explained with Grad-CAM only.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.pt"
# The model's evidence in one self-contained page (training/report.py), served at GET /model/report; optional.
REPORT_FILE = "report.html"


class ManifestError(ValueError):
    """A model folder's manifest is missing, unreadable or invalid; the message names the file and what to do."""


class Normalization(BaseModel):
    """Applied to RGB values in [0, 1]: (x - mean) / std, per channel."""

    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class FeatureMap(BaseModel):
    """The shape of `features(x)` for an input of `input_size`: the grid every heatmap is drawn on."""

    channels: PositiveInt
    height: PositiveInt
    width: PositiveInt


class BackboneProgram(BaseModel):
    """The backbone (`features`) as a `torch.export` program beside model.pt, which a machine compiles for itself
    (contract/compiled.py). Only an accelerator: model.pt is what a pair's score means."""

    file: str = Field(pattern=r"^[^/\\]+$", description="file name inside the model folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """Every field is described in model_store/README.md. Fields training adds beyond these are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: Literal[1, 2] = FORMAT_VERSION
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created_at: str
    backbone: str
    input_size: tuple[PositiveInt, PositiveInt] = Field(description="[height, width] the model expects")
    resize_policy: Literal["stretch"] = Field(
        description="stretch: the whole image is resized to input_size without cropping, so a heatmap maps back "
        "onto the whole original"
    )
    normalization: Normalization
    embedding_dim: PositiveInt
    feature_map: FeatureMap
    threshold: float = Field(ge=0, le=1, description="similar when score >= threshold")
    calibration: dict[str, float] | None = None
    metrics: dict[str, Any]
    dataset: dict[str, Any]
    training: dict[str, Any]
    torch_version: str
    torchvision_version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of model.pt")
    # Absent in folders exported before it (`python -m training upgrade` adds it); they are served with TorchScript.
    backbone_program: BackboneProgram | None = None


def read_manifest(model_dir: Path) -> Manifest:
    """The validated manifest of the model folder `model_dir`; ManifestError says what is wrong and what to do."""
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"no model at {model_dir} ({MANIFEST_FILE} is missing): point to a folder holding {MODEL_FILE} and "
            f"{MANIFEST_FILE}, or train one with `python -m training train`"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path} is not readable JSON ({error}); re-export the model") from error
    if isinstance(raw, dict) and raw.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{path} has format_version {raw.get('format_version')!r}; this version of siamcam reads versions "
            f"{' and '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}: re-export the model with this version's "
            "`python -m training`"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'manifest'}: {item['msg']}" for item in error.errors()
        )
        raise ManifestError(f"{path} is not a valid manifest ({problems}); re-export the model") from error


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    path = model_dir / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path
