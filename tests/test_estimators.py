"""Estimators: weights, ESS, free energy, reweighting, and the two exact samplers.

Every check is against a closed form or an exact density: Kish ESS of known weight sets,
Gaussian partition functions and moments, and a 1D double well whose CDF comes from quadrature.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import cumulative_trapezoid
from torch import nn

from openflow.estimators import (
    effective_sample_size,
    free_energy,
    importance_sample,
    independence_metropolis,
    latent_hmc,
    log_weights,
    reweight,
)
from openflow.flows.base import BoltzmannGenerator, Flow

F64 = torch.float64


# --- small test models -----------------------------------------------------------------------


class StandardNormal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def sample(self, n):
        return torch.randn(n, self.dim, dtype=F64)

    def log_prob(self, z):
        return -0.5 * (z**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)


class Affine(Flow):
    """x = scale * z + shift, elementwise."""

    def __init__(self, scale, shift):
        super().__init__()
        self.scale = torch.as_tensor(scale, dtype=F64)
        self.shift = torch.as_tensor(shift, dtype=F64)

    def forward(self, z):
        return self.scale * z + self.shift, torch.log(self.scale.abs()).sum().expand(z.shape[0])

    def inverse(self, x):
        return (x - self.shift) / self.scale, -torch.log(self.scale.abs()).sum().expand(x.shape[0])


class Sinh(Flow):
    """x = scale * sinh(z) + shift, elementwise: nonlinear, so log|det| depends on z."""

    def __init__(self, scale, shift):
        super().__init__()
        self.scale = torch.as_tensor(scale, dtype=F64)
        self.shift = torch.as_tensor(shift, dtype=F64)

    def forward(self, z):
        return self.scale * torch.sinh(z) + self.shift, torch.log(self.scale.abs() * torch.cosh(z)).sum(1)

    def inverse(self, x):
        z = torch.asinh((x - self.shift) / self.scale)
        return z, -torch.log(self.scale.abs() * torch.cosh(z)).sum(1)


class WithoutLogdet(Flow):
    """The same map with its Jacobian dropped: a deliberately wrong latent target."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, z):
        return self.flow(z)[0], z.new_zeros(z.shape[0])


def gaussian_model(scale, shift):
    return BoltzmannGenerator(StandardNormal(len(scale)), Affine(scale, shift))


# --- 1D double well u(x) = a (x^2 - 1)^2 + b x, exact CDF by quadrature ---------------------

A_DW, B_DW = 2.0, 0.5


def double_well(x):
    return A_DW * (x[:, 0] ** 2 - 1) ** 2 + B_DW * x[:, 0]


def exact_cdf(lo=-5.0, hi=5.0):
    grid = np.linspace(lo, hi, 200_001)
    density = np.exp(-(A_DW * (grid**2 - 1) ** 2 + B_DW * grid))
    cdf = cumulative_trapezoid(density, grid, initial=0.0)
    cdf /= cdf[-1]
    return lambda v: np.interp(v, grid, cdf)


def ks_pvalue(samples, cdf):
    return stats.kstest(samples.reshape(-1).numpy(), cdf).pvalue


WALL_LO, WALL_HI = -1.6, 1.2


def walled_double_well(x):
    """Double well with +inf below WALL_LO and NaN above WALL_HI (a failed evaluation)."""
    u = double_well(x)
    u = torch.where(x[:, 0] < WALL_LO, torch.full_like(u, math.inf), u)
    return torch.where(x[:, 0] > WALL_HI, torch.full_like(u, math.nan), u)


IMPERFECT_MODELS = {
    "gaussian": lambda: gaussian_model([0.6], [0.3]),
    "sinh": lambda: BoltzmannGenerator(StandardNormal(1), Sinh([0.8], [0.0])),
}


# --- weights, ESS, free energy ---------------------------------------------------------------


def test_equal_weights_give_full_ess_and_minus_log_w():
    log_w = torch.full((50,), 0.7, dtype=F64)
    assert effective_sample_size(log_w) == pytest.approx(1.0, abs=1e-12)
    for n_bootstrap in (0, 100):
        est = free_energy(log_w, n_bootstrap=n_bootstrap, seed=0)
        assert est.value == pytest.approx(-0.7, abs=1e-12)
        assert est.error == pytest.approx(0.0, abs=1e-12)
        assert (est.ess, est.n, est.n_nonfinite) == (pytest.approx(1.0), 50, 0)


@pytest.mark.parametrize("offset", [0.0, 1000.0, -1000.0])
def test_two_valued_weights_match_closed_form_kish_ess(offset):
    n1, w1, n2, w2 = 30, 1.0, 10, 5.0
    log_w = torch.cat([torch.full((n1,), math.log(w1), dtype=F64), torch.full((n2,), math.log(w2), dtype=F64)])
    log_w = log_w + offset  # overflows exp() in float64 unless done in log space
    n = n1 + n2
    ess = (n1 * w1 + n2 * w2) ** 2 / (n * (n1 * w1**2 + n2 * w2**2))
    assert effective_sample_size(log_w) == pytest.approx(ess, rel=1e-12)
    est = free_energy(log_w, n_bootstrap=0)
    assert est.value == pytest.approx(-math.log((n1 * w1 + n2 * w2) / n) - offset, abs=1e-9)
    assert est.error == pytest.approx(math.sqrt((1 / ess - 1) / n), rel=1e-12)


def test_nonfinite_energies_get_zero_weight_and_are_counted():
    u = torch.tensor([1.0, math.nan, math.inf, -math.inf, 2.0, 0.5], dtype=F64)
    log_q = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, math.nan], dtype=F64)
    log_w = log_weights(u, log_q)
    assert torch.equal(log_w[[1, 2, 3, 5]], torch.full((4,), -math.inf, dtype=F64))
    assert log_w[[0, 4]].tolist() == [-1.0, -2.0]
    est = free_energy(log_w, n_bootstrap=0)
    assert (est.n, est.n_nonfinite) == (6, 4)
    assert est.value == pytest.approx(-math.log((math.exp(-1) + math.exp(-2)) / 6), abs=1e-12)
    none = free_energy(torch.full((4,), -math.inf, dtype=F64))
    assert none.value == math.inf and none.ess == 0.0 and none.n_nonfinite == 4


def gaussian_problem(dim=2, mu=0.4, s=0.8, c0=1.3, t=1.2, m=0.9):
    """Target N(mu, s^2) in `dim` dims with energy known up to c0; proposal N(m, t^2)."""

    def energy(x):
        return ((x - mu) ** 2).sum(1) / (2 * s**2) + c0

    exact_f = c0 - 0.5 * dim * math.log(2 * math.pi * s**2)
    # E_q[w^2] / E_q[w]^2 per dimension, for Gaussian p and q (closed form)
    spread = 2 * t**2 - s**2
    ratio = t**2 / (s * math.sqrt(spread)) * math.exp((mu - m) ** 2 / spread)
    return energy, gaussian_model([t] * dim, [m] * dim), exact_f, ratio**-dim


def test_importance_sampling_free_energy_of_a_gaussian():
    energy, model, exact_f, exact_ess = gaussian_problem()
    big = importance_sample(model, energy, n=40_000, batch_size=8192, seed=1)
    assert big.summary.ess == pytest.approx(exact_ess, rel=0.05)
    assert abs(big.summary.value - exact_f) < 3 * big.summary.error

    repeats = [importance_sample(model, energy, n=2000, batch_size=700, seed=100 + r).summary for r in range(30)]
    values = np.array([e.value for e in repeats])
    errors = np.array([e.error for e in repeats])
    assert np.abs(values - exact_f).max() < 4 * errors.mean()
    # the bootstrap error bar matches the spread over independent repeats (30 repeats: +-13 %)
    assert 0.6 < values.std(ddof=1) / errors.mean() < 1.5
    delta = free_energy(big.log_w, n_bootstrap=0).error
    assert delta == pytest.approx(big.summary.error, rel=0.15)


def test_importance_sample_log_weights_are_aligned_over_batches():
    energy, model, _, _ = gaussian_problem(dim=3)
    out = importance_sample(model, energy, n=1000, batch_size=300, seed=3)
    assert out.x.shape == (1000, 3) and out.log_w.shape == (1000,)
    expected = log_weights(energy(out.x), model.log_prob(out.x))
    torch.testing.assert_close(out.log_w, expected, rtol=1e-12, atol=1e-12)
    again = importance_sample(model, energy, n=1000, batch_size=300, seed=3)
    assert torch.equal(again.x, out.x) and again.summary == out.summary


def test_reweighted_moments_match_the_analytic_ones():
    mu, s = 0.4, 0.8
    energy, model, _, _ = gaussian_problem(dim=1, mu=mu, s=s)
    means, errors = [], []
    for r in range(20):
        out = importance_sample(model, energy, n=3000, seed=200 + r, n_bootstrap=0)
        x = out.x[:, 0]
        res = reweight(torch.stack([x, x**2], 1), out.log_w)
        assert res.mean.shape == res.error.shape == (2,)
        means.append(res.mean.numpy())
        errors.append(res.error.numpy())
    means, errors = np.array(means), np.array(errors)
    exact = np.array([mu, mu**2 + s**2])
    assert (np.abs(means - exact) < 4 * errors).all()
    assert np.abs(means.mean(0) - exact).max() < 4 * errors.mean(0).max() / math.sqrt(20)
    spread_ratio = means.std(0, ddof=1) / errors.mean(0)
    assert ((0.6 < spread_ratio) & (spread_ratio < 1.5)).all()
    scalar = reweight(out.x[:, 0] ** 2, out.log_w)
    assert scalar.mean.shape == () and scalar.mean == pytest.approx(float(means[-1, 1]), rel=1e-12)


def test_reweight_ignores_values_of_zero_weight_samples():
    values = torch.tensor([1.0, math.nan, 3.0], dtype=F64)
    log_w = log_weights(torch.tensor([0.0, math.inf, 0.0], dtype=F64), torch.zeros(3, dtype=F64))
    res = reweight(values, log_w)
    assert res.mean.item() == pytest.approx(2.0) and res.ess == pytest.approx(2 / 3)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        log_weights(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="n_bootstrap"):
        free_energy(torch.zeros(3), n_bootstrap=1)
    with pytest.raises(ValueError, match="NaN"):
        effective_sample_size(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, k\)"):
        reweight(torch.zeros(4), torch.zeros(3))
    model = gaussian_model([1.0], [0.0])
    with pytest.raises(ValueError, match="energy must return"):
        importance_sample(model, lambda x: x, n=10)
    with pytest.raises(ValueError, match="n_steps"):
        independence_metropolis(model, double_well, n_steps=0, n_chains=2)
    with pytest.raises(ValueError, match="thin"):
        independence_metropolis(model, double_well, n_steps=3, n_chains=2, thin=4)
    with pytest.raises(ValueError, match="x0"):
        independence_metropolis(model, double_well, n_steps=3, n_chains=2, x0=torch.zeros(3, 1, dtype=F64))
    with pytest.raises(ValueError, match="step_size"):
        latent_hmc(model.flow, model.prior, double_well, 3, 2, step_size=-0.1, n_leapfrog=2)
    with pytest.raises(ValueError, match="non-finite effective energy"):
        latent_hmc(
            model.flow,
            None,
            walled_double_well,
            3,
            2,
            step_size=0.1,
            n_leapfrog=2,
            z0=torch.tensor([[0.0], [3.0]], dtype=F64),
        )


# --- exact samplers on the double well ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMPERFECT_MODELS))
def test_independence_sampler_reproduces_double_well(name):
    model, cdf = IMPERFECT_MODELS[name](), exact_cdf()
    torch.manual_seed(0)
    raw, _ = model.sample(2000)
    assert ks_pvalue(raw, cdf) < 0.01  # the proposal alone is wrong, and the test sees it
    out = independence_metropolis(model, double_well, n_steps=200, n_chains=2000, seed=1)
    assert out.samples.shape == (200, 2000, 1) and out.n_nonfinite == 0
    assert 0.1 < out.acceptance_rate < 0.9
    assert ks_pvalue(out.samples[-1], cdf) > 0.01  # chains are independent: one state each


def test_latent_hmc_reproduces_double_well_from_a_nonlinear_flow():
    model, cdf = IMPERFECT_MODELS["sinh"](), exact_cdf()
    x0 = torch.linspace(-1.5, 1.5, 2000, dtype=F64).unsqueeze(1)  # a wrong, uniform start
    z0 = model.flow.inverse(x0)[0]
    assert ks_pvalue(x0, cdf) < 0.01
    kwargs = dict(n_steps=100, n_chains=2000, step_size=0.15, n_leapfrog=10, z0=z0, seed=2)
    out = latent_hmc(model.flow, None, double_well, **kwargs)
    assert out.samples.shape == (100, 2000, 1)
    assert out.n_nonfinite < 0.01 * 100 * 2000  # sinh overflows on a few diverging trajectories
    assert (out.chain_acceptance > 0.3).all()
    assert ks_pvalue(out.samples[-1], cdf) > 0.01
    # the KS check sees the Jacobian term: without log|det dg/dz| the chains sample the wrong law
    wrong = latent_hmc(WithoutLogdet(model.flow), None, double_well, **kwargs)
    assert ks_pvalue(wrong.samples[-1], cdf) < 0.01


def test_latent_hmc_starts_from_the_prior_by_default():
    model, cdf = IMPERFECT_MODELS["gaussian"](), exact_cdf()
    out = latent_hmc(
        model.flow, model.prior, double_well, n_steps=100, n_chains=2000, step_size=0.3, n_leapfrog=8, seed=3
    )
    assert 0.5 < out.acceptance_rate < 1.0
    assert ks_pvalue(out.samples[-1], cdf) > 0.01


def test_samplers_reject_nonfinite_energies_and_stay_exact():
    model = IMPERFECT_MODELS["gaussian"]()
    cdf = exact_cdf(WALL_LO, WALL_HI)  # the walls truncate the target
    x0 = torch.full((1000, 1), 5.0, dtype=F64)  # every chain starts with weight 0
    imh = independence_metropolis(model, walled_double_well, 300, 1000, x0=x0, seed=4)
    assert torch.isfinite(imh.samples[10:]).all()
    assert ((imh.samples[10:] >= WALL_LO) & (imh.samples[10:] <= WALL_HI)).all()
    outside = stats.norm(0.3, 0.6).cdf(WALL_LO) + stats.norm(0.3, 0.6).sf(WALL_HI)
    expected, spread = 300 * 1000 * outside, math.sqrt(300 * 1000 * outside)
    assert abs(imh.n_nonfinite - expected) < 5 * spread
    assert ks_pvalue(imh.samples[-1], cdf) > 0.01

    z0 = model.flow.inverse(torch.linspace(-1.0, 1.0, 1000, dtype=F64).unsqueeze(1))[0]
    hmc = latent_hmc(model.flow, None, walled_double_well, 150, 1000, step_size=0.3, n_leapfrog=8, z0=z0, seed=5)
    assert hmc.n_nonfinite > 0 and hmc.acceptance_rate > 0.3
    assert ((hmc.samples >= WALL_LO) & (hmc.samples <= WALL_HI)).all()
    assert ks_pvalue(hmc.samples[-1], cdf) > 0.01


def test_thinning_keeps_every_thin_th_state_and_seeds_reproduce():
    model = IMPERFECT_MODELS["gaussian"]()
    # batch_size 12 with 3 chains: proposals come in blocks of 4 steps, not a multiple of thin
    full = independence_metropolis(model, double_well, 11, 3, seed=6, batch_size=12)
    thinned = independence_metropolis(model, double_well, 11, 3, seed=6, batch_size=12, thin=3)
    assert torch.equal(thinned.samples, full.samples[2::3])
    assert not torch.equal(
        full.samples, independence_metropolis(model, double_well, 11, 3, seed=7, batch_size=12).samples
    )
    kwargs = dict(n_steps=7, n_chains=4, step_size=0.2, n_leapfrog=3, seed=8)
    full = latent_hmc(model.flow, model.prior, double_well, **kwargs)
    thinned = latent_hmc(model.flow, model.prior, double_well, thin=2, **kwargs)
    assert torch.equal(thinned.samples, full.samples[1::2])


def test_state_free_energy_error_bars_cover_the_exact_answer():
    """About 68 % of 1-sigma intervals contain the exact answer, for independent importance-sampled draws
    (uneven weights: the delta method with each side's own ESS) and for a correlated time series (blocks)."""
    from scipy.signal import lfilter
    from scipy.stats import norm

    from openflow.estimators import state_free_energy

    rng = np.random.default_rng(0)
    exact = np.log(norm.cdf(1.0) / norm.sf(1.0))  # F(x > 1) - F(x <= 1) under N(0, 1)
    repeats, n = 400, 2000
    x = rng.normal(0.5, 1.5, (repeats, n))  # proposal N(0.5, 1.5^2): weights vary by two orders of magnitude
    log_w = norm.logpdf(x) - norm.logpdf(x, 0.5, 1.5)
    inside = [abs((r := state_free_energy(x[k] > 1.0, log_w[k])).delta_f - exact) < r.error for k in range(repeats)]
    assert 0.60 <= np.mean(inside) <= 0.76
    # an AR(1) series with unit variance and correlation 0.95 (about 40 frames between independent ones)
    phi, n = 0.95, 20_000
    noise = rng.normal(0.0, np.sqrt(1 - phi**2), (200, n))
    series = lfilter([1.0], [1.0, -phi], noise, axis=1)[:, 200:]  # stationary after ~100 frames
    inside = [abs((r := state_free_energy(s > 1.0, None, n_blocks=20)).delta_f - exact) < r.error for s in series]
    assert 0.55 <= np.mean(inside) <= 0.80
    naive = [abs((r := state_free_energy(s > 1.0)).delta_f - exact) < r.error for s in series]
    assert np.mean(naive) < 0.4  # treating correlated frames as independent: error bars far too small
