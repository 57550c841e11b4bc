"""Proof that the deployment keeps answering while replicas die: 3 replicas behind nginx, on loopback.

    python -m deploy.proof                      # the bundled model_store/flowers, 1500 + 150 requests
    python -m deploy.proof --model-store /tmp/store --model-name tiny --similarity 200 --explain 20
    python -m deploy.proof --rate-limit         # one key's rate limit, counted in Redis, while a replica dies

It renders the compose file's nginx configuration with loopback replicas (deploy/nginx_config.py), starts
3 uvicorn replicas and nginx (deploy/local_cluster.py), checks each pair's score with a direct call, then sends
a bounded load through nginx (deploy/load.py). During the load it sends SIGTERM to one replica, with requests
of its own in flight on it, and SIGKILL to another. The proof holds when every client request got a correct
200 and the SIGTERMed replica answered what it had accepted, then exited by itself within its drain grace
period. tests/deploy/test_proof.py runs it in CI; bench/RESULTS.md records its figures. `--rate-limit` runs the
rate-limit proof instead (deploy/rate_proof.py).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.load import (
    FLOWERS_DIR,
    Outcome,
    Pair,
    check_answer,
    make_jobs,
    make_pairs,
    percentile,
    reference_scores,
    run_load,
)
from deploy.local_cluster import LocalCluster, Replica, SystemToolUnavailable, ensure_nginx
from deploy.nginx_config import REPO_ROOT
from deploy.rate_proof import RateProofReport, RateProofSettings, run_rate_proof

DEFAULT_MODEL_STORE = REPO_ROOT / "model_store"
DEFAULT_MODEL_NAME = "flowers"
REPLICAS = 3
# A drained replica still has to stop its worker and release the model after the drain itself.
EXIT_SLACK_S = 5.0
# Requests the proof sends straight to the replica it is about to SIGTERM, so that the drain has work to finish.
DIRECT_IN_FLIGHT = 4
IN_PROGRESS_METRIC = "siamcam_inference_requests_in_progress"
# Exit statuses of a clean shutdown: 0, or SIGTERM re-raised by uvicorn after it finished (Popen: -15).
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)


@dataclass(frozen=True)
class ProofSettings:
    similarity: int = 1500
    explain: int = 150
    concurrency: int = 16
    distinct_pairs: int = 12
    threads_per_replica: int = 1
    drain_grace_s: float = 20.0
    # Fractions of the load answered before each signal.
    sigterm_at: float = 0.3
    sigkill_at: float = 0.5
    model_store: Path = DEFAULT_MODEL_STORE
    model_name: str = DEFAULT_MODEL_NAME
    http_workers: int = 0  # HTTP_WORKERS of each replica: its front processes (app/container.py)
    # The replicas run with API keys and rate limits on, as deployed; the limits are generous (per key and
    # replica) so that they shape nothing here: the proof is about replicas dying, not about one client's rate.
    rate_limit_per_s: float = 500.0
    rate_limit_burst: int = 500


@dataclass
class AccessCheck:
    """Through the balancer: a request without the key is refused, one with it carries the rate-limit policy."""

    without_key_status: int | None = None
    rate_limit_policy: str | None = None
    logs_with_the_key: list[str] = field(default_factory=list)  # log files that contain the key: must be none


@dataclass
class DrainCheck:
    port: int
    after_answers: int = 0
    # Of the proof's direct requests still unanswered when SIGTERM was sent: answered correctly (they had been
    # admitted, the drain finished them), refused with 503 + Retry-After (they arrived after the signal: the
    # right answer while draining), or anything else (a problem: admitted work lost).
    in_flight_at_sigterm: int = 0
    drained: int = 0
    refused: int = 0
    problems: list[str] = field(default_factory=list)
    new_request_after_sigterm: str = ""
    new_request_refused: bool = False
    exit_code: int | None = None
    exit_after_s: float | None = None


@dataclass
class KillCheck:
    port: int
    after_answers: int = 0
    exit_code: int | None = None


@dataclass
class ProofReport:
    settings: ProofSettings
    model: str
    images: str
    outcomes: list[Outcome]
    wall_s: float
    retried_by_nginx: int
    answers_per_replica: dict[str, int]
    drain: DrainCheck
    kill: KillCheck
    access: AccessCheck

    @property
    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.problem is not None]

    def latency_ms(self, fraction: float, endpoint: str | None = None) -> float:
        latencies = [o.latency_s for o in self.outcomes if endpoint in (None, o.job.endpoint)]
        return 1000 * percentile(latencies, fraction)

    def problems(self) -> list[str]:
        """What contradicts the proof; empty when it holds."""
        found = [f"{len(self.failures)} of {len(self.outcomes)} client requests failed, e.g. "
                 f"{self.failures[0].job.endpoint}: {self.failures[0].problem}"] if self.failures else []
        expected = self.settings.similarity + self.settings.explain
        if len(self.outcomes) != expected:
            found.append(f"{len(self.outcomes)} requests were sent, expected {expected}")
        drain, limit = self.drain, self.settings.drain_grace_s + EXIT_SLACK_S
        if drain.drained == 0:
            found.append("no request in flight at SIGTERM was answered by the draining replica: the drain was not "
                         "exercised")
        if drain.problems:
            found.append(f"the SIGTERMed replica lost work it had accepted: {drain.problems[0]}")
        if not drain.new_request_refused:
            found.append(f"the SIGTERMed replica answered a new request with {drain.new_request_after_sigterm}, "
                         "not 503 + Retry-After or a refused connection")
        if drain.exit_code is None:
            found.append(f"the SIGTERMed replica did not exit within {limit:.0f} s")
        elif drain.exit_code not in CLEAN_EXIT_CODES:
            found.append(f"the SIGTERMed replica exited with {drain.exit_code}, not cleanly (0 or SIGTERM)")
        if self.access.without_key_status != 401:
            found.append(f"a request without the API key got {self.access.without_key_status}, not 401: keys are off")
        if self.access.logs_with_the_key:
            found.append(f"the API key was written to {', '.join(self.access.logs_with_the_key)}")
        if not self.access.rate_limit_policy:
            found.append("answers carry no RateLimit-Policy: the replicas' rate limits are off")
        if self.kill.exit_code != -signal.SIGKILL:
            found.append(f"the SIGKILLed replica's exit status is {self.kill.exit_code}, expected -9")
        return found

    def summary(self) -> str:
        s = self.settings
        sent = len(self.outcomes)
        drain, kill = self.drain, self.kill
        exit_text = (f"exited by itself {drain.exit_after_s:.1f} s after SIGTERM with status {drain.exit_code}"
                     if drain.exit_code is not None else "did NOT exit")
        lines = [
            f"deployment proof: {REPLICAS} replicas ({s.threads_per_replica} torch thread each) behind nginx, "
            f"model {self.model}",
            f"load: {s.similarity} /similarity + {s.explain} /explain, {s.concurrency} concurrent, "
            f"{s.distinct_pairs} distinct pairs of {self.images}",
            f"access: API keys on (without the key: {self.access.without_key_status}); rate limit per key and "
            f"replica: RateLimit-Policy {self.access.rate_limit_policy}; nginx limits per address as in compose",
            f"sent {sent}, answered {sent - len(self.failures)} (correct 200), failed {len(self.failures)}",
            "latency ms: " + "; ".join(
                f"{endpoint or 'all'} p50 {self.latency_ms(0.5, endpoint):.0f} "
                f"p99 {self.latency_ms(0.99, endpoint):.0f}" for endpoint in (None, "/similarity", "/explain")),
            f"wall {self.wall_s:.1f} s ({sent / self.wall_s:.1f} requests/s); nginx sent {self.retried_by_nginx} "
            f"requests on to another replica; final answers per replica: "
            + ", ".join(f"{address} {count}" for address, count in sorted(self.answers_per_replica.items())),
            f"SIGTERM to replica :{drain.port} after {drain.after_answers} answers: {drain.in_flight_at_sigterm} of "
            f"{DIRECT_IN_FLIGHT} direct /explain in flight, {drain.drained} answered correctly by the draining "
            f"replica, {drain.refused} refused with 503 (sent too late to be admitted); "
            f"new request after SIGTERM: {drain.new_request_after_sigterm}; {exit_text} "
            f"(limit {s.drain_grace_s + EXIT_SLACK_S:.0f} s = DRAIN_GRACE_S {s.drain_grace_s:.0f} "
            f"+ {EXIT_SLACK_S:.0f})",
            f"SIGKILL to replica :{kill.port} after {kill.after_answers} answers: exit status {kill.exit_code}",
        ]
        failures = self.failures[:5]
        lines += [f"  failed: {o.job.endpoint} pair {o.job.pair_index}: {o.problem}" for o in failures]
        problems = self.problems()
        lines.append("PROOF HOLDS" if not problems else "PROOF FAILED: " + "; ".join(problems))
        return "\n".join(lines)


def _is_draining_refusal(response: httpx.Response) -> bool:
    return response.status_code == 503 and "retry-after" in response.headers


def _wait_exit(process: subprocess.Popen, since: float, timeout_s: float) -> tuple[int | None, float | None]:
    try:
        code = process.wait(timeout=max(0.0, since + timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None, None
    return code, time.monotonic() - since


async def _until_admitted(replica: httpx.AsyncClient, count: int, timeout_s: float = 5.0) -> None:
    """Wait until the replica has admitted at least `count` /explain requests not yet answered (or `timeout_s`):
    on a busy machine its event loop may take a while to read requests that were sent at once. Counted for
    /explain alone: the load keeps several /similarity requests in progress on every replica, which made a wait
    on all of them end before the direct requests were admitted (a run where all four were refused)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exposition = (await replica.get("/metrics")).text
        for line in exposition.splitlines():
            if line.startswith(f'{IN_PROGRESS_METRIC}{{route="/explain"}} ') and float(line.split()[1]) >= count:
                return
        await asyncio.sleep(0.01)


async def _terminate_while_busy(replica: Replica, pairs: list[Pair], expected: list[float],
                                settings: ProofSettings, check: DrainCheck, headers: dict[str, str]) -> None:
    """SIGTERM `replica` while /explain requests sent straight to it are in flight; record how it drains."""
    async with httpx.AsyncClient(base_url=replica.url, headers=headers, trust_env=False, timeout=120.0) as direct:
        in_flight = [asyncio.create_task(direct.post("/explain", files=pairs[i % len(pairs)].files()))
                     for i in range(DIRECT_IN_FLIGHT)]
        await _until_admitted(direct, DIRECT_IN_FLIGHT)
        unanswered = [not task.done() for task in in_flight]
        check.in_flight_at_sigterm = sum(unanswered)
        sent_at = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)  # let the replica handle the signal
        try:
            late = await direct.post("/similarity", files=pairs[0].files())
            check.new_request_after_sigterm = f"{late.status_code} (Retry-After: {late.headers.get('retry-after')})"
            check.new_request_refused = _is_draining_refusal(late)
        except httpx.TransportError as error:
            check.new_request_after_sigterm = f"connection refused or closed ({type(error).__name__})"
            check.new_request_refused = True
        for index, (task, was_in_flight) in enumerate(zip(in_flight, unanswered)):
            try:
                response = await task
            except httpx.HTTPError as error:
                check.problems.append(f"{type(error).__name__}: {error}")
                continue
            if _is_draining_refusal(response):
                check.refused += 1
            elif (problem := check_answer("/explain", response, expected[index % len(pairs)])) is not None:
                check.problems.append(problem)
            elif was_in_flight:
                check.drained += 1
    check.exit_code, check.exit_after_s = await asyncio.to_thread(
        _wait_exit, replica.process, sent_at, settings.drain_grace_s + EXIT_SLACK_S)


def _nginx_upstreams(access_log: Path) -> tuple[int, Counter[str]]:
    """From nginx's access log: requests tried on more than one replica, and which replica gave each answer."""
    retried, final = 0, Counter()
    for line in access_log.read_text(errors="replace").splitlines():
        if " upstream=" not in line or "/lb/healthz" in line:
            continue
        tried = line.split(" upstream=", 1)[1].split(" upstream_status=", 1)[0].split(", ")
        retried += len(tried) > 1
        final[tried[-1]] += 1
    return retried, final


def _check_access(lb_url: str, pair: Pair, headers: dict[str, str]) -> AccessCheck:
    with httpx.Client(base_url=lb_url, trust_env=False, timeout=60.0) as client:
        without_key = client.post("/similarity", files=pair.files())
        with_key = client.post("/similarity", files=pair.files(), headers=headers)
    return AccessCheck(without_key.status_code, with_key.headers.get("ratelimit-policy"))


async def _drive(cluster: LocalCluster, pairs: list[Pair], expected: list[float],
                 settings: ProofSettings, headers: dict[str, str]) -> ProofReport:
    jobs = make_jobs(settings.similarity, settings.explain, len(pairs))
    terminated, killed = cluster.replicas[0], cluster.replicas[1]
    drain, kill = DrainCheck(terminated.port), KillCheck(killed.port)
    access = await asyncio.to_thread(_check_access, cluster.lb_url, pairs[0], headers)
    background: list[asyncio.Task] = []

    async def on_progress(done: int) -> None:
        if not background and done >= settings.sigterm_at * len(jobs):
            drain.after_answers = done
            background.append(asyncio.create_task(_terminate_while_busy(terminated, pairs, expected, settings, drain,
                                                                            headers)))
        if kill.after_answers == 0 and done >= settings.sigkill_at * len(jobs):
            kill.after_answers = done
            killed.process.send_signal(signal.SIGKILL)

    started = time.perf_counter()
    outcomes = await run_load(cluster.lb_url, jobs, pairs, expected, settings.concurrency, on_progress, headers)
    wall_s = time.perf_counter() - started
    await asyncio.gather(*background)
    kill.exit_code = killed.process.wait(timeout=10)
    retried, per_replica = _nginx_upstreams(cluster.access_log)
    with httpx.Client(headers=headers, trust_env=False) as client:
        model = client.get(f"{cluster.replicas[2].url}/model").json()
    return ProofReport(
        settings=settings, model=f"{model['name']} {model['version']}",
        images="flowers photos" if FLOWERS_DIR.is_dir() else "synthetic Pillow pictures",
        outcomes=outcomes, wall_s=wall_s, retried_by_nginx=retried, answers_per_replica=dict(per_replica),
        drain=drain, kill=kill, access=access,
    )


def run_proof(settings: ProofSettings) -> ProofReport:
    """Start the local deployment, run the load with the two replica deaths, stop everything, report.

    Raises local_cluster.NginxUnavailable when nginx cannot be had. The work folder (logs, rendered config)
    is removed when the proof holds and kept, with its path printed, when it does not.
    """
    manifest = settings.model_store / settings.model_name / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no model at {manifest.parent}: pass --model-store/--model-name, or train the "
                                "default model with `python -m training train`")
    # A fresh key per run, known only to this process and its replicas.
    api_key = secrets.token_urlsafe(32)
    headers = {"Authorization": f"Bearer {api_key}"}
    app_env = {
        "HTTP_WORKERS": str(settings.http_workers),
        "DRAIN_GRACE_S": str(settings.drain_grace_s),
        "API_KEYS": api_key,
        "RATE_LIMIT_PER_S": str(settings.rate_limit_per_s),
        "RATE_LIMIT_BURST": str(settings.rate_limit_burst),
    }
    cluster = LocalCluster(ensure_nginx(), settings.model_store, settings.model_name, replica_count=REPLICAS,
                           threads_per_replica=settings.threads_per_replica, app_env=app_env)
    report: ProofReport | None = None
    try:
        with cluster:
            pairs = make_pairs(settings.distinct_pairs)
            expected = reference_scores(cluster.replicas[0].url, pairs, headers)
            report = asyncio.run(_drive(cluster, pairs, expected, settings, headers))
        # The processes are stopped: every log line is in the files.
        report.access.logs_with_the_key = [path.name for path in sorted(cluster.workdir.glob("*.log"))
                                           if api_key in path.read_text(errors="replace")]
    finally:
        if report is not None and not report.problems():
            shutil.rmtree(cluster.workdir, ignore_errors=True)
        else:
            print(f"logs and rendered config kept in {cluster.workdir}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    defaults = ProofSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--similarity", type=int, default=defaults.similarity, help="/similarity requests")
    parser.add_argument("--explain", type=int, default=defaults.explain, help="/explain requests")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight at once")
    parser.add_argument("--threads", type=int, default=defaults.threads_per_replica, help="torch threads per replica")
    parser.add_argument("--drain-grace", type=float, default=defaults.drain_grace_s, help="DRAIN_GRACE_S, seconds")
    parser.add_argument("--http-workers", type=int, default=defaults.http_workers,
                        help="HTTP_WORKERS: front processes per replica (0: one process)")
    parser.add_argument("--model-store", type=Path, default=defaults.model_store)
    parser.add_argument("--model-name", default=defaults.model_name)
    rate_defaults = RateProofSettings()
    rate = parser.add_argument_group("the rate-limit proof (deploy/rate_proof.py)")
    rate.add_argument("--rate-limit", action="store_true", help="run the rate-limit proof instead")
    rate.add_argument("--rate", type=int, default=rate_defaults.rate_per_s, help="the key's limit, requests/s")
    rate.add_argument("--phase", type=float, default=rate_defaults.phase_s, help="seconds before and after the kill")
    rate.add_argument("--storage", choices=("redis", "memory"), default=rate_defaults.storage,
                      help="where the replicas count: one Redis, or each its own memory (the contrast)")
    args = parser.parse_args(argv)
    model = {"threads_per_replica": args.threads, "model_store": args.model_store.resolve(),
             "model_name": args.model_name}
    try:
        if args.rate_limit:
            report: ProofReport | RateProofReport = run_rate_proof(
                RateProofSettings(rate_per_s=args.rate, phase_s=args.phase, storage=args.storage, **model))
        else:
            report = run_proof(ProofSettings(similarity=args.similarity, explain=args.explain,
                                             concurrency=args.concurrency, drain_grace_s=args.drain_grace,
                                             http_workers=args.http_workers, **model))
    except (FileNotFoundError, SystemToolUnavailable) as error:
        print(f"cannot run the proof: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if not report.problems() else 1


if __name__ == "__main__":
    sys.exit(main())
