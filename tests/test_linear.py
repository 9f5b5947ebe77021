"""LinearExp: invertibility, log-determinant against autograd, the orthogonal variant."""

import pytest
import torch

from openflow.flows.linear import LinearExp


@pytest.mark.parametrize("orthogonal", [False, True])
def test_linear_exp_inverse_and_logdet(orthogonal):
    torch.manual_seed(0)
    flow = LinearExp(5, orthogonal=orthogonal).double()
    with torch.no_grad():
        flow.weight.normal_(0, 0.4)
    z = torch.randn(7, 5, dtype=torch.float64)
    x, logdet = flow(z)
    z_back, inv_logdet = flow.inverse(x)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-10)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    assert not torch.allclose(x, z)
    if orthogonal:
        torch.testing.assert_close(jac @ jac.T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(logdet, torch.zeros_like(logdet), rtol=0, atol=1e-12)


def test_linear_exp_rejects_bad_input():
    with pytest.raises(ValueError):
        LinearExp(0)
    with pytest.raises(ValueError):
        LinearExp(3)(torch.zeros(2, 4))
