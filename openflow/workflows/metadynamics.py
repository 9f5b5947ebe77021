"""Metadynamics of alanine dipeptide: unbiased MD vs well-tempered metadynamics on phi/psi vs on a
learned CV, all of the same length.

1. **Unbiased** Langevin MD (``run_metadynamics(system, [])``: the same files and analysis).
2. **phi/psi**: periodic torsion CVs, ``openmm.app.Metadynamics`` on a 2-D grid.
3. **Learned CV** (``cv.source``): ``nct`` (default), the slowest mode of a neural canonical
   transformation, learned without any phi/psi information by the quickstart's steps 1-3
   (:func:`openflow.workflows.quickstart.learn_slow_cvs`: hot MD, NCT on the heavy-atom phase space, a
   CV over sin/cos(phi, psi) fitted to ``learn.cv.modes`` slowest modes, exported as a checked
   periodic table); ``xml``, exported CV force XML files (``cv.xml`` with ``cv.range``, 1-3 of
   them, e.g. the quickstart's ``cv_q1.xml`` and ``cv_q2.xml`` with the ranges from its
   ``metrics.json``: one non-periodic bias axis each); or ``stand_in``: a small ``CVModel`` (45
   heavy-atom distances or sin/cos(phi, psi) -> tanh MLP) regressed on ``cos(phi - 1 rad)``, a
   smooth function of phi that is 1 in the alpha_L/C7ax basin, about -0.8 in C7eq/C5, and takes
   the same value (~0.54) at both phi barriers (0 and 2 rad), trained on the phi/psi metadynamics
   frames: a CV known to be good, for testing the machinery, not one learned without phi.
   Exported with ``export_cv(method="auto")`` (checked against torch), bounds from ``CVModel.bounds()``.

Metrics (flat, per run prefix ``unbiased_``, ``phipsi_``, ``learned_``): transitions between the
phi < 0 and phi > 0 basins and per ns (hysteresis cores, ``openflow.analysis``), ΔF(positive -
negative) in kT from the c(t)-reweighted frames, its value at half time and its drift over the
second half (convergence), ns/day; for phi/psi also ΔF straight from the final bias
(``phipsi_delta_f_from_bias_kT``: the sum_hills FES integrated over each phi basin); the cost of
one MD step with each bias relative to bare MD (``step_costs``: same integrator, no reporters).
Plots: reweighted Ramachandran per run (``rama_<run>.png``) and ΔF(t) (``delta_f.png``).
"""
from __future__ import annotations

from pathlib import Path

import mdtraj
import numpy as np
import torch

from openflow import analysis
from openflow.cv import CVModel, fit_cv
from openflow.features import heavy_atom_distance_features, phi_psi_features
from openflow.plugins.openmm.export import export_cv, load_cv_force, save_cv_force
from openflow.plugins.openmm.metadynamics import (basin_delta_f_from_fes, learned_bias_variables, phi_psi_bias_variables,
                                                  run_metadynamics, step_costs)
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.workflows import quickstart

DEFAULTS = {
    "seed": 0,
    "system": {"solvent": "vacuum"},
    "md": {"ns": 2.0, "interval": 1000, "platform": None, "equilibration_steps": 1000},
    "metad": {"height": 1.2, "bias_factor": 6.0, "frequency": 1000},  # PLUMED's usual alanine dipeptide setup: 1.2 kJ/mol per ps
    "phipsi": {"width": 0.35, "grid": 60},  # 60 x 60: a deposit costs ~1/2 of 90 x 90 (OpenMM's default)
    # cv.source: "nct" (the slowest mode of a canonical transformation, settings in "learn"),
    # "stand_in" (an MLP regressed on cos(phi - target_center)) or "xml" (cv.xml + cv.range)
    "cv": {"source": "nct", "xml": None, "range": None, "features": "distances", "hidden": [8], "epochs": 100,
           "target_center": 1.0, "width": 0.05, "grid": None, "table_points": 257},
    # cv.source nct: the quickstart's steps 1-3 (hot MD, NCT, CV over sin/cos(phi, psi) fitted to the
    # slowest mode(s), exported as a checked table); Gaussian width width_std CV standard deviations
    "learn": {"data": dict(quickstart.DEFAULTS["data"]), "nct": dict(quickstart.DEFAULTS["nct"]),
              "cv": dict(quickstart.DEFAULTS["cv"], modes=1), "width_std": 0.25, "grid": 40},
    "speed": {"steps": 5000, "repeats": 5},
    "progress": None,
}


def stand_in_cv(system, frames: mdtraj.Trajectory, config: dict, out: Path):
    """Fit and export the stand-in CV on ``frames``; return (force, (lo, hi), metrics)."""
    settings = config["cv"]
    if settings["features"] not in ("distances", "phi_psi"):
        raise ValueError(f"cv.features must be 'distances' or 'phi_psi', got {settings['features']!r}")
    features = heavy_atom_distance_features(system) if settings["features"] == "distances" else phi_psi_features(system)
    torch.manual_seed(config["seed"])
    cv = CVModel(features, hidden=settings["hidden"], seed=config["seed"]).double()
    positions = torch.as_tensor(frames.xyz, dtype=torch.float64)
    phi = torch.as_tensor(mdtraj.compute_phi(frames)[1][:, 0], dtype=torch.float64)
    fit = fit_cv(cv, positions, torch.cos(phi - settings["target_center"]), epochs=settings["epochs"], seed=config["seed"])
    force, report = export_cv(cv, positions[::5], method="auto", points=settings["table_points"])
    save_cv_force(force, out / "learned_cv.xml")
    torch.save(cv.state_dict(), out / "learned_cv.pt")
    lo, hi = (float(v[0]) for v in cv.bounds())
    metrics = {"learned_cv_r2_validation": fit.r2_validation[0], "learned_cv_export_method": report["method"],
               "learned_cv_export_max_value_error": report["max_value_error"], "learned_cv_lo": lo, "learned_cv_hi": hi}
    return force, (lo, hi), metrics


def xml_cvs(xml, ranges) -> tuple[list, list[tuple[float, float]]]:
    """Exported CV forces and their ranges from ``cv.xml`` (a path or a list of 1-3 paths) and
    ``cv.range`` (``[min, max]``, or one such pair per path)."""
    paths = [xml] if isinstance(xml, (str, Path)) else list(xml)
    if ranges is not None and len(ranges) == 2 and all(np.isscalar(v) for v in ranges):
        ranges = [ranges]
    if not 1 <= len(paths) <= 3 or not ranges or len(ranges) != len(paths) or any(len(r) != 2 for r in ranges):
        raise ValueError("cv.xml takes 1-3 CV force XML files and cv.range one [min, max] per file "
                         f"(the bias is zero outside it), got {len(paths)} file(s) and range {ranges!r}")
    return [load_cv_force(path) for path in paths], [(float(lo), float(hi)) for lo, hi in ranges]


def convergence(result) -> dict:
    """Final ΔF, ΔF at half time, and the largest deviation from the final value over the second half (kT)."""
    times, values = (np.array(v) for v in zip(*result.delta_f_kT_t))
    second_half = values[times >= times[-1] / 2]
    finite = np.isfinite(second_half).all()
    return {"delta_f_kT": values[-1], "delta_f_half_time_kT": values[np.searchsorted(times, times[-1] / 2)],
            "delta_f_drift_second_half_kT": float(np.abs(second_half - values[-1]).max()) if finite else np.inf}


def plot_delta_f(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, result in results.items():
        times, values = zip(*result.delta_f_kT_t)
        ax.plot(np.array(times) / 1000.0, values, "o-", ms=3, label=name)
    ax.set(xlabel="time (ns)", ylabel=r"$\Delta F$ ($\phi>0$ minus $\phi<0$, kT)", title="convergence (c(t) reweighting)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: dict, out: Path) -> dict:
    source = config["cv"]["source"]
    if source not in ("nct", "stand_in", "xml"):
        raise ValueError(f"cv.source must be 'nct', 'stand_in' or 'xml', got {source!r}")
    if source == "xml" and not config["cv"]["xml"]:
        raise ValueError("cv.source xml needs cv.xml: 1-3 exported CV force XML files (and cv.range, one [min, max] each)")
    system = alanine_dipeptide(**config["system"])
    md, metad = config["md"], config["metad"]
    common = dict(ns=md["ns"], interval=md["interval"], platform=md["platform"], seed=config["seed"],
                  equilibration_steps=md["equilibration_steps"], progress=config["progress"] is not False,
                  height=metad["height"], bias_factor=metad["bias_factor"], frequency=metad["frequency"])
    results, metrics = {}, {}
    results["unbiased"] = run_metadynamics(system, [], out=out / "unbiased", **common)
    phipsi = phi_psi_bias_variables(system, width=config["phipsi"]["width"], grid=config["phipsi"]["grid"])
    results["phipsi"] = run_metadynamics(system, phipsi, out=out / "phipsi", cv_names=["cv_phi", "cv_psi"], **common)

    settings, widths, grid = config["cv"], config["cv"]["width"], config["cv"]["grid"]
    if settings["source"] == "xml" or settings["xml"]:
        forces, cv_ranges = xml_cvs(settings["xml"], settings["range"])
    elif settings["source"] == "nct":
        learn = dict(config["learn"], seed=config["seed"])
        forces, cv_ranges, stds = quickstart.learn_slow_cvs(learn, out / "learn", common["progress"], metrics, {})
        widths, grid = [learn["width_std"] * std for std in stds], learn["grid"]
    else:  # stand_in
        files = results["phipsi"].files
        frames = mdtraj.load(str(files["trajectory"]), top=str(files["topology"]))
        force, cv_range, cv_metrics = stand_in_cv(system, frames, config, out)
        forces, cv_ranges = [force], [cv_range]
        metrics.update(cv_metrics)
    learned = learned_bias_variables(forces, widths, grid, cv_ranges)
    names = ["cv"] if len(forces) == 1 else [f"cv{k + 1}" for k in range(len(forces))]
    results["learned"] = run_metadynamics(system, learned, out=out / "learned", cv_names=names, **common)

    for name, result in results.items():
        summary = result.summary()
        metrics.update({f"{name}_{key}": summary[key] for key in ("transitions", "transitions_per_ns", "ns_per_day", "population_positive")})
        metrics.update({f"{name}_{key}": value for key, value in convergence(result).items()})
        colvar = read_colvar(result.files["colvar"])
        surface = analysis.ramachandran((colvar["phi"], colvar["psi"]), weights=np.load(result.files["weights"]), bins=36)
        analysis.plot_ramachandran(surface, out / f"rama_{name}.png", title=f"{name} (reweighted)", vmax=12.0)
    plot_delta_f({name: results[name] for name in ("phipsi", "learned")}, out / "delta_f.png")
    fes = np.load(results["phipsi"].files["fes"])
    metrics["phipsi_delta_f_from_bias_kT"] = basin_delta_f_from_fes(fes["free_energy_kjmol"], fes["axis_0"], system.kT_kjmol)

    for name, variables in (("phipsi", phipsi), ("learned", learned)):
        cost = step_costs(system, variables, steps=config["speed"]["steps"], repeats=config["speed"]["repeats"],
                          platform=md["platform"], frequency=metad["frequency"])
        metrics[f"{name}_speed_relative_to_bare_md"] = cost["speed_ratio"]
        metrics[f"{name}_biased_us_per_step"] = 1e6 * cost["biased_s_per_step"]
        metrics["bare_md_us_per_step"] = 1e6 * cost["bare_s_per_step"]
    metrics["platform"] = results["unbiased"].platform
    metrics["ns_per_run"] = md["ns"]
    return metrics
