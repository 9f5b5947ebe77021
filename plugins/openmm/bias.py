"""Bias variables for ``openmm.app.Metadynamics`` and what their bias grid means.

- :func:`torsion_bias_variables`, :func:`learned_bias_variables`: ``BiasVariable``s on torsions, on CV
  models or on exported CV forces; :func:`clone_variable`, :func:`check_variables` (OpenMM's limits),
  :func:`variable_signature` (what a continued run must share).
- :func:`bias_grid`, :func:`grid_axes`: the bias ``V(s)`` (kJ/mol) on OpenMM's grid;
  :func:`fes_from_bias` (``F = -(gamma/(gamma-1)) V``), :func:`reweighting_constant` (Tiwary-Parrinello
  ``c(t)``) and :func:`fes_state_delta_f` (ΔF of a region of CV space).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
from scipy.special import logsumexp

from openflow.cv import CVModel
from openflow.features import Dihedrals

from .export import to_custom_cv_force, to_tabulated_cv_force

DEFAULT_TORSION_WIDTH = 0.35  # rad, Gaussian standard deviation on a torsion


# ----------------------------------------------------------------------------- bias variables


def torsion_bias_variables(
    quadruples: Sequence[Sequence[int]], width: float = DEFAULT_TORSION_WIDTH, grid: int | None = None
) -> list[app.BiasVariable]:
    """Periodic ``BiasVariable``s on torsions (1-3 atom quadruples), range ``[-pi, pi]``.

    ``width``: Gaussian standard deviation in rad; ``grid``: points per axis (OpenMM's default
    ``ceil(5 * 2 pi / width)`` when None).
    """
    quadruples = [tuple(int(i) for i in quad) for quad in quadruples]
    if not 1 <= len(quadruples) <= 3 or any(len(quad) != 4 for quad in quadruples):
        raise ValueError(f"give 1-3 torsions as atom quadruples, got {quadruples}")
    if not width > 0:
        raise ValueError(f"width must be positive (rad), got {width}")
    variables = []
    for quad in quadruples:
        force = openmm.CustomTorsionForce("theta")
        force.addTorsion(*quad, [])
        variables.append(app.BiasVariable(force, -np.pi, np.pi, float(width), True, grid))
    return variables


def learned_bias_variables(
    cvs,
    width: float | Sequence[float],
    grid: int | Sequence[int] | None = None,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> list[app.BiasVariable]:
    """Non-periodic ``BiasVariable``s from CV models or exported CV forces.

    ``cvs``: ``openflow.cv.CVModel``s (exported with ``to_tabulated_cv_force`` when the CV is a
    function of at most three dihedrals, else ``to_custom_cv_force``; range from ``cv.bounds()``)
    and/or ``openmm.Force``s (e.g. read with ``load_cv_force``; they need ``ranges``). ``width``:
    Gaussian standard deviation(s) in CV units; ``grid``: points per axis (default: OpenMM's
    ``ceil(5 * range / width)``); ``ranges``: ``(min, max)`` per CV, overriding the bounds.
    The bias is zero outside ``[min, max]``: a range narrower than the CV can reach leaves it unbiased there.
    CV models are exported without a check: for a checked force use ``export_cv(cv, frames)`` and pass the force.
    """
    cvs = list(cvs) if isinstance(cvs, (list, tuple)) else [cvs]
    if not 1 <= len(cvs) <= 3:
        raise ValueError(f"openmm.app.Metadynamics takes 1 to 3 CVs, got {len(cvs)}")
    widths = [float(width)] * len(cvs) if np.isscalar(width) else [float(w) for w in width]
    grids = [grid] * len(cvs) if grid is None or np.isscalar(grid) else list(grid)
    if len(widths) != len(cvs) or len(grids) != len(cvs) or (ranges is not None and len(ranges) != len(cvs)):
        raise ValueError("give one width, grid and range per CV")
    variables = []
    for k, cv in enumerate(cvs):
        if isinstance(cv, CVModel):
            if cv.n_out != 1:
                raise ValueError("each CV model must have one output (n_out=1)")
            blocks = list(cv.features.blocks)
            tabulable = len(blocks) == 1 and isinstance(blocks[0], Dihedrals) and blocks[0].n_tuples <= 3
            force = to_tabulated_cv_force(cv) if tabulable else to_custom_cv_force(cv)
            lo, hi = (float(v[0]) for v in cv.bounds())
        elif isinstance(cv, openmm.Force):
            if ranges is None:
                raise ValueError("an exported CV force carries no range: give ranges=[(min, max), ...]")
            force, lo, hi = cv, -np.inf, np.inf
        else:
            raise TypeError(f"a CV must be an openflow.cv.CVModel or an openmm.Force, got {type(cv).__name__}")
        if ranges is not None:
            lo, hi = (float(v) for v in ranges[k])
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"CV {k}: the range must be finite with max > min, got ({lo}, {hi})")
        if not widths[k] > 0:
            raise ValueError(f"CV {k}: width must be positive, got {widths[k]}")
        variables.append(app.BiasVariable(force, lo, hi, widths[k], False, grids[k]))
    return variables


def clone_variable(v: app.BiasVariable) -> app.BiasVariable:
    """A BiasVariable on a copy of its force (a force can serve only one Metadynamics object)."""
    return app.BiasVariable(
        openmm.XmlSerializer.clone(v.force), v.minValue, v.maxValue, v.biasWidth, v.periodic, v.gridWidth
    )


def check_variables(variables) -> None:
    """The limits of ``openmm.app.Metadynamics``: 1-3 BiasVariables, all periodic or none, a grid small
    enough to update at every deposit."""
    if not 1 <= len(variables) <= 3:
        raise ValueError(f"openmm.app.Metadynamics takes 1 to 3 CVs, got {len(variables)}")
    if not all(isinstance(v, app.BiasVariable) for v in variables):
        raise TypeError("variables must be openmm.app.BiasVariable objects")
    if len({v.periodic for v in variables}) > 1:
        raise ValueError("openmm.app.Metadynamics needs all CVs periodic or none")
    points = int(np.prod([v.gridWidth for v in variables]))
    if points > 4 * 10**5:
        raise ValueError(
            f"the bias grid has {points} points: too slow to update (use wider Gaussians or fewer grid points)"
        )


def variable_signature(variables) -> list[dict]:
    """What must match for a run to continue another: the CV force itself (a hash of its OpenMM XML),
    its range, width, periodicity and grid, for each CV."""
    return [
        dict(
            force=hashlib.sha256(openmm.XmlSerializer.serialize(v.force).encode()).hexdigest()[:16],
            min=float(v.minValue),
            max=float(v.maxValue),
            width=float(v.biasWidth),
            periodic=bool(v.periodic),
            grid=int(v.gridWidth),
        )
        for v in variables
    ]


# ----------------------------------------------------------------------------- bias and FES


def grid_axes(variables) -> list[np.ndarray]:
    """Grid point coordinates of each CV, ``linspace(min, max, gridWidth)`` (what OpenMM's tables use)."""
    return [np.linspace(v.minValue, v.maxValue, v.gridWidth) for v in variables]


def bias_grid(meta: app.Metadynamics) -> np.ndarray:
    """The current bias ``V`` (kJ/mol) indexed ``[s1, s2, ...]`` (OpenMM stores it reversed)."""
    gamma = meta.biasFactor
    free_energy = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    return np.ascontiguousarray(-free_energy * (gamma - 1.0) / gamma).transpose()


def fes_from_bias(bias: np.ndarray, bias_factor: float) -> np.ndarray:
    """sum_hills-like free energy of well-tempered metadynamics: ``F = -(gamma/(gamma-1)) V``, min 0."""
    if not bias_factor > 1:
        raise ValueError(f"bias_factor must be > 1, got {bias_factor}")
    free_energy = -(bias_factor / (bias_factor - 1.0)) * np.asarray(bias, dtype=np.float64)
    return free_energy - free_energy.min()


def reweighting_constant(bias: np.ndarray, bias_factor: float, kT: float, periodic: bool) -> float:
    """Tiwary-Parrinello ``c(t)`` in kJ/mol from a bias grid ``V`` (kJ/mol) on uniform CV grids.

    Periodic grids repeat their first point at the end: that point is counted once.
    """
    v = np.asarray(bias, dtype=np.float64)
    if periodic:
        v = v[tuple(slice(0, -1) for _ in range(v.ndim))]
    gamma = float(bias_factor)
    beta_v = v.reshape(-1) / kT
    return float(kT * (logsumexp(gamma / (gamma - 1.0) * beta_v) - logsumexp(beta_v / (gamma - 1.0))))


def fes_state_delta_f(free_energy: np.ndarray, in_state: np.ndarray, kT: float, periodic: bool) -> float:
    """ΔF (kT) of a state against the rest, ``-ln [P(state) / P(rest)]``, from a free energy ``F``
    (kJ/mol) on a CV grid: integrates ``exp(-F/kT)`` over the grid points where ``in_state`` (a bool
    array of ``F``'s shape, or of its first axis) is true and over the others. Periodic grids repeat
    their first point at the end: it is counted once."""
    f = np.asarray(free_energy, dtype=np.float64)
    mask = np.asarray(in_state, dtype=bool)
    if mask.ndim == 1 and f.ndim > 1:
        mask = np.broadcast_to(mask.reshape(-1, *[1] * (f.ndim - 1)), f.shape)
    if mask.shape != f.shape:
        raise ValueError(f"in_state has shape {mask.shape}, the free energy {f.shape}")
    if periodic:
        inner = tuple(slice(0, -1) for _ in range(f.ndim))
        f, mask = f[inner], mask[inner]
    log_p = -f / kT
    return float(logsumexp(log_p[~mask]) - logsumexp(log_p[mask]))
