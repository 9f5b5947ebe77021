"""Quickstart: the whole openflow loop on alanine dipeptide, small enough for a laptop.

1. **Simulate** alanine dipeptide in vacuum with OpenMM (Langevin), hotter than the target
   (``data.temperature_K``, default 600 K) so that a short run visits both phi basins.
2. **Train** a neural canonical transformation on the heavy atoms (``openflow.nct``: aligned,
   mass-weighted principal axes, Maxwell-Boltzmann momenta, latent harmonic prior). The two
   slowest latent modes ``(Q1, Q2)`` (a fixed rule: smallest frequencies) are the CVs to learn.
3. **Fit** one ``CVModel`` with ``cv.modes`` outputs over features OpenMM can compute
   (``cv.features``: ``torsions``, sin/cos of the backbone phi and psi, or ``distances``, the 45
   heavy-atom distances) to ``(Q1, Q2)``, **export** each output as a checked ``CustomCVForce``
   (``cv_q1.xml``, ``cv_q2.xml``).
4. **Metadynamics**, well-tempered, on those forces at the target temperature (300 K); the cost
   of an MD step with this bias relative to bare MD (``step_costs``).
5. **Plot** the reweighted Ramachandran surface of the biased run (``ramachandran.png``).

Metrics: frames, the slowest NCT frequencies (1/ps), |corr(Qk, phi basin)| on the data (reported,
never used to choose), CV R^2 per mode, export errors, metadynamics transitions (per ns), phi > 0
population and speed relative to bare MD, wall time per stage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm.unit as unit
import torch

from openflow import analysis
from openflow.cv import CVModel
from openflow.data import load_trajectory
from openflow.features import Dihedrals, FeatureSet, distance_features
from openflow.plugins.openmm import learned_cv
from openflow.plugins.openmm.md import simulate
from openflow.plugins.openmm.metadynamics import learned_bias_variables, run_metadynamics, step_costs
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
    "temperature_K": 300.0,  # metadynamics and the Ramachandran plot
    "data": {"ns": 1.0, "interval": 200, "temperature_K": 600.0, "platform": None},
    "nct": {"layers": 4, "hidden": [32], "steps": 1000, "batch": 256, "lr": 2e-3, "slowest_reported": 4},
    "cv": {"modes": 2, "features": "torsions", "hidden": [16], "epochs": 60, "export_frames": 100, "table_points": 129},
    "metad": {
        "ns": 1.0,
        "interval": 500,
        "height": 2.0,
        "bias_factor": 15.0,
        "frequency": 500,
        "width_std": 0.25,
        "grid": 40,
        "platform": None,
    },
    "speed": {"steps": 5000, "repeats": 5},
    "rama": {"bins": 36, "vmax": 12.0},
    "progress": None,
}
DTYPE = learned_cv.DTYPE  # data, CV fit and export (checked against OpenMM)
FEATURES = ("torsions", "distances")  # CV inputs OpenMM computes


def check(config: dict) -> None:
    """The quickstart's own rules (types and signs are checked by the runner)."""
    if config["cv"]["features"] not in FEATURES:
        raise ValueError(f"cv.features must be one of {sorted(FEATURES)}, got {config['cv']['features']!r}")
    if not 1 <= config["cv"]["modes"] <= 3:
        raise ValueError(
            f"cv.modes must be 1, 2 or 3 (openmm.app.Metadynamics takes 1-3 CVs), got {config['cv']['modes']}"
        )
    if not config["metad"]["bias_factor"] > 1:
        raise ValueError(f"metad.bias_factor must be > 1 (well-tempered), got {config['metad']['bias_factor']}")


def _system(temperature_k: float):
    return alanine_dipeptide(solvent="vacuum", temperature=float(temperature_k) * unit.kelvin)


def cv_model(system, config: dict) -> CVModel:
    """The (untrained) CV of ``config["cv"]``: features -> tanh MLP -> ``modes`` outputs, float64."""
    settings = config["cv"]
    if settings["features"] not in FEATURES:
        raise ValueError(f"cv.features must be one of {sorted(FEATURES)}, got {settings['features']!r}")
    if not 1 <= int(settings["modes"]) <= 3:
        raise ValueError(f"cv.modes must be 1, 2 or 3 (openmm.app.Metadynamics takes 1-3 CVs), got {settings['modes']}")
    torsions = backbone_torsions(system)
    features = (
        FeatureSet(Dihedrals(torsions["phi"] + torsions["psi"]))
        if settings["features"] == "torsions"
        else distance_features(system)
    )
    return CVModel(features, hidden=settings["hidden"], n_out=int(settings["modes"]), seed=config["seed"]).to(DTYPE)


def fit_and_export(system, frames: mdtraj.Trajectory, targets: torch.Tensor, config: dict, out: Path):
    """Regress the CV of ``config["cv"]`` on ``targets (N, modes)``, export each output (checked) as
    ``cv_q{k}.xml`` with ``cv.pt``: the forces, their ranges, the CVs' standard deviations, metrics, files."""
    settings = config["cv"]
    exported = learned_cv.fit_and_export(
        cv_model(system, config),
        frames,
        targets,
        settings["epochs"],
        config["seed"],
        out,
        settings["export_frames"],
        settings["table_points"],
    )
    return (
        exported.forces,
        exported.ranges,
        exported.stds,
        dict(exported.metrics, cv_features=settings["features"]),
        exported.files,
    )


def basin_correlation(values: torch.Tensor, phi: np.ndarray) -> float:
    """|Pearson correlation| between ``values (N,)`` and the phi > 0 basin indicator (NaN if one basin is empty)."""
    label = (phi_states(phi) == 1).astype(float)
    if label.min() == label.max():
        return float("nan")
    return float(abs(np.corrcoef(values.numpy(), label)[0, 1]))


def learn_slow_cvs(config: dict, out: Path, progress: bool, metrics: dict, files: dict, lap) -> tuple[list, list, list]:
    """Steps 1-3: hot MD, the canonical transformation, and the CV fitted to its ``cv.modes`` slowest
    modes, exported and checked. No phi/psi information is used (phi is only reported). Returns the
    exported forces, their ``(lo, hi)`` ranges and the standard deviations of the CVs over the MD frames."""
    hot = _system(config["data"]["temperature_K"])
    data = config["data"]
    md = simulate(
        hot,
        ns=data["ns"],
        interval=data["interval"],
        out=out / "md",
        seed=config["seed"],
        platform=data["platform"],
        progress=progress,
        reuse=True,
    )
    frames = load_trajectory(str(md.trajectory), str(md.topology))
    phi = phi_psi(frames)[0]
    files.update(md_trajectory=md.trajectory, md_topology=md.topology)
    metrics.update(
        frames=md.n_frames,
        md_ns_per_day=md.ns_per_day,
        md_platform=md.platform,
        md_population_positive=analysis.state_populations(phi_states(phi) == 1)["state"],
    )
    lap("simulate")

    n_modes = int(config["cv"]["modes"])  # the n smallest frequencies: a fixed rule
    slow = learned_cv.slow_modes_of_trajectory(
        hot, md.trajectory, md.topology, n_modes, config["nct"], config["seed"], out / "nct", progress
    )
    metrics.update(slow.metrics)
    omega = slow.omega
    k = min(int(config["nct"]["slowest_reported"]), omega.numel())
    metrics.update({f"nct_omega_{i + 1}_per_ps": float(w) for i, w in enumerate(omega[:k])})
    metrics.update(
        {f"nct_q{k + 1}_basin_correlation": basin_correlation(slow.modes[:, k], phi) for k in range(n_modes)}
    )
    files["nct_checkpoint"] = out / "nct" / "checkpoint.pt"
    lap("train_nct")

    forces, ranges, stds, cv_metrics, cv_files = fit_and_export(hot, frames, slow.modes, config, out)
    metrics.update(cv_metrics)
    files.update(cv_files)
    lap("fit_export_cv")
    return forces, ranges, stds


def run(config: dict, out: Path) -> dict:
    progress = config["progress"] is not False  # None: a bar on a terminal, a line per quarter in logs
    metrics, files, clock = {}, {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        metrics[f"time_{stage}_s"] = now - clock
        clock = now

    forces, ranges, stds = learn_slow_cvs(config, out, progress, metrics, files, lap)
    n_modes = len(forces)
    metad, target = config["metad"], _system(config["temperature_K"])
    widths = [metad["width_std"] * std for std in stds]
    variables = learned_bias_variables(forces, widths, metad["grid"], ranges)
    result = run_metadynamics(
        target,
        variables,
        ns=metad["ns"],
        out=out / "metadynamics",
        height=metad["height"],
        bias_factor=metad["bias_factor"],
        frequency=metad["frequency"],
        interval=metad["interval"],
        platform=metad["platform"],
        seed=config["seed"],
        cv_names=[f"q{k + 1}" for k in range(n_modes)],
        observables=phi_psi_observables(),
        reuse=True,
        overwrite=True,
        progress=progress,
    )
    phi, psi = result.observables["phi"], result.observables["psi"]
    transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN))
    populations = analysis.state_populations(phi_states(phi) == 1, result.weights)
    metrics.update(
        metad_transitions=transitions,
        metad_transitions_per_ns=transitions / result.ns,
        metad_ns_per_day=result.ns_per_day,
        metad_platform=result.platform,
        metad_population_positive=populations["state"],
        metad_delta_f_kT=populations["delta_f_kT"],
        metad_ess_fraction=populations["ess_fraction"],
    )
    metrics.update({f"metad_width_q{k + 1}": width for k, width in enumerate(widths)})
    cost = step_costs(
        target,
        variables,
        steps=config["speed"]["steps"],
        repeats=config["speed"]["repeats"],
        platform=result.platform,
        frequency=metad["frequency"],
    )
    metrics.update(
        metad_speed_relative_to_bare_md=cost["speed_ratio"],
        metad_biased_us_per_step=1e6 * cost["biased_s_per_step"],
        bare_md_us_per_step=1e6 * cost["bare_s_per_step"],
    )
    files.update({f"metad_{key}": result.files[key] for key in ("trajectory", "topology", "colvar", "weights")})
    lap("metadynamics")

    surface = analysis.ramachandran((phi, psi), weights=result.weights, bins=config["rama"]["bins"])
    title = f"metadynamics on ({', '.join(f'Q{k + 1}' for k in range(n_modes))}) (reweighted)"
    files["ramachandran"] = analysis.plot_ramachandran(
        surface, out / "ramachandran.png", title=title, vmax=config["rama"]["vmax"], boundaries=PHI_POSITIVE_BASIN
    )
    lap("plot")
    files["metrics"] = out / "metrics.json"
    print("\nopenflow quickstart: done", file=sys.stderr)
    for label, path in files.items():
        print(f"  {label:18s} {path}", file=sys.stderr)
    return metrics
