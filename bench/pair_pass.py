"""Both sides of a pair batch in one backbone pass (contract/pairs.py) against the model's `forward` (two passes).

Run from the repository root: `.venv/bin/python -m bench.pair_pass [--model DIR]`. The model is loaded as the
service serves it (`optimized_for_inference`, freed memory kept for reuse); for each batch size, the two ways of
scoring the same random batch are called in turn (which goes first alternates), and the medians are compared:
interleaving puts a change in the machine's load on both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from bench.service_bench import served_model_option
from contract.manifest import MODEL_FILE, read_manifest
from contract.memory import keep_freed_memory_for_reuse
from contract.pairs import pair_scores
from contract.torchscript import load_torchscript, optimized_for_inference

BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
IMAGES_PER_BATCH_SIZE = 240  # calls per way and batch size: 240 / batch
WARMUP_CALLS = 5


def main() -> None:
    model_dir = served_model_option(__doc__.splitlines()[0])
    keep_freed_memory_for_reuse()
    manifest = read_manifest(model_dir)
    module = optimized_for_inference(load_torchscript(model_dir / MODEL_FILE, manifest.format_version),
                                     manifest.format_version, torch.device("cpu"))
    ways: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "forward": module, "one pass": lambda x1, x2: pair_scores(module, x1, x2)}
    print(f"model {model_dir.name} ({manifest.backbone}, {manifest.input_size[0]}x{manifest.input_size[1]}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, CPU, medians of interleaved calls")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in BATCHES:
            x1, x2 = (torch.randn(batch, 3, *manifest.input_size, generator=generator) for _ in range(2))
            if not torch.allclose(module(x1, x2), pair_scores(module, x1, x2), atol=1e-5):
                raise RuntimeError("one pass does not give forward's scores")
            for _ in range(WARMUP_CALLS):
                for way in ways.values():
                    way(x1, x2)
            seconds: dict[str, list[float]] = {name: [] for name in ways}
            for call in range(IMAGES_PER_BATCH_SIZE // batch):
                for name in (list(ways) if call % 2 == 0 else list(ways)[::-1]):
                    started = time.perf_counter()
                    ways[name](x1, x2)
                    seconds[name].append(time.perf_counter() - started)
            two, one = (1000 * statistics.median(seconds[name]) for name in ways)
            print(f"batch {batch:>2}: forward {two:6.1f} ms, one pass {one:6.1f} ms, ratio {one / two:.2f} "
                  f"({len(seconds['forward'])} calls each)")


if __name__ == "__main__":
    main()
