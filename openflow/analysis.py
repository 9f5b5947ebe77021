"""Free-energy surfaces and profiles, two-state populations and transitions, slow-mode metrics, plots.

Nothing here knows a molecule: states are passed in as labels per frame. A *state series* holds
``+1`` (the frame is in the core of state A), ``-1`` (in the core of state B) or ``0`` (between
the cores, committed to neither); transitions are counted with that hysteresis: a crossing
counts when the trajectory reaches the core of the other state. A peptide's phi basins, for
example, come from ``openflow.systems.alanine_dipeptide.phi_states``.

Weights (metadynamics reweighting, flow importance weights) are per frame, non-negative, any
normalisation. Free energies are ``-kT ln p`` shifted to a minimum of 0, NaN where no frame falls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openflow.geometry import wrap_angle
from openflow.io import save_figure
from openflow.systems import kT_kjmol

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


def _angle_pair(angles) -> tuple[np.ndarray, np.ndarray]:
    """Two angle series from a ``(T, 2)`` array or a pair of ``(T,)`` arrays (radians)."""
    if isinstance(angles, tuple) and len(angles) == 2:
        first, second = (_as_1d(a, name) for a, name in zip(angles, ("first angle", "second angle")))
    else:
        array = np.asarray(angles, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"angles must be (T, 2) in radians, got shape {array.shape}")
        first, second = _as_1d(array[:, 0], "first angle"), _as_1d(array[:, 1], "second angle")
    if first.shape != second.shape:
        raise ValueError(f"the two angle series differ in length ({first.size} vs {second.size})")
    return first, second


def _energy_scale(units: str, temperature: float) -> float:
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (K), got {temperature}")
    return 1.0 if units == "kT" else kT_kjmol(temperature)


def _free_energy(histogram: np.ndarray, scale: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -scale * np.log(histogram)
    f[~np.isfinite(f)] = np.nan
    return f - np.nanmin(f)


def free_energy_profile(
    values, weights=None, bins: int = 50, range=None, units: str = "kT", temperature: float = 300.0
) -> tuple[np.ndarray, np.ndarray]:
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
    def ess(self) -> float:
        """Kish effective number of frames behind the surface."""
        return float(1.0 / np.sum(self.weights**2))

    @property
    def phi_centers(self) -> np.ndarray:
        return 0.5 * (self.phi_edges[1:] + self.phi_edges[:-1])

    @property
    def psi_centers(self) -> np.ndarray:
        return 0.5 * (self.psi_edges[1:] + self.psi_edges[:-1])


def histogram_bins(ess: float, lo: int = 12, hi: int = 72, per_cell: float = 5.0) -> int:
    """Bins per axis of a 2-D histogram with ``ess`` effective samples: about ``per_cell`` effective
    samples per cell of a uniformly filled square, ``sqrt(ess / per_cell)``, kept in ``[lo, hi]``
    (too many bins for the data give holes and speckle, too few smear the basins)."""
    return int(np.clip(round(np.sqrt(max(ess, 0.0) / per_cell)), lo, hi))


def ramachandran(
    angles, weights=None, bins: int | None = None, units: str = "kT", temperature: float = 300.0
) -> Ramachandran:
    """Free energy over two torsions (e.g. a peptide's phi, psi) on ``bins x bins`` cells of ``[-pi, pi)^2``.

    ``angles``: a ``(T, 2)`` array or a ``(phi, psi)`` pair of ``(T,)`` arrays in radians.
    ``weights``: ``(T,)`` or None. ``bins``: per axis (None: :func:`histogram_bins` of the weights'
    effective sample size). ``units``: ``"kT"`` or ``"kJ/mol"`` (at ``temperature`` K).
    """
    phi, psi = _angle_pair(angles)
    w = normalized_weights(weights, phi.size)
    scale = _energy_scale(units, temperature)
    bins = histogram_bins(1.0 / np.sum(w * w)) if bins is None else bins
    if isinstance(bins, bool) or int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins}")
    edges = np.linspace(-np.pi, np.pi, int(bins) + 1)
    histogram, _, _ = np.histogram2d(wrap_angle(phi), wrap_angle(psi), bins=(edges, edges), weights=w, density=True)
    return Ramachandran(_free_energy(histogram, scale), edges, edges.copy(), units, float(temperature), phi, psi, w)


def state_populations(in_state, weights=None) -> dict:
    """Population of a state and ``delta_f_kT = F(state) - F(rest) = -ln[P(state) / P(rest)]``.

    ``in_state``: ``(T,)`` bool, or a state series (the state is ``+1``); ``weights``: ``(T,)`` or
    None. Returns ``{"state", "rest", "delta_f_kT", "n_frames", "ess_fraction"}`` (``delta_f_kT``
    is inf while the state is empty, -inf when it holds everything).
    """
    label = np.asarray(in_state)
    if label.ndim != 1 or label.size == 0:
        raise ValueError(f"in_state must be a non-empty 1-D array, got shape {label.shape}")
    inside = label if label.dtype == bool else label == 1
    w = normalized_weights(weights, inside.size)
    state, rest = float(w[inside].sum()), float(w[~inside].sum())
    with np.errstate(divide="ignore"):
        delta = float(np.log(rest) - np.log(state)) if rest > 0 else -np.inf
    return {
        "state": state,
        "rest": rest,
        "delta_f_kT": delta,
        "n_frames": int(inside.size),
        "ess_fraction": float(1.0 / np.sum(w * w) / w.size),
    }


@dataclass(frozen=True)
class TwoStates:
    """Two free-energy basins along a CV: their minima ``low`` < ``high``, the ``barrier`` between them
    (the highest point of the free energy between the minima) and the core edges: a frame is in the
    low state's core below ``core_low`` (half way from its minimum to the barrier), in the high
    state's core above ``core_high``, uncommitted between."""

    low: float
    barrier: float
    high: float
    core_low: float
    core_high: float
    depth_kT: float  # the smaller of the two basins' depths below the barrier

    def series(self, values) -> np.ndarray:
        """State series ``(T,)``: +1 in the high core, -1 in the low core, 0 between."""
        v = np.asarray(values, dtype=np.float64)
        return np.where(v > self.core_high, 1, np.where(v < self.core_low, -1, 0))


def two_states(
    values,
    weights=None,
    bins: int = 100,
    smooth: float = 1.5,
    max_kT: float = 8.0,
    min_depth_kT: float = 1.0,
    min_population: float = 0.005,
) -> TwoStates | None:
    """The two deepest free-energy basins of a CV ``values (T,)`` (weights ``(T,)``): ``F = -ln p`` of a
    histogram with ``bins`` bins, smoothed by a Gaussian of ``smooth`` bins; among the local minima at
    most ``max_kT`` above the lowest, the pair with the highest barrier between them, measured from the
    shallower one, each side of the barrier holding at least ``min_population`` of the weight. None when
    no pair is separated by ``min_depth_kT`` (one basin)."""
    from scipy.ndimage import gaussian_filter1d

    v = _as_1d(values, "values")
    w = normalized_weights(weights, v.size)
    counts, edges = np.histogram(v, bins=int(bins), weights=w)
    centres = 0.5 * (edges[1:] + edges[:-1])
    p = gaussian_filter1d(counts, smooth, mode="nearest")
    with np.errstate(divide="ignore"):
        f = -np.log(np.maximum(p, 1e-300))
    last = len(f) - 1
    minima = [
        i
        for i in range(len(f))
        if f[i] <= f.min() + max_kT and f[i] <= f[max(i - 1, 0)] and f[i] <= f[min(i + 1, last)]
    ]
    best = None
    for a, i in enumerate(minima):
        for j in minima[a + 1 :]:
            top = i + int(np.argmax(f[i : j + 1]))
            if min(counts[:top].sum(), counts[top:].sum()) < min_population:
                continue
            depth = f[top] - max(f[i], f[j])
            if best is None or depth > best[0]:
                best = (depth, i, top, j)
    if best is None or best[0] < min_depth_kT:
        return None
    depth, i, top, j = best
    low, barrier, high = (float(centres[k]) for k in (i, top, j))
    return TwoStates(low, barrier, high, (low + barrier) / 2, (high + barrier) / 2, float(depth))


def transition_frames(states, segments=None) -> np.ndarray:
    """Frame indices ``(k,)`` at which a state series ``(T,)`` (+1, -1, 0 between cores) enters the core
    of the other state. ``segments (T,)``: a run label per frame (e.g. the walker) when the series
    holds several runs one after the other; transitions are then counted inside each run."""
    label = np.asarray(states)
    if label.ndim != 1:
        raise ValueError(f"states must be a 1-D series, got shape {label.shape}")
    if segments is not None:
        runs = np.asarray(segments)
        if runs.shape != label.shape:
            raise ValueError(f"segments {runs.shape} and states {label.shape} must be (T,) alike")
        starts = np.concatenate([[0], np.flatnonzero(runs[1:] != runs[:-1]) + 1, [label.size]])
        return np.concatenate([transition_frames(label[a:b]) + a for a, b in zip(starts[:-1], starts[1:])]).astype(int)
    committed = np.flatnonzero(label != 0)
    if committed.size == 0:
        return committed
    core = label[committed]
    changes = np.flatnonzero(core[1:] != core[:-1]) + 1
    return committed[changes]


def count_transitions(states, segments=None) -> int:
    """Number of transitions between the two states of a state series ``(T,)`` (+1, -1, 0 between cores),
    inside each run of ``segments`` (see :func:`transition_frames`)."""
    return int(transition_frames(states, segments).size)


def delta_f_convergence(in_state, log_weights, n_points: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``F(state) - F(rest)`` (kT) on the frames up to ``n_points`` evenly spaced ends.

    ``in_state``: ``(T,)`` bool (or a state series, the state being +1); ``log_weights``: ``(T,)``.
    Returns frame counts ``(n,)`` and ΔF ``(n,)`` (inf while the state is unvisited).
    """
    label = np.asarray(in_state)
    inside = label if label.dtype == bool else label == 1
    log_w = np.asarray(log_weights, dtype=np.float64)
    if inside.ndim != 1 or inside.shape != log_w.shape:
        raise ValueError(f"in_state {inside.shape} and log_weights {log_w.shape} must be (T,) alike")
    ends = np.unique(np.linspace(0, inside.size, n_points + 1)[1:].round().astype(int))
    ends = ends[ends > 0]
    with np.errstate(divide="ignore"):
        cum_in = np.logaddexp.accumulate(np.where(inside, log_w, -np.inf))
        cum_out = np.logaddexp.accumulate(np.where(inside, -np.inf, log_w))
    return ends, cum_out[ends - 1] - cum_in[ends - 1]


def _torsion_panel(ax, fig, x_edges, y_edges, free_energy, top: float, units: str, labels: tuple):
    """One free-energy map: cells as they are (no contour interpolation), unsampled cells hatched grey."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    ax.set_facecolor("0.85")
    ax.add_patch(
        plt.Rectangle(
            (x_edges[0], y_edges[0]),
            x_edges[-1] - x_edges[0],
            y_edges[-1] - y_edges[0],
            facecolor="0.85",
            hatch="///",
            edgecolor="0.6",
            lw=0,
            zorder=0,
        )
    )
    masked = np.ma.masked_invalid(np.clip(free_energy, 0, top)).T
    mesh = ax.pcolormesh(x_edges, y_edges, masked, cmap="viridis", vmin=0.0, vmax=top, shading="flat", zorder=1)
    bar = fig.colorbar(mesh, ax=ax, label=f"free energy ({units})")
    bar.locator = MaxNLocator(nbins=6, integer=top >= 6, steps=[1, 2, 2.5, 5, 10])
    bar.update_ticks()
    if np.isnan(free_energy).any():
        ax.legend(
            handles=[Patch(facecolor="0.85", hatch="///", edgecolor="0.6", label="not sampled")],
            loc="lower right",
            fontsize=7,
            framealpha=0.8,
        )
    ax.set(xlabel=labels[0], ylabel=labels[1])
    return mesh


def _pi_ticks(ax) -> None:
    ticks = np.linspace(-np.pi, np.pi, 5)
    names = [r"$-\pi$", r"$-\pi/2$", "0", r"$\pi/2$", r"$\pi$"]
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.set(xlim=(-np.pi, np.pi), ylim=(-np.pi, np.pi))


def plot_ramachandran(
    surface: Ramachandran,
    path,
    title: str | None = None,
    vmax: float | None = None,
    boundaries: tuple = (),
    bias_fes: tuple | None = None,
) -> Path:
    """Write the surface as a PNG; return the path.

    Cells are drawn as they are (unsampled ones hatched grey, marked in a legend), the colour bar has
    round ticks, the title says the temperature, the frames and their effective number (ESS).
    ``boundaries``: first-angle values drawn dashed (e.g. a peptide's phi basin boundaries);
    ``bias_fes``: ``(free_energy (n1, n2) kJ/mol, axis1 (n1,) rad, axis2 (n2,) rad)``, the smooth FES
    from a metadynamics bias (sum_hills), drawn beside in the surface's units.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    f = surface.free_energy
    top = vmax if vmax is not None else (float(np.nanmax(f)) if np.isfinite(f).any() else 1.0)
    top = max(top, 1e-6)
    panels = 1 if bias_fes is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.4 * panels, 4.6), squeeze=False)
    labels = (r"$\phi$ (rad)", r"$\psi$ (rad)")
    ax = axes[0, 0]
    _torsion_panel(ax, fig, surface.phi_edges, surface.psi_edges, f, top, surface.units, labels)
    ax.set_title(f"reweighted histogram, {len(f)} x {len(f)} cells" if bias_fes is not None else "", fontsize=9)
    if bias_fes is not None:
        fes, axis1, axis2 = (np.asarray(a, dtype=np.float64) for a in bias_fes)
        scale = (
            _energy_scale(surface.units, surface.temperature)
            if surface.units == "kJ/mol"
            else kT_kjmol(surface.temperature)
        )
        fes_units = fes / (1.0 if surface.units == "kJ/mol" else scale)
        half = lambda a: np.concatenate(
            [[a[0] - (a[1] - a[0]) / 2], (a[1:] + a[:-1]) / 2, [a[-1] + (a[-1] - a[-2]) / 2]]
        )  # noqa: E731
        _torsion_panel(
            axes[0, 1], fig, half(axis1), half(axis2), fes_units - fes_units.min(), top, surface.units, labels
        )
        axes[0, 1].set_title("from the bias (sum_hills)", fontsize=9)
    for a in axes[0]:
        _pi_ticks(a)
        for boundary in boundaries:
            a.axvline(boundary, color="w", ls="--", lw=0.8, zorder=2)
    caption = f"T = {surface.temperature:g} K, {surface.phi.size} frames, ESS {surface.ess:.0f}"
    fig.suptitle(f"{title}\n{caption}" if title else caption, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def torsion_histogram_kl(reference: tuple, other: tuple, bins: int) -> float:
    """``KL(reference || other)`` in nats between weighted histograms of two torsions on ``bins x bins``
    cells of ``[-pi, pi)^2``.

    ``reference``, ``other``: ``(angle1, angle2, weights)`` with ``(T,)`` arrays (rad; weights may be
    None). A cell where ``reference`` has mass and none of the ``N`` samples of ``other`` falls gets
    half a sample's share, ``1 / (2N)`` (then ``other`` is renormalised), so the value stays finite;
    a floor at the smallest non-zero probability instead would let one negligible weight set it.
    """
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    p, q = (
        np.histogram2d(wrap_angle(a), wrap_angle(b), bins=(edges, edges), weights=w)[0].ravel()
        for a, b, w in (reference, other)
    )
    p, q = p / p.sum(), q / q.sum()
    q = np.where((p > 0) & (q == 0), 0.5 / len(other[0]), q)
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


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
            values, strictly_inside, p=np.inf, return_length=True
        )
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


# ----------------------------------------------------------------------------- particle clusters


def radii_and_distances(x: np.ndarray, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances from the origin ``(B, n)`` and pair distances ``(B, n (n - 1) / 2)`` of ``n`` particles
    in ``dim`` dimensions, from coordinates ``x (B, n * dim)``."""
    r = np.asarray(x, dtype=np.float64).reshape(len(x), n, dim)
    i, j = np.triu_indices(n, 1)
    return np.linalg.norm(r, axis=2), np.linalg.norm(r[:, i] - r[:, j], axis=2)


def lindemann_index(x: np.ndarray, n: int, dim: int, n_chains: int = 1) -> float:
    """Relative pair-distance fluctuation ``mean_{i<j} std(r_ij) / mean(r_ij)`` within each of ``n_chains``
    runs (``x (B, n * dim)``, chain after chain), averaged over them: about 0.1 or less in a cluster
    that keeps its shape and labels (a solid), large once particles swap places (a liquid). Within a
    chain, so that two chains frozen in different labellings of the same crystal do not count as melting."""
    if n < 2:
        return 0.0
    distances = radii_and_distances(x, n, dim)[1].reshape(n_chains, -1, n * (n - 1) // 2)
    return float((distances.std(axis=1) / distances.mean(axis=1)).mean())
