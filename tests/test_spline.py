"""Rational-quadratic spline couplings: identity at initialisation, invertibility, exact
log-Jacobians against autograd, monotonicity, identity tails, bad input, and a maximum-likelihood
fit of a bimodal marginal that an affine RealNVP of the same size cannot represent."""

import math

import pytest
import torch
from helpers import randomize_

from openflow.flows.base import BoltzmannGenerator
from openflow.flows.coupling import real_nvp
from openflow.flows.priors import StandardNormal
from openflow.flows.spline import SplineCoupling, rational_quadratic_spline, spline_flow

DIM = 5
BINS = 6
BOUND = 3.0


def random_spline_params(n: int, seed: int, scale: float = 1.0, bins: int = BINS, dtype=torch.float64):
    """Unnormalised ``widths, heights (n, bins)`` and ``derivatives (n, bins - 1)``."""
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, k, generator=g, dtype=dtype) for k in (bins, bins, bins - 1)]


FLOWS = {
    "coupling": lambda: SplineCoupling(torch.arange(DIM) % 2, hidden=(16,), bins=BINS, bound=BOUND),
    "coupling_custom_mask": lambda: SplineCoupling([1, 1, 0, 0, 1], hidden=(8, 8), activation="tanh", bins=3),
    "spline_flow": lambda: spline_flow(DIM, n_layers=3, hidden=(16,), bins=BINS, bound=BOUND),
    "spline_flow_half": lambda: spline_flow(DIM, n_layers=2, hidden=(8,), bins=4, bound=2.0, mask="half"),
}


def inputs(n: int, seed: int, dtype=torch.float64, spread: float = 2.0) -> torch.Tensor:
    """Points spread beyond the bound, so both the spline and the identity tails are exercised."""
    return spread * torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----- the scalar spline ---------------------------------------------------------------------


def test_zero_parameters_give_the_identity():
    x = torch.linspace(-2 * BOUND, 2 * BOUND, 101, dtype=torch.float64)
    widths, heights, derivatives = (torch.zeros(101, k, dtype=torch.float64) for k in (BINS, BINS, BINS - 1))
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, widths, heights, derivatives, inverse=inverse, bound=BOUND)
        torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
        torch.testing.assert_close(logabsdet, torch.zeros_like(x), atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype, scale, tol", [(torch.float64, 1.0, 1e-10), (torch.float32, 0.5, 1e-4)])
def test_spline_round_trip_and_inverse_logdet(dtype, scale, tol):
    x = 1.5 * BOUND * (2 * torch.rand(2000, generator=torch.Generator().manual_seed(3), dtype=dtype) - 1)
    params = random_spline_params(2000, seed=4, scale=scale, dtype=dtype)
    y, logdet = rational_quadratic_spline(x, *params, inverse=False, bound=BOUND)
    x_back, logdet_inv = rational_quadratic_spline(y, *params, inverse=True, bound=BOUND)
    assert y.dtype == dtype and logdet.shape == x.shape
    assert (y - x).abs().max() > 0.1, "random parameters should move the points"
    torch.testing.assert_close(x_back, x, atol=tol, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=tol, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_spline_logdet_matches_autograd(inverse):
    x = 1.3 * BOUND * (2 * torch.rand(500, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 1)
    x.requires_grad_(True)
    params = random_spline_params(500, seed=6)
    y, logabsdet = rational_quadratic_spline(x, *params, inverse=inverse, bound=BOUND)
    (dy_dx,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the gradient is the diagonal
    torch.testing.assert_close(logabsdet, torch.log(dy_dx.abs()), atol=1e-10, rtol=0)


def test_spline_is_monotonic_and_maps_the_interval_onto_itself():
    x = torch.linspace(-BOUND, BOUND, 4001, dtype=torch.float64)
    params = [p.expand(4001, -1) for p in random_spline_params(1, seed=7, scale=2.0)]
    y, _ = rational_quadratic_spline(x, *params, inverse=False, bound=BOUND)
    assert bool((y[1:] > y[:-1]).all())
    torch.testing.assert_close(y[[0, -1]], torch.tensor([-BOUND, BOUND], dtype=torch.float64), atol=1e-12, rtol=0)


def test_identity_outside_the_bound():
    x = torch.tensor([-100.0, -BOUND - 1e-9, BOUND + 0.5, 7.0], dtype=torch.float64)
    params = random_spline_params(4, seed=8, scale=2.0)
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, *params, inverse=inverse, bound=BOUND)
        assert torch.equal(y, x) and torch.equal(logabsdet, torch.zeros_like(x))


# ----- couplings and stacks ------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOWS)
def test_flow_is_identity_at_initialisation(name):
    torch.manual_seed(0)
    flow = FLOWS[name]().double()
    z = inputs(64, seed=1)
    for direction in (flow.forward, flow.inverse):
        out, logdet = direction(z)
        torch.testing.assert_close(out, z, atol=1e-12, rtol=0)
        torch.testing.assert_close(logdet, torch.zeros(64, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_round_trip(name):
    torch.manual_seed(0)
    flow = randomize_(FLOWS[name]().double(), seed=2, scale=0.2)
    z = inputs(256, seed=3)
    x, logdet = flow(z)
    z_back, logdet_inv = flow.inverse(x)
    assert x.shape == z.shape and logdet.shape == (256,)
    assert (x - z).abs().max() > 0.1, "randomised flow should not be the identity"
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_logdet_matches_autograd_jacobian(name):
    torch.manual_seed(0)
    flow = randomize_(FLOWS[name]().double(), seed=4, scale=0.2)
    z = inputs(6, seed=5, spread=1.5)
    for direction in (flow.forward, flow.inverse):
        _, logdet = direction(z)
        for i in range(z.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v, f=direction: f(v.unsqueeze(0))[0].squeeze(0), z[i])
            torch.testing.assert_close(logdet[i], torch.logdet(jac), atol=1e-10, rtol=0)


def test_float32_flow_follows_the_input_dtype():
    torch.manual_seed(0)
    flow = randomize_(FLOWS["spline_flow"](), seed=6, scale=0.1)
    z = inputs(128, seed=7, dtype=torch.float32)
    x, logdet = flow(z)
    z_back, logdet_inv = flow.inverse(x)
    assert x.dtype == logdet.dtype == torch.float32
    torch.testing.assert_close(z_back, z, atol=1e-4, rtol=0)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-4, rtol=0)


# ----- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(bins=1), dict(bins=0), dict(bins=2.5), dict(bound=0.0), dict(bound=-1.0)])
def test_bad_coupling_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        SplineCoupling([1, 0, 1], hidden=(4,), **kwargs)


@pytest.mark.parametrize("mask", [[1, 1, 1], [0, 0], [[1, 0], [0, 1]], [1, 2, 0]])
def test_bad_masks_raise(mask):
    with pytest.raises(ValueError):
        SplineCoupling(mask, hidden=(4,))


def test_bad_shapes_raise():
    flow = spline_flow(3, n_layers=2, hidden=(4,))
    with pytest.raises(ValueError, match="shape"):
        flow(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="shape"):
        flow.inverse(torch.zeros(4))
    with pytest.raises(ValueError):
        spline_flow(1)
    with pytest.raises(ValueError):
        spline_flow(3, n_layers=0)
    x = torch.zeros(4, dtype=torch.float64)
    widths, heights, derivatives = random_spline_params(4, seed=0)
    with pytest.raises(ValueError, match="derivatives"):
        rational_quadratic_spline(x, widths, heights, widths, bound=BOUND)
    with pytest.raises(ValueError, match="heights"):
        rational_quadratic_spline(x, widths, heights[:2], derivatives, bound=BOUND)
    with pytest.raises(ValueError, match="bins"):
        rational_quadratic_spline(x, widths[:, :1], heights[:, :1], derivatives[:, :0], bound=BOUND)
    with pytest.raises(ValueError, match="bound"):
        rational_quadratic_spline(x, widths, heights, derivatives, bound=0.0)


# ----- a bimodal marginal ----------------------------------------------------------------------

MODE, WIDTH = 2.0, 0.4  # x0 ~ (N(-2, 0.4^2) + N(2, 0.4^2)) / 2, x1 ~ N(0, 1), independent


def bimodal_samples(n: int, g: torch.Generator) -> torch.Tensor:
    sign = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x0 = MODE * sign + WIDTH * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([x0, torch.randn(n, generator=g, dtype=torch.float64)], dim=1)


def bimodal_log_prob(x: torch.Tensor) -> torch.Tensor:
    def normal(u, mean, std):
        return -0.5 * ((u - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))

    mixture = torch.logaddexp(normal(x[:, 0], -MODE, WIDTH), normal(x[:, 0], MODE, WIDTH)) - math.log(2.0)
    return mixture + normal(x[:, 1], 0.0, 1.0)


def excess_nll(flow, steps: int = 200, seed: int = 0) -> float:
    """Held-out NLL of an MLE fit minus the true NLL on the same points (a KL estimate, nats)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BoltzmannGenerator(StandardNormal(2), flow).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(steps):
        loss = -model.log_prob(bimodal_samples(256, g)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_test = bimodal_samples(4000, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        return float((bimodal_log_prob(x_test) - model.log_prob(x_test)).mean())


def test_spline_flow_fits_a_bimodal_marginal_that_real_nvp_cannot():
    spline_gap = excess_nll(spline_flow(2, n_layers=2, hidden=(32, 32), bins=8, bound=5.0))
    affine_gap = excess_nll(real_nvp(2, n_layers=2, hidden=(32, 32), actnorm=False))
    assert spline_gap < 0.1, f"spline flow is {spline_gap:.3f} nats above the true NLL"
    assert affine_gap > spline_gap + 0.3, f"real_nvp {affine_gap:.3f} vs spline {spline_gap:.3f} nats"
