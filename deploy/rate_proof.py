"""The rate-limit proof (`python -m deploy.proof --rate-limit`): one key's limit holds for the whole deployment.

3 uvicorn replicas behind the compose nginx configuration on loopback, as in deploy/proof.py, counting their rate
limits in one redis-server (RATE_LIMIT_STORAGE, as compose wires it). One API key is limited to R requests/s
(RATE_LIMIT_PER_S = RATE_LIMIT_BURST = R: a one-second window); one client sends it /similarity at 3R, whatever
the answers, for two phases, and one replica is SIGKILLed between them. The proof holds when the key's accepted
rate is within 15 % of R in both phases (so neither the number of replicas nor a death changes it), every
refusal is a 429 with Retry-After, every 200 is correct, and nothing else came back.

With `--storage memory` each replica counts alone, as before Redis: the same run then accepts about 3R, and 2R
after the kill, and the proof fails (bench/RESULTS.md shows both).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from deploy.load import FLOWERS_DIR, PacedOutcome, make_pairs, percentile, reference_scores, run_paced
from deploy.local_cluster import LocalCluster, RedisServer, ensure_nginx, ensure_redis_server
from deploy.nginx_config import REPO_ROOT

REPLICAS = 3
TOLERANCE = 0.15


@dataclass(frozen=True)
class RateProofSettings:
    rate_per_s: int = 10  # R
    drive_factor: float = 3.0
    # Before the kill, and after it. Over a phase, where the windows fall moves the count by up to one window's
    # worth (R): 1/15 of 15 s phases, well inside the tolerance.
    phase_s: float = 15.0
    storage: str = "redis"  # or "memory"
    distinct_pairs: int = 6
    threads_per_replica: int = 1
    model_store: Path = REPO_ROOT / "model_store"
    model_name: str = "flowers"


@dataclass
class RateProofReport:
    settings: RateProofSettings
    outcomes: list[PacedOutcome]
    killed_port: int
    killed_exit_code: int | None
    images: str

    def accepted_per_s(self, start_s: float, end_s: float) -> float:
        accepted = sum(o.status == 200 for o in self.outcomes if start_s <= o.sent_at_s < end_s)
        return accepted / (end_s - start_s)

    @property
    def before_per_s(self) -> float:
        return self.accepted_per_s(0.0, self.settings.phase_s)

    @property
    def after_per_s(self) -> float:
        return self.accepted_per_s(self.settings.phase_s, 2 * self.settings.phase_s)

    def latency_ms(self, fraction: float) -> float:
        return 1000 * percentile([o.answered_at_s - o.sent_at_s for o in self.outcomes], fraction)

    def count(self, status: int | None, app_fields: bool | None = None) -> int:
        return sum(o.status == status and app_fields in (None, o.rate_limit_fields) for o in self.outcomes)

    def problems(self) -> list[str]:
        rate = self.settings.rate_per_s
        found = []
        for phase, accepted in (("before", self.before_per_s), ("after", self.after_per_s)):
            if abs(accepted - rate) > TOLERANCE * rate:
                found.append(f"{phase} the kill the key got {accepted:.1f} requests/s accepted, not {rate} "
                             f"(+-{TOLERANCE:.0%})")
        wrong = [o for o in self.outcomes if o.problem is not None]
        if wrong:
            found.append(f"{len(wrong)} answers were neither a correct 200 nor a 429 with Retry-After, e.g. "
                         f"{wrong[0].problem}")
        if self.killed_exit_code != -signal.SIGKILL:
            found.append(f"the SIGKILLed replica's exit status is {self.killed_exit_code}, expected -9")
        return found

    def summary(self) -> str:
        s = self.settings
        sent = len(self.outcomes)
        lines = [
            f"rate-limit proof: {REPLICAS} replicas behind nginx, limits counted in "
            f"{'one redis-server' if s.storage == 'redis' else 'the memory of each replica'}; one key limited to "
            f"{s.rate_per_s} requests/s (burst {s.rate_per_s}, 1 s window), /similarity sent at "
            f"{s.rate_per_s * s.drive_factor:g}/s from one client for 2 x {s.phase_s:g} s ({self.images}); "
            f"SIGKILL to replica :{self.killed_port} at {s.phase_s:g} s (exit status {self.killed_exit_code})",
            f"accepted: {self.before_per_s:.1f}/s before the kill, {self.after_per_s:.1f}/s after "
            f"(limit {s.rate_per_s}/s, +-{TOLERANCE:.0%})",
            f"sent {sent} (the last answered {max(o.answered_at_s for o in self.outcomes):.1f} s after the start; "
            f"answer latency p50 {self.latency_ms(0.5):.0f} ms, p99 {self.latency_ms(0.99):.0f} ms): "
            f"{self.count(200)} correct 200, {self.count(429, True)} 429 from the app, "
            f"{self.count(429, False)} 429 from nginx, "
            f"{sum(o.problem is not None for o in self.outcomes)} anything else",
        ]
        problems = self.problems()
        lines.append("PROOF HOLDS" if not problems else "PROOF FAILED: " + "; ".join(problems))
        return "\n".join(lines)


def run_rate_proof(settings: RateProofSettings) -> RateProofReport:
    """Start Redis (unless `storage` is memory), the replicas and nginx, drive the key, kill a replica, report.

    Raises local_cluster.SystemToolUnavailable when nginx or redis-server cannot be had; logs are kept, with
    their folder printed, when the proof does not hold.
    """
    manifest = settings.model_store / settings.model_name / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no model at {manifest.parent}: pass --model-store/--model-name")
    nginx = ensure_nginx()
    workdir = Path(tempfile.mkdtemp(prefix="siamcam-rate-proof-"))
    redis = RedisServer(ensure_redis_server(), workdir) if settings.storage == "redis" else None
    # The proof's key, and one for the direct reference calls, so that those do not count against it.
    limited_key, reference_key = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    rate = str(settings.rate_per_s)
    app_env = {"API_KEYS": f"{limited_key},{reference_key}", "RATE_LIMIT_PER_S": rate, "RATE_LIMIT_BURST": rate,
               "RATE_LIMIT_STORAGE": redis.url if redis else "memory://"}
    cluster = LocalCluster(nginx, settings.model_store, settings.model_name, replica_count=REPLICAS,
                           threads_per_replica=settings.threads_per_replica, app_env=app_env, workdir=workdir)
    report: RateProofReport | None = None
    try:
        if redis is not None:
            redis.start()
        with cluster:
            pairs = make_pairs(settings.distinct_pairs)
            expected = reference_scores(cluster.replicas[0].url, pairs,
                                        {"Authorization": f"Bearer {reference_key}"})
            killed = cluster.replicas[1]
            outcomes = asyncio.run(run_paced(
                cluster.lb_url, pairs, expected, settings.rate_per_s * settings.drive_factor, 2 * settings.phase_s,
                {"Authorization": f"Bearer {limited_key}"},
                events=[(settings.phase_s, lambda: killed.process.send_signal(signal.SIGKILL))],
            ))
            report = RateProofReport(settings, outcomes, killed.port, killed.process.wait(timeout=10),
                                     "flowers photos" if FLOWERS_DIR.is_dir() else "synthetic Pillow pictures")
    finally:
        if redis is not None:
            redis.stop()
        if report is not None and not report.problems():
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs and rendered config kept in {workdir}", file=sys.stderr)
    return report
