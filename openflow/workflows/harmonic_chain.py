"""Harmonic chain: a neural canonical transformation against exact normal modes.

For each boundary condition the workflow
1. simulates the chain with OpenMM (Langevin) and pairs the positions with Maxwell-Boltzmann
   momenta: the phase-space data ``(p, q)``;
2. trains a canonical transformation by maximum likelihood on those data (``mle``);
3. trains the same model with no data, by minimising the variational free energy
   ``F_q = E_q[H + log q]`` with potential energies from OpenMM (``variational``);
4. compares the learned frequencies ``w_k`` with ``exact_frequencies()``, the slow-mode shapes
   ``dQ_k/dq`` with the exact normal modes, and ``F_q`` and the importance-sampled free energy
   with ``exact_free_energy()``; plots the spectrum and the slowest modes.

Coordinates are mass-weighted and reduced, ``q~ = q sqrt(m/kT)``, ``p~ = p / sqrt(m kT)``, so
``H/kT = |p~|^2/2 + u(q)`` and the latent prior is ``sum_k (P_k^2 + w_k^2 Q_k^2)/2`` with ``w_k``
in 1/ps. The model is a point transformation ``q~ = R Q`` with ``R = exp(A)`` a learned rotation
(``A`` antisymmetric): the exact family for a harmonic system, so any remaining error is the
data's or the optimizer's. Both routes use L-BFGS on a deterministic objective: the full data
set for ``mle``, a fixed moment-matched latent batch for ``variational``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from openflow.data import load
from openflow.estimators import free_energy, log_weights
from openflow.flows.linear import LinearExp
from openflow.flows.priors import LatentHarmonicPrior, moment_matched_normal
from openflow.flows.symplectic import NeuralCanonicalTransformation, PointTransformation
from openflow.io import save_figure
from openflow.plugins.openmm.bridge import OpenMMEnergy
from openflow.plugins.openmm.md import simulate
from openflow.systems import harmonic_chain
from openflow.training import Trainer

DEFAULTS = {
    "seed": 0,
    "system": {"n": 32, "k": 1.0, "mass": 1.0, "temperature": 1.0},
    "boundaries": ["fixed-fixed", "fixed-free"],
    # Friction near critical damping of the slowest mode (2 w_min ~ 0.19/ps) decorrelates it fastest.
    "md": {"steps": 400_000, "interval": 40, "timestep_ps": 0.05, "friction_per_ps": 0.2, "platform": None},
    "model": {"omega_init": 0.5, "rotation_init_std": 0.1},
    "mle": {"steps": 500, "lr": 1.0},
    "variational": {"steps": 1500, "batch": 512, "lr": 1.0},
    "evaluation": {"samples": 20000, "slow_modes_plotted": 4},
    "progress": None,
}
DTYPE = torch.float64


def check(config: dict) -> None:
    """The workflow's own rules (types and signs are checked by the runner)."""
    unknown = [b for b in config["boundaries"] if b not in ("fixed-fixed", "fixed-free")]
    if unknown or not config["boundaries"]:
        raise ValueError(
            f"boundaries must be a non-empty list of 'fixed-fixed' and 'fixed-free', got {config['boundaries']!r}"
        )


def build_model(
    dim: int, omega_init: float, rotation_init_std: float, generator: torch.Generator
) -> NeuralCanonicalTransformation:
    """Rotation point transformation + latent harmonic prior, float64; the small random rotation
    breaks the symmetry of equal initial frequencies (a saddle of both objectives)."""
    rotation = LinearExp(dim, orthogonal=True)
    with torch.no_grad():
        rotation.weight.copy_(rotation_init_std * torch.randn(dim, dim, generator=generator))
    return NeuralCanonicalTransformation(PointTransformation(rotation), LatentHarmonicPrior(dim, omega_init)).to(DTYPE)


def phase_space_data(
    system, config: dict, out: Path, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """OpenMM positions and Maxwell-Boltzmann momenta, mass-weighted and reduced: ``(p~, q~)`` each ``(N, d)``."""
    md = config["md"]
    result = simulate(
        system,
        steps=md["steps"],
        interval=md["interval"],
        out=out / "md",
        seed=config["seed"],
        platform=md["platform"],
        timestep=md["timestep_ps"],
        friction=md["friction_per_ps"],
        progress=config["progress"] is not False,
        reuse=True,
    )
    q = load(result.trajectory, result.topology, system=system, dtype=DTYPE)
    scale = torch.as_tensor(np.sqrt(system.active_masses / system.kT_kjmol), dtype=DTYPE)
    p = torch.randn(q.shape, generator=generator, dtype=DTYPE)  # p~ = p / sqrt(m kT) ~ N(0, 1)
    return (
        p,
        q * scale,
        {"md_frames": result.n_frames, "md_ns_per_day": result.ns_per_day, "md_wall_time_s": result.wall_time_s},
    )


def hamiltonian(system, energy: OpenMMEnergy):
    """``H/kT`` of mass-weighted reduced ``(p~, q~)``: kinetic ``|p~|^2/2`` + OpenMM potential."""
    to_nm = torch.as_tensor(np.sqrt(system.kT_kjmol / system.active_masses), dtype=DTYPE)
    return lambda p, q: 0.5 * p.pow(2).sum(1) + energy(q * to_nm)


def stage_config(config: dict, route: str) -> dict:
    """What a training stage depends on, without its length (more steps continue its checkpoint)."""
    return {
        "system": config["system"],
        "md": config["md"],
        "model": config["model"],
        "route": route,
        **{key: value for key, value in config[route].items() if key != "steps"},
    }


def fit_stage(model, loss, config: dict, stage: str, out: Path) -> dict:
    """L-BFGS on ``loss(model, batch)`` for ``config[stage]["steps"]``, resumed from ``out``'s checkpoint."""
    trainer = Trainer(
        model,
        loss,
        optimizer="lbfgs",
        lr=config[stage]["lr"],
        device="cpu",
        seed=config["seed"],
        out_dir=out,
        checkpoint_every=50,
        progress=config["progress"] is not False,
        config=stage_config(config, stage),
    )
    history = trainer.fit(config[stage]["steps"], resume=(out / "checkpoint.pt").exists())
    return {
        "train_steps": trainer.step,
        "skipped_steps": trainer.n_skipped,
        "final_loss": history[-1]["loss"] if history else math.nan,
    }


def train_mle(model, p, q, config: dict, out: Path) -> dict:
    return fit_stage(model, lambda m, _: m.nll(p, q), config, "mle", out)


def train_variational(model, H, config: dict, out: Path, generator: torch.Generator) -> dict:
    d = model.prior.dim
    eps = moment_matched_normal(config["variational"]["batch"], 2 * d, generator=generator)

    def free_energy_bound(m, _):
        P, Q = eps[:, :d], eps[:, d:] / m.prior.omega
        p, q = m.transform(P, Q)
        return (H(p, q) + m.prior.log_prob(P, Q)).mean()

    return fit_stage(model, free_energy_bound, config, "variational", out)


def evaluate(model, system, H, n_samples: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Frequencies, mode overlaps and free energies of a trained model against the exact chain."""
    omega_exact, modes_exact = system.normal_modes()  # modes in mass-weighted coordinates, columns
    order, omega = model.slow_modes()
    omega = omega.numpy()
    rel = np.abs(omega / omega_exact - 1.0)
    d = model.prior.dim
    jac = model.mode_jacobian(torch.zeros(1, d, dtype=DTYPE))[0].numpy()  # dQ_k/dq~ (constant: linear)
    shapes = jac[order.numpy()]
    shapes /= np.linalg.norm(shapes, axis=1, keepdims=True)
    overlap = np.abs(np.sum(shapes * modes_exact.T, axis=1))
    with torch.no_grad():
        P, Q = model.prior.sample(n_samples, generator=generator)
        p, q = model.transform(P, Q)
        log_q = model.prior.log_prob(P, Q)
        h = H(p, q)
    bound = h + log_q
    is_estimate = free_energy(log_weights(h, log_q), n_bootstrap=200, generator=generator)
    exact = -float(np.sum(np.log(2.0 * np.pi / omega_exact)))  # -ln Z of the reduced phase space
    metrics = {
        "omega_max_rel_error": rel.max(),
        "omega_mean_rel_error": rel.mean(),
        "mode_overlap_min": overlap.min(),
        "mode_overlap_mean": overlap.mean(),
        "slow_mode_overlap_min": overlap[:4].min(),
        "free_energy_kT": bound.mean().item(),
        "free_energy_stderr_kT": (bound.std() / math.sqrt(n_samples)).item(),
        "free_energy_gap_kT": bound.mean().item() - exact,
        "free_energy_is_kT": is_estimate.value,
        "free_energy_is_error_kT": is_estimate.error,
        "ess_fraction": is_estimate.ess,
        "nonfinite_fraction": is_estimate.n_nonfinite / is_estimate.n,
    }
    curves = {
        "omega": omega,
        "omega_exact": omega_exact,
        "shapes": shapes,
        "modes_exact": modes_exact.T,
        "overlap": overlap,
    }
    return metrics, curves


def data_optimum_frequencies(q: torch.Tensor) -> np.ndarray:
    """The maximum-likelihood frequencies that these data allow in the exact (rotation) family:
    ``w_k = 1/sqrt(lambda_k)`` with ``lambda_k`` the eigenvalues of the second-moment matrix of q~."""
    second_moment = (q.T @ q / q.shape[0]).numpy()
    return np.sort(1.0 / np.sqrt(np.linalg.eigvalsh(second_moment)))


def plot(curves: dict, boundary: str, out: Path, n_modes: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = next(iter(curves.values()))["omega_exact"]
    fig, ax = plt.subplots(figsize=(5, 4))
    k = np.arange(1, len(exact) + 1)
    ax.plot(k, exact, "k-", lw=2, label="exact")
    for (route, c), marker in zip(curves.items(), "os^"):
        ax.plot(k, c["omega"], marker, mfc="none", label=route)
    ax.set(xlabel="mode k (slowest first)", ylabel=r"$\omega_k$ (1/ps)", title=f"harmonic chain, {boundary}")
    ax.legend()
    fig.tight_layout()
    spectrum = out / f"spectrum_{boundary}.png"
    save_figure(fig, spectrum)

    fig, axes = plt.subplots(1, n_modes, figsize=(3 * n_modes, 3), sharey=True)
    for j, ax in enumerate(np.atleast_1d(axes)):
        ref = next(iter(curves.values()))["modes_exact"][j]
        ax.plot(ref, "k-", lw=2, label="exact")
        for (route, c), marker in zip(curves.items(), "os^"):
            shape = c["shapes"][j] * np.sign(np.dot(c["shapes"][j], ref))
            ax.plot(shape, marker, mfc="none", ms=4, label=route)
        ax.set(title=f"mode {j + 1}", xlabel="particle")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    modes = out / f"slow_modes_{boundary}.png"
    save_figure(fig, modes)
    return [spectrum, modes]


def run(config: dict, out: Path) -> dict:
    """Run every boundary condition in ``config``; return flat metrics (prefixed by boundary)."""
    metrics: dict = {}
    for boundary in config["boundaries"]:
        tag = boundary.replace("-", "_")
        folder = out / tag
        generator = torch.Generator().manual_seed(config["seed"])
        system = harmonic_chain(boundary=boundary, **config["system"])
        p, q, md = phase_space_data(system, config, folder, generator)
        H = hamiltonian(system, OpenMMEnergy(system, platform=config["md"]["platform"]))
        metrics.update({f"{tag}_{key}": value for key, value in md.items()})
        metrics[f"{tag}_free_energy_exact_kT"] = -float(np.sum(np.log(2.0 * np.pi / system.exact_frequencies())))

        curves = {}
        for route in ("mle", "variational"):
            model = build_model(
                system.dim, config["model"]["omega_init"], config["model"]["rotation_init_std"], generator
            )
            start = time.perf_counter()
            if route == "mle":
                train = train_mle(model, p, q, config, folder / route)
            else:
                train = train_variational(model, H, config, folder / route, generator)
            train["train_time_s"] = time.perf_counter() - start
            scores, curves[route] = evaluate(model, system, H, config["evaluation"]["samples"], generator)
            metrics.update({f"{tag}_{route}_{key}": value for key, value in {**train, **scores}.items()})

        optimum = data_optimum_frequencies(q)
        metrics[f"{tag}_data_optimum_omega_max_rel_error"] = np.abs(optimum / system.exact_frequencies() - 1).max()
        metrics[f"{tag}_mle_vs_data_optimum_omega_max_rel_diff"] = np.abs(curves["mle"]["omega"] / optimum - 1).max()
        plot(curves, boundary, out, config["evaluation"]["slow_modes_plotted"])
    return {key: float(value) if isinstance(value, (np.floating, float)) else value for key, value in metrics.items()}
