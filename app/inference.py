"""The steps of an inference request between the route and the model: read and decode the uploads, wait for
the batch result (with timeout and disconnect handling), and render the explanations."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import Request, UploadFile
from PIL import Image

from app import metrics
from app.batcher import Batcher, Job, Outcome, QueueFull
from app.errors import CLIENT_CLOSED_REQUEST, Problem, service_unavailable
from app.model import PairExplanation, ServedModel
from app.overlays import MEDIA_TYPES, ColormapName, OverlayFormat, render_overlay
from app.schemas import Contributions, Explanation, Explanations, ImageContributions, Match, Overlay, Target
from app.service import Service
from app.settings import Settings
from contract.explainers import Method, cell_box
from contract.explainers.contributions import PairContributions
from contract.images import decode_upright_rgb


@dataclass(frozen=True)
class DecodedPair:
    originals: tuple[Image.Image, Image.Image]  # upright RGB, at their own size: overlays are drawn on them
    inputs: tuple[torch.Tensor, torch.Tensor]  # what the model sees


@dataclass(frozen=True)
class OverlayOptions:
    format: OverlayFormat
    opacity: float
    colormap: ColormapName
    max_side: int
    include_heatmaps: bool


async def read_pair(image1: UploadFile, image2: UploadFile, model: ServedModel, settings: Settings) -> DecodedPair:
    """Both uploads decoded and preprocessed, off the event loop; 413 for files over the limit, the contract's
    image errors (mapped to 415/422 in errors.py) for the rest."""
    uploads = {"image1": image1, "image2": image2}
    for field, upload in uploads.items():
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise Problem(413, "content-too-large",
                          f"{field} is {upload.size:,} bytes; the limit is {settings.max_upload_bytes:,} bytes. "
                          "Send a smaller file.")
    contents = [await upload.read() for upload in uploads.values()]
    return await asyncio.to_thread(_decode_pair, contents, list(uploads), model, settings.max_image_pixels)


def _decode_pair(contents: list[bytes], fields: list[str], model: ServedModel, max_pixels: int) -> DecodedPair:
    first, second = (decode_upright_rgb(data, field, max_pixels) for data, field in zip(contents, fields, strict=True))
    return DecodedPair((first, second), (model.preprocess(first), model.preprocess(second)))


async def run_in_batch(request: Request, batcher: Batcher, kind: str, pair: DecodedPair, arrived: float,
                       settings: Settings) -> Outcome:
    """Queue the pair and wait for its result, until REQUEST_TIMEOUT_S after it `arrived` (time.monotonic)
    or until the client leaves."""
    deadline = arrived + settings.request_timeout_s
    try:
        job = batcher.submit(kind, *pair.inputs)
    except QueueFull:
        metrics.REJECTIONS.labels("queue_full").inc()
        raise service_unavailable("The service is at capacity; retry shortly.", settings.retry_after_s) from None
    client_gone = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({job.future, client_gone}, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_gone.cancel()
    if job.future.done():
        return job.future.result()
    _give_up(batcher, job)
    if client_gone.done() and not client_gone.cancelled():
        metrics.REJECTIONS.labels("disconnected").inc()
        raise Problem(CLIENT_CLOSED_REQUEST, "client-closed-request", "The client closed the connection.")
    metrics.REJECTIONS.labels("timeout").inc()
    raise Problem(504, "timeout", f"The request took longer than {settings.request_timeout_s:g} s (the service "
                  "is overloaded); retry later or with smaller images.")


def _give_up(batcher: Batcher, job: Job) -> None:
    # Not started yet: the pair leaves its queue. Already running: its result will simply be ignored.
    if not batcher.withdraw(job):
        job.future.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timings_ms(outcome: Outcome, arrived: float) -> dict[str, float]:
    return {
        "queue_wait": round(outcome.queue_wait_s * 1000, 3),
        "inference": round(outcome.inference_s * 1000, 3),
        "total": round((time.monotonic() - arrived) * 1000, 3),
    }


def render_explanations(pair: DecodedPair, result: PairExplanation, options: OverlayOptions) -> Explanations:
    """The four overlays of one pair (CPU work: run it in a thread)."""
    factual: Target = "similar" if result.similar else "dissimilar"
    counterfactual: Target = "dissimilar" if factual == "similar" else "similar"
    maps = result.maps
    return Explanations(
        factual=Explanation(target=factual, image1=_overlay(pair.originals[0], maps.factual1, options),
                            image2=_overlay(pair.originals[1], maps.factual2, options)),
        counterfactual=Explanation(
            target=counterfactual, image1=_overlay(pair.originals[0], maps.counterfactual1, options),
            image2=_overlay(pair.originals[1], maps.counterfactual2, options)),
    )


def describe_contributions(pair: DecodedPair, found: PairContributions, top_matches: int,
                           include_correspondence: bool) -> Contributions:
    """One pair's contributions, its top matches boxed in the original images' pixels."""
    grid = found.grid
    size1, size2 = pair.originals[0].size, pair.originals[1].size
    return Contributions(
        raw_logit=found.raw_logit,
        offset=found.offset,
        threshold_raw_logit=found.threshold_raw_logit,
        grid=grid,
        image1=ImageContributions(**dict(zip(("positive", "negative"), found.totals(1), strict=True))),
        image2=ImageContributions(**dict(zip(("positive", "negative"), found.totals(2), strict=True))),
        matches=[
            Match(image1_cell=match.cell1, image2_cell=match.cell2, image1_box=cell_box(*match.cell1, grid, size1),
                  image2_box=cell_box(*match.cell2, grid, size2), contribution=match.contribution,
                  share=match.share)
            for match in found.top_matches(top_matches)
        ],
        correspondence=found.correspondence.tolist() if include_correspondence else None,
    )


def _overlay(original: Image.Image, heatmap: torch.Tensor, options: OverlayOptions) -> Overlay:
    values = heatmap.numpy()
    encoded, width, height = render_overlay(
        original, values, options.colormap, options.opacity, options.max_side, options.format
    )
    return Overlay(
        media_type=MEDIA_TYPES[options.format],
        overlay=base64.b64encode(encoded).decode("ascii"),
        width=width,
        height=height,
        no_positive_evidence=not bool(values.max() > 0),
        heatmap=np.round(values, 4).tolist() if options.include_heatmaps else None,
    )


def require_method(model: ServedModel, method: Method) -> None:
    """Refuse, before anything is decoded, a method the served model cannot explain with."""
    if method not in model.methods:
        raise Problem(422, "method-unavailable", f"method={method} is not available: {model.contributions_refusal}.")


def require_ready(service: Service) -> tuple[ServedModel, Batcher]:
    if service.model is None or service.batcher is None:
        raise service_unavailable("The model is still loading; retry shortly.", service.settings.retry_after_s)
    return service.model, service.batcher
