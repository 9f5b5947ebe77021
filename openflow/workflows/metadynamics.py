"""Metadynamics of alanine dipeptide: unbiased MD vs well-tempered metadynamics on phi/psi vs on a
learned CV, all of the same length.

1. **Unbiased** Langevin MD (``run_metadynamics(system, [])``: the same files and analysis).
2. **phi/psi**: periodic torsion CVs, ``openmm.app.Metadynamics`` on a 2-D grid.
3. **Learned CV** (``cv.source``): ``learned`` (default), the first round of the learned-CV loop
   (``openflow.plugins.openmm.learned_cv.learn_cv``: hot MD reweighted to 300 K for the canonical
   transformation, the kinetically slowest combination of its lowest-frequency modes, a CV over the
   heavy-atom distances fitted to it, exported and checked: no phi/psi information); ``xml``,
   exported CV force XML files (``cv.xml`` with ``cv.range``, 1-3 of them, e.g. the learned-CV
   workflow's ``production/cv.xml`` with the range from its ``metrics.json``); or ``stand_in``: a
   small ``CVModel`` (45 heavy-atom distances or sin/cos(phi, psi) -> tanh MLP) regressed on
   ``cos(phi - 1 rad)``, a smooth function of phi that is 1 in the alpha_L/C7ax basin: a CV known to
   be good, for testing the machinery, not one learned without phi.

Metrics (flat, per run prefix ``unbiased_``, ``phipsi_``, ``learned_``): transitions between the
phi basins and per ns, ΔF(positive - negative) in kT from the c(t)-reweighted frames, its value at
half time and its drift over the second half, ns/day; for phi/psi also ΔF straight from the final
bias (``phipsi_delta_f_from_bias_kT``); the cost of one MD step with each bias relative to bare
MD (``step_costs``). Plots: reweighted Ramachandran per run (``rama_<run>.png``) and ΔF(t)
(``delta_f.png``).
"""

from __future__ import annotations

from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.unit as unit
import torch

from openflow import analysis
from openflow.cv import CVModel, fit_cv
from openflow.data import load_trajectory
from openflow.features import Dihedrals, FeatureSet, distance_features
from openflow.io import save_figure
from openflow.plugins.openmm import learned_cv
from openflow.plugins.openmm.bias import fes_state_delta_f, learned_bias_variables, torsion_bias_variables
from openflow.plugins.openmm.export import export_cv, load_cv_force, save_cv_force
from openflow.plugins.openmm.md import simulate, temperature_log_weights
from openflow.plugins.openmm.metadynamics import step_costs
from openflow.plugins.openmm.walkers import biased_run, check_walkers, client_for
from openflow.systems.alanine_dipeptide import (
    PHI_CORE_MARGIN,
    PHI_POSITIVE_BASIN,
    alanine_dipeptide,
    backbone_torsions,
    phi_psi,
    phi_psi_observables,
    phi_states,
)

DEFAULTS = {
    "seed": 0,
    "system": {"solvent": "vacuum"},
    "md": {"ns": 2.0, "interval": 1000, "platform": None, "equilibration_steps": 1000},
    "metad": {
        "height": 1.2,
        "bias_factor": 6.0,
        "frequency": 1000,
    },  # PLUMED's usual alanine dipeptide setup: 1.2 kJ/mol per ps
    "phipsi": {"width": 0.35, "grid": 60},  # 60 x 60: a deposit costs ~1/2 of 90 x 90 (OpenMM's default)
    # cv.source: "learned" (the learned-CV loop's first round on hot MD, settings in "learn"),
    # "stand_in" (an MLP regressed on cos(phi - target_center)) or "xml" (cv.xml + cv.range)
    "cv": {
        "source": "learned",
        "xml": None,
        "range": None,
        "features": "distances",
        "hidden": [8],
        "epochs": 100,
        "target_center": 1.0,
        "width": 0.05,
        "grid": None,
        "table_points": 257,
    },
    # cv.source learned: hot MD, its frames reweighted to the target temperature for the canonical
    # transformation, the kinetically slowest combination of its lowest-frequency modes, a CV over the
    # heavy-atom distances fitted to it (no phi/psi anywhere); Gaussian width width_std CV standard deviations
    "learn": {
        "data": {"ns": 1.0, "interval": 200, "temperature_K": 600.0, "platform": None},
        "nct": {"layers": 4, "hidden": [32], "steps": 1000, "batch": 256, "lr": 2e-3},
        "lag_ps": 1.0,
        "hidden": [1],
        "epochs": 60,
        "width_std": 0.25,
    },
    "speed": {"steps": 5000, "repeats": 5},
    "walkers": 1,  # walkers per run sharing its bias (md.ns is their total), as Dask tasks
    "cluster": {"address": None, "n_workers": None},  # a scheduler's address, else a LocalCluster
    "checkpoint_ps": 50.0,
    "progress": None,
}


SIGNED = ("cv.target_center",)  # rad
FREE = ("cv.width", "cluster.address", "cluster.n_workers")  # cv.width: one width, or one per CV


def check(config: dict) -> None:
    """The workflow's own rules (types and signs are checked by the runner)."""
    settings = config["cv"]
    if settings["source"] not in ("learned", "stand_in", "xml"):
        raise ValueError(f"cv.source must be 'learned', 'stand_in' or 'xml', got {settings['source']!r}")
    if settings["source"] == "xml" and not settings["xml"]:
        raise ValueError(
            "cv.source xml needs cv.xml: 1-3 exported CV force XML files (and cv.range, one [min, max] each)"
        )
    widths = settings["width"] if isinstance(settings["width"], list) else [settings["width"]]
    if not widths or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(
            f"cv.width must be a positive number or a list of them (one per CV), got {settings['width']!r}"
        )
    if settings["features"] not in ("torsions", "phi_psi", "distances"):
        raise ValueError(f"cv.features must be 'distances' or 'torsions', got {settings['features']!r}")
    if not config["metad"]["bias_factor"] > 1:
        raise ValueError(f"metad.bias_factor must be > 1 (well-tempered), got {config['metad']['bias_factor']}")
    check_walkers(config["walkers"], config["cluster"])


def features_of(system, name: str) -> FeatureSet:
    """``torsions`` (sin/cos of the backbone phi and psi) or ``distances`` (heavy-atom pairs)."""
    if name not in ("torsions", "phi_psi", "distances"):
        raise ValueError(f"features must be 'distances' or 'torsions', got {name!r}")
    if name == "distances":
        return distance_features(system)
    torsions = backbone_torsions(system)
    return FeatureSet(Dihedrals(torsions["phi"] + torsions["psi"]))


def stand_in_cv(system, frames: mdtraj.Trajectory, config: dict, out: Path):
    """Fit and export the stand-in CV on ``frames``; return (force, (lo, hi), metrics)."""
    settings = config["cv"]
    torch.manual_seed(config["seed"])
    cv = CVModel(features_of(system, settings["features"]), hidden=settings["hidden"], seed=config["seed"]).double()
    positions = torch.as_tensor(frames.xyz, dtype=torch.float64)
    phi = torch.as_tensor(phi_psi(frames)[0], dtype=torch.float64)
    fit = fit_cv(
        cv, positions, torch.cos(phi - settings["target_center"]), epochs=settings["epochs"], seed=config["seed"]
    )
    force, report = export_cv(cv, positions[::5], method="auto", points=settings["table_points"])
    save_cv_force(force, out / "learned_cv.xml")
    torch.save(cv.state_dict(), out / "learned_cv.pt")
    lo, hi = (float(v[0]) for v in cv.bounds())
    metrics = {
        "learned_cv_r2_validation": fit.r2_validation[0],
        "learned_cv_export_method": report["method"],
        "learned_cv_export_max_value_error": report["max_value_error"],
        "learned_cv_lo": lo,
        "learned_cv_hi": hi,
    }
    return force, (lo, hi), metrics


def learned_cv_force(config: dict, out: Path, progress: bool) -> tuple[openmm.Force, tuple, float, dict]:
    """The learned CV of hot MD (``learned_cv.learn_cv``, no phi/psi used): force, range, std, metrics."""
    learn, seed = config["learn"], config["seed"]
    data = learn["data"]
    system = alanine_dipeptide(**config["system"])
    hot = alanine_dipeptide(**config["system"], temperature=float(data["temperature_K"]) * unit.kelvin)
    md = simulate(
        hot,
        ns=data["ns"],
        interval=data["interval"],
        out=out / "md",
        seed=seed,
        platform=data["platform"],
        progress=progress,
        reuse=True,
    )
    log_w = temperature_log_weights(md, system.temperature_K)
    cv = learned_cv.learn_cv(
        system,
        md.trajectory,
        md.topology,
        weights=np.exp(log_w - log_w.max()),
        out=out,
        seed=seed,
        lag_ps=learn["lag_ps"],
        nct=learn["nct"],
        hidden=learn["hidden"],
        epochs=learn["epochs"],
        dims=1,
        progress=progress,
    )
    phi = phi_psi(load_trajectory(md.trajectory, md.topology))[0]  # reported, never used to learn
    basin = phi_states(phi) == 1
    metrics = dict(
        cv.metrics,
        frames=md.n_frames,
        md_platform=md.platform,
        md_population_positive=float(basin.mean()),
        learned_cv_phi_basin_auc=analysis.basin_separation_auc(cv.values[:, 0], basin)
        if 0 < basin.sum() < basin.size
        else float("nan"),
    )
    return cv.forces[0], cv.ranges[0], cv.stds[0], metrics


def xml_cvs(xml, ranges) -> tuple[list, list[tuple[float, float]]]:
    """Exported CV forces and their ranges from ``cv.xml`` (a path or a list of 1-3 paths) and
    ``cv.range`` (``[min, max]``, or one such pair per path)."""
    paths = [xml] if isinstance(xml, (str, Path)) else list(xml)
    if ranges is not None and len(ranges) == 2 and all(np.isscalar(v) for v in ranges):
        ranges = [ranges]
    if not 1 <= len(paths) <= 3 or not ranges or len(ranges) != len(paths) or any(len(r) != 2 for r in ranges):
        raise ValueError(
            "cv.xml takes 1-3 CV force XML files and cv.range one [min, max] per file "
            f"(the bias is zero outside it), got {len(paths)} file(s) and range {ranges!r}"
        )
    return [load_cv_force(path) for path in paths], [(float(lo), float(hi)) for lo, hi in ranges]


def convergence(result) -> dict:
    """Final ΔF, ΔF at half time, the largest deviation from the final value over the second half (kT),
    and ΔF(t) as ``(time ps, ΔF)`` pairs."""
    order = np.argsort(result.time_ps, kind="stable")  # walkers: their frames in time order
    walkers = np.unique(result.observables.get("walker", [0])).size
    phi = result.observables["phi"][order]
    ends, values = analysis.delta_f_convergence(phi_states(phi) == 1, result.log_weights[order])
    times = walkers * result.time_ps[order][ends - 1]  # biased time over all walkers
    second_half = values[times >= times[-1] / 2]
    finite = np.isfinite(second_half).all()
    return {
        "delta_f_kT": values[-1],
        "delta_f_half_time_kT": values[np.searchsorted(times, times[-1] / 2)],
        "delta_f_drift_second_half_kT": float(np.abs(second_half - values[-1]).max()) if finite else np.inf,
        "delta_f_kT_t": list(zip(times.tolist(), values.tolist())),
    }


def plot_delta_f(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        times, values = zip(*curve)
        ax.plot(np.array(times) / 1000.0, values, "o-", ms=3, label=name)
    ax.set(
        xlabel="time (ns)", ylabel=r"$\Delta F$ ($\phi>0$ minus $\phi<0$, kT)", title="convergence (c(t) reweighting)"
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def run(config: dict, out: Path) -> dict:
    with client_for(config["walkers"], **config["cluster"]) as client:
        return compare_runs(config, out, client)


def compare_runs(config: dict, out: Path, client) -> dict:
    """Unbiased, phi/psi and learned-CV runs of the same length (see the module); ``client``: Dask's."""
    system = alanine_dipeptide(**config["system"])
    md, metad = config["md"], config["metad"]
    progress = config["progress"] is not False
    common = dict(
        ns=md["ns"],
        interval=md["interval"],
        platform=md["platform"],
        seed=config["seed"],
        equilibration_steps=md["equilibration_steps"],
        progress=progress,
        height=metad["height"],
        bias_factor=metad["bias_factor"],
        frequency=metad["frequency"],
        observables=phi_psi_observables(),
        reuse=True,
        overwrite=True,
        client=client,
        walkers=config["walkers"],
        checkpoint_ps=config["checkpoint_ps"],
    )
    results, metrics = {}, {}
    results["unbiased"] = biased_run(system, [], out / "unbiased", **common)
    torsions = backbone_torsions(system)
    phipsi = torsion_bias_variables(
        [torsions["phi"][0], torsions["psi"][0]], width=config["phipsi"]["width"], grid=config["phipsi"]["grid"]
    )
    results["phipsi"] = biased_run(system, phipsi, out / "phipsi", cv_names=["cv_phi", "cv_psi"], **common)

    settings, widths, grid = config["cv"], config["cv"]["width"], config["cv"]["grid"]
    if settings["source"] == "xml" or settings["xml"]:
        forces, cv_ranges = xml_cvs(settings["xml"], settings["range"])
    elif settings["source"] == "learned":
        force, cv_range, std, learned_metrics = learned_cv_force(config, out / "learn", progress)
        forces, cv_ranges, widths = [force], [cv_range], [config["learn"]["width_std"] * std]
        grid = min(2000, int(np.ceil(5 * (cv_range[1] - cv_range[0]) / widths[0])))
        metrics.update(learned_metrics)
    else:  # stand_in
        files = results["phipsi"].files
        frames = load_trajectory(str(files["trajectory"]), str(files["topology"]))
        force, cv_range, cv_metrics = stand_in_cv(system, frames, config, out)
        forces, cv_ranges = [force], [cv_range]
        metrics.update(cv_metrics)
    learned = learned_bias_variables(forces, widths, grid, cv_ranges)
    names = ["cv"] if len(forces) == 1 else [f"cv{k + 1}" for k in range(len(forces))]
    results["learned"] = biased_run(system, learned, out / "learned", cv_names=names, **common)

    curves = {}
    for name, result in results.items():
        phi, psi = result.observables["phi"], result.observables["psi"]
        transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN), result.observables.get("walker"))
        converged = convergence(result)
        curves[name] = converged.pop("delta_f_kT_t")
        metrics.update(
            {
                f"{name}_transitions": transitions,
                f"{name}_transitions_per_ns": transitions / result.ns,
                f"{name}_ns_per_day": result.ns_per_day,
                f"{name}_population_positive": analysis.state_populations(phi_states(phi) == 1, result.weights)[
                    "state"
                ],
            }
        )
        metrics.update({f"{name}_{key}": value for key, value in converged.items()})
        surface = analysis.ramachandran((phi, psi), weights=result.weights, bins=36)
        analysis.plot_ramachandran(
            surface, out / f"rama_{name}.png", title=f"{name} (reweighted)", vmax=12.0, boundaries=PHI_POSITIVE_BASIN
        )
    plot_delta_f({name: curves[name] for name in ("phipsi", "learned")}, out / "delta_f.png")
    fes = np.load(results["phipsi"].files["fes"])
    metrics["phipsi_delta_f_from_bias_kT"] = fes_state_delta_f(
        fes["free_energy_kjmol"], phi_states(fes["axis_0"]) == 1, system.kT_kjmol, periodic=True
    )

    for name, variables in (("phipsi", phipsi), ("learned", learned)):
        cost = step_costs(
            system,
            variables,
            steps=config["speed"]["steps"],
            repeats=config["speed"]["repeats"],
            platform=md["platform"],
            frequency=metad["frequency"],
        )
        metrics[f"{name}_speed_relative_to_bare_md"] = cost["speed_ratio"]
        metrics[f"{name}_biased_us_per_step"] = 1e6 * cost["biased_s_per_step"]
        metrics[f"{name}_bare_md_us_per_step"] = 1e6 * cost["bare_s_per_step"]  # the same Context, unbiased
    metrics["platform"] = results["unbiased"].platform
    metrics["ns_per_run"] = md["ns"]
    return metrics
