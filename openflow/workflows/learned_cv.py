"""The learned-CV loop: an OpenMM system and some MD in, a slow CV out that makes metadynamics converge.

1. **Round 0**: unbiased MD of the system (``round0.temperature_K``: hotter, so that a short run
   crosses its barriers now and then). For the canonical transformation its frames are reweighted
   to the target temperature (``round0.reweight``; few stay effective, reported), so that its modes
   describe the target ensemble; the kinetic choice uses the hot dynamics as they ran.
2. **Round k**: the canonical transformation of all frames so far, with their reweighting weights
   (``openflow.plugins.openmm.learned_cv``), the kinetically slowest combination of its
   lowest-frequency modes over each run's time order, a ``CVModel`` over features chosen from the
   System (``features: auto``: distances when the energy is invariant under rigid motions, else
   positions), exported as a checked ``CustomCVForce``, then well-tempered metadynamics on it. The two
   basins of the reweighted CV are the states; the round ends the loop when ΔF between them stopped
   drifting and is known: its drift over the run's second half and its error bar both below
   ``rounds.converge_kT`` (after ``rounds.min`` rounds).
3. **Production**: the last round's metadynamics continued for ``production.ns``.

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
import torch

from openflow import analysis, estimators
from openflow.io import save_figure, say, write_json
from openflow.plugins.openmm.learned_cv import FEATURES, choose_features, learn_slow_cv
from openflow.plugins.openmm.md import default_timestep, simulate, temperature_log_weights
from openflow.plugins.openmm.metadynamics import run_metadynamics, step_costs, torsion_bias_variables
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
    "cv": {"hidden": [1], "epochs": 60, "export_frames": 100},
    "metad": {"height": 1.2, "bias_factor": 6.0, "pace_ps": 1.0, "width_std": 0.25},
    "rounds": {"max": 4, "min": 1, "ns": 1.0, "converge_kT": 0.5},
    "production": {"ns": 2.0},
    "report": {"backbone": True, "compare": True, "reference": {"system": None, "delta_f_kT": None, "error_kT": None}},
    "speed": {"steps": 5000, "repeats": 3},
    "progress": None,
}
FREE = ("system.options", "system.xml", "system.pdb", "system.name", "report.reference")


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
    if config["features"] not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {config['features']!r}")
    if not config["metad"]["bias_factor"] > 1:
        raise ValueError(f"metad.bias_factor must be > 1 (well-tempered), got {config['metad']['bias_factor']}")
    if config["rounds"]["min"] > config["rounds"]["max"]:
        raise ValueError(
            f"rounds.min ({config['rounds']['min']}) must not exceed rounds.max ({config['rounds']['max']})"
        )
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


def run_weights(log_w: np.ndarray) -> np.ndarray:
    """One run's weights for a pooled ensemble: normalised, then scaled to the run's effective size, so
    that each run counts as many frames as its reweighting leaves effective."""
    w = np.exp(log_w - log_w.max())
    return w / w.sum() * (w.sum() ** 2 / np.sum(w * w))


def delta_f_curve(inside: np.ndarray, log_w: np.ndarray, time_ps: np.ndarray, points: int = 40) -> list:
    """ΔF(t) between a state and the rest over one run: ``[(time ps, ΔF kT), ...]``."""
    ends, curve = analysis.delta_f_convergence(inside, log_w, n_points=points)
    return list(zip(time_ps[ends - 1].tolist(), curve.tolist()))


def round_summary(values: np.ndarray, log_w: np.ndarray, time_ps: np.ndarray, start: float) -> tuple[dict, list]:
    """The two states along the CV in one run and ΔF(t) = F(other) - F(start) between them, the start
    state being the one of the system's starting structure (CV value ``start``): transitions, ΔF with
    its error and its drift over the run's second half; and the curve ΔF(t)."""
    states = analysis.two_states(values, np.exp(log_w - log_w.max()))
    if states is None:
        return {"states": 1, "transitions": 0, "delta_f_kT": np.nan, "delta_f_error_kT": np.inf, "drift_kT": np.inf}, []
    inside = (values > states.barrier) != (start > states.barrier)  # the state the run did not start in
    curve = delta_f_curve(inside, log_w, time_ps)
    times, values_t = np.array(curve).T
    half = values_t[times >= times[-1] / 2]
    estimate = estimators.state_free_energy(inside, log_w, n_blocks=min(10, inside.size))
    drift = float(np.abs(half - values_t[-1]).max()) if np.isfinite(half).all() else np.inf
    summary = {
        "states": 2,
        "barrier": states.barrier,
        "transitions": analysis.count_transitions(states.series(values)),
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
    transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN))
    metrics = {
        f"{name}_phi_transitions": transitions,
        f"{name}_phi_transitions_per_ns": transitions / result.ns,
        f"{name}_phi_delta_f_kT": estimate.delta_f,
        f"{name}_phi_delta_f_error_kT": estimate.error,
        f"{name}_phi_delta_f_kjmol": estimate.delta_f * system.kT_kjmol,
    }
    return metrics, delta_f_curve(inside, result.log_weights, result.time_ps)


def run(config: dict, out: Path) -> dict:
    progress, seed, platform = config["progress"] is not False, config["seed"], config["platform"]
    system = make_system(config["system"])
    features, invariant, kind = choose_features(system, config["features"], config["atoms"])
    say(f"learned_cv: {system.name}, {kind} features ({features.n_out}), rigid-motion invariant: {invariant}")
    peptide = config["report"]["backbone"] and _has_backbone(system)
    observables = phi_psi_observables() if peptide else None
    steps = md_steps(system, config)
    metrics = {"features": kind, "n_features": features.n_out, "energy_rigid_invariant": invariant}
    metrics.update(frame_steps=steps["interval"], metad_pace_steps=steps["frequency"])

    hot = config["round0"]
    say("learned_cv: round 0, unbiased MD")
    md = simulate(
        make_system(config["system"], hot["temperature_K"]),
        ns=hot["ns"],
        interval=steps["interval"],
        out=out / "round0",
        seed=seed,
        platform=platform,
        progress=progress,
        reuse=True,
    )
    log_w0 = temperature_log_weights(md, system.temperature_K)
    runs = [(md.trajectory, log_w0 if hot["reweight"] else np.zeros_like(log_w0))]
    metrics.update(
        round0_ns=md.steps * md.timestep_ps / 1000.0, round0_ess_fraction=estimators.effective_sample_size(log_w0)
    )
    frame_ps = md.interval * md.timestep_ps
    metad, biased_ns, rounds, curves = config["metad"], 0.0, config["rounds"], {}
    biased = dict(  # every biased run on the learned CV: the same metadynamics settings
        height=metad["height"],
        bias_factor=metad["bias_factor"],
        frequency=steps["frequency"],
        interval=steps["interval"],
        platform=platform,
        cv_names=["cv"],
        observables=observables,
        reuse=True,
        overwrite=True,
        progress=progress,
    )
    for k in range(1, rounds["max"] + 1):
        folder = out / f"round{k}"
        say(f"learned_cv: round {k}: learning the CV from {len(runs)} run(s)")
        weights = np.concatenate([run_weights(log_w) for _, log_w in runs]) if config["nct"]["weighted"] else None
        cv = learn_slow_cv(
            system,
            [path for path, _ in runs],
            md.topology,
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
        )
        variable = cv.bias_variable(metad["width_std"])
        say(f"learned_cv: round {k}: metadynamics on the CV")
        result = run_metadynamics(
            system, [variable], ns=rounds["ns"], out=folder / "metadynamics", seed=seed + k, **biased
        )
        biased_ns += result.ns
        with torch.no_grad():  # the CV of the starting structure: its side is the start state
            start = float(
                cv.model(torch.as_tensor(np.asarray(system.positions.value_in_unit(unit.nanometer)))[None])[0, 0]
            )
        summary, curves[f"round{k}"] = round_summary(result.cvs[:, 0], result.log_weights, result.time_ps, start)
        metrics.update({f"round{k}_{key}": value for key, value in {**summary, **cv.metrics}.items()})
        if peptide:
            metrics.update(backbone_report(result, system, f"round{k}")[0])
        runs.append((result.files["trajectory"], result.log_weights))
        converged = max(summary["drift_kT"], summary["delta_f_error_kT"]) < rounds["converge_kT"]
        if k >= rounds["min"] and converged:
            break
    metrics.update(rounds=k, converged=bool(converged))

    say("learned_cv: production, the last round's metadynamics continued")
    production = run_metadynamics(
        system,
        [variable],
        ns=config["production"]["ns"],
        out=out / "production",
        seed=seed + 100,
        continue_from=folder / "metadynamics",
        **biased,
    )
    shutil.copy2(folder / "cv.xml", out / "production" / "cv.xml")
    final, curves["production"] = round_summary(production.cvs[:, 0], production.log_weights, production.time_ps, start)
    metrics.update({f"production_{key}": value for key, value in final.items()})
    metrics.update(
        biased_ns_total=biased_ns + production.ns,
        production_ns=production.ns,
        production_frame_ps=production.settings["interval"] * production.timestep_ps,
        production_transitions_per_ns=final["transitions"] / production.ns,
    )
    cost = step_costs(
        system,
        [variable],
        steps=config["speed"]["steps"],
        repeats=config["speed"]["repeats"],
        platform=production.platform,
        frequency=steps["frequency"],
    )
    metrics.update(speed_relative_to_bare_md=cost["speed_ratio"], platform=production.platform)
    plot_rounds(curves, out / "delta_f_rounds.png")
    if peptide:
        report_backbone(system, result, production, config, out, metrics, progress)
    write_json(out / "curves.json", curves)
    return metrics


def _has_backbone(system) -> bool:
    try:
        backbone_torsions(system)
    except ValueError:
        return False
    return True


def report_backbone(system, last_round, production, config: dict, out: Path, metrics: dict, progress: bool) -> None:
    """A peptide's phi/psi: the reweighted Ramachandran plot of production, the CV against phi, and the
    comparison run on phi/psi with the same metadynamics settings and length as the final CV's run."""
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
    curves = {
        "learned CV": delta_f_curve(inside, np.concatenate([last_round.log_weights, production.log_weights]), times)
    }
    if config["report"]["compare"]:
        torsions = backbone_torsions(system)
        metad, steps = config["metad"], md_steps(system, config)
        phipsi = run_metadynamics(
            system,
            torsion_bias_variables([torsions["phi"][0], torsions["psi"][0]]),
            ns=last_round.ns + production.ns,
            out=out / "compare_phipsi",
            height=metad["height"],
            bias_factor=metad["bias_factor"],
            frequency=steps["frequency"],
            interval=steps["interval"],
            platform=production.platform,
            seed=config["seed"] + 200,
            cv_names=["cv_phi", "cv_psi"],
            observables=phi_psi_observables(),
            reuse=True,
            overwrite=True,
            progress=progress,
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
