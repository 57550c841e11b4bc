"""One image against many, measured in one run: /rank against the same pairs sent to /similarity, and /embed
against the raw model.

Run from the repository root: `.venv/bin/python -m bench.rank_bench [--model DIR] [--rounds N]`. It loads the model
(by default the bundled one) in this process for the raw baseline, starts `uvicorn app.main:app` on 127.0.0.1 with
the default settings but REQUEST_TIMEOUT_S=300 (deploy/local_cluster.py, one replica), and measures, in alternating rounds so that both sides
of each ratio see the same load from whatever else runs on the machine:

- a query against 32 candidates: one `/rank` request (explain_top=0: scores only, as /similarity answers) against
  the same 32 pairs (query, candidate) sent as `/similarity` requests by 8 clients at once (target: >= 1.8x faster);
  then 8 clients each sending such /rank requests, in pairs scored per second, against the /similarity round's;
  and one /rank with explain_top=1 (the default), for what explaining the best match adds;
- `/embed` of 32 images from one client, and from 2 clients at once (one request's images decoding while the
  other's run), in images per second, against the raw model's `embed(features(x))` on the same 32 images as one
  batch of 32, already decoded and normalized, in this process (target: >= 0.9x); and the floor under it: the
  time decoding the 32 files takes one of the cores the model would otherwise use.

Every /rank score is checked against the /similarity score of its pair (within 1e-5) before anything is timed.
Images: 33 distinct flowers JPEG files from ../shared/datasets/flowers when present, otherwise Pillow drawings.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from app.model import load_model
from app.torch_threads import single_threaded_pool
from bench.service_bench import DEFAULT_MODEL_DIR, start_service, verdict
from contract.memory import keep_freed_memory_for_reuse
from deploy.load import FLOWERS_DIR, Upload, make_pairs

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="a model folder to serve")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds of each measurement")
    arguments = parser.parse_args()
    model_dir: Path = arguments.model.resolve()
    keep_freed_memory_for_reuse()  # the in-process baseline runs the model with the service's memory settings
    served = load_model(model_dir, "cpu")
    images = load_images(1 + CANDIDATES)
    query, candidates = images[0], images[1:]
    source = "flowers JPEG files" if FLOWERS_DIR.is_dir() else "Pillow drawings"
    print(f"model {served.manifest.name} {served.manifest.version} ({served.manifest.backbone}, "
          f"{served.input_size[0]}x{served.input_size[1]}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch threads, {len(images)} {source}, {arguments.rounds} rounds")

    x = served.preprocessing.normalize(torch.stack([served.picture(upload.content, upload.filename, None)
                                                    for upload in candidates]))

    def raw_embed() -> None:
        with torch.inference_mode():
            served.module.embed(served.module.features(x))

    # What decoding the 32 files costs one core, as the service's image threads do it (torch single-threaded):
    # CPU time the model cannot have while /embed decodes.
    decoder = single_threaded_pool(1, "decode")

    def decode_all() -> None:
        decoder.submit(lambda: [served.picture(upload.content, upload.filename, None)
                                for upload in candidates]).result()

    rank_form = {"files": [*files("query", [query]), *files("candidates", candidates)]}
    # Eight /rank requests at once are 264 images in the queue: on a shared 2-core CPU they may take longer than
    # the default REQUEST_TIMEOUT_S, which is not what is measured here.
    with start_service(model_dir, {"REQUEST_TIMEOUT_S": "300"}) as cluster, ThreadPoolExecutor(CLIENTS) as pool, \
            httpx.Client(base_url=cluster.replicas[0].url, timeout=300, trust_env=False) as client:
        clients = [httpx.Client(base_url=cluster.replicas[0].url, timeout=300, trust_env=False)
                   for _ in range(CLIENTS)]

        def similarity_pairs() -> list[float]:
            def one(index: int) -> float:
                pair = {"image1": (query.filename, query.content, query.media_type),
                        "image2": (candidates[index].filename, candidates[index].content,
                                   candidates[index].media_type)}
                return post_ok(clients[index % CLIENTS], "/similarity", files=pair)["score"]
            return list(pool.map(one, range(CANDIDATES)))

        def rank(explain_top: int = 0) -> dict:
            return post_ok(client, "/rank", data={"explain_top": str(explain_top)}, **rank_form)

        def rank_from_every_client() -> None:
            list(pool.map(lambda http: post_ok(http, "/rank", data={"explain_top": "0"}, **rank_form), clients))

        def embed(http: httpx.Client) -> None:
            post_ok(http, "/embed", files=files("images", candidates))

        def embed_from_two_clients() -> None:
            list(pool.map(embed, clients[:2]))

        alone = similarity_pairs()
        ranked = {item["index"]: item["score"] for item in rank()["candidates"]}
        worst = max(abs(ranked[index] - score) for index, score in enumerate(alone))
        if worst > SCORE_TOLERANCE:
            raise RuntimeError(f"/rank and /similarity disagree by {worst:.2e} on a pair")
        print(f"/rank's scores match /similarity's within {worst:.1e}")

        for warm_up in (similarity_pairs, rank, rank_from_every_client, lambda: rank(1),
                        lambda: embed(client), embed_from_two_clients, raw_embed, decode_all):
            warm_up()
        times: dict[str, list[float]] = {name: [] for name in (
            "similarity", "rank", "rank x8", "rank explain_top=1", "embed", "embed x2", "raw", "decode")}
        for _ in range(arguments.rounds):
            times["similarity"].append(timed(similarity_pairs))
            times["rank"].append(timed(rank))
            times["rank x8"].append(timed(rank_from_every_client))
            times["rank explain_top=1"].append(timed(lambda: rank(1)))
            times["embed"].append(timed(lambda: embed(client)))
            times["embed x2"].append(timed(embed_from_two_clients))
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < RAW_SECONDS:
                raw_embed()
                calls += 1
            times["raw"].append((time.perf_counter() - started) / calls)
            times["decode"].append(timed(decode_all))
        for http in clients:
            http.close()

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nmedian of {arguments.rounds} rounds (min-max), one query against {CANDIDATES} candidates:")
    print(f"  {CANDIDATES} /similarity requests, {CLIENTS} clients: {1000 * median['similarity']:7.1f} ms "
          f"({1000 * min(times['similarity']):.1f}-{1000 * max(times['similarity']):.1f}), "
          f"{CANDIDATES / median['similarity']:.1f} pairs/s")
    print(f"  one /rank, explain_top=0:           {1000 * median['rank']:7.1f} ms "
          f"({1000 * min(times['rank']):.1f}-{1000 * max(times['rank']):.1f}), "
          f"{CANDIDATES / median['rank']:.1f} pairs/s")
    print(f"  {CLIENTS} /rank at once, explain_top=0:    {1000 * median['rank x8']:7.1f} ms, "
          f"{CLIENTS * CANDIDATES / median['rank x8']:.1f} pairs/s")
    print(f"  one /rank, explain_top=1:           {1000 * median['rank explain_top=1']:7.1f} ms")
    print(f"/embed of {CANDIDATES} images: one client {1000 * median['embed']:.1f} ms "
          f"({CANDIDATES / median['embed']:.1f} images/s), two clients at once {1000 * median['embed x2']:.1f} ms "
          f"({2 * CANDIDATES / median['embed x2']:.1f} images/s)")
    print(f"raw model, embed(features(x)) on a batch of {CANDIDATES}: {1000 * median['raw']:.1f} ms "
          f"({CANDIDATES / median['raw']:.1f} images/s)")

    # The cores the model's threads use are the ones decoding takes: at best /embed spends the raw model's time
    # plus the decoding's CPU time spread over every core.
    cores = len(os.sched_getaffinity(0))
    ceiling = median["raw"] / (median["raw"] + median["decode"] / cores)
    print(f"decoding the {CANDIDATES} files on one image thread: {1000 * median['decode']:.1f} ms; with the model on "
          f"all {cores} cores, /embed can reach at most {ceiling:.2f}x the raw model's images/s here")
    raw_rate = CANDIDATES / median["raw"]
    rows = [
        (f"/rank vs {CANDIDATES} /similarity from {CLIENTS} clients, same pairs",
         median["similarity"] / median["rank"], TARGET_RANK_VS_SIMILARITY),
        (f"{CLIENTS} clients: /rank pairs/s vs /similarity pairs/s",
         (CLIENTS * CANDIDATES / median["rank x8"]) / (CANDIDATES / median["similarity"]), TARGET_RANK_VS_SIMILARITY),
        (f"/embed of {CANDIDATES}, one client, vs raw model at batch {CANDIDATES}",
         (CANDIDATES / median["embed"]) / raw_rate, TARGET_EMBED_VS_RAW),
        (f"/embed of {CANDIDATES}, two clients, vs raw model at batch {CANDIDATES}",
         (2 * CANDIDATES / median["embed x2"]) / raw_rate, TARGET_EMBED_VS_RAW),
    ]
    print(f"\n{'target':<62} {'measured':>9} {'goal':>8}  result")
    for name, value, goal in rows:
        print(f"{name:<62} {value:>8.2f}x {goal:>7.2f}x  {verdict(value, goal)}")


if __name__ == "__main__":
    main()
