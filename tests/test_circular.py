"""Flows on the torus and angle-aware couplings: periodic splines (continuous with equal slopes across
+-pi), the Gaussian-to-circle map, circular couplings (exact inverse and log-det against autograd,
normalised densities, continuity across +-pi), conditioning on angles through (cos, sin), the
subset flow, and a weighted maximum-likelihood fit of a torus density that wraps around +-pi."""

import math

import pytest
import torch
from helpers import randomize_

from openflow.flows.base import BoltzmannGenerator, SubsetFlow
from openflow.flows.circular import CircularSplineCoupling, GaussianToCircle, circular_flow, wrap_angle
from openflow.flows.priors import StandardNormal
from openflow.flows.spline import SplineCoupling, rational_quadratic_spline, spline_flow
from openflow.losses import nll

BINS = 6


def periodic_params(n: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, BINS, generator=g, dtype=torch.float64) for _ in range(3)]


def angles(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.rand(n, dim, generator=g, dtype=torch.float64) - 1) * math.pi


def jacobian_log_det(function, points: torch.Tensor) -> torch.Tensor:
    """``log|det d function / d x|`` per row of ``points (B, k)`` by autograd."""
    return torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(function, p))[1] for p in points])


# ----- the periodic spline -------------------------------------------------------------------


def test_periodic_spline_is_a_circle_map_with_equal_end_slopes():
    params = [p.expand(3, -1) for p in periodic_params(1, seed=1, scale=2.0)]
    ends = torch.tensor([-math.pi, math.pi - 1e-9, -math.pi + 1e-9], dtype=torch.float64)
    y, log_slope = rational_quadratic_spline(ends, *params, bound=math.pi, periodic=True)
    torch.testing.assert_close(y[0], torch.tensor(-math.pi, dtype=torch.float64), atol=1e-12, rtol=0)
    assert y[1] == pytest.approx(math.pi, abs=1e-7) and y[2] == pytest.approx(-math.pi, abs=1e-7)
    assert log_slope[1] == pytest.approx(log_slope[2].item(), abs=1e-6)  # the derivative is continuous across +-pi
    assert abs(log_slope[1].item()) > 0.05, "random parameters should give a boundary slope other than 1"
    # inputs are read modulo 2 pi
    x = angles(200, 1, seed=2)[:, 0]
    many = [p.expand(200, -1) for p in periodic_params(1, seed=1)]
    shifted = rational_quadratic_spline(x + 2 * math.pi, *many, bound=math.pi, periodic=True)[0]
    torch.testing.assert_close(
        shifted, rational_quadratic_spline(x, *many, bound=math.pi, periodic=True)[0], atol=1e-12, rtol=0
    )


def test_periodic_spline_round_trip_and_log_det_against_autograd():
    x = angles(500, 1, seed=3)[:, 0].requires_grad_(True)
    params = periodic_params(500, seed=4)
    y, log_slope = rational_quadratic_spline(x, *params, bound=math.pi, periodic=True)
    (dy_dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(log_slope, dy_dx.log(), atol=1e-10, rtol=0)
    back, log_slope_inverse = rational_quadratic_spline(y.detach(), *params, inverse=True, bound=math.pi, periodic=True)
    torch.testing.assert_close(back, x.detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(log_slope_inverse, -log_slope.detach(), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="derivatives"):
        rational_quadratic_spline(x.detach(), params[0], params[1], params[2][:, 1:], bound=math.pi, periodic=True)


# ----- Gaussian to circle ---------------------------------------------------------------------


def test_gaussian_to_circle_gives_uniform_angles_exactly_inverted():
    layer = GaussianToCircle(2)
    z = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theta, logdet = layer(z)
    assert theta.min() >= -math.pi and theta.max() < math.pi
    # uniform: the empirical CDF stays within 5 standard errors of the straight line
    ordered = torch.sort(theta[:, 0]).values
    gap = (ordered - torch.linspace(-math.pi, math.pi, len(ordered), dtype=torch.float64)).abs().max() / (2 * math.pi)
    assert gap < 5 * 0.5 / math.sqrt(len(ordered))
    # the density of theta is uniform: log N(z) - logdet = -2 log(2 pi)
    log_q = StandardNormal(2).double().log_prob(z) - logdet
    torch.testing.assert_close(log_q, torch.full_like(log_q, -2 * math.log(2 * math.pi)), atol=1e-9, rtol=0)
    back, logdet_inverse = layer.inverse(theta[:1000])
    torch.testing.assert_close(back, z[:1000], atol=1e-7, rtol=0)
    torch.testing.assert_close(logdet_inverse, -logdet[:1000], atol=1e-7, rtol=0)
    assert torch.isfinite(layer.inverse(torch.tensor([[-math.pi, math.pi]], dtype=torch.float64))[0]).all()


# ----- circular couplings and torus flows -----------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_circular_flow_is_identity_at_start_then_an_exact_bijection(dim):
    torch.manual_seed(0)
    couplings = circular_flow(dim, n_layers=3, hidden=(16,), bins=BINS).double().layers[1:]
    theta = angles(64, dim, seed=6)
    for layer in couplings:
        out, logdet = layer(theta)
        torch.testing.assert_close(out, theta, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)
    flow = randomize_(circular_flow(dim, n_layers=3, hidden=(16,), bins=BINS).double(), seed=7, scale=0.5)
    z = torch.randn(64, dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x, logdet = flow(z)
    assert x.min() >= -math.pi and x.max() < math.pi
    z_back, logdet_inverse = flow.inverse(x)
    torch.testing.assert_close(z_back, z, atol=1e-7, rtol=0)
    torch.testing.assert_close(logdet_inverse, -logdet, atol=1e-7, rtol=0)
    torch.testing.assert_close(
        logdet[:8], jacobian_log_det(lambda v: flow(v.unsqueeze(0))[0][0], z[:8]), atol=1e-8, rtol=0
    )


def test_circular_coupling_log_det_against_autograd_and_continuity_across_pi():
    layer = randomize_(CircularSplineCoupling([1, 0], hidden=(16,), bins=BINS).double(), seed=9, scale=0.5)
    theta = angles(16, 2, seed=10) * 0.99  # the Jacobian of the wrapped map, away from the wrap itself
    _, logdet = layer(theta)
    autograd = jacobian_log_det(lambda v: layer(v.unsqueeze(0))[0][0], theta)
    # wrapping adds multiples of 2 pi only: it does not change the derivative
    torch.testing.assert_close(logdet, autograd, atol=1e-9, rtol=0)
    # the density of a randomised torus flow is continuous across +-pi in both angles
    flow = randomize_(circular_flow(2, n_layers=4, hidden=(16,), bins=BINS).double(), seed=11, scale=0.5)
    model = BoltzmannGenerator(StandardNormal(2).double(), flow)
    t = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)
    for column in (0, 1):
        below, above = torch.stack([t, t], 1), torch.stack([t, t], 1)
        below[:, column], above[:, column] = math.pi - 1e-7, -math.pi + 1e-7
        torch.testing.assert_close(model.log_prob(below), model.log_prob(above), atol=1e-5, rtol=0)


def test_torus_density_is_normalised():
    # parameters of scale 0.2 give a smooth density (peak 6x the uniform one) that a 300-point grid resolves
    flow = randomize_(circular_flow(2, n_layers=4, hidden=(16,), bins=BINS).double(), seed=12, scale=0.2)
    model = BoltzmannGenerator(StandardNormal(2).double(), flow)
    n = 300
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 * math.pi - math.pi
    points = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = model.log_prob(points).exp().sum() * (2 * math.pi / n) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-4)
    assert model.log_prob(points).max().item() > -2 * math.log(2 * math.pi) + 1.5, "the density should not be uniform"


def test_weighted_likelihood_learns_a_density_that_wraps_around_pi():
    """Two von Mises-like modes, one sitting on the cut at +-pi, drawn from a uniform proposal and
    weighted: the weighted NLL of the trained torus flow comes within 0.05 nats of the target's
    entropy (the exact optimum), far below the uniform density's."""
    g = torch.Generator().manual_seed(13)
    theta = angles(20_000, 2, seed=14)
    centres = torch.tensor([[math.pi, 0.5], [-1.2, -2.0]], dtype=torch.float64)
    log_target = torch.logsumexp(torch.stack([(3.0 * torch.cos(theta - c)).sum(1) for c in centres]), 0)
    weights = torch.softmax(log_target, 0)
    torch.manual_seed(0)
    model = BoltzmannGenerator(StandardNormal(2), circular_flow(2, n_layers=4, hidden=(32,), bins=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    data, w = theta.float(), (weights * len(weights)).float()
    for _ in range(400):
        pick = torch.randint(0, len(data), (1024,), generator=g)
        loss = nll(model, data[pick], w[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the target's normalised log-density on the grid gives its entropy, the lowest possible NLL
    n = 200
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2 * math.pi - math.pi
    points = torch.cartesian_prod(grid, grid)
    log_p = torch.logsumexp(torch.stack([(3.0 * torch.cos(points - c)).sum(1) for c in centres]), 0)
    log_p = log_p - torch.logsumexp(log_p, 0) - 2 * math.log(2 * math.pi / n)
    entropy = -(log_p.exp() * log_p).sum() * (2 * math.pi / n) ** 2
    with torch.no_grad():
        achieved = nll(model, data, w).item()
    assert achieved < entropy.item() + 0.05
    assert achieved < 2 * math.log(2 * math.pi) - 1.0  # far from uniform


# ----- angles as conditioning inputs; the subset flow -------------------------------------------


def test_couplings_see_conditioning_angles_as_cos_and_sin():
    layer = randomize_(SplineCoupling([1, 0, 1, 0], hidden=(16,), bins=BINS, circular=[2]).double(), seed=15, scale=0.5)
    assert layer.n_features == 3
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    turned = x.clone()
    turned[:, 2] += 2 * math.pi  # the same angle
    torch.testing.assert_close(layer(turned)[0][:, [1, 3]], layer(x)[0][:, [1, 3]], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cannot transform the circular"):
        SplineCoupling([1, 0, 1, 0], circular=[1])
    flow = spline_flow(6, n_layers=4, hidden=(8,), circular=[1, 4])
    for layer in flow.layers:  # every layer conditions on the angles and none transforms them
        assert bool(layer.mask[[1, 4]].all()) and layer.n_trans > 0


def test_subset_flow_moves_only_its_columns():
    torus = randomize_(circular_flow(2, n_layers=2, hidden=(8,), bins=BINS).double(), seed=17, scale=0.5)
    flow = SubsetFlow(torus, [3, 1], dim=5)
    z = torch.randn(10, 5, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    x, logdet = flow(z)
    torch.testing.assert_close(x[:, [0, 2, 4]], z[:, [0, 2, 4]], atol=0, rtol=0)
    expected, expected_logdet = torus(z[:, [3, 1]])
    torch.testing.assert_close(x[:, [3, 1]], expected, atol=0, rtol=0)
    torch.testing.assert_close(logdet, expected_logdet, atol=0, rtol=0)
    back, logdet_inverse = flow.inverse(x)
    torch.testing.assert_close(back, z, atol=1e-7, rtol=0)
    torch.testing.assert_close(logdet_inverse, -logdet, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="distinct columns"):
        SubsetFlow(torus, [1, 1], dim=5)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        flow(torch.zeros(2, 4, dtype=torch.float64))


def test_wrap_angle_lands_in_half_open_interval():
    values = torch.tensor([-3 * math.pi, -math.pi, 0.0, math.pi, 7.0], dtype=torch.float64)
    wrapped = wrap_angle(values)
    assert wrapped.min() >= -math.pi and wrapped.max() < math.pi
    torch.testing.assert_close(torch.cos(wrapped), torch.cos(values), atol=1e-12, rtol=0)
