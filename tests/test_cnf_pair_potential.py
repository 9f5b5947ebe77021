"""PairPotential: closed-form gradient and Laplacian vs autograd, invariances, flow log-density."""

import math

import pytest
import torch

from openflow.flows.cnf import PairMongeAmpereFlow, PairPotential, exact_divergence


def _randomised(n, dim, seed=0):
    torch.manual_seed(seed)
    phi = PairPotential(n, dim, n_basis=6, r_max=2.0, hidden=(8,)).double()
    with torch.no_grad():  # leave the identity start so that the test sees a non-trivial field
        for p in phi.coefficients[-1].parameters():
            p.normal_(0.0, 0.1)
    return phi


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("t", [0.3, "batch"])
def test_closed_form_matches_autograd(dim, t):
    n, batch = 4, 5
    phi = _randomised(n, dim)
    x = torch.randn(batch, n * dim, dtype=torch.float64, requires_grad=True)
    t = torch.rand(batch, dtype=torch.float64) if t == "batch" else torch.tensor(t, dtype=torch.float64)
    (grad,) = torch.autograd.grad(phi(t, x).sum(), x, create_graph=True)
    lap = exact_divergence(grad, x)
    v, lap_closed = phi.velocity_and_laplacian(t, x)
    torch.testing.assert_close(v, grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lap_closed, lap, rtol=1e-10, atol=1e-12)


def test_starts_as_identity():
    flow = PairMongeAmpereFlow(PairPotential(3, 2)).double()
    z = torch.randn(7, 6, dtype=torch.float64)
    x, logdet = flow(z)
    torch.testing.assert_close(x, z)
    assert torch.all(logdet == 0)


def test_log_density_invariant_and_invertible():
    n, dim = 4, 3
    flow = PairMongeAmpereFlow(_randomised(n, dim, seed=1), method="dopri5", rtol=1e-9, atol=1e-9)
    torch.manual_seed(2)
    z = torch.randn(6, n * dim, dtype=torch.float64)
    x, logdet = flow(z)
    z_back, logdet_back = flow.inverse(x)
    torch.testing.assert_close(z_back, z, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logdet_back, -logdet, rtol=1e-6, atol=1e-7)
    assert logdet.abs().max() > 1e-2  # the map is not trivial

    # permuting particles and rotating the configuration leave log|det| unchanged
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    perm = torch.tensor([2, 0, 3, 1])
    x_moved = (x.view(-1, n, dim)[:, perm] @ q.T).reshape(-1, n * dim)
    _, logdet_moved = flow.inverse(x_moved)
    torch.testing.assert_close(logdet_moved, logdet_back, rtol=1e-6, atol=1e-7)


def test_logdet_matches_jacobian_of_the_map():
    """Exact log|det dx/dz| from the ODE against autograd's Jacobian of the solved map."""
    n, dim = 3, 2
    flow = PairMongeAmpereFlow(_randomised(n, dim, seed=3), method="dopri5", rtol=1e-8, atol=1e-8)
    z = torch.randn(1, n * dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.unsqueeze(0))[0].squeeze(0), z[0])
    with torch.no_grad():
        _, logdet = flow(z)
    assert math.isclose(float(torch.linalg.slogdet(jac)[1]), float(logdet), rel_tol=1e-6, abs_tol=1e-7)


def test_bad_input():
    with pytest.raises(ValueError):
        PairPotential(0, 2)
    with pytest.raises(ValueError):
        PairPotential(3, 2, softening=0.0)
    with pytest.raises(ValueError):
        PairPotential(3, 2)(torch.tensor(0.0), torch.zeros(2, 5))
    with pytest.raises(TypeError):
        PairMongeAmpereFlow(torch.nn.Linear(2, 2))
