"""Keep freed memory in the process for reuse (glibc): an explicit, process-wide, permanent setting.

Batched CPU work allocates and frees multi-MB temporaries on every call. By default glibc serves
allocations above 128 KiB with fresh ``mmap`` pages and returns freed memory at the top of the
heap to the operating system, so every chunk of a batched energy page-faults its temporaries in
again. ``keep_freed_memory()`` changes that for the **whole process and for good** (``mallopt``
cannot be undone here), so nothing calls it behind the caller's back: ``TorchEnergy`` calls it only
when constructed with ``keep_freed_memory=True`` (the benchmarks do), or a program calls it itself.
What it gains is measured in README.md, section "Energies".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP_MIB = 64  # above the largest temporary of a chunk; 16 MiB was too little for alanine dipeptide
ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to ``KEEP_MIB`` MiB (``mallopt``), once per process.

    Allocations below ``KEEP_MIB`` come from the heap, and up to ``KEEP_MIB`` MiB of freed memory
    stays with the process instead of going back to the operating system; this holds for every
    thread and library of the process until it exits. Returns whether the thresholds are set:
    ``False`` off glibc (macOS, Windows, musl) and when ``MALLOC_TRIM_THRESHOLD_`` or
    ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the user's own setting wins). Calling it
    again does nothing and returns the first answer.
    """
    global _applied
    if _applied is None:
        _applied = False
        if not any(name in os.environ for name in ENVIRONMENT):
            try:
                mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            size = KEEP_MIB << 20
            _applied = bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, size))
    return _applied
