"""What the service does for the model's own speed, each step measured in a fresh process on the same inputs.

Run from the repository root: `.venv/bin/python -m bench.model_runtime`. For the default model, the median time
of one `forward` of a batch of 1 and of 8 pairs (random inputs, after warm-up runs), under four set-ups, each
adding one thing to the one before:
- `as loaded`: `contract.torchscript.load_torchscript`, glibc's default malloc settings, the main thread;
- `memory kept`: `contract.memory.keep_freed_memory_for_reuse()` first (no mapping per large block, no trimming);
- `frozen`: also `contract.torchscript.optimized_for_inference` (what the service serves);
- `second team`: the same, after another thread ran one parallel torch operator, as the service's image
  threads would without app/torch_threads.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from bench.fresh_process import last_line_of
from contract.manifest import MODEL_FILE, read_manifest
from contract.memory import keep_freed_memory_for_reuse
from contract.torchscript import load_torchscript, optimized_for_inference
from deploy.nginx_config import REPO_ROOT

MODEL_DIR = REPO_ROOT / "model_store" / "flowers"
SETUPS: tuple[str, ...] = ("as loaded", "memory kept", "frozen", "second team")
BATCHES: tuple[int, ...] = (1, 8)
RUNS = 15


def measure(setup: str) -> dict[int, float]:
    """Median ms of a forward pass per batch size, in this process, under `setup`."""
    step = SETUPS.index(setup)
    if step >= 1:
        keep_freed_memory_for_reuse()
    manifest = read_manifest(MODEL_DIR)
    module = load_torchscript(MODEL_DIR / MODEL_FILE, manifest.format_version)
    if step >= 2:
        module = optimized_for_inference(module, manifest.format_version, torch.device("cpu"))
    if step >= 3:
        # a thread that stays alive, like the service's image threads (a thread's team ends with it)
        other = ThreadPoolExecutor(max_workers=1)
        other.submit(lambda: torch.rand(8, 3, 224, 224).mul(2).sum()).result()
    medians = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in BATCHES:
            x1, x2 = (torch.randn(batch, 3, *manifest.input_size, generator=generator) for _ in range(2))
            for _ in range(3):
                module(x1, x2)
            times = []
            for _ in range(RUNS):
                started = time.perf_counter()
                module(x1, x2)
                times.append(time.perf_counter() - started)
            medians[batch] = 1000 * statistics.median(times)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=SETUPS, help="measure one set-up in this process and print JSON")
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(measure(args.setup)))
        return
    print(f"model {MODEL_DIR.name}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"median of {RUNS} forward passes, ms")
    print(f"{'set-up':<12} " + " ".join(f"{f'batch {batch}':>9}" for batch in BATCHES))
    for setup in SETUPS:
        medians = json.loads(last_line_of("bench.model_runtime", setup))
        print(f"{setup:<12} " + " ".join(f"{medians[str(batch)]:>9.1f}" for batch in BATCHES))


if __name__ == "__main__":
    main()
