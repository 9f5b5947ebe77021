"""The neural-canonical-transformation pipeline: from aligned positions to slow modes and a slow CV.

1. :func:`principal_frame`: positions ``(T, 3m)`` nm of ``m`` atoms (aligned when the energy is
   invariant under rigid motions) are centred, mass-weighted and reduced, ``q~ = sqrt(m/kT) q``
   (ps), and rotated onto their principal axes, largest variance first; with ``rigid_body=True``
   the 6 axes that alignment empties are dropped. A rotation of mass-weighted coordinates is a
   canonical map, so momenta follow the same axes.
2. :func:`phase_space`: ``(p~, q~)``, the momenta Maxwell-Boltzmann, ``p~ ~ N(0, 1)`` per axis.
3. :func:`train_nct`: maximum likelihood (optionally weighted, e.g. reweighted biased frames) of
   ``(p~, q~)`` under a RealNVP point transformation between fixed whitening scalings and a latent
   harmonic prior ``K = sum_k (P_k^2 + w_k^2 Q_k^2) / 2`` whose frequencies start at
   ``1/sqrt(variance)`` per axis; :func:`train_nct_kinetically` keeps the training length (of ten
   checks, and none) whose modes hold the slowest process best.
4. :func:`latent_modes`: the latent positions ``Q_k`` of the smallest frequencies, slowest first.
   The frequencies order modes by spread (``w_k^2 = <P_k^2>/<Q_k^2>``), which is not slowness:
   :func:`kinetic_slowest` picks the combination of the lowest-frequency modes with the longest
   autocorrelation (TICA over time-ordered pieces of trajectory) as the slow CV, and
   :func:`slow_together` says whether the next TICA component is about as slow (then it is a CV too).

Everything is in torch (training) and numpy (TICA); nothing assumes a molecule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openflow.cv import TICA, tica
from openflow.flows.coupling import real_nvp
from openflow.flows.priors import LatentHarmonicPrior
from openflow.flows.symplectic import (
    CanonicalSequential,
    NeuralCanonicalTransformation,
    PointTransformation,
    SymplecticScaling,
)
from openflow.io import digest, read_record, write_record
from openflow.training import Trainer

RIGID_BODY_DOF = 6  # translations and rotations removed by an alignment
NCT_DTYPE = torch.float32  # training precision
SLOW_TOGETHER_RATIO = 0.5  # a second CV when its process is at least half as slow as the slowest one


@dataclass
class PrincipalFrame:
    """Mass-weighted reduced principal axes of a set of positions.

    ``mean (3m,)`` nm; ``sqrt_mass (3m,)`` ``sqrt(m/kT)`` per coordinate (ps/nm); ``axes (3m, k)``
    (largest variance first); ``variances (k,)`` ps^2 along them.
    """

    mean: torch.Tensor
    sqrt_mass: torch.Tensor
    axes: torch.Tensor
    variances: torch.Tensor

    def project(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions ``(T, 3m)`` nm (aligned like the frame's data) -> coordinates ``(T, k)`` ps."""
        return (positions.to(self.mean) - self.mean) * self.sqrt_mass @ self.axes

    def positions(self, q: torch.Tensor) -> torch.Tensor:
        """Coordinates ``(T, k)`` ps -> positions ``(T, 3m)`` nm (the dropped axes at the mean)."""
        return q.to(self.axes) @ self.axes.T / self.sqrt_mass + self.mean


def principal_frame(
    positions: torch.Tensor,
    masses: Sequence[float],
    kT_kjmol: float,
    rigid_body: bool = True,
    weights: torch.Tensor | None = None,
) -> PrincipalFrame:
    """The principal frame of ``positions (T, 3m)`` nm of atoms with ``masses (m,)`` amu at ``kT_kjmol``.

    ``rigid_body``: the positions were aligned (Kabsch), so the 6 smallest-variance axes are empty
    and dropped; ``weights (T,)``: frame weights of the mean and covariance (None: equal).
    """
    if positions.ndim != 2 or positions.shape[1] != 3 * len(masses):
        raise ValueError(
            f"positions must be (T, {3 * len(masses)}) for {len(masses)} atoms, got {tuple(positions.shape)}"
        )
    sqrt_mass = torch.as_tensor(np.repeat(np.asarray(masses, dtype=float), 3) / kT_kjmol, dtype=positions.dtype).sqrt()
    if weights is None:
        mean = positions.mean(0)
        weighted = (positions - mean) * sqrt_mass
        covariance = weighted.T @ weighted / weighted.shape[0]
    else:
        w = torch.as_tensor(weights, dtype=positions.dtype)
        w = w / w.sum()
        mean = w @ positions
        weighted = (positions - mean) * sqrt_mass
        covariance = weighted.T @ (weighted * w[:, None])
    variances, axes = torch.linalg.eigh(covariance)
    keep = positions.shape[1] - (RIGID_BODY_DOF if rigid_body else 0)
    if keep < 1:
        raise ValueError(f"{len(masses)} atoms leave no internal axis after removing {RIGID_BODY_DOF} rigid-body ones")
    return PrincipalFrame(mean, sqrt_mass, axes.flip(1)[:, :keep], variances.flip(0)[:keep].clamp_min(1e-12))


def phase_space(
    frame: PrincipalFrame, positions: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p~, q~)``, each ``(T, k)``: ``q~`` the positions on the frame's axes (ps), ``p~`` Maxwell-Boltzmann
    momenta ``N(0, 1)`` (mass-weighted, reduced) drawn from ``generator``."""
    q = frame.project(positions)
    return torch.randn(q.shape, generator=generator, dtype=q.dtype), q


def fixed_scaling(log_scale: torch.Tensor) -> SymplecticScaling:
    """A non-trainable ``SymplecticScaling``: data -> latent ``Q = q e^s``, ``P = p e^-s``."""
    layer = SymplecticScaling(log_scale.numel())
    with torch.no_grad():
        layer.log_scale.copy_(log_scale)
    return layer.requires_grad_(False)


def build_nct(variances: torch.Tensor, layers: int, hidden: Sequence[int]) -> NeuralCanonicalTransformation:
    """RealNVP point transformation on whitened axes (fixed symplectic scalings by the axis standard
    deviations on both sides, so the model starts as the identity) under a latent harmonic prior
    whose frequencies start at ``1/sqrt(variance)``; float32."""
    dim = variances.numel()
    log_std = 0.5 * variances.log().to(NCT_DTYPE)
    flow = real_nvp(dim, n_layers=layers, hidden=hidden, activation="tanh", actnorm=False)
    transform = CanonicalSequential(fixed_scaling(log_std), PointTransformation(flow), fixed_scaling(-log_std))
    return NeuralCanonicalTransformation(transform, LatentHarmonicPrior(dim, variances.rsqrt())).to(NCT_DTYPE)


SETTINGS = {"layers": 4, "hidden": [32], "steps": 1000, "batch": 256, "lr": 2e-3}  # a small transformation


def nct_settings(settings: dict | None = None) -> dict:
    """:data:`SETTINGS` updated by ``settings``; unknown keys and unusable values are a ``ValueError``."""
    merged = {**SETTINGS, **(settings or {})}
    unknown = sorted(set(merged) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown NCT settings {unknown}; the settings are {sorted(SETTINGS)}")
    counts = [merged[key] for key in ("layers", "steps", "batch")] + list(np.atleast_1d(merged["hidden"]))
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in counts):
        raise ValueError(f"NCT layers, steps, batch and hidden widths must be positive integers, got {merged}")
    if not (isinstance(merged["lr"], (int, float)) and merged["lr"] > 0):
        raise ValueError(f"NCT lr must be a positive number, got {merged['lr']!r}")
    return merged


def train_nct(
    p: torch.Tensor,
    q: torch.Tensor,
    variances: torch.Tensor,
    settings: dict,
    seed: int,
    out: Path,
    progress: bool,
    weights: torch.Tensor | None = None,
) -> tuple[NeuralCanonicalTransformation, dict]:
    """Maximum likelihood of ``(p~, q~)`` (``(T, k)`` each) under :func:`build_nct`, Adam.

    ``settings``: ``layers``, ``hidden``, ``steps``, ``batch``, ``lr`` (:func:`nct_settings`, missing ones
    from :data:`SETTINGS`); ``weights (T,)``: frame
    weights of the likelihood (None: equal). Checkpoints go to ``out``: a rerun with the same settings
    resumes there (with more ``steps`` it continues training). Returns the model (eval mode) and
    ``{"nct_steps", "nct_final_loss"}``.
    """
    settings = nct_settings(settings)
    p, q = p.to(NCT_DTYPE), q.to(NCT_DTYPE)
    torch.manual_seed(seed)
    model = build_nct(variances, settings["layers"], settings["hidden"])
    if weights is None:
        data, loss = (p, q), (lambda m, batch: m.nll(*batch))
    else:
        w = torch.as_tensor(weights, dtype=NCT_DTYPE)
        data, loss = (p, q, w / w.mean()), (lambda m, batch: -(batch[2] * m.log_prob(batch[0], batch[1])).mean())
    run = {key: settings[key] for key in ("layers", "hidden", "batch", "lr")}
    run.update(frames=int(q.shape[0]), dim=int(q.shape[1]), weighted=weights is not None)
    trainer = Trainer(
        model,
        loss,
        data=data,
        batch_size=min(settings["batch"], q.shape[0]),
        lr=settings["lr"],
        device=q.device,
        seed=seed,
        out_dir=out,
        checkpoint_every=max(1, min(1000, settings["steps"])),
        progress=progress,
        config={"nct": run},
    )
    history = trainer.fit(settings["steps"], resume=out is not None)
    model.eval()
    return model, {"nct_steps": trainer.step, "nct_final_loss": history[-1]["loss"] if history else float("nan")}


def train_nct_kinetically(
    p: torch.Tensor,
    q: torch.Tensor,
    variances: torch.Tensor,
    settings: dict,
    seed: int,
    out: Path,
    progress: bool,
    n_modes: int,
    segments: np.ndarray,
    lag: int,
    weights: torch.Tensor | None = None,
    checks: int = 10,
) -> tuple[NeuralCanonicalTransformation, dict]:
    """:func:`train_nct` with its length chosen by the slow process: the transformation untrained and
    after every ``settings["steps"] / checks`` steps is scored by the autocorrelation at ``lag`` of
    the slowest combination of its ``n_modes`` lowest-frequency modes (:func:`kinetic_slowest` over
    ``segments``), and the best one is kept (by the variational principle of conformation dynamics
    an estimated autocorrelation stays below the true slowest one, so higher is better). Likelihood
    alone keeps improving while it turns a double well into one Gaussian, whose latent coordinate
    is flat across the barrier, or while it fits the few frames that reweighting leaves effective.
    The choice is kept in ``out`` (``selected.pt``, ``selection.json``) and reused by a call with
    the same data and settings. Returns the model (eval mode) and metrics: ``nct_steps`` (kept),
    ``nct_steps_trained``, ``nct_final_loss`` and ``nct_check_autocorrelations``."""
    settings = nct_settings(settings)
    record_settings = dict(
        settings, seed=int(seed), n_modes=int(n_modes), lag=int(lag), checks=int(checks), data=digest(p, q, weights)
    )
    out = Path(out)  # each check continues the previous one from its checkpoint there
    record = read_record(out / "selection.json", record_settings, [out / "selected.pt"])
    if record is not None:
        model = build_nct(variances, settings["layers"], settings["hidden"])
        model.load_state_dict(torch.load(out / "selected.pt"))
        return model.eval(), record["metrics"]

    def score(model) -> float:
        return float(kinetic_slowest(latent_modes(model, q, n_modes).double().numpy(), segments, lag)[0].eigenvalues[0])

    torch.manual_seed(seed)
    model = build_nct(variances, settings["layers"], settings["hidden"]).eval()
    best, kept, loss = score(model), 0, float("nan")
    best_state, scores = {k: v.clone() for k, v in model.state_dict().items()}, [best]
    stops = sorted({max(1, round(settings["steps"] * (k + 1) / checks)) for k in range(checks)})
    for stop in stops:
        model, trained = train_nct(p, q, variances, dict(settings, steps=stop), seed, out, progress, weights)
        scores.append(score(model))
        loss = trained["nct_final_loss"]
        if scores[-1] > best:
            best, kept, best_state = scores[-1], stop, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    metrics = dict(nct_steps=kept, nct_steps_trained=stops[-1], nct_final_loss=loss, nct_check_autocorrelations=scores)
    torch.save(best_state, out / "selected.pt")
    write_record(out / "selection.json", record_settings, metrics=metrics)
    return model.eval(), metrics


def latent_modes(model: NeuralCanonicalTransformation, q: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """``(Q_1, ..., Q_k)(q~)`` of every frame, the ``k`` smallest frequencies first, ``(T, k)`` in ``q``'s dtype."""
    with torch.no_grad():
        return torch.cat([model.collective_variables(block.to(NCT_DTYPE), k) for block in q.split(chunk)]).to(q.dtype)


def kinetic_slowest(
    modes: np.ndarray, segments: Sequence[np.ndarray] | np.ndarray, lag: int, dim: int = 1
) -> tuple[TICA, np.ndarray]:
    """The slowest combinations of latent modes: the leading ``dim`` TICA components of ``modes (T, k)``
    at ``lag`` frames, time-lagged pairs taken inside each piece of ``segments`` (a label per frame
    ``(T,)``: frames with equal consecutive labels follow each other in time). Returns the TICA model
    and the components' values ``(T, dim)``."""
    modes = np.asarray(modes, dtype=np.float64)
    model = tica(split_segments(modes, np.asarray(segments)), lag=lag, dim=dim)
    return model, model.transform(modes)[:, :dim]


def slow_together(eigenvalues: Sequence[float], most: int = 2, ratio: float = SLOW_TOGETHER_RATIO) -> int:
    """How many leading TICA components are slow together: those whose implied timescale
    ``-lag / ln(lambda)`` is at least ``ratio`` times the slowest one's, at most ``most``, at least 1.
    Slow processes of about the same timescale (the pair of slow eigenfunctions of a three-state rotor)
    need a CV each: one of them alone leaves a barrier hidden along the other."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)[:most]
    with np.errstate(divide="ignore"):
        rates = -np.log(np.clip(eigenvalues, 0.0, 1.0 - 1e-12))  # 1 / timescale, in units of 1 / lag
    return int(max(1, np.sum(rates[0] >= ratio * rates)))


def split_segments(values: np.ndarray, segments: np.ndarray) -> list[np.ndarray]:
    """Rows of ``values (T, ...)`` grouped into the runs of equal ``segments (T,)`` labels, in order."""
    if len(values) != len(segments):
        raise ValueError(f"{len(values)} rows but {len(segments)} segment labels")
    return np.split(values, np.flatnonzero(np.diff(segments)) + 1)


def latent_interpolation(
    model: NeuralCanonicalTransformation, frame: PrincipalFrame, q: torch.Tensor, mode: int, n_frames: int
) -> torch.Tensor:
    """Positions ``(n_frames, 3m)`` nm along latent mode ``mode`` (0: slowest), from its 2nd to its 98th
    percentile over the data ``q (T, k)``, every other latent position at its median."""
    with torch.no_grad():
        latent = model.transform.encode_positions(q.to(NCT_DTYPE))
        index = int(model.slow_modes()[0][mode])
        path = latent.median(0).values.repeat(n_frames, 1)
        lo, hi = torch.quantile(latent[:, index], torch.tensor([0.02, 0.98], dtype=latent.dtype))
        path[:, index] = torch.linspace(float(lo), float(hi), n_frames, dtype=latent.dtype)
        q_path = model.transform(torch.zeros_like(path), path)[1]
    return frame.positions(q_path.to(frame.axes.dtype))
