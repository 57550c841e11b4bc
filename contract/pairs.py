"""Running a batch of pairs through a model's contract methods: both images of every pair in one backbone pass.

`forward(x1, x2)` runs `features` twice, once per side. One pass over the two sides stacked gives the same
feature maps (the exported model is in eval mode: no image influences another's), and it halves what a pass
costs beyond its arithmetic: the TorchScript interpreter's work and the kernel launches of each of the
backbone's layers. Measured on a 2-core CPU (`python -m bench.pair_pass`, bench/RESULTS.md, "Both sides in one
pass"): the default model scored a lone pair in 0.72x the time, batches of 2 to 16 pairs in 0.94-0.97x; a model
whose time is mostly that overhead, as a small model's is on a GPU, in 0.53-0.73x.
"""

from __future__ import annotations

import torch


def pair_feature_maps(model: torch.jit.ScriptModule, x1: torch.Tensor,
                      x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.features(x1)` and `model.features(x2)`, from one pass over both."""
    feature_maps = model.features(torch.cat([x1, x2]))
    return feature_maps[: len(x1)], feature_maps[len(x1):]


def pair_scores(model: torch.jit.ScriptModule, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The scores [N] of the pairs (x1[i], x2[i]): what `model(x1, x2)` computes, from one backbone pass."""
    feature_maps1, feature_maps2 = pair_feature_maps(model, x1, x2)
    return model.similarity(model.embed(feature_maps1), model.embed(feature_maps2))
