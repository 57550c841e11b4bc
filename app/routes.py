"""The HTTP endpoints. Each one is a few lines: the work lives in inference.py (and ranking.py), the shapes in
schemas.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics, ranking
from app.errors import Problem
from app.headers import REPORT_CONTENT_SECURITY_POLICY
from app.inference import (
    ExplainOptions, OverlayOptions, explain_in_time, read_pair, reject_repeated_fields, require_method,
    require_ready, run_in_batch, timings_ms,
)
from app.jobs import EXPLAIN_QUEUES, SIMILARITY_QUEUE
from app.overlays import DEFAULT_FORMAT, DEFAULT_QUALITY, ColormapName, OverlayFormat
from app.schemas import (
    IMAGE_PAIR_ENCODING, INFERENCE_ERRORS, MAX_TOP_MATCHES, MODEL_INFO_ERRORS, MODEL_REPORT_ERRORS,
    RETRY_AFTER_HEADER, EmbeddingScoring, EmbedResponse, ExplainResponse, ModelInfo, ModelRef, RankResponse,
    SimilarityResponse, Status, image_encoding,
)
from app.service import Service
from app.settings import Settings
from contract.explanation import Method
from contract.manifest import REPORT_FILE

STATIC_DIR = Path(__file__).parent / "static"
MODEL_REPORT_PATH = "/model/report"
router = APIRouter()


async def get_service(request: Request) -> Service:
    # async: FastAPI would run a plain function on its thread pool, a thread hop for every request
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
FirstImage = Annotated[UploadFile, File(description="the first image: JPEG, PNG, WebP, GIF, BMP or TIFF")]
SecondImage = Annotated[UploadFile, File(description="the second image, compared with the first")]
ManyImages = Annotated[list[UploadFile], File(description="the images to embed (up to MAX_EMBED_IMAGES), each a "
                                              "JPEG, PNG, WebP, GIF, BMP or TIFF file")]
# Every form field but a list of files takes one value: a second one is refused, never silently dropped.
ONE_VALUE_PER_FIELD = [Depends(reject_repeated_fields)]


@router.post("/similarity", response_model=SimilarityResponse, responses=INFERENCE_ERRORS, tags=["inference"],
             openapi_extra=IMAGE_PAIR_ENCODING, dependencies=ONE_VALUE_PER_FIELD)
async def similarity(
    request: Request, image1: FirstImage, image2: SecondImage, service: ServiceDep
) -> SimilarityResponse:
    """How similar two images are: a score in [0, 1] and the decision against the model's threshold."""
    arrived = time.monotonic()
    model, inference, images = require_ready(service)
    pair = await read_pair(image1, image2, model, inference, SIMILARITY_QUEUE, images, service.settings)
    outcome = await run_in_batch(request, inference, SIMILARITY_QUEUE, pair, arrived, service.settings)
    score = float(outcome.value)
    return SimilarityResponse(score=score, similar=score >= model.threshold, threshold=model.threshold,
                              model=_model_ref(service), timings_ms=timings_ms(outcome, arrived))


async def explain_options(
    service: ServiceDep,
    overlay_format: Annotated[OverlayFormat, Form(alias="format",
                                                  description="overlay image format")] = DEFAULT_FORMAT,
    opacity: Annotated[float, Form(ge=0, le=1, description="heatmap opacity over the image")] = 0.5,
    colormap: Annotated[ColormapName, Form(description="matplotlib colormap of the heatmap")] = "jet",
    max_side: Annotated[int, Form(ge=16, description="longest side of the overlays, in pixels; capped by "
                                  "MAX_OVERLAY_SIDE; never larger than the original")] = 1024,
    include_heatmaps: Annotated[bool, Form(description="also return the raw heatmaps")] = False,
    quality: Annotated[int, Form(ge=1, le=100,
                                 description="JPEG and WebP quality (PNG is lossless)")] = DEFAULT_QUALITY,
    method: Annotated[Method, Form(description="gradcam (the paper's) or contributions (exact, format "
                                          "version 2 models)")] = "gradcam",
    top_matches: Annotated[int, Form(ge=0, le=MAX_TOP_MATCHES, description="with contributions: how many "
                                     "matching pairs of cells to return")] = 5,
    include_correspondence: Annotated[bool, Form(description="with contributions: also return the matrix of "
                                                 "every pair of cells' contribution")] = False,
) -> ExplainOptions:
    """The form options of an explanation, shared by /explain and /rank."""
    overlays = OverlayOptions(overlay_format, opacity, colormap, min(max_side, service.settings.max_overlay_side),
                              include_heatmaps, quality)
    return ExplainOptions(method, overlays, top_matches, include_correspondence)


ExplainOptionsDep = Annotated[ExplainOptions, Depends(explain_options)]


@router.post("/explain", response_model=ExplainResponse, responses=INFERENCE_ERRORS, tags=["inference"],
             openapi_extra=IMAGE_PAIR_ENCODING, dependencies=ONE_VALUE_PER_FIELD)
async def explain(
    request: Request, image1: FirstImage, image2: SecondImage, service: ServiceDep, options: ExplainOptionsDep,
) -> ExplainResponse:
    """The similarity, and for each image the regions that led to the decision (factual) and those that argue
    for the opposite one (counterfactual), as heatmaps drawn over the original images: Grad-CAM, or the raw
    logit's exact contributions with the regions of the two images that match."""
    arrived = time.monotonic()
    settings: Settings = service.settings
    model, inference, images = require_ready(service)
    require_method(model, options.method)
    kind = EXPLAIN_QUEUES[options.method]
    pair = await read_pair(image1, image2, model, inference, kind, images, settings,
                           overlay_max_side=options.overlays.max_side)
    outcome = await run_in_batch(request, inference, kind, pair, arrived, settings)
    result = outcome.value
    assert pair.backgrounds is not None
    explained = await explain_in_time(images, pair.backgrounds, result, options, arrived, settings)
    return ExplainResponse(score=result.score, similar=result.similar, threshold=model.threshold,
                           model=_model_ref(service), timings_ms=timings_ms(outcome, arrived), **dict(explained))


@router.post("/embed", response_model=EmbedResponse, responses=INFERENCE_ERRORS, tags=["inference"],
             openapi_extra=image_encoding("images"), dependencies=ONE_VALUE_PER_FIELD)
async def embed(request: Request, images: ManyImages, service: ServiceDep) -> EmbedResponse:
    """Each image's embedding (up to MAX_EMBED_IMAGES images), with the model's name, version and file's sha256:
    GET /model's `embedding_scoring` scores two embeddings exactly as /similarity scores their images."""
    return await ranking.embed(request, images, service, time.monotonic())


@router.post("/rank", response_model=RankResponse, responses=INFERENCE_ERRORS, tags=["inference"],
             openapi_extra=image_encoding("query", "candidates"), dependencies=ONE_VALUE_PER_FIELD)
async def rank(
    request: Request,
    query: Annotated[UploadFile, File(description="the image every candidate is compared with")],
    candidates: Annotated[list[UploadFile], File(description="the images to rank (up to MAX_RANK_CANDIDATES)")],
    service: ServiceDep,
    options: ExplainOptionsDep,
    explain_top: Annotated[int, Form(ge=0, le=ranking.MAX_EXPLAIN_TOP, description="how many of the best "
                                     "candidates to explain, as /explain would (its options apply)")] = 1,
) -> RankResponse:
    """Every candidate's similarity with the query, most similar first, each with its index in the upload order
    and file name; the query is decoded and embedded once. The best `explain_top` come with the explanations
    /explain gives for the pair (query, candidate)."""
    return await ranking.rank(request, query, candidates, explain_top, options, service, time.monotonic())


@router.get("/model", response_model=ModelInfo, responses=MODEL_INFO_ERRORS, tags=["operations"])
async def model_info(service: ServiceDep) -> ModelInfo:
    """The served model, from its manifest."""
    model, _, _ = require_ready(service)
    report = MODEL_REPORT_PATH if (service.settings.model_dir / REPORT_FILE).is_file() else None
    constants = model.embedding_scoring
    scoring = None if constants is None else EmbeddingScoring.model_validate(constants, from_attributes=True)
    return ModelInfo.model_validate({**model.manifest.model_dump(), "explain_methods": list(model.methods),
                                     "embedding_scoring": scoring, "report": report})


@router.get(MODEL_REPORT_PATH, response_class=HTMLResponse, responses=MODEL_REPORT_ERRORS, tags=["operations"])
async def model_report(service: ServiceDep) -> FileResponse:
    """The served model's report, a page to open in a browser: ROC curve with the threshold, score histograms,
    reliability diagram, confusion matrix, accuracy per pair of classes, learning curves, faithfulness curves
    and the most confident right and wrong test pairs with their factual maps (`report.html` in the model's
    folder, written by `python -m training train`, or `evaluate --report`)."""
    path = service.settings.model_dir / REPORT_FILE
    if not path.is_file():
        raise Problem(404, "no-model-report",
                      f"The served model ({service.settings.model_name}) has no report: its folder holds no "
                      f"{REPORT_FILE}. Write one with `python -m training evaluate --model <its folder> --data "
                      "<its dataset> --split test --report` (every `python -m training train` writes one).")
    return FileResponse(path, media_type="text/html",
                        headers={"Content-Security-Policy": REPORT_CONTENT_SECURITY_POLICY})


@router.get("/healthz", response_model=Status, tags=["operations"])
async def healthz() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, tags=["operations"], responses={
    503: {"model": Status, "description": "loading, draining or failed", "headers": RETRY_AFTER_HEADER}})
async def readyz(service: ServiceDep) -> Response:
    """Readiness: 200 once the model is loaded and warmed up; 503 before that, while draining, and once the
    inference worker has stopped (the process then exits, to be restarted)."""
    readiness = service.readiness
    if readiness == "ready":
        return JSONResponse({"status": readiness})
    retry_after = {"Retry-After": str(service.settings.retry_after_s)}
    return JSONResponse({"status": readiness}, status_code=503, headers=retry_after)


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def prometheus_metrics() -> Response:
    """Prometheus metrics (text format)."""
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def web_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


def _model_ref(service: Service) -> ModelRef:
    assert service.model is not None
    return ModelRef(name=service.model.manifest.name, version=service.model.manifest.version)
