"""One image against many: /embed (each image's embedding) and /rank (candidates ordered by their similarity with a
query, the best ones explained), built from inference.py's steps.

Every image is decoded and run through the backbone once, as a job of the batcher's embed queue, where it batches
with other requests' images; the query's embedding is then scored against each candidate's by the model's own
`similarity`. Only the `explain_top` best pairs go through the explain path again (Grad-CAM and the exact
contributions need the feature maps and their gradients, which embeddings do not keep), with their overlays drawn on
the query and on those candidates, decoded at overlay size after their batch as /explain does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi import Request, UploadFile

from app.inference import (
    ExplainOptions, Upload, admit_and_decode, backgrounds_after, explain_in_time, queue_full, read_uploads,
    require_count, require_method, require_ready, run_jobs, timings_ms, upload_label,
)
from app.jobs import EMBED_QUEUE, EXPLAIN_QUEUES, JobPicture, Outcome
from app.schemas import (
    EmbeddingModelRef, EmbedResponse, ExplainedPair, ImageEmbedding, ModelRef, RankedCandidate, RankResponse,
)
from app.service import Service
from app.settings import Settings

# The most candidates /rank explains: each is an /explain's model work and four overlays.
MAX_EXPLAIN_TOP = 5


async def embed(request: Request, files: Sequence[UploadFile], service: Service, arrived: float) -> EmbedResponse:
    """Each uploaded image's embedding, in the upload order."""
    model, inference, images = require_ready(service)
    settings = service.settings
    require_count("images", len(files), settings.max_embed_images, "MAX_EMBED_IMAGES")
    named = [(upload_label("images", index, file.filename), file) for index, file in enumerate(files)]
    uploads = await read_uploads(named, inference, EMBED_QUEUE, len(named), settings)
    pictures, _ = await admit_and_decode(uploads, model, images, settings)
    outcomes = await run_jobs(request, inference, EMBED_QUEUE, [(picture,) for picture in pictures], arrived, settings)
    manifest = model.manifest
    return EmbedResponse(
        model=EmbeddingModelRef(name=manifest.name, version=manifest.version, sha256=manifest.sha256),
        embedding_dim=manifest.embedding_dim,
        embeddings=[ImageEmbedding(index=index, filename=upload.filename, embedding=outcome.value.tolist())
                    for index, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True))],
        timings_ms=timings_ms(outcomes, arrived),
    )


async def rank(request: Request, query: UploadFile, candidates: Sequence[UploadFile], explain_top: int,
               options: ExplainOptions, service: Service, arrived: float) -> RankResponse:
    """Every candidate with its score against the query, most similar first; the `explain_top` first ones with
    the explanations /explain gives for (query, candidate)."""
    model, inference, images = require_ready(service)
    settings = service.settings
    require_count("candidates", len(candidates), settings.max_rank_candidates, "MAX_RANK_CANDIDATES")
    explained_count = min(explain_top, len(candidates))
    explain_queue = EXPLAIN_QUEUES[options.method]
    if explained_count:
        require_method(model, options.method)
        if not inference.has_room(explain_queue, explained_count):
            raise queue_full(settings)
    named = [("query", query), *((upload_label("candidates", index, file.filename), file)
                                 for index, file in enumerate(candidates))]
    uploads = await read_uploads(named, inference, EMBED_QUEUE, len(named), settings)
    # With explanations, the pixels stay charged until the overlay backgrounds are decoded: those are some of
    # the same images, decoded on the same threads, so the charge covers them.
    pictures, pixels = await admit_and_decode(uploads, model, images, settings, keep_charged=explained_count > 0)
    try:
        embedded = await run_jobs(request, inference, EMBED_QUEUE, [(picture,) for picture in pictures], arrived,
                                  settings)
        embeddings = [outcome.value for outcome in embedded]
        scores = await inference.score_embeddings(embeddings[0], embeddings[1:])
    except BaseException:
        images.discharge(pixels)
        raise
    order = sorted(range(len(candidates)), key=lambda index: (-scores[index], index))
    explanations, explain_outcomes = await _explain_best(
        request, order[:explained_count], uploads, pictures, pixels, options, service, arrived)
    return RankResponse(
        query_filename=query.filename,
        threshold=model.threshold,
        model=ModelRef(name=model.manifest.name, version=model.manifest.version),
        candidates=[RankedCandidate(index=index, filename=candidates[index].filename, score=scores[index],
                                    similar=scores[index] >= model.threshold, explanation=explanations.get(index))
                    for index in order],
        timings_ms=timings_ms([*embedded, *explain_outcomes], arrived),
    )


async def _explain_best(request: Request, best: list[int], uploads: list[Upload], pictures: list[JobPicture],
                        pixels: int, options: ExplainOptions, service: Service, arrived: float
                        ) -> tuple[dict[int, ExplainedPair], list[Outcome]]:
    """The explanations of (query, candidate) for the `best` candidates' indices, by candidate index; `pixels`
    (still charged) go back once their backgrounds are decoded, or at once if there are none."""
    if not best:
        return {}, []
    _, inference, images = require_ready(service)
    settings: Settings = service.settings
    batch_ran = asyncio.Event()
    # The query's background first, then each best candidate's (uploads[0] is the query's).
    backgrounds = backgrounds_after(batch_ran, [uploads[0], *(uploads[1 + index] for index in best)], images,
                                    pixels, settings, options.overlays.max_side)
    try:
        outcomes = await run_jobs(request, inference, EXPLAIN_QUEUES[options.method],
                                  [(pictures[0], pictures[1 + index]) for index in best], arrived, settings)
    except BaseException:
        backgrounds.cancel()  # never decoded: their pixels go back to the budget
        raise
    batch_ran.set()
    explained = await asyncio.gather(*(
        explain_in_time(images, backgrounds, outcome.value, options, arrived, settings, pair=(0, 1 + position))
        for position, outcome in enumerate(outcomes)))
    return dict(zip(best, explained, strict=True)), outcomes
