"""Helpers shared by the benchmarks: machine description, timing, and output (table or JSON)."""

from __future__ import annotations

import json
import os
import platform as platform_module
import time
from collections.abc import Callable

import openmm
import torch

from openflow.io import write_json


def machine_description(device: str = "cpu") -> dict:
    """CPU model, cores, threads, load, library versions and the torch device, for the JSON record."""
    cpu_model = platform_module.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    description = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python_version": platform_module.python_version(),
        "torch_version": torch.__version__,
        "openmm_version": openmm.__version__,
        "openmm_platforms": [
            openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
        ],
        "device": str(device),
    }
    if str(device).startswith("cuda"):
        description["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return description


def machine_line(machine: dict) -> str:
    """One human-readable line describing ``machine`` (for the foot of a table)."""
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    return (
        f"machine: {machine['cpu_model']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads, "
        f"load {machine['load_average_1min']}){gpu}, torch {machine['torch_version']}, "
        f"OpenMM {machine['openmm_version']}"
    )


def synchronizer(device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` for a CUDA device (timings must wait for the kernels), else a no-op."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def rate(
    function: Callable[[], object], n_items: int, seconds: float, synchronize: Callable[[], None] = lambda: None
) -> float:
    """Items per second of ``function()`` (``n_items`` each), after one warm-up call, repeated for ``seconds``."""
    function()  # warm-up: contexts, allocations, device transfers
    synchronize()
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        function()
        synchronize()
        calls += 1
    return n_items * calls / (time.perf_counter() - start)


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads (``None``: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def emit(result: dict, table: str, as_json: bool, out: str | None = None) -> dict:
    """Print ``result`` as one JSON line (``as_json``) or ``table``; also write the JSON to ``out``."""
    if out:
        write_json(out, result)  # atomically
    print(json.dumps(result) if as_json else table)
    return result


def add_output_arguments(parser) -> None:
    """The options every benchmark shares: ``--json`` and ``--out``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--out", help="also write the JSON to this file")


def parse_arguments(parser, argv):
    """Parse ``argv``; refuse ``--device cuda`` without CUDA; apply ``--threads``."""
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch sees no CUDA device")
    set_threads(args.threads)
    return args
