"""Neural spline flows: monotonic rational-quadratic spline couplings (Durkan et al. 2019).

Each transformed coordinate goes through a monotonic rational-quadratic spline on
``[-bound, bound]`` with ``K`` bins and is left unchanged outside that interval (linear tails
with slope 1), so the map is a bijection of the real line. Unlike an affine coupling, one spline
can turn a unimodal marginal into a multimodal one (e.g. torsion angles).

All layers follow the protocol of :mod:`openflow.flows.base` on batches ``(B, d)``:
``forward(z) -> (x, log|det dx/dz|)`` and ``inverse(x) -> (z, log|det dz/dx|)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .base import SequentialFlow
from .coupling import MaskedCoupling, coupling_masks, mlp

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(0 + _DERIVATIVE_SHIFT) + MIN_DERIVATIVE == 1: zero parameters give unit knot slopes
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _knots(unnormalized: torch.Tensor, minimum: float, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin sizes ``(..., K)`` (softmax, each at least ``minimum`` of the total) and knot positions
    ``(..., K + 1)`` running from exactly ``-bound`` to exactly ``bound``."""
    n_bins = unnormalized.shape[-1]
    fractions = minimum + (1.0 - minimum * n_bins) * torch.softmax(unnormalized, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0))
    # the first knot is exactly -bound; pin the last one to bound against rounding in the cumsum
    knots = torch.cat([2.0 * bound * knots[..., :-1] - bound, torch.full_like(knots[..., :1], bound)], dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def check_bins_and_bound(bins, bound) -> None:
    if int(bins) != bins or not 2 <= bins < 1.0 / MIN_BIN_WIDTH:
        raise ValueError(f"bins must be an integer in [2, {int(1 / MIN_BIN_WIDTH) - 1}], got {bins}")
    if not float(bound) > 0:
        raise ValueError(f"bound must be > 0, got {bound}")


def _select(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[..., index]`` elementwise: ``values (..., n)``, ``index (...)`` -> ``(...)``."""
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    inputs: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    inverse: bool = False,
    bound: float = 5.0,
    periodic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise monotonic rational-quadratic spline on ``[-bound, bound]``, identity outside.

    ``inputs (...)``; unnormalised ``widths (..., K)``, ``heights (..., K)`` (softmax, minimum bin
    fraction 1e-3) and interior knot slopes ``derivatives (..., K - 1)`` (``1e-3 + softplus(p + c)``
    with ``c`` chosen so that ``p = 0`` gives slope 1); the two boundary slopes are 1.
    All zeros give the identity. Returns ``outputs (...)`` and ``log|d outputs / d inputs| (...)``
    (0 outside the interval). ``inverse=True`` evaluates the inverse map.

    ``periodic=True``: a circle diffeomorphism (Rezende et al. 2020): inputs are read modulo
    ``2 bound`` into ``[-bound, bound)``, ``derivatives`` has shape ``(..., K)`` and its first entry is
    the slope shared by both ends, so the map and its derivative are continuous across ``+-bound``.
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError("inputs must be a floating-point torch.Tensor")
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    n_bins = widths.shape[-1] if widths.dim() > 0 else 0
    if not 2 <= n_bins < 1.0 / max(MIN_BIN_WIDTH, MIN_BIN_HEIGHT):
        raise ValueError(f"the number of bins must be in [2, {int(1 / MIN_BIN_WIDTH) - 1}], got {n_bins}")
    n_slopes = n_bins if periodic else n_bins - 1
    expected = {
        "widths": (*inputs.shape, n_bins),
        "heights": (*inputs.shape, n_bins),
        "derivatives": (*inputs.shape, n_slopes),
    }
    for name, tensor in (("widths", widths), ("heights", heights), ("derivatives", derivatives)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} must have shape {expected[name]} for inputs {tuple(inputs.shape)}, got {tuple(tensor.shape)}"
            )

    bin_widths, x_knots = _knots(widths, MIN_BIN_WIDTH, bound)
    bin_heights, y_knots = _knots(heights, MIN_BIN_HEIGHT, bound)
    positive = MIN_DERIVATIVE + F.softplus(derivatives + _DERIVATIVE_SHIFT)
    if periodic:
        slopes = torch.cat([positive, positive[..., :1]], dim=-1)
        inputs = torch.remainder(inputs + bound, 2.0 * bound) - bound
    else:
        ones = torch.ones_like(derivatives[..., :1])
        slopes = torch.cat([ones, positive, ones], dim=-1)

    inside = (inputs >= -bound) & (inputs <= bound)
    # evaluate the spline on clamped values so the discarded outside branch stays finite
    y = inputs.clamp(-bound, bound)
    knots = y_knots if inverse else x_knots
    bin_index = (y.unsqueeze(-1) >= knots[..., 1:-1]).sum(dim=-1)

    x_k, w = _select(x_knots, bin_index), _select(bin_widths, bin_index)
    y_k, h = _select(y_knots, bin_index), _select(bin_heights, bin_index)
    d_lo, d_hi = _select(slopes, bin_index), _select(slopes, bin_index + 1)
    s = h / w
    curvature = d_hi + d_lo - 2.0 * s

    if inverse:
        dy = y - y_k
        a = h * (s - d_lo) + dy * curvature
        b = h * d_lo - dy * curvature
        c = -s * dy
        discriminant = (b * b - 4.0 * a * c).clamp_min(0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))  # stable root, xi in [0, 1]
        spline_out = x_k + xi * w
    else:
        xi = (y - x_k) / w
    xi_1m = xi * (1.0 - xi)
    denominator = s + curvature * xi_1m
    if not inverse:
        spline_out = y_k + h * (s * xi * xi + d_lo * xi_1m) / denominator
    log_slope = (
        2.0 * torch.log(s)
        + torch.log(d_hi * xi * xi + 2.0 * s * xi_1m + d_lo * (1.0 - xi) ** 2)
        - 2.0 * torch.log(denominator)
    )
    outputs = torch.where(inside, spline_out, inputs)
    logabsdet = torch.where(inside, -log_slope if inverse else log_slope, torch.zeros_like(log_slope))
    return outputs, logabsdet


class SplineCoupling(MaskedCoupling):
    """Rational-quadratic spline coupling: ``x = z`` where ``mask == 1``; every other coordinate
    goes through its own spline on ``[-bound, bound]`` (identity outside) whose ``3 * bins - 1``
    parameters come from an MLP of ``z[mask]``.

    ``mask``: binary ``(d,)`` tensor (a buffer); 1 marks the conditioning (unchanged) dimensions.
    ``circular``: conditioning dimensions that are angles, seen by the conditioner as (cos, sin).
    The conditioner's output layer starts at zero, so the layer starts as the identity.
    """

    def __init__(
        self,
        mask: torch.Tensor | Sequence[int],
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = "silu",
        bins: int = 8,
        bound: float = 5.0,
        circular: Sequence[int] = (),
    ):
        check_bins_and_bound(bins, bound)
        super().__init__(mask, circular)
        self._refuse_transformed_angles()
        self.bins = int(bins)
        self.bound = float(bound)
        self.conditioner = mlp(self.n_features, self.n_trans * (3 * self.bins - 1), hidden, activation, zero_last=True)

    def _transform(self, y: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.conditioner(self.features(y)).view(y.shape[0], self.n_trans, 3 * self.bins - 1)
        widths, heights, derivatives = params.split([self.bins, self.bins, self.bins - 1], dim=-1)
        out, logabsdet = rational_quadratic_spline(
            y.index_select(1, self.trans_idx), widths, heights, derivatives, inverse=inverse, bound=self.bound
        )
        return y.index_copy(1, self.trans_idx, out), logabsdet.sum(dim=1)


def spline_flow(
    dim: int,
    n_layers: int = 6,
    hidden: Sequence[int] = (64, 64),
    bins: int = 8,
    bound: float = 5.0,
    mask: str | torch.Tensor | Sequence = "alternate",
    activation: str | Callable[[], nn.Module] = "silu",
    circular: Sequence[int] = (),
) -> SequentialFlow:
    """A stack of ``n_layers`` :class:`SplineCoupling` layers on ``(B, dim)``.

    ``mask``: as in :func:`openflow.flows.coupling.real_nvp` (``"alternate"``, ``"half"``, a
    ``(dim,)`` binary tensor used with its complement in alternation, or ``(n_layers, dim)``).
    ``circular``: dimensions that are angles: every layer conditions on them as (cos, sin) and none
    transforms them, so the stack models the other dimensions *given* these angles.
    """
    if int(dim) < 2:
        raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
    if int(n_layers) < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return SequentialFlow(
        *(
            SplineCoupling(m, hidden, activation, bins, bound, circular)
            for m in coupling_masks(int(dim), int(n_layers), mask, conditioning=circular)
        )
    )
