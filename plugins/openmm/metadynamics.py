"""Well-tempered metadynamics with ``openmm.app.Metadynamics`` on any ``BiasVariable``s.

:func:`run_metadynamics` runs Langevin dynamics of an ``openflow.systems.System`` with a bias on
1-3 ``BiasVariable``s (``openflow.plugins.openmm.bias``: on torsions, on learned CVs, or the caller's
own) and writes into ``out``:

- ``trajectory.dcd`` + ``topology.pdb``: the biased trajectory (one frame per ``interval`` steps);
- ``COLVAR``: PLUMED-style ``#! FIELDS time cv1 ... bias [observables]`` (ps, CV units, kJ/mol),
  one row per frame (:class:`~openflow.plugins.openmm.reporters.ColvarReporter`); the
  ``observables`` the caller passes (functions of the saved trajectory) are added as columns;
- ``weights.npy``: a reweighting weight per frame (see below), for unbiased averages (normalised;
  ``log_weights.npy``: their logarithms with an arbitrary offset);
- ``bias.npz``: the final bias ``V(s)`` (kJ/mol) on OpenMM's grid (``axes``: one array per CV,
  grid point ``i`` at ``linspace(min, max, gridWidth)[i]``; the array is indexed ``[s1, s2, ...]``),
  ``fes.npz``: the sum_hills-like free energy ``F(s) = -(gamma / (gamma - 1)) V(s)`` (min 0);
- ``bias/``: OpenMM's own bias files (``saveFrequency``/``biasDir``), the state to continue from;
  ``state.xml``: positions, velocities and time at the end; ``metadynamics.json``: settings + results.

Nothing is assumed about the system: the driver returns arrays (time, CV values, bias, log-weights
and the observables) and the caller interprets them (e.g. phi/psi basins for a peptide).

**Continuing a run**: ``run_metadynamics(..., continue_from=PREVIOUS_OUT, out=NEW_OUT)`` copies
``PREVIOUS_OUT/bias/*.npy`` into ``NEW_OUT/bias/`` before the ``Metadynamics`` object is built (it
loads every bias file in ``biasDir`` and adds it to its own), and starts from
``PREVIOUS_OUT/state.xml``. The CVs, their ranges and grids must be the same (checked against
``metadynamics.json``). A bias is only ever continued that way: a folder that already holds bias
files is refused unless ``overwrite=True`` (then it is emptied first) or the finished run in it has
exactly these settings and ``reuse=True`` (then it is returned as it is).

**Reweighting** (weights in ``weights.npy``): Tiwary & Parrinello's time-dependent constant,
``w_i = exp(beta (V(s_i, t_i) - c(t_i)))`` with ``c(t) = kT ln[ sum_s exp(gamma/(gamma-1) V(s,t)/kT)
/ sum_s exp(V(s,t)/((gamma-1) kT)) ]`` computed from the bias grid after each frame. Unlike the
simpler final-bias reweighting it uses every frame with the bias it was sampled under.

``openmm.app.Metadynamics`` takes 1-3 CVs, all periodic or none, bias factor > 1; the bias is zero
outside ``[min, max]`` (ranges of learned CVs come from ``CVModel.bounds()``); the Simulation must
be built after the Metadynamics object; a CV force cannot be used by two Metadynamics objects:
every run here works on clones of the forces and of the ``openmm.System``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openflow import analysis
from openflow.data import load_trajectory
from openflow.io import plain_json, write_json
from openflow.io import progress as progress_bar

from . import bias_files
from .bias import (
    bias_grid,
    check_variables,
    clone_variable,
    fes_from_bias,
    grid_axes,
    reweighting_constant,
    variable_signature,
)
from .md import create_simulation, draw_seed, finished_run, platform_name, positions_nm, positive_integer, run_length
from .reporters import ColvarReporter, DCDStreamReporter, add_colvar_columns, read_colvar
from .segments import CHECKPOINT, Segments

OUTPUTS = dict(
    trajectory="trajectory.dcd",
    topology="topology.pdb",
    colvar="COLVAR",
    weights="weights.npy",
    log_weights="log_weights.npy",
    bias="bias.npz",
    fes="fes.npz",
    state="state.xml",
    settings="metadynamics.json",
    bias_dir="bias",
)
Observable = Callable[[mdtraj.Trajectory], np.ndarray]


# ----------------------------------------------------------------------------- running


@dataclass
class MetadynamicsResult:
    """What :func:`run_metadynamics` wrote and measured.

    ``time_ps (T,)``, ``cvs (T, k)`` (CV units), ``bias_kjmol (T,)``: one row per frame, as in COLVAR;
    ``log_weights (T,)``: the c(t) reweighting log-weights (any offset); ``observables``: ``{name:
    (T,)}`` as passed in; speeds in ns/day.
    """

    out: Path
    files: dict
    steps: int
    timestep_ps: float
    wall_time_s: float
    ns_per_day: float
    platform: str
    time_ps: np.ndarray
    cvs: np.ndarray
    bias_kjmol: np.ndarray
    log_weights: np.ndarray
    observables: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def weights(self) -> np.ndarray:
        """Normalised reweighting weights ``(T,)``."""
        w = np.exp(self.log_weights - self.log_weights.max())
        return w / w.sum()

    @property
    def ns(self) -> float:
        return self.steps * self.timestep_ps / 1000.0

    def summary(self) -> dict:
        """Flat JSON-friendly metrics."""
        w = self.weights
        return dict(
            steps=self.steps,
            ns=self.ns,
            timestep_ps=self.timestep_ps,
            wall_time_s=self.wall_time_s,
            ns_per_day=self.ns_per_day,
            platform=self.platform,
            frames=int(self.time_ps.size),
            weights_ess_fraction=float(1.0 / np.sum(w * w) / w.size),
        )


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


def _prepare_continuation(continue_from: Path, bias_dir: Path, signature: list[dict], copy_bias: bool = True) -> Path:
    """Check that ``continue_from`` holds a finished run with these CVs, copy its bias files into
    ``bias_dir`` (unless ``copy_bias`` is False: a shared directory prepared once by the caller) and
    return its final state file."""
    settings = continue_from / OUTPUTS["settings"]
    state = continue_from / OUTPUTS["state"]
    for path in (settings, state, continue_from / OUTPUTS["bias_dir"]):
        if not path.exists():
            raise FileNotFoundError(f"cannot continue from {continue_from}: {path.name} is missing")
    previous = json.loads(settings.read_text()).get("settings", {}).get("variables")
    if previous != signature:
        raise ValueError(f"cannot continue from {continue_from}: its CVs {previous} differ from these {signature}")
    if copy_bias:
        copy_bias_files(continue_from / OUTPUTS["bias_dir"], bias_dir)
    return state


def copy_bias_files(source: Path, bias_dir: Path) -> None:
    """Copy the newest bias file of every walker id in ``source`` into ``bias_dir`` (a continuation)."""
    bias_dir.mkdir(parents=True, exist_ok=True)
    for _, path in bias_files.newest_files(source).values():
        shutil.copy2(path, bias_dir / path.name)


def _clear_earlier_run(out: Path, files: dict, overwrite: bool, shared: bool = False) -> None:
    """Refuse (or, with ``overwrite``, empty) a folder that holds an earlier run's bias or outputs (a
    shared bias directory is the caller's to check)."""
    own_bias = not shared and files["bias_dir"].is_dir()
    earlier = sorted(files["bias_dir"].glob("bias_*.npy")) if own_bias else []
    outputs = [path for key, path in files.items() if key != "bias_dir" and path.exists()]
    outputs += [out / CHECKPOINT] if (out / CHECKPOINT).exists() else []
    if not (earlier or outputs):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} holds an earlier metadynamics run ({len(earlier)} bias files): OpenMM would start from "
            "its bias. Continue it with continue_from (--continue-from), or overwrite it (--overwrite)"
        )
    for path in earlier + outputs:
        path.unlink()


def _load_finished(out: Path, record: dict, observables: Mapping[str, Observable]) -> MetadynamicsResult | None:
    """The finished run recorded in ``out`` as a result (None if it lacks one of the observables)."""
    data = read_colvar(out / OUTPUTS["colvar"])
    if any(name not in data for name in observables):
        return None
    names, results = record["settings"]["cv_names"], record["results"]
    return MetadynamicsResult(
        out=out,
        files={key: out / name for key, name in OUTPUTS.items()},
        steps=results["steps"],
        timestep_ps=results["timestep_ps"],
        wall_time_s=results["wall_time_s"],
        ns_per_day=results["ns_per_day"],
        platform=results["platform"],
        time_ps=data["time"],
        cvs=np.stack([data[n] for n in names], 1) if names else np.empty((data["time"].size, 0)),
        bias_kjmol=data["bias"],
        log_weights=np.load(out / OUTPUTS["log_weights"]),
        observables={name: data[name] for name in observables},
        settings=record["settings"],
    )


def run_metadynamics(
    system,
    variables,
    steps: int | None = None,
    ns: float | None = None,
    out="metadynamics",
    height: float = 1.0,
    bias_factor: float = 6.0,
    frequency: int = 500,
    interval: int | None = None,
    platform: str | None = None,
    seed: int | None = None,
    timestep=None,
    friction=None,
    equilibration_steps: int = 1000,
    continue_from=None,
    cv_names: Sequence[str] | None = None,
    observables: Mapping[str, Observable] | None = None,
    reporters: Sequence = (),
    reuse: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_ps: float | None = None,
    bias_dir=None,
    positions=None,
    state=None,
) -> MetadynamicsResult:
    """Well-tempered metadynamics (or, with ``variables=[]``, plain MD written the same way).

    Args:
        system: an ``openflow.systems.System``.
        variables: 1-3 ``openmm.app.BiasVariable`` (cloned: they can be reused), or ``[]`` for unbiased MD.
        steps / ns: run length, exactly one.
        height: initial Gaussian height, kJ/mol; bias_factor: gamma > 1 (CV temperature T*gamma);
        frequency: steps between Gaussians; interval: steps between frames/COLVAR rows (default 1 ps).
        platform: OpenMM platform name or None/"auto"; seed: velocities and Langevin noise.
        timestep / friction: ps and 1/ps (defaults: ``md.default_timestep``, 1/ps).
        equilibration_steps: unbiased steps after minimisation, not written (fresh runs only).
        continue_from: the ``out`` folder of a previous run with the same CVs (see the module).
        cv_names: COLVAR names of the CVs (default ``cv1, cv2, ...``).
        observables: ``{name: f(mdtraj.Trajectory) -> (T,) array}`` evaluated on the saved frames
            (e.g. torsions of a peptide), added to COLVAR and to the result.
        reporters: the caller's further OpenMM reporters.
        reuse: return the finished run in ``out`` when it has exactly these settings (needs a seed).
        overwrite: empty ``out`` of an earlier run's bias and outputs instead of refusing it.
        checkpoint_ps: write the run in segments of about this length, each closed by a checkpoint
            (``openflow.plugins.openmm.segments``): the same call on a killed run resumes from its
            last checkpoint (default: one segment).
        bias_dir: a bias directory shared with other walkers (default ``out/bias``, this run's own);
            the caller prepares it (continuation files, an earlier run's bias).
        positions / state: where a fresh run starts: positions ``(n_atoms, 3)`` nm (minimised), or a
            ``Simulation.saveState`` file (default: the system's positions; with ``continue_from``,
            its ``state.xml``).
    Returns a :class:`MetadynamicsResult`; the files are listed in the module docstring.
    """
    variables = [clone_variable(v) for v in variables]
    biased = bool(variables)
    if biased:
        check_variables(variables)
        if not bias_factor > 1:
            raise ValueError(f"bias_factor must be > 1, got {bias_factor}")
        if not height > 0:
            raise ValueError(f"height must be positive (kJ/mol), got {height}")
    frequency = positive_integer(frequency, "frequency")
    length = run_length(system, steps, ns, timestep, friction, interval)
    dt_ps, gamma_ps, n_steps, interval = length.dt_ps, length.gamma_ps, length.steps, length.interval
    names = list(cv_names) if cv_names is not None else [f"cv{i + 1}" for i in range(len(variables))]
    if len(names) != len(variables):
        raise ValueError(f"{len(names)} cv_names for {len(variables)} CVs")
    if positions is not None and state is not None:
        raise ValueError("give positions or a state to start from, not both")
    observables = dict(observables or {})
    out = Path(out)
    files = {key: out / name for key, name in OUTPUTS.items()}
    shared = bias_dir is not None
    if shared:
        files["bias_dir"] = Path(bias_dir)
    signature = variable_signature(variables)
    settings = dict(
        system=system.name,
        parameters=system.parameters,
        variables=signature,
        cv_names=names,
        height_kjmol=height,
        bias_factor=bias_factor,
        frequency=frequency,
        interval=interval,
        steps=n_steps,
        seed=seed,
        timestep_ps=dt_ps,
        friction_per_ps=gamma_ps,
        equilibration_steps=int(equilibration_steps),
        temperature_K=system.temperature.value_in_unit(unit.kelvin),
        continue_from=str(continue_from) if continue_from else None,
        segment_steps=segment_steps(n_steps, interval, frequency, checkpoint_ps, dt_ps),
        start=start_signature(positions, state),
    )
    if continue_from is not None:
        if not biased:
            raise ValueError("continue_from needs a biased run")
        if Path(continue_from).resolve() == out.resolve():
            raise ValueError(f"write a continued run into a new folder, not into {continue_from} itself")
    if reuse and seed is not None:
        record = finished_run(
            out, OUTPUTS["settings"], settings, [OUTPUTS[k] for k in ("trajectory", "colvar", "weights")]
        )
        if record is not None and (result := _load_finished(out, record, observables)) is not None:
            return result
    segments = Segments(out, settings)
    if not segments.resumed:
        _clear_earlier_run(out, files, overwrite, shared)
    existed = out.exists()
    try:
        return _run(
            system,
            variables,
            out,
            files,
            settings,
            segments,
            continue_from,
            (positions, state),
            platform,
            observables,
            reporters,
            progress,
            shared,
        )
    except BaseException:  # outputs that look like a run are removed; a checkpoint is kept to resume from
        keep = ("bias_dir",) if segments.record is None else ("bias_dir", "topology")  # what a resume needs
        for key, path in files.items():
            if key not in keep:
                path.unlink(missing_ok=True)
        if segments.record is None:
            segments.clear()
            if not shared:
                shutil.rmtree(files["bias_dir"], ignore_errors=True)
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
        raise


def segment_steps(n_steps: int, interval: int, frequency: int, checkpoint_ps: float | None, dt_ps: float) -> int:
    """Steps per checkpointed segment: about ``checkpoint_ps``, a multiple of the frame ``interval`` and
    of the deposit ``frequency`` (so that a checkpoint falls where OpenMM has just saved the bias);
    the whole run when ``checkpoint_ps`` is None."""
    if checkpoint_ps is None:
        return n_steps
    if not checkpoint_ps > 0:
        raise ValueError(f"checkpoint_ps must be positive, got {checkpoint_ps}")
    unit_steps = int(np.lcm(interval, frequency))
    return int(min(n_steps, max(1, round(checkpoint_ps / dt_ps / unit_steps)) * unit_steps))


def start_signature(positions=None, state=None) -> str | None:
    """What a fresh run starts from, for its settings: a hash of the positions or of the state file."""
    if positions is not None:
        xyz = np.asarray(positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions)
        return "positions:" + hashlib.sha256(np.ascontiguousarray(xyz, dtype=np.float64).tobytes()).hexdigest()[:16]
    if state is not None:
        return "state:" + hashlib.sha256(Path(state).read_bytes()).hexdigest()[:16]
    return None


def _run(
    system,
    variables,
    out: Path,
    files: dict,
    settings: dict,
    segments: Segments,
    continue_from,
    start,
    platform,
    observables: dict,
    reporters,
    progress: bool,
    shared: bool,
) -> MetadynamicsResult:
    """The run of :func:`run_metadynamics` once its settings are checked, segment after segment."""
    biased, names, signature = bool(variables), settings["cv_names"], settings["variables"]
    interval, n_steps, dt_ps = settings["interval"], settings["steps"], settings["timestep_ps"]
    bias_factor, frequency = settings["bias_factor"], settings["frequency"]
    files["bias_dir"].mkdir(parents=True, exist_ok=True)
    positions, start_state = start
    if segments.resumed:  # a new noise seed for each restart: the lost piece is not replayed
        base_seed, restarts, start_state = segments.record["seed"], segments.record["restarts"] + 1, segments.state
        own_ids = list(segments.record["own_bias_ids"])
    else:
        base_seed, restarts, own_ids = draw_seed(settings["seed"]), 0, []
        if continue_from is not None:
            continued = _prepare_continuation(Path(continue_from), files["bias_dir"], signature, copy_bias=not shared)
            start_state = start_state or continued
    segments.start(files["bias_dir"] if biased else None)

    omm_system = openmm.XmlSerializer.clone(system.system)
    meta, bias_group = None, None
    if biased:
        meta = _fresh_bias_id(
            lambda: app.Metadynamics(
                omm_system,
                variables,
                system.temperature,
                float(bias_factor),
                float(settings["height_kjmol"]) * unit.kilojoule_per_mole,
                frequency,
                saveFrequency=frequency,
                biasDir=str(files["bias_dir"]),
            )
        )
        own_ids.append(meta._id)  # OpenMM's name for this process's bias files (bias_<id>_<index>.npy)
        bias_group = omm_system.getForce(omm_system.getNumForces() - 1).getForceGroup()
    simulation = create_simulation(
        system,
        base_seed + 7919 * restarts,
        platform,
        dt_ps,
        settings["friction_per_ps"],
        openmm_system=omm_system,
        positions=positions,
        state=start_state,
        equilibration_steps=settings["equilibration_steps"],
    )  # the bias is still zero, or the checkpoint's
    first_step = segments.record["first_step"] if segments.resumed else simulation.currentStep
    if not segments.resumed:
        with open(files["topology"], "w") as handle:
            app.PDBFile.writeFile(system.topology, positions_nm(simulation) * unit.nanometer, handle)
    simulation.reporters.extend(reporters)
    kT = system.kT_kjmol
    periodic = biased and variables[0].periodic
    end, done = first_step + n_steps, simulation.currentStep - first_step
    wall = segments.record["wall_time_s"] if segments.resumed else 0.0
    with progress_bar(n_steps, "metadynamics" if biased else "MD", progress, initial=done, unit="step") as bar:
        while simulation.currentStep < end:
            start_time, segment_end = time.perf_counter(), min(simulation.currentStep + settings["segment_steps"], end)
            with segments.segment() as part, open(part.dcd, "wb") as dcd:
                colvar = ColvarReporter(
                    part.colvar,
                    interval,
                    meta.getCollectiveVariables if biased else None,
                    names if biased else None,
                    bias_group,
                )
                writers = [DCDStreamReporter(dcd, interval), colvar]
                simulation.reporters.extend(writers)
                while simulation.currentStep < segment_end:  # chunks end where the reporters write a row
                    chunk = min(interval - simulation.currentStep % interval, segment_end - simulation.currentStep)
                    meta.step(simulation, chunk) if biased else simulation.step(chunk)
                    if simulation.currentStep % interval == 0:
                        part.values.append(
                            reweighting_constant(bias_grid(meta), bias_factor, kT, periodic) if biased else 0.0
                        )
                    bar.update(chunk)
                colvar.close()
                for writer in writers:
                    simulation.reporters.remove(writer)
            wall += time.perf_counter() - start_time
            segments.checkpoint(
                simulation,
                simulation.currentStep,
                files["bias_dir"] if biased else None,
                own_ids,
                seed=base_seed,
                restarts=restarts,
                first_step=first_step,
                wall_time_s=wall,
                progress=_progress(segments, simulation.currentStep - first_step, n_steps, dt_ps),
            )
    simulation.reporters.clear()
    simulation.saveState(str(files["state"]))
    constants = segments.join(files["trajectory"], files["colvar"], files["topology"], simulation, interval, first_step)
    data = read_colvar(files["colvar"])
    if len(constants) != data["time"].size:
        raise RuntimeError(f"{data['time'].size} COLVAR rows but {len(constants)} reweighting constants")
    values = {}
    if observables:
        frames = load_trajectory(str(files["trajectory"]), str(files["topology"]))
        values = {
            name: np.asarray(function(frames), dtype=np.float64).reshape(-1) for name, function in observables.items()
        }
        add_colvar_columns(files["colvar"], values)
    log_w = (data["bias"] - np.asarray(constants)) / kT
    np.save(files["log_weights"], log_w)
    settings = dict(settings, seed=base_seed)
    result = MetadynamicsResult(
        out=out,
        files=files,
        steps=n_steps,
        timestep_ps=dt_ps,
        wall_time_s=wall,
        ns_per_day=n_steps * dt_ps / 1000.0 / (wall / 86400.0),
        platform=platform_name(simulation),
        time_ps=data["time"],
        cvs=np.stack([data[n] for n in names], 1) if biased else np.empty((data["time"].size, 0)),
        bias_kjmol=data["bias"],
        log_weights=log_w,
        observables=values,
        settings=settings,
    )
    np.save(files["weights"], result.weights)
    if biased:
        bias = bias_grid(meta)
        axes = {f"axis_{i}": a for i, a in enumerate(grid_axes(variables))}
        np.savez(files["bias"], bias_kjmol=bias, names=np.array(names), **axes)
        np.savez(files["fes"], free_energy_kjmol=fes_from_bias(bias, bias_factor), names=np.array(names), **axes)
    write_json(
        files["settings"],
        dict(
            settings=plain_json(settings),
            results=dict(result.summary(), restarts=restarts),
            reweighting="Tiwary-Parrinello c(t): w = exp((V(s,t) - c(t))/kT)",
        ),
    )
    segments.finish()
    return result


def _progress(segments: Segments, done: int, n_steps: int, dt_ps: float) -> dict:
    """How far a run is after ``done`` of its ``n_steps`` steps, for a checkpoint record: ns done and
    in all, frames, transitions between the first CV's two states so far (None before they show)."""
    colvar = segments.colvar()
    cvs = [name for name in colvar if name not in ("time", "bias")]
    states = analysis.two_states(colvar[cvs[0]]) if cvs and colvar[cvs[0]].size >= 20 else None
    return dict(
        ns_done=done * dt_ps / 1000.0,
        ns_total=n_steps * dt_ps / 1000.0,
        frames=int(colvar["time"].size) if colvar else 0,
        transitions=analysis.count_transitions(states.series(colvar[cvs[0]])) if states else None,
    )


def step_costs(
    system,
    variables,
    steps: int = 2000,
    platform: str | None = None,
    frequency: int = 500,
    repeats: int = 3,
    timestep=None,
) -> dict:
    """Seconds per MD step without and with the bias (Gaussians deposited every ``frequency``), best of ``repeats``.

    One Simulation with the Metadynamics force, timed in interleaved rounds: with the bias's force
    group left out of the integration (bare MD, the bias is not computed) and with it
    (``Metadynamics.step``). Same Context, integrator and memory, so a changing machine load or
    the placement of one Context affects both alike. 100 warm-up steps each, no reporters. Returns
    ``{"bare_s_per_step", "biased_s_per_step", "speed_ratio", "platform"}`` (bare time / biased
    time: 1 means the bias is free).
    """
    variables = list(variables)
    check_variables(variables)
    omm_system = openmm.XmlSerializer.clone(system.system)
    meta = _fresh_bias_id(
        lambda: app.Metadynamics(
            omm_system, [clone_variable(v) for v in variables], system.temperature, 5.0, 1.0, frequency
        )
    )
    bias_group = omm_system.getForce(omm_system.getNumForces() - 1).getForceGroup()
    simulation = create_simulation(system, 1, platform, timestep, openmm_system=omm_system)
    integrator = simulation.integrator
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
    return {
        "bare_s_per_step": best["bare"],
        "biased_s_per_step": best["biased"],
        "speed_ratio": best["bare"] / best["biased"],
        "platform": platform_name(simulation),
    }
