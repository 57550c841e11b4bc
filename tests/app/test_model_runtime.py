"""How the service runs its model: frozen for serving (same scores as the file), on the one thread that runs torch
with several threads (app/torch_threads.py), and fed from pinned memory on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.model import host_batch, load_model, score_pairs
from app.torch_threads import model_threads_on
from contract.torchscript import load_torchscript
from tests.app.conftest import TEST_MODEL_NAME

REPO = Path(__file__).resolve().parents[2]


def test_the_served_model_is_frozen_and_scores_as_its_file(model_store: Path) -> None:
    served = load_model(model_store / TEST_MODEL_NAME, "cpu")
    as_in_its_file = load_torchscript(served.path, served.manifest.format_version)
    assert list(served.module.parameters()) == [], "the weights should be constants of the frozen module"
    assert list(as_in_its_file.parameters()), "the file itself holds parameters"
    generator = torch.Generator().manual_seed(0)
    x1, x2 = (torch.randn(4, 3, *served.input_size, generator=generator) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(served.module(x1, x2), as_in_its_file(x1, x2), rtol=0, atol=1e-5)
        features = served.module.features(x1)
        torch.testing.assert_close(features, as_in_its_file.features(x1), rtol=0, atol=1e-4)
    # the explainers differentiate the score by the feature maps: that still works on the frozen module
    features = features.clone().requires_grad_()
    embeddings = served.module.embed(features)
    served.module.similarity(embeddings, embeddings.detach()).sum().backward()
    assert features.grad is not None and bool(torch.isfinite(features.grad).all())
    assert float(features.grad.abs().max()) > 0


# Run in a process of its own, whose torch is told to use 2 threads before app.torch_threads reads its choice: the
# result is the same on a machine of any size (on one CPU torch's own choice is 1, and every pool would pass), and
# no thread of this test process has made OpenMP teams already. Each pool's threads are started (and counted)
# first; then each runs an operator torch parallelises, and the OS threads that appear are the OpenMP team it made.
# The plain pool goes first: a thread started after another one set torch's threads takes that count.
_COUNT_OPENMP_TEAMS = """
import json, os, threading
from concurrent.futures import ThreadPoolExecutor
import torch
torch.set_num_threads(2)
from app.torch_threads import model_thread_executor, single_threaded_pool

def os_threads():
    return len(os.listdir("/proc/self/task"))

def parallel_work():
    x = torch.rand(4_000_000)
    (x * 2 + 1).sum()
    return torch.get_num_threads()

found = {}
for name, pool, workers in (("plain", ThreadPoolExecutor(2), 2), ("model", model_thread_executor(), 1),
                            ("images", single_threaded_pool(2, "images"), 2)):
    started = threading.Barrier(workers)
    list(pool.map(lambda _: started.wait(), range(workers)))  # every worker thread exists
    before = os_threads()
    counts = [future.result() for future in [pool.submit(parallel_work) for _ in range(4)]]
    found[name] = {"torch_threads": sorted(set(counts)), "openmp_threads_added": os_threads() - before}
print(json.dumps(found))
"""


def test_only_the_model_thread_runs_torch_on_several_threads() -> None:
    """Catches image threads (or an event loop) that run torch's operators on OpenMP teams of their own, which
    doubled a pair's model time (app/torch_threads.py), and a model thread that runs them alone. It counts the
    threads OpenMP actually starts, not a setting; a plain thread pool is measured beside ours to show that the
    count sees a team."""
    result = subprocess.run([sys.executable, "-c", _COUNT_OPENMP_TEAMS], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=120)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["model"] == {"torch_threads": [2], "openmp_threads_added": 1}, found  # a team of 2: itself + 1
    assert found["images"] == {"torch_threads": [1], "openmp_threads_added": 0}, found
    assert found["plain"]["openmp_threads_added"] > 0, found  # the measurement can see a team being made


def _distinct_pictures(count: int, size: tuple[int, int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return list(torch.randint(0, 256, (count, 3, *size), dtype=torch.uint8, generator=generator))


def test_a_batch_for_the_cpu_is_the_plain_stack_in_ordinary_memory() -> None:
    """On the CPU nothing is pinned (pinning needs a CUDA driver, and a CPU model gains nothing from it)."""
    pictures = _distinct_pictures(3, (8, 8))
    batch = host_batch(pictures, torch.device("cpu"))
    assert torch.equal(batch, torch.stack(pictures)) and batch.dtype == torch.uint8
    assert batch.device.type == "cpu" and not batch.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: pinned memory serves copies to a GPU")
def test_a_batch_for_a_gpu_is_pinned_and_batches_copied_back_to_back_score_their_own_pictures(
    model_store: Path,
) -> None:
    """A pinned buffer reused, or a result read, before its copy had finished would score another batch's pictures:
    many small batches in a row must each score as their pairs do one at a time, after a full synchronisation."""
    served = load_model(model_store / TEST_MODEL_NAME, "cuda")
    pictures = _distinct_pictures(64, served.input_size)
    batch = host_batch(pictures[:4], served.device)
    assert batch.is_pinned() and torch.equal(batch, torch.stack(pictures[:4]))
    back_to_back = [score for start in range(0, 32, 4)
                    for score in score_pairs(served, pictures[start:start + 4], pictures[32 + start:36 + start])]
    one_at_a_time = []
    for index in range(32):
        torch.cuda.synchronize()
        one_at_a_time += score_pairs(served, [pictures[index]], [pictures[32 + index]])
    torch.testing.assert_close(torch.tensor(back_to_back), torch.tensor(one_at_a_time), rtol=0, atol=1e-5)


# Run in a process of its own: a thread keeps the malloc arena it took at its first allocation, and this test process
# has started many threads already. Each batch allocates, writes and frees one block of 96 MB with glibc's malloc,
# more than a heap of a thread's own arena holds (64 MB), as the compiled backbone's largest activation at 8 pairs
# (77 MB) is; the page faults of the process during two batches after a first one are counted. A thread started,
# and allocating, before the memory policy was set is measured beside the model thread, to show that the count sees
# a block mapped again.
_COUNT_PAGE_FAULTS = """
import ctypes, json
from concurrent.futures import ThreadPoolExecutor

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
BLOCK = 96 * 2**20

def page_faults():
    stat = open("/proc/self/stat").read()
    return int(stat[stat.rfind(")") + 2:].split()[7])  # minflt

def batch():
    block = libc.malloc(BLOCK)
    libc.memset(block, 1, BLOCK)
    libc.free(block)

def batches():
    batch()
    before = page_faults()
    batch()
    batch()
    return page_faults() - before

early = ThreadPoolExecutor(1)
early.submit(list).result()  # started, and allocated, before the service's memory policy: an arena of its own
from app.torch_threads import model_thread_executor
found = {"early": early.submit(batches).result(), "model": model_thread_executor().submit(batches).result()}
print(json.dumps(found))
"""


def test_the_model_thread_keeps_the_memory_a_batch_frees() -> None:
    """Catches a model thread whose batches fault their largest blocks in again (an arena of its own, where glibc
    maps and unmaps every block over 64 MB whatever mallopt says): that cost the compiled backbone its whole gain
    under load (contract/memory.py)."""
    result = subprocess.run([sys.executable, "-c", _COUNT_PAGE_FAULTS], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=120)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    pages_per_batch = 96 * 2**20 // 4096
    assert found["early"] >= 2 * pages_per_batch * 0.9, found  # mapped and faulted in again at each batch
    assert found["model"] <= 0.05 * pages_per_batch, found  # kept: reused without a fault


# In a process of its own, whose torch is told to use 2 threads first (its own choice on a machine of any size):
# the count each owner's model thread runs with, read there by the owner after its warm-up.
_OWNER_THREADS = """
import asyncio, json, sys
import torch
torch.set_num_threads(2)
from app.model_owner import running_model_owner
from app.settings import Settings

async def owners():
    found = {}
    for threads in (None, 1, 3):
        settings = Settings(model_store=sys.argv[1], model_name=sys.argv[2], model_threads=threads, compile="off",
                            device="cpu")
        async with running_model_owner(settings) as owner:
            found[str(threads)] = owner.model_threads
    return found

print(json.dumps(asyncio.run(owners())))
"""


def test_model_threads_sets_the_model_threads_team_and_a_gpu_takes_one(model_store: Path) -> None:
    """Catches MODEL_THREADS ignored (the model thread keeps torch's own choice, whose OpenMP team waited for the
    cores the front processes decode on: bench/RESULTS.md, "Front processes"), and a CPU default other than
    torch's own choice. The count is read on the model thread after the warm-up, not from the setting."""
    result = subprocess.run([sys.executable, "-c", _OWNER_THREADS, str(model_store), TEST_MODEL_NAME], cwd=REPO,
                            capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"None": 2, "1": 1, "3": 3}
    assert model_threads_on("cuda", None) == 1 and model_threads_on("cuda", 4) == 4
