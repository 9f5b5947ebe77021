"""Compiled CPU kernels (numba) for ``TorchEnergy``'s forces: energies and analytic gradients of a
batch in one pass per force; written out here for the standard forces, generated from the Lepton
expressions for the custom ones (``expression_kernel``; ``gb_kernel`` for ``CustomGBForce``).

Torch on a CPU spends its time streaming ``(terms, batch)`` temporaries through memory, one
elementwise op at a time. These kernels loop over the terms and, innermost, over a block of
``BLOCK`` configurations. Each term's arithmetic runs in loops that read the positions and write
small arrays of the kernel's own, so LLVM vectorises them (only ``log``, ``exp``, ``tanh`` and
``atan2`` stay scalar); separate loops then add the gradient into its rows. They compute in
float64 whatever the caller's precision, and ``evaluate`` splits the batch over
``torch.get_num_threads()`` threads (the kernels release the GIL; a forked child starts its own).

Every kernel has the signature ``kernel(positions, gradient, energy, with_gradient, start, stop,
*parameters)``: it adds the energies (kJ/mol) of configurations ``start <= b < stop`` into
``energy`` ``(B,)`` and, when ``with_gradient``, ``dE/dpositions`` (kJ/mol/nm) into ``gradient``
``(3, N, B)``, for positions ``(3, N, B)`` nm (both of any strides: a transposed view of
``(B, N, 3)`` is read and written in place). The physics is that of the torch terms in
``torch_energy`` (see their docstrings), written out per configuration; non-finite values
propagate (no fast-math assumptions about inf or NaN). Numba caches the machine code on disk: of
this module's kernels beside it (about 10 s to compile once), of the generated ones beside their
source in ``cache_folder()`` (0.5-8 s per force and precision once; then 0.05-0.3 s to load).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from numba import njit

from openflow.io import atomic_path

from .lepton import coordinate_leaves, derivative

BLOCK = 128  # configurations per inner loop: long enough to vectorise, short enough for the cache
_COMPILE = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"contract", "arcp", "nsz"})
_INLINE = dict(_COMPILE, inline="always")
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_torch_threads = {"lock": threading.Lock(), "depth": 0, "saved": 1}


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
def _block(positions, b0, stop):
    """The block of configurations from ``b0``: its size ``nb``, its own copy ``(3, N, nb)`` of their
    positions (loops over arrays the kernel allocated itself are ones LLVM knows to be free of
    aliasing, and vectorises: 2x), a zero gradient ``(3, N, nb)`` and zero energies ``(nb,)``."""
    nb = min(stop - b0, BLOCK)
    block = np.empty((3, positions.shape[1], nb))
    for k in range(3):
        for a in range(positions.shape[1]):
            for b in range(nb):
                block[k, a, b] = positions[k, a, b0 + b]
    return nb, block, np.zeros_like(block), np.zeros(nb)


@njit(**_INLINE)
def _store(gradient, energy, b0, block_gradient, block_energy, with_gradient):
    """Add a block's energies ``(nb,)`` and, ``with_gradient``, its gradient ``(3, N, nb)`` at ``b0``."""
    nb = block_energy.shape[0]
    for b in range(nb):
        energy[b0 + b] += block_energy[b]
    if with_gradient:
        for k in range(3):
            for a in range(gradient.shape[1]):
                for b in range(nb):
                    gradient[k, a, b0 + b] += block_gradient[k, a, b]


@njit(**_COMPILE)
def harmonic_bonds(positions, gradient, energy, with_gradient, start, stop, pairs, length, half_k):
    """``k/2 (r - r0)^2``; pairs ``(M, 2)``, length, half_k ``(M,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
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
        _store(gradient, energy, b0, g, e, with_gradient)


@njit(**_COMPILE)
def harmonic_angles(positions, gradient, energy, with_gradient, start, stop, triples, angle, half_k):
    """``k/2 (theta - theta0)^2`` of the angle i-j-k; triples ``(M, 3)``, angle, half_k ``(M,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
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
                gi[0, b], gi[1, b], gi[2, b] = ci * (ay * nz - az * ny), ci * (az * nx - ax * nz), ci * (ax * ny - ay * nx)
                gk[0, b], gk[1, b], gk[2, b] = ck * (ny * bz - nz * by), ck * (nz * bx - nx * bz), ck * (nx * by - ny * bx)
            if with_gradient:
                _add_rows(g, i, gi, 1.0)
                _add_rows(g, k, gk, 1.0)
                _add_rows(g, j, gi, -1.0)
                _add_rows(g, j, gk, -1.0)
        _store(gradient, energy, b0, g, e, with_gradient)


@njit(**_COMPILE)
def periodic_torsions(positions, gradient, energy, with_gradient, start, stop, quadruples, offsets, periodicity, cos_phase, sin_phase, k):
    """``k (1 + cos(n phi - phi0))`` of the dihedral i-j-k-l; quadruples ``(M, 4)`` distinct, each with
    the terms ``offsets[m] <= t < offsets[m + 1]``, sorted by their integer periodicity ``n``.
    ``cos(n phi)`` and ``sin(n phi)`` come from ``(cos phi + i sin phi)^n``: no transcendental
    function at all."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
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
                y = math.sqrt(b2x * b2x + b2y * b2y + b2z * b2z) * (b1x * n2x + b1y * n2y + b1z * n2z)  # phi = atan2(y, x)
                x = n1x * n2x + n1y * n2y + n1z * n2z
                h = math.sqrt(x * x + y * y)
                cos_phi[b], sin_phi[b] = (x / h, y / h) if h > 0.0 else (1.0, 0.0)
                cos_n[b], sin_n[b], slope[b] = 1.0, 0.0, 0.0
            power = 0
            for t in range(offsets[m], offsets[m + 1]):
                n, kt, cp, sp = periodicity[t], k[t], cos_phase[t], sin_phase[t]
                while power < n:
                    for b in range(nb):
                        cos_n[b], sin_n[b] = cos_n[b] * cos_phi[b] - sin_n[b] * sin_phi[b], sin_n[b] * cos_phi[b] + cos_n[b] * sin_phi[b]
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
                roles[1, 0, b], roles[1, 1, b], roles[1, 2, b] = f3 * glx - (1.0 + f1) * gix, f3 * gly - (1.0 + f1) * giy, f3 * glz - (1.0 + f1) * giz
                roles[2, 0, b], roles[2, 1, b], roles[2, 2, b] = f1 * gix - (1.0 + f3) * glx, f1 * giy - (1.0 + f3) * gly, f1 * giz - (1.0 + f3) * glz
            _add_rows(g, i, roles[0], 1.0)
            _add_rows(g, j, roles[1], 1.0)
            _add_rows(g, kk, roles[2], 1.0)
            _add_rows(g, l, roles[3], 1.0)
        _store(gradient, energy, b0, g, e, with_gradient)


@njit(**_COMPILE)
def coulomb_lennard_jones(positions, gradient, energy, with_gradient, start, stop, pairs, coulomb, sigma_squared, four_epsilon):
    """``c/r + 4 eps ((sigma/r)^12 - (sigma/r)^6)``; pairs ``(P, 2)``, the rest ``(P,)``."""
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
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
        _store(gradient, energy, b0, g, e, with_gradient)


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
        dl - du + 0.25 * u2_l2 + 0.5 * r * (u * du - l * dl)
        - 0.5 * inverse_r * (u + dl / l + inverse_r * log_ratio)
        + 0.25 * s_squared * inverse_r * (inverse_r * u2_l2 + 2.0 * (l * dl - u * du))
    )
    if engulfed:
        term += two_over_rho - 2.0 * l
        slope -= 2.0 * dl
    if r <= -engulfed_below:  # rho_i >= r + s_j
        return 0.0, 0.0
    return term, slope * inverse_r


@njit(**_COMPILE)
def obc2(positions, gradient, energy, with_gradient, start, stop, pairs, rho, s, s_squared, engulfed_below, two_over_rho,
         charge_products, half_charge_squared, surface, radius, offset_radius, prefactor, alpha, beta, gamma):
    """OBC2 with the ACE surface term (``torch_energy.OBC2``). Pairs ``(P, 2)`` ``i < j``;
    ``rho, s, s_squared, engulfed_below, two_over_rho`` ``(2, P)``: row 0 for atom i's integral over
    j, row 1 for j's over i; charge_products ``(P,)``; the rest per atom ``(N,)``; scalars: the
    polarisation prefactor (kJ/mol nm/e^2) and the OBC2 rescaling's alpha, beta, gamma."""
    n, n_pairs = radius.shape[0], pairs.shape[0]
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
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
                        r[b], inverse_r[b], ratio[side, b], lower[side, b], upper[side, b],
                        rho[side, m], s[side, m], s_squared[side, m], engulfed_below[side, m], two_over_rho[side, m],
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
                chain[a, b] = (0.5 * offset_radius[a] * radius_a * radius_a / radius[a] * (1.0 - tanh_sum * tanh_sum)
                               * (alpha - psi * (2.0 * beta - 3.0 * gamma * psi)))
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
        _store(gradient, energy, b0, g, e, with_gradient)


# Custom forces: kernels generated from their Lepton expressions -------------------------------------
_CODE = {  # Lepton function -> Python code (numba), given its arguments' code
    **{name: f"math.{name}({{0}})" for name in (
        "sqrt", "exp", "log", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "erf", "erfc",
    )},
    "floor": "np.floor({0})",  # a float, as Lepton's (math.floor gives an integer)
    "ceil": "np.ceil({0})",
    "atan2": "math.atan2({0}, {1})",
    "sec": "(1.0 / math.cos({0}))",
    "csc": "(1.0 / math.sin({0}))",
    "cot": "(1.0 / math.tan({0}))",
    "step": "(1.0 if {0} >= 0.0 else 0.0)",
    "delta": "(1.0 if {0} == 0.0 else 0.0)",
    "square": "({0} * {0})",
    "cube": "({0} * {0} * {0})",
    "recip": "(1.0 / {0})",
    "min": "min({0}, {1})",
    "max": "max({0}, {1})",
    "abs": "abs({0})",
    "select": "({1} if {0} != 0.0 else {2})",
}
_KERNEL = """
def kernel(positions, gradient, energy, with_gradient, start, stop, particles, values):
    n = positions.shape[1]
    for b0 in range(start, stop, BLOCK):
        nb = min(stop - b0, BLOCK)
        p, g, e = np.empty(({n_axes}, n, nb)), np.zeros(({n_gradient_axes}, n, nb)), np.zeros(nb)
        d = np.empty(({n_slopes}, nb))
{copy}
        for m in range(particles.shape[0]):
{per_term}
            if with_gradient:
                for b in range(nb):
{per_configuration}
{gradient}
            else:
                for b in range(nb):
{energy_only}
        for b in range(nb):
            energy[b0 + b] += e[b]
        if with_gradient:
{store}
"""
_ROWS = """for a in range(n):
    for b in range(nb):
        {0}"""
_generated: dict = {}  # kernel inputs -> compiled kernel, in this process
_PRELUDE = "import math\n\nimport numpy as np\n\nfrom openflow.plugins.openmm.cpu_kernels import BLOCK, _block, _store\n"
_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # a changed helper is a new kernel file


def cache_folder() -> Path:
    """Where generated kernels are written as modules, for numba to cache their machine code beside
    them: ``$OPENFLOW_CACHE_DIR/kernels``, by default ``~/.cache/openflow/kernels``."""
    return Path(os.environ.get("OPENFLOW_CACHE_DIR") or Path.home() / ".cache" / "openflow") / "kernels"


def _compiled(source: str):
    """``kernel`` of ``source``, jitted. Written (atomically) as a module in ``cache_folder()`` so that
    numba caches it on disk: a later process loads it instead of compiling (seconds for CustomGB);
    compiled in memory only where that folder cannot be written."""
    text = _PRELUDE + source
    name = f"kernel_{hashlib.sha256(text.encode()).hexdigest()[:20]}_{_VERSION}"
    path = cache_folder() / f"{name}.py"
    try:
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        spec = importlib.util.spec_from_file_location(f"openflow_{name}", path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # numba's cache imports it by name
        spec.loader.exec_module(module)
        return njit(**_COMPILE)(module.kernel)
    except (OSError, RuntimeError):  # RuntimeError: numba finds no writable place for its cache
        namespace = {}
        exec(compile(text, "<openflow generated kernel>", "exec"), namespace)  # noqa: S102 - generated here
        return njit(**dict(_COMPILE, cache=False))(namespace["kernel"])


def expression_kernel(energy: tuple, slopes: list, n_particles: int, columns: list):
    """A kernel (the signature above; parameters ``particles`` ``(M, n_particles)`` int64 and ``values``
    ``(M, len(columns))``) of the sum over terms ``m`` of one expression.

    ``energy`` and ``slopes`` are Lepton trees (``lepton``) whose leaves are numbers, the variables
    named in ``columns`` (read from ``values[m]``) and ``("coordinate", axis, slot)`` (component
    ``axis`` of atom ``particles[m, slot]``); ``slopes`` lists ``(axis, slot, dE/dcoordinate)``.
    Common subexpressions are computed once. Generated and compiled once per process and input.
    """
    key = (energy, tuple(slopes), n_particles, tuple(columns))
    if key not in _generated:
        _generated[key] = _compiled(_source(*key))
    return _generated[key]


class _Code:
    """Straight-line code for Lepton trees: one line ``{prefix}{k} = ...`` per distinct subtree (shared
    subtrees computed once), appended to ``lines``; ``symbols`` gives the code of the leaves
    (variables and coordinates), numbers are literals."""

    def __init__(self, symbols: dict, prefix: str = "t"):
        self.symbols, self.prefix, self.lines, self.names = symbols, prefix, [], {}

    def __call__(self, node: tuple) -> str:
        if node in self.names:
            return self.names[node]
        kind = node[0]
        if kind == "number":
            return repr(float(node[1]))
        if kind in ("variable", "coordinate"):
            text = self.symbols[node]
        elif kind == "negate":
            text = f"(-{self(node[1])})"
        elif kind == "call":
            text = _CODE[node[1]].format(*map(self, node[2]))
        elif kind == "^" and node[2][0] == "number" and node[2][1] == int(node[2][1]) and 1 <= abs(node[2][1]) <= 16:
            text = self._power(self(node[1]), int(node[2][1]))
        else:
            text = f"({self(node[1])} {'**' if kind == '^' else kind} {self(node[2])})"
        return self._line(node, text)

    def _line(self, node, text: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        if node is not None:
            self.names[node] = name
        return name

    def _power(self, base: str, n: int) -> str:
        """``base ** n`` for integer ``1 <= |n| <= 16`` by repeated squaring (a vectorisable product, not ``pow``)."""
        factors, square, k = [], base, abs(n)
        while k:
            if k & 1:
                factors.append(square)
            k >>= 1
            if k:
                square = self._line(None, f"{square} * {square}")
        product = " * ".join(factors)
        return f"({product})" if n > 0 else f"(1.0 / ({product}))"


def _source(energy: tuple, slopes: tuple, n_particles: int, columns: tuple) -> str:
    """Python source of ``expression_kernel``'s kernel."""
    axes = sorted({node[1] for node in coordinate_leaves(energy)})
    gradient_axes = sorted({axis for axis, _, _ in slopes})
    symbols = {("variable", name): f"v{c}" for c, name in enumerate(columns)}
    symbols.update({leaf: f"p[{axes.index(leaf[1])}, a{leaf[2]}, b]" for leaf in coordinate_leaves(energy)})
    code = _Code(symbols)
    result = code(energy)
    energy_lines = [*code.lines, f"e[b] += {result}"]
    stores = [f"d[{s}, b] = {code(slope)}" for s, (_, _, slope) in enumerate(slopes)]
    per_term = [f"a{slot} = particles[m, {slot}]" for slot in range(n_particles)]
    per_term += [f"v{c} = values[m, {c}]" for c in range(len(columns))]
    adds = [f"g[{gradient_axes.index(axis)}, a{slot}, b] += d[{s}, b]" for s, (axis, slot, _) in enumerate(slopes)]
    copy = [_ROWS.format(f"p[{row}, a, b] = positions[{axis}, a, b0 + b]") for row, axis in enumerate(axes)]
    store = [_ROWS.format(f"gradient[{axis}, a, b0 + b] += g[{row}, a, b]") for row, axis in enumerate(gradient_axes)]
    return _KERNEL.format(
        n_slopes=len(slopes), n_axes=len(axes), n_gradient_axes=len(gradient_axes),
        copy=_indent(copy, 8), store=_indent(store, 12),
        per_term=_indent(per_term, 12), per_configuration=_indent([*code.lines, f"e[b] += {result}", *stores], 20),
        gradient=_indent(["for b in range(nb):", *("    " + a for a in adds)] if adds else [], 16),
        energy_only=_indent(energy_lines, 20),
    )


_GB_KERNEL = """
def kernel(positions, gradient, energy, with_gradient, start, stop, pairs_kept, pairs_all, params, constants):
    n = positions.shape[1]
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = _block(positions, b0, stop)
        val, adj = np.zeros(({n_values}, n, nb)), np.zeros(({n_values}, n, nb))  # computed values, dE/dvalue
{forward}
        if with_gradient:
{backward}
        _store(gradient, energy, b0, g, e, with_gradient)
"""
_PAIR_LOOP = """for m in range({pairs}.shape[0]):
    i, j = {pairs}[m, 0], {pairs}[m, 1]
    for b in range(nb):
"""
_SINGLE_LOOP = """for a in range(n):
    for b in range(nb):
"""


def gb_kernel(values: tuple, energies: tuple):
    """The kernel of a ``CustomGBForce`` (parameters ``pairs_kept``, ``pairs_all`` ``(P, 2)`` with
    ``i < j``, ``params`` ``(N, q)``, ``constants`` ``(c,)``): the computed values in order, the energy
    terms, and, backwards through them, the gradient.

    ``values`` and ``energies`` list ``(kind, tree, roles)``: kind ``"single"``, ``"pair"`` (excluded
    pairs left out) or ``"pair_all"``; the tree in coordinate leaves (slot 0: the particle itself or
    particle 1 of a pair, slot 1: particle 2); ``roles`` the pairs ``(variable, (what, index, side))``,
    what ``"param"``, ``"value"`` or ``"constant"``, side 0 or 1 (particle 1 or 2). A pair value of
    particle i sums its expression over j with i as particle 1; pair energies sum over ``i < j``.
    """
    key = (values, energies)
    if key not in _generated:
        _generated[key] = _compiled(_gb_source(values, energies))
    return _generated[key]


def _gb_symbols(tree: tuple, roles: tuple, atoms: tuple) -> dict:
    """Code of the leaves of a CustomGB tree for particles ``atoms`` (their loop variables)."""
    symbols = {leaf: f"p[{leaf[1]}, {atoms[leaf[2]]}, b]" for leaf in coordinate_leaves(tree)}
    for name, (what, index, side) in roles:
        symbols[("variable", name)] = {
            "param": f"params[{atoms[side]}, {index}]", "value": f"val[{index}, {atoms[side]}, b]", "constant": f"constants[{index}]",
        }[what]
    return symbols


def _gb_lines(tree: tuple, roles: tuple, atoms: tuple, prefix: str, use: str | None = None, scale: str | None = None) -> list:
    """Lines computing ``tree`` for particles ``atoms``: ``use`` (a template of its value ``{}``), or,
    with ``scale`` (the code of dE/d(tree)), adding its derivatives into ``adj`` and ``g``."""
    code = _Code(_gb_symbols(tree, roles, atoms), prefix)
    if scale is None:
        value = code(tree)
        return [*code.lines, use.format(value)]
    targets = sorted(coordinate_leaves(tree)) + [("variable", name) for name, (what, _, _) in roles if what == "value"]
    for target in targets:
        slope = derivative(tree, target)
        if slope is not None:
            if target[0] == "coordinate":
                destination = f"g[{target[1]}, {atoms[target[2]]}, b]"
            else:
                _, index, side = dict(roles)[target[1]]
                destination = f"adj[{index}, {atoms[side]}, b]"
            code.lines.append(f"{destination} += {scale} * {code(slope)}")
    return code.lines


def _gb_loop(kind: str, body: list) -> str:
    """``body`` inside the loop over the configurations of every particle (single) or pair."""
    loop = _SINGLE_LOOP if kind == "single" else _PAIR_LOOP.format(pairs="pairs_kept" if kind == "pair" else "pairs_all")
    return loop + "\n".join(" " * 8 + line for line in body or ["pass"])


def _gb_source(values: tuple, energies: tuple) -> str:
    """Python source of ``gb_kernel``'s kernel."""
    forward, backward = [], []
    for k, (kind, tree, roles) in enumerate(values):
        directions = [("a",)] if kind == "single" else [("i", "j"), ("j", "i")]  # a pair value: both particles' sums
        store = "=" if kind == "single" else "+="
        forward.append(_gb_loop(kind, [line for d, atoms in enumerate(directions)
                                       for line in _gb_lines(tree, roles, atoms, f"v{k}_{d}_", f"val[{k}, {atoms[0]}, b] {store} {{}}")]))
        backward.insert(0, _gb_loop(kind, [line for d, atoms in enumerate(directions) for line in (
            f"s{k}_{d} = adj[{k}, {atoms[0]}, b]", *_gb_lines(tree, roles, atoms, f"w{k}_{d}_", scale=f"s{k}_{d}"))]))
    for t, (kind, tree, roles) in enumerate(energies):
        atoms = ("a",) if kind == "single" else ("i", "j")
        forward.append(_gb_loop(kind, _gb_lines(tree, roles, atoms, f"e{t}_", "e[b] += {}")))
        backward.insert(0, _gb_loop(kind, _gb_lines(tree, roles, atoms, f"f{t}_", scale="1.0")))
    return _GB_KERNEL.format(n_values=max(len(values), 1), forward=_indent(forward, 8), backward=_indent(backward, 12))


def _indent(blocks: list, spaces: int) -> str:
    """Lines of code (each may hold several) indented by ``spaces``; ``pass`` if there are none."""
    return "\n".join(" " * spaces + line for block in blocks or ["pass"] for line in block.split("\n"))


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` threads (a forked child makes its own)."""
    key = (os.getpid(), threads)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="openflow-kernels")
    return _pools[key]


def evaluate(kernels: list, positions: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """Sum of ``kernels`` (``(kernel, parameters)`` pairs) at positions ``(3, N, B)`` nm (a float32 or
    float64 CPU tensor of any strides): energies ``(B,)`` kJ/mol (float64); adds ``dE/dpositions``
    into ``gradient`` ``(3, N, B)`` (same dtype, any strides) unless it is ``None``."""
    p = positions.detach().numpy()  # float32 or float64: the kernels read either, and compute in float64
    energy = np.zeros(p.shape[-1])
    with_gradient = gradient is not None
    out = gradient.numpy() if with_gradient else p  # never written without gradient; the same array type: one compiled version

    def run(start: int, stop: int) -> None:
        for kernel, parameters in kernels:
            kernel(p, out, energy, with_gradient, start, stop, *parameters)

    n_blocks = -(-len(energy) // BLOCK)
    threads = min(_torch_threads["saved"] if _torch_threads["depth"] else torch.get_num_threads(), n_blocks)
    edges = [BLOCK * (n_blocks * t // threads) for t in range(threads)] + [len(energy)]
    if threads <= 1:
        run(0, len(energy))
    else:
        list(_pool(threads).map(run, edges[:-1], edges[1:]))
    return torch.from_numpy(energy)


@contextmanager
def torch_on_one_thread():
    """Meanwhile torch's own ops run on one thread and ``evaluate`` takes torch's thread count.

    After each parallel op torch's OpenMP workers spin for a while, on the cores the kernels'
    threads need: around the kernels, torch's small ops (layout, checks) are better serial (OBC2 at
    batch 1024 on 2 cores: 84-102k instead of 55-70k evaluations/s). Nested and concurrent uses
    share one saved setting, restored when the last one leaves.
    """
    with _torch_threads["lock"]:
        if _torch_threads["depth"] == 0:
            _torch_threads["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads["depth"] += 1
    try:
        yield
    finally:
        with _torch_threads["lock"]:
            _torch_threads["depth"] -= 1
            if _torch_threads["depth"] == 0:
                torch.set_num_threads(_torch_threads["saved"])
