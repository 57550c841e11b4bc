"""The one place that touches TorchScript files: `model.pt` saved by training and loaded by the service."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# What an exported model provides, per manifest format_version (model_store/README.md):
#   1: features(x) -> feature maps, embed(f) -> embeddings, similarity(e1, e2) -> scores,
#      forward(x1, x2) == similarity(embed(features(x1)), embed(features(x2)));
#   2: also what makes the raw logit an exact sum over pairs of cells (contract/explainers/contributions.py).
_VERSION_1_METHODS: tuple[str, ...] = ("features", "embed", "similarity", "forward")
CONTRACT_METHODS: dict[int, tuple[str, ...]] = {
    1: _VERSION_1_METHODS,
    2: (*_VERSION_1_METHODS, "embed_cells", "raw_logit", "score_of_raw", "raw_of_score", "pair_weight", "offset"),
}


class TorchScriptError(ValueError):
    """`model.pt` is not a model this contract can serve; the message names the file and what to do."""


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch warns that TorchScript is deprecated on every script/load (2.14 a FutureWarning, 2.11, as GPU images
    ship it, a DeprecationWarning); our users asked for TorchScript, and the warning would only clutter their logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def save_torchscript(module: torch.nn.Module, path: Path) -> None:
    with quiet_torchscript():
        torch.jit.script(module).save(str(path))


def load_torchscript(path: Path, format_version: int, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """`path` loaded in eval mode on `device`, after checking it has every contract method of `format_version`
    (its manifest's). On a GPU, this process's convolutions compute in full fp32 from then on (below)."""
    if torch.device(device).type == "cuda":
        compute_convolutions_in_fp32()
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchScriptError(f"{path} is not a loadable TorchScript model ({first_line}); re-export the model") \
            from error
    missing = [name for name in CONTRACT_METHODS[format_version] if not hasattr(module, name)]
    if missing:
        raise TorchScriptError(
            f"{path} lacks the contract method(s) {', '.join(missing)} of format version {format_version}: it was "
            "not exported by `python -m training train`; re-export the model with it"
        )
    return module.eval()


def compute_convolutions_in_fp32() -> None:
    """PyTorch lets cuDNN run fp32 convolutions as TF32 (10-bit mantissas) by default, and cuDNN picks its kernels
    by batch size: with those defaults on an H200 a pair scored 8e-6 apart alone and in a batch (the tiny test
    model), its heatmaps 3e-4 apart, and two servers of the default model's file gave scores up to 4.4e-3 apart
    (bench/RESULTS.md, "On a GPU"). A pair must score and explain the same alone or in a batch, and the exact
    contributions must sum to the score. What full fp32 costs a model this small on a GPU is not measured yet."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def optimized_for_inference(module: torch.jit.ScriptModule, format_version: int, device: torch.device,
                            under_autocast: bool = False) -> torch.jit.ScriptModule:
    """`module` (as loaded) frozen for serving: its weights become constants, so TorchScript folds each BatchNorm
    into the convolution before it and skips the attribute lookups of every call; on the CPU the convolutions are
    also rewritten for oneDNN, unless the module will run `under_autocast` (PRECISION bf16 or fp16): oneDNN's
    prepacked convolutions take fp32 whatever autocast says (bf16 autocast left every feature bit-identical to
    fp32's on the default model). The contract methods stay, and so do their gradients with respect to their inputs
    (the explainers differentiate `embed` and `similarity` by the feature maps). Scores match the file's within
    about 1e-6 (the folding rounds differently); a batch of 8 pairs took 0.62x and 0.77x the time in two runs on a 2-core
    CPU (bench/RESULTS.md, "Model runtime")."""
    preserved = [name for name in CONTRACT_METHODS[format_version] if name != "forward"]
    with quiet_torchscript():
        frozen = torch.jit.freeze(module.eval(), preserved_attrs=preserved)
        if device.type == "cpu" and not under_autocast:
            frozen = torch.jit.optimize_for_inference(frozen, other_methods=["features"])
    return frozen


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in blocks: what manifest.json records for model.pt."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
