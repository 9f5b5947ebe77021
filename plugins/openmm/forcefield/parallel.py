"""Running compiled kernels over a batch on threads, and keeping torch's own threads out of their way.

``evaluate`` splits the batch into ``kernels.BLOCK``-aligned slices, one per thread, and runs every
kernel on each slice (the kernels release the GIL). The threads are plain Python threads (no
OpenMP), in a pool kept per process and thread count; a forked child makes its own pool, so the
kernels work in ``DataLoader`` workers and other forked processes.

``torch_on_one_thread`` is a **scoped** change of torch's thread count: inside the ``with`` block
torch's own ops run serially (``torch.set_num_threads(1)``) and ``evaluate`` uses the count that
was set before; on leaving the block, normally or by an exception, the previous count is restored.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

from .kernels import BLOCK

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_torch_threads = {"lock": threading.Lock(), "depth": 0, "saved": 1}


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` threads (a forked child makes its own)."""
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="openflow-kernels")
    return _pools[key]


def evaluate(kernels: list, positions: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``kernels`` (``(kernel, parameters)`` pairs) at positions ``(3, N, B)`` nm (a float32 or
    float64 CPU tensor of any strides): energies ``(B,)`` kJ/mol (float64); adds ``dE/dpositions``
    into ``gradient`` ``(3, N, B)`` (same dtype, any strides) unless it is ``None``.

    Runs on ``torch.get_num_threads()`` threads (inside ``torch_on_one_thread``: the count set
    before it), at most one per block of configurations."""
    p = positions.detach().numpy()  # float32 or float64: the kernels read either, and compute in float64
    energy = np.zeros(p.shape[-1])
    with_gradient = gradient is not None
    out = (
        gradient.numpy() if with_gradient else p
    )  # never written without gradient; the same array type: one compiled version

    def run(start: int, stop: int) -> None:
        for kernel, parameters in kernels:
            kernel(p, out, energy, with_gradient, start, stop, *parameters)

    n_blocks = -(-len(energy) // BLOCK)
    threads = min(_torch_threads["saved"] if _torch_threads["depth"] else torch.get_num_threads(), n_blocks)
    edges = [BLOCK * (n_blocks * t // threads) for t in range(threads)] + [len(energy)]
    if threads <= 1:
        run(0, len(energy))
    else:
        list(_pool(threads).map(run, edges[:-1], edges[1:]))
    return torch.from_numpy(energy)


@contextmanager
def torch_on_one_thread():
    """Scoped: inside the block torch's own ops run on one thread and ``evaluate`` takes the thread
    count torch had before; leaving it (also by an exception) restores that count.

    After each parallel op torch's OpenMP workers spin for a while, on the cores the kernels'
    threads need: around the kernels, torch's small ops (layout, checks) are better serial. Nested
    and concurrent uses share one saved setting, restored when the last one leaves. Note that
    ``torch.set_num_threads`` is process-wide: other threads running torch ops meanwhile run them
    serially too.
    """
    with _torch_threads["lock"]:
        if _torch_threads["depth"] == 0:
            _torch_threads["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads["depth"] += 1
    try:
        yield
    finally:
        with _torch_threads["lock"]:
            _torch_threads["depth"] -= 1
            if _torch_threads["depth"] == 0:
                torch.set_num_threads(_torch_threads["saved"])
