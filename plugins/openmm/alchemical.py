"""Reference free energies by coupling-parameter sampling in OpenMM (MBAR and TI).

One force ``E_s`` of a System is scaled by a global parameter: ``E_lambda = E_rest + lambda E_s``.
:func:`sample_coupling` runs Langevin dynamics at each ``lambda`` and records ``E_s / kT`` of
every saved frame; :func:`mbar_free_energy` (pymbar, decorrelated samples) and
:func:`ti_free_energy` (trapezoid over ``<E_s>_lambda``, block errors) turn them into
``F(lambda_last) - F(lambda_first)`` in kT, ``F = -log Z`` over the full configuration space.
For a Coulomb cluster the scaled force is the pair term and ``lambda = 0`` is the pure
harmonic trap, whose free energy is :func:`harmonic_trap_free_energy`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit

from openflow.io import atomic_path, read_record, write_record
from openflow.systems import INACTIVE_FORCE_GROUP, System

from .md import create_simulation

LAMBDA_PARAMETER = "lambda_coupling"
COUPLED_FORCE_GROUP = 30


def harmonic_trap_free_energy(n_coordinates: int, kT: float, stiffness: float = 1.0) -> float:
    """``-log int exp(-stiffness |x|^2 / kT) dx`` over ``R^n_coordinates`` = ``-(n/2) log(pi kT / k)``."""
    if int(n_coordinates) != n_coordinates or n_coordinates < 1:
        raise ValueError(f"n_coordinates must be a positive int, got {n_coordinates}")
    if not (kT > 0 and stiffness > 0):
        raise ValueError(f"kT and stiffness must be positive, got {kT}, {stiffness}")
    return -0.5 * n_coordinates * math.log(math.pi * kT / stiffness)


def lambda_schedule(n_states: int, power: float = 2.0) -> np.ndarray:
    """``lambda_k = (k / (K - 1))^power``, ``k = 0..K-1``: dense near 0 for ``power > 1``."""
    if int(n_states) != n_states or n_states < 2:
        raise ValueError(f"n_states must be an int >= 2, got {n_states}")
    if not power > 0:
        raise ValueError(f"power must be positive, got {power}")
    return np.linspace(0.0, 1.0, int(n_states)) ** float(power)


def coupled_system(system: System, force_index: int) -> openmm.System:
    """A copy of ``system.system`` whose force ``force_index`` (a Custom*Force with an energy
    expression) is multiplied by the global parameter ``lambda_coupling`` (default 1) and put in
    force group 30, with its derivative dE/dlambda (the unscaled energy) available from the State."""
    copy = openmm.XmlSerializer.clone(system.system)
    forces = copy.getForces()
    if int(force_index) != force_index or not 0 <= force_index < len(forces):
        raise ValueError(f"force_index must be in [0, {len(forces)}), got {force_index}")
    force = forces[int(force_index)]
    if not hasattr(force, "setEnergyFunction"):
        raise TypeError(f"force {force_index} ({type(force).__name__}) has no energy expression to scale")
    if force.getForceGroup() in (COUPLED_FORCE_GROUP, INACTIVE_FORCE_GROUP):
        raise ValueError(f"force {force_index} is in a reserved force group ({force.getForceGroup()})")
    if any(f.getForceGroup() == COUPLED_FORCE_GROUP for f in forces):
        raise ValueError(f"force group {COUPLED_FORCE_GROUP} is already used in this system")
    force.setEnergyFunction(f"{LAMBDA_PARAMETER}*({force.getEnergyFunction()})")
    force.addGlobalParameter(LAMBDA_PARAMETER, 1.0)
    force.addEnergyParameterDerivative(LAMBDA_PARAMETER)  # dE/dlambda = the unscaled E_s
    force.setForceGroup(COUPLED_FORCE_GROUP)
    return copy


@dataclass(frozen=True)
class CouplingSamples:
    """``lambdas (K,)``; ``coupling_energy (K, N)``: the unscaled ``E_s / kT`` of the ``N`` frames
    saved at each lambda; ``positions (N, d)``: active coordinates (nm) of the frames at the last
    lambda; ``n_nonfinite``: frames with a non-finite energy (none is expected)."""

    lambdas: np.ndarray
    coupling_energy: np.ndarray
    positions: np.ndarray
    n_nonfinite: int


def sample_coupling(
    system: System,
    force_index: int,
    lambdas,
    n_samples: int,
    interval: int,
    equilibration: int,
    timestep: float = 0.01,
    friction: float = 1.0,
    platform: str = "Reference",
    seed: int = 0,
    n_chains: int = 1,
    out=None,
) -> CouplingSamples:
    """Langevin MD (``LangevinMiddleIntegrator``) at each ``lambda`` in turn, in ``n_chains``
    independent chains (chain ``c`` seeded from ``numpy.random.SeedSequence([seed, c])``).

    ``timestep`` ps, ``friction`` 1/ps; ``equilibration`` unsaved steps at each lambda, then
    ``n_samples`` frames ``interval`` steps apart. Each chain goes through the lambdas in order,
    each starting where the previous one ended (the first from ``system.positions``). The frames
    of the chains are concatenated chain after chain: ``n_chains * n_samples`` per lambda, so
    ``n_blocks`` a multiple of ``n_chains`` in :func:`mbar_free_energy` never mixes two chains
    in one block and the block error sees the spread between independent chains.

    ``out``: a folder where the samples are kept (``coupling.npz`` with its record ``coupling.json``);
    a later call with the same settings there returns them without simulating.
    """
    if int(n_chains) != n_chains or n_chains < 1:
        raise ValueError(f"n_chains must be a positive int, got {n_chains}")
    settings = dict(
        system=system.name,
        parameters=system.parameters,
        force_index=int(force_index),
        lambdas=np.asarray(lambdas, dtype=np.float64).tolist(),
        n_samples=n_samples,
        interval=interval,
        equilibration=equilibration,
        timestep=timestep,
        friction=friction,
        platform=platform,
        seed=seed,
        n_chains=int(n_chains),
    )
    if out is not None and read_record(Path(out) / "coupling.json", settings, [Path(out) / "coupling.npz"]) is not None:
        with np.load(Path(out) / "coupling.npz") as saved:
            return CouplingSamples(
                saved["lambdas"], saved["coupling_energy"], saved["positions"], int(saved["n_nonfinite"])
            )
    chains = [
        _sample_chain(
            system,
            force_index,
            lambdas,
            n_samples,
            interval,
            equilibration,
            timestep,
            friction,
            platform,
            _chain_seed(seed, c),
        )
        for c in range(int(n_chains))
    ]
    energies = np.concatenate([c[0] for c in chains], axis=1)
    positions = np.concatenate([c[1] for c in chains])
    samples = CouplingSamples(
        np.asarray(lambdas, dtype=np.float64), energies, positions, int((~np.isfinite(energies)).sum())
    )
    if out is not None:
        with atomic_path(Path(out) / "coupling.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    lambdas=samples.lambdas,
                    coupling_energy=energies,
                    positions=positions,
                    n_nonfinite=samples.n_nonfinite,
                )
        write_record(Path(out) / "coupling.json", settings)
    return samples


def _chain_seed(seed: int, chain: int) -> int:
    """A seed distinct for every (seed, chain)."""
    return int(np.random.SeedSequence([int(seed), int(chain)]).generate_state(1)[0] % (2**31 - 2)) + 1


def _sample_chain(
    system: System,
    force_index: int,
    lambdas,
    n_samples: int,
    interval: int,
    equilibration: int,
    timestep: float,
    friction: float,
    platform: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One chain of :func:`sample_coupling`: ``E_s / kT`` ``(K, n_samples)`` and the active
    coordinates ``(n_samples, d)`` (nm) at the last lambda."""
    lambdas = np.asarray(lambdas, dtype=np.float64)
    if lambdas.ndim != 1 or lambdas.size < 2 or not np.all(np.isfinite(lambdas)):
        raise ValueError(f"lambdas must be a 1D array of at least 2 finite values, got {lambdas}")
    for name, value in (("n_samples", n_samples), ("interval", interval)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
    if int(equilibration) != equilibration or equilibration < 0:
        raise ValueError(f"equilibration must be a non-negative int, got {equilibration}")
    if not (timestep > 0 and friction > 0):
        raise ValueError(f"timestep and friction must be positive, got {timestep}, {friction}")
    kT = system.kT_kjmol
    simulation = create_simulation(
        system,
        (seed, seed),
        platform,
        timestep,
        friction,
        openmm_system=coupled_system(system, force_index),
        minimize=False,
    )
    context, integrator = simulation.context, simulation.integrator
    energies = np.empty((lambdas.size, int(n_samples)))
    frames = np.empty((int(n_samples), system.n_atoms, 3))
    last = lambdas.size - 1
    for k, lam in enumerate(lambdas):
        context.setParameter(LAMBDA_PARAMETER, float(lam))
        if equilibration:
            integrator.step(int(equilibration))
        for n in range(int(n_samples)):
            integrator.step(int(interval))
            state = context.getState(getParameterDerivatives=True, getPositions=k == last, groups={COUPLED_FORCE_GROUP})
            energies[k, n] = state.getEnergyParameterDerivatives()[LAMBDA_PARAMETER] / kT
            if k == last:
                frames[n] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    del simulation, context, integrator
    return energies, system.from_positions(frames).numpy()


def _pymbar():
    """Import pymbar with its import-time warnings (no JAX; the timeseries caveat) silenced."""
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import pymbar
        import pymbar.timeseries
    finally:
        logger.setLevel(level)
    return pymbar


def _decorrelated(series: np.ndarray) -> tuple[np.ndarray, float]:
    """Subsample ``series (N,)`` at its statistical inefficiency ``g``; returns (indices, g)."""
    timeseries = _pymbar().timeseries
    g = float(timeseries.statistical_inefficiency(series)) if np.ptp(series) > 0 else 1.0
    return np.asarray(timeseries.subsample_correlated_data(series, g=g), dtype=int), g


@dataclass(frozen=True)
class CouplingFreeEnergy:
    """``delta_f``: ``F(lambda_last) - F(lambda_first)`` in kT; ``error``: its standard error
    (the larger of the analytic error and the block error); ``per_state (K,)``: decorrelated
    frames per lambda (MBAR) or statistical inefficiency ``g`` per lambda (TI);
    ``analytic_error`` / ``block_error``: the two error estimates."""

    delta_f: float
    error: float
    per_state: np.ndarray
    analytic_error: float
    block_error: float


def _mbar_delta_f(lambdas: np.ndarray, kept: list) -> tuple[float, float]:
    energies = np.concatenate(kept)
    mbar = _pymbar().MBAR(np.outer(lambdas, energies), np.array([len(e) for e in kept]), solver_protocol="robust")
    result = mbar.compute_free_energy_differences()
    return float(result["Delta_f"][0, -1]), float(result["dDelta_f"][0, -1])


def mbar_free_energy(samples: CouplingSamples, n_blocks: int = 8) -> CouplingFreeEnergy:
    """MBAR (pymbar 4) over the lambda states on decorrelated frames; reduced potentials
    ``u_k(x) = lambda_k E_s(x) / kT`` (the unscaled rest is common to all states and cancels).

    Block error: each state's series is cut into ``n_blocks`` contiguous blocks, MBAR is solved
    on block ``b`` of every state, and the spread of those ``n_blocks`` estimates gives
    ``std / sqrt(n_blocks)``. It catches what the analytic error misses: correlations longer
    than the energy's statistical inefficiency and the heavy tail of ``E_s`` near
    ``lambda = 0`` (overlapping particles; in 2D ``<(1/r)^2>`` diverges at ``lambda = 0``).
    With several chains from :func:`sample_coupling` and ``n_blocks`` a multiple of their
    number, the blocks come from independent chains.
    """
    if int(n_blocks) != n_blocks or n_blocks < 2:
        raise ValueError(f"n_blocks must be an int >= 2, got {n_blocks}")
    energy = samples.coupling_energy
    if energy.shape[1] < 10 * n_blocks:
        raise ValueError(f"need at least {10 * n_blocks} frames per state for {n_blocks} blocks, got {energy.shape[1]}")
    kept = [row[_decorrelated(row)[0]] for row in energy]
    delta_f, analytic = _mbar_delta_f(samples.lambdas, kept)
    blocks = [
        _mbar_delta_f(samples.lambdas, [row[_decorrelated(row)[0]] for row in part])[0]
        for part in np.array_split(energy, int(n_blocks), axis=1)
    ]
    block = float(np.std(blocks, ddof=1) / math.sqrt(n_blocks))
    return CouplingFreeEnergy(delta_f, max(analytic, block), np.array([len(e) for e in kept]), analytic, block)


def _ti_delta_f(lambdas: np.ndarray, means: np.ndarray) -> float:
    """Trapezoid rule ``int <E_s/kT>_lambda d lambda`` over ``means (K,)``."""
    return float(np.sum(np.diff(lambdas) * (means[1:] + means[:-1]) / 2))


def ti_free_energy(samples: CouplingSamples, n_blocks: int = 8) -> CouplingFreeEnergy:
    """Thermodynamic integration ``int <E_s/kT>_lambda d lambda`` by the trapezoid rule. Error:
    the larger of the propagated standard errors ``sqrt(g var / N)`` (``g`` statistical
    inefficiency) and the block error, ``n_blocks`` contiguous blocks as in
    :func:`mbar_free_energy`."""
    if int(n_blocks) != n_blocks or n_blocks < 2:
        raise ValueError(f"n_blocks must be an int >= 2, got {n_blocks}")
    e, lambdas = samples.coupling_energy, samples.lambdas
    g = np.array([_decorrelated(row)[1] for row in e])
    sems = np.sqrt(g * e.var(1, ddof=1) / e.shape[1])
    weights = np.zeros(lambdas.size)
    weights[:-1] += np.diff(lambdas) / 2
    weights[1:] += np.diff(lambdas) / 2
    analytic = float(np.sqrt((weights**2) @ sems**2))
    blocks = [_ti_delta_f(lambdas, part.mean(1)) for part in np.array_split(e, int(n_blocks), axis=1)]
    block = float(np.std(blocks, ddof=1) / math.sqrt(n_blocks))
    return CouplingFreeEnergy(_ti_delta_f(lambdas, e.mean(1)), max(analytic, block), g, analytic, block)
