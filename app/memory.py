"""Memory given back to the system once the images in flight are decoded.

glibc's malloc keeps what a thread frees in that thread's arena, and gives back to the system only the large
blocks it mapped on their own and the free top of each heap: after a burst of large images, the decoding
threads' arenas keep freed pages that sit below memory still in use, and the process stays large.
`malloc_trim(0)` returns every free page of every arena (bench/RESULTS.md, "Real photos", measures the
difference). Pillow's own block cache is off by default (`PIL.Image.core.get_blocks_max()` is 0), so it keeps
nothing; PyTorch's CPU allocator hands its blocks to malloc, and the model's tensors are small next to images.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_LIBC_NAME = ctypes.util.find_library("c")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on a C library without it (musl, macOS)."""
    try:
        return ctypes.CDLL(_LIBC_NAME).malloc_trim if _LIBC_NAME else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def give_back_free_memory() -> None:
    """Return the C heap's free pages to the system (a no-op without glibc)."""
    if _TRIM is not None:
        _TRIM(0)
