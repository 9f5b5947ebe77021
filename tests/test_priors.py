"""Latent priors: exact normalisation, sampling moments, parameter checks, slow-mode order."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from openflow.flows.priors import LatentHarmonicPrior, StandardNormal


def test_standard_normal_log_prob_matches_scipy():
    prior = StandardNormal(3).double()
    z = torch.randn(20, 3, dtype=torch.float64) * 2.0
    expected = norm.logpdf(z.numpy()).sum(axis=1)
    np.testing.assert_allclose(prior.log_prob(z).numpy(), expected, atol=1e-12, rtol=0)


def test_standard_normal_sampling_follows_dtype_and_generator():
    prior = StandardNormal(4)
    assert prior.sample(3).dtype == torch.float32
    prior = prior.double()
    a = prior.sample(1000, generator=torch.Generator().manual_seed(0))
    b = prior.sample(1000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1000, 4) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert abs(a.mean().item()) < 5 / math.sqrt(4000)
    assert abs(a.var().item() - 1.0) < 5 * math.sqrt(2 / 4000)


def test_standard_normal_rejects_bad_shapes():
    prior = StandardNormal(3)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        prior.log_prob(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="dim"):
        StandardNormal(0)


OMEGA = torch.tensor([2.0, 0.3, 1.0, 0.7], dtype=torch.float64)


def test_harmonic_log_prob_matches_scipy():
    prior = LatentHarmonicPrior(4, OMEGA).double()
    g = torch.Generator().manual_seed(1)
    P, Q = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    expected = (norm.logpdf(P.numpy()) + norm.logpdf(Q.numpy(), scale=1 / OMEGA.numpy())).sum(axis=1)
    np.testing.assert_allclose(prior.log_prob(P, Q).detach().numpy(), expected, atol=1e-12, rtol=0)
    np.testing.assert_allclose(
        prior.energy(P, Q).detach().numpy(), 0.5 * (P**2 + OMEGA**2 * Q**2).sum(1).numpy(), atol=1e-12, rtol=0
    )


def test_harmonic_density_integrates_to_one():
    """Trapezoid rule on a wide grid: spectrally accurate for a Gaussian integrand."""
    omega = 0.37
    prior = LatentHarmonicPrior(1, torch.tensor(omega, dtype=torch.float64))
    q = torch.linspace(-12 / omega, 12 / omega, 801, dtype=torch.float64)
    p = torch.linspace(-12.0, 12.0, 801, dtype=torch.float64)
    P, Q = torch.meshgrid(p, q, indexing="ij")
    density = prior.log_prob(P.reshape(-1, 1), Q.reshape(-1, 1)).detach().exp().reshape(P.shape)
    total = torch.trapezoid(torch.trapezoid(density, q, dim=1), p).item()
    assert abs(total - 1.0) < 1e-10
    # free energy = -log Z with Z = 2 pi / omega
    assert abs(prior.free_energy().item() + math.log(2 * math.pi / omega)) < 1e-12


def test_harmonic_sample_moments():
    prior = LatentHarmonicPrior(4, OMEGA).double()
    n = 100_000
    P, Q = prior.sample(n, generator=torch.Generator().manual_seed(2))
    assert P.shape == Q.shape == (n, 4) and Q.dtype == torch.float64
    # <x^2> of a Gaussian has a standard error of sqrt(2) <x^2> / sqrt(n)
    torch.testing.assert_close((Q**2).mean(0), 1 / OMEGA**2, atol=0, rtol=5 * math.sqrt(2 / n))
    torch.testing.assert_close((P**2).mean(0), torch.ones(4, dtype=torch.float64), atol=0, rtol=5 * math.sqrt(2 / n))
    assert (P * Q * OMEGA).mean(0).abs().max() < 5 / math.sqrt(n)  # independent P and Q
    # <K> = d (equipartition: kT/2 per quadratic degree of freedom)
    mean_energy = prior.energy(P, Q).mean().item()
    assert abs(mean_energy - 4.0) < 5 * math.sqrt(4.0 / n)


def test_harmonic_sampling_is_reparametrised_and_log_prob_differentiable():
    prior = LatentHarmonicPrior(3, 1.5)
    P, Q = prior.sample(10, generator=torch.Generator().manual_seed(3))
    (Q**2).sum().backward()
    assert prior.log_omega.grad is not None and (prior.log_omega.grad < 0).all()
    prior.zero_grad()
    prior.log_prob(P.detach(), Q.detach()).sum().backward()
    assert torch.isfinite(prior.log_omega.grad).all()


@pytest.mark.parametrize("omega", [0.0, -1.0, float("nan"), torch.tensor([1.0, -0.5, 2.0])])
def test_harmonic_rejects_non_positive_frequencies(omega):
    with pytest.raises(ValueError, match="> 0"):
        LatentHarmonicPrior(3, omega)


def test_harmonic_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        LatentHarmonicPrior(3, torch.ones(2))
    prior = LatentHarmonicPrior(3)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        prior.log_prob(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        prior.energy(torch.zeros(4, 3), torch.zeros(5, 3))


def test_slow_modes_sorted_slowest_first():
    prior = LatentHarmonicPrior(4, OMEGA).double()
    order, omega_sorted = prior.slow_modes()
    assert order.tolist() == np.argsort(OMEGA.numpy()).tolist() == [1, 3, 2, 0]
    torch.testing.assert_close(omega_sorted, OMEGA[[1, 3, 2, 0]])
    torch.testing.assert_close(prior.omega.detach(), OMEGA)


def test_moment_matched_normal_has_exact_first_and_second_moments():
    from openflow.flows.priors import moment_matched_normal

    eps = moment_matched_normal(300, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(eps.mean(0), torch.zeros(7, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(eps.T @ eps / 300, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        moment_matched_normal(5, 7)
