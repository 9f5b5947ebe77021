"""Molecular dynamics with OpenMM: one simulation factory, one run cache, the plain Langevin driver.

- :func:`create_simulation` is the one place where an ``openmm.app.Simulation`` is set up:
  ``LangevinMiddleIntegrator`` (seeded), platform choice, start from the system's positions (or
  a saved state), minimisation, Maxwell-Boltzmann velocities, unsaved equilibration steps, the
  caller's reporters. Every driver (:func:`simulate`, tempering, coupling-parameter sampling,
  metadynamics, the benchmarks) builds its dynamics through it.
- :func:`finished_run` is the one run cache: a driver records its settings in a JSON file next to
  its outputs, and a later call with equal settings returns that record instead of simulating.
- :func:`simulate` runs Langevin dynamics and writes ``trajectory.dcd``, ``topology.pdb``,
  ``energies.csv`` and ``simulation.json`` into a folder.

Outputs are written under a ``.part`` name and renamed when complete (:func:`partial_outputs`):
an interrupted or failed run leaves neither a file that looks finished nor a ``.part`` file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openflow.io import check_folder, plain_json, read_record
from openflow.io import progress as progress_bar
from openflow.systems import kT_kjmol

from .platforms import select_platform
from .reporters import DCDStreamReporter, PhysicalEnergyReporter

MODEL_SYSTEM_TIMESTEP_PS = 0.01
DEFAULT_FRICTION_PER_PS = 1.0
FRAME_EVERY_PS = 1.0
EQUILIBRATION_PS = 10.0
OUTPUT_NAMES = dict(
    trajectory="trajectory.dcd", topology="topology.pdb", energies="energies.csv", metadata="simulation.json"
)


# ----------------------------------------------------------------------------- settings


def default_timestep(system) -> unit.Quantity:
    """A stable Langevin time step for an ``openflow.systems.System``.

    Molecules (hydrogen atoms present): 2 fs with constraints, 1 fs without (X-H stretches have
    periods near 10 fs). Model systems in reduced units (no hydrogen; masses 1 amu, kT and
    spring constants of order 1 kJ/mol, 1 ps the time unit): 0.01 ps, so that ``omega dt <= 0.05``
    for their fastest modes (chain, tethers of inactive components, cluster trap and pairs).
    """
    has_hydrogen = any(a.element is not None and a.element.symbol == "H" for a in system.topology.atoms())
    if not has_hydrogen:
        return MODEL_SYSTEM_TIMESTEP_PS * unit.picosecond
    return (2.0 if system.system.getNumConstraints() > 0 else 1.0) * unit.femtosecond


def positive_number(value, in_unit, name: str) -> float:
    """A Quantity (converted to ``in_unit``) or a plain number, checked positive and finite."""
    try:
        number = value.value_in_unit(in_unit) if unit.is_quantity(value) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return number


def positive_integer(value, name: str) -> int:
    """``value`` as an int, checked ``>= 1`` (bools and fractions refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def openmm_seeds(seed: int) -> tuple[int, int]:
    """Two independent seeds in 1..2**31-1 (OpenMM reads 0 as 'random') for noise and velocities."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    noise, velocities = np.random.SeedSequence(int(seed)).generate_state(2) % (2**31 - 1) + 1
    return int(noise), int(velocities)


@dataclass
class RunLength:
    """A run's time step ``dt_ps``, friction ``gamma_ps`` (1/ps), length ``steps`` and frame ``interval`` (steps)."""

    dt_ps: float
    gamma_ps: float
    steps: int
    interval: int


def run_length(system, steps=None, ns=None, timestep=None, friction=None, interval=None) -> RunLength:
    """Resolve and check a run's settings: ``timestep`` (default :func:`default_timestep`) and
    ``friction`` (default 1/ps) as Quantities or plain ps and 1/ps, exactly one of ``steps`` and
    ``ns``, ``interval`` steps between frames (default one frame per ps, at most the run)."""
    dt_ps = positive_number(default_timestep(system) if timestep is None else timestep, unit.picosecond, "timestep")
    gamma_ps = positive_number(
        DEFAULT_FRICTION_PER_PS if friction is None else friction, unit.picosecond**-1, "friction"
    )
    n_steps = steps_from(steps, ns, dt_ps)
    interval = max(1, round(FRAME_EVERY_PS / dt_ps)) if interval is None else positive_integer(interval, "interval")
    if interval > n_steps:
        raise ValueError(
            f"interval ({interval} steps) is longer than the run ({n_steps} steps): no frame would be saved"
        )
    return RunLength(dt_ps, gamma_ps, n_steps, interval)


def steps_from(steps, ns, timestep_ps: float) -> int:
    """Run length in steps from exactly one of ``steps`` and ``ns`` (simulated time)."""
    if (steps is None) == (ns is None):
        raise ValueError("give exactly one of steps and ns")
    if steps is not None:
        return positive_integer(steps, "steps")
    ns = positive_number(ns, unit.nanosecond, "ns")
    return max(1, round(ns * 1000.0 / timestep_ps))


def draw_seed(seed: int | None) -> int:
    """``seed``, or a fresh one from the operating system when None (then record it)."""
    return random.SystemRandom().randrange(2**31) if seed is None else seed


# ----------------------------------------------------------------------------- the factory


def create_simulation(
    system,
    seed: int | tuple[int, int],
    platform: str | None = None,
    timestep=None,
    friction=None,
    temperature=None,
    openmm_system: openmm.System | None = None,
    positions=None,
    state=None,
    minimize: bool = True,
    equilibration_steps: int = 0,
    reporters: Sequence = (),
    platform_properties: dict | None = None,
) -> app.Simulation:
    """A ready ``openmm.app.Simulation`` of an ``openflow.systems.System`` with Langevin dynamics.

    Args:
        seed: seeds the integrator noise and the initial velocities (:func:`openmm_seeds`), or a pair
            ``(noise, velocities)`` of OpenMM seeds (1..2**31-1) used as they are.
        platform: an OpenMM platform name, or None/"auto" (``select_platform``, measured for MD).
        timestep: Quantity or ps (default :func:`default_timestep`); friction: Quantity or 1/ps
            (default 1/ps); temperature: Quantity or K (default the system's).
        openmm_system: the ``openmm.System`` to integrate instead of ``system.system`` (e.g. with a
            metadynamics bias or a coupling parameter added).
        positions: start positions (Quantity or nm array ``(n_atoms, 3)``; default the system's).
        state: a state file from ``Simulation.saveState`` to start from instead (positions,
            velocities, time; no minimisation, no new velocities, no equilibration).
        minimize: minimise the energy first; equilibration_steps: unsaved steps after drawing
            velocities, after which the step counter and the time restart at 0.
        reporters: the caller's OpenMM reporters, attached after the equilibration.
    """
    dt_ps = positive_number(default_timestep(system) if timestep is None else timestep, unit.picosecond, "timestep")
    gamma_ps = positive_number(
        DEFAULT_FRICTION_PER_PS if friction is None else friction, unit.picosecond**-1, "friction"
    )
    kelvin = positive_number(system.temperature if temperature is None else temperature, unit.kelvin, "temperature")
    if (
        isinstance(equilibration_steps, bool)
        or int(equilibration_steps) != equilibration_steps
        or equilibration_steps < 0
    ):
        raise ValueError(f"equilibration_steps must be a non-negative integer, got {equilibration_steps!r}")
    noise_seed, velocity_seed = (int(seed[0]), int(seed[1])) if isinstance(seed, tuple) else openmm_seeds(seed)
    omm_system = system.system if openmm_system is None else openmm_system
    chosen = select_platform(platform, system.system, system.positions, task="md")
    integrator = openmm.LangevinMiddleIntegrator(
        kelvin * unit.kelvin, gamma_ps / unit.picosecond, dt_ps * unit.picosecond
    )
    integrator.setRandomNumberSeed(noise_seed)
    simulation = app.Simulation(system.topology, omm_system, integrator, chosen, platform_properties or {})
    if state is not None:
        simulation.loadState(str(state))
    else:
        simulation.context.setPositions(system.positions if positions is None else positions)
        if minimize:
            simulation.minimizeEnergy()
        simulation.context.setVelocitiesToTemperature(kelvin * unit.kelvin, velocity_seed)
        if equilibration_steps:
            simulation.step(int(equilibration_steps))
        simulation.currentStep = 0
        simulation.context.setTime(0.0)
    simulation.reporters.extend(reporters)
    return simulation


def platform_name(simulation: app.Simulation) -> str:
    return simulation.context.getPlatform().getName()


def positions_nm(simulation: app.Simulation) -> np.ndarray:
    """Current positions ``(n_atoms, 3)`` in nm."""
    return simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def run_steps(
    simulation: app.Simulation,
    n_steps: int,
    step=None,
    chunk: int | None = None,
    desc: str = "MD",
    progress: bool = True,
) -> float:
    """Advance ``n_steps`` in chunks (``step(n)``, default ``simulation.step``) with a progress bar;
    returns the wall time in s."""
    step = simulation.step if step is None else step
    chunk = max(1, n_steps // 100) if chunk is None else chunk
    start = time.perf_counter()
    with progress_bar(n_steps, desc, progress, unit="step") as bar:
        for done in range(0, n_steps, chunk):
            step(min(chunk, n_steps - done))
            bar.update(min(chunk, n_steps - done))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- outputs and the run cache


def finished_run(out, metadata_name: str, settings: dict, files: Sequence[str]) -> dict | None:
    """The record a driver left in ``out/metadata_name`` if its ``"settings"`` equal ``settings``
    (compared as JSON) and every output in ``files`` (names in ``out``) exists; else None."""
    out = Path(out)
    return read_record(out / metadata_name, settings, [out / name for name in files])


@contextlib.contextmanager
def partial_outputs(out, names: dict):
    """Yield ``{key: out/name.part}``; on success rename each to ``out/name``, on failure delete them.

    ``names``: ``{key: file name}``. The folder is created. The metadata-like files should be
    listed last: renames run in the given order, so a reader never sees a record without its data.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    part = {key: out / f"{name}.part" for key, name in names.items()}
    try:
        yield part
    except BaseException:
        for path in part.values():
            path.unlink(missing_ok=True)
        raise
    for key, name in names.items():
        os.replace(part[key], out / name)


# ----------------------------------------------------------------------------- plain Langevin MD


@dataclass
class SimulationResult:
    """What :func:`simulate` wrote and how fast it ran (paths are final, complete files)."""

    trajectory: Path
    topology: Path
    energies: Path
    metadata: Path
    n_frames: int
    steps: int
    interval: int
    timestep_ps: float
    wall_time_s: float
    ns_per_day: float
    platform: str


def simulate(
    system,
    steps: int | None = None,
    ns: float | None = None,
    interval: int | None = None,
    out="simulation",
    seed: int | None = None,
    platform: str | None = None,
    timestep=None,
    friction=None,
    equilibration_steps: int | None = None,
    minimize: bool = True,
    progress: bool = True,
    reporters: Sequence = (),
    reuse: bool = False,
    overwrite: bool = True,
) -> SimulationResult:
    """Minimise, equilibrate and run Langevin dynamics; write a trajectory and an energy log.

    Args:
        system: an ``openflow.systems.System``.
        steps / ns: length of the production run, exactly one of them (ns of simulated time; in
            the reduced units of the model systems 1 ps is the time unit).
        interval: steps between saved frames (default: one frame per ps).
        out: output folder, created if needed.
        seed: seeds the initial velocities and the integrator noise (None: drawn, and recorded
            in ``simulation.json``). Same seed and platform -> the same trajectory (Reference).
        platform, timestep, friction: as :func:`create_simulation`.
        equilibration_steps: unsaved steps after minimisation (default: 10 ps worth).
        reporters: further OpenMM reporters attached to the production run.
        reuse: return the finished run already in ``out`` instead of simulating again, when its
            ``simulation.json`` records the same settings (needs an explicit ``seed``).
        overwrite: when False, a trajectory already in ``out`` (that is not reused) is an error.

    Writes into ``out``: ``trajectory.dcd`` (positions, nm; frame i at step (i+1)*interval),
    ``topology.pdb`` (the minimised structure), ``energies.csv`` (StateDataReporter CSV: step,
    time ps, potential kJ/mol, kinetic kJ/mol, temperature K, speed ns/day; the potential is the
    physical energy ``System.energy_groups()``, without the tethers of inactive components) and
    ``simulation.json`` (every setting, the seed, the platform and the speed).
    """
    length = run_length(system, steps, ns, timestep, friction, interval)
    dt_ps, gamma_ps, n_steps, interval = length.dt_ps, length.gamma_ps, length.steps, length.interval
    if equilibration_steps is None:
        equilibration_steps = round(EQUILIBRATION_PS / dt_ps)
    out = Path(out)
    settings = dict(
        system=system.name,
        parameters=system.parameters,
        temperature_K=system.temperature.value_in_unit(unit.kelvin),
        seed=seed,
        steps=n_steps,
        interval=interval,
        timestep_ps=dt_ps,
        friction_per_ps=gamma_ps,
        equilibration_steps=int(equilibration_steps),
        minimized=minimize,
    )
    if reuse and seed is not None:
        previous = finished_run(out, OUTPUT_NAMES["metadata"], settings, OUTPUT_NAMES.values())
        if previous is not None:
            fields = {key: previous[key] for key in SimulationResult.__dataclass_fields__}
            return SimulationResult(**dict(fields, **{key: out / name for key, name in OUTPUT_NAMES.items()}))
    if not overwrite and (out / OUTPUT_NAMES["trajectory"]).exists():
        raise FileExistsError(
            f"{out / OUTPUT_NAMES['trajectory']} exists: choose another folder or overwrite it (--overwrite)"
        )
    settings["seed"] = seed = draw_seed(seed)
    check_folder(out)  # before any work
    simulation = create_simulation(
        system, seed, platform, dt_ps, gamma_ps, minimize=minimize, equilibration_steps=int(equilibration_steps)
    )
    with partial_outputs(out, OUTPUT_NAMES) as part:
        with open(part["topology"], "w") as handle:
            app.PDBFile.writeFile(system.topology, positions_nm(simulation) * unit.nanometer, handle)
        with open(part["trajectory"], "wb") as dcd, open(part["energies"], "w") as log:
            simulation.reporters.extend(
                [
                    DCDStreamReporter(dcd, interval),
                    PhysicalEnergyReporter(log, interval, system.energy_groups()),
                    *reporters,
                ]
            )
            wall = run_steps(
                simulation,
                n_steps,
                chunk=interval * max(1, n_steps // interval // 100),
                desc=f"simulate {system.name}",
                progress=progress,
            )
            simulation.reporters.clear()
        result = SimulationResult(
            **{key: out / name for key, name in OUTPUT_NAMES.items()},
            n_frames=n_steps // interval,
            steps=n_steps,
            interval=interval,
            timestep_ps=dt_ps,
            wall_time_s=wall,
            ns_per_day=n_steps * dt_ps * 1e-3 / max(wall, 1e-12) * 86400.0,
            platform=platform_name(simulation),
        )
        metadata = dict(
            settings,
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()},
            settings=settings,
            openmm=openmm.__version__,
        )
        part["metadata"].write_text(json.dumps(plain_json(metadata), indent=2))
    return result


def minimized_energies(system, starts, tolerance: float, max_iterations: int = 10000) -> np.ndarray:
    """OpenMM local minimisation (Reference platform) from each start, active coordinates ``(m, d)`` nm:
    the minimum energies ``(m,)`` in kJ/mol of the physical force groups. ``tolerance`` in kJ/mol/nm."""
    context = openmm.Context(
        system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    energies = []
    for positions in system.to_positions(starts):
        context.setPositions(positions)
        openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
        state = context.getState(getEnergy=True, groups=system.energy_groups())
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return np.array(energies)


def temperature_log_weights(run: SimulationResult, temperature_K: float) -> np.ndarray:
    """Log-weights ``(T,)`` that reweight the frames of a finished :func:`simulate` run to ``temperature_K``:
    ``-(1/kT - 1/kT_run) U`` with ``U`` the physical potential energy of each frame (``energies.csv``)."""
    record = json.loads(run.metadata.read_text())
    energies = np.loadtxt(run.energies, delimiter=",", comments="#", ndmin=2)[:, 2]
    return -(1.0 / kT_kjmol(temperature_K) - 1.0 / kT_kjmol(record["temperature_K"])) * energies
