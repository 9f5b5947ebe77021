"""Compiled CPU kernels (numba) for ``TorchEnergy``'s standard forces: energies and analytic gradients
of a batch in one pass per force, without temporaries.

Torch on a CPU spends its time streaming ``(terms, batch)`` temporaries through memory, one
elementwise op at a time. These kernels instead loop over the terms and, innermost, over a block of
``BLOCK`` configurations, keeping every intermediate in registers; the blocks run in parallel on
numba's threading layer (``torch.get_num_threads()`` threads). They compute in float64 whatever the
caller's precision.

Every kernel has the signature ``kernel(positions, gradient, energy, with_gradient, *parameters)``:
it adds the energies (kJ/mol) into ``energy`` ``(B,)`` and, when ``with_gradient``,
``dE/dpositions`` (kJ/mol/nm) into ``gradient`` ``(3, N, B)``, for positions ``(3, N, B)`` nm. The
physics is that of the torch terms in ``torch_energy`` (see their docstrings), written out per
configuration; non-finite values propagate (no fast-math assumptions about inf or NaN).

GNU OpenMP, numba's usual threading layer on Linux, cannot run in a process forked from one that
used it, so ``usable()`` is ``False`` in such a child and ``TorchEnergy`` uses torch ops there.
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np
import torch
from numba import njit, prange, set_num_threads
from numba import config as numba_config

BLOCK = 64  # configurations per parallel task: a block's positions and gradient stay in cache
_COMPILE = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"contract", "arcp", "nsz"})
_PARALLEL = dict(_COMPILE, parallel=True)
_INLINE = dict(_COMPILE, inline="always")  # helpers: inlined in numba IR (OBC2 1.3x; LLVM alone left calls)
_parallel_pid: int | None = None  # the process whose OpenMP threads the kernels started
_lock = threading.Lock()  # one caller at a time: numba's workqueue layer must not be entered concurrently


@njit(**_INLINE)
def _block(block, positions):
    """Configurations ``b0 <= b < b1`` of parallel task ``block``."""
    return block * BLOCK, min(positions.shape[2], (block + 1) * BLOCK)


@njit(**_INLINE)
def _n_blocks(positions):
    return -(-positions.shape[2] // BLOCK)


@njit(**_INLINE)
def _difference(p, i, j, b):
    """``p[:, j, b] - p[:, i, b]`` as three numbers."""
    return p[0, j, b] - p[0, i, b], p[1, j, b] - p[1, i, b], p[2, j, b] - p[2, i, b]


@njit(**_INLINE)
def _add_pair_gradient(gradient, i, j, b, c, dx, dy, dz):
    """``gradient[:, j, b] += c (dx, dy, dz)`` and ``gradient[:, i, b] -= c (dx, dy, dz)``."""
    gradient[0, j, b] += c * dx
    gradient[1, j, b] += c * dy
    gradient[2, j, b] += c * dz
    gradient[0, i, b] -= c * dx
    gradient[1, i, b] -= c * dy
    gradient[2, i, b] -= c * dz


@njit(**_INLINE)
def _add_gradient(gradient, a, b, gx, gy, gz):
    gradient[0, a, b] += gx
    gradient[1, a, b] += gy
    gradient[2, a, b] += gz


@njit(**_PARALLEL)
def harmonic_bonds(positions, gradient, energy, with_gradient, pairs, length, half_k):
    """``k/2 (r - r0)^2``; pairs ``(M, 2)``, length, half_k ``(M,)``."""
    p = positions
    for block in prange(_n_blocks(p)):
        b0, b1 = _block(block, p)
        for m in range(pairs.shape[0]):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(b0, b1):
                dx, dy, dz = _difference(p, i, j, b)
                r = math.sqrt(dx * dx + dy * dy + dz * dz)
                stretch = r - length[m]
                energy[b] += half_k[m] * stretch * stretch
                if with_gradient:
                    _add_pair_gradient(gradient, i, j, b, 2.0 * half_k[m] * stretch / r, dx, dy, dz)


@njit(**_PARALLEL)
def harmonic_angles(positions, gradient, energy, with_gradient, triples, angle, half_k):
    """``k/2 (theta - theta0)^2`` of the angle i-j-k; triples ``(M, 3)``, angle, half_k ``(M,)``."""
    p = positions
    for block in prange(_n_blocks(p)):
        b0, b1 = _block(block, p)
        for m in range(triples.shape[0]):
            i, j, k = triples[m, 0], triples[m, 1], triples[m, 2]
            for b in range(b0, b1):
                ax, ay, az = _difference(p, j, i, b)
                bx, by, bz = _difference(p, j, k, b)
                nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
                sine = math.sqrt(nx * nx + ny * ny + nz * nz)
                bend = math.atan2(sine, ax * bx + ay * by + az * bz) - angle[m]
                energy[b] += half_k[m] * bend * bend
                if with_gradient:  # dtheta/dp_i = a x n / (|a|^2 |n|), dtheta/dp_k = n x b / (|b|^2 |n|)
                    slope = 2.0 * half_k[m] * bend / sine
                    ci, ck = slope / (ax * ax + ay * ay + az * az), slope / (bx * bx + by * by + bz * bz)
                    gix, giy, giz = ci * (ay * nz - az * ny), ci * (az * nx - ax * nz), ci * (ax * ny - ay * nx)
                    gkx, gky, gkz = ck * (ny * bz - nz * by), ck * (nz * bx - nx * bz), ck * (nx * by - ny * bx)
                    _add_gradient(gradient, i, b, gix, giy, giz)
                    _add_gradient(gradient, k, b, gkx, gky, gkz)
                    _add_gradient(gradient, j, b, -(gix + gkx), -(giy + gky), -(giz + gkz))


@njit(**_PARALLEL)
def periodic_torsions(positions, gradient, energy, with_gradient, quadruples, offsets, periodicity, cos_phase, sin_phase, k):
    """``k (1 + cos(n phi - phi0))`` of the dihedral i-j-k-l; quadruples ``(M, 4)`` distinct, each with
    the terms ``offsets[m] <= t < offsets[m + 1]`` of integer periodicity ``n``. ``cos(n phi)`` and
    ``sin(n phi)`` come from ``(cos phi + i sin phi)^n``: no transcendental function per term."""
    p = positions
    for block in prange(_n_blocks(p)):
        b0, b1 = _block(block, p)
        for m in range(quadruples.shape[0]):
            i, j, kk, l = quadruples[m, 0], quadruples[m, 1], quadruples[m, 2], quadruples[m, 3]
            for b in range(b0, b1):
                b1x, b1y, b1z = _difference(p, i, j, b)
                b2x, b2y, b2z = _difference(p, j, kk, b)
                b3x, b3y, b3z = _difference(p, kk, l, b)
                n1x, n1y, n1z = b1y * b2z - b1z * b2y, b1z * b2x - b1x * b2z, b1x * b2y - b1y * b2x
                n2x, n2y, n2z = b2y * b3z - b2z * b3y, b2z * b3x - b2x * b3z, b2x * b3y - b2y * b3x
                b2_squared = b2x * b2x + b2y * b2y + b2z * b2z
                b2_length = math.sqrt(b2_squared)
                y = b2_length * (b1x * n2x + b1y * n2y + b1z * n2z)  # phi = atan2(y, x)
                x = n1x * n2x + n1y * n2y + n1z * n2z
                h = math.sqrt(x * x + y * y)
                c, s = (x / h, y / h) if h > 0.0 else (1.0, 0.0)
                e, slope = 0.0, 0.0
                for t in range(offsets[m], offsets[m + 1]):
                    cn, sn = 1.0, 0.0
                    for _ in range(periodicity[t]):
                        cn, sn = cn * c - sn * s, sn * c + cn * s
                    e += k[t] * (1.0 + cn * cos_phase[t] + sn * sin_phase[t])
                    slope -= k[t] * periodicity[t] * (sn * cos_phase[t] - cn * sin_phase[t])
                energy[b] += e
                if with_gradient:  # Blondel-Karplus
                    ci = -slope * b2_length / (n1x * n1x + n1y * n1y + n1z * n1z)
                    cl = slope * b2_length / (n2x * n2x + n2y * n2y + n2z * n2z)
                    f1 = (b1x * b2x + b1y * b2y + b1z * b2z) / b2_squared
                    f3 = (b3x * b2x + b3y * b2y + b3z * b2z) / b2_squared
                    gix, giy, giz, glx, gly, glz = ci * n1x, ci * n1y, ci * n1z, cl * n2x, cl * n2y, cl * n2z
                    _add_gradient(gradient, i, b, gix, giy, giz)
                    _add_gradient(gradient, l, b, glx, gly, glz)
                    _add_gradient(gradient, j, b, f3 * glx - (1.0 + f1) * gix, f3 * gly - (1.0 + f1) * giy, f3 * glz - (1.0 + f1) * giz)
                    _add_gradient(gradient, kk, b, f1 * gix - (1.0 + f3) * glx, f1 * giy - (1.0 + f3) * gly, f1 * giz - (1.0 + f3) * glz)


@njit(**_PARALLEL)
def coulomb_lennard_jones(positions, gradient, energy, with_gradient, pairs, coulomb, sigma_squared, four_epsilon):
    """``c/r + 4 eps ((sigma/r)^12 - (sigma/r)^6)``; pairs ``(P, 2)``, the rest ``(P,)``."""
    p = positions
    for block in prange(_n_blocks(p)):
        b0, b1 = _block(block, p)
        for m in range(pairs.shape[0]):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(b0, b1):
                dx, dy, dz = _difference(p, i, j, b)
                inverse_r2 = 1.0 / (dx * dx + dy * dy + dz * dz)
                electrostatic = coulomb[m] * math.sqrt(inverse_r2)
                s6 = sigma_squared[m] * inverse_r2
                s6 = s6 * s6 * s6
                dispersion = four_epsilon[m] * s6 * (s6 - 1.0)
                energy[b] += electrostatic + dispersion
                if with_gradient:  # dE/dr / r
                    c = -(electrostatic + dispersion + four_epsilon[m] * s6 * (11.0 * s6 - 5.0)) * inverse_r2
                    _add_pair_gradient(gradient, i, j, b, c, dx, dy, dz)


@njit(**_INLINE)
def _born_integral(r, inverse_r, rho, s, s_squared, engulfed_below, two_over_rho, with_gradient):
    """HCT integral of atom i (offset radius ``rho``) over atom j (scaled radius ``s``) at distance
    ``r``, with Tinker's engulfed-atom term, and its ``d/dr / r`` (0 without gradient)."""
    if r <= -engulfed_below:  # rho_i >= r + s_j: j lies inside i's own sphere
        return 0.0, 0.0
    below = r - s
    lower = max(rho, abs(below))
    l, u = 1.0 / lower, 1.0 / (r + s)
    log_ratio = math.log(lower * u)
    engulfed = r < engulfed_below
    term = (l - u) * (1.0 - 0.25 * (l + u) * (r - s_squared * inverse_r)) + 0.5 * inverse_r * log_ratio
    if engulfed:
        term += two_over_rho - 2.0 * l
    if not with_gradient:
        return term, 0.0
    dl = (-l * l if below > 0.0 else l * l) if abs(below) > rho else 0.0
    du = -u * u
    u2_l2 = u * u - l * l
    slope = (
        dl - du + 0.25 * u2_l2 + 0.5 * r * (u * du - l * dl)
        - 0.5 * inverse_r * (u + dl / l + inverse_r * log_ratio)
        + 0.25 * s_squared * inverse_r * (inverse_r * u2_l2 + 2.0 * (l * dl - u * du))
    )
    if engulfed:
        slope -= 2.0 * dl
    return term, slope * inverse_r


@njit(**_PARALLEL)
def obc2(positions, gradient, energy, with_gradient, pairs, rho, s, s_squared, engulfed_below, two_over_rho,
         charge_products, half_charge_squared, surface, radius, offset_radius, prefactor, alpha, beta, gamma):
    """OBC2 with the ACE surface term (``torch_energy.OBC2``). Pairs ``(P, 2)`` ``i < j``;
    ``rho, s, s_squared, engulfed_below, two_over_rho`` ``(2, P)``: row 0 for atom i's integral over
    j, row 1 for j's over i; charge_products ``(P,)``; the rest per atom ``(N,)``; scalars: the
    polarisation prefactor (kJ/mol nm/e^2) and the OBC2 rescaling's alpha, beta, gamma."""
    p = positions
    for block in prange(_n_blocks(p)):
        b0, b1 = _block(block, p)
        n, nb, n_pairs = radius.shape[0], b1 - b0, pairs.shape[0]
        total = np.zeros((n, nb))  # sum of pair integrals per atom
        slopes = np.empty((2, n_pairs, nb))  # d(integral)/dr / r, both directions
        for m in range(n_pairs):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(b0, b1):
                dx, dy, dz = _difference(p, i, j, b)
                r = math.sqrt(dx * dx + dy * dy + dz * dz)
                inverse_r = 1.0 / r
                term, slopes[0, m, b - b0] = _born_integral(r, inverse_r, rho[0, m], s[0, m], s_squared[0, m], engulfed_below[0, m], two_over_rho[0, m], with_gradient)
                total[i, b - b0] += term
                term, slopes[1, m, b - b0] = _born_integral(r, inverse_r, rho[1, m], s[1, m], s_squared[1, m], engulfed_below[1, m], two_over_rho[1, m], with_gradient)
                total[j, b - b0] += term
        born = np.empty((n, nb))
        d_born = np.empty((n, nb))  # dE/d(Born radius), then dE/d(total)
        chain = np.empty((n, nb))  # d(Born radius)/d(total)
        for a in range(n):
            for b in range(nb):
                psi = 0.5 * offset_radius[a] * total[a, b]
                tanh_sum = math.tanh(psi * (alpha - psi * (beta - gamma * psi)))
                radius_a = 1.0 / (1.0 / offset_radius[a] - tanh_sum / radius[a])
                ratio = radius[a] / radius_a
                ratio3 = ratio * ratio * ratio
                ace = surface[a] * ratio3 * ratio3 if radius_a > 0.0 else 0.0
                self_polar = half_charge_squared[a] / radius_a
                energy[b0 + b] += ace + prefactor * self_polar
                born[a, b] = radius_a
                d_born[a, b] = (-6.0 * ace - prefactor * self_polar) / radius_a
                chain[a, b] = (0.5 * offset_radius[a] * radius_a * radius_a / radius[a] * (1.0 - tanh_sum * tanh_sum)
                               * (alpha - psi * (2.0 * beta - 3.0 * gamma * psi)))
        direct = np.empty((n_pairs, nb))  # dE/dr / r at fixed Born radii
        for m in range(n_pairs):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(b0, b1):
                dx, dy, dz = _difference(p, i, j, b)
                r2 = dx * dx + dy * dy + dz * dz
                born_i, born_j = born[i, b - b0], born[j, b - b0]
                product = born_i * born_j
                screening = math.exp(-0.25 * r2 / product)
                f_inverse = 1.0 / math.sqrt(r2 + product * screening)
                pair = charge_products[m] * f_inverse
                energy[b] += prefactor * pair
                if with_gradient:
                    d_f2 = -0.5 * prefactor * pair * f_inverse * f_inverse  # dE/d(f^2)
                    d_product = d_f2 * screening * (1.0 + 0.25 * r2 / product)
                    d_born[i, b - b0] += d_product * born_j
                    d_born[j, b - b0] += d_product * born_i
                    direct[m, b - b0] = 2.0 * d_f2 * (1.0 - 0.25 * screening)
        if with_gradient:
            for a in range(n):
                for b in range(nb):
                    d_born[a, b] *= chain[a, b]
            for m in range(n_pairs):
                i, j = pairs[m, 0], pairs[m, 1]
                for b in range(b0, b1):
                    c = direct[m, b - b0] + d_born[i, b - b0] * slopes[0, m, b - b0] + d_born[j, b - b0] * slopes[1, m, b - b0]
                    dx, dy, dz = _difference(p, i, j, b)
                    _add_pair_gradient(gradient, i, j, b, c, dx, dy, dz)


def usable() -> bool:
    """Whether the kernels may run in this process: not in a child forked after they ran."""
    return _parallel_pid in (None, os.getpid())


def evaluate(kernels: list, positions: torch.Tensor, with_gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum of ``kernels`` (``(kernel, parameters)`` pairs) at positions ``(3, N, B)`` nm (a CPU tensor):
    energies ``(B,)`` kJ/mol and, ``with_gradient``, ``dE/dpositions`` ``(3, N, B)``, both float64."""
    global _parallel_pid
    if not usable():
        raise RuntimeError("cpu_kernels cannot run in a process forked after they ran (GNU OpenMP); use torch ops")
    _parallel_pid = os.getpid()
    p = positions.detach().to(torch.float64).contiguous().numpy()
    energy = np.zeros(p.shape[-1])
    gradient = np.zeros_like(p) if with_gradient else np.zeros((3, 0, 0))
    with _lock:
        set_num_threads(min(torch.get_num_threads(), numba_config.NUMBA_NUM_THREADS))
        for kernel, parameters in kernels:
            kernel(p, gradient, energy, with_gradient, *parameters)
    return torch.from_numpy(energy), torch.from_numpy(gradient) if with_gradient else None
