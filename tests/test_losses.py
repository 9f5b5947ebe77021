"""Losses against closed forms: Gaussian free energies and cross-entropies, the optimal
flow-matching velocity between two Gaussians, and the handling of non-finite energies."""

import math

import pytest
import torch

from openflow.flows.base import BoltzmannGenerator
from openflow.flows.coupling import ActNorm
from openflow.flows.priors import StandardNormal
from openflow.losses import flow_matching, nll, reverse_kl, soft_cap_energy

LOG_2PI = math.log(2 * math.pi)
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
SIGMA = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64)
DIM = 3


def gaussian_model(shift, log_scale):
    """q = N(shift, diag(exp(2 log_scale))) as a prior + diagonal affine flow, float64."""
    flow = ActNorm(len(shift), data_init=False)
    model = BoltzmannGenerator(StandardNormal(len(shift)), flow).double()
    with torch.no_grad():
        flow.shift.copy_(torch.as_tensor(shift, dtype=torch.float64))
        flow.log_scale.copy_(torch.as_tensor(log_scale, dtype=torch.float64))
    return model


def gaussian_energy(x, mu=MU, sigma=SIGMA):
    """u(x) = |(x - mu) / sigma|^2 / 2 in kT; its free energy is -sum log(sqrt(2 pi) sigma)."""
    return 0.5 * ((x - mu) / sigma).pow(2).sum(dim=1)


def gaussian_free_energy(sigma):
    return -(0.5 * LOG_2PI + torch.log(sigma)).sum().item()


def kl_gaussians(mean_q, log_std_q, mean_p, std_p):
    """KL(q || p) of diagonal Gaussians."""
    var_q = torch.exp(2 * log_std_q)
    return (torch.log(std_p) - log_std_q + (var_q + (mean_q - mean_p) ** 2) / (2 * std_p**2) - 0.5).sum().item()


# ----------------------------------------------------------------------------- nll
def test_nll_matches_gaussian_log_density_and_cross_entropy():
    torch.manual_seed(0)
    shift, log_scale = torch.tensor([0.3, -0.5, 1.5]), torch.tensor([0.1, 0.4, 0.5])
    model = gaussian_model(shift, log_scale)
    x = MU + SIGMA * torch.randn(100_000, DIM, dtype=torch.float64)
    loss = nll(model, x)
    direct = torch.distributions.Normal(shift.double(), torch.exp(log_scale.double())).log_prob(x).sum(1)
    assert loss.item() == pytest.approx(-direct.mean().item(), abs=1e-10)
    # E_p[-log q] = H(p) + KL(p || q) >= H(p)
    entropy = (0.5 * LOG_2PI + 0.5 + torch.log(SIGMA)).sum().item()
    var_q = torch.exp(2 * log_scale.double())
    cross_entropy = (0.5 * LOG_2PI + log_scale.double() + (SIGMA**2 + (MU - shift) ** 2) / (2 * var_q)).sum().item()
    stderr = direct.std().item() / math.sqrt(len(x))
    assert loss.item() == pytest.approx(cross_entropy, abs=5 * stderr)
    assert loss.item() > entropy + 20 * stderr
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nll_of_the_true_model_is_the_entropy():
    torch.manual_seed(1)
    model = gaussian_model(MU, torch.log(SIGMA))
    x = MU + SIGMA * torch.randn(100_000, DIM, dtype=torch.float64)
    entropy = (0.5 * LOG_2PI + 0.5 + torch.log(SIGMA)).sum().item()
    stderr = model.log_prob(x).std().item() / math.sqrt(len(x))
    assert nll(model, x).item() == pytest.approx(entropy, abs=5 * stderr)


def test_nll_weights_and_errors():
    torch.manual_seed(2)
    model = gaussian_model(MU, torch.log(SIGMA))
    x = torch.randn(6, DIM, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    log_q = model.log_prob(x)
    assert nll(model, x, w).item() == pytest.approx(-(w * log_q).sum().item() / w.sum().item(), abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        nll(model, x[0])
    with pytest.raises(ValueError, match="non-negative"):
        nll(model, x, -w)
    with pytest.raises(TypeError):
        nll(model, x.numpy())


# ---------------------------------------------------------------------- reverse KL
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_reverse_kl_is_the_exact_free_energy_when_the_model_is_the_target(beta):
    """For q = exp(-beta u) / Z_beta every sample gives beta u + log q = -log Z_beta."""
    torch.manual_seed(3)
    sigma_beta = SIGMA / math.sqrt(beta)
    model = gaussian_model(MU, torch.log(sigma_beta))
    loss, stats = reverse_kl(model, gaussian_energy, 1000, beta=beta)
    exact = gaussian_free_energy(sigma_beta)
    assert loss.item() == pytest.approx(exact, abs=1e-10)
    assert stats["free_energy_kT"] == pytest.approx(exact, abs=1e-10)
    assert stats["free_energy_stderr_kT"] < 1e-10
    assert stats["n_nonfinite"] == 0 and stats["frac_nonfinite"] == 0.0


def test_reverse_kl_is_an_upper_bound_with_reparametrised_gradients():
    torch.manual_seed(4)
    shift, log_scale = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([-0.3, 0.2, 0.1])
    model = gaussian_model(shift, log_scale)
    n = 200_000
    loss, stats = reverse_kl(model, gaussian_energy, n)
    free_energy = gaussian_free_energy(SIGMA)
    expected = free_energy + kl_gaussians(shift.double(), log_scale.double(), MU, SIGMA)
    stderr = stats["free_energy_stderr_kT"]
    assert 0 < stderr < 0.01
    assert stats["free_energy_kT"] == pytest.approx(expected, abs=5 * stderr)
    assert stats["free_energy_kT"] > free_energy + 20 * stderr
    assert loss.item() == pytest.approx(stats["free_energy_kT"], abs=1e-10)
    loss.backward()
    flow = model.flow
    # dF_q/db = (b - mu) / sigma^2,  dF_q/ds = exp(2 s) / sigma^2 - 1
    torch.testing.assert_close(flow.shift.grad, (shift.double() - MU) / SIGMA**2, atol=0.02, rtol=0)
    torch.testing.assert_close(flow.log_scale.grad, torch.exp(2 * log_scale.double()) / SIGMA**2 - 1, atol=0.02, rtol=0)


def poisoned_energy(x, a=1.0):
    """Gaussian energy plus terms that are +inf (x0 <= -a) or NaN (x1 < -a), with NaN forces there."""
    return gaussian_energy(x) - torch.log(torch.relu(x[:, 0] + a)) + torch.sqrt(x[:, 1] + a)


def test_reverse_kl_drops_and_counts_nonfinite_energies_without_poisoning_gradients():
    model = gaussian_model(torch.zeros(DIM), torch.zeros(DIM))
    n = 4000
    torch.manual_seed(5)
    loss, stats = reverse_kl(model, poisoned_energy, n)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)

    # the same samples, evaluated only where the energy is finite
    model.zero_grad()
    torch.manual_seed(5)
    x, log_q = model.sample(n)
    keep = (x[:, 0] > -1.0) & (x[:, 1] >= -1.0)
    n_inf, n_nan = int((x[:, 0] <= -1.0).sum()), int(((x[:, 0] > -1.0) & (x[:, 1] < -1.0)).sum())
    assert n_inf > 100 and n_nan > 100
    assert stats["n_nonfinite"] == n - int(keep.sum())
    assert stats["frac_nonfinite"] == pytest.approx((n - int(keep.sum())) / n)
    assert stats["n_nonfinite_log_q"] == 0
    reference = (poisoned_energy(x[keep]) + log_q[keep]).mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    assert stats["free_energy_kT"] == pytest.approx(reference.item(), abs=1e-12)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-12, rtol=1e-10)

    # the injected energies do poison a naive masked mean: the test above is meaningful
    model.zero_grad()
    torch.manual_seed(5)
    x, log_q = model.sample(n)
    u = poisoned_energy(x)
    finite = torch.isfinite(u)
    (u[finite] + log_q[finite]).mean().backward()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())


class NonFiniteLogQ(torch.nn.Module):
    """A Gaussian model whose log q is NaN where x_2 > 1 (as from an overflowing flow)."""

    def __init__(self):
        super().__init__()
        self.inner = gaussian_model(torch.zeros(DIM), torch.zeros(DIM))

    def sample(self, n):
        x, log_q = self.inner.sample(n)
        return x, torch.where(x[:, 2] > 1.0, torch.full_like(log_q, math.nan), log_q)


def test_reverse_kl_drops_and_counts_nonfinite_log_q():
    model = NonFiniteLogQ()
    torch.manual_seed(12)
    loss, stats = reverse_kl(model, gaussian_energy, 2000)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.manual_seed(12)
    x, log_q = model.inner.sample(2000)
    keep = x[:, 2] <= 1.0
    assert stats["n_nonfinite"] == 0 and stats["n_nonfinite_log_q"] == 2000 - int(keep.sum()) > 100
    assert loss.item() == pytest.approx((gaussian_energy(x[keep]) + log_q[keep]).mean().item(), abs=1e-12)


def test_reverse_kl_with_no_finite_energy_returns_nan_loss():
    model = gaussian_model(torch.zeros(DIM), torch.zeros(DIM))
    loss, stats = reverse_kl(model, lambda x: torch.full((x.shape[0],), math.inf, dtype=x.dtype), 50)
    assert math.isnan(loss.item())
    assert stats["n_nonfinite"] == 50 and stats["frac_nonfinite"] == 1.0


def test_soft_cap_energy_is_linear_then_logarithmic_then_constant():
    u = torch.tensor([-5.0, 0.0, 10.0, 11.0, 1e3, 1e30, 2e30], dtype=torch.float64, requires_grad=True)
    capped = soft_cap_energy(u, u_high=10.0)
    expected = torch.where(u > 10, 10 + torch.log(1 + u - 10), u)
    torch.testing.assert_close(capped, expected, atol=1e-12, rtol=1e-12)
    capped.sum().backward()
    torch.testing.assert_close(u.grad, torch.where(u > 10, 1 / (1 + u - 10), torch.ones_like(u)).detach())
    # continuous value and slope at u_high
    eps = 1e-7
    below, above = soft_cap_energy(torch.tensor([10 - eps, 10 + eps], dtype=torch.float64), u_high=10.0)
    assert (above - below).item() == pytest.approx(2 * eps, rel=1e-6)
    # u_max: constant (zero gradient) above it
    u2 = torch.tensor([5.0, 50.0, 200.0, 1e9], dtype=torch.float64, requires_grad=True)
    capped2 = soft_cap_energy(u2, u_high=10.0, u_max=100.0)
    assert capped2[2].item() == capped2[3].item() == pytest.approx(10 + math.log(91.0))
    capped2.sum().backward()
    assert u2.grad[2].item() == u2.grad[3].item() == 0.0
    assert soft_cap_energy(u2.detach(), u_max=100.0).tolist() == [5.0, 50.0, 100.0, 100.0]
    with pytest.raises(ValueError, match="u_max"):
        soft_cap_energy(u2, u_high=10.0, u_max=5.0)


def test_reverse_kl_soft_cap_changes_the_loss_not_the_statistics():
    model = gaussian_model(torch.zeros(DIM), torch.zeros(DIM))
    torch.manual_seed(6)
    loss, stats = reverse_kl(model, gaussian_energy, 2000, u_high=1.0, u_max=20.0)
    torch.manual_seed(6)
    x, log_q = model.sample(2000)
    u = gaussian_energy(x)
    assert (u > 1.0).float().mean() > 0.5
    assert loss.item() == pytest.approx((soft_cap_energy(u, 1.0, 20.0) + log_q).mean().item(), abs=1e-12)
    assert stats["free_energy_kT"] == pytest.approx((u + log_q).mean().item(), abs=1e-12)
    assert stats["energy_mean_kT"] == pytest.approx(u.mean().item(), abs=1e-12)
    assert stats["log_q_mean"] == pytest.approx(log_q.mean().item(), abs=1e-12)
    assert loss.item() < stats["free_energy_kT"] - 0.5


def test_reverse_kl_rejects_bad_input():
    model = gaussian_model(torch.zeros(DIM), torch.zeros(DIM))
    with pytest.raises(ValueError, match="one value per sample"):
        reverse_kl(model, lambda x: gaussian_energy(x)[:, None], 10)
    with pytest.raises(ValueError, match="n must"):
        reverse_kl(model, gaussian_energy, 0)
    with pytest.raises(ValueError, match="beta"):
        reverse_kl(model, gaussian_energy, 10, beta=0.0)
    with pytest.raises(ValueError, match="u_max"):
        reverse_kl(model, gaussian_energy, 10, u_high=5.0, u_max=1.0)


# ------------------------------------------------------------------- flow matching
S1 = 2.0  # x0 ~ N(0, I), x1 ~ N(MU, S1^2 I), independent


def optimal_velocity(t, x):
    """E[x1 - x0 | x_t = x] for the Gaussian pair: mu + c(t) (x - t mu)."""
    t = t[:, None]
    c = (t * S1**2 - (1 - t)) / ((1 - t) ** 2 + t**2 * S1**2)
    return MU + c * (x - t * MU)


def minimal_loss(t):
    """E|x1 - x0 - v*(t, x_t)|^2: the conditional variance, summed over dimensions."""
    cov = t * S1**2 - (1 - t)
    return DIM * (1 + S1**2 - cov**2 / ((1 - t) ** 2 + t**2 * S1**2))


def gaussian_pair(n, seed):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    x1 = MU + S1 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    return x0, x1


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_flow_matching_loss_of_the_optimal_velocity_is_the_conditional_variance(t):
    x0, x1 = gaussian_pair(200_000, seed=7)
    loss = flow_matching(optimal_velocity, x0, x1, t=t)
    tt = torch.full((len(x0),), t, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * x1
    per_sample = (optimal_velocity(tt, x_t) - (x1 - x0)).pow(2).sum(1)
    assert loss.item() == pytest.approx(per_sample.mean().item(), abs=1e-10)
    stderr = per_sample.std().item() / math.sqrt(len(x0))
    assert loss.item() == pytest.approx(minimal_loss(t), abs=5 * stderr)

    # stationarity: any perturbation g raises the loss only at second order
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    loss_eps = flow_matching(lambda s, x: optimal_velocity(s, x) + eps * torch.sin(3 * x), x0, x1, t=t)
    (slope,) = torch.autograd.grad(loss_eps, eps)
    cross = 2 * ((optimal_velocity(tt, x_t) - (x1 - x0)) * torch.sin(3 * x_t)).sum(1)
    assert abs(slope.item()) < 5 * cross.std().item() / math.sqrt(len(x0))


def test_flow_matching_prefers_the_true_velocity_over_wrong_ones():
    x0, x1 = gaussian_pair(50_000, seed=8)
    generator = torch.Generator().manual_seed(9)
    seen = []

    def recording(t, x):
        seen.append(t)
        return optimal_velocity(t, x)

    best = flow_matching(recording, x0, x1, generator=generator)
    t = seen[0]
    assert t.shape == (len(x0),) and 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    # same generator seed, same t: reproducible
    again = flow_matching(optimal_velocity, x0, x1, generator=torch.Generator().manual_seed(9))
    assert again.item() == best.item()
    # the expectation over t ~ U(0, 1) of the conditional variance
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    assert best.item() == pytest.approx(torch.trapezoid(minimal_loss(grid), grid).item(), rel=0.02)
    mean_only = flow_matching(lambda t, x: MU.expand_as(x), x0, x1, generator=torch.Generator().manual_seed(9))
    shifted = flow_matching(
        lambda t, x: optimal_velocity(t, x) + 0.2, x0, x1, generator=torch.Generator().manual_seed(9)
    )
    assert mean_only.item() > best.item() + 0.5
    assert shifted.item() == pytest.approx(best.item() + DIM * 0.04, abs=0.02)


def test_flow_matching_weights_are_normalised():
    x0, x1 = gaussian_pair(8, seed=10)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    per_sample = (optimal_velocity(t, (1 - t[:, None]) * x0 + t[:, None] * x1) - (x1 - x0)).pow(2).sum(1)
    w = torch.tensor([0.0, 1.0, 3.0, 0.5, 0.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    weighted = flow_matching(optimal_velocity, x0, x1, t=t, weights=w)
    assert weighted.item() == pytest.approx(((w * per_sample).sum() / w.sum()).item(), abs=1e-12)
    assert flow_matching(optimal_velocity, x0, x1, t=t, weights=1e6 * w).item() == pytest.approx(
        weighted.item(), abs=1e-12
    )
    uniform = flow_matching(optimal_velocity, x0, x1, t=t, weights=torch.full((8,), 0.3, dtype=torch.float64))
    assert uniform.item() == pytest.approx(flow_matching(optimal_velocity, x0, x1, t=t).item(), abs=1e-12)
    keep = w > 0
    subset = flow_matching(optimal_velocity, x0[keep], x1[keep], t=t[keep], weights=w[keep])
    assert subset.item() == pytest.approx(weighted.item(), abs=1e-12)
    for bad, message in (
        (-w, "non-negative"),
        (torch.zeros(8), "all be zero"),
        (w[:5], "shape"),
        (torch.full((8,), math.nan), "finite"),
    ):
        with pytest.raises(ValueError, match=message):
            flow_matching(optimal_velocity, x0, x1, t=t, weights=bad)


def test_flow_matching_rejects_mismatched_shapes():
    x0, x1 = gaussian_pair(8, seed=11)
    with pytest.raises(ValueError, match="same shape"):
        flow_matching(optimal_velocity, x0, x1[:, :2])
    with pytest.raises(ValueError, match="shape of x_t"):
        flow_matching(lambda t, x: x[:, :2], x0, x1)
    with pytest.raises(ValueError, match="t must"):
        flow_matching(optimal_velocity, x0, x1, t=torch.rand(5))
    with pytest.raises(ValueError, match="shape"):
        flow_matching(optimal_velocity, x0[0], x1[0])
