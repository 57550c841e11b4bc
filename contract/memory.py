"""How the C heap is managed while a model runs: freed memory kept for reuse, given back when idle.

Both sides of the contract run the model, so both use this: the service (freed memory kept while requests
come, given back after a burst) and training (every step allocates and frees the same activations).

glibc's malloc, left to itself, serves every block above its mmap threshold (128 kB, rising to at most 32 MB
as such blocks are freed) with a fresh mapping and unmaps it on free, and gives the free top of each heap back
to the system as soon as it exceeds the trim threshold. A forward pass allocates and frees activations of
several MB per image, so every batch faulted its memory in again, page by page: the same model's batch of 8
pairs took 2.3-2.4x as long as with the memory kept (bench/RESULTS.md, "Model runtime"), and a training step
of Lite0 (64 images at 224 px, forward, backward, AdamW) 1.9x (`python -m bench.training_step`).
`keep_freed_memory_for_reuse` turns both off at start-up, before the model is loaded.

It also keeps every thread on one arena, the main one. glibc gives each new thread that allocates an arena of
its own, made of heaps of at most 64 MB, where those settings do not hold for a larger block: it is mapped
afresh and unmapped when freed, whatever mallopt says. The service runs its model on a thread of its own, and
a batch of 8 pairs through the compiled backbone (16 images in one pass) frees a 77 MB activation: on that
thread every batch faulted it in again (18,985 page faults, 144 ms a batch against 89 ms on the main arena),
which took the compiled backbone's whole gain under load (bench/RESULTS.md, "Compiled backbone"). A thread keeps
the arena it took at its first allocation, so this must run before the threads that run the model start
(`app.torch_threads.model_thread_executor` calls it).

Kept memory is given back once the service is idle: after a burst of large images the heap holds freed pages;
`malloc_trim(0)` returns every free page, and app/admission.py calls it once no image has been decoded for a
moment (bench/RESULTS.md, "Real photos", measures the memory given back). Pillow's own block cache is off by
default (`PIL.Image.core.get_blocks_max()` is 0), so it keeps nothing; PyTorch's CPU allocator hands its
blocks to malloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_LIBC_NAME = ctypes.util.find_library("c")


# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_KEPT_FREE_BYTES = 1 << 30  # free heap top kept before glibc trims it on its own: malloc_trim does it when idle
_TOP_PAD_BYTES = 64 << 20  # grow a heap by at least this much: fewer, larger extensions


def _glibc_function(name: str) -> Callable[..., int] | None:
    """A glibc malloc function, or None on a C library without it (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(_LIBC_NAME), name) if _LIBC_NAME else None
    except (OSError, AttributeError):
        return None


_TRIM = _glibc_function("malloc_trim")
_MALLOPT = _glibc_function("mallopt")


def keep_freed_memory_for_reuse() -> None:
    """Serve large blocks from the heap and keep freed memory there for the next request, on one arena for every
    thread (a no-op without glibc). Only later allocations, and threads that have not allocated yet, are
    affected: call it before loading the model and before starting the thread that runs it."""
    if _MALLOPT is not None:
        _MALLOPT(_M_ARENA_MAX, 1)
        _MALLOPT(_M_MMAP_MAX, 0)
        _MALLOPT(_M_TRIM_THRESHOLD, _KEPT_FREE_BYTES)
        _MALLOPT(_M_TOP_PAD, _TOP_PAD_BYTES)


def give_back_free_memory() -> None:
    """Return the C heap's free pages to the system (a no-op without glibc)."""
    if _TRIM is not None:
        _TRIM(0)
