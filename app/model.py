"""Loading a model from the store (the contract in contract/, documented in model_store/README.md) and running
batches of pairs through it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.jobs import EncodedJpeg
from app.model_view import ManifestFacts, ModelLoadError, ModelView, ScoringConstants
from contract.backbone import AutocastBackbone, ServedModule, unsupported_reason
from contract.compiled import CompiledBackbone
from contract.explainers import Method, PairMaps, contributions, decide, gradcam
from contract.explainers.contributions import ThresholdUnreachable
from contract.explanation import PairExplanation
from contract.manifest import MODEL_FILE, Manifest, ManifestError, read_manifest
from contract.precision import Precision
from contract.preprocess import Preprocessing
from contract.torchscript import TorchScriptError, load_torchscript, optimized_for_inference, sha256_of

@dataclass(frozen=True)
class ServedModel(ManifestFacts):
    path: Path  # the model.pt it was loaded from
    module: ServedModule  # model.pt's, or with its features compiled (fp32) or under autocast (bf16, fp16)
    manifest: Manifest
    device: torch.device
    precision: Precision  # what the backbone computes in (contract/precision.py)
    preprocessing: Preprocessing
    threshold_raw_logit: float | None  # the raw logit at the threshold; None when contributions are refused
    contributions_refusal: str | None  # why method=contributions cannot be served by this model (None: it can)

    @property
    def methods(self) -> tuple[Method, ...]:
        return ("gradcam",) if self.contributions_refusal else ("gradcam", "contributions")

    @property
    def backbone(self) -> str:
        """What computes the feature maps: "compiled" (contract/compiled.py) or "torchscript"."""
        return "compiled" if isinstance(self.module, CompiledBackbone) else "torchscript"

    def picture(self, source: bytes, name: str, max_pixels: int | None) -> torch.Tensor:
        """An image file as the uint8 picture [3, H, W] at the model's input size (on the CPU), decoded only as
        large as that needs, through the contract function training evaluates with; `score_pairs` and
        `explain_pairs` take these and normalize them a batch at a time."""
        return self.preprocessing.picture(source, name, max_pixels)

    def view(self) -> ModelView:
        """What the HTTP side needs to know of this model (app/model_view.py)."""
        return ModelView(manifest=self.manifest, methods=self.methods, contributions_refusal=self.contributions_refusal,
                         device=str(self.device), backbone=self.backbone, precision=self.precision,
                         embedding_scoring=embedding_scoring(self))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An upright RGB picture as the normalized float tensor [3, H, W] the model expects (on the CPU)."""
        return self.preprocessing(image)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={requested} but no CUDA device is visible; set DEVICE=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(f"DEVICE={requested} but only {torch.cuda.device_count()} CUDA devices are visible")
    return device


def load_model(model_dir: Path, device: str, precision: Precision = "fp32") -> ServedModel:
    """The model in `model_dir` on the chosen device, its backbone computing in `precision`, after checking the
    file against its manifest."""
    try:
        manifest = read_manifest(model_dir)
    except ManifestError as error:
        raise ModelLoadError(str(error)) from error
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path} is missing; re-export the model")
    actual = sha256_of(model_path)
    if actual != manifest.sha256:
        raise ModelLoadError(
            f"{model_path} does not match its manifest (sha256 {actual[:12]}..., manifest says "
            f"{manifest.sha256[:12]}...): the file is corrupt or was replaced; re-export the model"
        )
    chosen = pick_device(device)
    if reason := unsupported_reason(precision, chosen):
        raise ModelLoadError(reason)
    reduced = precision != "fp32"
    try:
        module = optimized_for_inference(load_torchscript(model_path, manifest.format_version, chosen),
                                         manifest.format_version, chosen, under_autocast=reduced)
    except TorchScriptError as error:
        raise ModelLoadError(str(error)) from error
    threshold_raw_logit, refusal = _contributions_support(model_path, module, manifest)
    return ServedModel(path=model_path, module=AutocastBackbone(module, precision, chosen) if reduced else module,
                       manifest=manifest, device=chosen, precision=precision, preprocessing=Preprocessing.of(manifest),
                       threshold_raw_logit=threshold_raw_logit, contributions_refusal=refusal)


def _contributions_support(model_path: Path, module: torch.jit.ScriptModule, manifest: Manifest
                           ) -> tuple[float | None, str | None]:
    if manifest.format_version < 2:
        return None, (f"the model {manifest.name} {manifest.version} has format_version "
                      f"{manifest.format_version}, which predates exact contributions: re-export it with "
                      f"`python -m training upgrade --model {model_path.parent}` (same weights, format version 2), "
                      "or use method=gradcam")
    try:
        return contributions.threshold_raw_logit(module, manifest.threshold), None
    except ThresholdUnreachable as error:
        return None, (f"{error}: set a reachable threshold in {model_path.parent}/manifest.json, or use "
                      "method=gradcam")


# A picture: uint8 [3, H, W], a numpy array from a front process (app/jobs.py) or a tensor from ServedModel.picture;
# or a JPEG file to decode on the model's GPU (DECODE_DEVICE=cuda).
Picture = np.ndarray | torch.Tensor | EncodedJpeg


def host_batch(pictures: Sequence[Picture], device: torch.device) -> torch.Tensor:
    """The uint8 pictures [3, H, W] stacked into one batch on the CPU, ready to move to `device`: for a CUDA device
    in pinned (page-locked) memory, which the GPU copies from by DMA while the CPU goes on (from ordinary memory a
    copy to the GPU is staged through a buffer of CUDA's and waits for it); for the CPU, the plain stack."""
    tensors = [torch.as_tensor(picture) for picture in pictures]
    if device.type != "cuda":
        return torch.stack(tensors)
    pinned = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.uint8, pin_memory=True)
    return torch.stack(tensors, out=pinned)


def _model_batch(model: ServedModel, pictures: Sequence[Picture]) -> torch.Tensor:
    """uint8 pictures [3, H, W] as the model's float input batch on its device: moved as bytes, normalized there
    in one pass (the same arithmetic per element as one picture at a time, so the scores do not change). JPEG files
    among them (DECODE_DEVICE=cuda) are decoded on the device, into their places in the batch.

    On a GPU the copy is queued without waiting (`non_blocking` from pinned memory): the normalisation and the
    model run after it on the same stream, torch's pinned-memory cache reuses the batch's buffer only once the
    copy's recorded event has passed, and every result comes back through `.cpu()` or `.tolist()`, copies to
    ordinary memory that wait for the stream: nothing reads a result, or rewrites the buffer, before the GPU is
    done with it."""
    jpegs = [index for index, picture in enumerate(pictures) if isinstance(picture, EncodedJpeg)]
    if not jpegs:
        batch = host_batch(pictures, model.device).to(model.device, non_blocking=True)
    else:
        from app.device_decode import decode_pictures  # torchvision's decoders: only where DECODE_DEVICE=cuda

        batch = torch.empty((len(pictures), 3, *model.input_size), dtype=torch.uint8, device=model.device)
        batch[jpegs] = decode_pictures([pictures[index] for index in jpegs], model.input_size, model.device)
        if decoded := [index for index, picture in enumerate(pictures) if not isinstance(picture, EncodedJpeg)]:
            on_host = host_batch([pictures[index] for index in decoded], model.device)
            batch[decoded] = on_host.to(model.device, non_blocking=True)
    assert batch.dtype == torch.uint8, "pass ServedModel.picture's uint8 pictures"
    return model.preprocessing.normalize(batch)


def score_batch(module: ServedModule, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Scores [N] of the pairs (x1[i], x2[i])."""
    with torch.inference_mode():
        return module(x1, x2)


def score_pairs(model: ServedModel, pictures1: Sequence[Picture], pictures2: Sequence[Picture]) -> list[float]:
    """One batch of /similarity work: the score of each pair of uint8 pictures."""
    scores = score_batch(model.module, _model_batch(model, pictures1), _model_batch(model, pictures2))
    return scores.cpu().tolist()


def explain_pairs(
    model: ServedModel, pictures1: Sequence[Picture], pictures2: Sequence[Picture], method: Method
) -> list[PairExplanation]:
    """One batch of /explain work with one method on pairs of uint8 pictures: each pair's score, decision, four
    heatmaps and (with contributions) its exact decomposition, as numpy arrays (app/jobs.py)."""
    decided = decide(model.module, _model_batch(model, pictures1), _model_batch(model, pictures2), model.threshold)
    found: contributions.Contributions | None = None
    if method == "contributions":
        assert model.threshold_raw_logit is not None, model.contributions_refusal
        found = contributions.explain(model.module, decided.feature_maps1, decided.feature_maps2, decided.similar,
                                      model.threshold_raw_logit, model.input_size)
        maps = found.maps
    else:
        maps = gradcam.explain(model.module, decided.feature_maps1, decided.feature_maps2, decided.similar,
                               model.input_size)
    maps = PairMaps(*(batch.cpu().numpy() for batch in maps))
    scores, similar = decided.scores.cpu().tolist(), decided.similar.cpu().tolist()
    return [
        PairExplanation(scores[index], similar[index], PairMaps(*(batch[index] for batch in maps)),
                        found.pair(index) if found is not None else None)
        for index in range(len(pictures1))
    ]


# TorchScript's profiling executor optimises a method only after it has run this many times.
_WARM_UP_RUNS = 3


def _blank(model: ServedModel) -> list[torch.Tensor]:
    return [torch.zeros(3, *model.input_size, dtype=torch.uint8)]


def warm_up(model: ServedModel) -> None:
    """Run both kinds of batch a few times, so that the first requests do not pay for lazy optimisation; a model
    that fails here would fail every request, so it is refused at start-up."""
    blank = _blank(model)
    try:
        for _ in range(_WARM_UP_RUNS):
            score_pairs(model, blank, blank)
            for method in model.methods:
                explain_pairs(model, blank, blank, method)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fallback = "" if model.precision == "fp32" else f", or serve it with PRECISION=fp32 ({model.precision} failed)"
        raise ModelLoadError(
            f"{model.path} failed its warm-up batch on {model.device} ({reason}); check that it was exported by "
            f"`python -m training train` for input_size {list(model.input_size)}, or re-export it{fallback}"
        ) from error


def warm_up_device_decoding(model: ServedModel) -> None:
    """DECODE_DEVICE=cuda: a pair of JPEG files decoded on the device and scored before the first request (the
    decoder's first call sets it up), as a request's would be."""
    from app.device_decode import blank_jpeg

    blank = blank_jpeg(model.input_size)
    score_pairs(model, [blank], [blank])


def score_blank_pair(model: ServedModel) -> list[float]:
    """The warm-up's first batch again: a model that fails on it is broken, whatever it was sent."""
    blank = _blank(model)
    return score_pairs(model, blank, blank)


# /embed and /rank: images one at a time through the backbone and the head, then scored as embeddings.


def embed_pictures(model: ServedModel, pictures: Sequence[Picture]) -> list[np.ndarray]:
    """One batch of /embed work: each uint8 picture's embedding [D] (float32), the one `forward` scores pairs
    with."""
    with torch.inference_mode():
        embeddings = model.module.embed(model.module.features(_model_batch(model, pictures)))
    return list(embeddings.cpu().numpy())


def score_embeddings(model: ServedModel, query: np.ndarray, candidates: Sequence[np.ndarray]) -> list[float]:
    """The score of the query's embedding with each candidate's, by the model's own `similarity`: a few hundred
    multiply-adds per candidate, cheap enough for any thread."""
    with torch.inference_mode():
        stacked = torch.from_numpy(np.stack(candidates))
        return model.module.similarity(torch.from_numpy(query).expand_as(stacked), stacked).tolist()


def embedding_scoring(model: ServedModel) -> ScoringConstants | None:
    """The constants of the model's score as a function of two embeddings; None for a format-version-1 model,
    whose contract has no `pair_weight` and `offset` (its embeddings are scored by `similarity` only)."""
    if model.manifest.format_version < 2:
        return None
    with torch.inference_mode():
        pair_weight, offset = float(model.module.pair_weight()), float(model.module.offset())
    at_threshold = model.threshold_raw_logit
    return ScoringConstants(
        pair_weight=pair_weight, offset=offset, max_logit=float(model.module.max_logit), threshold=model.threshold,
        threshold_dot_product=None if at_threshold is None or pair_weight == 0
        else (at_threshold - offset) / pair_weight,
    )


def warm_up_embeddings(model: ServedModel) -> None:
    """`warm_up` for the embedding path: `features` and `embed` on a batch of images, then `similarity` on the
    embeddings, so that the first /embed and /rank requests do not pay for lazy optimisation either."""
    blank = _blank(model)
    for _ in range(_WARM_UP_RUNS):
        embeddings = embed_pictures(model, blank * 2)
        score_embeddings(model, embeddings[0], embeddings[1:])
