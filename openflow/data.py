"""Trajectories: OpenMM simulation, mdtraj loading into torch, mdshare's alanine dipeptide data.

- :func:`simulate` runs Langevin dynamics of an ``openflow.systems.System`` and writes
  ``trajectory.dcd``, ``topology.pdb``, ``energies.csv`` and ``simulation.json`` into a folder.
- :func:`load` reads a trajectory with mdtraj into a ``(B, d)`` tensor of positions in nm.
- :func:`fetch_mdshare` / :func:`alanine_dipeptide_data` get mdshare's alanine dipeptide data
  when its server answers, and otherwise simulate with OpenMM (one line says so).

Outputs are written under a ``.part`` name and renamed when complete, so an interrupted run
never leaves a file that looks finished.
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch
from tqdm.auto import tqdm

MODEL_SYSTEM_TIMESTEP_PS = 0.01
DEFAULT_FRICTION_PER_PS = 1.0
FRAME_EVERY_PS = 1.0
EQUILIBRATION_PS = 10.0
OUTPUT_NAMES = dict(trajectory="trajectory.dcd", topology="topology.pdb", energies="energies.csv", metadata="simulation.json")
NAMED_SELECTIONS = {"heavy": "not element H", "backbone": "backbone"}


# ----------------------------------------------------------------------------- simulation


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


def default_timestep(system) -> unit.Quantity:
    """A stable Langevin time step for ``system``.

    Molecules (hydrogen atoms present): 2 fs with constraints (HBonds), 1 fs without (X-H
    stretches have periods near 10 fs). Model systems in reduced units (harmonic chain, Coulomb
    cluster; masses 1 amu, kT and spring constants of order 1 kJ/mol, 1 ps the time unit):
    0.01 ps. Their fastest motions are the chain's top normal mode (omega <= 2 sqrt(k/m) = 2/ps),
    the tethers of inactive components (sqrt(10 kT/m) ~ 3.2/ps) and the cluster's trap and pair
    modes (a few /ps), so omega*dt <= 0.05, deep inside the accuracy range of the
    LangevinMiddleIntegrator. Pass ``timestep=`` for stiffer or lighter variants.
    """
    has_hydrogen = any(a.element is not None and a.element.symbol == "H" for a in system.topology.atoms())
    if not has_hydrogen:
        return MODEL_SYSTEM_TIMESTEP_PS * unit.picosecond
    return (2.0 if system.system.getNumConstraints() > 0 else 1.0) * unit.femtosecond


def _positive(value, in_unit, name: str) -> float:
    """A Quantity (converted to ``in_unit``) or a plain number, checked positive and finite."""
    number = value.value_in_unit(in_unit) if unit.is_quantity(value) else float(value)
    if not (np.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return number


def _openmm_seeds(seed: int) -> tuple[int, int]:
    """Two independent seeds in 1..2**31-1 (OpenMM reads 0 as 'random') for noise and velocities."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    noise, velocities = np.random.SeedSequence(int(seed)).generate_state(2) % (2**31 - 1) + 1
    return int(noise), int(velocities)


class _TrajectoryReporter:
    """Writes positions (nm) to an open binary DCD file handle every ``interval`` steps."""

    def __init__(self, handle, interval: int):
        self._handle, self._interval, self._dcd = handle, interval, None

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state):
        if self._dcd is None:
            dt = simulation.integrator.getStepSize()
            self._dcd = app.DCDFile(self._handle, simulation.topology, dt, self._interval, self._interval)
        self._dcd.writeModel(state.getPositions(asNumpy=True))


class _PhysicalEnergyReporter(app.StateDataReporter):
    """StateDataReporter whose potential energy counts only ``groups`` (leaves out the tethers)."""

    def __init__(self, handle, interval: int, groups: int):
        super().__init__(handle, interval, step=True, time=True, potentialEnergy=True, kineticEnergy=True, temperature=True, speed=True)
        self._groups = groups

    def report(self, simulation, state):
        super().report(simulation, simulation.context.getState(getEnergy=True, groups=self._groups))


def _steps_from(steps, ns, timestep_ps: float) -> int:
    if (steps is None) == (ns is None):
        raise ValueError("give exactly one of steps and ns")
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        return int(steps)
    if not ns > 0:
        raise ValueError(f"ns must be positive, got {ns}")
    return max(1, round(ns * 1000.0 / timestep_ps))


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
        platform: OpenMM platform name, or None/"auto" (see ``select_platform``).
        timestep: Quantity or ps (default :func:`default_timestep`).
        friction: Quantity or 1/ps (default 1/ps).
        equilibration_steps: unsaved steps after minimisation (default: 10 ps worth).
        reporters: further OpenMM reporters attached to the production run.
        reuse: return the finished run already in ``out`` instead of simulating again, when its
            ``simulation.json`` records the same system, parameters, seed, steps, interval, time
            step and friction (a cache for workflows; needs an explicit ``seed``).

    Writes into ``out``: ``trajectory.dcd`` (positions, nm; frame i at step (i+1)*interval),
    ``topology.pdb`` (the minimised structure), ``energies.csv`` (StateDataReporter CSV: step,
    time ps, potential kJ/mol, kinetic kJ/mol, temperature K, speed ns/day; the potential is the
    physical energy ``System.energy_groups()``, without the tethers of inactive components) and
    ``simulation.json`` (every setting, the seed, the platform and the speed).
    """
    dt_ps = _positive(default_timestep(system) if timestep is None else timestep, unit.picosecond, "timestep")
    gamma_ps = _positive(DEFAULT_FRICTION_PER_PS if friction is None else friction, unit.picosecond**-1, "friction")
    n_steps = _steps_from(steps, ns, dt_ps)
    interval = max(1, round(FRAME_EVERY_PS / dt_ps)) if interval is None else interval
    if int(interval) != interval or interval < 1:
        raise ValueError(f"interval must be a positive integer, got {interval}")
    interval = int(interval)
    if interval > n_steps:
        raise ValueError(f"interval ({interval} steps) is longer than the run ({n_steps} steps): no frame would be saved")
    if equilibration_steps is None:
        equilibration_steps = round(EQUILIBRATION_PS / dt_ps)
    if int(equilibration_steps) != equilibration_steps or equilibration_steps < 0:
        raise ValueError(f"equilibration_steps must be a non-negative integer, got {equilibration_steps}")
    if reuse and seed is not None:
        previous = _finished_run(Path(out), system, seed, n_steps, interval, dt_ps, gamma_ps)
        if previous is not None:
            return previous
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    noise_seed, velocity_seed = _openmm_seeds(seed)

    from openflow.plugins.openmm import select_platform

    chosen = select_platform(platform, system.system, system.positions, task="md")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, gamma_ps / unit.picosecond, dt_ps * unit.picosecond)
    integrator.setRandomNumberSeed(noise_seed)
    simulation = app.Simulation(system.topology, system.system, integrator, chosen)
    simulation.context.setPositions(system.positions)
    if minimize:
        simulation.minimizeEnergy()
    start_positions = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    simulation.context.setVelocitiesToTemperature(system.temperature, velocity_seed)
    simulation.step(int(equilibration_steps))
    simulation.currentStep = 0
    simulation.context.setTime(0.0)

    final = {key: out / name for key, name in OUTPUT_NAMES.items()}
    part = {key: path.with_name(path.name + ".part") for key, path in final.items()}
    with open(part["topology"], "w") as handle:
        app.PDBFile.writeFile(system.topology, start_positions, handle)
    with open(part["trajectory"], "wb") as dcd, open(part["energies"], "w") as log:
        simulation.reporters.extend([_TrajectoryReporter(dcd, interval), _PhysicalEnergyReporter(log, interval, system.energy_groups()), *reporters])
        chunk = interval * max(1, n_steps // interval // 100)
        start = time.perf_counter()
        with tqdm(total=n_steps, unit="step", desc=f"simulate {system.name}", disable=not progress) as bar:
            for done in range(0, n_steps, chunk):
                simulation.step(min(chunk, n_steps - done))
                bar.update(min(chunk, n_steps - done))
        wall = time.perf_counter() - start
        simulation.reporters.clear()

    result = SimulationResult(
        **final,
        n_frames=n_steps // interval,
        steps=n_steps,
        interval=interval,
        timestep_ps=dt_ps,
        wall_time_s=wall,
        ns_per_day=n_steps * dt_ps * 1e-3 / max(wall, 1e-12) * 86400.0,
        platform=chosen.getName(),
    )
    metadata = dict(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()},
        system=system.name,
        parameters=system.parameters,
        temperature_K=system.temperature.value_in_unit(unit.kelvin),
        friction_per_ps=gamma_ps,
        equilibration_steps=int(equilibration_steps),
        minimized=minimize,
        seed=int(seed),
        openmm=openmm.__version__,
    )
    part["metadata"].write_text(json.dumps(metadata, indent=2, default=str))
    for key in ("topology", "energies", "metadata", "trajectory"):
        os.replace(part[key], final[key])
    return result


def _finished_run(out: Path, system, seed, steps, interval, dt_ps, gamma_ps) -> SimulationResult | None:
    """The run recorded in ``out/simulation.json`` if it has exactly these settings, else None."""
    try:
        saved = json.loads((out / OUTPUT_NAMES["metadata"]).read_text())
    except (OSError, ValueError):
        return None
    wanted = dict(system=system.name, parameters=json.loads(json.dumps(system.parameters, default=str)), seed=int(seed),
                  steps=steps, interval=interval, timestep_ps=dt_ps, friction_per_ps=gamma_ps)
    if any(saved.get(key) != value for key, value in wanted.items()):
        return None
    fields = {key: saved[key] for key in SimulationResult.__dataclass_fields__}
    fields.update({key: out / name for key, name in OUTPUT_NAMES.items()})
    if not all(fields[key].exists() for key in OUTPUT_NAMES):
        return None
    return SimulationResult(**fields)


# ----------------------------------------------------------------------------- loading


def _existing(path, what: str) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return str(path)


def kabsch(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Superpose ``x (T, m, 3)`` on ``reference (m, 3)``: the optimal rotation (batched SVD) about the
    centroids, then the reference's centroid; same dtype as ``x``.

    Used instead of mdtraj's ``superpose``, whose float32 QCP iteration returns the identity (an
    unaligned frame) for the rare frame where it does not converge (1 in 20 000 alanine frames).
    """
    x = x - x.mean(1, keepdim=True)
    centre = reference.mean(0)
    u, _, vt = torch.linalg.svd(x.transpose(1, 2) @ (reference - centre))
    sign = torch.sign(torch.linalg.det(u @ vt))
    u = torch.cat([u[..., :2], u[..., 2:] * sign[:, None, None]], -1)
    return x @ (u @ vt) + centre


def load(
    traj,
    top=None,
    selection: str | None = None,
    align: bool = False,
    system=None,
    stride: int = 1,
    dtype: torch.dtype = torch.float32,
    reference=None,
) -> torch.Tensor:
    """Read a trajectory into a ``(B, d)`` tensor of positions in nm.

    Args:
        traj: trajectory file (DCD, XTC, PDB, ... anything mdtraj reads) or a list of them.
        top: topology file (PDB); may be omitted when ``system`` is given.
        selection: an mdtraj selection string, or ``"heavy"`` (no hydrogens) or ``"backbone"``;
            ``d = 3 * n_selected``, atoms in file order, xyz interleaved.
        align: superpose every frame on ``reference`` (default: the first loaded frame) by the
            optimal translation and rotation (Kabsch) over the selected atoms. This removes
            rigid-body motion, which carries no energy but would otherwise be modelled by a flow.
        system: an ``openflow.systems.System``; without ``selection`` the result holds its active
            coordinates (``system.from_positions``), so the inactive components are dropped.
        stride: keep every ``stride``-th frame.
        reference: alignment target, an ``mdtraj.Trajectory`` or positions of the selected atoms,
            ``(n_selected, 3)`` or flat ``(3 * n_selected,)`` like one row of the result, nm.
    """
    import mdtraj

    paths = [traj] if isinstance(traj, (str, os.PathLike)) else list(traj)
    paths = [_existing(p, "trajectory") for p in paths]
    if top is None:
        if system is None:
            raise ValueError("give a topology file (top=) or a system (system=)")
        topology = system.mdtraj_topology
    else:
        topology = mdtraj.load_topology(_existing(top, "topology"))
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")

    atoms = None
    if selection is not None:
        expression = NAMED_SELECTIONS.get(selection, selection)
        try:
            atoms = topology.select(expression)
        except Exception as error:  # mdtraj raises several types for a bad expression
            raise ValueError(f"bad atom selection {selection!r}: {error}") from None
        if len(atoms) == 0:
            raise ValueError(f"atom selection {selection!r} matches no atom")
    elif system is not None and align and not system.active.all():
        raise ValueError("align=True would mix active and inactive components of this system")
    frames = mdtraj.load(paths, top=topology, stride=int(stride), atom_indices=atoms)

    if align:
        if reference is None:
            target = frames[0]
        elif isinstance(reference, mdtraj.Trajectory):
            target = reference
        else:
            xyz = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, dtype=np.float32)
            if xyz.size != 3 * frames.n_atoms:
                raise ValueError(f"reference must hold {frames.n_atoms} x 3 positions, got shape {xyz.shape}")
            target = mdtraj.Trajectory(xyz.reshape(1, frames.n_atoms, 3), frames.topology)
        if target.n_atoms != frames.n_atoms:
            raise ValueError(f"reference has {target.n_atoms} atoms, the selection {frames.n_atoms}")
        aligned = kabsch(torch.as_tensor(frames.xyz, dtype=torch.float64), torch.as_tensor(target.xyz[0], dtype=torch.float64))
        frames.xyz = aligned.numpy()

    if selection is None and system is not None:
        return system.from_positions(frames.xyz, dtype=dtype)
    return torch.as_tensor(frames.xyz.reshape(frames.n_frames, -1), dtype=dtype)


# ----------------------------------------------------------------------------- mdshare

MDSHARE_URL = "http://ftp.imp.fu-berlin.de/pub/cmb-data/"
ALANINE_FILES = dict(
    pdb="alanine-dipeptide-nowater.pdb",
    dihedrals="alanine-dipeptide-3x250ns-backbone-dihedrals.npz",
    positions="alanine-dipeptide-3x250ns-heavy-atom-positions.npz",
)
MDSHARE_FRAME_PS = 1.0


def _say(message: str) -> None:
    print(f"openflow: {message}", file=sys.stderr)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` s (name lookup included), or None."""
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    outcome: list = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    worker = threading.Thread(target=connect, daemon=True)  # a stuck name lookup cannot block us
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _mdshare_checksums() -> dict[str, str]:
    """md5 of every file in mdshare's catalogue, read from the installed package's data.

    The catalogue is read as a file: importing mdshare 0.4.2 fails on setuptools >= 81
    (it needs ``pkg_resources``), and the download itself needs nothing from it.
    """
    import yaml

    spec = importlib.util.find_spec("mdshare")
    if spec is None or not spec.submodule_search_locations:
        return {}
    catalogue = Path(list(spec.submodule_search_locations)[0]) / "data" / "mdshare-catalogue.yaml"
    if not catalogue.exists():
        return {}
    index = yaml.safe_load(catalogue.read_text()).get("index", {})
    return {name: entry["hash"] for name, entry in index.items()}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_mdshare(filename: str, directory="mdshare", timeout: float = 3.0, url: str = MDSHARE_URL, progress: bool = True) -> Path | None:
    """Download ``filename`` from the mdshare repository into ``directory``; return its path.

    A file already in ``directory`` is returned without touching the network. When the server
    cannot be reached within ``timeout`` seconds (or the download fails or its md5 differs from
    mdshare's catalogue) one line goes to stderr and the result is ``None``: never a traceback,
    never a hang.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https") or not urllib.parse.urlsplit(url).hostname:
        raise ValueError(f"url must look like http://host/folder/, got {url!r}")
    target = Path(directory) / filename
    if target.exists():
        return target
    why = _unreachable(url, timeout)
    if why is not None:
        _say(f"mdshare ({urllib.parse.urlsplit(url).hostname}) is not reachable ({why}); {filename} not fetched")
        return None
    checksum = _mdshare_checksums().get(filename)
    partial = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # the host answered: allow a slow transfer, but not a stalled one
        with urllib.request.urlopen(url.rstrip("/") + "/" + filename, timeout=max(timeout, 30.0)) as response, open(partial, "wb") as handle:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    bar.update(len(block))
        if checksum is not None and _md5(partial) != checksum:
            raise OSError("md5 checksum differs from mdshare's catalogue")
    except (OSError, http.client.HTTPException) as error:
        partial.unlink(missing_ok=True)
        _say(f"downloading {filename} from mdshare failed ({error})")
        return None
    os.replace(partial, target)
    return target


@dataclass
class AlanineDipeptideData:
    """Alanine dipeptide trajectories as tensors.

    Attributes:
        positions: one ``(T, 30)`` tensor per trajectory, heavy-atom positions in nm (the 10
            heavy atoms of ``pdb`` in file order, xyz interleaved), not aligned.
        dihedrals: one ``(T, 2)`` tensor per trajectory, backbone (phi, psi) in radians.
        pdb: topology file with all 22 atoms.
        frame_ps: time between frames, ps.
        source: ``"mdshare"`` (3 x 250 ns in explicit water) or ``"openmm"`` (local simulation).
    """

    positions: list[torch.Tensor]
    dihedrals: list[torch.Tensor]
    pdb: Path
    frame_ps: float
    source: str


def _npz_tensors(path: Path, dtype) -> list[torch.Tensor]:
    with np.load(path) as archive:
        return [torch.as_tensor(archive[key], dtype=dtype) for key in sorted(archive.files)]


def alanine_dipeptide_data(
    directory="mdshare",
    timeout: float = 3.0,
    url: str = MDSHARE_URL,
    system=None,
    steps: int | None = None,
    ns: float | None = None,
    interval: int | None = None,
    seed: int | None = None,
    platform: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> AlanineDipeptideData:
    """mdshare's alanine dipeptide data when reachable, else a fresh OpenMM simulation.

    The fallback simulates ``system`` (default ``alanine_dipeptide()``: vacuum, amber99sb-ildn)
    with :func:`simulate` for ``steps`` or ``ns`` (default 1 ns) into ``directory/openmm`` and
    returns its heavy atoms and (phi, psi) in the same layout; one line on stderr says so.
    """
    import mdtraj

    fetched = {}
    for key, name in ALANINE_FILES.items():  # the small PDB first: offline costs one check, one line
        path = fetch_mdshare(name, directory, timeout, url, progress)
        if path is None:
            break
        fetched[key] = path
    if len(fetched) == len(ALANINE_FILES):
        return AlanineDipeptideData(
            positions=_npz_tensors(fetched["positions"], dtype),
            dihedrals=_npz_tensors(fetched["dihedrals"], dtype),
            pdb=fetched["pdb"],
            frame_ps=MDSHARE_FRAME_PS,
            source="mdshare",
        )
    if system is None:
        from openflow.systems import alanine_dipeptide

        system = alanine_dipeptide()
    ns = 1.0 if steps is None and ns is None else ns
    _say(f"mdshare data unavailable: simulating alanine dipeptide with OpenMM instead ({f'{steps} steps' if steps else f'{ns:g} ns'}, into {Path(directory) / 'openmm'})")
    run = simulate(system, steps=steps, ns=ns, interval=interval, out=Path(directory) / "openmm", seed=seed, platform=platform, progress=progress)
    frames = mdtraj.load(str(run.trajectory), top=str(run.topology))
    phi = mdtraj.compute_phi(frames)[1][:, 0]
    psi = mdtraj.compute_psi(frames)[1][:, 0]
    return AlanineDipeptideData(
        positions=[load(run.trajectory, run.topology, selection="heavy", dtype=dtype)],
        dihedrals=[torch.as_tensor(np.stack([phi, psi], axis=1), dtype=dtype)],
        pdb=run.topology,
        frame_ps=run.timestep_ps * run.interval,
        source="openmm",
    )
