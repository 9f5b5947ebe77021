"""Quickstart: the whole openflow loop on alanine dipeptide, small enough for a laptop.

1. **Simulate** alanine dipeptide in vacuum with OpenMM (Langevin). The data run is hotter than
   the target (``data.temperature_K``, default 600 K) so that a short run visits both phi basins.
2. **Train** a neural canonical transformation on the heavy atoms: positions aligned (Kabsch)
   and centred, mass-weighted and reduced ``q~ = sqrt(m/kT) q`` (ps), paired with
   Maxwell-Boltzmann momenta ``p~ ~ N(0, 1)``, both rotated onto the 24 principal axes of ``q~``
   that alignment leaves (a canonical map); the model is a point transformation of a small
   RealNVP (on whitened axes) under a latent harmonic prior whose frequencies start at
   ``1/sqrt(variance)`` per axis (maximum likelihood, Adam). The slowest latent mode ``Q1(q)``
   is the collective variable to learn.
3. **Fit** a ``CVModel`` over features OpenMM can compute (45 heavy-atom distances -> tanh MLP
   -> 1) to ``Q1`` (held-out R^2), **export** it as a ``CustomCVForce`` checked against torch on
   data frames, and save it as OpenMM XML (``cv.xml``).
4. **Metadynamics**: well-tempered, on that force, at the target temperature (300 K): biased DCD +
   PDB, COLVAR, reweighting weights.
5. **Plot** the reweighted Ramachandran surface of the biased run (``ramachandran.png``) and print
   where every file is.

Metrics: frames, the slowest NCT frequencies (1/ps), |corr(Q1, phi basin)| on the data, CV R^2,
export errors, metadynamics transitions (per ns) and phi > 0 population, wall time per stage.
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
from openflow.cv import CVModel, fit_cv
from openflow.data import load, simulate
from openflow.features import heavy_atom_distance_features
from openflow.flows.coupling import real_nvp
from openflow.flows.priors import LatentHarmonicPrior
from openflow.flows.symplectic import (CanonicalSequential, NeuralCanonicalTransformation, PointTransformation,
                                       SymplecticScaling, mass_weight)
from openflow.plugins.openmm.export import export_cv, save_cv_force
from openflow.plugins.openmm.metadynamics import learned_bias_variables, run_metadynamics
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.training import Trainer

DEFAULTS = {
    "seed": 0,
    "temperature_K": 300.0,  # metadynamics and the Ramachandran plot
    "data": {"ns": 1.0, "interval": 200, "temperature_K": 600.0, "platform": None},
    "nct": {"layers": 4, "hidden": [32], "steps": 300, "batch": 256, "lr": 2e-3, "slowest_reported": 4},
    "cv": {"hidden": [16], "epochs": 60, "export_frames": 100},
    "metad": {"ns": 1.0, "interval": 500, "height": 1.2, "bias_factor": 6.0, "frequency": 500,
              "width_std": 0.25, "grid": None, "platform": None},
    "rama": {"bins": 36, "vmax": 12.0},
    "progress": None,
}
DTYPE = torch.float64  # data, CV fit and export (checked against OpenMM)
RIGID_BODY_DOF = 6  # removed by the Kabsch alignment
NCT_DTYPE = torch.float32  # training: ~4x faster than float64 on CPU here


def _system(temperature_k: float):
    if not temperature_k > 0:
        raise ValueError(f"temperature_K must be positive, got {temperature_k}")
    return alanine_dipeptide(solvent="vacuum", temperature=float(temperature_k) * unit.kelvin)


def simulate_data(system, config: dict, out: Path, progress: bool):
    """Hot unbiased MD: returns the run, heavy-atom positions ``(N, 30)`` nm (aligned) and all atoms ``(N, 22, 3)``."""
    data = config["data"]
    result = simulate(system, ns=data["ns"], interval=data["interval"], out=out / "md", seed=config["seed"],
                      platform=data["platform"], progress=progress, reuse=True)
    heavy = load(result.trajectory, result.topology, selection="heavy", align=True, dtype=DTYPE)
    frames = mdtraj.load(str(result.trajectory), top=str(result.topology))
    return result, heavy, frames


def phase_space(system, heavy: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred, mass-weighted, reduced ``(p~, q~)`` (``q~`` in ps, ``p~ ~ N(0, 1)``) on the principal axes
    of ``q~`` (an orthogonal map of both: canonical), each ``(N, 24)``, and the variances ``(24,)`` ps^2
    along those axes, largest first (the prior's starting frequencies are ``1/sqrt(variance)``).

    The 6 axes of (near) zero variance are the rigid-body motions removed by the alignment: dropped.
    """
    masses = np.array([system.masses[a.index] for a in system.mdtraj_topology.atoms if a.element.symbol != "H"])
    masses = torch.as_tensor(np.repeat(masses, 3) / system.kT_kjmol, dtype=DTYPE)  # per coordinate, ps^2/nm^2
    q = heavy - heavy.mean(0)
    p = torch.randn(q.shape, generator=generator, dtype=DTYPE) * masses.sqrt()  # mass_weight divides it back: p~ ~ N(0, 1)
    p, q = mass_weight(p, q, masses)
    variances, axes = torch.linalg.eigh(q.T @ q / q.shape[0])
    variances, axes = variances.flip(0)[:-RIGID_BODY_DOF], axes.flip(1)[:, :-RIGID_BODY_DOF]
    return p @ axes, q @ axes, variances


def fixed_scaling(log_scale: torch.Tensor) -> SymplecticScaling:
    """A non-trainable ``SymplecticScaling``: data -> latent ``Q = q e^s``, ``P = p e^-s``."""
    layer = SymplecticScaling(log_scale.numel())
    with torch.no_grad():
        layer.log_scale.copy_(log_scale)
    return layer.requires_grad_(False)


def train_nct(p: torch.Tensor, q: torch.Tensor, variances: torch.Tensor, config: dict, out: Path,
              progress: bool) -> tuple[NeuralCanonicalTransformation, dict]:
    """Maximum likelihood of ``(p~, q~)`` under a RealNVP point transformation and a harmonic prior.

    The RealNVP acts on whitened principal axes (fixed symplectic scalings by the axis standard
    deviations on both sides, so the model starts as the identity): its steps are commensurate
    with each axis's spread, stiff axes included. The prior's frequencies start at ``1/sqrt(variance)``.
    """
    settings, dim = config["nct"], q.shape[1]
    p, q = p.to(NCT_DTYPE), q.to(NCT_DTYPE)
    torch.manual_seed(config["seed"])
    log_std = 0.5 * variances.log().to(NCT_DTYPE)
    flow = real_nvp(dim, n_layers=settings["layers"], hidden=settings["hidden"], activation="tanh", actnorm=False)
    transform = CanonicalSequential(fixed_scaling(log_std), PointTransformation(flow), fixed_scaling(-log_std))
    model = NeuralCanonicalTransformation(transform, LatentHarmonicPrior(dim, variances.rsqrt())).to(NCT_DTYPE)
    trainer = Trainer(model, lambda m, batch: m.nll(*batch), data=(p, q), batch_size=min(settings["batch"], q.shape[0]), lr=settings["lr"],
                      device=q.device, seed=config["seed"], out_dir=out, checkpoint_every=max(1, settings["steps"]),
                      progress=progress, config={"nct": settings})
    history = trainer.fit(settings["steps"])
    model.eval()
    return model, {"nct_steps": trainer.step, "nct_final_loss": history[-1]["loss"] if history else float("nan")}


def slowest_mode(model: NeuralCanonicalTransformation, q: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``Q1(q~)`` for every frame, ``(N,)``."""
    with torch.no_grad():
        return torch.cat([model.collective_variables(block.to(NCT_DTYPE), 1)[:, 0] for block in q.split(chunk)]).to(q.dtype)


def fit_and_export(system, frames: mdtraj.Trajectory, target: torch.Tensor, config: dict, out: Path):
    """Regress a distance CV on ``target``, export it (checked), save ``cv.xml`` and ``cv.pt``."""
    settings = config["cv"]
    cv = CVModel(heavy_atom_distance_features(system), hidden=settings["hidden"], seed=config["seed"]).to(DTYPE)
    positions = torch.as_tensor(frames.xyz, dtype=DTYPE)
    fit = fit_cv(cv, positions, target, epochs=settings["epochs"], seed=config["seed"])
    stride = max(1, len(positions) // int(settings["export_frames"]))
    force, report = export_cv(cv, positions[::stride], method="lepton")
    files = {"cv_xml": save_cv_force(force, out / "cv.xml"), "cv_model": out / "cv.pt"}
    torch.save(cv.state_dict(), files["cv_model"])
    with torch.no_grad():
        values = cv(positions)[:, 0]
    lo, hi = (float(v[0]) for v in cv.bounds())
    metrics = {"cv_r2_train": fit.r2_train[0], "cv_r2_validation": fit.r2_validation[0], "cv_export_method": report["method"],
               "cv_export_frames": report["n_frames"], "cv_export_max_value_error": report["max_value_error"],
               "cv_export_max_force_relative_error": report["max_force_relative_error"], "cv_lo": lo, "cv_hi": hi,
               "cv_data_std": float(values.std())}
    return force, (lo, hi), metrics, files


def basin_correlation(values: torch.Tensor, frames: mdtraj.Trajectory) -> float:
    """|Pearson correlation| between ``values (N,)`` and the phi > 0 basin indicator (NaN if one basin is empty)."""
    phi = mdtraj.compute_phi(frames)[1][:, 0]
    label = (analysis.basin_of(phi) == 1).astype(float)
    if label.min() == label.max():
        return float("nan")
    return float(abs(np.corrcoef(values.numpy(), label)[0, 1]))


def print_summary(files: dict, metrics: dict) -> None:
    print("\nopenflow quickstart: done", file=sys.stderr)
    for label, path in files.items():
        print(f"  {label:18s} {path}", file=sys.stderr)
    print(f"  CV R^2 (held out) {metrics['cv_r2_validation']:.3f}; metadynamics: {metrics['metad_transitions']} transitions, "
          f"{metrics['metad_transitions_per_ns']:.1f} per ns; wall time {sum(v for k, v in metrics.items() if k.startswith('time_')):.0f} s",
          file=sys.stderr)


def run(config: dict, out: Path) -> dict:
    progress = sys.stderr.isatty() if config["progress"] is None else bool(config["progress"])
    generator = torch.Generator().manual_seed(config["seed"])
    metrics, files, clock = {}, {}, time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        metrics[f"time_{stage}_s"] = now - clock
        clock = now

    hot = _system(config["data"]["temperature_K"])
    md, heavy, frames = simulate_data(hot, config, out, progress)
    files.update(md_trajectory=md.trajectory, md_topology=md.topology)
    metrics.update(frames=md.n_frames, md_ns_per_day=md.ns_per_day, md_platform=md.platform,
                   md_population_positive=analysis.basin_populations(mdtraj.compute_phi(frames)[1][:, 0])["positive"])
    lap("simulate")

    p, q, variances = phase_space(hot, heavy, generator)
    model, train = train_nct(p, q, variances, config, out / "nct", progress)
    metrics.update(train)
    _, omega = model.slow_modes()
    k = min(int(config["nct"]["slowest_reported"]), omega.numel())
    metrics.update({f"nct_omega_{i + 1}_per_ps": float(w) for i, w in enumerate(omega[:k])})
    q1 = slowest_mode(model, q)
    metrics["nct_q1_basin_correlation"] = basin_correlation(q1, frames)
    files["nct_checkpoint"] = out / "nct" / "checkpoint.pt"
    lap("train_nct")

    force, (lo, hi), cv_metrics, cv_files = fit_and_export(hot, frames, q1, config, out)
    metrics.update(cv_metrics)
    files.update(cv_files)
    lap("fit_export_cv")

    metad = config["metad"]
    width = metad["width_std"] * cv_metrics["cv_data_std"]
    variables = learned_bias_variables([force], width, metad["grid"], [(lo, hi)])
    result = run_metadynamics(_system(config["temperature_K"]), variables, ns=metad["ns"], out=out / "metadynamics",
                              height=metad["height"], bias_factor=metad["bias_factor"], frequency=metad["frequency"],
                              interval=metad["interval"], platform=metad["platform"], seed=config["seed"],
                              cv_names=["q1"], progress=progress)
    summary = result.summary()
    metrics.update({f"metad_{key}": summary[key] for key in ("transitions", "transitions_per_ns", "ns_per_day",
                                                               "population_positive", "delta_f_kT", "effective_sample_size")})
    metrics["metad_width"] = width
    files.update({f"metad_{key}": result.files[key] for key in ("trajectory", "topology", "colvar", "weights")})
    lap("metadynamics")

    colvar = read_colvar(result.files["colvar"])
    surface = analysis.ramachandran((colvar["phi"], colvar["psi"]), weights=np.load(result.files["weights"]),
                                    bins=config["rama"]["bins"])
    files["ramachandran"] = analysis.plot_ramachandran(surface, out / "ramachandran.png", title="metadynamics on Q1 (reweighted)",
                                                       vmax=config["rama"]["vmax"])
    lap("plot")
    files["metrics"] = out / "metrics.json"
    print_summary(files, metrics)
    return {key: float(value) if isinstance(value, (np.floating, float)) else value for key, value in metrics.items()}
