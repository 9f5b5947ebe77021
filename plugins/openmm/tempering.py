"""Parallel tempering (replica exchange over temperature) with OpenMM.

One ``Context`` per temperature, Langevin dynamics in each, and every ``exchange_interval`` steps
Metropolis swaps of configurations between neighbouring temperatures (even and odd pairs in
turn): a swap of ``i <-> j`` is accepted with probability ``min(1, exp((beta_i - beta_j)(U_i -
U_j)))`` and the velocities are rescaled by ``sqrt(T_new / T_old)``. The stream of configurations
at the lowest temperature is then Boltzmann-distributed at that temperature while crossing
barriers at the speed of the hottest replica.

What is written (like :func:`~openflow.plugins.openmm.md.simulate`, each file first as ``.part``):
``trajectory.dcd`` (frames at the lowest temperature), ``topology.pdb``, ``frames.csv`` (time,
potential energy kJ/mol, and the *segment* of each frame: frames of one segment follow each
other by unbroken Langevin dynamics at the target temperature, so time-lagged statistics such
as TICA may pair frames only inside a segment) and ``tempering.json`` (settings, acceptance per
pair, round trips, speed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openflow.io import plain_json
from openflow.io import progress as progress_bar
from openflow.systems import MOLAR_GAS_CONSTANT

from .md import create_simulation, finished_run, partial_outputs, platform_name, positive_integer, run_length

OUTPUT_NAMES = dict(
    trajectory="trajectory.dcd", topology="topology.pdb", frames="frames.csv", metadata="tempering.json"
)


@dataclass
class TemperingResult:
    """Paths of the finished run and its exchange statistics.

    ``segments (n_frames,)``: the continuous-dynamics segment of each frame at the lowest
    temperature; ``acceptance (n_temperatures - 1,)``: accepted fraction of swaps per neighbour
    pair; ``round_trips``: trips of a walker from the lowest to the highest temperature and back.
    """

    trajectory: Path
    topology: Path
    frames: Path
    metadata: Path
    temperatures_K: list
    n_frames: int
    steps: int
    interval: int
    exchange_interval: int
    timestep_ps: float
    acceptance: list
    round_trips: int
    wall_time_s: float
    ns_per_day: float
    platform: str

    @property
    def segments(self) -> np.ndarray:
        return np.loadtxt(self.frames, delimiter=",", skiprows=1, usecols=3, dtype=int, ndmin=1)


def geometric_temperatures(low_K: float, high_K: float, n: int) -> list[float]:
    """``n`` temperatures from ``low_K`` to ``high_K`` in a geometric ladder (equal swap rates for a
    heat capacity independent of temperature)."""
    if not (0 < low_K < high_K) or int(n) != n or n < 2:
        raise ValueError(f"need 0 < low_K < high_K and n >= 2, got {low_K}, {high_K}, {n}")
    return [float(t) for t in np.geomspace(low_K, high_K, int(n))]


def _check_temperatures(system, temperatures_K: Sequence[float]) -> list[float]:
    temperatures = [float(t) for t in temperatures_K]
    if len(temperatures) < 2 or not all(np.isfinite(t) and t > 0 for t in temperatures):
        raise ValueError(f"temperatures_K must be at least two positive temperatures, got {temperatures_K}")
    if any(b <= a for a, b in zip(temperatures, temperatures[1:])):
        raise ValueError(f"temperatures_K must increase strictly, got {temperatures_K}")
    target = system.temperature.value_in_unit(unit.kelvin)
    if abs(temperatures[0] - target) > 1e-6 * target:
        raise ValueError(
            f"the lowest temperature ({temperatures[0]} K) must be the system's ({target} K): its frames are the output"
        )
    return temperatures


def simulate_tempering(
    system,
    temperatures_K: Sequence[float],
    ns: float | None = None,
    steps: int | None = None,
    interval: int = 100,
    exchange_interval: int = 1000,
    out="tempering",
    seed: int = 0,
    platform: str | None = None,
    timestep=None,
    friction=None,
    equilibration_steps: int = 10000,
    progress: bool = True,
    reuse: bool = False,
) -> TemperingResult:
    """Parallel tempering of ``system``; write the frames at ``temperatures_K[0]`` (the system's).

    Args:
        system: an ``openflow.systems.System``.
        temperatures_K: increasing temperatures (K), the first equal to ``system.temperature``.
        ns / steps: production length per replica, exactly one of them.
        interval: steps between saved frames; ``exchange_interval``: steps between swap attempts
            (a multiple of ``interval``).
        seed: seeds velocities, Langevin noise of every replica and the swap decisions.
        platform: OpenMM platform name or None (see ``select_platform``).
        reuse: return the finished run in ``out`` if it has exactly these settings.
    """
    temperatures = _check_temperatures(system, temperatures_K)
    length = run_length(system, steps, ns, timestep, friction, positive_integer(interval, "interval"))
    dt_ps, gamma_ps, n_steps, interval = length.dt_ps, length.gamma_ps, length.steps, length.interval
    exchange_interval = positive_integer(exchange_interval, "exchange_interval")
    if exchange_interval % interval:
        raise ValueError(f"exchange_interval ({exchange_interval}) must be a multiple of interval ({interval})")
    if int(equilibration_steps) != equilibration_steps or equilibration_steps < 0:
        raise ValueError(f"equilibration_steps must be a whole number >= 0, got {equilibration_steps}")
    out = Path(out)
    settings = dict(
        system=system.name,
        parameters=system.parameters,
        temperatures_K=temperatures,
        steps=n_steps,
        interval=interval,
        exchange_interval=exchange_interval,
        timestep_ps=dt_ps,
        friction_per_ps=gamma_ps,
        equilibration_steps=int(equilibration_steps),
        seed=int(seed),
    )
    if reuse:
        previous = finished_run(out, OUTPUT_NAMES["metadata"], settings, OUTPUT_NAMES.values())
        if previous is not None:
            fields = {key: previous[key] for key in TemperingResult.__dataclass_fields__ if key in previous}
            return TemperingResult(**dict(fields, **{key: out / name for key, name in OUTPUT_NAMES.items()}))

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    replicas, start = [], None
    for k, temperature in enumerate(temperatures):  # the first replica is minimised, the others start from its minimum
        replica = create_simulation(
            system,
            int(seed) * 1000 + k,
            platform,
            dt_ps,
            gamma_ps,
            temperature * unit.kelvin,
            positions=start,
            minimize=k == 0,
        )
        start = replica.context.getState(getPositions=True).getPositions(asNumpy=True) if k == 0 else start
        replica.step(int(equilibration_steps))
        replicas.append(replica)
    contexts = [replica.context for replica in replicas]

    betas = 1.0 / (MOLAR_GAS_CONSTANT * np.asarray(temperatures))
    n_pairs = len(temperatures) - 1
    accepted, attempted = np.zeros(n_pairs), np.zeros(n_pairs)
    walker_at = np.arange(len(temperatures))  # which walker each temperature holds
    last_end = np.full(len(temperatures), -1)  # per walker: 0 after visiting the lowest T, 1 after the highest
    round_trips, segment = 0, 0
    n_frames = n_steps // interval
    frames_per_exchange = exchange_interval // interval

    with partial_outputs(out, OUTPUT_NAMES) as part:
        with open(part["topology"], "w") as handle:
            app.PDBFile.writeFile(system.topology, start, handle)
        clock = time.perf_counter()
        with open(part["trajectory"], "wb") as dcd_handle, open(part["frames"], "w") as log:
            dcd = app.DCDFile(dcd_handle, system.topology, dt_ps * unit.picosecond, interval, interval)
            log.write("frame,time_ps,potential_kjmol,segment\n")
            bar = progress_bar(n_frames, f"tempering {system.name} x{len(temperatures)}", progress, unit="frame")
            for frame in range(n_frames):
                bar.update(1)
                for replica in replicas:
                    replica.step(interval)
                state = contexts[0].getState(getPositions=True, getEnergy=True, groups=system.energy_groups())
                dcd.writeModel(state.getPositions(asNumpy=True))
                log.write(
                    f"{frame},{(frame + 1) * interval * dt_ps:.6g},"
                    f"{state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole):.10g},{segment}\n"
                )
                if (frame + 1) % frames_per_exchange:
                    continue
                energies = np.array(
                    [
                        c.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                        for c in contexts
                    ]
                )
                for i in range((frame // frames_per_exchange) % 2, n_pairs, 2):
                    j = i + 1
                    attempted[i] += 1
                    if np.log(rng.random()) < (betas[i] - betas[j]) * (energies[i] - energies[j]):
                        accepted[i] += 1
                        _swap(contexts[i], contexts[j], temperatures[i], temperatures[j])
                        walker_at[[i, j]] = walker_at[[j, i]]
                        energies[[i, j]] = energies[[j, i]]
                        segment += i == 0
                round_trips += update_round_trips(walker_at, last_end)
        bar.close()
        wall = time.perf_counter() - clock
        total_ns = n_steps * dt_ps * 1e-3
        result = TemperingResult(
            **{key: out / name for key, name in OUTPUT_NAMES.items()},
            temperatures_K=temperatures,
            n_frames=n_frames,
            steps=n_steps,
            interval=interval,
            exchange_interval=exchange_interval,
            timestep_ps=dt_ps,
            acceptance=(accepted / np.maximum(attempted, 1)).tolist(),
            round_trips=int(round_trips),
            wall_time_s=wall,
            ns_per_day=total_ns / max(wall, 1e-12) * 86400.0,
            platform=platform_name(replicas[0]),
        )
        metadata = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(result).items()}
        metadata.update(settings=settings, n_segments=segment + 1, openmm=openmm.__version__)
        part["metadata"].write_text(json.dumps(plain_json(metadata), indent=2))
    return result


def _swap(a: openmm.Context, b: openmm.Context, temperature_a: float, temperature_b: float) -> None:
    """Exchange configurations of two contexts, velocities rescaled to the new temperatures."""
    sa = a.getState(getPositions=True, getVelocities=True)
    sb = b.getState(getPositions=True, getVelocities=True)
    a.setPositions(sb.getPositions(asNumpy=True))
    b.setPositions(sa.getPositions(asNumpy=True))
    a.setVelocities(sb.getVelocities(asNumpy=True) * np.sqrt(temperature_a / temperature_b))
    b.setVelocities(sa.getVelocities(asNumpy=True) * np.sqrt(temperature_b / temperature_a))


def update_round_trips(walker_at: np.ndarray, last_end: np.ndarray) -> int:
    """Track walkers at the ends of the ladder; count round trips completed (bottom -> top -> bottom).

    ``last_end`` per walker: -1 before its first visit to the bottom, 0 after the bottom, 1 after
    reaching the top from the bottom."""
    bottom, top = walker_at[0], walker_at[-1]
    completed = int(last_end[bottom] == 1)
    last_end[bottom] = 0
    if last_end[top] == 0:
        last_end[top] = 1
    return completed
