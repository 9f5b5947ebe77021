"""Invertible linear flow ``x = exp(A) z`` with a learnable square matrix ``A``.

``log|det exp(A)| = trace(A)`` exactly, the inverse is ``exp(-A)``, and every orientation-
preserving orthogonal map is reachable (``A`` antisymmetric), which is what a point
transformation needs to represent normal modes exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Flow


class LinearExp(Flow):
    """``forward(z) = z @ exp(A)^T``, ``logdet = trace(A)``; starts at the identity (A = 0).

    ``orthogonal=True`` restricts ``A`` to antisymmetric matrices, so ``exp(A)`` is a rotation
    (``logdet = 0``): the exact normal-mode map of a harmonic system in mass-weighted coordinates.
    """

    def __init__(self, dim: int, orthogonal: bool = False):
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        self.orthogonal = bool(orthogonal)
        self.weight = nn.Parameter(torch.zeros(dim, dim))

    @property
    def generator(self) -> torch.Tensor:
        """The matrix ``A`` ``(d, d)``."""
        return self.weight - self.weight.T if self.orthogonal else self.weight

    def matrix(self, sign: float = 1.0) -> torch.Tensor:
        """``exp(sign * A)`` of shape ``(d, d)``."""
        return torch.linalg.matrix_exp(sign * self.generator)

    def _map(self, v: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self.generator
        if v.dim() != 2 or v.shape[1] != generator.shape[0]:
            raise ValueError(f"expected (B, {generator.shape[0]}) input, got {tuple(v.shape)}")
        out = v @ torch.linalg.matrix_exp(sign * generator).to(v.dtype).T
        logdet = (sign * torch.diagonal(generator).sum()).to(v.dtype).expand(v.shape[0])
        return out, logdet

    def forward(self, z):
        return self._map(z, 1.0)

    def inverse(self, x):
        return self._map(x, -1.0)
