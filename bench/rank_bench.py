"""One image against many, measured in one run: /rank against the same pairs sent to /similarity, and /embed
against the raw model.

Run from the repository root: `.venv/bin/python -m bench.rank_bench [--model DIR] [--rounds N] [--only rank|embed]`.
It serves the model (by default the bundled one) and measures, in alternating rounds so that both sides of each
ratio see the same load from whatever else runs on the machine:

- on `uvicorn app.main:app` (deploy/local_cluster.py, one replica, the default settings but REQUEST_TIMEOUT_S=300),
  a query against 32 candidates: one `/rank` request (explain_top=0: scores only, as /similarity answers) against
  the same 32 pairs (query, candidate) sent as `/similarity` requests by 8 clients at once (target: >= 1.8x faster);
  then 8 clients each sending such /rank requests, in pairs scored per second, against the /similarity round's;
  and one /rank with explain_top=1 (the default), for what explaining the best match adds;
- `/embed` of 32 images from one client, and from 2 clients at once (one request's images decoding while the
  other's run), in images per second, against the raw model's `embed(features(x))` on the same 32 images as one
  batch of 32, already decoded and normalized (target: >= 0.9x); both in this process, the service on a thread of
  its own (tests/support/service.py), so that both get the same share of a shared machine; and the floor under
  it: the time decoding the 32 files takes one of the cores the model would otherwise use.

Every /rank score is checked against the /similarity score of its pair (within 1e-5) before anything is timed.
Images: 33 distinct flowers JPEG files from ../shared/datasets/flowers when present, otherwise Pillow drawings.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from app.model import load_model
from app.settings import Settings
from app.torch_threads import single_threaded_pool
from bench.service_bench import DEFAULT_MODEL_DIR, start_service, verdict
from contract.memory import keep_freed_memory_for_reuse
from deploy.load import FLOWERS_DIR, Upload, make_pairs
from tests.support.service import serve_in_thread

CANDIDATES = 32
CLIENTS = 8
ROUNDS = 5
RAW_SECONDS = 3.0
TARGET_RANK_VS_SIMILARITY = 1.8
TARGET_EMBED_VS_RAW = 0.9
SCORE_TOLERANCE = 1e-5


def load_images(count: int) -> list[Upload]:
    """`count` distinct images: flowers JPEG files as they are on disk, else load.py's drawings."""
    photos = sorted(FLOWERS_DIR.glob("*/*.jpg")) if FLOWERS_DIR.is_dir() else []
    if photos:
        return [Upload(path.name, path.read_bytes(), "image/jpeg")
                for path in random.Random(0).sample(photos, count)]
    pairs = make_pairs((count + 1) // 2)
    return [upload for pair in pairs for upload in (pair.image1, pair.image2)][:count]


def files(field: str, uploads: list[Upload]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (upload.filename, upload.content, upload.media_type)) for upload in uploads]


def post_ok(client: httpx.Client, path: str, **kwargs: object) -> dict:
    response = client.post(path, **kwargs)
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


Times = dict[str, list[float]]


def measure_rank(model_dir: Path, query: Upload, candidates: list[Upload], rounds: int, times: Times) -> None:
    """One /rank against the same pairs sent to /similarity by CLIENTS clients, then CLIENTS /rank at once, and
    one /rank with explain_top=1, in alternating rounds, on a uvicorn subprocess."""
    rank_form = {"files": [*files("query", [query]), *files("candidates", candidates)]}
    # Eight /rank requests at once are 264 images in the queue: on a shared 2-core CPU they may take longer than
    # the default REQUEST_TIMEOUT_S, which is not what is measured here.
    with start_service(model_dir, {"REQUEST_TIMEOUT_S": "300"}) as cluster, ThreadPoolExecutor(CLIENTS) as pool:
        url = cluster.replicas[0].url
        clients = [httpx.Client(base_url=url, timeout=300, trust_env=False) for _ in range(CLIENTS)]

        def similarity_pairs() -> list[float]:
            def one(index: int) -> float:
                pair = {"image1": (query.filename, query.content, query.media_type),
                        "image2": (candidates[index].filename, candidates[index].content,
                                   candidates[index].media_type)}
                return post_ok(clients[index % CLIENTS], "/similarity", files=pair)["score"]
            return list(pool.map(one, range(CANDIDATES)))

        def rank(explain_top: int = 0, http: httpx.Client = clients[0]) -> dict:
            return post_ok(http, "/rank", data={"explain_top": str(explain_top)}, **rank_form)

        def rank_from_every_client() -> None:
            list(pool.map(lambda http: rank(0, http), clients))

        alone = similarity_pairs()
        ranked = {item["index"]: item["score"] for item in rank()["candidates"]}
        worst = max(abs(ranked[index] - score) for index, score in enumerate(alone))
        if worst > SCORE_TOLERANCE:
            raise RuntimeError(f"/rank and /similarity disagree by {worst:.2e} on a pair")
        print(f"/rank's scores match /similarity's within {worst:.1e}")
        for warm_up in (similarity_pairs, rank, rank_from_every_client, lambda: rank(1)):
            warm_up()
        for _ in range(rounds):
            times["similarity"].append(timed(similarity_pairs))
            times["rank"].append(timed(rank))
            times["rank x8"].append(timed(rank_from_every_client))
            times["rank explain_top=1"].append(timed(lambda: rank(1)))
        for http in clients:
            http.close()


def measure_embed(model_dir: Path, candidates: list[Upload], rounds: int, times: Times) -> None:
    """/embed of the candidates from one client and from two at once, the raw model on them as one batch, and
    their decoding on one image thread, in alternating rounds. The service runs on a thread of this process (as
    tests run it): a service in another process got another share of a shared machine's CPU than the raw model
    here (on 2026-12-06, at a load average of 12, /embed measured 0.50x against a subprocess, 1.4-1.6x in
    process)."""
    served = load_model(model_dir, "cpu")
    x = served.preprocessing.normalize(torch.stack([served.picture(upload.content, upload.filename, None)
                                                    for upload in candidates]))

    def raw_embed() -> None:
        with torch.inference_mode():
            served.module.embed(served.module.features(x))

    # What decoding the files costs one core, as the service's image threads do it (torch single-threaded):
    # CPU time the model cannot have while /embed decodes.
    decoder = single_threaded_pool(1, "decode")

    def decode_all() -> None:
        decoder.submit(lambda: [served.picture(upload.content, upload.filename, None)
                                for upload in candidates]).result()

    settings = Settings(model_store=model_dir.parent, model_name=model_dir.name, log_level="WARNING")
    with serve_in_thread(settings) as url, ThreadPoolExecutor(2) as pool, \
            httpx.Client(base_url=url, timeout=300, trust_env=False) as client, \
            httpx.Client(base_url=url, timeout=300, trust_env=False) as other:

        def embed(http: httpx.Client) -> None:
            post_ok(http, "/embed", files=files("images", candidates))

        def embed_from_two_clients() -> None:
            list(pool.map(embed, [client, other]))

        for warm_up in (lambda: embed(client), embed_from_two_clients, raw_embed, decode_all):
            warm_up()
        for _ in range(rounds):
            times["embed"].append(timed(lambda: embed(client)))
            times["embed x2"].append(timed(embed_from_two_clients))
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < RAW_SECONDS:
                raw_embed()
                calls += 1
            times["raw"].append((time.perf_counter() - started) / calls)
            times["decode"].append(timed(decode_all))
    decoder.shutdown()


def report_rank(times: Times) -> list[tuple[str, float, float]]:
    median = {name: statistics.median(times[name]) for name in ("similarity", "rank", "rank x8",
                                                                "rank explain_top=1")}
    print(f"\nmedian of {len(times['rank'])} rounds (min-max), one query against {CANDIDATES} candidates:")
    for name, label in (("similarity", f"{CANDIDATES} /similarity requests, {CLIENTS} clients"),
                        ("rank", "one /rank, explain_top=0")):
        print(f"  {label:<36} {1000 * median[name]:8.1f} ms ({1000 * min(times[name]):.1f}-"
              f"{1000 * max(times[name]):.1f}), {CANDIDATES / median[name]:.1f} pairs/s")
    print(f"  {f'{CLIENTS} /rank at once, explain_top=0':<36} {1000 * median['rank x8']:8.1f} ms, "
          f"{CLIENTS * CANDIDATES / median['rank x8']:.1f} pairs/s")
    print(f"  {'one /rank, explain_top=1':<36} {1000 * median['rank explain_top=1']:8.1f} ms")
    return [
        (f"/rank vs {CANDIDATES} /similarity from {CLIENTS} clients, same pairs",
         median["similarity"] / median["rank"], TARGET_RANK_VS_SIMILARITY),
        (f"{CLIENTS} clients: /rank pairs/s vs /similarity pairs/s",
         (CLIENTS * CANDIDATES / median["rank x8"]) / (CANDIDATES / median["similarity"]), TARGET_RANK_VS_SIMILARITY),
    ]


def report_embed(times: Times) -> list[tuple[str, float, float]]:
    median = {name: statistics.median(times[name]) for name in ("embed", "embed x2", "raw", "decode")}
    print(f"\nmedian of {len(times['embed'])} rounds: /embed of {CANDIDATES} images, one client "
          f"{1000 * median['embed']:.1f} ms ({CANDIDATES / median['embed']:.1f} images/s), two clients at once "
          f"{1000 * median['embed x2']:.1f} ms ({2 * CANDIDATES / median['embed x2']:.1f} images/s)")
    print(f"raw model, embed(features(x)) on a batch of {CANDIDATES}: {1000 * median['raw']:.1f} ms "
          f"({CANDIDATES / median['raw']:.1f} images/s)")
    # The cores the model's threads use are the ones decoding takes: /embed spends the model's time plus the
    # decoding's CPU time spread over every core, at best.
    cores = len(os.sched_getaffinity(0))
    share = median["decode"] / cores / median["raw"]
    print(f"decoding the {CANDIDATES} files on one image thread: {1000 * median['decode']:.1f} ms, spread over the "
          f"{cores} cores {100 * share:.1f}% of the raw model's time: the floor decoding adds to /embed")
    raw_rate = CANDIDATES / median["raw"]
    return [
        (f"/embed of {CANDIDATES}, one client, vs raw model at batch {CANDIDATES}",
         (CANDIDATES / median["embed"]) / raw_rate, TARGET_EMBED_VS_RAW),
        (f"/embed of {CANDIDATES}, two clients, vs raw model at batch {CANDIDATES}",
         (2 * CANDIDATES / median["embed x2"]) / raw_rate, TARGET_EMBED_VS_RAW),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="a model folder to serve")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds of each measurement")
    parser.add_argument("--only", choices=("rank", "embed"), help="measure only /rank or only /embed")
    arguments = parser.parse_args()
    model_dir: Path = arguments.model.resolve()
    keep_freed_memory_for_reuse()  # the in-process runs use the service's memory settings
    images = load_images(1 + CANDIDATES)
    query, candidates = images[0], images[1:]
    source = "flowers JPEG files" if FLOWERS_DIR.is_dir() else "Pillow drawings"
    print(f"model {model_dir}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, {len(images)} "
          f"{source}, {arguments.rounds} rounds")
    times: Times = defaultdict(list)
    rows = []
    if arguments.only != "embed":
        measure_rank(model_dir, query, candidates, arguments.rounds, times)
        rows += report_rank(times)
    if arguments.only != "rank":
        measure_embed(model_dir, candidates, arguments.rounds, times)
        rows += report_embed(times)
    print(f"\n{'target':<62} {'measured':>9} {'goal':>8}  result")
    for name, value, goal in rows:
        print(f"{name:<62} {value:>8.2f}x {goal:>7.2f}x  {verdict(value, goal)}")


if __name__ == "__main__":
    main()
