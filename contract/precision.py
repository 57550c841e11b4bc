"""PRECISION: the arithmetic the backbone runs in (docs/settings.md).

- `fp32`, the default: model.pt's own arithmetic, exact and batch-invariant scores (TF32 off on GPUs,
  contract/torchscript.py), the compiled backbone where COMPILE=auto finds one.
- `bf16` and `fp16`: the TorchScript backbone (`features`) under `torch.autocast` in that type, its feature maps
  handed on as fp32. The head (embed, similarity), Grad-CAM's gradients and the exact contributions then compute
  in fp32 on those maps: the contributions still sum to the raw logit the score is made of, and the gradients
  cannot underflow or overflow in a 16-bit type; only the backbone's rounding moves a score
  (`python -m bench.precision_bench` measures by how much over the test split). The compiled backbone is an fp32
  program, so a reduced precision serves the TorchScript one.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from contract.backbone import SplitBackbone

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
_AUTOCAST_TYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def unsupported_reason(precision: Precision, device: torch.device) -> str | None:
    """Why `precision` cannot run on `device` (what to set instead), or None when it can."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"PRECISION=bf16 needs a GPU of compute capability 8.0 or later ({torch.cuda.get_device_name(device)} "
                f"is {major}.{minor}); use fp16 or fp32")
    return None


class AutocastBackbone(SplitBackbone):
    """A TorchScript model whose `features` runs under autocast in bf16 or fp16 and returns fp32 maps."""

    def __init__(self, module: torch.jit.ScriptModule, precision: Precision, device: torch.device) -> None:
        super().__init__(module)
        self._dtype = _AUTOCAST_TYPES[precision]
        self._device_type = device.type

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self._device_type, dtype=self._dtype):
            maps = self.module.features(x)
        return maps.float()
