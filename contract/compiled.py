"""The compiled backbone: `features` as a `torch.export` program beside `model.pt`, compiled ahead of time for the
machine that serves it.

TorchScript (`model.pt`) stays the contract; this is an accelerator that must never change what a pair scores.
- Training writes the backbone program (`backbone.pt2`, with a dynamic batch dimension) and lists it in the
  manifest (`backbone_program`: file and sha256); `python -m training upgrade` adds it to an older folder.
- An AOTInductor package (a shared library compiled from the program for one device kind, CPU instruction set
  or GPU architecture, and torch version) is made by `python -m training compile`, or by the service at
  start-up, into a cache folder; it is never committed, since it only runs where it was compiled for.
- The service runs `CompiledBackbone` (a `contract.backbone.SplitBackbone`): the package computes `features`, the
  TorchScript module everything else (embed, similarity, the contribution methods), so the explainers
  differentiate the same head as before.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from contract.backbone import SplitBackbone
from contract.cache import writable
from contract.manifest import Manifest
from contract.padding_fold import fold_padding_into_convolutions
from contract.torchscript import compute_convolutions_in_fp32, sha256_of

# Inductor imports torch's C++ extension helper, which warns on a machine without CUDA that it found no CUDA
# runtime: nothing a user of the CPU package can act on, in every compile's and start-up's log.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

BACKBONE_PROGRAM_FILE = "backbone.pt2"
# The largest batch the program accepts (images, so twice the pairs): far above any MAX_BATCH_SIZE.
MAX_BATCH = 1024
# The compiled backbone may differ from TorchScript by rounding only: this much on a score at most.
SCORE_TOLERANCE = 1e-5
# Freezing makes the weights constants, so BatchNorm folds into the convolutions and, on a CPU, their weights are
# pre-packed for oneDNN, as `torch.jit.freeze` does for the TorchScript path (without it, the package ran plain
# ATen convolutions and was no faster than TorchScript).
_INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}
# How compile_backbone makes a package from a program, in a package's name: a cache made by an older recipe is
# compiled again rather than served (2: pads folded into the convolutions).
_RECIPE = 2
_CXX = os.environ.get("CXX", "g++")  # what Inductor runs, unless its own config is changed


class CompileError(RuntimeError):
    """No compiled backbone can be made or loaded here; the message says why and what to do."""


class _Features(nn.Module):
    """A model's `features` method as the forward of a module: what the program computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def export_backbone(model: nn.Module, input_size: tuple[int, int], path: Path) -> None:
    """Save `model.features` (in eval mode, on the CPU) as a `torch.export` program taking any batch of up to
    MAX_BATCH images of `input_size`; CompileError when it cannot be exported (data-dependent control flow)."""
    try:
        program = _export_with_any_batch(_Features(model).eval(), (3, *input_size))
    except Exception as error:
        raise CompileError(f"the model's features cannot be exported as a program ({_first_line(error)})") \
            from error
    torch.export.save(program, str(path))


def _export_with_any_batch(module: nn.Module, image_shape: tuple[int, ...]) -> ExportedProgram:
    """`module` exported for batches of 1 to MAX_BATCH images of `image_shape` (channels, height, width)."""
    # An example batch of 2: a batch of 1 would let the exporter specialise on it.
    example = torch.zeros(2, *image_shape)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def compilable_program(path: Path) -> ExportedProgram:
    """The saved program at `path` as it is compiled: with its pads folded into the convolutions they feed
    (contract/padding_fold.py), which computes the same maps without copying each padded input."""
    program = torch.export.load(str(path))
    module = program.module()
    if fold_padding_into_convolutions(module) == 0:
        return program
    (image,) = (node.meta["val"] for node in program.graph.nodes
                if node.op == "placeholder" and node.name in program.graph_signature.user_inputs)
    return _export_with_any_batch(module, tuple(image.shape[1:]))


def run_program(path: Path, x: torch.Tensor) -> torch.Tensor:
    """The saved program run as it is (not compiled) on `x`: how an export is checked against the eager model."""
    with torch.no_grad():
        return torch.export.load(str(path)).module()(x)


def machine_tag(device: torch.device) -> str:
    """What a package is compiled for: the device kind with its GPU architecture, or the CPU architecture with
    the vector instruction sets Inductor chooses among."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    arch = platform.machine()
    if arch in ("x86_64", "AMD64"):
        # The flags Inductor's own choice (pick_vec_isa) is made from, read without importing Inductor: that
        # import alone took 1.5-2 s of every start-up with a package.
        avx512 = torch.cpu._is_avx512_supported()
        supported = {"avx2": torch.cpu._is_avx2_supported(), "avx512": avx512,
                     "avx512_vnni": avx512 and torch.cpu._is_vnni_supported(),
                     "amx_tile": torch.cpu._is_amx_tile_supported()}
        flags = [name for name, present in supported.items() if present]
        # ATEN_CPU_CAPABILITY caps the instruction set Inductor generates code for.
        capped = os.environ.get("ATEN_CPU_CAPABILITY", "")
        return f"cpu-{arch}-{'+'.join(flags) or 'novec'}" + (f"-cap{capped}" if capped else "")
    from torch._inductor.cpu_vec_isa import pick_vec_isa  # other architectures: Inductor's own answer

    isa = str(pick_vec_isa()).replace(" ", "+") or "novec"
    return f"cpu-{arch}-{isa}"


def package_path(cache_dir: Path, program_sha256: str, device: torch.device) -> Path:
    """Where the package of the program with this sha256 for this machine and torch version lives in `cache_dir`."""
    version = torch.__version__.replace("+", "-")
    return cache_dir / f"backbone-{program_sha256[:16]}-{machine_tag(device)}-torch{version}-r{_RECIPE}.pt2"


def program_path(model_dir: Path, manifest: Manifest) -> Path:
    """The model folder's backbone program, checked against its manifest; CompileError says why there is none."""
    if manifest.backbone_program is None:
        raise CompileError(f"{model_dir} has no backbone program (exported before siamcam made one): add it with "
                           f"`python -m training upgrade --model {model_dir}`")
    path = model_dir / manifest.backbone_program.file
    if not path.is_file():
        raise CompileError(f"{path} is missing; re-export the model, or run `python -m training upgrade --model "
                           f"{model_dir}`")
    if sha256_of(path) != manifest.backbone_program.sha256:
        raise CompileError(f"{path} does not match its manifest's sha256: the file is corrupt or was replaced; "
                           f"re-export the model")
    return path


def ensure_package(model_dir: Path, manifest: Manifest, cache_dir: Path, device: torch.device,
                   force: bool = False) -> tuple[Path, float | None]:
    """The package of the folder's backbone program for `device` in `cache_dir`, compiled first when there is
    none (or when `force`), with the seconds compiling took (None: it was there)."""
    program = program_path(model_dir, manifest)
    assert manifest.backbone_program is not None  # program_path checked it
    package = package_path(cache_dir, manifest.backbone_program.sha256, device)
    if package.is_file() and not force:
        return package, None
    return package, compile_backbone(program, package, device)


def cpp_compiler() -> str | None:
    """The path of the C++ compiler AOTInductor runs (for any device: it compiles the package's host code too)."""
    return shutil.which(_CXX)


def compile_backbone(program: Path, package: Path, device: torch.device) -> float:
    """Compile the program at `program` with AOTInductor for `device` into the package `package` (written under
    another name first, then renamed: replicas compiling at once never read half a package); the seconds taken."""
    if not writable(package.parent):
        raise CompileError(f"cannot write the compiled backbone to {package.parent}: set COMPILE_CACHE_DIR (or "
                           "--cache) to a writable folder")
    if cpp_compiler() is None:
        raise CompileError(f"no C++ compiler ({_CXX}) on this machine to compile the backbone: install one "
                           "(Debian: g++), or compile the package where one is and copy it into the cache folder")
    from torch._inductor import aoti_compile_and_package  # Inductor loads in seconds: only when compiling

    started = time.perf_counter()
    package.parent.mkdir(parents=True, exist_ok=True)
    staging = package.with_name(f"{package.stem}.{os.getpid()}.partial.pt2")  # AOTInductor wants .pt2
    try:
        exported = compilable_program(program)
        if device.type == "cuda":
            compute_convolutions_in_fp32()  # as the TorchScript path computes: no TF32 kernels compiled in
            exported = torch.export.passes.move_to_device_pass(exported, str(device))
        # Inductor freezes only what is compiled without autograd (the package never records any).
        with torch.no_grad():
            aoti_compile_and_package(exported, package_path=str(staging), inductor_configs=_INDUCTOR_CONFIGS)
        staging.replace(package)
    except Exception as error:
        raise CompileError(f"compiling {program} for {machine_tag(device)} failed ({_first_line(error)})") from error
    finally:
        staging.unlink(missing_ok=True)
    return time.perf_counter() - started


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_package(package: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The package's `features` as a function; CompileError when `package` cannot be loaded here."""
    try:
        # The package's own loader, not torch._inductor.aoti_load_package: that import costs 1.5-2 s of
        # start-up, and the wrapper it returns only flattens arguments (`features` takes one tensor).
        runner = torch._C._aoti.AOTIModelPackageLoader(
            str(package), "model", False, 1, _device_index(device))  # model name, not single-threaded, 1 runner
    except Exception as error:
        raise CompileError(f"{package} is not a loadable compiled backbone ({_first_line(error)}); delete it "
                           "to compile it again") from error

    def features(x: torch.Tensor) -> torch.Tensor:
        # The package records no autograd graph: its maps are inputs to the head, never differentiated through.
        with torch.no_grad():
            (maps,) = runner.boxed_run([x.contiguous()])  # the list is the runner's to empty
            return maps

    return features


class CompiledBackbone(SplitBackbone):
    """A TorchScript model whose `features` runs a compiled package (fp32, as the program was exported)."""

    def __init__(self, module: torch.jit.ScriptModule, package: Path, device: torch.device) -> None:
        super().__init__(module)
        self.package = package
        self._features = load_package(package, device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)


def _device_index(device: torch.device) -> int:
    return (device.index or 0) if device.type == "cuda" else -1
