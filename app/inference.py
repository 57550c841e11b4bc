"""The steps of an inference request between the route and the model: admit and decode the uploads, wait for
the batch result (with timeout and disconnect handling), and render the explanations."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from fastapi import Request, UploadFile

from app import metrics
from app.admission import BudgetExhausted, ImageWork, OverBudget
from app.batcher import Batcher, Job, Outcome, QueueFull, WorkerStopped
from app.errors import CLIENT_CLOSED_REQUEST, Problem, service_unavailable
from app.model import PairExplanation, ServedModel
from app.overlays import MEDIA_TYPES, Background, ColormapName, OverlayFormat, overlay_background, render_overlay
from app.schemas import Contributions, Explanation, Explanations, ImageContributions, Match, Overlay, Target
from app.service import Service
from app.settings import Settings
from contract.explainers import Method, cell_box
from contract.explainers.contributions import PairContributions
from contract.images import header_pixels


@dataclass(frozen=True)
class DecodedPair:
    pictures: tuple[torch.Tensor, torch.Tensor]  # uint8 [3, H, W] at the model's input size: what it sees
    # /explain only: each upright original at overlay size, decoded and resized once for all its overlays, once
    # `batch_ran` is set (cancelled if the pair's batch fails)
    backgrounds: asyncio.Future[list[Background]] | None = None
    batch_ran: asyncio.Event | None = None


@dataclass(frozen=True)
class OverlayOptions:
    format: OverlayFormat
    opacity: float
    colormap: ColormapName
    max_side: int
    include_heatmaps: bool
    quality: int


async def read_pair(image1: UploadFile, image2: UploadFile, model: ServedModel, batcher: Batcher, kind: str,
                    images: ImageWork, settings: Settings, overlay_max_side: int | None = None) -> DecodedPair:
    """Both uploads admitted, then decoded and preprocessed side by side on the image threads; with
    `overlay_max_side`, their overlay backgrounds are decoded once `run_in_batch` has run the pair (their pixels
    stay charged until then). Refused before any decoding: 413 for files over the limit, 503 when the
    `kind` queue is full or the images' pixels cannot be admitted within ADMISSION_WAIT_S, 422 for a pair larger
    than the whole budget, and the contract's image errors (415/422 in errors.py) for what its header says."""
    uploads = {"image1": image1, "image2": image2}
    for field, upload in uploads.items():
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise Problem(413, "content-too-large",
                          f"{field} is {upload.size:,} bytes; the limit is {settings.max_upload_bytes:,} bytes. "
                          "Send a smaller file.")
    if batcher.is_full(kind):
        raise _queue_full(settings)
    contents = [await upload.read() for upload in uploads.values()]
    # Headers only (a few kB each): cheap enough for the event loop, and the image threads may all be busy.
    pixels = sum(header_pixels(data, field, settings.max_image_pixels) for data, field in zip(contents, uploads))
    try:
        await images.admit(pixels, settings.admission_wait_s)
    except OverBudget:
        raise Problem(422, "images-too-large",
                      f"image1 and image2 hold {pixels:,} pixels together; this service decodes at most "
                      f"{images.budget.capacity:,} at once (MAX_DECODE_PIXELS_IN_FLIGHT). Send smaller images.")\
            from None
    except BudgetExhausted:
        metrics.REJECTIONS.labels("decode_budget").inc()
        raise service_unavailable("The service is busy decoding other images; retry shortly.",
                                  settings.retry_after_s) from None
    files = list(zip(contents, uploads, strict=True))
    try:
        first, second = await images.run_all(
            [partial(model.picture, data, field, settings.max_image_pixels) for data, field in files])
    except BaseException:
        images.discharge(pixels)
        raise
    if overlay_max_side is None:
        images.discharge(pixels)
        return DecodedPair((first, second))
    # A second decode, at overlay size (the model's input must not depend on the endpoint that asked for it),
    # after the pair's batch: decoding beside the batch took the model's cores, so that its OpenMP team waited
    # on its preempted threads, and a 12 Mpx pair's /explain took longer (bench/RESULTS.md, "Real photos").
    batch_ran = asyncio.Event()

    async def backgrounds_after_the_batch() -> list[Background]:
        await batch_ran.wait()
        return await images.run_all(
            [partial(overlay_background, data, field, settings.max_image_pixels, overlay_max_side)
             for data, field in files])

    backgrounds = asyncio.ensure_future(backgrounds_after_the_batch())
    backgrounds.add_done_callback(lambda done: _backgrounds_decoded(done, images, pixels))
    return DecodedPair((first, second), backgrounds, batch_ran)


def _backgrounds_decoded(backgrounds: asyncio.Future[list[Background]], images: ImageWork, pixels: int) -> None:
    images.discharge(pixels)
    if not backgrounds.cancelled():
        backgrounds.exception()  # retrieved here, for a request that failed before it needed them


async def run_in_batch(request: Request, batcher: Batcher, kind: str, pair: DecodedPair, arrived: float,
                       settings: Settings) -> Outcome:
    """Queue the pair and wait for its result, until REQUEST_TIMEOUT_S after it `arrived` (time.monotonic)
    or until the client leaves; then start decoding its overlay backgrounds, if it has any (or drop them if it
    failed)."""
    try:
        outcome = await _run_in_batch(request, batcher, kind, pair, arrived, settings)
    except BaseException:
        if pair.backgrounds is not None:
            pair.backgrounds.cancel()  # never decoded: their pixels go back to the budget
        raise
    if pair.batch_ran is not None:
        pair.batch_ran.set()
    return outcome


async def _run_in_batch(request: Request, batcher: Batcher, kind: str, pair: DecodedPair, arrived: float,
                        settings: Settings) -> Outcome:
    deadline = arrived + settings.request_timeout_s
    try:
        job = batcher.submit(kind, *pair.pictures)
    except QueueFull:  # filled while this pair was being decoded
        raise _queue_full(settings) from None
    except WorkerStopped:
        raise _worker_stopped(settings) from None
    client_gone = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({job.future, client_gone}, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_gone.cancel()
    if job.future.done():
        try:
            return job.future.result()
        except WorkerStopped:
            raise _worker_stopped(settings) from None
    _give_up(batcher, job)
    if client_gone.done() and not client_gone.cancelled():
        metrics.REJECTIONS.labels("disconnected").inc()
        raise Problem(CLIENT_CLOSED_REQUEST, "client-closed-request", "The client closed the connection.")
    raise _timed_out(settings)


def _timed_out(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("timeout").inc()
    return Problem(504, "timeout", f"The request took longer than {settings.request_timeout_s:g} s (the service "
                   "is overloaded); retry later or with smaller images.")


def _queue_full(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("queue_full").inc()
    return service_unavailable("The service is at capacity; retry shortly.", settings.retry_after_s)


def _worker_stopped(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("worker_stopped").inc()
    return service_unavailable("This replica's inference worker has stopped and it is restarting; retry, another "
                               "replica will answer.", settings.retry_after_s)


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


async def render_in_time(images: ImageWork, pair: DecodedPair, result: PairExplanation, options: OverlayOptions,
                         arrived: float, settings: Settings) -> Explanations:
    """The explanations rendered on the image threads, the four overlays side by side, once the backgrounds are
    decoded; 504 if they are not done REQUEST_TIMEOUT_S after the request `arrived` (the rendering threads finish
    their overlays, and the result is dropped)."""
    assert pair.backgrounds is not None, "read the pair with overlay_max_side to render its explanations"
    remaining = max(0.0, arrived + settings.request_timeout_s - time.monotonic())
    try:
        async with asyncio.timeout(remaining):
            return await render_explanations(images, await asyncio.shield(pair.backgrounds), result, options)
    except TimeoutError:
        raise _timed_out(settings) from None


async def render_explanations(images: ImageWork, backgrounds: list[Background], result: PairExplanation,
                              options: OverlayOptions) -> Explanations:
    """The four overlays of one pair, drawn over its two `backgrounds` on the image threads."""
    factual: Target = "similar" if result.similar else "dissimilar"
    counterfactual: Target = "dissimilar" if factual == "similar" else "similar"
    maps = result.maps
    heatmaps = (maps.factual1, maps.factual2, maps.counterfactual1, maps.counterfactual2)
    factual1, factual2, counterfactual1, counterfactual2 = await images.run_all(
        [partial(_overlay, backgrounds[index % 2].pixels, heatmap, options)
         for index, heatmap in enumerate(heatmaps)])
    return Explanations(
        factual=Explanation(target=factual, image1=factual1, image2=factual2),
        counterfactual=Explanation(target=counterfactual, image1=counterfactual1, image2=counterfactual2),
    )


def describe_contributions(pair: DecodedPair, found: PairContributions, top_matches: int,
                           include_correspondence: bool) -> Contributions:
    """One pair's contributions, its top matches boxed in the original (upright) images' pixels; call it once the
    pair's backgrounds are decoded (after `render_in_time`), which tell the originals' sizes."""
    assert pair.backgrounds is not None and pair.backgrounds.done(), "render the explanations first"
    grid = found.grid
    size1, size2 = (background.original_size for background in pair.backgrounds.result())
    return Contributions(
        raw_logit=found.raw_logit,
        offset=found.offset,
        threshold_raw_logit=found.threshold_raw_logit,
        grid=grid,
        image1=ImageContributions(**found.totals(1)._asdict()),
        image2=ImageContributions(**found.totals(2)._asdict()),
        matches=[
            Match(image1_cell=match.cell1, image2_cell=match.cell2, image1_box=cell_box(*match.cell1, grid, size1),
                  image2_box=cell_box(*match.cell2, grid, size2), contribution=match.contribution,
                  share=match.share)
            for match in found.top_matches(top_matches)
        ],
        correspondence=found.correspondence.tolist() if include_correspondence else None,
    )


def _overlay(background: np.ndarray, heatmap: torch.Tensor, options: OverlayOptions) -> Overlay:
    values = heatmap.numpy()
    encoded = render_overlay(background, values, options.colormap, options.opacity, options.format, options.quality)
    height, width = background.shape[:2]
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


def require_ready(service: Service) -> tuple[ServedModel, Batcher, ImageWork]:
    if service.model is None or service.batcher is None or service.images is None:
        raise service_unavailable("The model is still loading; retry shortly.", service.settings.retry_after_s)
    if service.batcher.stopped:
        raise _worker_stopped(service.settings)
    return service.model, service.batcher, service.images
