"""glibc's allocator tuned for a CPU decode loop.

Every decode step allocates and frees the same large temporaries (logits [B, V], MLP activations, the KV
cache's reallocations). By default glibc serves blocks above a sliding threshold with fresh mmap()s and hands
freed heap back to the kernel, so each step pays page faults for memory it just released; the threshold
only rises as such blocks are freed, which is why a new worker ran its first minutes ~10% slower than later.
Keeping freed memory in the heap is what jemalloc/tcmalloc give PyTorch CPU deployments; mallopt() does it
without another library. The worker's bench applies the same to its sequential baseline."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free heap kept up to 1 GiB before any is returned
TOP_PAD = 64 << 20  # the heap grows in 64 MiB steps, not page by page


def keep_freed_memory() -> bool:
    """Applies the settings above; False (and nothing changed) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = all(mallopt(option, value) == 1 for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                  (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                                  (M_TOP_PAD, TOP_PAD)))
    logging.getLogger("backends").debug("allocator tuned: %s", done)
    return done
