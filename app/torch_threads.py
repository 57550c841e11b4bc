"""Which thread runs PyTorch's parallel work: the model thread alone.

PyTorch runs a large operator on a team of OpenMP threads, and every Python thread that runs one gets a team
of its own. GNU OpenMP lets idle workers spin, ready for the next operator, only while the process holds no
more OpenMP threads than CPUs; beyond that, each of the hundreds of operators of a forward pass wakes its
workers through the kernel. Measured on the 2-core machine with the default model (EfficientNet-Lite0,
224 px), one pair: 27.7 ms while one thread had run torch, 56.2 ms once a second one had
(`python -m bench.model_runtime`, bench/RESULTS.md, "Model runtime"). So the model is loaded, warmed up and run on one thread, with torch's threads, and every other thread
of ours that touches tensors (decoding and rendering on the image threads, the event loop) runs its operators
by itself.

The model thread is started after the process's memory policy is set (contract/memory.py): a thread takes its
malloc arena at its first allocation, and on an arena of its own a block over 64 MB (the compiled backbone's
largest activation at 8 pairs) was mapped and faulted in again at every batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from contract.memory import keep_freed_memory_for_reuse

# torch's own choice for this machine (its physical cores), read before any thread of ours changes it
MODEL_TORCH_THREADS = torch.get_num_threads()


def model_thread_executor() -> ThreadPoolExecutor:
    """The one thread for every model call, with torch's threads, on the arena that keeps freed memory: call it
    before starting any other thread that allocates."""
    keep_freed_memory_for_reuse()
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=torch.set_num_threads,
                              initargs=(MODEL_TORCH_THREADS,))


def model_threads_on(device_type: str, setting: int | None) -> int:
    """The torch threads of the model thread for a model on `device_type` ("cpu", "cuda"): MODEL_THREADS, else
    torch's own choice on a CPU and 1 on a GPU (app/settings.py says why)."""
    return setting or (1 if device_type == "cuda" else MODEL_TORCH_THREADS)


def single_threaded_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool whose threads run torch's operators by themselves, never on a team of their own."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=run_torch_here_only)


def run_torch_here_only() -> None:
    """This thread runs torch's operators without a team of OpenMP threads."""
    torch.set_num_threads(1)
