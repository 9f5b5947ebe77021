"""Ramachandran plots, free-energy profiles, basin populations and transition counts.

Basins of alanine dipeptide along phi (radians, ``(-pi, pi]``), chosen at the two free-energy
barriers of phi (near 0 and near 2 rad = 115 deg):

- ``positive``: ``0 < phi < 2.0`` -- alpha_L and C7ax (the phi > 0 basin);
- ``negative``: everything else -- C7eq, C5/beta and alpha_R (phi < 0), including
  ``phi > 2.0``, the part of the beta basin that wraps across +-pi.

Transitions are counted with hysteresis: a crossing counts when the trajectory reaches the *core*
of the other basin, the basin shrunk by ``margin`` (default 0.5 rad) on each side: positive core
``(0.5, 1.5)``, negative core ``phi < -0.5`` or ``phi > 2.5``. Recrossings of a barrier that do
not reach the other core are not transitions.

Weights (metadynamics reweighting, flow importance weights) are per frame, non-negative, any
normalisation. Free energies are ``-kT ln p`` shifted to a minimum of 0, NaN where no frame falls.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KJ_PER_MOL_PER_K = 0.00831446261815324  # molar gas constant R, kJ/(mol K)
POSITIVE_BASIN = (0.0, 2.0)  # rad: alpha_L / C7ax
CORE_MARGIN = 0.5  # rad
UNITS = ("kT", "kJ/mol")


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def normalized_weights(weights, n: int) -> np.ndarray:
    """Weights ``(n,)`` (None: uniform) checked finite and non-negative, scaled to sum 1."""
    if weights is None:
        return np.full(n, 1.0 / n)
    w = _as_1d(weights, "weights")
    if w.shape[0] != n:
        raise ValueError(f"{w.shape[0]} weights for {n} frames")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return w / w.sum()


def effective_sample_size(weights) -> float:
    """Kish's ``(sum w)^2 / sum w^2`` of weights ``(n,)``."""
    w = normalized_weights(weights, len(weights))
    return float(1.0 / np.sum(w * w))


def wrap_angle(angle) -> np.ndarray:
    """Angles in radians mapped to ``[-pi, pi)``."""
    return (np.asarray(angle, dtype=np.float64) + np.pi) % (2 * np.pi) - np.pi


def load_weights(path) -> np.ndarray:
    """Frame weights from ``.npy`` or a text file of one column (``#`` comments allowed): ``(n,)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    weights = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, comments="#", ndmin=1)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.ndim != 1:
        raise ValueError(f"{path}: weights must be one column, got shape {weights.shape}")
    return weights


def backbone_angles(traj, top=None) -> tuple[np.ndarray, np.ndarray]:
    """The first backbone phi and psi of every frame, each ``(T,)`` radians.

    ``traj``: an ``mdtraj.Trajectory`` or a trajectory file mdtraj reads (with ``top``, a PDB).
    """
    import mdtraj

    from openflow.features import backbone_torsions

    if not isinstance(traj, mdtraj.Trajectory):
        if not Path(traj).is_file():
            raise FileNotFoundError(f"trajectory file not found: {traj}")
        if top is not None and not Path(top).is_file():
            raise FileNotFoundError(f"topology file not found: {top}")
        traj = mdtraj.load(str(traj), top=None if top is None else str(top))
    torsions = backbone_torsions(traj.topology)
    if not torsions["phi"] or not torsions["psi"]:
        raise ValueError("the topology has no backbone phi/psi pair")
    angles = mdtraj.compute_dihedrals(traj, np.array([torsions["phi"][0], torsions["psi"][0]]), periodic=False)
    return angles[:, 0].astype(np.float64), angles[:, 1].astype(np.float64)


def _phi_psi(traj_or_angles, top=None) -> tuple[np.ndarray, np.ndarray]:
    """(phi, psi) from a trajectory, a file, a ``(T, 2)`` array or a ``(phi, psi)`` pair."""
    if isinstance(traj_or_angles, (str, os.PathLike)) or hasattr(traj_or_angles, "xyz"):
        return backbone_angles(traj_or_angles, top)
    if isinstance(traj_or_angles, tuple) and len(traj_or_angles) == 2:
        phi, psi = (_as_1d(a, name) for a, name in zip(traj_or_angles, ("phi", "psi")))
    else:
        array = np.asarray(traj_or_angles, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"angles must be (T, 2) (phi, psi) in radians, got shape {array.shape}")
        phi, psi = _as_1d(array[:, 0], "phi"), _as_1d(array[:, 1], "psi")
    if phi.shape != psi.shape:
        raise ValueError(f"phi and psi differ in length ({phi.size} vs {psi.size})")
    return phi, psi


def _energy_scale(units: str, temperature: float) -> float:
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (K), got {temperature}")
    return 1.0 if units == "kT" else KJ_PER_MOL_PER_K * float(temperature)


def _free_energy(histogram: np.ndarray, scale: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -scale * np.log(histogram)
    f[~np.isfinite(f)] = np.nan
    return f - np.nanmin(f)


def free_energy_profile(values, weights=None, bins: int = 50, range=None, units: str = "kT",
                        temperature: float = 300.0) -> tuple[np.ndarray, np.ndarray]:
    """``F(s) = -kT ln p(s)`` of values ``(T,)`` (weighted): bin centres ``(bins,)`` and F ``(bins,)``.

    The density is per unit ``s`` (bins of equal width), F's minimum is 0, empty bins NaN.
    """
    values = _as_1d(values, "values")
    w = normalized_weights(weights, values.size)
    scale = _energy_scale(units, temperature)
    histogram, edges = np.histogram(values, bins=int(bins), range=range, weights=w, density=True)
    return 0.5 * (edges[1:] + edges[:-1]), _free_energy(histogram, scale)


@dataclass
class Ramachandran:
    """A free-energy surface over (phi, psi): ``free_energy[i, j]`` at ``phi_centers[i], psi_centers[j]``."""

    free_energy: np.ndarray  # (bins, bins), min 0, NaN where empty
    phi_edges: np.ndarray  # (bins + 1,) rad
    psi_edges: np.ndarray  # (bins + 1,) rad
    units: str
    temperature: float
    phi: np.ndarray  # (T,) rad, the data
    psi: np.ndarray
    weights: np.ndarray  # (T,), sum 1

    @property
    def phi_centers(self) -> np.ndarray:
        return 0.5 * (self.phi_edges[1:] + self.phi_edges[:-1])

    @property
    def psi_centers(self) -> np.ndarray:
        return 0.5 * (self.psi_edges[1:] + self.psi_edges[:-1])


def ramachandran(traj_or_angles, top=None, weights=None, bins: int = 60, units: str = "kT",
                 temperature: float = 300.0) -> Ramachandran:
    """Free energy over (phi, psi) on ``bins x bins`` cells of ``[-pi, pi)^2``.

    ``traj_or_angles``: an ``mdtraj.Trajectory``, a trajectory file (``top``: its PDB), a
    ``(T, 2)`` array or a ``(phi, psi)`` pair of ``(T,)`` arrays in radians. ``weights``: ``(T,)``
    or None. ``units``: ``"kT"`` or ``"kJ/mol"`` (at ``temperature`` K).
    """
    phi, psi = _phi_psi(traj_or_angles, top)
    w = normalized_weights(weights, phi.size)
    scale = _energy_scale(units, temperature)
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins}")
    edges = np.linspace(-np.pi, np.pi, int(bins) + 1)
    histogram, _, _ = np.histogram2d(wrap_angle(phi), wrap_angle(psi), bins=(edges, edges), weights=w, density=True)
    return Ramachandran(_free_energy(histogram, scale), edges, edges.copy(), units, float(temperature), phi, psi, w)


def basin_of(phi, margin: float = 0.0) -> np.ndarray:
    """Basin label per frame: +1 (positive core), -1 (negative core), 0 (between cores) -> ``(T,)`` int.

    With ``margin = 0`` every frame is +1 or -1 (the basins partition the circle; see the module).
    """
    phi = wrap_angle(phi)
    lo, hi = POSITIVE_BASIN
    if not 0 <= margin < (hi - lo) / 2:
        raise ValueError(f"margin must be in [0, {(hi - lo) / 2}), got {margin}")
    positive = (phi > lo + margin) & (phi < hi - margin)
    inside = (phi > lo - margin) & (phi < hi + margin)
    return np.where(positive, 1, np.where(inside, 0, -1))


def basin_populations(phi, psi=None, weights=None) -> dict:
    """Populations of the phi < 0 and phi > 0 basins and ``delta_f_kT = F(positive) - F(negative)``.

    ``phi``: ``(T,)`` rad; ``psi`` is accepted for symmetry with :func:`ramachandran` and only
    checked for length. Returns ``{"negative", "positive", "delta_f_kT", "n_frames",
    "effective_sample_size", "basins"}`` (populations sum to 1; ``delta_f_kT`` is inf when the
    positive basin is empty).
    """
    phi = _as_1d(phi, "phi")
    if psi is not None and _as_1d(psi, "psi").shape != phi.shape:
        raise ValueError("phi and psi differ in length")
    w = normalized_weights(weights, phi.size)
    label = basin_of(phi)
    positive, negative = float(w[label == 1].sum()), float(w[label == -1].sum())
    with np.errstate(divide="ignore"):
        delta = float(np.log(negative) - np.log(positive)) if negative > 0 else -np.inf
    return {
        "negative": negative,
        "positive": positive,
        "delta_f_kT": delta,
        "n_frames": int(phi.size),
        "effective_sample_size": float(1.0 / np.sum(w * w)),
        "basins": {
            "negative": f"C7eq, C5/beta, alpha_R: phi <= {POSITIVE_BASIN[0]} or phi >= {POSITIVE_BASIN[1]} rad",
            "positive": f"alpha_L, C7ax: {POSITIVE_BASIN[0]} < phi < {POSITIVE_BASIN[1]} rad",
        },
    }


def transition_frames(phi, margin: float = CORE_MARGIN) -> np.ndarray:
    """Frame indices ``(k,)`` at which the trajectory enters the core of the other basin (hysteresis)."""
    label = basin_of(_as_1d(phi, "phi"), margin)
    committed = np.flatnonzero(label != 0)
    if committed.size == 0:
        return committed
    core = label[committed]
    changes = np.flatnonzero(core[1:] != core[:-1]) + 1
    return committed[changes]


def count_transitions(phi, margin: float = CORE_MARGIN) -> int:
    """Number of transitions between the phi < 0 and phi > 0 basins in a time series ``(T,)`` rad."""
    return int(transition_frames(phi, margin).size)


def plot_ramachandran(surface: Ramachandran, path, title: str | None = None, vmax: float | None = None) -> Path:
    """Write the surface as a PNG (filled contours, basin boundaries dashed); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openflow.io import atomic_path

    path = Path(path)
    f = surface.free_energy
    top = vmax if vmax is not None else (np.nanmax(f) if np.isfinite(f).any() else 1.0)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    levels = np.linspace(0.0, max(top, 1e-6), 25)
    mesh = ax.contourf(surface.phi_centers, surface.psi_centers, np.clip(f, 0, top).T, levels=levels, cmap="viridis")
    for boundary in POSITIVE_BASIN:
        ax.axvline(boundary, color="w", ls="--", lw=0.8)
    fig.colorbar(mesh, ax=ax, label=f"free energy ({surface.units})")
    ax.set(xlabel=r"$\phi$ (rad)", ylabel=r"$\psi$ (rad)", xlim=(-np.pi, np.pi), ylim=(-np.pi, np.pi),
           title=title or f"Ramachandran, {surface.phi.size} frames")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- slow-mode quality metrics


def _as_samples(values, name: str) -> np.ndarray:
    """``(N,)`` or ``(N, d)`` array-like (numpy, torch) -> finite float64 ``(N, d)``."""
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty (N,) or (N, d) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def _in_box(samples: np.ndarray, period: float | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``(N, d)`` placed for ``cKDTree(boxsize=...)`` and their box ``(d,)``.

    Circular columns are wrapped into ``[0, period)`` (minimum-image distances); the others are
    shifted to start at 0 inside a box longer than twice their range, so that no distance wraps.
    """
    if period is None:
        shifted = samples - samples.min(0)
        return shifted, 2.0 * shifted.max(0) + 1.0
    if not (np.isfinite(period) and period > 0):
        raise ValueError(f"period_{name} must be a positive finite number, got {period}")
    wrapped = np.mod(samples, period)
    wrapped[wrapped >= period] = 0.0  # np.mod(-tiny, period) rounds to period
    return wrapped, np.full(samples.shape[1], float(period))


def mutual_information(x, y, k: int = 3, period_x: float | None = None, period_y: float | None = None) -> float:
    """Mutual information ``I(x; y)`` in nats, Kraskov-Stoegbauer-Grassberger estimator (algorithm 1).

    ``x``: ``(N,)`` or ``(N, d_x)``; ``y``: ``(N,)`` or ``(N, d_y)``; samples of continuous
    variables (duplicated samples bias the estimate). ``k``: neighbours in the joint space
    (max-norm). ``period_x``/``period_y``: every column of that variable is circular with this
    period (``2 pi`` for torsions in radians) and distances along it are minimum-image distances.
    ``I = psi(k) + psi(N) - <psi(n_x + 1) + psi(n_y + 1)>``, ``n`` counting the other samples
    strictly closer in the marginal than the k-th joint neighbour. Unbiased only asymptotically:
    small negative values are possible for independent variables.
    """
    from scipy.spatial import cKDTree
    from scipy.special import digamma

    x, y = _as_samples(x, "x"), _as_samples(y, "y")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y differ in length ({n} vs {y.shape[0]})")
    if n <= k:
        raise ValueError(f"need more samples than k={k}, got {n}")
    (x, box_x), (y, box_y) = _in_box(x, period_x, "x"), _in_box(y, period_y, "y")
    periodic = period_x is not None or period_y is not None
    joint = np.hstack([x, y])
    joint_box = np.concatenate([box_x, box_y]) if periodic else None
    # the sample itself is its own nearest neighbour: the (k+1)-th is the k-th other one
    radius = cKDTree(joint, boxsize=joint_box).query(joint, k=[k + 1], p=np.inf)[0][:, 0]
    strictly_inside = np.nextafter(radius, 0.0)
    counts = [  # each count includes the sample itself: n_x + 1
        cKDTree(values, boxsize=box if period is not None else None).query_ball_point(
            values, strictly_inside, p=np.inf, return_length=True)
        for values, box, period in ((x, box_x, period_x), (y, box_y, period_y))
    ]
    return float(digamma(k) + digamma(n) - np.mean(digamma(counts[0]) + digamma(counts[1])))


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve: ``P(score_pos > score_neg) + P(score_pos == score_neg) / 2``.

    ``scores``: ``(N,)`` real; ``labels``: ``(N,)`` with exactly two distinct values (bool, 0/1,
    -1/+1); the larger value is the positive class. Mann-Whitney U from average ranks.
    """
    from scipy.stats import rankdata

    scores = _as_1d(scores, "scores")
    labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {scores.shape}, got {labels.shape}")
    classes = np.unique(labels)
    if classes.size != 2:
        raise ValueError(f"labels must hold exactly two classes, got {classes.size}: {classes[:5].tolist()}")
    positive = labels == classes[1]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def basin_separation_auc(scores, labels) -> float:
    """``max(auc, 1 - auc)`` of :func:`roc_auc`: how well a CV of arbitrary sign separates two basins."""
    auc = roc_auc(scores, labels)
    return max(auc, 1.0 - auc)
