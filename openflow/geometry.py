"""Distances, angles and dihedrals in torch, once for the whole package (OpenMM's conventions).

Every function takes positions whose Cartesian components lie along ``dim`` (default the last
axis: ``(..., 3)``; the batched force field lays them out first, ``(3, M, B)``, and passes
``dim=0``) and returns the quantity with that axis removed. Units follow the input (nm in, nm
out); angles are radians: bond angles in ``[0, pi]``, dihedrals in ``(-pi, pi]`` with the IUPAC
sign (mdtraj's, and ``theta`` of OpenMM's ``CustomTorsionForce``), both in ``atan2`` form, which
stays accurate near 0 and pi. The ``*_and_gradient`` forms also return the derivative with
respect to each input point, each shaped like the inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def dot(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``a . b`` along ``dim``."""
    return (a * b).sum(dim)


def _last(tensor: torch.Tensor, dim: int) -> bool:
    return dim == -1 or dim == tensor.ndim - 1


def cross(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``a x b`` along ``dim``: torch's own on the last axis, written out elsewhere (where
    ``torch.linalg.cross`` is slow)."""
    if _last(a, dim):
        return torch.linalg.cross(a, b, dim=-1)
    a0, a1, a2 = a.unbind(dim)
    b0, b1, b2 = b.unbind(dim)
    return torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], dim)


def norm(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``|v|`` along ``dim``: torch's own on the last axis, ``sqrt(v . v)`` elsewhere."""
    return torch.linalg.vector_norm(v, dim=-1) if _last(v, dim) else dot(v, v, dim).sqrt()


def distance(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``|b - a|``."""
    return norm(b - a, dim)


def distance_and_gradient(a: torch.Tensor, b: torch.Tensor, dim: int = -1):
    """``(r, [dr/da, dr/db])``."""
    delta = b - a
    r = dot(delta, delta, dim).sqrt()
    direction = delta / r.unsqueeze(dim)
    return r, [-direction, direction]


def angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Angle ``a-b-c`` at ``b`` in ``[0, pi]``."""
    u, v = a - b, c - b
    return torch.atan2(norm(cross(u, v, dim), dim), dot(u, v, dim))


def angle_and_gradient(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dim: int = -1):
    """``(theta, [dtheta/da, dtheta/db, dtheta/dc])``."""
    u, v = a - b, c - b
    normal = cross(u, v, dim)
    sine = dot(normal, normal, dim).sqrt()
    theta = torch.atan2(sine, dot(u, v, dim))
    grad_a = cross(u, normal, dim) / (dot(u, u, dim) * sine).unsqueeze(dim)  # (u (u.v) - v |u|^2) / (|u|^2 |u x v|)
    grad_c = cross(normal, v, dim) / (dot(v, v, dim) * sine).unsqueeze(dim)
    return theta, [grad_a, -(grad_a + grad_c), grad_c]


def dihedral_parts(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, dim: int = -1):
    """``(y, x)`` with ``dihedral = atan2(y, x)``, both scaled by ``|n1| |n2|``: ``y = |b2| b1 . n2``,
    ``x = n1 . n2`` (``b1 = b - a``, ``b2 = c - b``, ``b3 = d - c``, ``n1 = b1 x b2``, ``n2 = b2 x b3``)."""
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = cross(b1, b2, dim), cross(b2, b3, dim)
    return norm(b2, dim) * dot(b1, n2, dim), dot(n1, n2, dim)


def dihedral(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """IUPAC dihedral ``a-b-c-d`` in ``(-pi, pi]`` (the same for ``d-c-b-a``)."""
    return torch.atan2(*dihedral_parts(a, b, c, d, dim))


def dihedral_sin_cos(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, dim: int = -1):
    """``(sin, cos)`` of the dihedral, without an angle in between (smooth across +-pi)."""
    y, x = dihedral_parts(a, b, c, d, dim)
    r = torch.sqrt(x * x + y * y)
    return y / r, x / r


def dihedral_and_gradient(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, dim: int = -1):
    """``(phi, [dphi/da, dphi/db, dphi/dc, dphi/dd])`` (Blondel-Karplus)."""
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = cross(b1, b2, dim), cross(b2, b3, dim)
    b2_squared = dot(b2, b2, dim)
    b2_length = b2_squared.sqrt()
    phi = torch.atan2(b2_length * dot(b1, n2, dim), dot(n1, n2, dim))
    grad_a = n1 * (-b2_length / dot(n1, n1, dim)).unsqueeze(dim)
    grad_d = n2 * (b2_length / dot(n2, n2, dim)).unsqueeze(dim)
    f1 = (dot(b1, b2, dim) / b2_squared).unsqueeze(dim)
    f3 = (dot(b3, b2, dim) / b2_squared).unsqueeze(dim)
    return phi, [grad_a, f3 * grad_d - (1.0 + f1) * grad_a, f1 * grad_a - (1.0 + f3) * grad_d, grad_d]


def wrap_angle(theta):
    """Angles (a torch tensor, or anything numpy reads: float64 array out) modulo ``2 pi`` into ``[-pi, pi)``."""
    if not isinstance(theta, torch.Tensor):
        theta = np.asarray(theta, dtype=np.float64)
    return (theta + math.pi) % (2.0 * math.pi) - math.pi
