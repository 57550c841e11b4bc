"""siamcam side by side with a generic model server (LitServe), the same model behind both, in one run.

Run from the repository root: `.venv/bin/python -m bench.peers [--model DIR]` (needs the `bench` extra:
`pip install -e '.[bench]'`). It starts `uvicorn app.main:app` with its default settings (tests/support/service.py)
and bench/litserve_peer.py on the same model_store model on 127.0.0.1, one at a time (never both running), checks
that both give every pair the same score, then drives /similarity of each in turn at 1, 8 and 32 concurrent
clients (deploy/load.py's clients, every answer checked against that server's own unbatched score), for ROUNDS
rounds whose server order alternates, so that a change in the machine's load falls on both. It prints pairs/s,
p50 and p99 per server and level, then issue 13's targets with met / NOT met. Images: real JPEG files from
../shared/datasets/flowers when present, otherwise deploy/load.py's Pillow drawings. The clients and the server
measured share this machine's CPU cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import litserve
import torch

from bench.fronts_bench import running
from bench.service_bench import load_pairs, served_model_option, service_environment
from deploy.load import FLOWERS_DIR, Pair, make_jobs, percentile, reference_scores, run_load
from deploy.local_cluster import free_port
from tests.support.service import running_service

CLIENT_COUNTS = (1, 8, 32)
ROUNDS = 2
PAIR_COUNT = 32  # distinct pairs, cycled by the clients
REQUESTS = 96  # timed requests per server, level and round
WARMUP_REQUESTS = 32  # untimed, at the same concurrency, before each timed run
SCORE_AGREEMENT = 1e-5  # the largest difference allowed between the two servers' scores of a pair
TARGET_THROUGHPUT = 1.15  # siamcam's pairs/s over LitServe's, at 8 and 32 clients
TARGET_LONE_P50 = 0.9  # siamcam's p50 over LitServe's, at 1 client
SERVERS = ("siamcam", "LitServe")


@dataclass
class Level:
    """One server at one concurrency level, over all rounds: every request answered with a correct 200."""

    requests: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.requests / self.wall_s

    def latency_ms(self, fraction: float) -> float:
        return 1000 * percentile(self.latencies_s, fraction)


@contextmanager
def litserve_running(model_dir: Path, log_path: Path) -> Iterator[str]:
    """bench/litserve_peer.py in its own process group, until its /readyz answers; stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "bench.litserve_peer", str(model_dir), str(port)]
    with running("LitServe", command, port, {}, log_path) as server:
        yield server.replica.url


@contextmanager
def serving(server: str, model_dir: Path, logs: Path) -> Iterator[str]:
    """One of the two servers, alone on the machine while it is measured: LitServe's idle processes poll their
    queues (about 0.15 of a core, measured with both idle), which would take CPU from siamcam's model threads if
    it ran beside it."""
    if server == "siamcam":
        with running_service(service_environment(model_dir), logs / "siamcam.log") as replica:
            yield replica.url
    else:
        with litserve_running(model_dir, logs / "litserve.log") as url:
            yield url


async def _no_progress(done: int) -> None:
    """run_load reports each answer; the benchmark only needs the outcomes."""


def drive(url: str, clients: int, pairs: list[Pair], expected: list[float], level: Level) -> None:
    """A warm-up at `clients`, then REQUESTS timed requests added to `level`; fails on any wrong answer."""
    asyncio.run(run_load(url, make_jobs(WARMUP_REQUESTS, 0, len(pairs)), pairs, expected, clients, _no_progress))
    started = time.perf_counter()
    outcomes = asyncio.run(run_load(url, make_jobs(REQUESTS, 0, len(pairs)), pairs, expected, clients,
                                    _no_progress))
    wall_s = time.perf_counter() - started
    problems = [outcome.problem for outcome in outcomes if outcome.problem]
    if problems:
        raise RuntimeError(f"{len(problems)} of {len(outcomes)} answers of {url} were wrong, e.g. {problems[0]}")
    level.requests += len(outcomes)
    level.wall_s += wall_s
    level.latencies_s += [outcome.latency_s for outcome in outcomes]


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def load_average() -> str:
    """This machine's 1-minute load average over its cores: above 1, other work competed for the CPU."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> None:
    # Importing litserve sets up logging so that httpx would log every request of the load.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = served_model_option(__doc__.splitlines()[0])
    pairs = load_pairs(PAIR_COUNT)
    images = "flowers JPEG files" if FLOWERS_DIR.is_dir() else "Pillow drawings (JPEG + PNG)"
    print(f"model {model_dir.name}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"litserve {litserve.__version__}, {PAIR_COUNT} pairs of {images}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {load_average()}")
    levels = {server: {clients: Level() for clients in CLIENT_COUNTS} for server in SERVERS}
    with tempfile.TemporaryDirectory(prefix="peers-") as logs:
        expected = {}
        for server in SERVERS:
            with serving(server, model_dir, Path(logs)) as url:
                expected[server] = reference_scores(url, pairs)
        disagreement = max(abs(ours - theirs) for ours, theirs in zip(*expected.values(), strict=True))
        print(f"scores of the {PAIR_COUNT} pairs, one at a time: largest difference between the servers "
              f"{disagreement:.1e} (allowed {SCORE_AGREEMENT:.0e})")
        if disagreement > SCORE_AGREEMENT:
            raise RuntimeError("the two servers do not give the same scores: they do not serve the same model "
                               "through the same preprocessing")
        for round_index in range(ROUNDS):
            for server in SERVERS if round_index % 2 == 0 else SERVERS[::-1]:
                with serving(server, model_dir, Path(logs)) as url:
                    for clients in CLIENT_COUNTS:
                        drive(url, clients, pairs, expected[server], levels[server][clients])

    print(f"{load_average()} at the end of the load")
    print(f"\n/similarity, {ROUNDS} rounds x {REQUESTS} requests per server and level (each after "
          f"{WARMUP_REQUESTS} warm-up requests)")
    print(f"{'clients':>7} | {'siamcam pairs/s, p50, p99':>28} | {'LitServe pairs/s, p50, p99':>28} | ratio")
    for clients in CLIENT_COUNTS:
        cells = [f"{levels[server][clients].pairs_per_s:6.1f}, {levels[server][clients].latency_ms(0.5):5.0f} ms, "
                 f"{levels[server][clients].latency_ms(0.99):5.0f} ms" for server in SERVERS]
        ratio = levels["siamcam"][clients].pairs_per_s / levels["LitServe"][clients].pairs_per_s
        print(f"{clients:>7} | {cells[0]:>28} | {cells[1]:>28} | {ratio:.2f}x")

    print("\ntargets (issue 13):")
    for clients in CLIENT_COUNTS[1:]:
        ratio = levels["siamcam"][clients].pairs_per_s / levels["LitServe"][clients].pairs_per_s
        print(f"  pairs/s at {clients} clients, siamcam / LitServe >= {TARGET_THROUGHPUT}: {ratio:.2f}x "
              f"{verdict(ratio >= TARGET_THROUGHPUT)}")
    lone = CLIENT_COUNTS[0]
    p50_ratio = levels["siamcam"][lone].latency_ms(0.5) / levels["LitServe"][lone].latency_ms(0.5)
    print(f"  p50 at {lone} client, siamcam / LitServe <= {TARGET_LONE_P50}: {p50_ratio:.2f}x "
          f"{verdict(p50_ratio <= TARGET_LONE_P50)}")


if __name__ == "__main__":
    main()
