"""Compiled CPU kernels (numba) of the standard forces, and the contract and helpers every kernel shares.

A kernel computes the energies and analytic gradients of a batch in one pass over a force's terms.
Its signature is ``kernel(positions, gradient, energy, with_gradient, start, stop, *parameters)``:
it adds the energies (kJ/mol) of configurations ``start <= b < stop`` into ``energy`` ``(B,)``
and, when ``with_gradient``, ``dE/dpositions`` (kJ/mol/nm) into ``gradient`` ``(3, N, B)``, for
positions ``(3, N, B)`` nm (both of any strides: a transposed view of ``(B, N, 3)`` is read and
written in place). Kernels compute in float64 whatever the caller's precision; non-finite values
propagate (no fast-math assumptions about inf or NaN); they release the GIL, so that
``parallel.evaluate`` can run them on threads.

Inside, a kernel loops over the terms and, innermost, over a block of ``BLOCK`` configurations
(``copy_block`` ... ``store_block``). Each term's arithmetic runs in loops that read the block's
positions and write small arrays of the kernel's own, so LLVM vectorises them (only ``log``,
``exp``, ``tanh`` and ``atan2`` stay scalar); separate loops then add the gradient into its rows.

Written out here: ``harmonic_bonds``, ``harmonic_angles``, ``periodic_torsions``,
``coulomb_lennard_jones`` and ``obc2``, with the physics of the torch terms of the same names in
``terms`` (see their docstrings). The custom forces' kernels are generated from their expressions
(``expression_kernels``) and use ``BLOCK``, ``copy_block`` and ``store_block`` from here. Numba
caches this module's machine code on disk beside it (compiled once per installation).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

BLOCK = 128  # configurations per inner loop: long enough to vectorise, short enough for the cache
JIT_OPTIONS = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"contract", "arcp", "nsz"})
_INLINE = dict(JIT_OPTIONS, inline="always")


@njit(**_INLINE)
def _difference(p, i, j, b):
    """``p[:, j, b] - p[:, i, b]`` as three numbers."""
    return p[0, j, b] - p[0, i, b], p[1, j, b] - p[1, i, b], p[2, j, b] - p[2, i, b]


@njit(**_INLINE)
def _add_rows(gradient, atom, values, sign):
    """``gradient[:, atom] += sign * values`` for a block's gradient ``(3, N, nb)``, values ``(3, nb)``."""
    for k in range(3):
        for b in range(values.shape[1]):
            gradient[k, atom, b] += sign * values[k, b]


@njit(**_INLINE)
def _add_pair(gradient, i, j, values):
    """A pair term's gradient: ``+values`` on atom j, ``-values`` on atom i."""
    _add_rows(gradient, j, values, 1.0)
    _add_rows(gradient, i, values, -1.0)


@njit(**_INLINE)
def copy_block(positions, b0, stop):
    """The block of configurations from ``b0``: its size ``nb``, its own copy ``(3, N, nb)`` of their
    positions (loops over arrays the kernel allocated itself are ones LLVM knows to be free of
    aliasing, and vectorises), a zero gradient ``(3, N, nb)`` and zero energies ``(nb,)``."""
    nb = min(stop - b0, BLOCK)
    block = np.empty((3, positions.shape[1], nb))
    for k in range(3):
        for a in range(positions.shape[1]):
            for b in range(nb):
                block[k, a, b] = positions[k, a, b0 + b]
    return nb, block, np.zeros_like(block), np.zeros(nb)


@njit(**_INLINE)
def store_block(gradient, energy, b0, block_gradient, block_energy, with_gradient):
    """Add a block's energies ``(nb,)`` and, ``with_gradient``, its gradient ``(3, N, nb)`` at ``b0``."""
    nb = block_energy.shape[0]
    for b in range(nb):
        energy[b0 + b] += block_energy[b]
    if with_gradient:
        for k in range(3):
            for a in range(gradient.shape[1]):
                for b in range(nb):
                    gradient[k, a, b0 + b] += block_gradient[k, a, b]


@njit(**JIT_OPTIONS)
def harmonic_bonds(positions, gradient, energy, with_gradient, start, stop, pairs, length, half_k):
    """``k/2 (r - r0)^2``; pairs ``(M, 2)``, length, half_k ``(M,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        d = np.empty((3, nb))  # dE/dp_j = -dE/dp_i
        for m in range(pairs.shape[0]):
            i, j = pairs[m, 0], pairs[m, 1]
            r0, hk = length[m], half_k[m]
            for b in range(nb):
                dx, dy, dz = _difference(p, i, j, b)
                r = math.sqrt(dx * dx + dy * dy + dz * dz)
                stretch = r - r0
                e[b] += hk * stretch * stretch
                c = 2.0 * hk * stretch / r
                d[0, b], d[1, b], d[2, b] = c * dx, c * dy, c * dz
            if with_gradient:
                _add_pair(g, i, j, d)
        store_block(gradient, energy, b0, g, e, with_gradient)


@njit(**JIT_OPTIONS)
def harmonic_angles(positions, gradient, energy, with_gradient, start, stop, triples, angle, half_k):
    """``k/2 (theta - theta0)^2`` of the angle i-j-k; triples ``(M, 3)``, angle, half_k ``(M,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        gi, gk = np.empty((3, nb)), np.empty((3, nb))
        for m in range(triples.shape[0]):
            i, j, k = triples[m, 0], triples[m, 1], triples[m, 2]
            theta0, hk = angle[m], half_k[m]
            for b in range(nb):
                ax, ay, az = _difference(p, j, i, b)
                bx, by, bz = _difference(p, j, k, b)
                nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
                sine = math.sqrt(nx * nx + ny * ny + nz * nz)
                bend = math.atan2(sine, ax * bx + ay * by + az * bz) - theta0
                e[b] += hk * bend * bend
                # dtheta/dp_i = a x n / (|a|^2 |n|), dtheta/dp_k = n x b / (|b|^2 |n|)
                slope = 2.0 * hk * bend / sine
                ci, ck = slope / (ax * ax + ay * ay + az * az), slope / (bx * bx + by * by + bz * bz)
                gi[0, b], gi[1, b], gi[2, b] = (
                    ci * (ay * nz - az * ny),
                    ci * (az * nx - ax * nz),
                    ci * (ax * ny - ay * nx),
                )
                gk[0, b], gk[1, b], gk[2, b] = (
                    ck * (ny * bz - nz * by),
                    ck * (nz * bx - nx * bz),
                    ck * (nx * by - ny * bx),
                )
            if with_gradient:
                _add_rows(g, i, gi, 1.0)
                _add_rows(g, k, gk, 1.0)
                _add_rows(g, j, gi, -1.0)
                _add_rows(g, j, gk, -1.0)
        store_block(gradient, energy, b0, g, e, with_gradient)


@njit(**JIT_OPTIONS)
def periodic_torsions(
    positions, gradient, energy, with_gradient, start, stop, quadruples, offsets, periodicity, cos_phase, sin_phase, k
):
    """``k (1 + cos(n phi - phi0))`` of the dihedral i-j-k-l; quadruples ``(M, 4)`` distinct, each with
    the terms ``offsets[m] <= t < offsets[m + 1]``, sorted by their integer periodicity ``n``.
    ``cos(n phi)`` and ``sin(n phi)`` come from ``(cos phi + i sin phi)^n``: no transcendental
    function at all."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        cos_phi, sin_phi = np.empty(nb), np.empty(nb)
        cos_n, sin_n, slope = np.empty(nb), np.empty(nb), np.empty(nb)
        roles = np.empty((4, 3, nb))  # dE/dp of atoms i, j, k, l
        for m in range(quadruples.shape[0]):
            i, j, kk, l = quadruples[m, 0], quadruples[m, 1], quadruples[m, 2], quadruples[m, 3]
            for b in range(nb):
                b1x, b1y, b1z = _difference(p, i, j, b)
                b2x, b2y, b2z = _difference(p, j, kk, b)
                b3x, b3y, b3z = _difference(p, kk, l, b)
                n1x, n1y, n1z = b1y * b2z - b1z * b2y, b1z * b2x - b1x * b2z, b1x * b2y - b1y * b2x
                n2x, n2y, n2z = b2y * b3z - b2z * b3y, b2z * b3x - b2x * b3z, b2x * b3y - b2y * b3x
                y = math.sqrt(b2x * b2x + b2y * b2y + b2z * b2z) * (
                    b1x * n2x + b1y * n2y + b1z * n2z
                )  # phi = atan2(y, x)
                x = n1x * n2x + n1y * n2y + n1z * n2z
                h = math.sqrt(x * x + y * y)
                cos_phi[b], sin_phi[b] = (x / h, y / h) if h > 0.0 else (1.0, 0.0)
                cos_n[b], sin_n[b], slope[b] = 1.0, 0.0, 0.0
            power = 0
            for t in range(offsets[m], offsets[m + 1]):
                n, kt, cp, sp = periodicity[t], k[t], cos_phase[t], sin_phase[t]
                while power < n:
                    for b in range(nb):
                        cos_n[b], sin_n[b] = (
                            cos_n[b] * cos_phi[b] - sin_n[b] * sin_phi[b],
                            sin_n[b] * cos_phi[b] + cos_n[b] * sin_phi[b],
                        )
                    power += 1
                for b in range(nb):
                    e[b] += kt * (1.0 + cos_n[b] * cp + sin_n[b] * sp)
                    slope[b] -= kt * n * (sin_n[b] * cp - cos_n[b] * sp)
            if not with_gradient:
                continue
            for b in range(nb):  # Blondel-Karplus
                b1x, b1y, b1z = _difference(p, i, j, b)
                b2x, b2y, b2z = _difference(p, j, kk, b)
                b3x, b3y, b3z = _difference(p, kk, l, b)
                n1x, n1y, n1z = b1y * b2z - b1z * b2y, b1z * b2x - b1x * b2z, b1x * b2y - b1y * b2x
                n2x, n2y, n2z = b2y * b3z - b2z * b3y, b2z * b3x - b2x * b3z, b2x * b3y - b2y * b3x
                b2_squared = b2x * b2x + b2y * b2y + b2z * b2z
                b2_length = math.sqrt(b2_squared)
                ci = -slope[b] * b2_length / (n1x * n1x + n1y * n1y + n1z * n1z)
                cl = slope[b] * b2_length / (n2x * n2x + n2y * n2y + n2z * n2z)
                f1 = (b1x * b2x + b1y * b2y + b1z * b2z) / b2_squared
                f3 = (b3x * b2x + b3y * b2y + b3z * b2z) / b2_squared
                gix, giy, giz, glx, gly, glz = ci * n1x, ci * n1y, ci * n1z, cl * n2x, cl * n2y, cl * n2z
                roles[0, 0, b], roles[0, 1, b], roles[0, 2, b] = gix, giy, giz
                roles[3, 0, b], roles[3, 1, b], roles[3, 2, b] = glx, gly, glz
                roles[1, 0, b], roles[1, 1, b], roles[1, 2, b] = (
                    f3 * glx - (1.0 + f1) * gix,
                    f3 * gly - (1.0 + f1) * giy,
                    f3 * glz - (1.0 + f1) * giz,
                )
                roles[2, 0, b], roles[2, 1, b], roles[2, 2, b] = (
                    f1 * gix - (1.0 + f3) * glx,
                    f1 * giy - (1.0 + f3) * gly,
                    f1 * giz - (1.0 + f3) * glz,
                )
            _add_rows(g, i, roles[0], 1.0)
            _add_rows(g, j, roles[1], 1.0)
            _add_rows(g, kk, roles[2], 1.0)
            _add_rows(g, l, roles[3], 1.0)
        store_block(gradient, energy, b0, g, e, with_gradient)


@njit(**JIT_OPTIONS)
def coulomb_lennard_jones(
    positions, gradient, energy, with_gradient, start, stop, pairs, coulomb, sigma_squared, four_epsilon
):
    """``c/r + 4 eps ((sigma/r)^12 - (sigma/r)^6)``; pairs ``(P, 2)``, the rest ``(P,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        d = np.empty((3, nb))  # dE/dp_j = -dE/dp_i
        for m in range(pairs.shape[0]):
            i, j = pairs[m, 0], pairs[m, 1]
            q, s2, fe = coulomb[m], sigma_squared[m], four_epsilon[m]
            for b in range(nb):
                dx, dy, dz = _difference(p, i, j, b)
                inverse_r2 = 1.0 / (dx * dx + dy * dy + dz * dz)
                electrostatic = q * math.sqrt(inverse_r2)
                s6 = s2 * inverse_r2
                s6 = s6 * s6 * s6
                dispersion = fe * s6 * (s6 - 1.0)
                e[b] += electrostatic + dispersion
                c = -(electrostatic + dispersion + fe * s6 * (11.0 * s6 - 5.0)) * inverse_r2  # dE/dr / r
                d[0, b], d[1, b], d[2, b] = c * dx, c * dy, c * dz
            if with_gradient:
                _add_pair(g, i, j, d)
        store_block(gradient, energy, b0, g, e, with_gradient)


@njit(**_INLINE)
def _born_integral(r, inverse_r, log_ratio, lower, upper, rho, s, s_squared, engulfed_below, two_over_rho):
    """HCT integral of atom i (offset radius ``rho``) over atom j (scaled radius ``s``) at distance
    ``r``, with Tinker's engulfed-atom term, and its ``d/dr / r``; ``lower = max(rho, |r - s|)``,
    ``upper = r + s``, ``log_ratio = log(lower / upper)``. Both 0 where j lies inside i's sphere."""
    below = r - s
    l, u = 1.0 / lower, 1.0 / upper
    engulfed = r < engulfed_below
    term = (l - u) * (1.0 - 0.25 * (l + u) * (r - s_squared * inverse_r)) + 0.5 * inverse_r * log_ratio
    dl = (-l * l if below > 0.0 else l * l) if abs(below) > rho else 0.0
    du = -u * u
    u2_l2 = u * u - l * l
    slope = (
        dl
        - du
        + 0.25 * u2_l2
        + 0.5 * r * (u * du - l * dl)
        - 0.5 * inverse_r * (u + dl / l + inverse_r * log_ratio)
        + 0.25 * s_squared * inverse_r * (inverse_r * u2_l2 + 2.0 * (l * dl - u * du))
    )
    if engulfed:
        term += two_over_rho - 2.0 * l
        slope -= 2.0 * dl
    if r <= -engulfed_below:  # rho_i >= r + s_j
        return 0.0, 0.0
    return term, slope * inverse_r


@njit(**JIT_OPTIONS)
def obc2(
    positions,
    gradient,
    energy,
    with_gradient,
    start,
    stop,
    pairs,
    rho,
    s,
    s_squared,
    engulfed_below,
    two_over_rho,
    charge_products,
    half_charge_squared,
    surface,
    radius,
    offset_radius,
    prefactor,
    alpha,
    beta,
    gamma,
):
    """OBC2 with the ACE surface term (``terms.OBC2``). Pairs ``(P, 2)`` ``i < j``;
    ``rho, s, s_squared, engulfed_below, two_over_rho`` ``(2, P)``: row 0 for atom i's integral over
    j, row 1 for j's over i; charge_products ``(P,)``; the rest per atom ``(N,)``; scalars: the
    polarisation prefactor (kJ/mol nm/e^2) and the OBC2 rescaling's alpha, beta, gamma."""
    n, n_pairs = radius.shape[0], pairs.shape[0]
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        total = np.zeros((n, nb))  # sum of pair integrals per atom
        slopes = np.empty((2, n_pairs, nb))  # d(integral)/dr / r, both directions
        r, inverse_r = np.empty(nb), np.empty(nb)
        lower, upper, ratio = np.empty((2, nb)), np.empty((2, nb)), np.empty((2, nb))
        for m in range(n_pairs):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(nb):  # geometry (vectorised)
                dx, dy, dz = _difference(p, i, j, b)
                r[b] = math.sqrt(dx * dx + dy * dy + dz * dz)
                inverse_r[b] = 1.0 / r[b]
                for side in range(2):
                    lower[side, b] = max(rho[side, m], abs(r[b] - s[side, m]))
                    upper[side, b] = r[b] + s[side, m]
                    ratio[side, b] = lower[side, b] / upper[side, b]
            for side in range(2):  # logarithms (scalar calls)
                for b in range(nb):
                    ratio[side, b] = math.log(ratio[side, b])
            for side, atom in ((0, i), (1, j)):  # integrals (vectorised)
                for b in range(nb):
                    term, slopes[side, m, b] = _born_integral(
                        r[b],
                        inverse_r[b],
                        ratio[side, b],
                        lower[side, b],
                        upper[side, b],
                        rho[side, m],
                        s[side, m],
                        s_squared[side, m],
                        engulfed_below[side, m],
                        two_over_rho[side, m],
                    )
                    total[atom, b] += term
        born = np.empty((n, nb))
        d_born = np.empty((n, nb))  # dE/d(Born radius), then dE/d(total)
        chain = np.empty((n, nb))  # d(Born radius)/d(total)
        for a in range(n):
            for b in range(nb):
                psi = 0.5 * offset_radius[a] * total[a, b]
                tanh_sum = math.tanh(psi * (alpha - psi * (beta - gamma * psi)))
                radius_a = 1.0 / (1.0 / offset_radius[a] - tanh_sum / radius[a])
                x = radius[a] / radius_a
                x3 = x * x * x
                ace = surface[a] * x3 * x3 if radius_a > 0.0 else 0.0
                self_polar = half_charge_squared[a] / radius_a
                e[b] += ace + prefactor * self_polar
                born[a, b] = radius_a
                d_born[a, b] = (-6.0 * ace - prefactor * self_polar) / radius_a
                chain[a, b] = (
                    0.5
                    * offset_radius[a]
                    * radius_a
                    * radius_a
                    / radius[a]
                    * (1.0 - tanh_sum * tanh_sum)
                    * (alpha - psi * (2.0 * beta - 3.0 * gamma * psi))
                )
        direct = np.empty((n_pairs, nb))  # dE/dr / r at fixed Born radii
        r2, quarter_ratio, screening = np.empty(nb), np.empty(nb), np.empty(nb)
        for m in range(n_pairs):
            i, j = pairs[m, 0], pairs[m, 1]
            for b in range(nb):
                dx, dy, dz = _difference(p, i, j, b)
                r2[b] = dx * dx + dy * dy + dz * dz
                quarter_ratio[b] = 0.25 * r2[b] / (born[i, b] * born[j, b])
            for b in range(nb):
                screening[b] = math.exp(-quarter_ratio[b])
            for b in range(nb):
                product = born[i, b] * born[j, b]
                f_inverse = 1.0 / math.sqrt(r2[b] + product * screening[b])
                pair = charge_products[m] * f_inverse
                e[b] += prefactor * pair
                d_f2 = -0.5 * prefactor * pair * f_inverse * f_inverse  # dE/d(f^2)
                d_product = d_f2 * screening[b] * (1.0 + quarter_ratio[b])
                d_born[i, b] += d_product * born[j, b]
                d_born[j, b] += d_product * born[i, b]
                direct[m, b] = 2.0 * d_f2 * (1.0 - 0.25 * screening[b])
        if with_gradient:
            for a in range(n):
                for b in range(nb):
                    d_born[a, b] *= chain[a, b]
            d = np.empty((3, nb))
            for m in range(n_pairs):
                i, j = pairs[m, 0], pairs[m, 1]
                for b in range(nb):
                    c = direct[m, b] + d_born[i, b] * slopes[0, m, b] + d_born[j, b] * slopes[1, m, b]
                    dx, dy, dz = _difference(p, i, j, b)
                    d[0, b], d[1, b], d[2, b] = c * dx, c * dy, c * dz
                _add_pair(g, i, j, d)
        store_block(gradient, energy, b0, g, e, with_gradient)
