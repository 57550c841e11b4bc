"""Cost of exact contributions: model work per batch of `/explain?method=contributions` against `/similarity`'s.

Run from the repository root: `.venv/bin/python -m bench.contributions_bench [--model model_store/flowers]`.
It times the service's own batch runners (app/model.py) on the same pairs in one run, batch 1 and 8:
`score_pairs` (what a /similarity batch runs), `explain_pairs(..., "contributions")` and, for reference,
`explain_pairs(..., "gradcam")`, and `decide` alone (the backbone on both images in one pass, then the
scores: the part every explainer shares) and the decomposition alone (`contributions.explain` on feature maps
already computed, and the split into per-pair results: what contributions add to a backbone pass). Their calls
alternate (one of each, again and again), so that load from other jobs on the machine falls on all of them
alike; the ratios reported are those of the median and of the fastest call (the latter the least disturbed by
other jobs).

A format-version-1 model (such as the default `flowers` 1.0.0) cannot compute contributions; its weights are
then re-exported as version 2 into a temporary folder (training/export.py, with all its checks) and timed
there. The model store is not touched. Issue 12's target: contributions add at most 10 % to /similarity's
model work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from app.model import ServedModel, explain_pairs, load_model, score_pairs
from bench.service_bench import MODEL_NAME, MODEL_STORE, load_pairs, model_inputs, model_pictures
from contract.explainers import Decided, contributions, decide
from contract.explainers.contributions import PairContributions
from deploy.load import FLOWERS_DIR
from training.export import export_model
from training.model import build_siamese

BATCH_SIZES = (1, 8)
PAIR_COUNT = 8
CALLS = 60  # timed calls of each runner per batch size
WARMUP_CALLS = 10  # TorchScript's profiling executor optimises during its first calls of each shape
TARGET_EXTRA = 0.10


def as_version_2(served: ServedModel, folder: Path) -> ServedModel:
    """The served model's own weights, exported at format version 2 into `folder`."""
    manifest = served.manifest
    eager = build_siamese(manifest.backbone, manifest.embedding_dim)
    eager.load_state_dict(served.module.state_dict())
    keep = manifest.model_dump(exclude={"format_version", "created_at", "embedding_dim", "feature_map",
                                        "torch_version", "torchvision_version", "sha256"})
    export_model(eager, folder, keep)
    return load_model(folder, "cpu")


def decompose(served: ServedModel, decided: Decided) -> list[PairContributions]:
    """The work contributions add to a batch whose feature maps and scores are known."""
    assert served.threshold_raw_logit is not None
    found = contributions.explain(served.module, decided.feature_maps1, decided.feature_maps2, decided.similar,
                                  served.threshold_raw_logit, served.input_size)
    return [found.pair(index) for index in range(len(decided.scores))]


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_STORE / MODEL_NAME, help="model folder")
    args = parser.parse_args()
    served = load_model(args.model, "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        note = ""
        if "contributions" not in served.methods:
            served = as_version_2(served, Path(scratch) / served.manifest.name)
            note = ", re-exported as format version 2 in a temporary folder"
        pairs = load_pairs(PAIR_COUNT)
        pictures1, pictures2 = pictures = model_pictures(served, pairs)
        x1, x2 = model_inputs(served, pictures)
        images = "flowers JPEG files" if FLOWERS_DIR.is_dir() else "Pillow drawings (JPEG + PNG)"
        print(f"model {served.manifest.name} {served.manifest.version} ({served.manifest.backbone}, "
              f"{served.input_size[0]}x{served.input_size[1]}, grid {served.manifest.feature_map.height}x"
              f"{served.manifest.feature_map.width}{note}), torch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, {PAIR_COUNT} pairs of {images}, {CALLS} calls each")
        ratios: dict[str, float] = {}
        added: dict[str, float] = {}  # the decomposition's time as a fraction of /similarity's
        for batch in BATCH_SIZES:
            first, second = list(pictures1[:batch]), list(pictures2[:batch])
            decided = decide(served.module, x1[:batch], x2[:batch], served.threshold)
            runners: dict[str, Callable[[], object]] = {
                "score_pairs": lambda: score_pairs(served, first, second),
                "contributions": lambda: explain_pairs(served, first, second, "contributions"),
                "gradcam": lambda: explain_pairs(served, first, second, "gradcam"),
                "decide": lambda: decide(served.module, x1[:batch], x2[:batch], served.threshold),
                "decomposition": lambda: decompose(served, decided),
            }
            for work in runners.values():
                for _ in range(WARMUP_CALLS):
                    work()
            times: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(CALLS):
                for name, work in runners.items():
                    times[name].append(seconds(work))
            for statistic, summarise in (("median", statistics.median), ("fastest", min)):
                summary = {name: summarise(values) for name, values in times.items()}
                ratios[f"batch {batch}, {statistic} call"] = summary["contributions"] / summary["score_pairs"]
                added[f"batch {batch}, {statistic} call"] = summary["decomposition"] / summary["score_pairs"]
                print(f"batch {batch}, {statistic} call, ms per batch: "
                      + ", ".join(f"{name} {1000 * value:.1f}" for name, value in summary.items()))
    print(f"\n{'target':<66} {'measured':>9} {'goal':>8}  result")
    for label, ratio in ratios.items():
        met = "met" if ratio <= 1 + TARGET_EXTRA else "NOT MET"
        print(f"{f'contributions vs /similarity model work, {label}':<66} {ratio:>8.3f}x "
              f"{f'<= {1 + TARGET_EXTRA:.2f}x':>8}  {met}")
    for label, fraction in added.items():
        met = "met" if fraction <= TARGET_EXTRA else "NOT MET"
        print(f"{f'decomposition alone / /similarity model work, {label}':<66} {fraction:>8.3f}  "
              f"{f'<= {TARGET_EXTRA:.2f}':>8}  {met}")


if __name__ == "__main__":
    main()
