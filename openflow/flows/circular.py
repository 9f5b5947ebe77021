"""Flows on the torus: densities of ``k`` angles ``theta (B, k)`` rad in ``[-pi, pi)``.

    marginal = circular_flow(2, n_layers=4)          # z (B, 2) ~ N(0, I) -> (phi, psi) on the torus
    torus = BoltzmannGenerator(StandardNormal(2), marginal)

:class:`GaussianToCircle` sends each unit-Gaussian coordinate onto the circle through its CDF
(``theta = 2 pi Phi(z) - pi``: uniform angles), then :class:`CircularSplineCoupling` layers reshape
the density with periodic rational-quadratic splines (a circle diffeomorphism with the same slope
at ``+-pi``) followed by a rotation, each angle conditioned on the others through their
``(cos, sin)``. Nothing is cut open: densities and their derivatives are continuous across ``+-pi``.
All layers follow the protocol of :mod:`openflow.flows.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from openflow.geometry import wrap_angle

from .base import Flow, SequentialFlow
from .coupling import MaskedCoupling, check_batch, coupling_masks, mlp
from .spline import check_bins_and_bound, rational_quadratic_spline

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_TINY = 1e-15  # keeps Phi^-1 finite at the ends of the circle (float64)


class GaussianToCircle(Flow):
    """``z (B, k)`` in R^k -> ``theta = 2 pi Phi(z) - pi`` in ``[-pi, pi)^k``: a unit Gaussian becomes
    the uniform density on the torus. ``log|dtheta/dz| = sum_k [log 2 pi + log N(z_k)]``; evaluated
    in float64 (the CDF saturates early in float32), returned in the input's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)

    def forward(self, z):
        check_batch(z, self.dim, "z")
        z64 = z.double()
        theta = wrap_angle(2.0 * math.pi * torch.special.ndtr(z64) - math.pi)
        logdet = (math.log(2.0 * math.pi) - _HALF_LOG_2PI - 0.5 * z64 * z64).sum(1)
        return theta.to(z.dtype), logdet.to(z.dtype)

    def inverse(self, x):
        check_batch(x, self.dim, "theta")
        fraction = (wrap_angle(x.double()) + math.pi) / (2.0 * math.pi)
        z = torch.special.ndtri(fraction.clamp(_TINY, 1.0 - _TINY))
        logdet = (_HALF_LOG_2PI + 0.5 * z * z - math.log(2.0 * math.pi)).sum(1)
        return z.to(x.dtype), logdet.to(x.dtype)


class CircularSplineCoupling(MaskedCoupling):
    """Angles with ``mask == 0`` go through a periodic rational-quadratic spline on ``[-pi, pi)``
    and a rotation, ``theta' = wrap(spline(theta) + shift)``, whose ``3 * bins + 1`` parameters come
    from an MLP of the conditioning angles' ``(cos, sin)``; angles with ``mask == 1`` pass unchanged.
    Every dimension is an angle. The output layer starts at zero: the layer starts as the identity.
    """

    def __init__(
        self,
        mask: torch.Tensor | Sequence[int],
        hidden: Sequence[int] = (32, 32),
        activation: str | Callable[[], nn.Module] = "silu",
        bins: int = 8,
    ):
        check_bins_and_bound(bins, math.pi)
        super().__init__(mask, circular=range(len(mask)))
        self.bins = int(bins)
        self.conditioner = mlp(self.n_features, self.n_trans * (3 * self.bins + 1), hidden, activation, zero_last=True)

    def _transform(self, y: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.conditioner(self.features(y)).view(y.shape[0], self.n_trans, 3 * self.bins + 1)
        widths, heights, derivatives, shift = params.split([self.bins, self.bins, self.bins, 1], dim=-1)
        theta = y.index_select(1, self.trans_idx)
        if inverse:
            theta = theta - shift.squeeze(-1)
        out, logabsdet = rational_quadratic_spline(
            theta, widths, heights, derivatives, inverse=inverse, bound=math.pi, periodic=True
        )
        if not inverse:
            out = out + shift.squeeze(-1)
        return y.index_copy(1, self.trans_idx, wrap_angle(out)), logabsdet.sum(dim=1)


def circular_flow(
    dim: int,
    n_layers: int = 4,
    hidden: Sequence[int] = (32, 32),
    bins: int = 8,
    activation: str | Callable[[], nn.Module] = "silu",
) -> SequentialFlow:
    """A flow from ``z (B, dim)`` (unit Gaussian side) to ``dim >= 2`` angles ``(B, dim)`` rad:
    :class:`GaussianToCircle`, then ``n_layers`` :class:`CircularSplineCoupling` layers with
    alternating masks (each angle is reshaped given the others every other layer)."""
    if int(dim) < 2:
        raise ValueError(f"a circular coupling flow needs dim >= 2 angles, got {dim}")
    if int(n_layers) < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return SequentialFlow(
        GaussianToCircle(dim),
        *(
            CircularSplineCoupling(m, hidden, activation, bins)
            for m in coupling_masks(int(dim), int(n_layers), "alternate")
        ),
    )
