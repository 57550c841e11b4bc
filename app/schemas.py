"""Request options and response bodies of the HTTP API, with the examples shown in /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contract.explanation import Method

Target = Literal["similar", "dissimilar"]
Evidence = Literal["concentrated", "spread", "not_similar"]
MAX_TOP_MATCHES = 50
# A pair of cells "stands out" (`evidence: concentrated`) when it carries at least this many times its even share
# of the evidence for similarity. On the default model two similar flowers' strongest pair carries about 12 times
# its share (0.5 % of the evidence, of 2,401 pairs of cells).
SPREAD_FACTOR = 2.0


class ModelRef(BaseModel):
    name: str = Field(examples=["flowers"])
    version: str = Field(examples=["1.0.0"])


class Timings(BaseModel):
    queue_wait: float = Field(description="ms waiting for a batch", examples=[1.2])
    inference: float = Field(description="ms of model work for the batch this pair ran in", examples=[10.3])
    total: float = Field(description="ms from the request's arrival to its answer", examples=[25.0])


class SimilarityResponse(BaseModel):
    score: float = Field(ge=0, le=1, description="higher is more similar", examples=[0.93])
    similar: bool = Field(description="score >= threshold", examples=[True])
    threshold: float = Field(examples=[0.5])
    model: ModelRef
    timings_ms: Timings


class Overlay(BaseModel):
    media_type: str = Field(examples=["image/jpeg"])
    overlay: str = Field(description="the heatmap drawn over the original image, base64",
                         examples=["/9j/4AAQSkZJRg..."])
    width: int = Field(examples=[1024])
    height: int = Field(examples=[768])
    no_positive_evidence: bool = Field(
        description="true when no region supports the target: the heatmap is all zeros", examples=[False]
    )
    heatmap: list[list[float]] | None = Field(
        default=None,
        description="with include_heatmaps: the raw map in [0, 1] at the model's input size (rows of columns), "
        "to be stretched over the whole original image",
    )


class Explanation(BaseModel):
    target: Target = Field(description="the class this map explains")
    image1: Overlay
    image2: Overlay


class Explanations(BaseModel):
    factual: Explanation = Field(description="regions that led to the decision")
    counterfactual: Explanation = Field(description="regions that argue for the opposite decision")


class ImageContributions(BaseModel):
    positive: float = Field(description="sum of the image's cells pushing the raw logit above the threshold's, "
                            "in logit units", examples=[1.9])
    negative: float = Field(description="sum of those pushing it below (<= 0); positive + negative == "
                            "raw_logit - threshold_raw_logit", examples=[-0.4])


class Match(BaseModel):
    image1_cell: tuple[int, int] = Field(description="[row, col] in the feature-map grid", examples=[[1, 2]])
    image2_cell: tuple[int, int] = Field(examples=[[2, 2]])
    image1_region: str = Field(description="where the cell lies in image 1, in words: upper, middle or lower, then "
                               "left, centre or right (the middle one is \"centre\")", examples=["upper right"])
    image2_region: str = Field(examples=["centre"])
    image1_box: tuple[int, int, int, int] = Field(
        description="the cell's pixels in the original (upright) image 1: [x0, y0, x1, y1], x1 and y1 exclusive",
        examples=[[240, 120, 360, 240]],
    )
    image2_box: tuple[int, int, int, int] = Field(examples=[[160, 200, 240, 300]])
    contribution: float = Field(description="M[i, j]: what the two cells add to the raw logit together",
                                examples=[0.21])
    share: float = Field(description="its share of the evidence for similarity: contribution / positive_evidence",
                         examples=[0.08])


class Contributions(BaseModel):
    raw_logit: float = Field(description="the score's raw logit, sum(correspondence) + offset; the score is its "
                             "squash and sigmoid", examples=[1.5])
    offset: float = Field(description="the part of the raw logit no cell accounts for (the score's bias)",
                          examples=[-0.66])
    threshold_raw_logit: float = Field(description="the raw logit at which the score equals the threshold",
                                       examples=[-0.26])
    grid: tuple[int, int] = Field(description="[h, w]: the feature-map grid stretched over each whole image",
                                  examples=[[4, 4]])
    image1: ImageContributions
    image2: ImageContributions
    positive_evidence: float = Field(description="the evidence for similarity: the sum of the positive entries "
                                     "of the correspondence matrix M, in logit units", examples=[9.85])
    matches_share: float = Field(description="the share of positive_evidence the listed matches carry together",
                                 examples=[0.31])
    evidence: Evidence = Field(description=(
        "how to read the matches: `concentrated` when the strongest pair of cells carries at least "
        f"{SPREAD_FACTOR:g} times its even share of the evidence for similarity (1 / (h*w)^2, what each pair would "
        "carry were it spread evenly): the matches say which regions match; `spread` when none does (the evidence "
        "is spread thin over both images, and no pair of regions stands out); `not_similar` when the pair was "
        "decided not similar (the matches are then not what decided it: the factual maps show what argued "
        "against similarity)"), examples=["concentrated"])
    matches: list[Match] = Field(description="the top_matches pairs of cells with the largest contribution, "
                                 "largest first")
    correspondence: list[list[float]] | None = Field(
        default=None,
        description="with include_correspondence: M, h*w rows (image 1's cells, row-major) of h*w columns (image "
        "2's cells): what each pair of cells adds to the raw logit",
    )


class ExplainedPair(BaseModel):
    method: Method = Field(description="how the maps were made", examples=["gradcam"])
    explanations: Explanations
    contributions: Contributions | None = Field(
        default=None, description="with method=contributions: the raw logit's exact decomposition over pairs of "
        "cells, and its top matches"
    )


class ExplainResponse(SimilarityResponse, ExplainedPair):
    pass


class EmbeddingModelRef(ModelRef):
    sha256: str = Field(description="sha256 of the model's file: embeddings made by another file are not "
                        "comparable with these (re-embed stored ones when it changes)",
                        examples=["3f1c9a0e5b7d2c4a6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d"])


class ImageEmbedding(BaseModel):
    index: int = Field(ge=0, description="the image's position in the upload order", examples=[0])
    filename: str | None = Field(description="the upload's file name, as sent", examples=["tulip.jpg"])
    embedding: list[float] = Field(description="the embedding_dim floats the model's score is computed from "
                                   "(GET /model's embedding_scoring says how)", examples=[[0.41, -1.07, 0.88]])


class EmbedResponse(BaseModel):
    model: EmbeddingModelRef
    embedding_dim: int = Field(examples=[128])
    embeddings: list[ImageEmbedding] = Field(description="one per uploaded image, in the upload order")
    timings_ms: Timings


class RankedCandidate(BaseModel):
    index: int = Field(ge=0, description="the candidate's position in the upload order", examples=[3])
    filename: str | None = Field(description="the upload's file name, as sent", examples=["rose-2.jpg"])
    score: float = Field(ge=0, le=1, description="its similarity with the query", examples=[0.91])
    similar: bool = Field(description="score >= threshold", examples=[True])
    explanation: ExplainedPair | None = Field(
        default=None, description="for the explain_top best candidates: what /explain answers for the query "
        "(image1) and this candidate (image2)")


class RankResponse(BaseModel):
    query_filename: str | None = Field(description="the query upload's file name", examples=["new-photo.jpg"])
    threshold: float = Field(examples=[0.5])
    model: ModelRef
    candidates: list[RankedCandidate] = Field(description="every candidate, most similar to the query first")
    timings_ms: Timings


class EmbeddingScoring(BaseModel):
    """The model's score as a function of two embeddings e1, e2 (from /embed), what /similarity computes:
    score = sigmoid(squash(pair_weight * dot(e1, e2) + offset)), squash(r) = r / sqrt(1 + (r / max_logit)^2)."""

    pair_weight: float = Field(description="weight of the embeddings' dot product in the raw logit",
                               examples=[0.0567])
    offset: float = Field(description="the raw logit's offset", examples=[-1.27])
    max_logit: float = Field(description="the squash's bound: the squashed logit stays within +-max_logit",
                             examples=[15.0])
    threshold: float = Field(description="similar when score >= threshold", examples=[0.33])
    threshold_dot_product: float | None = Field(
        description="the dot product at which the score equals the threshold: with pair_weight > 0, similar "
        "exactly when dot(e1, e2) >= this (null when the threshold cannot be reached)", examples=[10.07])


class ModelInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "flowers", "version": "1.0.0", "format_version": 2, "explain_methods": ["gradcam", "contributions"],
        "backbone": "resnet18", "threshold": 0.5,
        "input_size": [224, 224], "embedding_dim": 128, "metrics": {"test": {"accuracy": 0.9}},
        "created_at": "2026-11-29T03:00:00+00:00",
        "sha256": "3f1c9a0e5b7d2c4a6e8f0a1b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d",
        "embedding_scoring": {"pair_weight": 0.0567, "offset": -1.27, "max_logit": 15.0, "threshold": 0.5,
                              "threshold_dot_product": 22.4},
    }]})

    name: str
    version: str
    format_version: int = Field(description="the model's contract version: 2 offers method=contributions")
    explain_methods: list[Method] = Field(description="the values of /explain's method this model serves")
    backbone: str
    threshold: float
    # A list, not tuple[int, int]: JSON Schema's tuple form (prefixItems) trips schemathesis' response checks.
    input_size: list[int] = Field(min_length=2, max_length=2, description="[height, width] the model takes")
    embedding_dim: int
    metrics: dict[str, Any]
    created_at: str
    sha256: str = Field(description="sha256 of model.pt, as /embed answers it")
    embedding_scoring: EmbeddingScoring | None = Field(
        description="how to score two /embed embeddings exactly as /similarity does (docs/api.md, \"Embeddings\"); "
        "null for a format-version-1 model, whose contract publishes no pair weight or offset: its embeddings "
        "are then only comparable through /similarity and /rank")
    report: str | None = Field(default=None, description="the path of the model's report (a page with its "
                               "figures), when its folder has one", examples=["/model/report"])


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class ProblemDetails(BaseModel):
    """RFC 9457 problem details: the body of every error."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "type": "urn:siamcam:problem:not-an-image", "title": "Unsupported Media Type", "status": 415,
        "detail": "image2 is not an image Pillow can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file.",
    }]})

    type: str
    title: str
    status: int
    detail: str


RETRY_AFTER_HEADER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}}
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
# OpenAPI's `encoding`: what each upload of the multipart form holds (FastAPI only says "a file").


def image_encoding(*fields: str) -> dict[str, Any]:
    """The `openapi_extra` saying that these form fields hold images."""
    return {"requestBody": {"content": {"multipart/form-data": {"encoding": {
        field: {"contentType": ", ".join(IMAGE_MEDIA_TYPES)} for field in fields
    }}}}}


IMAGE_PAIR_ENCODING = image_encoding("image1", "image2")


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    # The schema inline, not as `model`: FastAPI would document it under application/json, which no error is.
    documented: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": ProblemDetails.model_json_schema()}},
    }
    return {**documented, "headers": headers} if headers else documented


_UNEXPECTED = _problem("an unexpected failure, logged with the request id (X-Request-ID): retry, quote the id")
INFERENCE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("the body is not valid multipart/form-data"),
    413: _problem("an upload is over MAX_UPLOAD_BYTES, or (/embed, /rank) more files than MAX_EMBED_IMAGES or "
                  "MAX_RANK_CANDIDATES"),
    415: _problem("a file is not an image"),
    422: _problem("a corrupt or truncated image, an image over MAX_IMAGE_PIXELS, images over "
                  "MAX_DECODE_PIXELS_IN_FLIGHT together, a missing field, a field sent twice or a bad option (or "
                  "method=contributions on a model exported before format version 2)"),
    503: _problem("queue full, too many pixels being decoded, model not ready, replica draining or its inference "
                  "worker stopped: retry after "
                  "the Retry-After header", RETRY_AFTER_HEADER),
    504: _problem("the request was not answered within REQUEST_TIMEOUT_S"),
    500: _UNEXPECTED,
}
MODEL_REPORT_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the report, one self-contained HTML page"},
    404: _problem("the served model's folder holds no report.html: the detail says how to write one"),
    500: _UNEXPECTED,
}
MODEL_INFO_ERRORS: dict[int | str, dict[str, Any]] = {
    503: _problem("the model is still loading, or the inference worker has stopped", RETRY_AFTER_HEADER),
    500: _UNEXPECTED,
}
