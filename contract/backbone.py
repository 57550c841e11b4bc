"""A served model whose backbone (`features`) runs otherwise than model.pt's TorchScript method does: compiled for
the serving machine (contract/compiled.py) or in a reduced precision (contract/precision.py).

Only the backbone, where nearly all of a pair's arithmetic is, runs differently: every other method is the
TorchScript module's own, in fp32 (the head the explainers differentiate, the exact contributions' terms), and
the feature maps come out as fp32 tensors computed without autograd (`contract.explainers.decide` takes them so).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from contract.precision import Precision


class SplitBackbone(ABC):
    """A TorchScript model with its `features` replaced; calling it scores pairs as `forward` does."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature maps [N, C, h, w] of the normalized batch `x`, as fp32, without autograd."""

    def pair_features(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' feature maps from one call: one pair is a batch of two images, which keeps both cores of a
        small CPU busy (TorchScript's forward makes two passes)."""
        maps1, maps2 = self.features(torch.cat([x1, x2])).chunk(2)
        return maps1, maps2

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        maps1, maps2 = self.pair_features(x1, x2)
        return self.module.similarity(self.module.embed(maps1), self.module.embed(maps2))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


# What the service runs: model.pt's module as it is, or with its backbone replaced.
ServedModule = torch.jit.ScriptModule | SplitBackbone


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
