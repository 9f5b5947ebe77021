"""Continuous flows (openflow.flows.cnf): exact answers for linear fields, invertibility,
log-Jacobians against autograd, unbiased Hutchinson, symmetries of the Monge-Ampère flow,
adjoint gradients.

Tolerances: float64 dopri5 at rtol = atol = 1e-10 (1e-8 where a test backpropagates through
the solve, to keep it fast) reaches ~1e-9 (~1e-7) on these O(1) maps, and the checks allow
1e-7 (1e-6). Backprop-through-the-solver and adjoint gradients at tolerance tol differ by a few
hundred x tol (measured: 3e-6 at 1e-8, 2e-8 at 1e-10, gradients of O(1)), hence 1e-5 absolute
and 1e-4 relative at 1e-8; a missing term would be off by O(1). Symmetry checks use fixed-step rk4: the discrete map
of an equivariant field is exactly equivariant, so they hold to rounding (1e-8 asked). Test
networks have one time frequency: more make these random fields stiff in t and the solves slow.
"""

import math

import pytest
import torch
from torch import nn

from openflow.flows.cnf import (
    ContinuousFlow,
    MLPPotential,
    MLPVelocity,
    MongeAmpereFlow,
    PotentialVelocity,
    SymmetricPotential,
    exact_divergence,
    hutchinson_divergence,
    rademacher,
)

F64 = torch.float64
TIGHT = dict(method="dopri5", rtol=1e-10, atol=1e-10)
DIFFERENTIABLE = dict(method="dopri5", rtol=1e-8, atol=1e-8)
RK4 = dict(method="rk4", options={"step_size": 0.2})


def standard_normal_log_prob(z):
    return -0.5 * (z * z).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class LinearVelocity(nn.Module):
    """v(t, x) = A x for a fixed matrix A."""

    def __init__(self, matrix):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, t, x):
        return x @ self.matrix.T


def scaled(module, factor):
    """Scale every parameter so that the test maps are far from the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(factor)
    return module


def test_linear_velocity_gives_matrix_exponential_and_gaussian_density():
    torch.manual_seed(0)
    d, t0, t1 = 4, 0.3, 1.5
    a = 0.5 * torch.randn(d, d, dtype=F64)
    flow = ContinuousFlow(LinearVelocity(a), t0=t0, t1=t1, **TIGHT)
    z = torch.randn(64, d, dtype=F64)
    x, logdet = flow(z)
    m = torch.linalg.matrix_exp(a * (t1 - t0))
    torch.testing.assert_close(x, z @ m.T, rtol=0, atol=1e-7)
    torch.testing.assert_close(logdet, torch.full_like(logdet, (t1 - t0) * torch.trace(a).item()), rtol=0, atol=1e-9)
    log_q = standard_normal_log_prob(z) - logdet
    exact = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=F64), m @ m.T).log_prob(x)
    torch.testing.assert_close(log_q, exact, rtol=0, atol=1e-7)
    # and through the inverse, as a Boltzmann generator evaluates log q(x)
    z_back, logdet_inv = flow.inverse(x)
    torch.testing.assert_close(standard_normal_log_prob(z_back) + logdet_inv, exact, rtol=0, atol=1e-7)
    assert flow.nfe > 0


def make_mlp_velocity_flow(**settings):
    velocity = MLPVelocity(3, hidden=(16, 16), time_embedding=1)
    return ContinuousFlow(scaled(velocity, 1.5).double(), **(settings or DIFFERENTIABLE))


def make_monge_ampere_flow(**settings):
    potential = MLPPotential(3, hidden=(16, 16), time_embedding=1)
    return MongeAmpereFlow(scaled(potential, 3.0).double(), **(settings or DIFFERENTIABLE))


@pytest.mark.parametrize("make_flow", [make_mlp_velocity_flow, make_monge_ampere_flow])
def test_inverse_roundtrip_and_logdet_equal_autograd_jacobian(make_flow):
    torch.manual_seed(1)
    flow = make_flow()
    z = torch.randn(3, 3, dtype=F64).requires_grad_(True)
    x, logdet = flow(z)
    assert (x - z).abs().max() > 0.1, "the test map should be far from the identity"
    # samples do not interact, so row i of every sample's Jacobian comes from one backward pass
    jac = torch.stack(
        [torch.autograd.grad(x[:, i].sum(), z, retain_graph=True)[0] for i in range(3)], dim=1
    )  # (B, d, d)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet, rtol=0, atol=1e-6)
    with torch.no_grad():
        z_back, logdet_inv = flow.inverse(x)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-6)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=0, atol=1e-6)


def test_hutchinson_divergence_is_unbiased_pointwise():
    torch.manual_seed(2)
    d = 5
    velocity = scaled(MLPVelocity(d, hidden=(16,)), 2.0).double()
    # all 2^d sign vectors: E[eps_i eps_j] = delta_ij holds exactly over them, so their mean
    # estimate is the exact divergence, while single estimates scatter
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=F64)] * d)
    x = torch.randn(1, d, dtype=F64).expand(len(signs), d).clone().requires_grad_(True)
    v = velocity(torch.tensor(0.4, dtype=F64), x)
    exact = exact_divergence(v, x)
    estimates = hutchinson_divergence(v, x, signs)
    assert estimates.std() > 1e-3, "the probes should scatter: the Jacobian is not diagonal"
    torch.testing.assert_close(estimates.mean(), exact[0], rtol=0, atol=1e-12)
    # the drawn probes are random signs with mean zero
    probes = rademacher((20000, d), x, torch.Generator().manual_seed(0))
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    assert probes.mean(dim=0).abs().max() < 5 / math.sqrt(20000)


def test_hutchinson_logdet_of_a_solve_is_unbiased():
    torch.manual_seed(3)
    d, probes = 4, 4000
    velocity = scaled(MLPVelocity(d, hidden=(16,)), 2.0).double()
    exact_flow = ContinuousFlow(velocity, method="rk4", options={"step_size": 0.25})
    noisy_flow = ContinuousFlow(velocity, method="rk4", options={"step_size": 0.25}, divergence="hutchinson")
    z = torch.randn(1, d, dtype=F64).expand(probes, d)
    with torch.no_grad():
        x_exact, logdet_exact = exact_flow(z[:1])
        x_noisy, logdet_noisy = noisy_flow(z, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_noisy, x_exact.expand(probes, d))
    assert logdet_noisy.std() > 1e-3
    assert abs(logdet_noisy.mean() - logdet_exact[0]) < 5 * logdet_noisy.std() / math.sqrt(probes)


def log_density(flow, x):
    z, logdet = flow.inverse(x)
    return standard_normal_log_prob(z) + logdet


def permute_particles(x, perm, spatial_dim):
    return x.reshape(x.shape[0], -1, spatial_dim)[:, perm].reshape(x.shape)


def rotate_2d(x, angle):
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=x.dtype)
    return (x.reshape(x.shape[0], -1, 2) @ rot.T).reshape(x.shape)


def symmetric_flow(rotation_invariant, divergence="exact"):
    potential = SymmetricPotential(4, 2, hidden=(16, 16), rotation_invariant=rotation_invariant)
    return MongeAmpereFlow(scaled(potential, 3.0).double(), divergence=divergence, **RK4)


def test_monge_ampere_symmetric_potential_permutation_invariant_density():
    torch.manual_seed(4)
    flow = symmetric_flow(rotation_invariant=False)
    x = 1.5 * torch.randn(5, 8, dtype=F64)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        log_q = log_density(flow, x)
        log_q_perm = log_density(flow, permute_particles(x, perm, 2))
    assert (log_q - standard_normal_log_prob(x)).abs().min() > 1e-2, "map should not be trivial"
    torch.testing.assert_close(log_q_perm, log_q, rtol=0, atol=1e-8)
    # the velocity is permutation equivariant, at a scalar time and at per-sample times
    for t in (torch.tensor(0.3, dtype=F64), torch.rand(5, dtype=F64)):
        v = flow.velocity(t, x)
        v_perm = flow.velocity(t, permute_particles(x, perm, 2))
        torch.testing.assert_close(v_perm, permute_particles(v, perm, 2), rtol=0, atol=1e-12)


def test_monge_ampere_rotation_invariant_potential_gives_rotation_invariant_density():
    torch.manual_seed(5)
    x = 1.5 * torch.randn(5, 8, dtype=F64)
    angle = 0.7
    invariant = symmetric_flow(rotation_invariant=True)
    with torch.no_grad():
        torch.testing.assert_close(
            log_density(invariant, rotate_2d(x, angle)), log_density(invariant, x), rtol=0, atol=1e-8
        )
    t = torch.tensor(0.6, dtype=F64)
    torch.testing.assert_close(
        invariant.velocity(t, rotate_2d(x, angle)), rotate_2d(invariant.velocity(t, x), angle), rtol=0, atol=1e-12
    )
    # without the rotation-invariant features the check above must fail
    not_invariant = symmetric_flow(rotation_invariant=False)
    with torch.no_grad():
        change = log_density(not_invariant, rotate_2d(x, angle)) - log_density(not_invariant, x)
    assert change.abs().max() > 1e-4


@pytest.mark.parametrize(
    "make_flow, divergence", [(make_mlp_velocity_flow, "exact"), (make_monge_ampere_flow, "hutchinson")]
)
def test_adjoint_gradients_equal_backprop_gradients(make_flow, divergence):
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(6)
        flow = make_flow(adjoint=adjoint, divergence=divergence, **DIFFERENTIABLE)
        z = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(4, 3).requires_grad_(True)
        x, logdet = flow(z, generator=torch.Generator().manual_seed(2))
        loss = (x.sin() * torch.arange(1.0, 4.0, dtype=F64)).sum() + (logdet * logdet).sum()
        params = list(flow.parameters())
        grads.append(torch.autograd.grad(loss, [z, *params]))
    assert all(g.abs().max() > 0 for g in grads[0])
    for g_backprop, g_adjoint in zip(*grads):
        torch.testing.assert_close(g_adjoint, g_backprop, rtol=1e-4, atol=1e-5)


def test_sampling_under_no_grad_in_float32():
    torch.manual_seed(7)
    flow = ContinuousFlow(MLPVelocity(6, hidden=(16, 16)))
    z = torch.randn(32, 6)
    x, logdet = flow(z)
    with torch.no_grad():
        x_ng, logdet_ng = flow(z)
    assert x_ng.dtype == torch.float32 and not x_ng.requires_grad and not logdet_ng.requires_grad
    torch.testing.assert_close(x_ng, x.detach())
    torch.testing.assert_close(logdet_ng, logdet.detach())
    assert flow.nfe > 0


@pytest.mark.parametrize(
    "velocity", [MLPVelocity(6, hidden=(16,)), PotentialVelocity(SymmetricPotential(3, 2, hidden=(8, 8)))]
)
def test_velocity_accepts_per_sample_times_for_flow_matching(velocity):
    torch.manual_seed(8)
    velocity = velocity.double()
    x, t = torch.randn(5, 6, dtype=F64), torch.rand(5, dtype=F64)
    v = velocity(t, x)
    rows = torch.cat([velocity(t[b], x[b : b + 1]) for b in range(5)])
    torch.testing.assert_close(v, rows, rtol=0, atol=1e-12)
    # a conditional flow-matching step reaches every parameter
    x0, x1 = torch.randn(5, 6, dtype=F64), torch.randn(5, 6, dtype=F64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    ((velocity(t, xt) - (x1 - x0)) ** 2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in velocity.parameters())


def test_bad_input_raises_clear_errors():
    velocity = MLPVelocity(3, hidden=(8,))
    with pytest.raises(ValueError, match="divergence"):
        ContinuousFlow(velocity, divergence="trace")
    with pytest.raises(ValueError, match="solver"):
        ContinuousFlow(velocity, method="rk45")
    with pytest.raises(ValueError, match="t0"):
        ContinuousFlow(velocity, t0=1.0, t1=1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        ContinuousFlow(lambda t, x: x, adjoint=True)
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        ContinuousFlow(velocity)(torch.randn(3))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        ContinuousFlow(velocity)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="velocity returned"):
        ContinuousFlow(lambda t, x: x[:, :1])(torch.randn(2, 3))
    with pytest.raises(ValueError, match="n_particles"):
        SymmetricPotential(1, 3)
    with pytest.raises(ValueError, match="softening"):
        SymmetricPotential(3, 2, softening=0.0)
    with pytest.raises(ValueError, match="t must be"):
        velocity(torch.zeros(4), torch.randn(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(9)
    flow = MongeAmpereFlow(SymmetricPotential(3, 2, hidden=(16, 16)).double(), **RK4)
    z = torch.randn(16, 6, dtype=F64)
    x_cpu, logdet_cpu = flow(z)
    flow.cuda()
    x_gpu, logdet_gpu = flow(z.cuda())
    assert x_gpu.is_cuda
    torch.testing.assert_close(x_gpu.cpu(), x_cpu, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_gpu.cpu(), logdet_cpu, rtol=0, atol=1e-10)
