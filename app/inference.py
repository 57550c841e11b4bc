"""The steps of an inference request between the route and the model: admit and decode the uploads, wait for
the batch result (with timeout and disconnect handling), and render the explanations."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import Request, UploadFile

from app import metrics
from app.admission import BudgetExhausted, ImageWork, OverBudget
from app.errors import CLIENT_CLOSED_REQUEST, Problem, service_unavailable
from app.jobs import EncodedJpeg, Inference, Job, JobPicture, Outcome, QueueFull, WorkerStopped
from app.model_view import ModelView
from app.overlays import MEDIA_TYPES, Background, ColormapName, OverlayFormat, overlay_background, render_overlay
from app.schemas import (
    SPREAD_FACTOR, Contributions, Evidence, ExplainedPair, Explanation, Explanations, ImageContributions, Match,
    Overlay, Target,
)
from app.service import Service
from app.settings import Settings
from contract.explanation import Method, PairContributions, PairExplanation, cell_box
from contract.images import device_jpeg_header, header_pixels


@dataclass(frozen=True)
class Upload:
    """One uploaded file, read: `name` is how answers and errors refer to it ("image1", "candidates[3] (a.jpg)")."""

    name: str
    filename: str | None
    data: bytes


@dataclass(frozen=True)
class DecodedPair:
    pictures: tuple[JobPicture, JobPicture]  # what the model sees: uint8 [3, H, W] at its input size, or a JPEG
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


@dataclass(frozen=True)
class ExplainOptions:
    """What /explain's form (and /rank's, for its top candidates) asks of an explanation."""

    method: Method
    overlays: OverlayOptions
    top_matches: int
    include_correspondence: bool


# The form fields that take several files; a field that takes one must not come twice.
REPEATABLE_FIELDS = frozenset({"images", "candidates"})


async def reject_repeated_fields(request: Request) -> None:
    """422 for a form that sends a one-value field more than once (e.g. two `image1` files): FastAPI would use
    one of them and silently drop the others. The form is the one FastAPI has already parsed (Starlette keeps it)."""
    form = await request.form()
    repeated = {key: len(form.getlist(key)) for key in form if key not in REPEATABLE_FIELDS}
    named = [f"{key} ({count} times)" for key, count in sorted(repeated.items()) if count > 1]
    if named:
        raise Problem(422, "repeated-field", f"The form sends {', '.join(named)}; each of these fields takes one "
                      "value. Send each once.")


def upload_label(field: str, index: int, filename: str | None) -> str:
    """How answers and errors name the `index`th file of a field that takes several: its index and file name."""
    shown = "".join(character for character in (filename or "") if character.isprintable())[:120]
    return f"{field}[{index}] ({shown})" if shown else f"{field}[{index}]"


def require_count(field: str, count: int, limit: int, setting: str) -> None:
    """413 for more files in `field` than the service takes, before any is read."""
    if count > limit:
        raise Problem(413, "too-many-images", f"The request sends {count} files in {field}; the limit is {limit} "
                      f"({setting}). Send at most {limit}, in several requests if need be.")


async def read_uploads(named: Sequence[tuple[str, UploadFile]], inference: Inference, kind: str, jobs: int,
                       settings: Settings) -> list[Upload]:
    """The uploads' bytes, once none is over MAX_UPLOAD_BYTES (413) and the `kind` queue has room for `jobs`
    (503): refused before anything is read or decoded."""
    for name, upload in named:
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise Problem(413, "content-too-large",
                          f"{name} is {upload.size:,} bytes; the limit is {settings.max_upload_bytes:,} bytes. "
                          "Send a smaller file.")
    if not inference.has_room(kind, jobs):
        raise queue_full(settings)
    return [Upload(name, upload.filename, await upload.read()) for name, upload in named]


async def admit_and_decode(uploads: Sequence[Upload], model: ModelView, images: ImageWork, settings: Settings,
                           keep_charged: bool = False) -> tuple[list[JobPicture], int]:
    """The uploads admitted, then decoded and preprocessed side by side on the image threads, as the uint8
    pictures the model takes (with DECODE_DEVICE=cuda, the JPEGs its GPU takes stay files: `read_headers`);
    and the pixels still charged to the budget: none, unless `keep_charged` (then the caller gives them back with
    `images.discharge`, e.g. after a second decode at overlay size, which they cover). Refused before any
    decoding: 503 when the images' pixels cannot be admitted within ADMISSION_WAIT_S, 422 for images larger than
    the whole budget, and the contract's image errors (415/422 in errors.py) for what a header says."""
    # Headers only (a few kB each): cheap enough for the event loop, and the image threads may all be busy.
    per_image, jpegs = read_headers(uploads, settings)
    # What is decoded here: every upload when its overlay background will be (`keep_charged`), else all but the
    # JPEGs the GPU decodes.
    pixels = images.pixels_at_once([count for index, count in enumerate(per_image)
                                    if keep_charged or index not in jpegs])
    try:
        await images.admit(pixels, settings.admission_wait_s)
    except OverBudget:
        at_once = min(len(uploads), max(2, images.workers))
        described = (" and ".join(upload.name for upload in uploads) if len(uploads) <= 2 else
                     f"these {len(uploads)} images" if at_once == len(uploads) else
                     f"the {at_once} largest of these {len(uploads)} images, decoded side by side,")
        raise Problem(422, "images-too-large",
                      f"{described} hold {pixels:,} pixels together; this service decodes at most "
                      f"{images.budget.capacity:,} at once (MAX_DECODE_PIXELS_IN_FLIGHT). Send smaller images.")\
            from None
    except BudgetExhausted:
        metrics.REJECTIONS.labels("decode_budget").inc()
        raise service_unavailable("The service is busy decoding other images; retry shortly.",
                                  settings.retry_after_s) from None
    here = [index for index in range(len(uploads)) if index not in jpegs]
    try:
        decoded = await images.run_all([partial(model.picture, uploads[index].data, uploads[index].name,
                                                settings.max_image_pixels) for index in here])
    except BaseException:
        images.discharge(pixels)
        raise
    decoded_here = iter(decoded)
    pictures = [jpegs[index] if index in jpegs else next(decoded_here) for index in range(len(uploads))]
    if not keep_charged:
        images.discharge(pixels)
        return pictures, 0
    return pictures, pixels


def read_headers(uploads: Sequence[Upload], settings: Settings) -> tuple[list[int], dict[int, EncodedJpeg]]:
    """Each upload's pixels from its header (width x height, checked against MAX_IMAGE_PIXELS); and with
    DECODE_DEVICE=cuda the uploads that the model's GPU decodes (`device_jpeg_header`), by index, none otherwise.
    Each header is read once."""
    if settings.decode_device != "cuda":
        return [header_pixels(upload.data, upload.name, settings.max_image_pixels) for upload in uploads], {}
    per_image, jpegs = [], {}
    for index, upload in enumerate(uploads):
        pixels, orientation = device_jpeg_header(upload.data, upload.name, settings.max_image_pixels)
        per_image.append(pixels)
        if orientation is not None:
            jpegs[index] = EncodedJpeg(upload.name, np.frombuffer(upload.data, dtype=np.uint8), orientation)
    return per_image, jpegs


def backgrounds_after(batch_ran: asyncio.Event, uploads: Sequence[Upload], images: ImageWork, pixels: int,
                      settings: Settings, max_side: int) -> asyncio.Future[list[Background]]:
    """The uploads decoded a second time, at overlay size, once `batch_ran` is set; then `pixels` (charged by
    `admit_and_decode`) go back to the budget, as they do if the future is cancelled first."""

    async def decode_after_the_batch() -> list[Background]:
        await batch_ran.wait()
        return await images.run_all(
            [partial(overlay_background, upload.data, upload.name, settings.max_image_pixels, max_side)
             for upload in uploads])

    backgrounds = asyncio.ensure_future(decode_after_the_batch())
    backgrounds.add_done_callback(lambda done: _backgrounds_decoded(done, images, pixels))
    return backgrounds


async def read_pair(image1: UploadFile, image2: UploadFile, model: ModelView, inference: Inference, kind: str,
                    images: ImageWork, settings: Settings, overlay_max_side: int | None = None) -> DecodedPair:
    """Both uploads read and decoded (`read_uploads`, `admit_and_decode`); with `overlay_max_side`, their overlay
    backgrounds are decoded once `run_in_batch` has run the pair (their pixels stay charged until then)."""
    uploads = await read_uploads([("image1", image1), ("image2", image2)], inference, kind, 1, settings)
    (first, second), pixels = await admit_and_decode(uploads, model, images, settings,
                                                     keep_charged=overlay_max_side is not None)
    if overlay_max_side is None:
        return DecodedPair((first, second))
    # A second decode, at overlay size (the model's input must not depend on the endpoint that asked for it),
    # after the pair's batch: decoding beside the batch took the model's cores, so that its OpenMP team waited
    # on its preempted threads, and a 12 Mpx pair's /explain took longer (bench/RESULTS.md, "Real photos").
    batch_ran = asyncio.Event()
    return DecodedPair((first, second), backgrounds_after(batch_ran, uploads, images, pixels, settings,
                                                          overlay_max_side), batch_ran)


def _backgrounds_decoded(backgrounds: asyncio.Future[list[Background]], images: ImageWork, pixels: int) -> None:
    images.discharge(pixels)
    if not backgrounds.cancelled():
        backgrounds.exception()  # retrieved here, for a request that failed before it needed them


async def run_in_batch(request: Request, inference: Inference, kind: str, pair: DecodedPair, arrived: float,
                       settings: Settings) -> Outcome:
    """Queue the pair and wait for its result, until REQUEST_TIMEOUT_S after it `arrived` (time.monotonic)
    or until the client leaves; then start decoding its overlay backgrounds, if it has any (or drop them if it
    failed)."""
    try:
        (outcome,) = await run_jobs(request, inference, kind, [pair.pictures], arrived, settings)
    except BaseException:
        if pair.backgrounds is not None:
            pair.backgrounds.cancel()  # never decoded: their pixels go back to the budget
        raise
    if pair.batch_ran is not None:
        pair.batch_ran.set()
    return outcome


async def run_jobs(request: Request, inference: Inference, kind: str, jobs: Sequence[tuple[JobPicture, ...]],
                   arrived: float, settings: Settings) -> list[Outcome]:
    """Queue one request's jobs (pairs, or single pictures) together and wait for all their results, until
    REQUEST_TIMEOUT_S after it `arrived` (time.monotonic) or until the client leaves; then the jobs not yet
    started leave their queue. A job that failed fails the request (after all have ended)."""
    deadline = arrived + settings.request_timeout_s
    try:
        queued = inference.submit_all(kind, jobs)
    except QueueFull:  # filled while these were being decoded
        raise queue_full(settings) from None
    except WorkerStopped:
        raise _worker_stopped(settings) from None
    futures = [job.future for job in queued]
    all_done = asyncio.ensure_future(asyncio.wait(futures))
    client_gone = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({all_done, client_gone}, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        client_gone.cancel()
        all_done.cancel()
    if all(future.done() for future in futures):
        try:
            return [future.result() for future in futures]
        except QueueFull:  # refused by the model owner of several front processes (app/owner_server.py)
            raise queue_full(settings) from None
        except WorkerStopped:
            raise _worker_stopped(settings) from None
    for job in queued:
        if not job.future.done():
            _give_up(inference, job)
    if client_gone.done() and not client_gone.cancelled():
        metrics.REJECTIONS.labels("disconnected").inc()
        raise Problem(CLIENT_CLOSED_REQUEST, "client-closed-request", "The client closed the connection.")
    raise _timed_out(settings)


def _timed_out(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("timeout").inc()
    return Problem(504, "timeout", f"The request took longer than {settings.request_timeout_s:g} s (the service "
                   "is overloaded); retry later or with smaller images.")


def queue_full(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("queue_full").inc()
    return service_unavailable("The service is at capacity; retry shortly.", settings.retry_after_s)


def _worker_stopped(settings: Settings) -> Problem:
    metrics.REJECTIONS.labels("worker_stopped").inc()
    return service_unavailable("This replica's inference worker has stopped (it is restarting, or shutting down "
                               "after its grace period); retry, another replica will answer.", settings.retry_after_s)


def _give_up(inference: Inference, job: Job) -> None:
    # Not started yet: the pair leaves its queue. Already running: its result will simply be ignored.
    if not inference.withdraw(job):
        job.future.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timings_ms(outcomes: Outcome | Sequence[Outcome], arrived: float) -> dict[str, float]:
    """A request's timings: of several jobs, the longest queue wait and the model time of every batch they ran in."""
    outcomes = [outcomes] if isinstance(outcomes, Outcome) else outcomes
    batches = {outcome.batch_started: outcome.inference_s for outcome in outcomes}
    return {
        "queue_wait": round(max(outcome.queue_wait_s for outcome in outcomes) * 1000, 3),
        "inference": round(sum(batches.values()) * 1000, 3),
        "total": round((time.monotonic() - arrived) * 1000, 3),
    }


async def explain_in_time(images: ImageWork, backgrounds: asyncio.Future[list[Background]], result: PairExplanation,
                          options: ExplainOptions, arrived: float, settings: Settings,
                          pair: tuple[int, int] = (0, 1)) -> ExplainedPair:
    """One pair's explanations rendered on the image threads, the four overlays side by side, once the
    `backgrounds` are decoded (the pair's two are those at the indices `pair`), and its contributions described;
    504 if they are not done REQUEST_TIMEOUT_S after the request `arrived` (the rendering threads finish their
    overlays, and the result is dropped)."""
    remaining = max(0.0, arrived + settings.request_timeout_s - time.monotonic())
    try:
        async with asyncio.timeout(remaining):
            decoded = await asyncio.shield(backgrounds)
            pair_backgrounds = [decoded[pair[0]], decoded[pair[1]]]
            explanations = await render_explanations(images, pair_backgrounds, result, options.overlays)
    except TimeoutError:
        raise _timed_out(settings) from None
    contributions = None if result.contributions is None else describe_contributions(
        [background.original_size for background in pair_backgrounds], result.contributions, result.similar,
        options.top_matches, options.include_correspondence)
    return ExplainedPair(method=options.method, explanations=explanations, contributions=contributions)


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


def describe_contributions(original_sizes: Sequence[tuple[int, int]], found: PairContributions, similar: bool,
                           top_matches: int, include_correspondence: bool) -> Contributions:
    """One pair's contributions, its top matches boxed in the original (upright) images' pixels, whose
    (width, height) are `original_sizes`, and named in words, with what they carry of the evidence for similarity
    and how to read them (`Contributions.evidence`)."""
    grid = found.grid
    size1, size2 = original_sizes
    matches = found.top_matches(top_matches)
    strongest = found.top_matches(1)[0].share
    even_share = 1 / (grid[0] * grid[1]) ** 2
    evidence: Evidence = ("not_similar" if not similar
                          else "concentrated" if strongest >= SPREAD_FACTOR * even_share else "spread")
    return Contributions(
        raw_logit=found.raw_logit,
        offset=found.offset,
        threshold_raw_logit=found.threshold_raw_logit,
        grid=grid,
        image1=ImageContributions(**found.totals(1)._asdict()),
        image2=ImageContributions(**found.totals(2)._asdict()),
        positive_evidence=found.positive_total,
        matches_share=sum(match.share for match in matches),
        evidence=evidence,
        matches=[
            Match(image1_cell=match.cell1, image2_cell=match.cell2, image1_region=region_name(match.cell1, grid),
                  image2_region=region_name(match.cell2, grid), image1_box=cell_box(*match.cell1, grid, size1),
                  image2_box=cell_box(*match.cell2, grid, size2), contribution=match.contribution,
                  share=match.share)
            for match in matches
        ],
        correspondence=found.correspondence.tolist() if include_correspondence else None,
    )


def region_name(cell: tuple[int, int], grid: tuple[int, int]) -> str:
    """Where a cell lies, in words: the third of the image its centre falls in, down and across ("upper left",
    "centre", "lower centre", ...)."""
    row, column = (min(int(3 * (index + 0.5) / size), 2) for index, size in zip(cell, grid, strict=True))
    if (row, column) == (1, 1):
        return "centre"
    return f"{('upper', 'middle', 'lower')[row]} {('left', 'centre', 'right')[column]}"


def _overlay(background: np.ndarray, values: np.ndarray, options: OverlayOptions) -> Overlay:
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


def require_method(model: ModelView, method: Method) -> None:
    """Refuse, before anything is decoded, a method the served model cannot explain with."""
    if method not in model.methods:
        raise Problem(422, "method-unavailable", f"method={method} is not available: {model.contributions_refusal}.")


def require_ready(service: Service) -> tuple[ModelView, Inference, ImageWork]:
    if service.model is None or service.inference is None or service.images is None:
        raise service_unavailable("The model is still loading; retry shortly.", service.settings.retry_after_s)
    if service.inference.stopped:
        raise _worker_stopped(service.settings)
    return service.model, service.inference, service.images
