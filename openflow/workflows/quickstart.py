"""Quickstart: the whole openflow loop on alanine dipeptide, small enough for a laptop.

1. **Simulate** alanine dipeptide in vacuum with OpenMM (Langevin). The data run is hotter than
   the target (``data.temperature_K``, default 600 K) so that a short run visits both phi basins.
2. **Train** a neural canonical transformation on the heavy atoms: positions aligned (Kabsch)
   and centred, mass-weighted and reduced ``q~ = sqrt(m/kT) q`` (ps), paired with
   Maxwell-Boltzmann momenta ``p~ ~ N(0, 1)``, both rotated onto the 24 principal axes of ``q~``
   that alignment leaves (a canonical map); the model is a point transformation of a small
   RealNVP (on whitened axes) under a latent harmonic prior whose frequencies start at
   ``1/sqrt(variance)`` per axis (maximum likelihood, Adam).
   The two slowest latent modes ``(Q1, Q2)`` (a fixed rule: smallest frequencies) are the
   collective variables to learn.
3. **Fit** one ``CVModel`` with ``cv.modes`` outputs over features OpenMM can compute
   (``cv.features``: ``torsions``, sin/cos of the backbone phi and psi, or ``distances``, the 45
   heavy-atom distances -> tanh MLP) to ``(Q1, Q2)`` (held-out R^2 per mode), **export** each
   output as a ``CustomCVForce`` (``export_cv(method="auto")``: a periodic spline table over the two
   torsions when it passes the check, else Lepton), checked against torch on data frames, and save
   them as OpenMM XML (``cv_q1.xml``, ``cv_q2.xml``).
4. **Metadynamics**: well-tempered, on those forces (one non-periodic ``BiasVariable`` per mode,
   range from ``CVModel.bounds()``), at the target temperature (300 K): biased DCD + PDB, COLVAR,
   reweighting weights; the cost of an MD step with this bias relative to bare MD (``step_costs``).
5. **Plot** the reweighted Ramachandran surface of the biased run (``ramachandran.png``) and print
   where every file is.

Metrics: frames, the slowest NCT frequencies (1/ps), |corr(Qk, phi basin)| on the data (reported,
never used to choose), CV R^2 per mode, export errors and Context creation time, metadynamics
transitions (per ns), phi > 0 population and speed relative to bare MD, wall time per stage.
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
from openflow.features import heavy_atom_distance_features, phi_psi_features
from openflow.flows.coupling import real_nvp
from openflow.flows.priors import LatentHarmonicPrior
from openflow.flows.symplectic import (CanonicalSequential, NeuralCanonicalTransformation, PointTransformation,
                                       SymplecticScaling)
from openflow.plugins.openmm.export import export_cv, save_cv_force
from openflow.plugins.openmm.metadynamics import learned_bias_variables, run_metadynamics, step_costs
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.training import Trainer

DEFAULTS = {
    "seed": 0,
    "temperature_K": 300.0,  # metadynamics and the Ramachandran plot
    "data": {"ns": 1.0, "interval": 200, "temperature_K": 600.0, "platform": None},
    "nct": {"layers": 4, "hidden": [32], "steps": 1000, "batch": 256, "lr": 2e-3, "slowest_reported": 4},
    "cv": {"modes": 2, "features": "torsions", "hidden": [16], "epochs": 60, "export_frames": 100, "table_points": 129},
    "metad": {"ns": 1.0, "interval": 500, "height": 2.0, "bias_factor": 15.0, "frequency": 500,
              "width_std": 0.25, "grid": 40, "platform": None},
    "speed": {"steps": 5000, "repeats": 5},
    "rama": {"bins": 36, "vmax": 12.0},
    "progress": None,
}
DTYPE = torch.float64  # data, CV fit and export (checked against OpenMM)
RIGID_BODY_DOF = 6  # removed by the Kabsch alignment
NCT_DTYPE = torch.float32  # training: ~4x faster than float64 on CPU here
FEATURES = {"torsions": phi_psi_features, "distances": heavy_atom_distance_features}  # CV inputs OpenMM computes


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


def principal_frame(heavy: torch.Tensor, masses, kT_kjmol: float) -> dict:
    """Mass-weighted reduced principal axes of aligned positions ``heavy (T, 3m)`` nm of atoms with
    ``masses (m,)`` amu at ``kT_kjmol``.

    Returns ``mean (3m,)`` nm, ``sqrt_mass (3m,)`` sqrt(ps^2/nm^2) (``sqrt(m/kT)`` per coordinate),
    ``axes (3m, 3m - 6)`` (largest variance first; the 6 rigid-body axes the alignment empties are
    dropped), ``variances (3m - 6,)`` ps^2 and ``q (T, 3m - 6)`` ps: the coordinates on those axes.
    """
    sqrt_mass = torch.as_tensor(np.repeat(np.asarray(masses, dtype=float), 3) / kT_kjmol, dtype=heavy.dtype).sqrt()
    mean = heavy.mean(0)
    weighted = (heavy - mean) * sqrt_mass
    variances, axes = torch.linalg.eigh(weighted.T @ weighted / weighted.shape[0])
    variances, axes = variances.flip(0)[:-RIGID_BODY_DOF], axes.flip(1)[:, :-RIGID_BODY_DOF]
    return {"mean": mean, "sqrt_mass": sqrt_mass, "axes": axes, "variances": variances, "q": weighted @ axes}


def project(frame: dict, heavy: torch.Tensor) -> torch.Tensor:
    """Aligned positions ``(T, 3m)`` nm onto the principal axes of ``frame``: ``(T, 3m - 6)`` ps."""
    return (heavy - frame["mean"]) * frame["sqrt_mass"] @ frame["axes"]


def phase_space(system, heavy: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centred, mass-weighted, reduced ``(p~, q~)`` (``q~`` in ps, ``p~ ~ N(0, 1)``: Maxwell-Boltzmann)
    on the principal axes of ``q~`` (:func:`principal_frame`), each ``(N, 24)``, and the variances
    ``(24,)`` ps^2 along those axes, largest first (the prior's starting frequencies are ``1/sqrt(variance)``).
    """
    masses = [system.masses[a.index] for a in system.mdtraj_topology.atoms if a.element.symbol != "H"]
    frame = principal_frame(heavy, masses, system.kT_kjmol)
    return torch.randn(frame["q"].shape, generator=generator, dtype=frame["q"].dtype), frame["q"], frame["variances"]


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


def slowest_modes(model: NeuralCanonicalTransformation, q: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """``(Q1, ..., Qk)(q~)`` for every frame, slowest first, ``(N, k)``."""
    with torch.no_grad():
        return torch.cat([model.collective_variables(block.to(NCT_DTYPE), k) for block in q.split(chunk)]).to(q.dtype)


def slowest_mode(model: NeuralCanonicalTransformation, q: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``Q1(q~)`` for every frame, ``(N,)``."""
    return slowest_modes(model, q, 1, chunk)[:, 0]


def cv_model(system, config: dict) -> CVModel:
    """The (untrained) CV of ``config["cv"]``: features -> tanh MLP -> ``modes`` outputs, float64."""
    settings = config["cv"]
    if settings["features"] not in FEATURES:
        raise ValueError(f"cv.features must be one of {sorted(FEATURES)}, got {settings['features']!r}")
    if not 1 <= int(settings["modes"]) <= 3:
        raise ValueError(f"cv.modes must be 1, 2 or 3 (openmm.app.Metadynamics takes 1-3 CVs), got {settings['modes']}")
    return CVModel(FEATURES[settings["features"]](system), hidden=settings["hidden"], n_out=int(settings["modes"]),
                   seed=config["seed"]).to(DTYPE)


def fit_and_export(system, frames: mdtraj.Trajectory, targets: torch.Tensor, config: dict, out: Path):
    """Regress the CV on ``targets (N, modes)``, export each output (checked), save ``cv_q{k}.xml`` and ``cv.pt``.

    Returns the forces, their ``(lo, hi)`` ranges (``CVModel.bounds()``), the standard deviations
    of the CV over the frames ``(modes,)``, metrics and files.
    """
    settings = config["cv"]
    cv = cv_model(system, config)
    positions = torch.as_tensor(frames.xyz, dtype=DTYPE)
    fit = fit_cv(cv, positions, targets, epochs=settings["epochs"], seed=config["seed"])
    stride = max(1, len(positions) // int(settings["export_frames"]))
    exported = [export_cv(cv, positions[::stride], output=k, method="auto", points=int(settings["table_points"]))
                for k in range(cv.n_out)]
    files = {f"cv_q{k + 1}_xml": save_cv_force(force, out / f"cv_q{k + 1}.xml") for k, (force, _) in enumerate(exported)}
    files["cv_model"] = out / "cv.pt"
    torch.save(cv.state_dict(), files["cv_model"])
    with torch.no_grad():
        stds = cv(positions).std(0).tolist()
    lo, hi = cv.bounds()
    reports = [report for _, report in exported]
    metrics = {"cv_features": settings["features"], "cv_export_method": "+".join(sorted({r["method"] for r in reports})),
               "cv_export_frames": reports[0]["n_frames"],
               "cv_export_max_value_error": max(r["max_value_error"] for r in reports),
               "cv_export_max_force_relative_error": max(r["max_force_relative_error"] for r in reports),
               "cv_export_context_s": max(r["context_seconds"] for r in reports)}
    for k in range(cv.n_out):
        metrics.update({f"cv_r2_train_q{k + 1}": fit.r2_train[k], f"cv_r2_validation_q{k + 1}": fit.r2_validation[k],
                        f"cv_lo_q{k + 1}": float(lo[k]), f"cv_hi_q{k + 1}": float(hi[k]), f"cv_data_std_q{k + 1}": stds[k]})
    ranges = [(float(a), float(b)) for a, b in zip(lo, hi)]
    return [force for force, _ in exported], ranges, stds, metrics, files


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
    r2 = ", ".join(f"{metrics[key]:.3f}" for key in sorted(metrics) if key.startswith("cv_r2_validation_"))
    print(f"  CV R^2 (held out) {r2}; metadynamics: {metrics['metad_transitions']} transitions, "
          f"{metrics['metad_transitions_per_ns']:.1f} per ns, {metrics['metad_speed_relative_to_bare_md']:.2f}x bare MD speed; "
          f"wall time {sum(v for k, v in metrics.items() if k.startswith('time_')):.0f} s", file=sys.stderr)


def learn_slow_cvs(config: dict, out: Path, progress: bool, metrics: dict, files: dict, lap=lambda stage: None):
    """Steps 1-3: hot MD, the canonical transformation, and the CV fitted to its ``cv.modes`` slowest
    modes, exported and checked (``cv_q{k}.xml`` in ``out``). No phi/psi information is used.

    Uses ``config["seed"]``, ``["data"]``, ``["nct"]`` and ``["cv"]`` (as in :data:`DEFAULTS`); adds
    to ``metrics`` and ``files``; ``lap(stage)`` is called after each step. Returns the exported
    forces, their ``(lo, hi)`` ranges and the standard deviations of the CVs over the MD frames.
    """
    generator = torch.Generator().manual_seed(config["seed"])
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
    n_modes = int(config["cv"]["modes"])
    modes = slowest_modes(model, q, n_modes)  # the n smallest frequencies: a fixed rule
    metrics.update({f"nct_q{k + 1}_basin_correlation": basin_correlation(modes[:, k], frames) for k in range(n_modes)})
    files["nct_checkpoint"] = out / "nct" / "checkpoint.pt"
    lap("train_nct")

    forces, ranges, stds, cv_metrics, cv_files = fit_and_export(hot, frames, modes, config, out)
    metrics.update(cv_metrics)
    files.update(cv_files)
    lap("fit_export_cv")
    return forces, ranges, stds


def run(config: dict, out: Path) -> dict:
    progress = sys.stderr.isatty() if config["progress"] is None else bool(config["progress"])
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
    result = run_metadynamics(target, variables, ns=metad["ns"], out=out / "metadynamics",
                              height=metad["height"], bias_factor=metad["bias_factor"], frequency=metad["frequency"],
                              interval=metad["interval"], platform=metad["platform"], seed=config["seed"],
                              cv_names=[f"q{k + 1}" for k in range(n_modes)], progress=progress)
    summary = result.summary()
    metrics.update({f"metad_{key}": summary[key] for key in ("transitions", "transitions_per_ns", "ns_per_day", "platform",
                                                               "population_positive", "delta_f_kT", "effective_sample_size")})
    metrics.update({f"metad_width_q{k + 1}": width for k, width in enumerate(widths)})
    cost = step_costs(target, variables, steps=config["speed"]["steps"], repeats=config["speed"]["repeats"],
                      platform=result.platform, frequency=metad["frequency"])
    metrics.update(metad_speed_relative_to_bare_md=cost["speed_ratio"], metad_biased_us_per_step=1e6 * cost["biased_s_per_step"],
                   bare_md_us_per_step=1e6 * cost["bare_s_per_step"])
    files.update({f"metad_{key}": result.files[key] for key in ("trajectory", "topology", "colvar", "weights")})
    lap("metadynamics")

    colvar = read_colvar(result.files["colvar"])
    surface = analysis.ramachandran((colvar["phi"], colvar["psi"]), weights=np.load(result.files["weights"]),
                                    bins=config["rama"]["bins"])
    title = f"metadynamics on ({', '.join(f'Q{k + 1}' for k in range(n_modes))}) (reweighted)"
    files["ramachandran"] = analysis.plot_ramachandran(surface, out / "ramachandran.png", title=title, vmax=config["rama"]["vmax"])
    lap("plot")
    files["metrics"] = out / "metrics.json"
    print_summary(files, metrics)
    return {key: float(value) if isinstance(value, (np.floating, float)) else value for key, value in metrics.items()}
