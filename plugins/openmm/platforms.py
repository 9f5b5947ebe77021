"""Choosing an OpenMM platform: by name, or automatically by measurement.

``"auto"`` takes CUDA when it is present, else times the CPU-side platforms (Reference, CPU) on
the actual system for the actual task and keeps the faster one: for 22 atoms in vacuum the
Reference platform wins by far, with implicit solvent the CPU platform does.
"""

from __future__ import annotations

import time

import numpy as np
import openmm

from openflow.io import say

CPU_SIDE = ("Reference", "CPU")
_measured: dict[tuple, str] = {}
_noticed: list = []  # the CPU-side fallback of "auto" is announced once


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that load here."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def _seconds_per_call(name: str, system: openmm.System, positions, task: str, repeats: int, rounds: int = 5) -> float:
    """Best of ``rounds`` mean times of ``repeats`` calls (the minimum resists other load)."""
    context = openmm.Context(system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName(name))
    context.setPositions(positions)
    context.getState(getEnergy=True, getForces=True)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        if task == "md":
            context.getIntegrator().step(repeats)
        else:
            for _ in range(repeats):
                context.setPositions(positions)
                context.getState(getEnergy=True, getForces=True).getForces(asNumpy=True)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def _signature(system: openmm.System, task: str) -> tuple:
    forces = tuple(sorted(type(f).__name__ for f in system.getForces()))
    return system.getNumParticles(), forces, task


def select_platform(
    name: str | None, system: openmm.System | None = None, positions=None, task: str = "energy"
) -> openmm.Platform:
    """Return the ``openmm.Platform`` to use.

    Args:
        name: a platform name, or ``None``/``"auto"`` to choose: CUDA if present, else the faster
            of Reference and CPU measured on ``system`` at ``positions`` (nm) for ``task``.
        task: ``"energy"`` (single-point energies and forces) or ``"md"`` (integration steps).

    A named platform that is not available here (CUDA on a machine without it, a misspelling) is a
    ``ValueError`` naming the available ones; only ``"auto"`` falls back, with a one-line notice
    (once per process) that CUDA is absent.
    """
    if task not in ("energy", "md"):
        raise ValueError(f"task must be 'energy' or 'md', got {task!r}")
    available = available_platforms()
    if name not in (None, "auto"):
        if name in available:
            return openmm.Platform.getPlatformByName(name)
        hint = " (pip install openmm[cuda12] on a machine with an NVIDIA GPU)" if name == "CUDA" else ""
        raise ValueError(
            f"OpenMM platform {name!r} is not available here{hint}; available: {', '.join(available)}, or auto"
        )
    if "CUDA" in available:
        return openmm.Platform.getPlatformByName("CUDA")
    if not _noticed:
        _noticed.append(True)
        cpu_side = " or ".join(p for p in CPU_SIDE if p in available)
        say(f"no CUDA platform here: OpenMM runs on {cpu_side}, chosen by measurement")
    candidates = [p for p in CPU_SIDE if p in available]
    if system is None or len(candidates) == 1:
        return openmm.Platform.getPlatformByName(candidates[-1])
    key = _signature(system, task)
    if key not in _measured:
        if positions is None:
            positions = np.zeros((system.getNumParticles(), 3))
            positions[:, 0] = 0.3 * np.arange(system.getNumParticles())
        repeats = 20 if task == "md" else 50
        timings = {p: _seconds_per_call(p, system, positions, task, repeats) for p in candidates}
        _measured[key] = min(timings, key=timings.get)
    return openmm.Platform.getPlatformByName(_measured[key])
