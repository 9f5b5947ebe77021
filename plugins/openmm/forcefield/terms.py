"""The standard forces as torch terms: positions ``(3, N, B)`` nm -> energies ``(B,)`` kJ/mol.

``HarmonicBonds``, ``HarmonicAngles``, ``PeriodicTorsions``, ``CoulombLennardJones`` (a
``NonbondedForce`` with ``NoCutoff``, exceptions included) and ``OBC2`` (``GBSAOBCForce``), each a
``base.Term`` with its gradient written out analytically and a compiled CPU kernel of the same
physics (``kernels``). Distances, angles and dihedrals come from ``openflow.geometry``
(``base.measure``). Parameters are read off an ``openmm.System`` by ``translate``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from openflow import geometry

from . import kernels
from .base import Term, column, gather, index_table, kernel_arrays, measure, scatter, scatter_chain

# 1/(4 pi eps0) in kJ/mol nm/e^2, the value OpenMM >= 8 uses (CODATA 2018 constants); older
# OpenMM used 138.935456 (relative difference 1e-8). The OpenMM app's CustomGBForce expressions
# carry their own literal (138.935485), which the expression translator reads as written.
ONE_4PI_EPS0 = 138.93545764438198
OBC2_ALPHA, OBC2_BETA, OBC2_GAMMA = 1.0, 0.8, 4.85
OBC_DIELECTRIC_OFFSET = 0.009  # nm
OBC_PROBE_RADIUS = 0.14  # nm


class HarmonicBonds(Term):
    """``sum k/2 (r - r0)^2`` over bonds ``(M, 2)``."""

    def __init__(self, pairs, length, k):
        super().__init__()
        self.register_buffer("pairs", index_table(pairs, 2))
        self.register_buffer("length", column(length))
        self.register_buffer("half_k", 0.5 * column(k))
        self._kernel_parameters = kernel_arrays(self.pairs, self.length, self.half_k)

    def cpu_kernel(self):
        return kernels.harmonic_bonds, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = gather(positions, j) - gather(positions, i)
        r = geometry.dot(delta, delta, 0).sqrt()
        stretch = r - self.length
        if gradient is not None:
            values = delta * (2.0 * self.half_k * stretch / r)
            scatter(gradient, j, values)
            scatter(gradient, i, values, sign=-1.0)
        return (self.half_k * stretch.square()).sum(0)


class HarmonicAngles(Term):
    """``sum k/2 (theta - theta0)^2`` over angles ``(M, 3)``."""

    def __init__(self, triples, angle, k):
        super().__init__()
        self.register_buffer("triples", index_table(triples, 3))
        self.register_buffer("angle", column(angle))
        self.register_buffer("half_k", 0.5 * column(k))
        self._kernel_parameters = kernel_arrays(self.triples, self.angle, self.half_k)

    def cpu_kernel(self):
        return kernels.harmonic_angles, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        if gradient is None:
            return (self.half_k * (measure("angle", positions, self.triples.T) - self.angle).square()).sum(0)
        theta, grads = measure("angle", positions, self.triples.T, with_gradient=True)
        bend = theta - self.angle
        scatter_chain(gradient, self.triples.T, grads, 2.0 * self.half_k * bend)
        return (self.half_k * bend.square()).sum(0)


class PeriodicTorsions(Term):
    """``sum k (1 + cos(n phi - phi0))`` over torsions ``(M, 4)``; each distinct dihedral (several
    periodicities often share one) is computed once."""

    def __init__(self, quadruples, periodicity, phase, k):
        super().__init__()
        unique, which = np.unique(np.asarray(quadruples, dtype=np.int64).reshape(-1, 4), axis=0, return_inverse=True)
        self.register_buffer("quadruples", index_table(unique, 4))
        self.register_buffer("which", torch.as_tensor(which.reshape(-1)))
        self.register_buffer("periodicity", column(periodicity))
        self.register_buffer("phase", column(phase))
        self.register_buffer("k", column(k))
        periodicity = np.rint(np.asarray(periodicity, dtype=np.float64).reshape(-1)).astype(np.int64)
        order = np.lexsort((periodicity, which.reshape(-1)))  # terms grouped by dihedral, by periodicity within
        offsets = np.concatenate([[0], np.cumsum(np.bincount(which.reshape(-1), minlength=len(unique)))])
        phase, periodicity = np.asarray(phase, dtype=np.float64).reshape(-1)[order], periodicity[order]
        k = np.asarray(k, dtype=np.float64).reshape(-1)[order]
        self._kernel_parameters = kernel_arrays(self.quadruples, offsets, periodicity, np.cos(phase), np.sin(phase), k)

    def cpu_kernel(self):
        return kernels.periodic_torsions, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        if gradient is None:
            phi = measure("dihedral", positions, self.quadruples.T).index_select(0, self.which)
            return (self.k * (1.0 + torch.cos(self.periodicity * phi - self.phase))).sum(0)
        phi, grads = measure("dihedral", positions, self.quadruples.T, with_gradient=True)
        angle = self.periodicity * phi.index_select(0, self.which) - self.phase
        slope = (-self.k * self.periodicity) * torch.sin(angle)
        slope = phi.new_zeros(phi.shape).index_add_(0, self.which, slope)  # dE/dphi per distinct dihedral
        scatter_chain(gradient, self.quadruples.T, grads, slope)
        return (self.k * (1.0 + torch.cos(angle))).sum(0)


class CoulombLennardJones(Term):
    """``sum c/r + 4 eps ((sigma/r)^12 - (sigma/r)^6)`` over pairs ``(P, 2)``; ``c`` in kJ/mol nm."""

    def __init__(self, pairs, coulomb, sigma, epsilon):
        super().__init__()
        self.register_buffer("pairs", index_table(pairs, 2))
        self.register_buffer("coulomb", column(coulomb))
        self.register_buffer("sigma_squared", column(sigma) ** 2)
        self.register_buffer("four_epsilon", 4.0 * column(epsilon))
        self._kernel_parameters = kernel_arrays(self.pairs, self.coulomb, self.sigma_squared, self.four_epsilon)

    def cpu_kernel(self):
        return kernels.coulomb_lennard_jones, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = gather(positions, j) - gather(positions, i)
        inverse_r2 = 1.0 / geometry.dot(delta, delta, 0)
        coulomb = self.coulomb * inverse_r2.sqrt()
        s6 = (self.sigma_squared * inverse_r2) ** 3
        lennard_jones = self.four_epsilon * s6 * (s6 - 1.0)
        if gradient is not None:
            # dE/dr / r = -(c/r + 4 eps (12 s^12 - 6 s^6)) / r^2
            values = delta * (-(coulomb + lennard_jones + self.four_epsilon * s6 * (11.0 * s6 - 5.0)) * inverse_r2)
            scatter(gradient, j, values)
            scatter(gradient, i, values, sign=-1.0)
        return (coulomb + lennard_jones).sum(0)


class OBC2(Term):
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
        self.register_buffer("pairs", index_table(np.stack([i, j], 1), 2))
        ordered_first, ordered_second = np.concatenate([i, j]), np.concatenate([j, i])  # (i, j) and (j, i)
        self.register_buffer("ordered_first", torch.as_tensor(ordered_first))
        radius = np.asarray(radius, dtype=np.float64)
        offset_radius = radius - OBC_DIELECTRIC_OFFSET
        scaled_radius = offset_radius * np.asarray(scale, dtype=np.float64)
        charge = np.asarray(charge, dtype=np.float64)
        self.register_buffer("radius", column(radius))
        self.register_buffer("offset_radius", column(offset_radius))
        rho_i, s_j = offset_radius[ordered_first], scaled_radius[ordered_second]
        self.register_buffer("rho_i", column(rho_i))
        self.register_buffer("s_j", column(s_j))
        self.register_buffer("s_j_squared", column(s_j**2))
        self.register_buffer("engulfed_below", column(s_j - rho_i))  # i inside j's sphere if r < s_j - rho_i
        self.register_buffer("two_over_rho_i", column(2.0 / rho_i))
        self.register_buffer("charge_products", column(charge[i] * charge[j]))
        self.register_buffer("half_charge_squared", column(0.5 * charge**2))
        self.register_buffer("surface", column(4.0 * math.pi * surface_area_energy * (radius + OBC_PROBE_RADIUS) ** 2))
        both_nonzero = solute_dielectric != 0 and solvent_dielectric != 0
        self.prefactor = -ONE_4PI_EPS0 * (1.0 / solute_dielectric - 1.0 / solvent_dielectric) if both_nonzero else 0.0
        rho, s = (
            np.stack([offset_radius[i], offset_radius[j]]),
            np.stack([scaled_radius[j], scaled_radius[i]]),
        )  # (2, P)
        self._kernel_parameters = kernel_arrays(
            self.pairs,
            rho,
            s,
            s**2,
            s - rho,
            2.0 / rho,
            self.charge_products,
            self.half_charge_squared,
            self.surface,
            self.radius,
            self.offset_radius,
        ) + (float(self.prefactor), OBC2_ALPHA, OBC2_BETA, OBC2_GAMMA)

    def cpu_kernel(self):
        return kernels.obc2, self._kernel_parameters

    def energy_gradient(self, positions, gradient):
        i, j = self.pairs.T
        delta = gather(positions, j) - gather(positions, i)
        r2 = geometry.dot(delta, delta, 0)
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
        d_born = d_born.index_add_(0, i, d_product * born.index_select(0, j)).index_add_(
            0, j, d_product * born.index_select(0, i)
        )
        # dE/d(total integral of atom i), then through each ordered pair's integral to r
        d_psi = (
            d_born
            * born.square()
            / self.radius
            * (1.0 - tanh_sum.square())
            * (OBC2_ALPHA - psi * (2.0 * OBC2_BETA - 3.0 * OBC2_GAMMA * psi))
        )
        d_total = (0.5 * self.offset_radius) * d_psi
        # d/dr of the unfactorised integral; d lower/dr = sign(r - s_j) where |r - s_j| > rho_i, else 0
        dl = torch.where(below.abs() > self.rho_i, -l.square() * below.sign(), 0.0)
        du = -u.square()
        u2_l2 = u.square() - l.square()
        d_term = (
            dl
            - du
            + 0.25 * u2_l2
            + 0.5 * r * (u * du - l * dl)
            - 0.5 * r_inv * (u + dl / l + r_inv * log_ratio)
            + 0.25 * self.s_j_squared * r_inv * (r_inv * u2_l2 + 2.0 * (l * dl - u * du))
        )
        d_term = torch.where(outside, d_term - torch.where(engulfed, 2.0 * dl, 0.0), 0.0)
        d_r = d_total.index_select(0, self.ordered_first) * d_term * r_inv  # dE/dr / r, ordered pairs
        n_pairs = len(self.pairs)
        coefficient = d_r[:n_pairs] + d_r[n_pairs:] + 2.0 * pair_f2 * (1.0 - 0.25 * screening)
        values = delta * coefficient
        scatter(gradient, j, values)
        scatter(gradient, i, values, sign=-1.0)
        return energy
