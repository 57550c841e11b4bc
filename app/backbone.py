"""The backbone the service runs (COMPILE): compiled for this machine where it scores as model.pt does, or
TorchScript, as model.pt is, with one log line saying why."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from app.model import ServedModel, score_pairs
from contract.compiled import SCORE_TOLERANCE, CompileError, CompiledBackbone, ensure_package

logger = logging.getLogger(__name__)

# Pairs of pictures scored both ways before the compiled backbone is served: the warm-up's blank pair and seeded
# random ones, alone and in one batch (a kernel may be picked by batch size).
_CHECKED_PAIRS = 4


def with_compiled_backbone(model: ServedModel, cache_dir: Path) -> ServedModel:
    """`model` with its feature maps computed by the package compiled for its device (compiled into `cache_dir`
    first when missing), once it scores the check pairs as TorchScript does; else `model` as it is (always in a
    reduced PRECISION: the package is an fp32 program, which autocast cannot change)."""
    if model.precision != "fp32":
        logger.info(f"serving the TorchScript backbone under {model.precision} autocast: the compiled backbone "
                    "computes in fp32 only (PRECISION=fp32)")
        return model
    started = time.perf_counter()
    try:
        package, compile_s = ensure_package(model.path.parent, model.manifest, cache_dir, model.device)
        if compile_s is not None:
            logger.info(f"compiled the backbone for this machine in {compile_s:.1f} s", extra={"package": str(package)})
        compiled = replace(model, module=CompiledBackbone(model.module, package, model.device))
        difference = largest_score_difference(model, compiled)
    except CompileError as error:
        logger.warning(f"serving the TorchScript backbone: {error}")
        return model
    except Exception as error:  # noqa: BLE001 -- any failure of the accelerator leaves TorchScript serving
        logger.warning(f"serving the TorchScript backbone: the compiled one failed its check batch ({error!r})")
        return model
    if not difference <= SCORE_TOLERANCE:
        logger.warning(f"serving the TorchScript backbone: the compiled one ({package}) scores up to {difference:.1e} "
                       f"apart from {model.path.name} (limit {SCORE_TOLERANCE:.0e}); delete it to compile it again")
        return model
    logger.info("serving the compiled backbone", extra={
        "package": str(package), "largest_score_difference": difference,
        "seconds": round(time.perf_counter() - started, 2),
    })
    return compiled


def _check_pictures(model: ServedModel) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    shape = (_CHECKED_PAIRS - 1, 3, *model.input_size)
    first = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    second = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    blank = torch.zeros(1, 3, *model.input_size, dtype=torch.uint8)
    return list(torch.cat([blank, first])), list(torch.cat([blank, second]))


def largest_score_difference(model: ServedModel, other: ServedModel) -> float:
    """The largest difference between the two models' scores of the check pairs, each alone and all in one batch."""
    pictures1, pictures2 = _check_pictures(model)
    reference = torch.tensor(score_pairs(model, pictures1, pictures2))
    together = torch.tensor(score_pairs(other, pictures1, pictures2))
    alone = torch.tensor([score_pairs(other, [a], [b])[0] for a, b in zip(pictures1, pictures2)])
    return float(torch.maximum((together - reference).abs(), (alone - reference).abs()).max())
