"""Zero padding folded into the convolution it feeds, before a backbone program is compiled.

EfficientNet-Lite pads its strided convolutions like TensorFlow's "SAME" (training/efficientnet_lite.py's
Conv2dSame): one more row and column at the bottom and right, which a convolution's own (symmetric) padding cannot
express, so the program pads into a new tensor first. Compiled, those copies cost about a tenth of Lite0's
`features` for eight pairs on a CPU (five pads of up to 78 MB; bench/RESULTS.md, "Compiled backbone: the
padding folded into the convolutions"), and oneDNN's convolutions would pad for free.

A pad of (left l, right r) before a convolution of kernel k is the convolution padded symmetrically by
p = max(l, r) with the kernel widened by p - l zeros in front and p - r behind: every window then starts where
the padded one started, ends past it only over zero weights, and the output has the same size. The extra
products are exact zeros (the backbone's activations are finite), so only the order of the sums can change: the
result stays within the score tolerance the service checks before serving the compiled backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

_aten = torch.ops.aten
_SIDES = 4  # a 2-d pad: (left, right, top, bottom)


def fold_padding_into_convolutions(module: fx.GraphModule) -> int:
    """Rewrite `module` (an unlifted `torch.export` module: weights are attributes) so that every constant zero
    pad feeding only a 2-d convolution becomes that convolution's own padding; the number of pads folded."""
    folded = 0
    for pad in list(module.graph.nodes):
        sides = _zero_pad_sides(pad)
        if sides is None or len(pad.users) != 1:
            continue
        (convolution,) = pad.users
        arguments = _unpadded_convolution_arguments(convolution, pad)
        if arguments is None:
            continue
        _, weight_node, bias, stride, _, _, groups = arguments
        left, right, top, bottom = sides
        padding_h, padding_w = max(top, bottom), max(left, right)
        weight = attrgetter(weight_node.target)(module).detach()
        widened = F.pad(weight, [padding_w - left, padding_w - right, padding_h - top, padding_h - bottom])
        name = f"{weight_node.target.replace('.', '_')}_padding_folded"
        module.register_parameter(name, torch.nn.Parameter(widened, requires_grad=False))
        with module.graph.inserting_before(convolution):
            widened_node = module.graph.get_attr(name)
        convolution.args = (pad.args[0], widened_node, bias, stride, [padding_h, padding_w], [1, 1], groups)
        module.graph.erase_node(pad)
        folded += 1
    if folded:
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.recompile()
    return folded


def _zero_pad_sides(node: fx.Node) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of a constant zero pad of the last two dimensions, else None."""
    if node.op != "call_function":
        return None
    if node.target == _aten.pad.default:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    elif node.target == _aten.constant_pad_nd.default:
        mode, value = "constant", node.kwargs.get("value", node.args[2] if len(node.args) > 2 else 0)
    else:
        return None
    sides = node.args[1]
    if mode != "constant" or value not in (None, 0) or len(sides) != _SIDES or min(sides) < 0:
        return None
    left, right, top, bottom = (int(side) for side in sides)
    return left, right, top, bottom


def _unpadded_convolution_arguments(node: fx.Node, pad: fx.Node) -> list[Any] | None:
    """`aten.conv2d`'s seven arguments, defaults filled in, when `node` convolves `pad` with a weight attribute,
    no padding of its own and no dilation (what the fold assumes), else None."""
    if node.op != "call_function" or node.target != _aten.conv2d.default or node.kwargs:
        return None
    defaults: list[Any] = [None, None, None, 1, 0, 1, 1]
    arguments = list(node.args) + defaults[len(node.args):]
    source, weight, _, _, padding, dilation, _ = arguments
    if source is not pad or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if _pair(padding) != [0, 0] or _pair(dilation) != [1, 1]:
        return None
    return arguments


def _pair(value: int | Sequence[int]) -> list[int]:
    return [value, value] if isinstance(value, int) else list(value)
