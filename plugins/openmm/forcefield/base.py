"""What every force-field term shares: the internal layout, the ``Term`` base class, gathers and
scatters by particle index, parameter columns, and the geometry of ``openflow.geometry``.

Internally positions are laid out ``(3, N, B)`` nm: the batch is the contiguous innermost
dimension, so gathers copy whole rows, every elementwise op runs over long vectors and a
component is a contiguous ``(N, B)`` block. Per-term quantities are ``(M, B)``, per-term
parameters ``(M, 1)`` columns (they broadcast against ``(M, B)``), particle indices ``(M, k)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from openflow import geometry

_VALUE = {"distance": geometry.distance, "angle": geometry.angle, "dihedral": geometry.dihedral}
_WITH_GRADIENT = {
    "distance": geometry.distance_and_gradient,
    "angle": geometry.angle_and_gradient,
    "dihedral": geometry.dihedral_and_gradient,
}


def gather(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``positions[:, index]`` ``(3, M, B)`` of positions ``(3, N, B)``, with an index_add backward."""
    return positions.index_select(1, index)


def scatter(gradient: torch.Tensor | None, index: torch.Tensor, values: torch.Tensor, sign: float = 1.0) -> None:
    """``gradient[:, index] += sign * values`` in place (repeated indices add up, no temporary for
    the sign); no-op without ``gradient``."""
    if gradient is not None:
        gradient.index_add_(1, index, values, alpha=sign)


def scatter_chain(gradient: torch.Tensor, columns, grads: list, slope: torch.Tensor) -> None:
    """``gradient[:, columns[a]] += slope * grads[a]`` for each particle ``a`` of the terms (the chain
    rule through a distance, angle or dihedral: ``slope`` ``(M, B)`` is ``dE/dvalue``)."""
    for index, grad in zip(columns, grads):
        scatter(gradient, index, grad * slope)


def measure(name: str, positions: torch.Tensor, indices, with_gradient: bool = False):
    """``openflow.geometry``'s ``distance``, ``angle`` or ``dihedral`` (``name``) of the particles
    ``indices`` (2, 3 or 4 index tensors ``(M,)``, in order) at positions ``(3, N, B)``: ``(M, B)``
    (nm or radians); with_gradient: ``(value, [dvalue/dp of each particle, each (3, M, B)])``."""
    points = [gather(positions, index) for index in indices]
    return (_WITH_GRADIENT if with_gradient else _VALUE)[name](*points, dim=0)


def index_table(values, width: int) -> torch.Tensor:
    """Particle indices as an ``(M, width)`` int64 tensor (``M`` may be 0)."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64).reshape(-1, width))


def column(values) -> torch.Tensor:
    """Per-term parameters as an ``(M, 1)`` float64 column (broadcasts against ``(M, B)``)."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1, 1))


def kernel_arrays(*arrays) -> tuple:
    """Contiguous numpy copies for a CPU kernel: integers as int64, the rest float64; torch
    columns ``(M, 1)`` (per-term parameters) become ``(M,)``."""
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.numpy().reshape(-1) if a.ndim == 2 and a.shape[1] == 1 else a.numpy()
        out.append(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float64))
    return tuple(out)


def sum_terms(value, positions: torch.Tensor, n_terms: int) -> torch.Tensor:
    """Sum per-term energies (anything broadcastable to ``(M, B)``) over the terms: ``(B,)``."""
    if not isinstance(value, torch.Tensor):
        value = positions.new_tensor(value)
    return value.expand(n_terms, positions.shape[-1]).sum(0)


class Term(nn.Module):
    """A force's energy ``(3, N, B) nm -> (B,) kJ/mol``. ``forward`` is differentiable by autograd;
    ``energy_gradient(positions, gradient)`` returns the same energies and adds ``dE/dpositions``
    into ``gradient`` ``(3, N, B)`` in place, analytically where the subclass writes it out
    (``gradient=None``: energies only); this default uses autograd on ``forward``.
    ``cpu_kernel()`` gives the compiled CPU kernel of the same energy, if the force has one."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.energy_gradient(positions, None)

    def cpu_kernel(self) -> tuple | None:
        """``(kernel, parameters)`` for ``parallel.evaluate`` (float64 parameters), or ``None``."""
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
