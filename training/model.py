"""The Siamese network: one shared convolutional backbone, a projection head, a smooth similarity score.

The exported TorchScript module exposes these methods, the contract with the service
(see model_store/README.md; format version 2):

    features(x)          normalized images [N,3,H,W] -> last convolutional feature maps [N,C,h,w]
    embed(f)             feature maps -> embeddings [N,D]
    similarity(e1, e2)   embeddings -> scores [N] in [0, 1], higher is more similar
    forward(x1, x2)      similarity(embed(features(x1)), embed(features(x2)))
    embed_cells(f)       feature maps -> each cell's share of the embedding [N,h,w,D]; summed over cells: embed(f)
    raw_logit(e1, e2)    embeddings -> the raw logit [N], pair_weight() * <e1, e2> + offset()
    score_of_raw(r)      raw logits -> scores: the smooth squash, then the sigmoid
    raw_of_score(s)      scores -> raw logits: the exact inverse of score_of_raw (for scores it can reach)
    pair_weight()        the bilinear form's weight, scale / D
    offset()             the raw logit's offset, bias

Together the last six make the raw logit an exact sum over pairs of cells (contract/explainers/contributions.py):
``raw = sum_ij pair_weight() * <u1(i), u2(j)> + offset()`` with ``u = embed_cells(f)``, because ``embed`` is an
affine map (Linear, then BatchNorm1d in eval mode) of the average-pooled features: applying it to each cell and
dividing by the number of cells P gives ``u(i) = (A f_i + c) / P``, which sums to ``A mean(f) + c``.

The score is ``sigmoid(scale * <e1, e2> / D + bias)``. It is a dot product on purpose: a score that is a
function of a distance or a cosine is at its maximum for identical images, so its gradient (and with it every
Grad-CAM map) vanishes exactly there. The dot product has a non-zero gradient for every pair, and the sigmoid's
logit is squashed smoothly into [-15, 15] (``r / sqrt(1 + (r / 15)^2)``, whose slope decays only
polynomially), so that ``s * (1 - s)`` never rounds to zero in float32 and no clamp cuts the gradient. ``scale`` and
``bias`` are calibrated on the validation split (Platt scaling) so the score reads as the probability that
both images show one class.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")

# |logit| < 15 keeps sigmoid'(logit) >= 3e-7 in float32: the score never saturates to a zero gradient.
MAX_LOGIT = 15.0


def build_backbone(
    name: str, weights_path: Path | None = None, torchvision_weights: str | None = None
) -> tuple[nn.Module, int]:
    """A torchvision architecture cut before its pooling layer, and its number of output channels.

    Nothing is downloaded unless ``torchvision_weights`` names torchvision's own weights (e.g. "DEFAULT");
    ``weights_path`` loads a local torchvision state dict for the full architecture.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    net = torchvision.models.get_model(name, weights=torchvision_weights)
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    if name.startswith("resnet"):
        body = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        return body, net.fc.in_features
    return net.features, net.features[-1].out_channels


class SiameseNet(nn.Module):
    __constants__ = ["embedding_dim", "max_logit"]

    def __init__(self, backbone: nn.Module, channels: int, embedding_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = nn.AdaptiveAvgPool2d(1)
        # BatchNorm keeps every embedding dimension on a comparable scale, so the dot product divided by D
        # stays in a range the calibration can map; in eval mode it is a fixed per-dimension affine map,
        # so pairs in a batch never influence each other.
        self.projection = nn.Sequential(nn.Linear(channels, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.embedding_dim = embedding_dim
        self.max_logit = MAX_LOGIT
        self.register_buffer("scale", torch.tensor(4.0))
        self.register_buffer("bias", torch.tensor(0.0))

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.jit.export
    def embed(self, feature_maps: torch.Tensor) -> torch.Tensor:
        return self.projection(torch.flatten(self.pool(feature_maps), 1))

    @torch.jit.export
    def embed_cells(self, feature_maps: torch.Tensor) -> torch.Tensor:
        # Exact only in eval mode, where BatchNorm1d is a fixed affine map (always so in an exported model).
        count, channels, height, width = feature_maps.shape
        cells = feature_maps.permute(0, 2, 3, 1).reshape(count * height * width, channels)
        shares = self.projection(cells) / float(height * width)
        return shares.reshape(count, height, width, self.embedding_dim)

    @torch.jit.export
    def pair_weight(self) -> torch.Tensor:
        return self.scale / self.embedding_dim

    @torch.jit.export
    def offset(self) -> torch.Tensor:
        return self.bias

    @torch.jit.export
    def raw_logit(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return self.scale * (e1 * e2).sum(dim=1) / self.embedding_dim + self.bias

    def squash(self, raw: torch.Tensor) -> torch.Tensor:
        return raw * torch.rsqrt(1.0 + (raw / self.max_logit) ** 2)

    @torch.jit.export
    def score_of_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.squash(raw))

    @torch.jit.export
    def raw_of_score(self, score: torch.Tensor) -> torch.Tensor:
        # The squash maps the real line onto (-max_logit, max_logit); beyond, no raw logit exists (NaN or inf).
        squashed = torch.logit(score)
        return squashed * torch.rsqrt(1.0 - (squashed / self.max_logit) ** 2)

    @torch.jit.export
    def similarity_logit(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return self.squash(self.raw_logit(e1, e2))

    @torch.jit.export
    def similarity(self, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
        return self.score_of_raw(self.raw_logit(e1, e2))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.similarity(self.embed(self.features(x1)), self.embed(self.features(x2)))


def build_siamese(
    backbone: str,
    embedding_dim: int = 128,
    weights_path: Path | None = None,
    torchvision_weights: str | None = None,
) -> SiameseNet:
    body, channels = build_backbone(backbone, weights_path, torchvision_weights)
    return SiameseNet(body, channels, embedding_dim)
