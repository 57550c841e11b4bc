"""Front processes (issue 22): siamcam's `python -m app` with HTTP_WORKERS=0, 1, 2... under `wrk`, CPU per request
from /proc, against LitServe's layouts, on the default model, on many cores and on a GPU.

Run from the repository root, one section per flag (each well under 10 minutes on the 2-core machine):

    .venv/bin/python -m bench.fronts_bench --light      # 1: nearly free model, siamcam vs LitServe's layouts
    .venv/bin/python -m bench.fronts_bench --default    # 2: the default model at 1, 8, 32 connections
    .venv/bin/python -m bench.fronts_bench --scaling    # 3: 1 to 8 fronts, wrk on its own cores (8+ cores)
    .venv/bin/python -m bench.fronts_bench --gpu        # 4: /similarity and /explain at 64 connections on CUDA

The load is `wrk` (Debian package `wrk`: one C thread, so that the server keeps the other cores), POSTing one fixed
multipart pair of two 640 x 480 JPEGs drawn with Pillow, through a Lua script written at run time; a warm-up run
of WARMUP_S, then a run of --duration seconds whose figures are printed. Every answer must be a 2xx (wrk counts the
others; one answer is checked for its score beforehand). CPU per request: utime + stime of the server's whole
process tree (siamcam's main process and fronts; LitServe's processes) from /proc, before and after the timed run,
over the requests wrk completed; cores used = that CPU time / the run's wall time. RSS: each process's VmRSS,
sampled every RSS_PERIOD_S during the timed run, the largest kept. Each figure is printed with the server's and
wrk's command lines and the load average before and after it: the machine may be shared, so compare ratios of
one run, and rerun on a quiet machine before judging a target.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image, ImageDraw

from bench.service_bench import DEFAULT_MODEL_DIR
from deploy.local_cluster import LOOPBACK, Replica, free_port
from deploy.nginx_config import REPO_ROOT
from tests.support.metrics import metric_value
from tests.support.service import STARTUP_TIMEOUT_S

# A wrk carried to a machine without Debian's package: WRK=path (with LD_LIBRARY_PATH to its libluajit).
WRK = os.environ.get("WRK") or shutil.which("wrk") or "/usr/bin/wrk"
# A front's first requests were seconds slow on a busy 2-core machine (it imported torch for the resize then, before
# contract/picture.py): the warm-up lasts until every front has long served its first.
WARMUP_S = 6
DURATION_S = 10
RSS_PERIOD_S = 0.25
CONNECTIONS_AFTER_S = 2.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PICTURE_SIZE = (640, 480)
SCORE_AGREEMENT = 1e-5  # siamcam's and LitServe's score of the pair, when both serve the light model

TARGET_VS_LITSERVE = 1.15
TARGET_CPU_MS = 2.5
TARGET_FRONT_RSS_MB = 300
TARGET_VS_ONE_PROCESS = 0.97
TARGET_LONE_P50 = 1.05
TARGET_SCALING = 4.0
TARGET_GPU_SIMILARITY = 1000
TARGET_GPU_EXPLAIN = 400
SCALING_MIN_CPUS = 8

# LitServe layouts tried by --light: (num_api_servers, fast_queue, max_batch_size, batch_timeout_s, torch_threads);
# torch_threads 0: torch's own choice, 1: OMP_NUM_THREADS=1, as siamcam's MODEL_THREADS=1.
Layout = tuple[int, bool, int, float, int]
LITSERVE_LAYOUTS: list[Layout] = [
    (1, False, 16, 0.005, 0), (1, False, 16, 0.005, 1), (2, False, 16, 0.005, 0), (1, True, 16, 0.005, 0),
    (2, True, 16, 0.005, 0), (2, True, 8, 0.001, 0), (2, True, 32, 0.005, 0), (2, True, 16, 0.001, 0),
]
# siamcam in --light: MODEL_THREADS=1, the default on a GPU, whose case the nearly free model stands for.
LIGHT_MODEL_THREADS = "1"


# --- the request ------------------------------------------------------------------------------------------------

def drawn_jpeg(seed: int) -> bytes:
    """A 640 x 480 JPEG of random shapes on a gradient: a real photo's size and entropy, made here."""
    generator = random.Random(seed)
    width, height = PICTURE_SIZE
    picture = Image.linear_gradient("L").resize(PICTURE_SIZE).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for _ in range(40):
        x, y = generator.randrange(width), generator.randrange(height)
        size = generator.randrange(20, 160)
        colour = tuple(generator.randrange(256) for _ in range(3))
        shape = draw.ellipse if generator.random() < 0.5 else draw.rectangle
        shape((x, y, x + size, y + size), fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def multipart_pair(first: bytes, second: bytes) -> tuple[bytes, str]:
    """The body of a form with image1 and image2, and its Content-Type."""
    boundary = "siamcam-fronts-bench-7c2f9e"
    parts = []
    for field_name, content in (("image1", first), ("image2", second)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
                     f'filename="{field_name}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Request:
    """The one request wrk repeats: its body and the Lua script that sends it, in `folder`."""

    body: bytes
    content_type: str
    script: Path

    @classmethod
    def write(cls, folder: Path) -> Request:
        body, content_type = multipart_pair(drawn_jpeg(1), drawn_jpeg(2))
        (folder / "pair.body").write_bytes(body)
        script = folder / "pair.lua"
        script.write_text(f'local file = io.open("{folder / "pair.body"}", "rb")\n'
                          'wrk.body = file:read("*a")\nfile:close()\nwrk.method = "POST"\n'
                          f'wrk.headers["Content-Type"] = "{content_type}"\n')
        return cls(body, content_type, script)

    def post(self, url: str) -> dict[str, object]:
        """One answer, checked: a 200 with a score."""
        answer = httpx.post(url, content=self.body, headers={"Content-Type": self.content_type}, timeout=60,
                            trust_env=False)
        if answer.status_code != 200 or "score" not in answer.json():
            raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:300]}")
        return answer.json()


# --- the server's processes ---------------------------------------------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in ticks) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> dict[int, int]:
    """Every live process under `root` (itself included): its CPU ticks so far."""
    stats = {int(entry): stat for entry in os.listdir("/proc") if entry.isdigit()
             if (stat := _stat(int(entry))) is not None}
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            tree[pid] = stats[pid][1]
            frontier += [child for child, (parent, _) in stats.items() if parent == pid]
    return tree


def cpu_seconds(before: Mapping[int, int], after: Mapping[int, int]) -> float:
    """CPU time the tree spent between two snapshots (a process started in between counts whole)."""
    return sum(ticks - before.get(pid, 0) for pid, ticks in after.items()) / TICKS_PER_S


def command_line(pid: int) -> str:
    with suppress(FileNotFoundError, ProcessLookupError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


def rss_mb(pid: int) -> float:
    with suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def connections_by_process(port: int) -> dict[int, int]:
    """The established TCP connections to `port`, counted by the process holding each (from `ss`)."""
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                             text=True).stdout
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", listing):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


class RssSampler:
    """The largest VmRSS of every process of the tree, sampled in a thread while the context runs; and how wrk's
    connections were spread over the processes, once, CONNECTIONS_AFTER_S into the run."""

    def __init__(self, root: int, port: int) -> None:
        self.root = root
        self.port = port
        self.largest: dict[int, float] = {}
        self.connections: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        started = time.monotonic()
        while not self._done.wait(RSS_PERIOD_S):
            for pid in process_tree(self.root):
                self.largest[pid] = max(self.largest.get(pid, 0.0), rss_mb(pid))
            if not self.connections and time.monotonic() - started > CONNECTIONS_AFTER_S:
                self.connections = connections_by_process(self.port)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def fronts(self) -> list[float]:
        """The largest RSS of each front process (uvicorn processes under the main one)."""
        return [mb for pid, mb in self.largest.items() if pid != self.root and "uvicorn" in command_line(pid)]


@dataclass
class Server:
    """A server's process group, started from `command`: its URL and its root process."""

    name: str
    command: list[str]
    env: dict[str, str]
    replica: Replica

    @property
    def pid(self) -> int:
        return self.replica.process.pid

    def describe(self) -> str:
        settings = " ".join(f"{key}={value}" for key, value in self.env.items())
        return f"{settings} {' '.join(self.command)}".strip()


@contextmanager
def running(name: str, command: list[str], port: int, env: Mapping[str, str], log_path: Path,
            cpus: str | None = None) -> Iterator[Server]:
    """`command`, listening on `port`, in its own session, optionally pinned with taskset to `cpus`,
    until its /readyz answers 200; then SIGTERM to its whole group (LitServe's processes outlive a SIGTERM to
    their parent; siamcam's main process drains its fronts and leaves), SIGKILL for anything left."""
    full = (["taskset", "-c", cpus] if cpus else []) + command
    with log_path.open("wb") as log:
        process = subprocess.Popen(full, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, full, dict(env), Replica(port=port, process=process, log_path=log_path))
    try:
        server.replica.wait_ready(STARTUP_TIMEOUT_S)
        yield server
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def siamcam_command(port: int) -> list[str]:
    return [sys.executable, "-m", "app", "--host", LOOPBACK, "--port", str(port)]


# Settings added to every siamcam started here (--siamcam-env), e.g. to try OMP_NUM_THREADS=1.
EXTRA_SIAMCAM_ENV: dict[str, str] = {}


def siamcam_env(model_dir: Path, http_workers: int, extra: Mapping[str, str]) -> dict[str, str]:
    return {"MODEL_STORE": str(model_dir.parent), "MODEL_NAME": model_dir.name, "HTTP_WORKERS": str(http_workers),
            **extra, **EXTRA_SIAMCAM_ENV}


def litserve_command(model_dir: Path, port: int, layout: Layout) -> list[str]:
    api_servers, fast_queue, batch, timeout_s, _ = layout
    return [sys.executable, "-m", "bench.litserve_peer", str(model_dir), str(port),
            "--num-api-servers", str(api_servers), *(["--fast-queue"] if fast_queue else []),
            "--max-batch-size", str(batch), "--batch-timeout", str(timeout_s)]


def litserve_env(layout: Layout) -> dict[str, str]:
    # LitServe's accelerator=auto: the CPU, as siamcam here
    return {"CUDA_VISIBLE_DEVICES": "", **({"OMP_NUM_THREADS": str(layout[4])} if layout[4] else {})}


def layout_name(layout: Layout) -> str:
    api_servers, fast_queue, batch, timeout_s, threads = layout
    return (f"LitServe api_servers={api_servers} fast_queue={'on' if fast_queue else 'off'} batch={batch} "
            f"timeout={timeout_s * 1000:g}ms" + (f" OMP_NUM_THREADS={threads}" if threads else ""))


# --- wrk --------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One timed wrk run against one server."""

    label: str
    requests: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: float
    front_rss_mb: list[float] = field(default_factory=list)
    main_rss_mb: float = 0.0
    mean_batch: float | None = None
    main_cpu_s: float = 0.0  # the root process's share of cpu_s: siamcam's model owner (or its one process)

    @property
    def pairs_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.requests

    @property
    def main_cpu_ms(self) -> float:
        return 1000 * self.main_cpu_s / self.requests

    @property
    def cores(self) -> float:
        return self.cpu_s / self.wall_s

    def line(self) -> str:
        rss = (f"; RSS main {self.main_rss_mb:.0f} MB" + (", fronts " + ", ".join(f"{mb:.0f}" for mb in
                                                                               self.front_rss_mb) + " MB"
                                                           if self.front_rss_mb else ""))
        batch = f"; mean batch {self.mean_batch:.1f}" if self.mean_batch is not None else ""
        main_cpu = f" (main process {self.main_cpu_ms:.2f})" if self.front_rss_mb else ""
        return (f"{self.label:<58} {self.pairs_per_s:8.1f} pairs/s  p50 {self.p50_ms:6.1f} ms  p99 "
                f"{self.p99_ms:6.1f} ms  CPU {self.cpu_ms:5.2f} ms/request{main_cpu}  {self.cores:4.2f} cores"
                f"{batch}{rss}")


def load_average() -> str:
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(report: str, percentile: str) -> float:
    found = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", report, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no {percentile}% latency in wrk's report:\n{report}")
    return float(found[1]) * _UNITS_MS[found[2]]


def wrk_command(url: str, request: Request, connections: int, seconds: float, threads: int = 1,
                cpus: str | None = None) -> list[str]:
    return ((["taskset", "-c", cpus] if cpus else [])
            + [WRK, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency", "--timeout",
               "30s", "-s", str(request.script), url])


def wrk(command: list[str]) -> tuple[int, float, float, float]:
    """(requests, seconds, p50 ms, p99 ms) of one wrk run; fails if any answer was not a 2xx or 3xx."""
    report = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", report)
    if done is None:
        raise RuntimeError(f"wrk's report has no request count:\n{report}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    errors = re.search(r"Socket errors: (.*)", report)
    if bad or (errors and re.search(r"[1-9]", errors[1].replace("connect 0", ""))):
        raise RuntimeError(f"wrk met failed answers or socket errors:\n{report}")
    return (int(done[1]), float(done[2]) * _UNITS_MS[done[3]] / 1000, _latency_ms(report, "50"),
            _latency_ms(report, "99"))


def _batch_totals(url: str, queue: str) -> tuple[float, float] | None:
    """siamcam's batch-size histogram sum and count (None for a server without them)."""
    with httpx.Client(base_url=url, trust_env=False, timeout=10.0) as client:
        if client.get("/metrics").status_code != 200:
            return None
        return (metric_value(client, "siamcam_batch_size_sum", queue=queue),
                metric_value(client, "siamcam_batch_size_count", queue=queue))


def measure(server: Server, request: Request, connections: int, duration_s: float, path: str = "/similarity",
            wrk_cpus: str | None = None, wrk_threads: int = 1, label: str | None = None) -> Run:
    """A warm-up, then one timed wrk run with the server's CPU, RSS and (siamcam) mean batch; printed."""
    url = f"{server.replica.url}{path}"
    wrk([*wrk_command(url, request, connections, WARMUP_S, wrk_threads, wrk_cpus)])
    command = wrk_command(url, request, connections, duration_s, wrk_threads, wrk_cpus)
    queue = path.strip("/") if path == "/similarity" else "explain"
    batches_before = _batch_totals(server.replica.url, queue) if server.name.startswith("siamcam") else None
    load_before = load_average()
    before = process_tree(server.pid)
    with RssSampler(server.pid, server.replica.port) as rss:
        requests, wall_s, p50, p99 = wrk(command)
    after = process_tree(server.pid)
    cpu_s = cpu_seconds(before, after)
    main_cpu_s = (after.get(server.pid, 0) - before.get(server.pid, 0)) / TICKS_PER_S
    mean_batch = None
    if batches_before is not None:
        batches_after = _batch_totals(server.replica.url, queue)
        assert batches_after is not None
        if batches_after[1] > batches_before[1]:
            mean_batch = (batches_after[0] - batches_before[0]) / (batches_after[1] - batches_before[1])
    run = Run(label or server.name, requests, wall_s, p50, p99, cpu_s, sorted(rss.fronts(), reverse=True),
              rss.largest.get(server.pid, 0.0), mean_batch, main_cpu_s)
    print(run.line())
    if len(rss.connections) > 1:
        print(f"    wrk's connections by process: {sorted(rss.connections.values(), reverse=True)}")
    print(f"    server: {server.describe()}\n    load:   {' '.join(command)}\n    {load_before} before, "
          f"{load_average()} after", flush=True)
    return run


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# --- sections -----------------------------------------------------------------------------------------------------

@contextmanager
def light_model(option: Path | None) -> Iterator[Path]:
    """bench/light_model.py's model: the folder given, or one exported into a temporary store."""
    if option is not None:
        yield option.resolve()
        return
    from bench.light_model import export_light_model

    with tempfile.TemporaryDirectory(prefix="fronts-light-") as store:
        yield export_light_model(Path(store))


def light_section(args: argparse.Namespace, request: Request, logs: Path) -> None:
    """Section 1: the nearly free model; siamcam with each HTTP_WORKERS against LitServe's layouts."""
    print(f"\n== 1. nearly free model (bench/light_model.py), /similarity at {args.connections_light} connections, "
          f"{args.duration:g} s after a {WARMUP_S} s warm-up; COMPILE=off, DEVICE=cpu, MODEL_THREADS="
          f"{args.light_model_threads} (a GPU's default) ==", flush=True)
    extra = {"COMPILE": "off", "DEVICE": "cpu", "MODEL_THREADS": args.light_model_threads}
    with light_model(args.light_model) as model_dir:
        port = free_port()
        with running("floor: bench/minimal_server.py (multipart, both model pictures, no model)",
                     [sys.executable, "-m", "bench.minimal_server", str(model_dir), str(port)], port, {},
                     logs / "minimal.log") as minimal:
            floor = measure(minimal, request, args.connections_light, args.duration)
        ours: dict[int, Run] = {}
        theirs: dict[str, Run] = {}
        reference: float | None = None
        for workers in args.fronts:
            env = siamcam_env(model_dir, workers, extra)
            port = free_port()
            with running(f"siamcam HTTP_WORKERS={workers} MODEL_THREADS={args.light_model_threads}",
                         siamcam_command(port), port, env, logs / "siamcam.log") as server:
                reference = float(request.post(f"{server.replica.url}/similarity")["score"])
                ours[workers] = measure(server, request, args.connections_light, args.duration)
        layouts = [parse_layout(text) for text in args.litserve] if args.litserve else LITSERVE_LAYOUTS
        for layout in layouts:
            name = layout_name(layout)
            port = free_port()
            with running(name, litserve_command(model_dir, port, layout), port, litserve_env(layout),
                         logs / "litserve.log") as peer:
                score = float(request.post(f"{peer.replica.url}/similarity")["score"])
                if reference is not None and abs(score - reference) > SCORE_AGREEMENT:
                    raise RuntimeError(f"LitServe scores the pair {score}, siamcam {reference}: not the same model")
                theirs[name] = measure(peer, request, args.connections_light, args.duration)
    best_ours = max(ours.values(), key=lambda run: run.pairs_per_s)
    best_theirs = max(theirs.values(), key=lambda run: run.pairs_per_s)
    print(f"\nsiamcam's best: {best_ours.label}; LitServe's best here: {best_theirs.label}")
    ratio = best_ours.pairs_per_s / best_theirs.pairs_per_s
    print(f"  pairs/s siamcam best / LitServe best: {ratio:.2f}x ({best_ours.pairs_per_s:.1f} / "
          f"{best_theirs.pairs_per_s:.1f}), target >= {TARGET_VS_LITSERVE}x: {verdict(ratio >= TARGET_VS_LITSERVE)}")
    print(f"  CPU per request: siamcam {best_ours.cpu_ms:.2f} ms ({best_ours.cores:.2f} cores), LitServe "
          f"{best_theirs.cpu_ms:.2f} ms ({best_theirs.cores:.2f} cores); target siamcam <= {TARGET_CPU_MS} ms: "
          f"{verdict(best_ours.cpu_ms <= TARGET_CPU_MS)}; the floor (bench/minimal_server.py, the same "
          f"pictures made, nothing else) {floor.cpu_ms:.2f} ms")
    if best_ours.front_rss_mb:
        # What no layout with a model process of its own can go below: the floor's work, and that process's.
        least = floor.cpu_ms + best_ours.main_cpu_ms
        print(f"  the floor and siamcam's model process together: {least:.2f} ms ({floor.cpu_ms:.2f} + "
              f"{best_ours.main_cpu_ms:.2f}), leaving {TARGET_CPU_MS - least:.2f} ms of the target to the fronts' own "
              f"serving (FastAPI, middleware, logs, metrics, IPC), which took {best_ours.cpu_ms - least:.2f} ms")
    fronts_rss = [mb for run in ours.values() for mb in run.front_rss_mb]
    if fronts_rss:
        print(f"  largest front RSS under load: {max(fronts_rss):.0f} MB, target <= {TARGET_FRONT_RSS_MB} MB: "
              f"{verdict(max(fronts_rss) <= TARGET_FRONT_RSS_MB)}; main process: "
              + ", ".join(f"HTTP_WORKERS={workers} {run.main_rss_mb:.0f} MB" for workers, run in ours.items()))


def parse_layout(text: str) -> Layout:
    """`API_SERVERS,fq|nofq,BATCH,TIMEOUT_S[,TORCH_THREADS]`, e.g. `2,fq,16,0.005` or `1,nofq,16,0.005,1`."""
    api_servers, queue, batch, timeout_s, *threads = text.split(",")
    if queue not in ("fq", "nofq"):
        raise argparse.ArgumentTypeError(f"{text}: the second field is fq or nofq")
    return int(api_servers), queue == "fq", int(batch), float(timeout_s), int(threads[0]) if threads else 0


def compile_setting(model_dir: Path) -> str:
    """COMPILE=auto when this machine's compiled package of the model is already in the cache (as the service
    would serve it), else off: compiling at start-up would take minutes of a shared CPU."""
    import torch

    from app.settings import Settings
    from contract.compiled import package_path
    from contract.manifest import read_manifest

    manifest = read_manifest(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if manifest.backbone_program is None:
        return "off"
    package = package_path(Settings().compile_cache_dir, manifest.backbone_program.sha256, device)
    return "auto" if package.is_file() else "off"


def default_section(args: argparse.Namespace, request: Request, logs: Path) -> None:
    """Section 2: the default model, HTTP_WORKERS=0 against each other count, at 1, 8 and 32 connections."""
    model_dir = args.model.resolve()
    compiled = compile_setting(model_dir)
    print(f"\n== 2. default model ({model_dir.name}), COMPILE={compiled} ("
          f"{'its compiled package is in the cache' if compiled == 'auto' else 'no compiled package in the cache'})"
          f", /similarity, {args.duration:g} s per level after a {WARMUP_S} s warm-up, {args.rounds} round(s) "
          "alternating the order ==", flush=True)
    runs: dict[int, dict[int, list[Run]]] = {workers: {c: [] for c in args.connections} for workers in args.fronts}
    for round_index in range(args.rounds):
        order = args.fronts if round_index % 2 == 0 else args.fronts[::-1]
        for workers in order:
            env = siamcam_env(model_dir, workers, {"COMPILE": compiled})
            port = free_port()
            with running(f"siamcam HTTP_WORKERS={workers}", siamcam_command(port), port, env,
                         logs / "siamcam.log") as server:
                request.post(f"{server.replica.url}/similarity")
                for connections in args.connections:
                    runs[workers][connections].append(measure(
                        server, request, connections, args.duration,
                        label=f"siamcam HTTP_WORKERS={workers}, {connections} connections"))
    baseline = args.fronts[0]
    print(f"\nsummed over rounds; ratios to HTTP_WORKERS={baseline}")
    print(f"{'HTTP_WORKERS':>12} {'conns':>5} {'pairs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms':>7} "
          f"{'x pairs/s':>9} {'x p50':>6}")
    for workers in args.fronts:
        for connections in args.connections:
            mine, base = runs[workers][connections], runs[baseline][connections]
            pairs = sum(r.requests for r in mine) / sum(r.wall_s for r in mine)
            base_pairs = sum(r.requests for r in base) / sum(r.wall_s for r in base)
            p50 = _median([r.p50_ms for r in mine])
            p99 = _median([r.p99_ms for r in mine])
            cpu = 1000 * sum(r.cpu_s for r in mine) / sum(r.requests for r in mine)
            ratio, p50_ratio = pairs / base_pairs, p50 / _median([r.p50_ms for r in base])
            marks = ""
            if workers != baseline:
                marks = f"  pairs/s {verdict(ratio >= TARGET_VS_ONE_PROCESS)}"
                if connections == 1:
                    marks += f", p50 {verdict(p50_ratio <= TARGET_LONE_P50)}"
            print(f"{workers:>12} {connections:>5} {pairs:8.1f} {p50:7.1f} {p99:7.1f} {cpu:7.2f} {ratio:8.2f}x "
                  f"{p50_ratio:5.2f}x{marks}")
    print(f"targets: >= {TARGET_VS_ONE_PROCESS}x pairs/s at every load, p50 at one connection <= {TARGET_LONE_P50}x")


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def scaling_section(args: argparse.Namespace, request: Request, logs: Path) -> None:
    """Section 3: the nearly free model with 1 to 8 fronts, wrk on its own cores, the server on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < SCALING_MIN_CPUS:
        print(f"\n== 3. scaling: skipped, {len(cpus)} cores here (needs {SCALING_MIN_CPUS} or more) ==")
        return
    load_cpus = cpus[:args.wrk_cores]
    server_cpus = ",".join(map(str, cpus[args.wrk_cores:]))
    wrk_cpus = ",".join(map(str, load_cpus))
    print(f"\n== 3. scaling: nearly free model, /similarity at {args.connections_scaling} connections, wrk with "
          f"{len(load_cpus)} threads on cores {wrk_cpus}, the server on cores {server_cpus}; COMPILE=off, "
          f"DEVICE=cpu, MODEL_THREADS={args.light_model_threads} ==", flush=True)
    runs: dict[int, Run] = {}
    with light_model(args.light_model) as model_dir:
        for workers in args.scaling_fronts:
            env = siamcam_env(model_dir, workers, {"COMPILE": "off", "DEVICE": "cpu",
                                                   "MODEL_THREADS": args.light_model_threads})
            port = free_port()
            with running(f"siamcam HTTP_WORKERS={workers} MODEL_THREADS={args.light_model_threads}",
                         siamcam_command(port), port, env, logs / "siamcam.log", cpus=server_cpus) as server:
                request.post(f"{server.replica.url}/similarity")
                runs[workers] = measure(server, request, args.connections_scaling, args.duration,
                                        wrk_cpus=wrk_cpus, wrk_threads=len(load_cpus))
    first, last = min(runs), max(runs)
    ratio = runs[last].pairs_per_s / runs[first].pairs_per_s
    print(f"\n{last} fronts / {first} front: {ratio:.2f}x pairs/s, target >= {TARGET_SCALING}x: "
          f"{verdict(ratio >= TARGET_SCALING)}")


def gpu_section(args: argparse.Namespace, request: Request, logs: Path) -> None:
    """Section 4: the default model on CUDA, /similarity and /explain at 64 connections, beside the raw model's
    pairs/s at the batch the service formed."""
    import torch

    if not torch.cuda.is_available():
        print("\n== 4. GPU: skipped, no CUDA device here ==")
        return
    from app.model import explain_pairs, load_model, score_pairs
    from bench.service_bench import pairs_per_second

    model_dir = args.model.resolve()
    workers = args.gpu_fronts or max(1, min(len(os.sched_getaffinity(0)) - 1, 8))
    compiled = compile_setting(model_dir)
    extra = {"COMPILE": compiled, **({"MAX_BATCH_SIZE": str(args.max_batch_size)} if args.max_batch_size else {})}
    print(f"\n== 4. GPU {torch.cuda.get_device_name()}: default model ({model_dir.name}), HTTP_WORKERS={workers}, "
          f"COMPILE={compiled}, {args.connections_gpu} connections, {args.duration:g} s after a {WARMUP_S} s warm-up, "
          f"settings {extra} ==", flush=True)
    env = siamcam_env(model_dir, workers, extra)
    port = free_port()
    with running(f"siamcam HTTP_WORKERS={workers}", siamcam_command(port), port, env, logs / "siamcam.log") as server:
        request.post(f"{server.replica.url}/similarity")
        similarity = measure(server, request, args.connections_gpu, args.duration, "/similarity",
                             label=f"/similarity, HTTP_WORKERS={workers}")
        explain = measure(server, request, args.connections_gpu, args.duration, "/explain",
                          label=f"/explain, HTTP_WORKERS={workers}")
    served = load_model(model_dir, "cuda")
    first, second = (served.picture(content, name, None) for content, name in
                     ((drawn_jpeg(1), "image1.jpg"), (drawn_jpeg(2), "image2.jpg")))
    for run, work, target in ((similarity, score_pairs, TARGET_GPU_SIMILARITY),
                              (explain, lambda model, a, b: explain_pairs(model, a, b, "gradcam"),
                               TARGET_GPU_EXPLAIN)):
        batch = max(1, round(run.mean_batch or 1))
        firsts, seconds = [first] * batch, [second] * batch

        def call() -> None:
            work(served, firsts, seconds)
            torch.cuda.synchronize()

        raw = pairs_per_second(call, batch)
        print(f"{run.label}: {run.pairs_per_s:.1f} pairs/s at mean batch {run.mean_batch or 0:.1f}; raw model at "
              f"batch {batch}: {raw:.1f} pairs/s ({run.pairs_per_s / raw:.2f}x); target >= {target} pairs/s: "
              f"{verdict(run.pairs_per_s >= target)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--light", action="store_true", help="section 1: nearly free model vs LitServe")
    parser.add_argument("--default", action="store_true", help="section 2: the default model, 1/8/32 connections")
    parser.add_argument("--scaling", action="store_true", help="section 3: fronts 1..8 on 8+ cores")
    parser.add_argument("--gpu", action="store_true", help="section 4: the default model on CUDA")
    parser.add_argument("--duration", type=float, default=DURATION_S, help="seconds of each timed wrk run")
    parser.add_argument("--fronts", type=_ints, default=None,
                        help="HTTP_WORKERS values (sections 1, 2; default 0,1,2,3 and 0,1,2)")
    parser.add_argument("--litserve", action="append", default=[],
                        help="a LitServe layout API_SERVERS,fq|nofq,BATCH,TIMEOUT_S[,TORCH_THREADS] (repeatable; "
                             "default: "
                             f"{len(LITSERVE_LAYOUTS)} layouts)")
    parser.add_argument("--connections", type=_ints, default=[1, 8, 32], help="section 2's loads")
    parser.add_argument("--rounds", type=int, default=1, help="section 2's rounds, the order alternating")
    parser.add_argument("--scaling-fronts", type=_ints, default=[1, 2, 4, 8])
    parser.add_argument("--wrk-cores", type=int, default=2, help="section 3: cores (and threads) given to wrk")
    parser.add_argument("--gpu-fronts", type=int, default=0, help="section 4's HTTP_WORKERS (0: min(CPUs-1, 8))")
    parser.add_argument("--max-batch-size", type=int, default=0, help="section 4's MAX_BATCH_SIZE (0: default)")
    parser.add_argument("--light-model-threads", default=LIGHT_MODEL_THREADS,
                        help="section 1's MODEL_THREADS for siamcam (default: 1, a GPU's default)")
    parser.add_argument("--light-model", type=Path, default=None,
                        help="a folder made by bench.light_model (default: exported to a temporary folder)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="sections 2 and 4's model")
    parser.add_argument("--siamcam-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting added to every siamcam started (repeatable)")
    args = parser.parse_args()
    EXTRA_SIAMCAM_ENV.update(setting.split("=", 1) for setting in args.siamcam_env)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll
    args.connections_light = 32
    args.connections_scaling = 64
    args.connections_gpu = 64
    sections = [(args.light, light_section, [0, 1, 2, 3]), (args.default, default_section, [0, 1, 2]),
                (args.scaling, scaling_section, None), (args.gpu, gpu_section, None)]
    if not any(chosen for chosen, _, _ in sections):
        parser.error("choose one or more sections: --light, --default, --scaling, --gpu")
    print(f"python -m bench.fronts_bench {' '.join(sys.argv[1:])}\n{os.cpu_count()} cores, "
          f"{len(os.sched_getaffinity(0))} usable; {load_average()}; wrk {WRK}; commit "
          f"{_commit()}", flush=True)
    fronts_option = args.fronts
    with tempfile.TemporaryDirectory(prefix="fronts-bench-") as folder:
        request = Request.write(Path(folder))
        for chosen, section, default_fronts in sections:
            if chosen:
                args.fronts = fronts_option or default_fronts
                section(args, request, Path(folder))
    print(f"\n{load_average()} at the end")


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",")]


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


if __name__ == "__main__":
    main()
