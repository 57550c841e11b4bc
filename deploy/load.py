"""Bounded HTTP load for the proof: image pairs, concurrent clients, and what each request got back."""

from __future__ import annotations

import asyncio
import io
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from deploy.nginx_config import REPO_ROOT

# The shared datasets sit next to the repository (../shared/datasets); CI machines may not have them.
FLOWERS_DIR = REPO_ROOT.parent / "shared" / "datasets" / "flowers"
# Pairs in a batch never influence each other (model_store/README.md), so a pair's score through the balancer
# differs from its direct, unbatched score by float rounding only; more than this is a wrong answer.
SCORE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Upload:
    filename: str
    content: bytes
    media_type: str


@dataclass(frozen=True)
class Pair:
    image1: Upload
    image2: Upload

    def files(self) -> dict[str, tuple[str, bytes, str]]:
        return {name: (upload.filename, upload.content, upload.media_type)
                for name, upload in (("image1", self.image1), ("image2", self.image2))}


def _encode(image: Image.Image, filename: str) -> Upload:
    buffer = io.BytesIO()
    is_png = filename.endswith(".png")
    image.convert("RGB").save(buffer, format="PNG" if is_png else "JPEG", quality=90)
    return Upload(filename, buffer.getvalue(), "image/png" if is_png else "image/jpeg")


def _synthetic_image(rng: random.Random) -> Image.Image:
    """A picture with structure (shapes on a background), at a random size and aspect ratio."""
    size = (rng.randint(160, 320), rng.randint(160, 320))
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randint(0, size[0] - 20), rng.randint(0, size[1] - 20)
        box = (x0, y0, x0 + rng.randint(10, size[0] // 2), y0 + rng.randint(10, size[1] // 2))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def make_pairs(count: int, seed: int = 0) -> list[Pair]:
    """`count` pairs, image1 as JPEG and image2 as PNG: flowers photos when ../shared/datasets is present,
    otherwise synthetic pictures drawn with Pillow (so that CI needs no dataset)."""
    rng = random.Random(seed)
    photos = sorted(FLOWERS_DIR.glob("*/*.jpg")) if FLOWERS_DIR.is_dir() else []
    pairs = []
    for index in range(count):
        if photos:
            first, second = (_open(path) for path in rng.sample(photos, 2))
        else:
            first, second = _synthetic_image(rng), _synthetic_image(rng)
        pairs.append(Pair(_encode(first, f"pair{index}-1.jpg"), _encode(second, f"pair{index}-2.png")))
    return pairs


def reference_scores(base_url: str, pairs: list[Pair], headers: dict[str, str] | None = None) -> list[float]:
    """Each pair's score from one direct, unbatched call: what every answer through the balancer must match."""
    with httpx.Client(base_url=base_url, headers=headers, trust_env=False, timeout=60.0) as client:
        scores = []
        for pair in pairs:
            response = client.post("/similarity", files=pair.files())
            response.raise_for_status()
            scores.append(response.json()["score"])
    return scores


@dataclass(frozen=True)
class Job:
    endpoint: str  # "/similarity" or "/explain"
    pair_index: int


@dataclass(frozen=True)
class Outcome:
    job: Job
    status: int | None  # None: no HTTP answer at all (connection error, client timeout)
    latency_s: float
    problem: str | None  # why the answer is wrong; None for a correct 200


def check_answer(endpoint: str, response: httpx.Response, expected_score: float) -> str | None:
    """None when the response is a correct 200 for a pair whose direct score is expected_score."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = response.json()
    if abs(body["score"] - expected_score) > SCORE_TOLERANCE:
        return f"score {body['score']:.6f}, direct call gave {expected_score:.6f}"
    if endpoint == "/explain":
        explanations = body.get("explanations", {})
        targets = {explanations.get(kind, {}).get("target") for kind in ("factual", "counterfactual")}
        if targets != {"similar", "dissimilar"}:
            return f"explanations name targets {sorted(map(str, targets))}, expected similar and dissimilar"
        if not all(explanations[kind][image]["overlay"]
                   for kind in ("factual", "counterfactual") for image in ("image1", "image2")):
            return "an explanation overlay is empty"
    return None


def make_jobs(similarity: int, explain: int, pair_count: int, seed: int = 0) -> list[Job]:
    """The requests to send, both kinds mixed in a reproducible order, pairs cycled."""
    jobs = [Job("/similarity", i % pair_count) for i in range(similarity)]
    jobs += [Job("/explain", i % pair_count) for i in range(explain)]
    random.Random(seed).shuffle(jobs)
    return jobs


async def run_load(
    base_url: str,
    jobs: list[Job],
    pairs: list[Pair],
    expected: list[float],
    concurrency: int,
    on_progress: Callable[[int], Awaitable[None]],
    headers: dict[str, str] | None = None,
) -> list[Outcome]:
    """Send every job through base_url with `headers` (the API key), `concurrency` at a time; await
    on_progress(done) after each answer."""
    outcomes: list[Outcome] = []
    next_job = iter(jobs)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, trust_env=False, timeout=120.0,
                                 limits=limits) as client:

        async def client_loop() -> None:
            for job in next_job:  # the iterator is shared: each job is taken by exactly one client
                started = time.perf_counter()
                try:
                    response = await client.post(job.endpoint, files=pairs[job.pair_index].files())
                    problem = check_answer(job.endpoint, response, expected[job.pair_index])
                    status: int | None = response.status_code
                except httpx.HTTPError as error:
                    status, problem = None, f"{type(error).__name__}: {error}"
                outcomes.append(Outcome(job, status, time.perf_counter() - started, problem))
                await on_progress(len(outcomes))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return outcomes


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `fraction` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]


@dataclass(frozen=True)
class PacedOutcome:
    sent_at_s: float  # when it was due, since the load started
    answered_at_s: float  # since the load started
    status: int | None  # None: no HTTP answer at all
    retry_after: str | None
    rate_limit_fields: bool  # carries the app's RateLimit fields (nginx's own 429 does not)
    problem: str | None  # why the answer is wrong; None for a correct 200 or a 429 with Retry-After


async def run_paced(
    base_url: str,
    pairs: list[Pair],
    expected: list[float],
    rate_per_s: float,
    duration_s: float,
    headers: dict[str, str],
    events: list[tuple[float, Callable[[], None]]],
    max_connections: int = 16,
) -> list[PacedOutcome]:
    """/similarity at `rate_per_s` for `duration_s` from one client, whatever the answers (an open loop: a client
    that ignores Retry-After), each event run once its time (seconds since the start) has come."""
    pending = sorted(events, key=lambda event: event[0])
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, trust_env=False, timeout=120.0,
                                 limits=limits) as client:

        async def send(index: int, due_s: float) -> PacedOutcome:
            pair = index % len(pairs)
            try:
                response = await client.post("/similarity", files=pairs[pair].files())
            except httpx.HTTPError as error:
                return PacedOutcome(due_s, time.monotonic() - started, None, None, False,
                                    f"{type(error).__name__}: {error}")
            retry_after = response.headers.get("retry-after")
            if response.status_code == 429:
                problem = None if retry_after and retry_after.isdigit() and int(retry_after) >= 1 else \
                    f"429 without a usable Retry-After ({retry_after!r})"
            else:
                problem = check_answer("/similarity", response, expected[pair])
            return PacedOutcome(due_s, time.monotonic() - started, response.status_code, retry_after,
                                "ratelimit" in response.headers, problem)

        started = time.monotonic()
        sending = []
        for index in range(round(rate_per_s * duration_s)):
            due_s = index / rate_per_s
            await asyncio.sleep(max(0.0, started + due_s - time.monotonic()))
            while pending and pending[0][0] <= due_s:
                pending.pop(0)[1]()
            sending.append(asyncio.create_task(send(index, due_s)))
        return list(await asyncio.gather(*sending))
