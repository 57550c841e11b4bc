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

# The names only (settings import them in every process, torch-free); the arithmetic is in contract/backbone.py.
Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
