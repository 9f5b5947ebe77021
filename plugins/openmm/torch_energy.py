"""Batched potential energies of an OpenMM ``System`` in torch.

``TorchEnergy(system)(x)`` maps active coordinates ``x`` ``(B, d)`` nm to reduced energies
``u = E / kT`` ``(B,)``, vectorised over the batch and over the terms of every force, and
differentiable by autograd (forces ``= -du/dx``), on CPU and CUDA, in float32 or float64. Every
number comes from the ``openmm.System`` itself; only the force groups in
``System.energy_groups()`` count. Translated forces:

- ``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce``;
- ``NonbondedForce`` with ``NoCutoff``: Coulomb + Lennard-Jones (Lorentz-Berthelot), exceptions
  with their own ``chargeProd``/``sigma``/``epsilon``, excluded pairs left out;
- ``GBSAOBCForce`` (OBC2 as in OpenMM's ``ReferenceObc.cpp``, ACE surface term included);
- ``CustomBondForce``, ``CustomAngleForce``, ``CustomTorsionForce``, ``CustomExternalForce``,
  ``CustomCompoundBondForce``, ``CustomNonbondedForce`` (``NoCutoff``) and ``CustomGBForce``
  (``NoCutoff``, e.g. ``openmm.app``'s ``implicit/obc2.xml``): their Lepton expressions are parsed
  by ``lepton`` (same grammar and precedence as Lepton, ``;`` definitions included) and evaluated
  in torch with the global and per-term parameters substituted;
- ``CMMotionRemover`` and ``AndersenThermostat`` contribute no energy.

On a CPU every force runs as a compiled kernel of ``cpu_kernels`` (numba;
``TorchEnergy(cpu_kernels=False)`` keeps torch ops): the five standard forces written out per
configuration, the custom ones (``CustomGBForce`` included) generated from their expressions with
symbolic derivatives in the Cartesian coordinates; both checked against the torch terms to rounding.

Anything else (cutoffs, periodic boxes, tabulated functions, virtual sites, other force types)
raises ``NotImplementedError`` naming the force; ``batched_energy(system)`` then warns loudly and
falls back to the per-configuration OpenMM bridge. Non-finite energies (overlapping atoms, NaN
input) become ``u = +inf`` with zero gradient and are counted, exactly as in ``OpenMMEnergy``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import re
import time
import warnings

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from openflow.heap import keep_freed_memory
from openflow.systems import System

from . import cpu_kernels
from .bridge import EvaluationCounts, OpenMMEnergy
from .lepton import GEOMETRY_NODES, LeptonExpression, coordinate, coordinate_leaves, derivative, geometry_calls, in_coordinates

# 1/(4 pi eps0) in kJ/mol nm/e^2, the value OpenMM >= 8 uses (CODATA 2018 constants); older
# OpenMM used 138.935456 (relative difference 1e-8). The OpenMM app's CustomGBForce expressions
# carry their own literal (138.935485), which the expression translator reads as written.
ONE_4PI_EPS0 = 138.93545764438198
OBC2_ALPHA, OBC2_BETA, OBC2_GAMMA = 1.0, 0.8, 4.85
OBC_DIELECTRIC_OFFSET = 0.009  # nm
OBC_PROBE_RADIUS = 0.14  # nm
NO_ENERGY_FORCES = (openmm.CMMotionRemover, openmm.AndersenThermostat)
NONFINITE_WARNING = (
    "TorchEnergy gave non-finite energies or forces for some configurations; they are set to "
    "u = +inf with zero gradient (counts in TorchEnergy.stats())"
)


class TorchEnergyFallbackWarning(UserWarning):
    """``batched_energy(energy="auto")`` could not translate a force and uses the slow OpenMM bridge."""


# ===================================================================================================
# Geometry. Internally positions are laid out (3, N, B): the batch is the contiguous innermost
# dimension, so gathers copy whole rows, every elementwise op runs over long vectors and a
# component is a contiguous (N, B) block. Per-term quantities are (M, B), parameters (M, 1).
# ===================================================================================================
def _gather(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``positions[:, index]`` ``(3, M, B)`` of positions ``(3, N, B)``, with an index_add backward."""
    return positions.index_select(1, index)


def _scatter(gradient: torch.Tensor | None, index: torch.Tensor, values: torch.Tensor, sign: float = 1.0) -> None:
    """``gradient[:, index] += sign * values`` in place (repeated indices add up, no temporary for
    the sign); no-op without ``gradient``."""
    if gradient is not None:
        gradient.index_add_(1, index, values, alpha=sign)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(3, M, B), (3, M, B) -> (M, B)``."""
    return (a * b).sum(0)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(3, M, B), (3, M, B) -> (3, M, B)``, written out (``linalg.cross`` is slow off the last dim)."""
    (a0, a1, a2), (b0, b1, b2) = a, b
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


def _distance(positions, i, j, with_gradient: bool = False):
    """``r = |p_j - p_i|`` ``(M, B)``; with_gradient: ``(r, [dr/dp_i, dr/dp_j])``, each ``(3, M, B)``."""
    delta = _gather(positions, j) - _gather(positions, i)
    r = _dot(delta, delta).sqrt()
    if not with_gradient:
        return r
    unit_vector = delta / r
    return r, [-unit_vector, unit_vector]


def _angle(positions, i, j, k, with_gradient: bool = False):
    """Angle i-j-k in radians ``(M, B)`` (atan2 form: stable near 0 and pi); with_gradient:
    ``(theta, [dtheta/dp_i, dtheta/dp_j, dtheta/dp_k])``."""
    pj = _gather(positions, j)
    a, b = _gather(positions, i) - pj, _gather(positions, k) - pj
    normal = _cross(a, b)
    sine = _dot(normal, normal).sqrt()
    theta = torch.atan2(sine, _dot(a, b))
    if not with_gradient:
        return theta
    grad_i = _cross(a, normal) / (_dot(a, a) * sine)  # (a (a.b) - b |a|^2) / (|a|^2 |a x b|)
    grad_k = _cross(normal, b) / (_dot(b, b) * sine)
    return theta, [grad_i, -(grad_i + grad_k), grad_k]


def _dihedral(positions, i, j, k, l, with_gradient: bool = False):
    """IUPAC dihedral i-j-k-l in radians, in ``(-pi, pi]`` ``(M, B)`` (OpenMM's convention);
    with_gradient: ``(phi, [dphi/dp_i, dphi/dp_j, dphi/dp_k, dphi/dp_l])`` (Blondel-Karplus)."""
    pj, pk = _gather(positions, j), _gather(positions, k)
    b1, b2, b3 = pj - _gather(positions, i), pk - pj, _gather(positions, l) - pk
    n1, n2 = _cross(b1, b2), _cross(b2, b3)
    b2_squared = _dot(b2, b2)
    b2_length = b2_squared.sqrt()
    phi = torch.atan2(b2_length * _dot(b1, n2), _dot(n1, n2))
    if not with_gradient:
        return phi
    grad_i = n1 * (-b2_length / _dot(n1, n1))
    grad_l = n2 * (b2_length / _dot(n2, n2))
    f1, f3 = _dot(b1, b2) / b2_squared, _dot(b3, b2) / b2_squared
    return phi, [grad_i, f3 * grad_l - (1.0 + f1) * grad_i, f1 * grad_i - (1.0 + f3) * grad_l, grad_l]


_GEOMETRY = {"distance": _distance, "angle": _angle, "dihedral": _dihedral}


def _long(values, width: int) -> torch.Tensor:
    """Particle indices as an ``(M, width)`` int64 tensor (``M`` may be 0)."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1, width))


def _column(values) -> torch.Tensor:
    """Per-term parameters as an ``(M, 1)`` float64 column (broadcasts against ``(M, B)``)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1, 1))


def _kernel_arrays(*arrays) -> tuple:
    """Contiguous numpy copies for a CPU kernel: integers as int64, the rest float64; torch
    columns ``(M, 1)`` (per-term parameters) become ``(M,)``."""
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.numpy().reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a.numpy()
        out.append(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float64))
    return tuple(out)


def _sum_terms(value, positions: torch.Tensor, n_terms: int) -> torch.Tensor:
    """Sum per-term energies (anything broadcastable to ``(M, B)``) over the terms: ``(B,)``."""
    if not isinstance(value, torch.Tensor):
        value = positions.new_tensor(value)
    return value.expand(n_terms, positions.shape[-1]).sum(0)


# ===================================================================================================
# Standard forces: each module maps positions (3, N, B) nm to energies (B,) kJ/mol
# ===================================================================================================
class _Term(nn.Module):
    """A force's energy ``(3, N, B) nm -> (B,) kJ/mol``. ``forward`` is differentiable by autograd;
    ``energy_gradient(positions, gradient)`` returns the same energies and adds ``dE/dpositions``
    into ``gradient`` ``(3, N, B)`` in place, analytically where the subclass writes it out
    (``gradient=None``: energies only); this default uses autograd on ``forward``.
    ``cpu_kernel()`` gives the compiled CPU kernel of the same energy, if the force has one."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.energy_gradient(positions, None)

    def cpu_kernel(self) -> tuple | None:
        """``(kernel, parameters)`` for ``cpu_kernels.evaluate`` (float64 parameters), or ``None``."""
        return None

    def energy_gradient(self, positions: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        if gradient is None:
            return self.forward(positions)
        with torch.enable_grad():
            positions = positions.detach().requires_grad_(True)
            energy = self.forward(positions)
            if energy.requires_grad:
                gradient += torch.autograd.grad(energy.sum(), positions)[0]
        return energy.detach()


class HarmonicBonds(_Term):
    """``sum k/2 (r - r0)^2`` over bonds ``(M, 2)``."""

    def __init__(self, pairs, length, k):
        super().__init__()
        self.register_buffer("pairs", _long(pairs, 2))
        self.register_buffer("length", _column(length))
        self.register_buffer("half_k", 0.5 * _column(k))
        self._kernel_parameters = _kernel_arrays(self.pairs, self.length, self.half_k)

    def cpu_kernel(self):
        return cpu_kernels.harmonic_bonds, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = _gather(positions, j) - _gather(positions, i)
        r = _dot(delta, delta).sqrt()
        stretch = r - self.length
        if gradient is not None:
            values = delta * (2.0 * self.half_k * stretch / r)
            _scatter(gradient, j, values)
            _scatter(gradient, i, values, sign=-1.0)
        return (self.half_k * stretch.square()).sum(0)


class HarmonicAngles(_Term):
    """``sum k/2 (theta - theta0)^2`` over angles ``(M, 3)``."""

    def __init__(self, triples, angle, k):
        super().__init__()
        self.register_buffer("triples", _long(triples, 3))
        self.register_buffer("angle", _column(angle))
        self.register_buffer("half_k", 0.5 * _column(k))
        self._kernel_parameters = _kernel_arrays(self.triples, self.angle, self.half_k)

    def cpu_kernel(self):
        return cpu_kernels.harmonic_angles, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        if gradient is None:
            return (self.half_k * (_angle(positions, *self.triples.T) - self.angle).square()).sum(0)
        theta, grads = _angle(positions, *self.triples.T, with_gradient=True)
        bend = theta - self.angle
        _scatter_chain(gradient, self.triples.T, grads, 2.0 * self.half_k * bend)
        return (self.half_k * bend.square()).sum(0)


class PeriodicTorsions(_Term):
    """``sum k (1 + cos(n phi - phi0))`` over torsions ``(M, 4)``; each distinct dihedral (several
    periodicities often share one) is computed once."""

    def __init__(self, quadruples, periodicity, phase, k):
        super().__init__()
        unique, which = np.unique(np.asarray(quadruples, dtype=np.int64).reshape(-1, 4), axis=0, return_inverse=True)
        self.register_buffer("quadruples", _long(unique, 4))
        self.register_buffer("which", torch.as_tensor(which.reshape(-1)))
        self.register_buffer("periodicity", _column(periodicity))
        self.register_buffer("phase", _column(phase))
        self.register_buffer("k", _column(k))
        periodicity = np.rint(np.asarray(periodicity, dtype=np.float64).reshape(-1)).astype(np.int64)
        order = np.lexsort((periodicity, which.reshape(-1)))  # terms grouped by dihedral, by periodicity within
        offsets = np.concatenate([[0], np.cumsum(np.bincount(which.reshape(-1), minlength=len(unique)))])
        phase, periodicity = np.asarray(phase, dtype=np.float64).reshape(-1)[order], periodicity[order]
        k = np.asarray(k, dtype=np.float64).reshape(-1)[order]
        self._kernel_parameters = _kernel_arrays(self.quadruples, offsets, periodicity, np.cos(phase), np.sin(phase), k)

    def cpu_kernel(self):
        return cpu_kernels.periodic_torsions, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        if gradient is None:
            phi = _dihedral(positions, *self.quadruples.T).index_select(0, self.which)
            return (self.k * (1.0 + torch.cos(self.periodicity * phi - self.phase))).sum(0)
        phi, grads = _dihedral(positions, *self.quadruples.T, with_gradient=True)
        angle = self.periodicity * phi.index_select(0, self.which) - self.phase
        slope = (-self.k * self.periodicity) * torch.sin(angle)
        slope = phi.new_zeros(phi.shape).index_add_(0, self.which, slope)  # dE/dphi per distinct dihedral
        _scatter_chain(gradient, self.quadruples.T, grads, slope)
        return (self.k * (1.0 + torch.cos(angle))).sum(0)


def _scatter_chain(gradient, columns, grads, slope) -> None:
    """``gradient[:, columns[a]] += slope * grads[a]`` for each particle ``a`` of the terms."""
    for index, grad in zip(columns, grads):
        _scatter(gradient, index, grad * slope)


class CoulombLennardJones(_Term):
    """``sum c/r + 4 eps ((sigma/r)^12 - (sigma/r)^6)`` over pairs ``(P, 2)``; ``c`` in kJ/mol nm."""

    def __init__(self, pairs, coulomb, sigma, epsilon):
        super().__init__()
        self.register_buffer("pairs", _long(pairs, 2))
        self.register_buffer("coulomb", _column(coulomb))
        self.register_buffer("sigma_squared", _column(sigma) ** 2)
        self.register_buffer("four_epsilon", 4.0 * _column(epsilon))
        self._kernel_parameters = _kernel_arrays(self.pairs, self.coulomb, self.sigma_squared, self.four_epsilon)

    def cpu_kernel(self):
        return cpu_kernels.coulomb_lennard_jones, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = _gather(positions, j) - _gather(positions, i)
        inverse_r2 = 1.0 / _dot(delta, delta)
        coulomb = self.coulomb * inverse_r2.sqrt()
        s6 = (self.sigma_squared * inverse_r2) ** 3
        lennard_jones = self.four_epsilon * s6 * (s6 - 1.0)
        if gradient is not None:
            # dE/dr / r = -(c/r + 4 eps (12 s^12 - 6 s^6)) / r^2
            values = delta * (-(coulomb + lennard_jones + self.four_epsilon * s6 * (11.0 * s6 - 5.0)) * inverse_r2)
            _scatter(gradient, j, values)
            _scatter(gradient, i, values, sign=-1.0)
        return (coulomb + lennard_jones).sum(0)


class OBC2(_Term):
    """OpenMM's ``GBSAOBCForce`` (OBC type II), as in ``ReferenceObc.cpp``, for ``NoCutoff``.

    Born radii from the HCT pair integrals (with Tinker's correction for an atom engulfed by
    another) rescaled by ``tanh(a psi - b psi^2 + c psi^3)``; the ACE surface term
    ``4 pi gamma_SA (R + 0.14)^2 (R/B)^6``; the polarisation energy
    ``-138.9 (1/eps_in - 1/eps_out) sum_{i<=j} q_i q_j / f_ij`` (``1/2`` on the diagonal),
    ``f_ij = sqrt(r^2 + B_i B_j exp(-r^2 / 4 B_i B_j))``.
    """

    def __init__(self, charge, radius, scale, solute_dielectric, solvent_dielectric, surface_area_energy):
        super().__init__()
        n = len(charge)
        i, j = np.triu_indices(n, k=1)
        self.n_atoms = n
        self.register_buffer("pairs", _long(np.stack([i, j], 1), 2))
        ordered_first, ordered_second = np.concatenate([i, j]), np.concatenate([j, i])  # (i, j) and (j, i)
        self.register_buffer("ordered_first", torch.as_tensor(ordered_first))
        radius = np.asarray(radius, dtype=np.float64)
        offset_radius = radius - OBC_DIELECTRIC_OFFSET
        scaled_radius = offset_radius * np.asarray(scale, dtype=np.float64)
        charge = np.asarray(charge, dtype=np.float64)
        self.register_buffer("radius", _column(radius))
        self.register_buffer("offset_radius", _column(offset_radius))
        rho_i, s_j = offset_radius[ordered_first], scaled_radius[ordered_second]
        self.register_buffer("rho_i", _column(rho_i))
        self.register_buffer("s_j", _column(s_j))
        self.register_buffer("s_j_squared", _column(s_j**2))
        self.register_buffer("engulfed_below", _column(s_j - rho_i))  # i inside j's sphere if r < s_j - rho_i
        self.register_buffer("two_over_rho_i", _column(2.0 / rho_i))
        self.register_buffer("charge_products", _column(charge[i] * charge[j]))
        self.register_buffer("half_charge_squared", _column(0.5 * charge**2))
        self.register_buffer("surface", _column(4.0 * math.pi * surface_area_energy * (radius + OBC_PROBE_RADIUS) ** 2))
        both_nonzero = solute_dielectric != 0 and solvent_dielectric != 0
        self.prefactor = -ONE_4PI_EPS0 * (1.0 / solute_dielectric - 1.0 / solvent_dielectric) if both_nonzero else 0.0
        rho, s = np.stack([offset_radius[i], offset_radius[j]]), np.stack([scaled_radius[j], scaled_radius[i]])  # (2, P)
        self._kernel_parameters = _kernel_arrays(
            self.pairs, rho, s, s**2, s - rho, 2.0 / rho, self.charge_products, self.half_charge_squared,
            self.surface, self.radius, self.offset_radius,
        ) + (float(self.prefactor), OBC2_ALPHA, OBC2_BETA, OBC2_GAMMA)

    def cpu_kernel(self):
        return cpu_kernels.obc2, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = _gather(positions, j) - _gather(positions, i)
        r2 = _dot(delta, delta)
        r = torch.cat([r2, r2]).sqrt()  # ordered pairs (i, j) and (j, i): (2P, B)
        # Born radii: HCT pair integrals, Tinker's engulfed-atom correction, OBC2 rescaling
        upper = r + self.s_j
        below = r - self.s_j
        lower = torch.maximum(self.rho_i, below.abs())
        l, u, r_inv = 1.0 / lower, 1.0 / upper, 1.0 / r
        log_ratio = torch.log(lower / upper)
        # l - u + r/4 (u^2 - l^2) + log(u/l) / 2r + s_j^2/4r (l^2 - u^2), factorised
        term = (l - u) * (1.0 - 0.25 * (l + u) * (r - self.s_j_squared * r_inv)) + 0.5 * r_inv * log_ratio
        engulfed = r < self.engulfed_below
        outside = r > -self.engulfed_below  # rho_i < r + s_j
        term = torch.where(outside, term + torch.where(engulfed, self.two_over_rho_i - 2.0 * l, 0.0), 0.0)
        total = r.new_zeros(self.n_atoms, r.shape[1]).index_add_(0, self.ordered_first, term)
        psi = 0.5 * self.offset_radius * total
        tanh_sum = torch.tanh(psi * (OBC2_ALPHA - psi * (OBC2_BETA - OBC2_GAMMA * psi)))
        born = 1.0 / (1.0 / self.offset_radius - tanh_sum / self.radius)
        # energy: ACE surface term, pair and self polarisation
        surface = torch.where(born > 0, self.surface * (self.radius / born) ** 6, 0.0)
        born_products = born.index_select(0, i) * born.index_select(0, j)
        screening = torch.exp(-0.25 * r2 / born_products)
        f_inv = torch.rsqrt(r2 + born_products * screening)
        pair = self.charge_products * f_inv
        self_polar = self.half_charge_squared / born
        energy = surface.sum(0) + self.prefactor * (pair.sum(0) + self_polar.sum(0))
        if gradient is None:
            return energy
        # dE/d(born product) of each pair, then dE/d(born radius)
        pair_f2 = (-0.5 * self.prefactor) * pair * f_inv.square()  # dE/d(f^2)
        d_product = pair_f2 * screening * (1.0 + 0.25 * r2 / born_products)
        d_born = (-6.0 * surface - self.prefactor * self_polar) / born
        d_born = d_born.index_add_(0, i, d_product * born.index_select(0, j)).index_add_(0, j, d_product * born.index_select(0, i))
        # dE/d(total integral of atom i), then through each ordered pair's integral to r
        d_psi = d_born * born.square() / self.radius * (1.0 - tanh_sum.square()) * (OBC2_ALPHA - psi * (2.0 * OBC2_BETA - 3.0 * OBC2_GAMMA * psi))
        d_total = (0.5 * self.offset_radius) * d_psi
        # d/dr of the unfactorised integral; d lower/dr = sign(r - s_j) where |r - s_j| > rho_i, else 0
        dl = torch.where(below.abs() > self.rho_i, -l.square() * below.sign(), 0.0)
        du = -u.square()
        u2_l2 = u.square() - l.square()
        d_term = (
            dl - du + 0.25 * u2_l2 + 0.5 * r * (u * du - l * dl)
            - 0.5 * r_inv * (u + dl / l + r_inv * log_ratio)
            + 0.25 * self.s_j_squared * r_inv * (r_inv * u2_l2 + 2.0 * (l * dl - u * du))
        )
        d_term = torch.where(outside, d_term - torch.where(engulfed, 2.0 * dl, 0.0), 0.0)
        d_r = d_total.index_select(0, self.ordered_first) * d_term * r_inv  # dE/dr / r, ordered pairs
        n_pairs = len(self.pairs)
        coefficient = d_r[:n_pairs] + d_r[n_pairs:] + 2.0 * pair_f2 * (1.0 - 0.25 * screening)
        values = delta * coefficient
        _scatter(gradient, j, values)
        _scatter(gradient, i, values, sign=-1.0)
        return energy


# ===================================================================================================
# Custom forces
# ===================================================================================================
def _globals(force) -> dict:
    return {force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k) for k in range(force.getNumGlobalParameters())}


def _check_expression(force, text: str, allowed: set) -> LeptonExpression:
    """Parse ``text`` for ``force``; unknown variables or functions -> ``NotImplementedError``."""
    name = type(force).__name__
    try:
        expression = LeptonExpression(text)
    except (ValueError, NotImplementedError) as error:
        raise NotImplementedError(f"{name}: {error}") from None
    unknown = expression.variables - allowed
    if unknown:
        raise NotImplementedError(f"{name}: expression {text!r} uses unknown name(s) {sorted(unknown)}")
    return expression


class CustomBonded(_Term):
    """Any per-term custom force: external (``x, y, z``), bond (``r``), angle/torsion (``theta``),
    compound bond (``x1, y1, ..., distance(p1,p2), angle(...), dihedral(...)``).

    Args:
        kind: ``"external"``, ``"bond"``, ``"angle"``, ``"torsion"`` or ``"compound"``.
        particles: ``(M, n_particles)`` particle indices of each term.
        parameters: ``(M, p)`` per-term parameters named ``names``; ``constants``: globals.
    """

    GEOMETRIC = {"external": {"x", "y", "z"}, "bond": {"r"}, "angle": {"theta"}, "torsion": {"theta"}}
    MEASURED = {"bond": ("r", "distance"), "angle": ("theta", "angle"), "torsion": ("theta", "dihedral")}  # variable, geometry

    def __init__(self, kind: str, expression: LeptonExpression, particles, n_particles: int, parameters, names, constants: dict):
        super().__init__()
        self.kind, self.expression, self.names, self.constants = kind, expression, list(names), dict(constants)
        self.register_buffer("particles", _long(particles, n_particles))
        parameters = np.asarray(parameters, dtype=np.float64).reshape(len(particles), len(self.names))
        self.register_buffer("values_per_term", torch.as_tensor(parameters))
        targets = [("variable", name) for name in sorted(expression.variables - set(self.names) - set(self.constants))]
        self.slopes = _slopes(expression, targets + sorted(geometry_calls(expression.root)))
        if kind in self.MEASURED:
            variable, function = self.MEASURED[kind]
            geometric = {("variable", variable): GEOMETRY_NODES[function](*range(n_particles))}
        else:  # coordinates: x, y, z (external) or x1, y2, ... (compound)
            geometric = {target: coordinate(*_coordinate(target[1])) for target in targets if _coordinate(target[1])}
        geometric.update({call: GEOMETRY_NODES[call[1]](*(n - 1 for n in call[2])) for call in geometry_calls(expression.root)})
        self._kernel_spec = _expression_kernel(expression, geometric, self.particles, parameters, self.names, self.constants)

    def cpu_kernel(self):
        return _spec_kernel(self._kernel_spec)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        variables, geometry, _ = self._variables(positions, with_gradient=False)
        return _sum_terms(self.expression(variables, geometry), positions, len(self.particles))

    def energy_gradient(self, positions, gradient):
        if gradient is None or self.slopes is None:
            return super().energy_gradient(positions, gradient)
        variables, geometry, chains = self._variables(positions, with_gradient=True)
        energy, *slopes = self.expression.evaluate([self.expression.root, *(node for _, node in self.slopes)], variables, geometry)
        shape = (len(self.particles), positions.shape[-1])
        for (target, _), slope in zip(self.slopes, slopes):
            slope = slope.expand(shape) if isinstance(slope, torch.Tensor) else positions.new_full(shape, slope)
            if target in chains:  # a distance, angle or dihedral
                _scatter_chain(gradient, *chains[target][:2], slope)
            else:  # a coordinate x, y, z or x1, y2, ...
                axis, particle = _coordinate(target[1])
                gradient[axis].index_add_(0, self.particles[:, particle], slope)
        return _sum_terms(energy, positions, len(self.particles))

    def _variables(self, positions, with_gradient: bool) -> tuple[dict, object, dict]:
        """``(variables, geometry function, chains)``; with_gradient, ``chains`` collects each geometric
        target measured (now or later, through the geometry function): its particle columns, gradients, value."""
        variables = dict(self.constants)
        variables.update({name: self.values_per_term[:, c, None] for c, name in enumerate(self.names)})
        columns = self.particles.T
        used, chains = self.expression.variables, {}

        def measure(function: str, particles: tuple, target: tuple):
            indices = [columns[n - 1] for n in particles]
            if not with_gradient:
                return _GEOMETRY[function](positions, *indices)
            if target not in chains:
                value, grads = _GEOMETRY[function](positions, *indices, with_gradient=True)
                chains[target] = (indices, grads, value)
            return chains[target][2]

        if self.kind in ("external", "compound"):
            for name in used:
                if name not in variables and _coordinate(name) is not None:
                    axis, particle = _coordinate(name)
                    variables[name] = positions[axis].index_select(0, columns[particle])
        elif self.MEASURED[self.kind][0] in used:
            variable, function = self.MEASURED[self.kind]
            variables[variable] = measure(function, tuple(range(1, len(columns) + 1)), ("variable", variable))
        geometry = lambda function, numbers: measure(function, numbers, ("call", function, numbers))  # noqa: E731
        return variables, geometry, chains


def _expression_kernel(expression: LeptonExpression, geometric: dict, particles, values, names: list, constants: dict) -> tuple:
    """``(kernel inputs, kernel parameters)`` for ``cpu_kernels.expression_kernel`` of ``expression``
    summed over terms of ``particles`` ``(M, k)`` with parameters ``values`` ``(M, len(names))`` and
    global ``constants``; ``geometric`` maps its geometric variables and calls to coordinate trees
    (the kernel differentiates with respect to the coordinates)."""
    root = in_coordinates(expression.root, geometric)
    slopes = [(leaf[1], leaf[2], derivative(root, leaf)) for leaf in sorted(coordinate_leaves(root))]
    columns = sorted(expression.variables & (set(names) | set(constants)))
    table = np.empty((len(particles), len(columns)))
    for c, name in enumerate(columns):
        table[:, c] = values[:, names.index(name)] if name in names else constants[name]
    particles = np.ascontiguousarray(particles, dtype=np.int64)
    return (root, [s for s in slopes if s[2] is not None], particles.shape[1], columns), (particles, table)


def _spec_kernel(spec: tuple) -> tuple:
    """``cpu_kernel()`` of a custom term from its ``_expression_kernel`` spec."""
    return cpu_kernels.expression_kernel(*spec[0]), spec[1]


def _coordinate(name: str) -> tuple[int, int] | None:
    """``"x"`` -> ``(0, 0)``, ``"y3"`` -> ``(1, 2)``: (axis, particle column) of a coordinate variable."""
    match = re.fullmatch(r"([xyz])(\d*)", name)
    return None if match is None else ("xyz".index(match[1]), int(match[2] or 1) - 1)


def _slopes(expression: LeptonExpression, targets: list) -> list | None:
    """``[(target, derivative node)]`` of the targets the expression depends on; ``None`` (autograd
    instead) where a function has no symbolic derivative."""
    try:
        pairs = [(target, expression.derivative(target)) for target in targets]
    except NotImplementedError:
        return None
    return [(target, node) for target, node in pairs if node is not None]


def _custom_bonded(force, kind: str, terms: list, n_particles: int, names: list) -> CustomBonded:
    """Build ``CustomBonded`` from ``terms`` = [(particle indices, parameters)] read off ``force``."""
    constants = _globals(force)
    geometric = CustomBonded.GEOMETRIC.get(kind) or {f"{a}{p}" for a in "xyz" for p in range(1, n_particles + 1)}
    expression = _check_expression(force, force.getEnergyFunction(), geometric | set(names) | set(constants))
    if expression.particles and (kind != "compound" or max(expression.particles) > n_particles):
        raise NotImplementedError(f"{type(force).__name__}: geometry functions need particles p1..p{n_particles} of a compound bond")
    particles = [list(p) for p, _ in terms]
    parameters = [list(q) for _, q in terms]
    return CustomBonded(kind, expression, particles, n_particles, parameters, names, constants)


class CustomNonbonded(_Term):
    """``CustomNonbondedForce`` with ``NoCutoff``: the expression over all non-excluded pairs,
    per-particle parameters with suffixes 1 and 2."""

    def __init__(self, expression: LeptonExpression, pairs, parameters, names, constants: dict):
        super().__init__()
        self.expression, self.names, self.constants = expression, list(names), dict(constants)
        self.register_buffer("pairs", _long(pairs, 2))
        self.register_buffer("values_per_term", torch.as_tensor(np.asarray(parameters, dtype=np.float64)))
        i, j = self.pairs.numpy().T
        per_pair = np.concatenate([self.values_per_term.numpy()[i], self.values_per_term.numpy()[j]], 1)
        suffixed = [name + "1" for name in self.names] + [name + "2" for name in self.names]
        geometric = {("variable", "r"): GEOMETRY_NODES["distance"](0, 1)}
        self._kernel_spec = _expression_kernel(expression, geometric, self.pairs, per_pair, suffixed, self.constants)

    def cpu_kernel(self):
        return _spec_kernel(self._kernel_spec)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        i, j = self.pairs.T
        variables = dict(self.constants)
        for c, name in enumerate(self.names):
            variables[name + "1"], variables[name + "2"] = self.values_per_term[i, c, None], self.values_per_term[j, c, None]
        if "r" in self.expression.variables:
            variables["r"] = _distance(positions, i, j)
        return _sum_terms(self.expression(variables), positions, len(self.pairs))


class CustomGB(_Term):
    """``CustomGBForce`` with ``NoCutoff``: computed values and energy terms, in order.

    Per-particle values are ``(N, B)``; a pair value of particle ``i`` sums its expression over
    every ``j != i`` (excluded pairs left out unless ``NoExclusions``); pair energy terms sum over
    ``i < j``.
    """

    def __init__(self, n_atoms, parameters, names, constants, values, energies, exclusions):
        super().__init__()
        self.n_atoms, self.names, self.constants = n_atoms, list(names), dict(constants)
        self.values = values  # [(name, LeptonExpression, type)]
        self.energies = energies  # [(LeptonExpression, type)]
        self.register_buffer("values_per_term", torch.as_tensor(np.asarray(parameters, dtype=np.float64).reshape(n_atoms, len(self.names))))
        i, j = np.triu_indices(n_atoms, k=1)
        excluded = np.zeros((n_atoms, n_atoms), dtype=bool)
        for a, b in exclusions:
            excluded[a, b] = excluded[b, a] = True
        kept = ~excluded[i, j]
        for suffix, (a, b) in {"all": (i, j), "kept": (i[kept], j[kept])}.items():
            self.register_buffer(f"pairs_{suffix}", _long(np.stack([a, b], 1), 2))
        value_names = [name for name, _, _ in values]
        self._kernel_spec = (
            tuple(self._kernel_tree(expression, kind, value_names[:k]) for k, (_, expression, kind) in enumerate(values)),
            tuple(self._kernel_tree(expression, kind, value_names) for expression, kind in energies),
        )
        self._kernel_parameters = (*_kernel_arrays(self.pairs_kept, self.pairs_all), self.values_per_term.numpy().copy(),
                                   np.array(list(self.constants.values()), dtype=np.float64))

    KINDS = {openmm.CustomGBForce.SingleParticle: "single", openmm.CustomGBForce.ParticlePair: "pair",
             openmm.CustomGBForce.ParticlePairNoExclusions: "pair_all"}

    def _kernel_tree(self, expression: LeptonExpression, kind: int, known: list) -> tuple:
        """``(kind, tree in coordinates, roles)`` of one expression for ``cpu_kernels.gb_kernel``; names
        resolve as in ``_pair_variables``/``_single_variables`` (computed values ``known`` so far)."""
        def role(name: str, side: int):
            if name in known:
                return ("value", known.index(name), side)
            return ("param", self.names.index(name), side) if name in self.names else None

        if kind == openmm.CustomGBForce.SingleParticle:
            geometric = {("variable", axis): coordinate(k, 0) for k, axis in enumerate("xyz")}
            roles = {v: role(v, 0) for v in expression.variables - set("xyz")}
        else:
            geometric = {("variable", "r"): GEOMETRY_NODES["distance"](0, 1)}
            roles = {v: role(v[:-1], int(v[-1]) - 1) if v[-1:] in ("1", "2") else None for v in expression.variables - {"r"}}
        constants = list(self.constants)
        roles = {v: r or ("constant", constants.index(v), 0) for v, r in roles.items()}
        return self.KINDS[kind], in_coordinates(expression.root, geometric), tuple(sorted(roles.items()))

    def cpu_kernel(self):
        return cpu_kernels.gb_kernel(*self._kernel_spec), self._kernel_parameters

    def _pair_variables(self, positions, pairs, per_particle: dict) -> dict:
        i, j = pairs.T
        variables = dict(self.constants, r=_distance(positions, i, j))
        for name, value in per_particle.items():
            variables[name + "1"] = value.index_select(0, i)
            variables[name + "2"] = value.index_select(0, j)
        return variables

    def _single_variables(self, positions, per_particle: dict) -> dict:
        variables = dict(self.constants, **per_particle)
        variables.update(x=positions[0], y=positions[1], z=positions[2])
        return variables

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        batch = positions.shape[-1]
        per_particle = {name: self.values_per_term[:, c, None] for c, name in enumerate(self.names)}
        for name, expression, kind in self.values:
            if kind == openmm.CustomGBForce.SingleParticle:
                value = expression(self._single_variables(positions, per_particle))
                value = (value if isinstance(value, torch.Tensor) else positions.new_tensor(value)).expand(self.n_atoms, batch)
            else:
                pairs = self.pairs_all if kind == openmm.CustomGBForce.ParticlePairNoExclusions else self.pairs_kept
                ordered = torch.cat([pairs, pairs.flip(1)])
                terms = expression(self._pair_variables(positions, ordered, per_particle))
                terms = (terms if isinstance(terms, torch.Tensor) else positions.new_tensor(terms)).expand(len(ordered), batch)
                value = positions.new_zeros(self.n_atoms, batch).index_add(0, ordered[:, 0], terms)
            per_particle[name] = value
        energy = positions.new_zeros(batch)
        for expression, kind in self.energies:
            if kind == openmm.CustomGBForce.SingleParticle:
                energy = energy + _sum_terms(expression(self._single_variables(positions, per_particle)), positions, self.n_atoms)
            else:
                pairs = self.pairs_all if kind == openmm.CustomGBForce.ParticlePairNoExclusions else self.pairs_kept
                energy = energy + _sum_terms(expression(self._pair_variables(positions, pairs, per_particle)), positions, len(pairs))
        return energy


# ===================================================================================================
# OpenMM force -> torch module
# ===================================================================================================
def _value(quantity, unit_):
    return quantity.value_in_unit(unit_) if unit.is_quantity(quantity) else quantity


def _table(rows, units: tuple) -> np.ndarray:
    """OpenMM parameter tuples -> float64 ``(M, len(units))``, each column stripped in its unit."""
    return np.array([[_value(v, u) for v, u in zip(row, units)] for row in rows], dtype=np.float64).reshape(-1, len(units))


KJ_MOL, NM, RAD, CHARGE = unit.kilojoule_per_mole, unit.nanometer, unit.radian, unit.elementary_charge


def _require(condition: bool, force, reason: str) -> None:
    if not condition:
        raise NotImplementedError(f"{type(force).__name__} (force group {force.getForceGroup()}): {reason}; no torch translation")


def _nonbonded(force: openmm.NonbondedForce, n_atoms: int) -> CoulombLennardJones:
    _require(force.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff, force, "only NoCutoff is translated")
    _require(force.getNumParticleParameterOffsets() == 0 and force.getNumExceptionParameterOffsets() == 0, force, "parameter offsets")
    params = _table(map(force.getParticleParameters, range(n_atoms)), (CHARGE, NM, KJ_MOL))
    exceptions = [force.getExceptionParameters(k) for k in range(force.getNumExceptions())]
    ex_pairs = np.sort(np.array([e[:2] for e in exceptions], dtype=np.int64).reshape(-1, 2), axis=1)
    ex_params = _table([e[2:] for e in exceptions], (CHARGE**2, NM, KJ_MOL))
    i, j = np.triu_indices(n_atoms, k=1)
    normal = ~np.isin(i * n_atoms + j, ex_pairs[:, 0] * n_atoms + ex_pairs[:, 1])
    i, j = i[normal], j[normal]
    pairs = np.concatenate([np.stack([i, j], 1), ex_pairs])
    charge_products = np.concatenate([params[i, 0] * params[j, 0], ex_params[:, 0]])
    sigma = np.concatenate([0.5 * (params[i, 1] + params[j, 1]), ex_params[:, 1]])
    epsilon = np.concatenate([np.sqrt(params[i, 2] * params[j, 2]), ex_params[:, 2]])
    keep = (charge_products != 0) | (epsilon != 0)
    return CoulombLennardJones(pairs[keep], ONE_4PI_EPS0 * charge_products[keep], sigma[keep], epsilon[keep])


def _obc(force: openmm.GBSAOBCForce, n_atoms: int) -> OBC2:
    _require(force.getNonbondedMethod() == openmm.GBSAOBCForce.NoCutoff, force, "only NoCutoff is translated")
    params = _table(map(force.getParticleParameters, range(n_atoms)), (CHARGE, NM, None))
    surface_area_energy = _value(force.getSurfaceAreaEnergy(), KJ_MOL / NM**2)
    return OBC2(*params.T, force.getSoluteDielectric(), force.getSolventDielectric(), surface_area_energy)


def _custom_nonbonded(force: openmm.CustomNonbondedForce, n_atoms: int) -> CustomNonbonded:
    _require(force.getNonbondedMethod() == openmm.CustomNonbondedForce.NoCutoff, force, "only NoCutoff is translated")
    _require(force.getNumInteractionGroups() == 0, force, "interaction groups")
    _require(force.getNumComputedValues() == 0, force, "computed values")
    _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
    names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
    constants = _globals(force)
    allowed = {"r"} | {n + s for n in names for s in "12"} | set(constants)
    expression = _check_expression(force, force.getEnergyFunction(), allowed)
    excluded = {tuple(sorted(force.getExclusionParticles(k))) for k in range(force.getNumExclusions())}
    pairs = [(a, b) for a, b in itertools.combinations(range(n_atoms), 2) if (a, b) not in excluded]
    parameters = np.array([force.getParticleParameters(k) for k in range(n_atoms)], dtype=np.float64).reshape(n_atoms, len(names))
    return CustomNonbonded(expression, np.array(pairs, dtype=np.int64).reshape(-1, 2), parameters, names, constants)


def _custom_gb(force: openmm.CustomGBForce, n_atoms: int) -> CustomGB:
    _require(force.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff, force, "only NoCutoff is translated")
    _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
    names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
    constants = _globals(force)
    known, values = set(names), []
    for k in range(force.getNumComputedValues()):
        name, text, kind = force.getComputedValueParameters(k)
        values.append((name, _check_expression(force, text, _gb_allowed(known, constants, kind)), kind))
        known.add(name)
    energies = []
    for k in range(force.getNumEnergyTerms()):
        text, kind = force.getEnergyTermParameters(k)
        energies.append((_check_expression(force, text, _gb_allowed(known, constants, kind)), kind))
    parameters = [force.getParticleParameters(k) for k in range(n_atoms)]
    exclusions = [force.getExclusionParticles(k) for k in range(force.getNumExclusions())]
    return CustomGB(n_atoms, parameters, names, constants, values, energies, exclusions)


def _gb_allowed(known: set, constants: dict, kind: int) -> set:
    if kind == openmm.CustomGBForce.SingleParticle:
        return known | set(constants) | {"x", "y", "z"}
    return {n + s for n in known for s in "12"} | set(constants) | {"r"}


_CUSTOM_BONDED = (  # force class, kind, particles per term, term counter, term getter, parameter prefix
    (openmm.CustomExternalForce, "external", 1, "getNumParticles", "getParticleParameters", "PerParticle"),
    (openmm.CustomBondForce, "bond", 2, "getNumBonds", "getBondParameters", "PerBond"),
    (openmm.CustomAngleForce, "angle", 3, "getNumAngles", "getAngleParameters", "PerAngle"),
    (openmm.CustomTorsionForce, "torsion", 4, "getNumTorsions", "getTorsionParameters", "PerTorsion"),
    (openmm.CustomCompoundBondForce, "compound", None, "getNumBonds", "getBondParameters", "PerBond"),
)


def _custom_bonded_force(force, kind, n_particles, counter, getter, prefix) -> CustomBonded:
    names = [getattr(force, f"get{prefix}ParameterName")(k) for k in range(getattr(force, f"getNum{prefix}Parameters")())]
    terms = [getattr(force, getter)(k) for k in range(getattr(force, counter)())]
    if kind == "compound":
        _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
        n_particles = force.getNumParticlesPerBond()
        terms = [(list(particles), list(parameters)) for particles, parameters in terms]
    else:
        terms = [(list(term[:-1]), list(term[-1])) for term in terms]
    return _custom_bonded(force, kind, terms, n_particles, names)


def translate_force(force: openmm.Force, n_atoms: int) -> nn.Module | None:
    """The torch module computing ``force``'s energy ``(B, N, 3) nm -> (B,) kJ/mol``.

    Returns ``None`` for forces without energy (``CMMotionRemover``); raises
    ``NotImplementedError`` naming the force for anything it cannot translate exactly.
    """
    if isinstance(force, NO_ENERGY_FORCES):
        return None
    _require(not force.usesPeriodicBoundaryConditions(), force, "periodic boundary conditions")
    if isinstance(force, openmm.HarmonicBondForce):
        bonds = [force.getBondParameters(k) for k in range(force.getNumBonds())]
        values = _table([b[2:] for b in bonds], (NM, KJ_MOL / NM**2))
        return HarmonicBonds([b[:2] for b in bonds], values[:, 0], values[:, 1])
    if isinstance(force, openmm.HarmonicAngleForce):
        angles = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
        values = _table([a[3:] for a in angles], (RAD, KJ_MOL / RAD**2))
        return HarmonicAngles([a[:3] for a in angles], values[:, 0], values[:, 1])
    if isinstance(force, openmm.PeriodicTorsionForce):
        torsions = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        values = _table([t[4:] for t in torsions], (None, RAD, KJ_MOL))
        return PeriodicTorsions([t[:4] for t in torsions], values[:, 0], values[:, 1], values[:, 2])
    if isinstance(force, openmm.NonbondedForce):
        return _nonbonded(force, n_atoms)
    if isinstance(force, openmm.GBSAOBCForce):
        return _obc(force, n_atoms)
    if isinstance(force, openmm.CustomNonbondedForce):
        return _custom_nonbonded(force, n_atoms)
    if isinstance(force, openmm.CustomGBForce):
        return _custom_gb(force, n_atoms)
    for cls, *spec in _CUSTOM_BONDED:
        if isinstance(force, cls):
            return _custom_bonded_force(force, *spec)
    raise NotImplementedError(f"{type(force).__name__} (force group {force.getForceGroup()}) has no torch translation")


# ===================================================================================================
# The energy
# ===================================================================================================
class _ZeroGradientRows(torch.autograd.Function):
    """Identity on ``x`` ``(B, d)``; its backward zeroes the rows flagged in ``bad`` ``(B,)``.

    ``bad`` is filled *after* the forward pass, once the energies are known, so that rows with a
    non-finite energy (whose backward may hold inf or NaN) get an exact zero gradient. Rows whose
    gradient alone is non-finite (a finite energy at a singular geometry, e.g. an exactly linear
    angle) are zeroed too, so that no NaN ever reaches a flow's parameters.
    """

    @staticmethod
    def forward(ctx, x, bad):
        ctx.bad = bad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        rows = ctx.bad | ~torch.isfinite(grad).all(1)
        return grad.masked_fill(rows[:, None], 0.0), None


class _EnergyWithGradient(torch.autograd.Function):
    """``TorchEnergy._energy_gradient`` as one autograd node: energies ``(B,)`` of positions
    ``(3, N, B)``, their gradient computed in the same pass and kept for the backward."""

    @staticmethod
    def forward(ctx, positions, energy):
        gradient = torch.zeros_like(positions)
        result = energy._energy_gradient(positions.detach(), gradient)
        ctx.save_for_backward(gradient)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_energy, None


class TorchEnergy(EvaluationCounts, nn.Module):
    """Reduced energy ``u(x) = E(x) / kT`` of a ``System``, batched in torch (see the module docstring).

    Args:
        system: an ``openflow.systems.System``; ``x`` holds its ``dim`` active coordinates (nm).
        dtype: the precision of the computation (``x`` of another dtype is cast to it and the
            results cast back to ``x.dtype``).
        device: where the parameters live first; they follow ``x`` to its device afterwards.
        soft_cap: as in ``OpenMMEnergy``: ``__call__`` returns ``u_high + log(1 + u - u_high)``
            above ``u_high``; ``energy_and_forces`` and ``forces`` stay uncapped.
        cpu_kernels: on the CPU, evaluate every force with the compiled kernels of
            ``cpu_kernels`` (numba, vectorised, float64 inside, threaded over the batch; custom
            forces generated from their expressions and cached on disk, see
            ``cpu_kernels.cache_folder``): at batch 1024 on alanine dipeptide 5-8x the torch ops in
            float64, 2.8-3.7x in float32 (amber14's CustomGB implicit solvent 6.6x and 3.2x).
            ``False``: torch ops everywhere. Ignored on a GPU and with ``compile=True``.
        compile: ``energy_and_forces`` runs the energy and its analytic gradient as one
            ``torch.compile``'d graph per chunk size and device (the last chunk is padded to the chunk
            size, so nothing recompiles). Experimental: on a 2-core CPU 1.2-1.4x the eager speed for
            OBC2 and slower than eager for alanine dipeptide in vacuum (float32), after a first call
            that compiles for 15-60 s (a C++ compiler is needed); a variant traced as one graph (no
            break at OpenMM calls) corrupted the heap for the Coulomb cluster with torch 2.13, so
            check its results against ``compile=False``.
            If compiling fails it warns and stays eager. ``forward`` is never compiled.

    Raises ``NotImplementedError`` naming the first force it cannot translate. Creating one calls
    ``openflow.heap.keep_freed_memory()`` (glibc keeps freed memory for reuse: 2-3x on a CPU).
    """

    def __init__(
        self, system: System, dtype: torch.dtype = torch.float64, device=None, soft_cap: float | None = None,
        cpu_kernels: bool = True, compile: bool = False,
    ):
        super().__init__()
        if not isinstance(system, System):
            raise TypeError(f"system must be an openflow.systems.System, got {type(system).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if soft_cap is not None and not np.isfinite(soft_cap):
            raise ValueError(f"soft_cap must be a finite reduced energy or None, got {soft_cap}")
        if any(system.system.isVirtualSite(k) for k in range(system.n_atoms)):
            raise NotImplementedError(f"{system.name}: virtual sites have no torch translation")
        self.system, self.soft_cap, self.kT = system, None if soft_cap is None else float(soft_cap), system.kT_kjmol
        groups = system.energy_groups()
        terms = [translate_force(f, system.n_atoms) for f in system.system.getForces() if groups >> f.getForceGroup() & 1]
        self.terms = nn.ModuleList(t for t in terms if t is not None)
        reference = np.asarray(system.positions.value_in_unit(unit.nanometer), dtype=np.float64).reshape(-1, 1)
        self.register_buffer("reference", torch.as_tensor(reference))
        self.register_buffer("active_index", torch.as_tensor(np.flatnonzero(system.active.reshape(-1))))
        self.all_active = bool(system.active.all())
        components = np.flatnonzero(system.active[0])  # the same leading components of every atom (chain: x; 2D: x, y)
        uniform = (system.active == system.active[0]).all() and np.array_equal(components, np.arange(len(components)))
        self._components = slice(0, len(components)) if uniform and not self.all_active else None
        self.compile, self._compiled = bool(compile), None
        self.cpu_kernels = bool(cpu_kernels)
        # CPU chunks: torch ops' per-term temporaries (rows x chunk float64) of at most ~2 MB stay off fresh,
        # page-faulting memory; the compiled kernels have none, so chunks of only-kernel systems are large
        use_kernels = self.cpu_kernels and not self.compile
        found = [(term, term.cpu_kernel() if use_kernels else None) for term in self.terms]
        self._kernel_terms = [term for term, kernel in found if kernel]
        self._cpu_torch_terms = [term for term, kernel in found if not kernel]
        self._kernels = [kernel for _, kernel in found if kernel]  # (kernel, parameters); a lookup hashes expression trees: once
        rows = max((len(b) for t in self._cpu_torch_terms for b in t.buffers() if b.dtype == torch.int64), default=0)
        self.cpu_chunk_size = 512 if rows > 256 else 1024 if self._cpu_torch_terms else 16384
        self._kernels_only = not self._cpu_torch_terms  # CPU positions then stay in the caller's layout (the kernels read any strides)
        # torch's own ops run serially around kernels with >= 3 terms per coordinate (see cpu_kernels.torch_on_one_thread);
        # around lighter ones their threads win (batch 1024, 2 cores: chain n=32 1.3x, Coulomb n=13 1.15x; n=24 0.85x)
        kernel_rows = sum(len(parameters[0]) for _, parameters in self._kernels)
        self._serial_torch = self._kernels_only and kernel_rows >= 9 * system.n_atoms
        self.to(device=device, dtype=dtype)
        self.reset_stats()
        keep_freed_memory()  # each chunk's multi-MB temporaries reuse freed heap instead of fresh pages: 2-3x on CPU

    # -- public API ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of active coordinates ``d``."""
        return self.system.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.dtype

    @property
    def device(self) -> torch.device:
        return self.reference.device

    def potential(self, positions: torch.Tensor) -> torch.Tensor:
        """Potential energy ``(B,)`` kJ/mol of full positions ``(B, n_atoms, 3)`` nm; differentiable, raw
        (non-finite values are returned as they come)."""
        return self._potential(positions.permute(2, 1, 0).contiguous())

    def _potential(self, positions: torch.Tensor) -> torch.Tensor:
        """The same on the internal layout ``(3, n_atoms, B)``; under grad mode its gradient is computed
        together with the energies (analytically where the terms can, see ``_Term``); first order only."""
        if torch.is_grad_enabled() and positions.requires_grad:
            return _EnergyWithGradient.apply(positions, self)
        return self._energy_gradient(positions, None)

    def _energy_gradient(self, positions: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        """Energies ``(B,)`` kJ/mol of positions ``(3, n_atoms, B)``; adds ``dE/dpositions`` into ``gradient``."""
        energy = positions.new_zeros(positions.shape[-1])
        terms = self.terms
        if positions.device.type == "cpu" and self._kernel_terms:
            if self._kernels is None:  # unpickled: generated kernels are looked up again, not pickled
                self._kernels = [term.cpu_kernel() for term in self._kernel_terms]
            energy = energy + cpu_kernels.evaluate(self._kernels, positions, gradient).to(energy.dtype)
            terms = self._cpu_torch_terms
        for term in terms:
            energy = energy + term.energy_gradient(positions, gradient)
        return energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energies ``(B,)`` (kT, soft-capped if set) of ``x`` ``(B, d)`` nm; ``+inf`` and zero
        gradient where non-finite."""
        xc = self._coordinates(x)
        bad = torch.zeros(xc.shape[0], dtype=torch.bool, device=xc.device)
        u = self._potential(self._layout(_ZeroGradientRows.apply(xc, bad))) / self.kT
        bad.copy_(~torch.isfinite(u))
        u = u.masked_fill(bad, math.inf)
        if self.soft_cap is not None:
            excess = torch.clamp(u - self.soft_cap, min=0.0)
            u = torch.where(u > self.soft_cap, self.soft_cap + torch.log1p(excess), u)
        self._count(bad)
        return u.to(x.dtype)

    def energy_and_forces(self, x: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies ``(B,)`` kT and reduced forces ``-du/dx`` ``(B, d)`` kT/nm, no graph, uncapped.

        Evaluated ``chunk_size`` configurations at a time to bound memory; ``None``: on the CPU 512
        when a term in torch ops has over 256 rows (pairs, ...), 1024 for smaller ones, 16384 when
        the compiled kernels do everything; 16384 on a GPU. The gradient is analytic: written out
        for the standard forces, symbolic derivatives of the expressions for the custom ones
        (in torch ops, autograd for CustomNonbonded and CustomGB). Non-finite energies or forces give ``+inf`` and 0.
        """
        serial_torch = self._serial_torch and isinstance(x, torch.Tensor) and x.device.type == "cpu"
        with cpu_kernels.torch_on_one_thread() if serial_torch else contextlib.nullcontext():
            xc = self._coordinates(x).detach()
            if chunk_size is None:
                chunk_size = self.cpu_chunk_size if xc.device.type == "cpu" else 16384
            if int(chunk_size) != chunk_size or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
            energies, forces = [], []
            for chunk in xc.split(chunk_size):
                u, grad = self._chunk_energy_gradient(chunk, chunk_size)
                finite = torch.isfinite(u) & torch.isfinite(grad.sum(-1))  # a NaN or inf component makes the sum one
                energies.append(u.masked_fill(~finite, math.inf))
                forces.append(grad.masked_fill_(~finite[:, None], 0.0).neg_())
            u, f = torch.cat(energies), torch.cat(forces)
            self._count(~torch.isfinite(u))
            return u.to(x.dtype), f.to(x.dtype)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced forces ``-du/dx`` ``(B, d)`` kT/nm of ``x`` ``(B, d)`` nm (zero where non-finite)."""
        return self.energy_and_forces(x)[1]

    def potential_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Potential energies ``(B,)`` kJ/mol (no graph, uncapped, ``+inf`` where non-finite)."""
        with torch.no_grad():
            energy = self._potential(self._layout(self._coordinates(x)))
        bad = ~torch.isfinite(energy)
        self._count(bad)
        return energy.masked_fill(bad, math.inf).to(x.dtype)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """Active coordinates ``(B, d)`` -> positions ``(B, n_atoms, 3)`` nm (inactive ones at the reference)."""
        return self._layout(x).permute(2, 1, 0)

    def _stats_label(self) -> str:
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"

    def extra_repr(self) -> str:
        return f"{self.system.name}, d={self.dim}, dtype={self.dtype}, device={self.device}, soft_cap={self.soft_cap}"

    # -- internals -----------------------------------------------------------------------------
    def _reduced_energy_gradient(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies ``(B,)`` and ``du/dx`` ``(B, d)`` of ``chunk`` ``(B, d)``, raw."""
        positions = self._layout(chunk)
        gradient = torch.zeros_like(positions)  # same strides: a view of (B, n_atoms, 3) for the kernels
        u = self._energy_gradient(positions, gradient) / self.kT
        grad = gradient.permute(2, 1, 0)  # (B, n_atoms, 3)
        if self._components is not None:  # a strided slice: 5x an index_select
            grad = grad[:, :, self._components]
        grad = grad.reshape(len(chunk), grad.shape[1] * grad.shape[2])
        if self._components is None and not self.all_active:
            grad = grad.index_select(1, self.active_index)
        return u, grad / self.kT

    def _chunk_energy_gradient(self, chunk: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_reduced_energy_gradient``, compiled (``compile=True``) on chunks padded to ``chunk_size``."""
        if self.compile and self._compiled is None:
            self._compiled = torch.compile(self._reduced_energy_gradient, dynamic=False)
        if not self.compile or len(chunk) == 0:
            return self._reduced_energy_gradient(chunk)
        n = len(chunk)
        padded = torch.cat([chunk, chunk[-1:].expand(chunk_size - n, -1)]) if n < chunk_size else chunk
        try:
            u, grad = self._compiled(padded)
        except Exception as error:  # noqa: BLE001 - any compiler failure: stay correct, eager
            warnings.warn(f"TorchEnergy(compile=True): torch.compile failed ({type(error).__name__}: {error}); running eager", RuntimeWarning, stacklevel=3)
            self.compile = False
            return self._reduced_energy_gradient(chunk)
        return u[:n], grad[:n]

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _compiled=None, _kernels=None)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Active coordinates ``(B, d)`` -> positions in the internal layout ``(3, n_atoms, B)`` nm:
        contiguous for torch ops, a transposed view of ``(B, n_atoms, 3)`` where only the CPU kernels
        read it (any strides; one array type for them to compile for)."""
        if self._components is not None:  # slice assignment: 5x an index_copy
            full = self.reference.to(x.dtype).view(1, self.system.n_atoms, 3).expand(x.shape[0], -1, -1).clone()
            full[:, :, self._components] = x.view(x.shape[0], self.system.n_atoms, self._components.stop)
            x = full
        elif not self.all_active:
            x = self.reference.to(x.dtype).expand(-1, x.shape[0]).index_copy(0, self.active_index, x.T).T
        positions = x.reshape(x.shape[0], self.system.n_atoms, 3).permute(2, 1, 0)
        return positions if self._kernels_only and x.device.type == "cpu" else positions.contiguous()

    def _coordinates(self, x) -> torch.Tensor:
        """Validate ``x`` ``(B, d)``; move the parameters to its device; return it in ``self.dtype``."""
        d = self.dim
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor of shape (B, {d}), got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"x must have shape (B, {d}) (a batch of {d} active coordinates in nm), got {tuple(x.shape)}")
        if x.device != self.device:
            self.to(x.device)
        return x.to(self.dtype)

    def _count(self, bad: torch.Tensor) -> None:
        n_bad = int(bad.sum())
        self.n_evaluations += len(bad)
        self.n_nonfinite += n_bad
        if n_bad:
            warnings.warn(NONFINITE_WARNING, RuntimeWarning, stacklevel=3)


_measured_faster: dict[tuple, bool] = {}


def _faster(batched: "TorchEnergy", bridge: OpenMMEnergy, system: System, batch: int) -> bool:
    """Whether ``batched`` computes energy + gradient of ``batch`` configurations faster than ``bridge``."""
    key = (system.n_atoms, tuple(sorted(type(f).__name__ for f in system.system.getForces())), batch, str(batched.device))
    if key not in _measured_faster:
        generator = torch.Generator().manual_seed(0)
        start = system.from_positions(system.positions)
        x = start + 0.005 * torch.randn((batch, system.dim), generator=generator, dtype=start.dtype)

        def seconds(energy) -> float:
            best = float("inf")
            for _ in range(3):
                xi = x.clone().requires_grad_(True)
                began = time.perf_counter()
                energy(xi).sum().backward()
                best = min(best, time.perf_counter() - began)
            return best

        _measured_faster[key] = seconds(batched) < seconds(bridge)
    return _measured_faster[key]


def batched_energy(
    system: System,
    energy: str = "auto",
    *,
    dtype: torch.dtype = torch.float64,
    device=None,
    platform: str | None = None,
    platform_properties: dict | None = None,
    soft_cap: float | None = None,
    batch_hint: int = 256,
):
    """The energy ``u(x) -> (B,)`` to train and reweight with.

    Args:
        energy: ``"torch"`` (``TorchEnergy``; ``NotImplementedError`` if a force does not
            translate), ``"openmm"`` (``OpenMMEnergy``, one OpenMM call per configuration) or
            ``"auto"``: ``TorchEnergy`` when every force translates (else a
            ``TorchEnergyFallbackWarning`` naming the force and ``OpenMMEnergy``) and, off the GPU,
            when it is also *measured* faster than the OpenMM loop on ``batch_hint`` configurations
            of this system (energy + gradient, best of 3): on the 2-core test box torch wins for
            every system here (7-9x the Reference loop at batch 1024; amber14's implicit solvent 108x),
            but a fast CPU core running OpenMM's loop can beat two slow ones running torch.
        dtype, device: for ``TorchEnergy``; platform, platform_properties: for ``OpenMMEnergy``;
        soft_cap: for both.
    """
    if energy not in ("auto", "torch", "openmm"):
        raise ValueError(f"energy must be 'auto', 'torch' or 'openmm', got {energy!r}")
    bridge = OpenMMEnergy(system, platform=platform, platform_properties=platform_properties, soft_cap=soft_cap)
    if energy != "openmm":
        try:
            batched = TorchEnergy(system, dtype=dtype, device=device, soft_cap=soft_cap)
            if energy == "torch" or batched.device.type == "cuda" or _faster(batched, bridge, system, batch_hint):
                return batched
            return bridge
        except NotImplementedError as error:
            if energy == "torch":
                raise
            warnings.warn(
                f"batched torch energy unavailable for {system.name!r}: {error}. FALLING BACK to the "
                "per-configuration OpenMM bridge (OpenMMEnergy): one OpenMM call per configuration, "
                "no batching, no GPU speed-up for large batches",
                TorchEnergyFallbackWarning,
                stacklevel=2,
            )
    return bridge
