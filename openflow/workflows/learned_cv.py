"""The learned-CV loop: an OpenMM system and some MD in, a slow CV out that makes metadynamics converge.

1. **Round 0**: unbiased MD of the system (``round0.temperature_K``: hotter, so that a short run
   crosses its barriers now and then). For the canonical transformation its frames are reweighted
   to the target temperature (``round0.reweight``; few stay effective, reported), so that its modes
   describe the target ensemble; the kinetic choice uses the hot dynamics as they ran.
2. **Round k**: the canonical transformation of all frames so far, with their reweighting weights
   (``openflow.plugins.openmm.learned_cv``), the kinetically slowest combination of its
   lowest-frequency modes over each run's time order, a ``CVModel`` over features chosen from the
   System (``features: auto``: distances when the energy is invariant under rigid motions, else
   positions), exported as a checked ``CustomCVForce``, then well-tempered metadynamics on it. With
   ``cv.dims: auto`` the next TICA component becomes a second CV, biased with the first, when its
   process is at least half as slow (``openflow.nct.slow_together``: a three-state rotor has two
   such; one CV alone would hide the barrier along the other). The two basins of the reweighted
   (first) CV are the states; the round ends the loop when ΔF between them stopped
   drifting and is known: its drift over the run's second half and its error bar both below
   ``rounds.converge_kT`` (after ``rounds.min`` rounds).
3. **Production**: the last round's metadynamics continued for ``production.ns``.

With ``walkers: N`` (N > 1) round 0 is N independent runs of ``round0.ns`` each and every biased run
N walkers sharing one bias, started spread along the round's CV, as Dask tasks (``cluster``: a
scheduler's address, else a LocalCluster); the biased runs' ``ns`` are totals over the walkers
(``openflow.plugins.openmm.walkers``).

Times are in ps (``frame_ps``, ``metad.pace_ps``, ``slow.lag_ps``) and become steps of the system's
own time step (``openflow.plugins.openmm.md.default_timestep``), so one file serves a molecule at
1 fs and a reduced model at 10 fs.

Nothing about the molecule enters the learning. A peptide (``report.backbone``) also gets its
backbone phi/psi reported: phi transitions, ΔF(phi > 0 - phi < 0), the reweighted Ramachandran plot
and (``report.compare``) a metadynamics run on phi/psi with the same settings and length, for the
convergence comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openmm.unit as unit

from openflow import analysis, estimators
from openflow.data import load_trajectory
from openflow.io import save_figure, say, write_json
from openflow.plugins.openmm.bias import torsion_bias_variables
from openflow.plugins.openmm.learned_cv import FEATURES, check_dims, choose_features, learn_slow_cv
from openflow.plugins.openmm.md import default_timestep, simulate, temperature_log_weights
from openflow.plugins.openmm.metadynamics import step_costs
from openflow.plugins.openmm.walkers import biased_run, check_walkers, client_for, run_independent
from openflow.systems import build, from_files
from openflow.systems.alanine_dipeptide import (
    PHI_CORE_MARGIN,
    PHI_POSITIVE_BASIN,
    backbone_torsions,
    phi_psi_observables,
    phi_states,
)

DEFAULTS = {
    "seed": 0,
    "system": {"name": "alanine_dipeptide", "options": {}, "xml": None, "pdb": None, "temperature_K": 300.0},
    "features": "auto",
    "atoms": "heavy",
    "platform": None,
    "frame_ps": 0.2,  # time between frames of every run (in steps of the system's own time step)
    "round0": {"ns": 1.0, "temperature_K": 600.0, "reweight": True},
    "nct": {"layers": 4, "hidden": [32], "steps": 1000, "batch": 256, "lr": 2e-3, "modes": 8, "weighted": True},
    "slow": {"lag_ps": 1.0},
    "cv": {"hidden": [1], "epochs": 60, "export_frames": 100, "dims": "auto"},
    "metad": {"height": 1.2, "bias_factor": 10.0, "pace_ps": 1.0, "width_std": 0.25},
    "rounds": {"max": 4, "min": 1, "ns": 1.0, "converge_kT": 0.5},
    "production": {"ns": 4.0},
    "report": {"backbone": True, "compare": True, "reference": {"system": None, "delta_f_kT": None, "error_kT": None}},
    "speed": {"steps": 5000, "repeats": 3},
    "walkers": 1,  # metadynamics walkers sharing each round's bias (and round 0 as that many runs), on Dask
    "cluster": {"address": None, "n_workers": None},  # a scheduler's address, else a LocalCluster
    "checkpoint_ps": 50.0,  # walkers: a checkpoint every so many ps of each walker
    "progress": None,
}
FREE = (
    "system.options",
    "system.xml",
    "system.pdb",
    "system.name",
    "report.reference",
    "cluster.address",
    "cluster.n_workers",
    "cv.dims",
)


def check(config: dict) -> None:
    """The workflow's own rules (types and signs are checked by the runner)."""
    system = config["system"]
    if (system["xml"] is None) != (system["pdb"] is None):
        raise ValueError("system.xml and system.pdb go together: a serialized openmm.System and a PDB of its atoms")
    if system["xml"] is None and not isinstance(system["name"], str):
        raise ValueError(f"system.name must name a builder (or give system.xml and system.pdb), got {system['name']!r}")
    if system["xml"] is not None and system["options"]:
        raise ValueError("system.options apply to a builder (system.name), not to system.xml/system.pdb")
    if not isinstance(system["options"], dict):
        raise ValueError(f"system.options must be a mapping of builder arguments, got {system['options']!r}")
    check_dims(config["cv"]["dims"])
    if config["features"] not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {config['features']!r}")
    if not config["metad"]["bias_factor"] > 1:
        raise ValueError(f"metad.bias_factor must be > 1 (well-tempered), got {config['metad']['bias_factor']}")
    if config["rounds"]["min"] > config["rounds"]["max"]:
        raise ValueError(
            f"rounds.min ({config['rounds']['min']}) must not exceed rounds.max ({config['rounds']['max']})"
        )
    check_walkers(config["walkers"], config["cluster"])
    reference = config["report"]["reference"]
    if not isinstance(reference, dict) or set(reference) != {"system", "delta_f_kT", "error_kT"}:
        raise ValueError(f"report.reference must be a mapping with system, delta_f_kT and error_kT, got {reference!r}")
    make_system(system)  # the files, the atom counts and the starting energy, before any work


def make_system(settings: dict, temperature_K: float | None = None):
    """The builder's system, or the user's XML + PDB, at ``temperature_K`` (default ``system.temperature_K``)."""
    kelvin = float(settings["temperature_K"] if temperature_K is None else temperature_K)
    if settings["xml"] is not None:
        return from_files(settings["xml"], settings["pdb"], temperature_K=kelvin)
    return build(settings["name"], **settings["options"], temperature=kelvin * unit.kelvin)


def md_steps(system, config: dict) -> dict:
    """``frame_ps`` and ``metad.pace_ps`` in steps of the system's time step: ``{"interval", "frequency"}``."""
    dt_ps = default_timestep(system).value_in_unit(unit.picosecond)
    return {
        "interval": max(1, round(config["frame_ps"] / dt_ps)),
        "frequency": max(1, round(config["metad"]["pace_ps"] / dt_ps)),
    }


def cv_names(n: int) -> list[str]:
    """The COLVAR names of a round's CVs: ``cv``, ``cv2``, ... (slowest first)."""
    return ["cv"] + [f"cv{k + 1}" for k in range(1, n)]


def run_weights(log_w: np.ndarray) -> np.ndarray:
    """One run's weights for a pooled ensemble: normalised, then scaled to the run's effective size, so
    that each run counts as many frames as its reweighting leaves effective."""
    w = np.exp(log_w - log_w.max())
    return w / w.sum() * (w.sum() ** 2 / np.sum(w * w))


def delta_f_curve(inside: np.ndarray, log_w: np.ndarray, time_ps: np.ndarray, walker=None, points: int = 40) -> list:
    """ΔF(t) between a state and the rest over one run, or over walkers (``walker (T,)``: each frame's)
    taken in time order, the time then counted over all walkers: ``[(biased time ps, ΔF kT), ...]``."""
    order = np.argsort(time_ps, kind="stable")
    walkers = 1 if walker is None else np.unique(walker).size
    ends, curve = analysis.delta_f_convergence(inside[order], log_w[order], n_points=points)
    return list(zip((walkers * time_ps[order][ends - 1]).tolist(), curve.tolist()))


def round_summary(result, start: float) -> tuple[dict, list]:
    """The two states along the CV in one biased run (its walkers pooled) and ΔF(t) = F(other) - F(start)
    between them, the start state being the one of the system's starting structure (CV value
    ``start``): transitions, ΔF with its error and its drift over the run's second half; and ΔF(t)."""
    values, log_w, walker = result.cvs[:, 0], result.log_weights, result.observables.get("walker")
    states = analysis.two_states(values, np.exp(log_w - log_w.max()))
    if states is None:
        return {"states": 1, "transitions": 0, "delta_f_kT": np.nan, "delta_f_error_kT": np.inf, "drift_kT": np.inf}, []
    inside = (values > states.barrier) != (start > states.barrier)  # the state the run did not start in
    curve = delta_f_curve(inside, log_w, result.time_ps, walker)
    times, values_t = np.array(curve).T
    half = values_t[times >= times[-1] / 2]
    estimate = estimators.state_free_energy(inside, log_w, n_blocks=min(10, inside.size))
    drift = float(np.abs(half - values_t[-1]).max()) if np.isfinite(half).all() else np.inf
    summary = {
        "states": 2,
        "barrier": states.barrier,
        "transitions": analysis.count_transitions(states.series(values), walker),
        "delta_f_kT": estimate.delta_f,
        "delta_f_error_kT": estimate.error,
        "drift_kT": drift,
    }
    return summary, curve


def backbone_report(result, system, name: str) -> tuple[dict, list]:
    """phi transitions, ΔF(phi > 0 - phi < 0) with its error from one biased run, and its curve ΔF(t)."""
    phi = result.observables["phi"]
    inside = phi_states(phi) == 1
    estimate = estimators.state_free_energy(inside, result.log_weights, n_blocks=min(10, inside.size))
    walker = result.observables.get("walker")
    transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN), walker)
    metrics = {
        f"{name}_phi_transitions": transitions,
        f"{name}_phi_transitions_per_ns": transitions / result.ns,
        f"{name}_phi_delta_f_kT": estimate.delta_f,
        f"{name}_phi_delta_f_error_kT": estimate.error,
        f"{name}_phi_delta_f_kjmol": estimate.delta_f * system.kT_kjmol,
    }
    return metrics, delta_f_curve(inside, result.log_weights, result.time_ps, walker)


def run(config: dict, out: Path) -> dict:
    with client_for(config["walkers"], **config["cluster"]) as client:
        return learn_and_bias(config, out, client)


def learn_and_bias(config: dict, out: Path, client) -> dict:
    """The loop (see the module); ``client``: Dask's, for walkers (None: one walker, here)."""
    progress, seed = config["progress"] is not False, config["seed"]
    system = make_system(config["system"])
    features, invariant, kind = choose_features(system, config["features"], config["atoms"])
    say(f"learned_cv: {system.name}, {kind} features ({features.n_out}), rigid-motion invariant: {invariant}")
    peptide = config["report"]["backbone"] and _has_backbone(system)
    steps = md_steps(system, config)
    metrics = {"features": kind, "n_features": features.n_out, "energy_rigid_invariant": invariant}
    metrics.update(frame_steps=steps["interval"], metad_pace_steps=steps["frequency"], walkers=config["walkers"])

    say("learned_cv: round 0, unbiased MD")
    runs, topology, frame_ps, round0 = round_zero(config, out, client, steps["interval"])
    metrics.update(round0)
    metad, biased_ns, rounds, curves = config["metad"], 0.0, config["rounds"], {}
    biased = dict(  # every biased run on the learned CV: the same metadynamics settings
        height=metad["height"],
        bias_factor=metad["bias_factor"],
        frequency=steps["frequency"],
        interval=steps["interval"],
        platform=config["platform"],
        observables=phi_psi_observables() if peptide else None,
        reuse=True,
        overwrite=True,
        progress=progress,
        client=client,
        walkers=config["walkers"],
        checkpoint_ps=config["checkpoint_ps"],
    )
    for k in range(1, rounds["max"] + 1):
        folder = out / f"round{k}"
        say(f"learned_cv: round {k}: learning the CV from {len(runs)} run(s)")
        weights = np.concatenate([run_weights(log_w) for _, log_w in runs]) if config["nct"]["weighted"] else None
        cv = learn_slow_cv(
            system,
            [path for path, _ in runs],
            topology,
            features,
            invariant,
            {key: value for key, value in config["nct"].items() if key not in ("modes", "weighted")},
            hidden=config["cv"]["hidden"],
            epochs=config["cv"]["epochs"],
            n_modes=config["nct"]["modes"],
            lag=max(1, round(config["slow"]["lag_ps"] / frame_ps)),
            seed=seed,
            out=folder,
            progress=progress,
            atoms=config["atoms"],
            weights=weights,
            export_frames=config["cv"]["export_frames"],
            dims=config["cv"]["dims"],
        )
        variables, names = cv.bias_variables(metad["width_std"]), cv_names(len(cv.forces))
        say(f"learned_cv: round {k}: metadynamics on the CV")
        starts = walker_starts(cv.values[:, 0], [path for path, _ in runs], topology, config["walkers"])
        result = biased_run(
            system,
            variables,
            folder / "metadynamics",
            ns=rounds["ns"],
            seed=seed + k,
            starts=starts,
            cv_names=names,
            **biased,
        )
        biased_ns += result.ns
        start = float(cv(system.positions.value_in_unit(unit.nanometer)[None])[0, 0])  # its side: the start state
        summary, curves[f"round{k}"] = round_summary(result, start)
        metrics.update({f"round{k}_{key}": value for key, value in {**summary, **cv.metrics}.items()})
        if peptide:
            metrics.update(backbone_report(result, system, f"round{k}")[0])
        runs.extend(walker_runs(result))
        converged = max(summary["drift_kT"], summary["delta_f_error_kT"]) < rounds["converge_kT"]
        if k >= rounds["min"] and converged:
            break
    metrics.update(rounds=k, converged=bool(converged))

    say("learned_cv: production, the last round's metadynamics continued")
    production = biased_run(
        system,
        variables,
        out / "production",
        ns=config["production"]["ns"],
        seed=seed + 100,
        continue_from=folder / "metadynamics",
        cv_names=names,
        **biased,
    )
    for path in cv.files.values():
        if path.suffix == ".xml":
            shutil.copy2(path, out / "production" / path.name)
    final, curves["production"] = round_summary(production, start)
    metrics.update({f"production_{key}": value for key, value in final.items()})
    metrics.update(
        biased_ns_total=biased_ns + production.ns,
        production_ns=production.ns,
        production_frame_ps=production.settings["interval"] * production.timestep_ps,
        production_transitions_per_ns=final["transitions"] / production.ns,
        production_wall_time_s=production.wall_time_s,
    )
    cost = step_costs(
        system,
        variables,
        steps=config["speed"]["steps"],
        repeats=config["speed"]["repeats"],
        platform=production.platform,
        frequency=steps["frequency"],
    )
    metrics.update(speed_relative_to_bare_md=cost["speed_ratio"], platform=production.platform)
    plot_rounds(curves, out / "delta_f_rounds.png")
    if peptide:
        report_backbone(system, result, production, dict(biased, seed=seed + 200), out, metrics, config)
    write_json(out / "curves.json", curves)
    return metrics


def round_zero(config: dict, out: Path, client, interval: int) -> tuple[list, Path, float, dict]:
    """Unbiased MD at ``round0.temperature_K``: one run, or one of ``round0.ns`` per walker, spread over
    the Dask workers (N times the data in the same wall time: a rare crossing needs the length).
    Returns the runs ``[(trajectory, log-weights at the target temperature or zeros), ...]``, their
    topology, the time between frames (ps) and metrics."""
    hot, seed = config["round0"], config["seed"]
    hot_system = make_system(config["system"], hot["temperature_K"])
    target = float(config["system"]["temperature_K"])
    settings = dict(interval=interval, seed=seed, platform=config["platform"], reuse=True)
    if config["walkers"] > 1:
        mds = run_independent(hot_system, config["walkers"], out / "round0", client, ns=hot["ns"], **settings)
    else:
        mds = [
            simulate(hot_system, ns=hot["ns"], out=out / "round0", progress=config["progress"] is not False, **settings)
        ]
    log_ws = [temperature_log_weights(md, target) for md in mds]
    runs = [(md.trajectory, log_w if hot["reweight"] else np.zeros_like(log_w)) for md, log_w in zip(mds, log_ws)]
    metrics = dict(
        round0_ns=sum(md.steps * md.timestep_ps for md in mds) / 1000.0,
        round0_runs=len(mds),
        round0_ess_fraction=estimators.effective_sample_size(np.concatenate(log_ws)),
    )
    return runs, mds[0].topology, mds[0].interval * mds[0].timestep_ps, metrics


def walker_starts(values: np.ndarray, paths, topology, walkers: int):
    """Starting positions ``(n_atoms, 3)`` nm for ``walkers`` walkers: the frames of ``paths`` (in order)
    whose CV ``values`` lie nearest the quantiles ``(i + 1/2) / walkers``, so that the walkers start
    spread along the CV (None for one walker: it starts from the system's structure)."""
    if walkers <= 1:
        return None
    frames = [load_trajectory(path, topology) for path in paths]
    xyz = np.concatenate([part.xyz for part in frames])
    targets = np.quantile(values, (np.arange(walkers) + 0.5) / walkers)
    return [xyz[int(np.argmin(np.abs(values - target)))].astype(np.float64) for target in targets]


def walker_runs(result) -> list:
    """The unbroken runs of a biased run: ``[(trajectory, log-weights)]``, one per walker."""
    walker = result.observables.get("walker")
    if walker is None:
        return [(result.files["trajectory"], result.log_weights)]
    return [(result.out / f"walker{i}" / "trajectory.dcd", result.log_weights[walker == i]) for i in np.unique(walker)]


def _has_backbone(system) -> bool:
    try:
        backbone_torsions(system)
    except ValueError:
        return False
    return True


def report_backbone(system, last_round, production, biased: dict, out: Path, metrics: dict, config: dict) -> None:
    """A peptide's phi/psi: the reweighted Ramachandran plot of production, the CV against phi, and the
    comparison run on phi/psi with the same metadynamics settings (``biased``, the seed included) and
    length as the final CV's run."""
    phi, psi = production.observables["phi"], production.observables["psi"]
    surface = analysis.ramachandran((phi, psi), weights=production.weights, temperature=system.temperature_K)
    analysis.plot_ramachandran(
        surface, out / "ramachandran.png", title="learned CV, production (reweighted)", boundaries=PHI_POSITIVE_BASIN
    )
    basin = phi_states(phi) == 1
    both_basins = 0 < basin.sum() < basin.size
    metrics["production_cv_phi_basin_auc"] = (
        analysis.basin_separation_auc(production.cvs[:, 0], basin) if both_basins else np.nan
    )
    plot_cv_against(production.cvs[:, 0], phi, psi, out / "cv_vs_phi.png")
    inside = phi_states(np.concatenate([last_round.observables["phi"], phi])) == 1  # the final CV's whole run
    both = estimators.state_free_energy(
        inside, np.concatenate([last_round.log_weights, production.log_weights]), n_blocks=min(10, inside.size)
    )
    production_metrics, _ = backbone_report(production, system, "production")
    metrics.update(production_metrics, final_cv_phi_delta_f_kT=both.delta_f, final_cv_phi_delta_f_error_kT=both.error)
    times = np.concatenate([last_round.time_ps, production.time_ps])
    walkers = [run.observables.get("walker") for run in (last_round, production)]
    walker = None if walkers[0] is None else np.concatenate(walkers)
    log_w = np.concatenate([last_round.log_weights, production.log_weights])
    curves = {"learned CV": delta_f_curve(inside, log_w, times, walker)}
    if config["report"]["compare"]:
        torsions = backbone_torsions(system)
        phipsi = biased_run(
            system,
            torsion_bias_variables([torsions["phi"][0], torsions["psi"][0]]),
            out / "compare_phipsi",
            ns=last_round.ns + production.ns,
            **dict(biased, cv_names=["cv_phi", "cv_psi"], observables=phi_psi_observables()),
        )
        compare_metrics, curves["phi/psi"] = backbone_report(phipsi, system, "phipsi")
        metrics.update(compare_metrics)
    known = config["report"]["reference"]
    reference = known["delta_f_kT"] if known["system"] == system.name and system.parameters.get("xml") is None else None
    if reference is not None:
        metrics.update(reference_delta_f_kT=reference, reference_error_kT=known["error_kT"])
        tolerance = 1.5 / system.kT_kjmol  # 1.5 kJ/mol
        metrics["final_cv_phi_delta_f_deviation_kjmol"] = (both.delta_f - reference) * system.kT_kjmol
        production_deviation = metrics["production_phi_delta_f_kT"] - reference
        metrics["production_phi_delta_f_deviation_kjmol"] = production_deviation * system.kT_kjmol
        for name, curve in curves.items():
            key = "learned" if name == "learned CV" else "phipsi"
            metrics[f"{key}_ns_to_converge"] = ns_to_converge(curve, reference, tolerance)
    plot_convergence(curves, reference, out / "delta_f_convergence.png")


def ns_to_converge(curve, reference: float, tolerance: float) -> float:
    """The first time (ns) after which ΔF(t) stays within ``tolerance`` of ``reference`` (inf if never)."""
    times, values = np.array(curve, dtype=float).T
    outside = np.flatnonzero(~(np.abs(values - reference) <= tolerance))
    if outside.size == 0:
        return float(times[0] / 1000.0)
    return float(times[outside[-1] + 1] / 1000.0) if outside[-1] + 1 < times.size else float("inf")


def plot_rounds(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in curves.items():
        if curve:
            times, values = zip(*curve)
            ax.plot(np.array(times) / 1000.0, values, "o-", ms=3, label=name.replace("round", "round "))
    ax.set(xlabel="time in the round (ns)", ylabel=r"$\Delta F$ between the CV's states (kT)", title="ΔF(t) per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_convergence(curves: dict, reference: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in curves.items():
        times, values = zip(*curve)
        ax.plot(np.array(times) / 1000.0, values, "-", label=name)
    if reference is not None:
        ax.axhline(reference, color="k", lw=0.8, ls="--", label="reference")
    ax.set(xlabel="biased MD on the final CV (ns)", ylabel=r"$\Delta F(\phi>0 - \phi<0)$ (kT)", title="convergence")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_cv_against(cv: np.ndarray, phi: np.ndarray, psi: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4))
    points = ax.scatter(phi, cv, c=psi, s=3, cmap="twilight", vmin=-np.pi, vmax=np.pi, rasterized=True)
    fig.colorbar(points, ax=ax, label=r"$\psi$ (rad)")
    ax.set(xlabel=r"$\phi$ (rad)", ylabel="learned CV", title="the learned CV against phi (production)")
    fig.tight_layout()
    save_figure(fig, path)
