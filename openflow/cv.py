"""Collective variables: CV models (features -> MLP) and fitting them to target values.

A :class:`CVModel` maps positions ``(B, n_atoms, 3)`` nm to CV values ``(B, n_out)`` through
OpenMM-expressible features (:mod:`openflow.features`), a fixed standardisation and a small MLP
with bounded activations, so that ``openflow.plugins.openmm.export.to_custom_cv_force`` can write
it exactly as an ``openmm.CustomCVForce`` and :meth:`CVModel.bounds` can bound it (metadynamics
grids need a finite range). :func:`fit_cv` regresses a model on targets (e.g. the slow modes of a
trained canonical transformation) and reports R^2 on held-out frames.

Linear baselines for slow modes, in numpy float64: :func:`tica` (reversible time-lagged
independent component analysis), :func:`implied_timescales`, and :func:`vamp2_score`, which rates
any set of features (slow modes, TICA or PCA components) by how much slow dynamics they span.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .features import FeatureSet


@dataclass(frozen=True)
class Activation:
    """A bounded hidden-layer activation: torch function, Lepton template, guaranteed range."""

    name: str
    torch_fn: object
    lepton: str  # format string with one ``{}`` for the argument
    lo: float
    hi: float


ACTIVATIONS = {
    "tanh": Activation("tanh", torch.tanh, "tanh({})", -1.0, 1.0),
    "sigmoid": Activation("sigmoid", torch.sigmoid, "1/(1+exp(-({})))", 0.0, 1.0),
}


class CVModel(nn.Module):
    """features -> ``(f - mean) / std`` -> MLP (bounded activation) -> CV values ``(B, n_out)``.

    Args:
        features: a :class:`FeatureSet` (or one Feature layer).
        hidden: widths of the hidden layers; ``()`` gives a linear CV.
        activation: ``"tanh"`` or ``"sigmoid"``.
        n_out: number of CV outputs.
        seed: seeds the initial weights (None: torch's global generator).
    """

    def __init__(
        self, features, hidden: Sequence[int] = (16,), activation: str = "tanh", n_out: int = 1, seed: int | None = None
    ):
        super().__init__()
        self.features = features if isinstance(features, FeatureSet) else FeatureSet(features)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden) or int(n_out) < 1:
            raise ValueError(f"hidden widths and n_out must be positive, got hidden={hidden}, n_out={n_out}")
        self.hidden, self.activation, self.n_out = hidden, ACTIVATIONS[activation], int(n_out)
        n_in = self.features.n_out
        self.register_buffer("mean", torch.zeros(n_in))
        self.register_buffer("std", torch.ones(n_in))
        widths = (n_in, *hidden, self.n_out)
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if generator is not None:
            with torch.no_grad():
                for layer in self.layers:
                    bound = 1.0 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.uniform_(-bound, bound, generator=generator)

    @property
    def n_features(self) -> int:
        return self.features.n_out

    def set_standardization(self, positions: torch.Tensor) -> CVModel:
        """Fix ``mean``/``std`` to the feature statistics of ``positions`` (constant features: std 1)."""
        with torch.no_grad():
            f = self.features(positions.to(self.mean))
            std = f.std(0) if f.shape[0] > 1 else torch.ones_like(f[0])
            self.mean.copy_(f.mean(0))
            self.std.copy_(torch.where(std > 1e-8 * (1 + f.abs().amax(0)), std, torch.ones_like(std)))
        return self

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, n_features)`` -> CV values ``(B, n_out)``."""
        h = (features - self.mean) / self.std
        for layer in self.layers[:-1]:
            h = self.activation.torch_fn(layer(h))
        return self.layers[-1](h)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions ``(B, n_atoms, 3)`` or ``(B, 3 n_atoms)`` nm -> CV values ``(B, n_out)``."""
        return self.head(self.features(positions))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Guaranteed ``(lo, hi)``, each ``(n_out,)`` float64, containing every output for any positions.

        Interval arithmetic through the network: feature ranges (sin/cos in [-1, 1], angles in
        [0, pi], distances in [0, inf)), then each layer; after a bounded activation the range is
        finite (for tanh ``|s - b| <= sum |w|``), widened by 1e-6 relative for float32 rounding.
        A linear CV over distances is unbounded (inf).
        """
        lo, hi = self.features.ranges()
        mean, std = self.mean.detach().double().cpu(), self.std.detach().double().cpu()
        lo, hi = (lo - mean) / std, (hi - mean) / std
        for k, layer in enumerate(self.layers):
            w, b = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
            zero = torch.zeros((), dtype=torch.float64)
            upper = torch.where(w > 0, w * hi, torch.where(w < 0, w * lo, zero)).sum(1) + b
            lower = torch.where(w > 0, w * lo, torch.where(w < 0, w * hi, zero)).sum(1) + b
            lo, hi = lower, upper
            if k < len(self.layers) - 1:
                lo, hi = self.activation.torch_fn(lo), self.activation.torch_fn(hi)
        margin = 1e-6 * (lo.abs() + hi.abs()) + 1e-12  # room for float32 rounding in the forward pass
        return lo - margin, hi + margin


# ----------------------------------------------------------------------------- fitting


@dataclass
class CVFit:
    """Result of :func:`fit_cv`: R^2 per output on training and held-out frames, loss history."""

    r2_train: list[float]
    r2_validation: list[float]
    n_train: int
    n_validation: int
    losses: list[float]


def r2_score(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination per column, ``(B, k)`` x ``(B, k)`` -> ``(k,)``."""
    residual = ((prediction - target) ** 2).sum(0)
    total = ((target - target.mean(0)) ** 2).sum(0)
    return 1.0 - residual / total


def fit_cv(
    model: CVModel,
    positions: torch.Tensor,
    targets: torch.Tensor,
    validation_fraction: float = 0.2,
    epochs: int = 200,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> CVFit:
    """Least-squares regression of ``model(positions)`` on ``targets``, in place.

    Args:
        positions: ``(B, n_atoms, 3)`` or ``(B, 3 n_atoms)`` nm, on the model's device/dtype.
        targets: ``(B,)`` or ``(B, n_out)``, e.g. slow-mode values.
        validation_fraction: share of frames (randomly chosen) held out for the R^2 report.
    The feature standardisation is fixed from the training frames; targets are standardised
    during training and the scale is folded back into the last layer, so the model returns
    target units. Returns a :class:`CVFit`.
    """
    if not isinstance(positions, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("positions and targets must be torch tensors")
    positions = positions.to(model.mean)
    targets = targets.to(model.mean)
    targets = targets.reshape(targets.shape[0], -1) if targets.ndim in (1, 2) else None
    if targets is None or targets.shape[1] != model.n_out:
        raise ValueError(f"targets must be (B,) or (B, {model.n_out}) for a model with n_out={model.n_out}")
    if positions.shape[0] != targets.shape[0]:
        raise ValueError(f"{positions.shape[0]} frames of positions but {targets.shape[0]} targets")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n = positions.shape[0]
    n_val = max(1, round(validation_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"too few frames ({n}) to hold out {n_val} and still train")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).to(positions.device)
    val, train = order[:n_val], order[n_val:]
    model.set_standardization(positions[train])
    with torch.no_grad():
        features = model.features(positions)  # features are fixed: compute once
    t_mean, t_std = targets[train].mean(0), targets[train].std(0).clamp_min(1e-12)
    scaled = (targets - t_mean) / t_std
    optimizer = torch.optim.Adam(model.layers.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    losses = []
    for _ in range(int(epochs)):
        perm = train[torch.randperm(train.shape[0], generator=generator).to(train.device)]
        total = 0.0
        for batch in perm.split(int(batch_size)):
            loss = ((model.head(features[batch]) - scaled[batch]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.shape[0]
        schedule.step()
        losses.append(total / train.shape[0])
    with torch.no_grad():  # return target units: fold the target scale into the last layer
        last = model.layers[-1]
        last.weight.mul_(t_std[:, None])
        last.bias.mul_(t_std).add_(t_mean)
        prediction = model.head(features)
    return CVFit(
        r2_train=r2_score(prediction[train], targets[train]).tolist(),
        r2_validation=r2_score(prediction[val], targets[val]).tolist(),
        n_train=int(train.shape[0]),
        n_validation=int(n_val),
        losses=losses,
    )


# ----------------------------------------------------------------------------- linear slow modes: TICA, VAMP-2


def _as_frames(values, name: str) -> np.ndarray:
    """A piece of trajectory (numpy or torch) -> finite float64 ``(T, d)``."""
    array = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{name} must be (T, d) with d >= 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def _lagged_pairs(segments, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``x_t`` and ``x_{t+lag}`` from inside every piece longer than ``lag``, each ``(n_pairs, d)``.

    ``segments``: one array ``(T, d)`` or a list/tuple of arrays ``(T_i, d)``, continuous pieces of
    trajectory; no pair spans two pieces.
    """
    if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)) or lag < 1:
        raise ValueError(f"lag must be an integer >= 1 (frames), got {lag!r}")
    pieces = list(segments) if isinstance(segments, (list, tuple)) else [segments]
    if not pieces:
        raise ValueError("segments is an empty list")
    pieces = [_as_frames(piece, f"segment {i}") for i, piece in enumerate(pieces)]
    if len({piece.shape[1] for piece in pieces}) != 1:
        raise ValueError(f"segments differ in feature dimension: {sorted({p.shape[1] for p in pieces})}")
    pieces = [piece for piece in pieces if piece.shape[0] > lag]
    if not pieces:
        raise ValueError(f"no segment is longer than lag={lag} frames: no time-lagged pairs")
    return np.concatenate([p[:-lag] for p in pieces]), np.concatenate([p[lag:] for p in pieces])


def _whitening(covariance: np.ndarray, epsilon: float) -> np.ndarray:
    """``L (d, r)`` with ``L^T C L = I_r``, over the eigenvalues of the symmetric ``C`` above ``epsilon``.

    Eigenvalues below the magnitude of the most negative one are rounding noise and dropped too.
    """
    values, vectors = np.linalg.eigh(covariance)
    keep = values > max(epsilon, -values.min())
    if not keep.any():
        raise ValueError(f"no covariance eigenvalue above epsilon={epsilon}: are the features constant?")
    return vectors[:, keep] / np.sqrt(values[keep])


def _n_components(dim: int | None, d: int) -> int:
    if dim is None:
        return d
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= d:
        raise ValueError(f"dim must be an integer in [1, {d}] (the number of features), got {dim!r}")
    return int(dim)


def _check_epsilon(epsilon: float) -> None:
    if not (np.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")


@dataclass(frozen=True)
class TICA:
    """A TICA model: ``transform(x) = (x - mean) @ eigenvectors``, slowest component first.

    ``mean``: ``(d,)``; ``eigenvalues``: ``(k,)`` autocorrelations of the components at ``lag``
    frames, descending; ``eigenvectors``: ``(d, k)`` columns, orthonormal in the metric ``C00``
    (unit-variance components); ``lag``: frames.
    """

    mean: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    lag: int

    def transform(self, x) -> np.ndarray:
        """Features ``(N, d)`` -> independent components ``(N, k)``."""
        x = _as_frames(x, "x")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x has {x.shape[1]} features, the model {self.mean.shape[0]}")
        return (x - self.mean) @ self.eigenvectors

    def timescales(self, lag_time: float) -> np.ndarray:
        """Implied timescales ``-lag_time / ln|lambda|`` ``(k,)``, in the unit of ``lag_time``.

        ``lag_time``: the model's lag as a time (``lag`` frames times the time between frames,
        e.g. ps). Components with ``|lambda| >= 1`` get ``inf``.
        """
        if not (np.isfinite(lag_time) and lag_time > 0):
            raise ValueError(f"lag_time must be a positive time, got {lag_time}")
        magnitude = np.abs(self.eigenvalues)
        with np.errstate(divide="ignore"):
            return np.where(magnitude < 1, -lag_time / np.log(magnitude), np.inf)


def tica(segments, lag: int, dim: int | None = None, epsilon: float = 1e-10) -> TICA:
    """Reversible TICA of features over continuous pieces of trajectory.

    ``segments``: ``(T, d)`` or a list of ``(T_i, d)`` (pieces with ``T_i <= lag`` are skipped);
    ``lag``: frames; ``dim``: number of components kept (None: all; fewer when ``C00`` is rank
    deficient); ``epsilon``: cutoff on the eigenvalues of ``C00`` (feature units squared).
    As deeptime's reversible estimator: the mean is over both halves of every pair
    ``(x_t, x_{t+lag})``, ``C00 = (X0^T X0 + Xt^T Xt) / 2n`` and ``C0t = (X0^T Xt + Xt^T X0) / 2n``
    (centred, no Bessel correction); then ``C0t v = lambda C00 v`` in the whitened basis.
    """
    _check_epsilon(epsilon)
    x0, xt = _lagged_pairs(segments, lag)
    n_components = _n_components(dim, x0.shape[1])
    n = 2 * x0.shape[0]
    mean = (x0.sum(0) + xt.sum(0)) / n
    x0, xt = x0 - mean, xt - mean
    c00 = (x0.T @ x0 + xt.T @ xt) / n
    c0t = x0.T @ xt
    c0t = (c0t + c0t.T) / n
    whiten = _whitening(c00, epsilon)
    values, vectors = np.linalg.eigh(whiten.T @ c0t @ whiten)
    order = np.argsort(values)[::-1][:n_components]
    return TICA(mean=mean, eigenvalues=values[order], eigenvectors=whiten @ vectors[:, order], lag=int(lag))


def vamp2_score(segments, lag: int, dim: int | None = None, epsilon: float = 1e-10) -> float:
    """VAMP-2 score of features ``(T, d)`` or a list of ``(T_i, d)`` at ``lag`` frames, in ``[1, 1 + d]``.

    ``1 + sum`` of the squared top-``dim`` singular values of ``C00^-1/2 C0t Ctt^-1/2`` (the 1 is
    the constant function, as deeptime reports it). Non-reversible estimate: ``x_t`` and
    ``x_{t+lag}`` centred on their own means; ``epsilon``: eigenvalue cutoff of ``C00``, ``Ctt``.
    Invariant under invertible linear maps of the features: it rates the space they span.
    """
    _check_epsilon(epsilon)
    x0, xt = _lagged_pairs(segments, lag)
    n_components = _n_components(dim, x0.shape[1])
    x0, xt = x0 - x0.mean(0), xt - xt.mean(0)
    n = x0.shape[0]
    koopman = _whitening(x0.T @ x0 / n, epsilon).T @ (x0.T @ xt / n) @ _whitening(xt.T @ xt / n, epsilon)
    singular_values = np.linalg.svd(koopman, compute_uv=False)
    return float(1.0 + np.sum(singular_values[:n_components] ** 2))


def implied_timescales(segments, lags: Sequence[int], lag_time: float, dim: int) -> np.ndarray:
    """TICA implied timescales ``(len(lags), dim)`` at each lag, in the unit of ``lag_time``.

    ``lags``: frames; ``lag_time``: the time between consecutive frames (e.g. ps), so that row
    ``i`` is ``tica(segments, lags[i], dim).timescales(lags[i] * lag_time)``. For Markovian
    dynamics in the span of the features the rows agree.
    """
    lags = list(lags)
    if not lags:
        raise ValueError("lags is empty")
    rows = []
    for lag in lags:
        model = tica(segments, lag, dim)
        if model.eigenvalues.size < dim:
            raise ValueError(
                f"only {model.eigenvalues.size} TICA components at lag {lag} (C00 is rank deficient), asked for {dim}"
            )
        rows.append(model.timescales(lag * lag_time))
    return np.stack(rows)
