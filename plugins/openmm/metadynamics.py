"""Well-tempered metadynamics with ``openmm.app.Metadynamics`` on learned or phi/psi CVs.

:func:`run_metadynamics` runs Langevin dynamics of an ``openflow.systems.System`` with a bias on
1-3 ``BiasVariable``s (:func:`phi_psi_bias_variables`, :func:`learned_bias_variables`) and writes
into ``out``:

- ``trajectory.dcd`` + ``topology.pdb``: the biased trajectory (one frame per ``interval`` steps);
- ``COLVAR``: PLUMED-style ``#! FIELDS time cv1 ... bias phi psi`` (ps, CV units, kJ/mol, rad),
  one row per frame (:class:`~openflow.plugins.openmm.reporters.ColvarReporter`);
- ``weights.npy``: a reweighting weight per frame (see below), for ``openflow rama --weights``;
- ``bias.npz``: the final bias ``V(s)`` (kJ/mol) on OpenMM's grid (``axes``: one array per CV,
  grid point ``i`` at ``linspace(min, max, gridWidth)[i]``; the array is indexed ``[s1, s2, ...]``),
  ``fes.npz``: the sum_hills-like free energy ``F(s) = -(gamma / (gamma - 1)) V(s)`` (min 0);
- ``bias/``: OpenMM's own bias files (``saveFrequency``/``biasDir``), the state to continue from;
  ``state.xml``: positions, velocities and time at the end; ``metadynamics.json``: settings + results.

**Continuing a run**: ``run_metadynamics(..., continue_from=PREVIOUS_OUT, out=NEW_OUT)`` copies
``PREVIOUS_OUT/bias/*.npy`` into ``NEW_OUT/bias/`` before the ``Metadynamics`` object is built (it
loads every bias file of another process from ``biasDir`` and adds it to its own), and starts from
``PREVIOUS_OUT/state.xml``. The CVs, their ranges and grids must be the same (checked against
``metadynamics.json``). The same works by hand: ``Metadynamics(..., saveFrequency=f, biasDir=DIR)``
with the old files in ``DIR``.

**Reweighting** (weights in ``weights.npy``): Tiwary & Parrinello's time-dependent constant,
``w_i = exp(beta (V(s_i, t_i) - c(t_i)))`` with ``c(t) = kT ln[ sum_s exp(gamma/(gamma-1) V(s,t)/kT)
/ sum_s exp(V(s,t)/((gamma-1) kT)) ]`` computed from the bias grid after each frame. Unlike the
simpler final-bias reweighting it uses every frame with the bias it was sampled under.
``delta_f_kT_t`` (ΔF between the phi basins, :mod:`openflow.analysis`) is this reweighted estimate
on the frames up to each time, so its drift shows convergence.

Measured facts this module designs around (DESIGN.md): 1-3 CVs, all periodic or none, bias factor
> 1, the bias is zero outside ``[min, max]`` (ranges of learned CVs come from ``CVModel.bounds()``),
the Simulation must be built after the Metadynamics object, and a CV force cannot be used by two
Metadynamics objects: every run here works on clones of the forces and of the ``openmm.System``.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
from scipy.special import logsumexp
from tqdm.auto import tqdm

from openflow import analysis
from openflow.features import backbone_torsions
from openflow.io import write_json

from .reporters import ColvarReporter, read_colvar

DEFAULT_TORSION_WIDTH = 0.35  # rad, Gaussian standard deviation on phi/psi
OUTPUTS = dict(trajectory="trajectory.dcd", topology="topology.pdb", colvar="COLVAR", weights="weights.npy",
               bias="bias.npz", fes="fes.npz", state="state.xml", settings="metadynamics.json", bias_dir="bias")


# ----------------------------------------------------------------------------- bias variables


def _torsion_force(quad) -> openmm.CustomTorsionForce:
    force = openmm.CustomTorsionForce("theta")
    force.addTorsion(*[int(i) for i in quad], [])
    return force


def phi_psi_bias_variables(system, which: Sequence[str] = ("phi", "psi"), width: float = DEFAULT_TORSION_WIDTH,
                           grid: int | None = None) -> list[app.BiasVariable]:
    """Periodic ``BiasVariable``s on the first backbone phi and/or psi, range ``[-pi, pi]``.

    ``width``: Gaussian standard deviation in rad; ``grid``: points per axis (OpenMM's default
    ``ceil(5 * 2 pi / width)`` when None).
    """
    torsions = backbone_torsions(getattr(system, "topology", system))
    unknown = [name for name in which if name not in ("phi", "psi")]
    if unknown or not which:
        raise ValueError(f"which must name 'phi' and/or 'psi', got {list(which)}")
    if not width > 0:
        raise ValueError(f"width must be positive (rad), got {width}")
    return [app.BiasVariable(_torsion_force(torsions[name][0]), -np.pi, np.pi, float(width), True, grid) for name in which]


def learned_bias_variables(cvs, width: float | Sequence[float], grid: int | Sequence[int] | None = None,
                           ranges: Sequence[tuple[float, float]] | None = None) -> list[app.BiasVariable]:
    """Non-periodic ``BiasVariable``s from CV models or exported CV forces.

    ``cvs``: ``openflow.cv.CVModel``s (exported with ``to_tabulated_cv_force`` when the CV is a
    function of at most three dihedrals, else ``to_custom_cv_force``; range from ``cv.bounds()``)
    and/or ``openmm.Force``s (e.g. read with ``load_cv_force``; they need ``ranges``). ``width``:
    Gaussian standard deviation(s) in CV units; ``grid``: points per axis (default: OpenMM's
    ``ceil(5 * range / width)``); ``ranges``: ``(min, max)`` per CV, overriding the bounds.
    The bias is zero outside ``[min, max]``: a range narrower than the CV can reach leaves it unbiased there.
    CV models are exported without a check: for a checked force use ``export_cv(cv, frames)`` and pass the force.
    """
    from openflow.cv import CVModel
    from openflow.features import Dihedrals

    from .export import to_custom_cv_force, to_tabulated_cv_force

    cvs = list(cvs) if isinstance(cvs, (list, tuple)) else [cvs]
    if not 1 <= len(cvs) <= 3:
        raise ValueError(f"openmm.app.Metadynamics takes 1 to 3 CVs, got {len(cvs)}")
    widths = [float(width)] * len(cvs) if np.isscalar(width) else [float(w) for w in width]
    grids = [grid] * len(cvs) if grid is None or np.isscalar(grid) else list(grid)
    if len(widths) != len(cvs) or len(grids) != len(cvs) or (ranges is not None and len(ranges) != len(cvs)):
        raise ValueError("give one width, grid and range per CV")
    variables = []
    for k, cv in enumerate(cvs):
        if isinstance(cv, CVModel):
            if cv.n_out != 1:
                raise ValueError("each CV model must have one output (n_out=1)")
            blocks = list(cv.features.blocks)
            tabulable = len(blocks) == 1 and isinstance(blocks[0], Dihedrals) and blocks[0].n_tuples <= 3
            force = to_tabulated_cv_force(cv) if tabulable else to_custom_cv_force(cv)
            lo, hi = (float(v[0]) for v in cv.bounds())
        elif isinstance(cv, openmm.Force):
            if ranges is None:
                raise ValueError("an exported CV force carries no range: give ranges=[(min, max), ...]")
            force, lo, hi = cv, -np.inf, np.inf
        else:
            raise TypeError(f"a CV must be an openflow.cv.CVModel or an openmm.Force, got {type(cv).__name__}")
        if ranges is not None:
            lo, hi = (float(v) for v in ranges[k])
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"CV {k}: the range must be finite with max > min, got ({lo}, {hi})")
        if not widths[k] > 0:
            raise ValueError(f"CV {k}: width must be positive, got {widths[k]}")
        variables.append(app.BiasVariable(force, lo, hi, widths[k], False, grids[k]))
    return variables


def _clone_variable(v: app.BiasVariable) -> app.BiasVariable:
    """A BiasVariable on a copy of its force (a force can serve only one Metadynamics object)."""
    return app.BiasVariable(openmm.XmlSerializer.clone(v.force), v.minValue, v.maxValue, v.biasWidth, v.periodic, v.gridWidth)


def _check_variables(variables) -> None:
    if not 1 <= len(variables) <= 3:
        raise ValueError(f"openmm.app.Metadynamics takes 1 to 3 CVs, got {len(variables)}")
    if not all(isinstance(v, app.BiasVariable) for v in variables):
        raise TypeError("variables must be openmm.app.BiasVariable objects")
    if len({v.periodic for v in variables}) > 1:
        raise ValueError("openmm.app.Metadynamics needs all CVs periodic or none")
    points = int(np.prod([v.gridWidth for v in variables]))
    if points > 4 * 10**5:
        raise ValueError(f"the bias grid has {points} points: too slow to update (use wider Gaussians or fewer grid points)")


def variable_signature(variables) -> list[dict]:
    """What must match for a run to continue another: range, width, periodicity and grid of each CV."""
    return [dict(min=float(v.minValue), max=float(v.maxValue), width=float(v.biasWidth), periodic=bool(v.periodic),
                 grid=int(v.gridWidth)) for v in variables]


# ----------------------------------------------------------------------------- bias and FES


def grid_axes(variables) -> list[np.ndarray]:
    """Grid point coordinates of each CV, ``linspace(min, max, gridWidth)`` (what OpenMM's tables use)."""
    return [np.linspace(v.minValue, v.maxValue, v.gridWidth) for v in variables]


def bias_grid(meta: app.Metadynamics) -> np.ndarray:
    """The current bias ``V`` (kJ/mol) indexed ``[s1, s2, ...]`` (OpenMM stores it reversed)."""
    gamma = meta.biasFactor
    free_energy = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    return np.ascontiguousarray(-free_energy * (gamma - 1.0) / gamma).transpose()


def fes_from_bias(bias: np.ndarray, bias_factor: float) -> np.ndarray:
    """sum_hills-like free energy of well-tempered metadynamics: ``F = -(gamma/(gamma-1)) V``, min 0."""
    if not bias_factor > 1:
        raise ValueError(f"bias_factor must be > 1, got {bias_factor}")
    free_energy = -(bias_factor / (bias_factor - 1.0)) * np.asarray(bias, dtype=np.float64)
    return free_energy - free_energy.min()


def reweighting_constant(bias: np.ndarray, bias_factor: float, kT: float, periodic: bool) -> float:
    """Tiwary-Parrinello ``c(t)`` in kJ/mol from a bias grid ``V`` (kJ/mol) on uniform CV grids.

    Periodic grids repeat their first point at the end: that point is counted once.
    """
    v = np.asarray(bias, dtype=np.float64)
    if periodic:
        v = v[tuple(slice(0, -1) for _ in range(v.ndim))]
    gamma = float(bias_factor)
    beta_v = v.reshape(-1) / kT
    return float(kT * (logsumexp(gamma / (gamma - 1.0) * beta_v) - logsumexp(beta_v / (gamma - 1.0))))


def basin_delta_f_from_fes(free_energy: np.ndarray, phi_axis: np.ndarray, kT: float, periodic: bool = True) -> float:
    """ΔF (kT, phi > 0 basin minus phi < 0 basin) from a free energy ``F[phi, ...]`` (kJ/mol) on a CV grid
    whose first axis is phi (rad, ``phi_axis``): integrates ``exp(-F/kT)`` over each basin. Periodic
    grids repeat their first point at the end: it is counted once."""
    f = np.asarray(free_energy, dtype=np.float64)
    if f.shape[0] != phi_axis.size:
        raise ValueError(f"the free energy has {f.shape[0]} points along phi, the axis {phi_axis.size}")
    if periodic:
        f, phi_axis = f[tuple(slice(0, -1) for _ in range(f.ndim))], phi_axis[:-1]
    log_p = logsumexp((-f / kT).reshape(f.shape[0], -1), axis=1)
    positive = analysis.basin_of(phi_axis) == 1
    return float(logsumexp(log_p[~positive]) - logsumexp(log_p[positive]))


def delta_f_convergence(phi, log_weights, n_points: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """ΔF (kT, positive minus negative basin) on the frames up to ``n_points`` evenly spaced ends.

    ``phi``: ``(T,)`` rad; ``log_weights``: ``(T,)``. Returns frame counts ``(n,)`` and ΔF ``(n,)``
    (inf while the positive basin is unvisited).
    """
    phi = np.asarray(phi, dtype=np.float64)
    log_w = np.asarray(log_weights, dtype=np.float64)
    ends = np.unique(np.linspace(0, phi.size, n_points + 1)[1:].round().astype(int))
    ends = ends[ends > 0]
    positive = analysis.basin_of(phi) == 1
    with np.errstate(divide="ignore"):
        cum_pos = np.logaddexp.accumulate(np.where(positive, log_w, -np.inf))
        cum_neg = np.logaddexp.accumulate(np.where(positive, -np.inf, log_w))
    return ends, cum_neg[ends - 1] - cum_pos[ends - 1]


# ----------------------------------------------------------------------------- running


@dataclass
class MetadynamicsResult:
    """What :func:`run_metadynamics` wrote and measured (times in ps, speeds in ns/day)."""

    out: Path
    files: dict
    steps: int
    timestep_ps: float
    wall_time_s: float
    ns_per_day: float
    platform: str
    transitions: int
    transitions_per_ns: float
    populations: dict
    delta_f_kT: float
    delta_f_kT_t: list = field(default_factory=list)  # [(time ps, ΔF kT), ...]
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Flat JSON-friendly metrics."""
        return dict(steps=self.steps, timestep_ps=self.timestep_ps, wall_time_s=self.wall_time_s, ns_per_day=self.ns_per_day,
                    platform=self.platform, transitions=self.transitions, transitions_per_ns=self.transitions_per_ns,
                    population_positive=self.populations["positive"], delta_f_kT=self.delta_f_kT,
                    effective_sample_size=self.populations["effective_sample_size"])


def _fresh_bias_id(create):
    """Run ``create()`` with numpy's global generator freshly seeded from the OS, then restore it.

    ``Metadynamics`` names its bias files after ``np.random.randint``: a caller's fixed global seed
    would give a continued run the same name as its predecessor, whose bias it would then ignore.
    """
    saved = np.random.get_state()
    np.random.seed(None)
    try:
        return create()
    finally:
        np.random.set_state(saved)


def _prepare_continuation(continue_from: Path, bias_dir: Path, signature: list[dict]) -> Path:
    settings = continue_from / OUTPUTS["settings"]
    state = continue_from / OUTPUTS["state"]
    for path in (settings, state, continue_from / OUTPUTS["bias_dir"]):
        if not path.exists():
            raise FileNotFoundError(f"cannot continue from {continue_from}: {path.name} is missing")
    previous = json.loads(settings.read_text()).get("variables")
    if previous != signature:
        raise ValueError(f"cannot continue from {continue_from}: its CVs {previous} differ from these {signature}")
    for file in (continue_from / OUTPUTS["bias_dir"]).glob("bias_*.npy"):
        shutil.copy2(file, bias_dir / file.name)
    return state


def run_metadynamics(system, variables, steps: int | None = None, ns: float | None = None, out="metadynamics",
                     height: float = 1.0, bias_factor: float = 6.0, frequency: int = 500, interval: int | None = None,
                     platform: str | None = None, seed: int | None = None, timestep=None, friction=None,
                     equilibration_steps: int = 1000, continue_from=None, cv_names: Sequence[str] | None = None,
                     progress: bool = True) -> MetadynamicsResult:
    """Well-tempered metadynamics (or, with ``variables=[]``, plain MD written the same way).

    Args:
        system: an ``openflow.systems.System`` with a peptide backbone (phi/psi are reported).
        variables: 1-3 ``openmm.app.BiasVariable`` (cloned: they can be reused), ``"phi-psi"``,
            or ``[]`` for unbiased MD.
        steps / ns: run length, exactly one.
        height: initial Gaussian height, kJ/mol; bias_factor: gamma > 1 (CV temperature T*gamma);
        frequency: steps between Gaussians; interval: steps between frames/COLVAR rows (default 1 ps).
        platform: OpenMM platform name or None/"auto"; seed: velocities and Langevin noise.
        timestep / friction: ps and 1/ps (defaults: ``openflow.data.default_timestep``, 1/ps).
        equilibration_steps: unbiased steps after minimisation, not written (fresh runs only).
        continue_from: the ``out`` folder of a previous run with the same CVs (see the module).
        cv_names: COLVAR names of the CVs (default ``cv1, cv2, ...``).
    Returns a :class:`MetadynamicsResult`; the files are listed in the module docstring.
    """
    from openflow.data import DEFAULT_FRICTION_PER_PS, FRAME_EVERY_PS, _openmm_seeds, _positive, _steps_from, default_timestep

    from .platforms import select_platform

    if isinstance(variables, str):
        if variables != "phi-psi":
            raise ValueError(f"variables must be BiasVariables, [] or 'phi-psi', got {variables!r}")
        variables = phi_psi_bias_variables(system)
    variables = [_clone_variable(v) for v in variables]
    biased = bool(variables)
    if biased:
        _check_variables(variables)
        if not bias_factor > 1:
            raise ValueError(f"bias_factor must be > 1, got {bias_factor}")
        if not height > 0:
            raise ValueError(f"height must be positive (kJ/mol), got {height}")
    if int(frequency) != frequency or frequency < 1:
        raise ValueError(f"frequency must be a positive integer, got {frequency}")
    dt_ps = _positive(default_timestep(system) if timestep is None else timestep, unit.picosecond, "timestep")
    gamma_ps = _positive(DEFAULT_FRICTION_PER_PS if friction is None else friction, unit.picosecond**-1, "friction")
    n_steps = _steps_from(steps, ns, dt_ps)
    interval = max(1, round(FRAME_EVERY_PS / dt_ps)) if interval is None else interval
    if int(interval) != interval or not 1 <= interval <= n_steps:
        raise ValueError(f"interval must be an integer in [1, {n_steps}] steps, got {interval}")
    interval = int(interval)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    noise_seed, velocity_seed = _openmm_seeds(seed)
    torsions = backbone_torsions(system.topology)
    torsions = {name: torsions[name][0] for name in ("phi", "psi")}

    out = Path(out)
    files = {key: out / name for key, name in OUTPUTS.items()}
    files["bias_dir"].mkdir(parents=True, exist_ok=True)
    signature = variable_signature(variables)
    start_state = None
    if continue_from is not None:
        if not biased:
            raise ValueError("continue_from needs a biased run")
        if Path(continue_from).resolve() == out.resolve():
            raise ValueError(f"write a continued run into a new folder, not into {continue_from} itself")
        start_state = _prepare_continuation(Path(continue_from), files["bias_dir"], signature)

    chosen = select_platform(platform, system.system, system.positions, task="md")
    omm_system = openmm.XmlSerializer.clone(system.system)
    meta, bias_group = None, None
    if biased:
        meta = _fresh_bias_id(lambda: app.Metadynamics(omm_system, variables, system.temperature, float(bias_factor),
                                                        float(height) * unit.kilojoule_per_mole, int(frequency),
                                                        saveFrequency=int(frequency), biasDir=str(files["bias_dir"])))
        bias_group = omm_system.getForce(omm_system.getNumForces() - 1).getForceGroup()
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, gamma_ps / unit.picosecond, dt_ps * unit.picosecond)
    integrator.setRandomNumberSeed(noise_seed)
    simulation = app.Simulation(system.topology, omm_system, integrator, chosen)  # after Metadynamics: it adds a force
    if start_state is not None:
        simulation.loadState(str(start_state))
    else:
        simulation.context.setPositions(system.positions)
        simulation.minimizeEnergy()
        simulation.context.setVelocitiesToTemperature(system.temperature, velocity_seed)
        simulation.step(int(equilibration_steps))  # the bias is still zero: plain MD
        simulation.currentStep = 0
        simulation.context.setTime(0.0)
    with open(files["topology"], "w") as handle:
        app.PDBFile.writeFile(system.topology, simulation.context.getState(getPositions=True).getPositions(), handle)

    names = list(cv_names) if cv_names is not None else [f"cv{i + 1}" for i in range(len(variables))]
    if len(names) != len(variables):
        raise ValueError(f"{len(names)} cv_names for {len(variables)} CVs")
    colvar = ColvarReporter(files["colvar"], interval, meta.getCollectiveVariables if biased else None,
                            names if biased else None, bias_group, torsions)
    simulation.reporters.extend([app.DCDReporter(str(files["trajectory"]), interval), colvar])
    kT = (unit.MOLAR_GAS_CONSTANT_R * system.temperature).value_in_unit(unit.kilojoule_per_mole)
    periodic = biased and variables[0].periodic
    constants = []
    start = time.perf_counter()
    with tqdm(total=n_steps, unit="step", desc="metadynamics" if biased else "MD", disable=not progress) as bar:
        remaining = n_steps
        while remaining > 0:  # chunks end where the reporters write a row, so c(t) matches each row
            chunk = min(interval - simulation.currentStep % interval, remaining)
            if biased:
                meta.step(simulation, chunk)
            else:
                simulation.step(chunk)
            if simulation.currentStep % interval == 0:
                constants.append(reweighting_constant(bias_grid(meta), bias_factor, kT, periodic) if biased else 0.0)
            remaining -= chunk
            bar.update(chunk)
    wall = time.perf_counter() - start
    colvar.close()
    simulation.reporters.clear()  # closes the DCD file
    simulation.saveState(str(files["state"]))

    data = read_colvar(files["colvar"])
    phi = data["phi"]
    if len(constants) != phi.size:
        raise RuntimeError(f"{phi.size} COLVAR rows but {len(constants)} reweighting constants")
    log_w = (data["bias"] - np.asarray(constants)) / kT
    weights = np.exp(log_w - log_w.max())
    np.save(files["weights"], weights / weights.sum())
    if biased:
        bias = bias_grid(meta)
        axes = {f"axis_{i}": a for i, a in enumerate(grid_axes(variables))}
        np.savez(files["bias"], bias_kjmol=bias, names=np.array(names), **axes)
        np.savez(files["fes"], free_energy_kjmol=fes_from_bias(bias, bias_factor), names=np.array(names), **axes)
    populations = analysis.basin_populations(phi, weights=weights)
    transitions = analysis.count_transitions(phi)
    ends, delta_t = delta_f_convergence(phi, log_w)
    time_ps = data["time"]
    settings = dict(variables=signature, cv_names=names, height_kjmol=height, bias_factor=bias_factor, frequency=frequency,
                    interval=interval, seed=seed, platform=chosen.getName(), timestep_ps=dt_ps, friction_per_ps=gamma_ps,
                    temperature_K=system.temperature.value_in_unit(unit.kelvin), continue_from=str(continue_from) if continue_from else None,
                    reweighting="Tiwary-Parrinello c(t): w = exp((V(s,t) - c(t))/kT)")
    simulated_ns = n_steps * dt_ps / 1000.0
    result = MetadynamicsResult(
        out=out, files=files, steps=n_steps, timestep_ps=dt_ps, wall_time_s=wall,
        ns_per_day=simulated_ns / (wall / 86400.0), platform=chosen.getName(), transitions=transitions,
        transitions_per_ns=transitions / simulated_ns, populations=populations, delta_f_kT=populations["delta_f_kT"],
        delta_f_kT_t=[(float(time_ps[e - 1]), float(d)) for e, d in zip(ends, delta_t)], settings=settings)
    write_json(files["settings"], dict(settings, results=result.summary(), delta_f_kT_t=result.delta_f_kT_t))
    return result


def step_costs(system, variables, steps: int = 2000, platform: str | None = None, frequency: int = 500, repeats: int = 3,
               timestep=None) -> dict:
    """Seconds per MD step without and with the bias (Gaussians deposited every ``frequency``), best of ``repeats``.

    One Simulation with the Metadynamics force, timed in interleaved rounds: with the bias's force
    group left out of the integration (bare MD, the bias is not computed) and with it
    (``Metadynamics.step``). Same Context, integrator and memory, so a changing machine load or
    the placement of one Context affects both alike. 100 warm-up steps each, no reporters. Returns
    ``{"bare_s_per_step", "biased_s_per_step", "speed_ratio", "platform"}`` (bare time / biased
    time: 1 means the bias is free).
    """
    from openflow.data import default_timestep

    from .platforms import select_platform

    variables = list(variables)
    _check_variables(variables)
    chosen = select_platform(platform, system.system, system.positions, task="md")
    dt = default_timestep(system) if timestep is None else timestep * unit.picosecond
    omm_system = openmm.XmlSerializer.clone(system.system)
    meta = _fresh_bias_id(lambda: app.Metadynamics(omm_system, [_clone_variable(v) for v in variables],
                                                    system.temperature, 5.0, 1.0, frequency))
    bias_group = omm_system.getForce(omm_system.getNumForces() - 1).getForceGroup()
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, 1.0, dt)
    simulation = app.Simulation(system.topology, omm_system, integrator, chosen)
    simulation.context.setPositions(system.positions)
    simulation.minimizeEnergy(maxIterations=100)
    simulation.context.setVelocitiesToTemperature(system.temperature, 1)
    every_group, without_bias = 0xFFFFFFFF, 0xFFFFFFFF & ~(1 << bias_group)

    def bare(n):
        integrator.setIntegrationForceGroups(without_bias)
        simulation.step(n)
        integrator.setIntegrationForceGroups(every_group)

    runs = {"bare": bare, "biased": lambda n: meta.step(simulation, n)}
    best = dict.fromkeys(runs, float("inf"))
    for step in runs.values():
        step(100)
    for _ in range(repeats):
        for name, step in runs.items():
            start = time.perf_counter()
            step(steps)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return {"bare_s_per_step": best["bare"], "biased_s_per_step": best["biased"], "speed_ratio": best["bare"] / best["biased"],
            "platform": chosen.getName()}
