"""The compiled backbone against TorchScript, measured in one run (issue 23): the model's work, the service, start-up.

Run from the repository root: `.venv/bin/python -m bench.compiled_bench [--model DIR] [--device cpu|cuda]`.
1. Model work, in this process, on the same pairs (flowers JPEG files when present, else drawn pictures): the
   batch runners the service's model thread calls (`score_pairs`, `explain_pairs` with Grad-CAM and with the
   exact contributions), for one pair and for eight, with the TorchScript backbone (COMPILE=off) and the compiled
   one (COMPILE=auto), the two timed in alternation, call after call, so that both see the same load from others.
   Every torch call runs on a model thread made as the service makes its own (app/torch_threads.py): its threads
   and its memory are the service's (on the main thread the compiled backbone was faster than on the service's
   model thread, before that thread kept its freed memory; contract/memory.py).
2. The service (`python -m app`, one replica, default settings) started with COMPILE=off and
   COMPILE=auto alternately, ROUNDS times each: seconds from launch to ready, and /similarity at 32 clients,
   twice: from deploy/load.py's clients, which check every answer against a direct call, with the model thread's
   time per pair under that load (siamcam_inference_seconds); then from `wrk` (bench/fronts_bench.py's load: one C
   thread POSTing one pair), whose ratio is the one judged: the Python clients take a share of the 2 cores the
   service needs (issue 22), and wrk leaves it nearly all of them.
3. On a GPU (`--device cuda`), for issue 23's "CUDA graphs where they measure faster": the package's `features`
   for one pair's and eight pairs' images run directly and replayed from a CUDA graph captured once per batch
   size (torch.cuda.graph, after warm-up on a side stream), each synchronised, alternating; the graph's maps
   against the direct ones. The service captures none yet: this decides whether it should.
The package is compiled first, into the default cache (or found there), as `python -m training compile` does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from app.backbone import with_compiled_backbone
from app.model import ServedModel, explain_pairs, load_model, score_pairs
from app.torch_threads import model_thread_executor
from bench.service_bench import (
    DEFAULT_MODEL_DIR, SIMILARITY_REQUESTS, LoadRun, drive, load_pairs, model_pictures, print_targets, start_service,
    verdict,
)
from bench.fronts_bench import Request, Run, Server, measure
from contract.cache import default_cache_dir
from contract.compiled import ensure_package, machine_tag
from deploy.load import Pair, reference_scores

BATCHES = (1, 8)
CALLS = 15  # timed calls of each kind per variant, alternating
ROUNDS = 3  # service starts per setting, alternating
WRK_DURATION_S = 10
CLIENTS = 32
PAIRS = 16
TARGET_MODEL_WORK = 0.67  # compiled / TorchScript time, at most
TARGET_SERVICE = 1.3  # compiled / TorchScript pairs/s at 32 clients, at least
TARGET_START_UP_S = 2.0  # compiled start-up minus TorchScript's, at most


def timed(work: Callable[[], object], times: list[float]) -> None:
    """Run `work` once, appending its ms to `times`."""
    started = time.perf_counter()
    work()
    times.append(1000 * (time.perf_counter() - started))


def model_work(variants: dict[str, ServedModel], pictures: tuple[torch.Tensor, torch.Tensor]
               ) -> Iterator[tuple[str, int, dict[str, float]]]:
    """(kind, batch, median ms of each variant), the variants called in alternation."""
    kinds: dict[str, Callable[[ServedModel, list[torch.Tensor], list[torch.Tensor]], object]] = {
        "score_pairs": score_pairs,
        "explain gradcam": lambda model, a, b: explain_pairs(model, a, b, "gradcam"),
        "explain contributions": lambda model, a, b: explain_pairs(model, a, b, "contributions"),
    }
    for batch in BATCHES:
        first, second = list(pictures[0][:batch]), list(pictures[1][:batch])
        for kind, run in kinds.items():
            times: dict[str, list[float]] = {name: [] for name in variants}
            for model in variants.values():
                for _ in range(3):  # warm-up: TorchScript's profiling executor, the first calls' allocations
                    run(model, first, second)
            for _ in range(CALLS):
                for name, model in variants.items():
                    timed(lambda: run(model, first, second), times[name])
            yield kind, batch, {name: statistics.median(values) for name, values in times.items()}


def cuda_graph_work(compiled: ServedModel, pictures: tuple[torch.Tensor, torch.Tensor]
                    ) -> Iterator[tuple[int, float, float, float]]:
    """(images, direct ms, CUDA graph ms, largest difference between their maps) for one pair's and eight pairs'
    images through the compiled package (synchronised after every call, the two alternating)."""
    features = compiled.module.features
    for batch in BATCHES:
        images = torch.cat([pictures[0][:batch], pictures[1][:batch]]).to(compiled.device)
        static_input = compiled.preprocessing.normalize(images)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # torch.cuda.graphs' rule: warm up on a side stream before capturing
            for _ in range(3):
                features(static_input)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = features(static_input)
        times: dict[str, list[float]] = {"direct": [], "graph": []}
        for _ in range(CALLS):
            timed(lambda: (features(static_input), torch.cuda.synchronize()), times["direct"])
            timed(lambda: (graph.replay(), torch.cuda.synchronize()), times["graph"])
        difference = float((static_output - features(static_input)).abs().max())
        yield (2 * batch, statistics.median(times["direct"]), statistics.median(times["graph"]), difference)


@dataclass(frozen=True)
class Backbones:
    torchscript: ServedModel
    compiled: ServedModel
    package: Path
    compile_s: float | None  # None: the package was in the cache
    switch_s: float  # what COMPILE=auto adds to a start-up that finds its package: loading and checking it


def load_backbones(model_dir: Path, device: torch.device, cache: Path) -> Backbones:
    """The model with each backbone, the package compiled first into `cache` when missing, as
    `python -m training compile` does."""
    torchscript = load_model(model_dir, str(device))
    package, compile_s = ensure_package(model_dir, torchscript.manifest, cache, device)
    started = time.perf_counter()
    compiled = with_compiled_backbone(torchscript, cache)
    switch_s = time.perf_counter() - started
    if compiled.backbone != "compiled":
        raise SystemExit("the compiled backbone was refused (see the log above)")
    return Backbones(torchscript, compiled, package, compile_s, switch_s)


def service_rounds(model_dir: Path, cache: Path, pairs: list[Pair]
                   ) -> tuple[dict[str, list[float]], dict[str, list[LoadRun]], dict[str, list[Run]]]:
    """The service started ROUNDS times with each COMPILE setting, in alternating order: seconds from launch to
    ready, then the load from Python clients (answers checked) and from wrk, for each start."""
    started_s: dict[str, list[float]] = {"off": [], "auto": []}
    runs: dict[str, list[LoadRun]] = {"off": [], "auto": []}
    wrk_runs: dict[str, list[Run]] = {"off": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="compiled-bench-") as folder:
        request = Request.write(Path(folder))
        for round_index in range(ROUNDS):
            for setting in ("off", "auto") if round_index % 2 == 0 else ("auto", "off"):
                # A long request timeout: on a machine shared with other work, a request may wait long, and a
                # 504 would end the run; the rates are compared, not the latencies.
                env = {"COMPILE": setting, "COMPILE_CACHE_DIR": str(cache), "REQUEST_TIMEOUT_S": "600"}
                started = time.perf_counter()
                with start_service(model_dir, env) as cluster:
                    started_s[setting].append(time.perf_counter() - started)
                    replica = cluster.replicas[0]
                    log = replica.log_path.read_text()
                    if setting == "auto" and "serving the compiled backbone" not in log:
                        raise SystemExit(f"COMPILE=auto did not serve the compiled backbone; its log:\n{log}")
                    runs[setting].append(drive(replica.url, "/similarity", CLIENTS, SIMILARITY_REQUESTS, pairs,
                                               reference_scores(replica.url, pairs)))
                    server = Server(f"siamcam COMPILE={setting}", [str(arg) for arg in replica.process.args], env,
                                    replica)
                    wrk_runs[setting].append(measure(server, request, CLIENTS, WRK_DURATION_S))
    return started_s, runs, wrk_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the model work runs (the service "
                        "part runs on the CPU)")
    parser.add_argument("--skip-service", action="store_true", help="only the model work")
    parser.add_argument("--skip-model-work", action="store_true", help="only the service")
    args = parser.parse_args()
    model_dir = args.model.resolve()
    device = torch.device(args.device)
    cache = default_cache_dir()
    # Every torch call of this process on a model thread made as the service's (its threads, its memory).
    model_thread = model_thread_executor()
    loaded = model_thread.submit(load_backbones, model_dir, device, cache).result()
    torchscript, compiled = loaded.torchscript, loaded.compiled
    pairs = load_pairs(PAIRS)
    pictures = model_thread.submit(model_pictures, torchscript, pairs).result()
    threads = model_thread.submit(torch.get_num_threads).result()
    print(f"model {torchscript.manifest.name} ({torchscript.manifest.backbone}, {torchscript.input_size[0]} px), "
          f"torch {torch.__version__}, {threads} torch threads, {machine_tag(device)}; package "
          f"{loaded.package.name}: "
          + ("found in the cache" if loaded.compile_s is None else f"compiled in {loaded.compile_s:.1f} s")
          + f"; loaded and checked against TorchScript in {loaded.switch_s:.2f} s", flush=True)

    rows: list[tuple[str, float, float, bool]] = []
    if not args.skip_model_work:
        print(f"\nmodel work on {device}, on a model thread as the service's, median of {CALLS} calls each, "
              "alternating (ms):")
        print(f"{'batch runner':<24} {'pairs':>5} {'TorchScript':>12} {'compiled':>10} {'ratio':>7}")
    work = iter(()) if args.skip_model_work else model_work({"torchscript": torchscript, "compiled": compiled},
                                                            pictures)
    while (row := model_thread.submit(next, work, None).result()) is not None:
        kind, batch, medians = row
        ratio = medians["compiled"] / medians["torchscript"]
        print(f"{kind:<24} {batch:>5} {medians['torchscript']:>12.1f} {medians['compiled']:>10.1f} {ratio:>6.2f}x",
              flush=True)
        rows.append((f"{kind}, {batch} pair(s): compiled / TorchScript time", ratio, TARGET_MODEL_WORK, True))

    if device.type == "cuda" and not args.skip_model_work:
        print(f"\nthe compiled features on {device}, direct and from a CUDA graph, median of {CALLS} calls each, "
              "alternating (ms):")
        graphs = cuda_graph_work(compiled, pictures)
        try:
            while (graph_row := model_thread.submit(next, graphs, None).result()) is not None:
                images, direct_ms, graph_ms, difference = graph_row
                print(f"  {images:>3} images: direct {direct_ms:.2f}, graph {graph_ms:.2f} ms "
                      f"({graph_ms / direct_ms:.2f}x); maps {difference:.1e} apart", flush=True)
        except Exception as error:  # noqa: BLE001 -- a package that cannot be captured is a finding, not a crash
            print(f"  not capturable: {error!r}")

    if not args.skip_service and device.type == "cpu":
        started_s, runs, wrk_runs = service_rounds(model_dir, cache, pairs)
        print(f"\nservice, COMPILE=off and auto alternately, {ROUNDS} starts each:")
        for setting in ("off", "auto"):
            print(f"  COMPILE={setting:<4}  launch to ready: {', '.join(f'{s:.1f}' for s in started_s[setting])} s;"
                  f"  /similarity at {CLIENTS} clients: "
                  + ", ".join(f"{run.pairs_per_s:.1f}" for run in runs[setting]) + " pairs/s (the model thread: "
                  + ", ".join(f"{run.model_ms_per_pair:.1f}" for run in runs[setting]) + " ms per pair, batches of "
                  + ", ".join(f"{run.mean_batch:.1f}" for run in runs[setting]) + ")")
        rate, model_ms = ({setting: statistics.mean(getattr(run, name) for run in runs[setting]) for setting in runs}
                          for name in ("pairs_per_s", "model_ms_per_pair"))
        print(f"  the model thread's time per pair under that load, auto / off: "
              f"{model_ms['auto'] / model_ms['off']:.2f}x")
        print(f"  /similarity at {CLIENTS} Python clients, auto / off pairs/s: {rate['auto'] / rate['off']:.2f}x")
        wrk_rate = {setting: sum(run.requests for run in runs_of) / sum(run.wall_s for run in runs_of)
                    for setting, runs_of in wrk_runs.items()}
        print(f"  /similarity at {CLIENTS} wrk connections: COMPILE=off "
              + ", ".join(f"{run.pairs_per_s:.1f}" for run in wrk_runs["off"]) + ", auto "
              + ", ".join(f"{run.pairs_per_s:.1f}" for run in wrk_runs["auto"]) + " pairs/s")
        rows.append((f"/similarity at {CLIENTS} wrk connections: auto / off pairs/s",
                     wrk_rate["auto"] / wrk_rate["off"], TARGET_SERVICE, False))
        slower = statistics.mean(started_s["auto"]) - statistics.mean(started_s["off"])
        print(f"  start-up with the package: {slower:+.1f} s against TorchScript alone (goal: at most "
              f"+{TARGET_START_UP_S:.0f} s): {verdict(slower, TARGET_START_UP_S, at_most=True)}")

    print_targets(rows)


if __name__ == "__main__":
    main()
