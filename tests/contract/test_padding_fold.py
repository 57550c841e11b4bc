"""Pads folded into the convolutions they feed (contract/padding_fold.py): the compiled backbone's program computes
the saved program's maps without a pad, and anything the fold does not cover is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from contract.compiled import (
    compilable_program, compile_backbone, cpp_compiler, export_backbone, load_package, run_program,
)
from contract.padding_fold import fold_padding_into_convolutions
from tests.support.system_tools import missing_system_tool
from training.efficientnet_lite import conv_bn

PAD_TARGETS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


def _pads(module: fx.GraphModule) -> int:
    return sum(node.target in PAD_TARGETS for node in module.graph.nodes)


class _SamePaddedStages(nn.Module):
    """EfficientNet-Lite's strided convolutions ("SAME" padding, one more row and column at the bottom and right
    for even sizes): a full and a depthwise 3 x 3, a depthwise 5 x 5, on even and odd sizes as the input halves."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 8, 3, 2, groups=8), conv_bn(8, 16, 1),
                                    conv_bn(16, 16, 5, 2, groups=16), conv_bn(16, 16, 5, 2, groups=16))
        generator = torch.Generator().manual_seed(0)
        for layer in self.modules():
            if isinstance(layer, nn.BatchNorm2d):  # statistics of their own, so that folding BatchNorm is tested too
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator))
                layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _exported(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    with torch.no_grad():
        return torch.export.export(module.eval(), (example,)).module()


@pytest.mark.parametrize("size", [(40, 40), (37, 42)])
def test_same_padding_folds_into_the_convolutions_and_computes_the_same_maps(size: tuple[int, int]) -> None:
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1))
    stages = _SamePaddedStages()
    module = _exported(nn.Sequential(*stages.layers), x)
    before = _pads(module)
    with torch.no_grad():
        expected = module(x)
    folded = fold_padding_into_convolutions(module)
    assert before >= 3 and folded == before and _pads(module) == 0  # at least the three odd-total pads
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


class _PadsLeftAlone(nn.Module):
    """Pads that are not a convolution's zero padding, or whose padded tensor is also used elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(4, 4, 3)
        self.dilated = nn.Conv2d(4, 4, 3, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reflected = self.convolution(F.pad(x, [1, 1, 1, 1], mode="reflect"))
        ones = self.convolution(F.pad(x, [0, 1, 0, 1], value=1.0))
        shared = F.pad(x, [0, 1, 0, 1])
        dilated = self.dilated(F.pad(x, [2, 2, 2, 2]))
        return reflected.sum() + ones.sum() + self.convolution(shared).sum() + shared.sum() + dilated.sum()


def test_pads_that_are_not_a_convolutions_zero_padding_stay() -> None:
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    module = _exported(_PadsLeftAlone(), x)
    pads = _pads(module)
    with torch.no_grad():
        expected = module(x)
    assert fold_padding_into_convolutions(module) == 0
    assert _pads(module) == pads == 4
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)


def test_the_program_compiled_has_no_pad_and_takes_any_batch(tmp_path: Path) -> None:
    stages = _SamePaddedStages()
    path = tmp_path / "backbone.pt2"
    export_backbone(stages, (36, 36), path)
    compiled_module = compilable_program(path).module()
    assert _pads(compiled_module) == 0 and _pads(torch.export.load(str(path)).module()) > 0
    for batch in (1, 5):
        x = torch.randn(batch, 3, 36, 36, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(compiled_module(x), run_program(path, x), rtol=0, atol=1e-5)


def test_the_compiled_package_computes_the_saved_programs_maps(tmp_path: Path) -> None:
    """The fold through AOTInductor: the package of a program with SAME pads (compiled with freezing, which folds
    BatchNorm into the widened kernels) gives the saved program's maps at any batch."""
    if cpp_compiler() is None:
        missing_system_tool("no C++ compiler (g++) to compile the backbone with: `apt-get install g++`")
    path, package = tmp_path / "backbone.pt2", tmp_path / "package.pt2"
    export_backbone(_SamePaddedStages(), (36, 36), path)
    compile_backbone(path, package, torch.device("cpu"))
    features = load_package(package, torch.device("cpu"))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 36, 36, generator=torch.Generator().manual_seed(batch))
        torch.testing.assert_close(features(x), run_program(path, x), rtol=0, atol=1e-5)
