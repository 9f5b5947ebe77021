"""Neural canonical transformations: symplecticity, exact inverses, exact densities, and the normal
modes of a harmonic chain learned by maximum likelihood. All physics in float64."""

import math

import pytest
import torch

from openflow.flows.base import Flow
from openflow.flows.coupling import ActNorm, real_nvp
from openflow.flows.priors import LatentHarmonicPrior
from openflow.flows.symplectic import (
    CanonicalSequential,
    HamiltonianFlow,
    LinearSymplectic,
    NeuralCanonicalTransformation,
    PhaseSpaceFlow,
    PointTransformation,
    SymplecticScaling,
    mass_unweight,
    mass_weight,
    symplectic_form,
)

DIM = 4
F64 = torch.float64


@pytest.fixture(autouse=True)
def seeded():
    """Network initialisations draw from the global generator: make every test independent of order."""
    torch.manual_seed(0)


def randomise(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Float64, every parameter perturbed by ``scale * N(0, 1)``, ActNorms marked initialised."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=F64))
    for sub in module.modules():
        if isinstance(sub, ActNorm):
            sub.initialized.fill_(True)
    return module


def point_transformation(seed: int = 0, dim: int = DIM) -> PointTransformation:
    return randomise(PointTransformation(real_nvp(dim, 4, hidden=(16, 16), activation="tanh")), 0.3, seed)


def make_layer(name: str) -> torch.nn.Module:
    if name == "point":
        return point_transformation()
    if name == "linear":
        return randomise(LinearSymplectic(DIM), 0.3, 1)
    if name == "scaling":
        return randomise(SymplecticScaling(DIM), 0.5, 2)
    if name == "hamiltonian":
        return randomise(HamiltonianFlow(DIM, hidden=16, T=0.7, steps=3), 0.5, 3)
    if name == "deep":
        return CanonicalSequential(*(make_layer(n) for n in ("point", "linear", "hamiltonian", "scaling")))
    raise KeyError(name)


LAYERS = ["point", "linear", "scaling", "hamiltonian", "deep"]


def phase_points(n: int, seed: int, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, dim, generator=gen, dtype=F64).unbind(0)


def phase_jacobian(fn, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobian ``(B, 2d, 2d)`` of ``(a, b) -> cat(fn(a, b))`` by autograd."""
    d = a.shape[1]

    def flat(x):
        return torch.cat(fn(x[:, :d], x[:, d:]), 1).sum(0)

    return torch.autograd.functional.jacobian(flat, torch.cat([a, b], 1)).permute(1, 0, 2)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_jacobian_is_symplectic(name, direction):
    layer = make_layer(name)
    a, b = phase_points(6, seed=10)
    M = phase_jacobian(getattr(layer, direction), a, b)
    J = symplectic_form(DIM, dtype=F64)
    assert (M - torch.eye(2 * DIM, dtype=F64)).abs().max() > 0.1  # a nontrivial map, not the identity
    assert torch.allclose(M.transpose(1, 2) @ J @ M, J.expand_as(M), atol=1e-8, rtol=0)
    assert torch.allclose(torch.linalg.det(M).abs(), torch.ones(6, dtype=F64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", LAYERS)
def test_inverse_is_exact(name):
    layer = make_layer(name)
    a, b = phase_points(64, seed=11)
    for there, back in ((layer.forward, layer.inverse), (layer.inverse, layer.forward)):
        a2, b2 = back(*there(a, b))
        assert torch.allclose(a2, a, atol=1e-10, rtol=0) and torch.allclose(b2, b, atol=1e-10, rtol=0)


def test_identity_at_initialisation():
    a, b = phase_points(8, seed=12)
    for layer in (LinearSymplectic(DIM), SymplecticScaling(DIM), HamiltonianFlow(DIM, 8)):
        a2, b2 = layer.double()(a, b)
        assert torch.equal(a2, a) and torch.equal(b2, b)


def test_point_transformation_momenta_match_explicit_jacobian():
    """Data -> latent: ``Q = f(q)``, ``P = (df/dq)^{-T} p`` with ``f = flow.inverse``; and back."""
    layer = point_transformation(seed=4)
    p, q = phase_points(5, seed=13)
    P, Q = layer.inverse(p, q)
    jac_f = torch.stack([torch.autograd.functional.jacobian(lambda x: layer.flow.inverse(x[None])[0][0], x) for x in q])
    assert torch.allclose(Q, layer.flow.inverse(q)[0], atol=1e-12, rtol=0)
    expected_P = torch.linalg.solve(jac_f.transpose(1, 2), p[..., None])[..., 0]
    assert torch.allclose(P, expected_P, atol=1e-10, rtol=0)
    p_back, _ = layer(P, Q)  # latent -> data: p = (df/dq)^T P
    assert torch.allclose(p_back, (jac_f.transpose(1, 2) @ P[..., None])[..., 0], atol=1e-10, rtol=0)


def test_point_transformation_trains_through_momenta():
    """The momentum VJP keeps its graph: parameter gradients of a loss on ``P`` match finite differences."""
    layer = point_transformation(seed=5)
    p, q = phase_points(16, seed=14)
    param = next(w for w in layer.parameters() if w.dim() == 2)  # a first-layer weight matrix

    def loss():
        return layer.inverse(p, q)[0].pow(2).sum()

    (grad,) = torch.autograd.grad(loss(), param)
    eps, idx = 1e-6, (1, 0)
    with torch.no_grad():
        param[idx] += eps
        up = loss()
        param[idx] -= 2 * eps
        down = loss()
        param[idx] += eps
    assert grad[idx] != 0
    assert torch.allclose(grad[idx], (up - down) / (2 * eps), rtol=1e-6, atol=0)


def test_no_grad_mode_gives_same_values_detached():
    layer = make_layer("deep")
    p, q = phase_points(8, seed=15)
    P, Q = layer.inverse(p, q)
    with torch.no_grad():
        P0, Q0 = layer.inverse(p, q)
    assert not P0.requires_grad and not Q0.requires_grad
    assert torch.equal(P0, P.detach()) and torch.equal(Q0, Q.detach())


def harmonic_model(transform, omega) -> NeuralCanonicalTransformation:
    return NeuralCanonicalTransformation(transform, LatentHarmonicPrior(DIM, torch.as_tensor(omega))).double()


def test_identity_model_has_analytic_harmonic_density():
    omega = torch.tensor([0.3, 0.9, 1.4, 2.5], dtype=F64)
    model = harmonic_model(LinearSymplectic(DIM), omega)  # identity at initialisation
    omega = model.prior.omega.detach()  # the prior stores log(omega) (rounded to the default dtype)
    p, q = phase_points(32, seed=16)
    momenta = torch.distributions.Normal(0.0, torch.ones(DIM, dtype=F64))
    positions = torch.distributions.Normal(0.0, 1.0 / omega)
    expected = momenta.log_prob(p).sum(1) + positions.log_prob(q).sum(1)
    assert torch.allclose(model.log_prob(p, q), expected, atol=1e-12, rtol=0)


def test_log_prob_of_samples_is_prior_log_prob_of_latent():
    model = harmonic_model(make_layer("deep"), [0.5, 1.0, 1.5, 2.0])
    P, Q = model.prior.sample(64, generator=torch.Generator().manual_seed(0))
    p, q = model.sample(64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.cat(model.transform(P, Q)), torch.cat([p, q]), atol=1e-12, rtol=0)
    assert torch.allclose(model.log_prob(p, q), model.prior.log_prob(P, Q), atol=1e-9, rtol=0)


def test_density_of_nonlinear_composition_is_normalised():
    """Importance sampling of ``int rho dp dq`` from a heavy-tailed (Student-t, 2 degrees of freedom)
    proposal, which covers the flow's tails: 1 within 5 standard errors. A non-canonical momentum
    update breaks this (skipping the point transformation's momentum VJP gives about 3.5 here)."""
    dim, n = 2, 100_000
    transform = CanonicalSequential(
        randomise(PointTransformation(real_nvp(dim, 4, hidden=(16, 16), activation="tanh")), 0.2, 6),
        randomise(HamiltonianFlow(dim, hidden=8, T=0.5, steps=2), 0.3, 7),
    )
    model = NeuralCanonicalTransformation(transform, LatentHarmonicPrior(dim, torch.tensor([0.8, 1.3]))).double()
    torch.manual_seed(17)
    proposal = torch.distributions.StudentT(torch.tensor(2.0, dtype=F64), torch.zeros(2 * dim, dtype=F64), 1.0)
    x = proposal.sample((n,))
    with torch.no_grad():
        weights = torch.exp(model.log_prob(x[:, :dim], x[:, dim:]) - proposal.log_prob(x).sum(1))
    standard_error = weights.std() / math.sqrt(n)
    assert standard_error < 0.02  # informative: a wrong momentum update is off by O(1)
    assert abs(weights.mean() - 1.0) < 5 * standard_error


def test_phase_space_flow_and_boltzmann_generator_match_model():
    model = harmonic_model(make_layer("deep"), [0.5, 1.0, 1.5, 2.0])
    p, q = phase_points(16, seed=18)
    x = torch.cat([p, q], 1)
    flow = model.as_flow()
    assert isinstance(flow, PhaseSpaceFlow) and isinstance(flow, Flow)
    z, logdet = flow.inverse(x)
    assert torch.equal(logdet, torch.zeros(16, dtype=F64))
    assert torch.allclose(flow(z)[0], x, atol=1e-10, rtol=0)
    generator = model.as_boltzmann_generator()
    assert generator.prior.dim == 2 * DIM
    assert torch.allclose(generator.log_prob(x), model.log_prob(p, q), atol=1e-12, rtol=0)
    samples, log_q = generator.sample(8)
    assert torch.allclose(log_q, model.log_prob(samples[:, :DIM], samples[:, DIM:]), atol=1e-9, rtol=0)


def test_mode_jacobian_and_collective_variables():
    """For a point transformation the latent momenta are ``P = (dQ/dq)^{-T} p``, so
    ``mode_jacobian(q)^T P == p``; the CVs are ``Q`` in slow-mode order and independent of ``p``."""
    transform = CanonicalSequential(point_transformation(seed=8), randomise(SymplecticScaling(DIM), 0.5, 9))
    model = harmonic_model(transform, [1.7, 0.4, 2.2, 0.9])
    p, q = phase_points(8, seed=19)
    P, Q = model.encode(p, q)
    jac = model.mode_jacobian(q)
    assert jac.shape == (8, DIM, DIM)
    assert torch.allclose((jac.transpose(1, 2) @ P[..., None])[..., 0], p, atol=1e-10, rtol=0)
    cv = model.collective_variables(q, 2)
    assert torch.allclose(cv, Q[:, [1, 3]], atol=1e-12, rtol=0)
    assert torch.allclose(model.collective_variables(q, 2), model.encode(2 * p, q)[1][:, [1, 3]], atol=1e-12, rtol=0)


def test_mode_jacobian_of_scaling_is_analytic():
    layer = randomise(SymplecticScaling(DIM), 0.5, 10)
    model = harmonic_model(layer, [1.0, 2.0, 3.0, 4.0])
    q = phase_points(3, seed=20)[1]
    expected = torch.diag(torch.exp(layer.log_scale.detach())).expand(3, DIM, DIM)
    assert torch.allclose(model.mode_jacobian(q), expected, atol=1e-14, rtol=0)


def test_collective_variables_need_a_point_transformation():
    model = harmonic_model(CanonicalSequential(point_transformation(), LinearSymplectic(DIM)), [1.0] * DIM)
    q = phase_points(3, seed=21)[1]
    with pytest.raises(TypeError, match="point transformation"):
        model.collective_variables(q, 1)
    with pytest.raises(TypeError, match="point transformation"):
        model.mode_jacobian(q)


def test_mass_weighting_is_canonical_and_makes_kinetic_energy_unit_mass():
    masses = torch.tensor([1.0, 12.0, 16.0, 1.008], dtype=F64)
    p, q = phase_points(10, seed=22)
    pw, qw = mass_weight(p, q, masses)
    assert torch.allclose((p**2 / (2 * masses)).sum(1), (pw**2 / 2).sum(1), atol=1e-12, rtol=0)
    back = mass_unweight(pw, qw, masses)
    assert torch.allclose(torch.cat(back), torch.cat([p, q]), atol=1e-12, rtol=0)
    M = phase_jacobian(lambda a, b: mass_weight(a, b, masses), p, q)
    J = symplectic_form(DIM, dtype=F64)
    assert torch.allclose(M.transpose(1, 2) @ J @ M, J.expand_as(M), atol=1e-12, rtol=0)


def test_bad_input_raises_clear_errors():
    layer = LinearSymplectic(DIM).double()
    p, q = phase_points(4, seed=23)
    with pytest.raises(ValueError, match="shape"):
        layer(p, q[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        PointTransformation(real_nvp(DIM, 2)).double().inverse(p, q[:2])
    with pytest.raises(TypeError, match="CanonicalLayer"):
        CanonicalSequential(layer, real_nvp(DIM, 2))
    with pytest.raises(TypeError, match="Flow"):
        PointTransformation(torch.nn.Linear(DIM, DIM))
    with pytest.raises(ValueError, match="masses"):
        mass_weight(p, q, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="T must be"):
        HamiltonianFlow(DIM, T=0.0)
    with pytest.raises(ValueError, match="k must be"):
        harmonic_model(SymplecticScaling(DIM), [1.0] * DIM).collective_variables(q, DIM + 1)


def chain_stiffness(n: int) -> torch.Tensor:
    """Fixed-fixed chain of unit masses and springs: ``V = q^T K q / 2``, ``K = tridiag(-1, 2, -1)``."""
    off = -torch.ones(n - 1, dtype=F64)
    return 2 * torch.eye(n, dtype=F64) + torch.diag(off, 1) + torch.diag(off, -1)


def boltzmann_samples(K: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact samples of ``exp(-H)``, ``H = |p|^2/2 + q^T K q/2`` (kT = 1): ``p ~ N(0, I)``, ``q ~ N(0, K^-1)``."""
    p, eps = phase_points(n, seed, K.shape[0])
    return p, eps @ torch.linalg.cholesky(torch.linalg.inv(K)).T


def maximum_likelihood_frequencies(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Frequencies of the Gaussian maximum-likelihood fit: a linear symplectic map plus a harmonic prior
    spans all centred Gaussians (Williamson), so the optimum has ``w_k = 1 / nu_k`` with ``nu_k`` the
    symplectic eigenvalues of the second-moment matrix ``S`` (``J S`` has eigenvalues ``+- i nu_k``)."""
    x = torch.cat([p, q], 1)
    moments = x.T @ x / x.shape[0]
    nu = torch.linalg.eigvals(symplectic_form(p.shape[1], dtype=F64) @ moments).imag.abs()
    return torch.sort(1.0 / torch.sort(nu).values[::2]).values


def test_harmonic_chain_normal_mode_frequencies_by_maximum_likelihood():
    """Train ``LinearSymplectic`` + harmonic prior on exact Boltzmann samples of a d=4 fixed-fixed chain.

    Tolerances: the frequency of mode k is ``1/sqrt(var P_k var Q_k)``-like, and each sample variance has
    relative standard error ``sqrt(2/N)``, so ``w_k`` has relative standard error ``sqrt(4/N)/2 = 1/sqrt(N)``
    (0.7 % for N = 20000): we allow 4 of them. The fitted NLL lies below the exact one by the
    likelihood-ratio gap ``chi^2_k/(2N)`` with ``k = d(2d+1)`` covariance parameters.
    """
    n = 20_000
    K = chain_stiffness(DIM)
    exact = 2 * torch.sin(torch.arange(1, DIM + 1, dtype=F64) * math.pi / (2 * (DIM + 1)))
    assert torch.allclose(exact, torch.linalg.eigvalsh(K).sqrt(), atol=1e-12, rtol=0)
    p, q = boltzmann_samples(K, n, seed=24)
    model = harmonic_model(LinearSymplectic(DIM), torch.linspace(0.5, 2.0, DIM))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        loss = model.nll(p, q)
        loss.backward()
        optimizer.step()

    _, learned = model.slow_modes()
    assert torch.allclose(learned, maximum_likelihood_frequencies(p, q), rtol=1e-3, atol=0)
    assert torch.allclose(learned, exact, rtol=4 / math.sqrt(n), atol=0)

    with torch.no_grad():
        energy = 0.5 * (p.pow(2).sum(1) + ((q @ K) * q).sum(1))
        exact_nll = (energy + torch.log(2 * math.pi / exact).sum()).mean()
        gap = exact_nll - model.nll(p, q)
    n_params = DIM * (2 * DIM + 1)
    assert -1e-4 < gap < (n_params + 6 * math.sqrt(2 * n_params)) / (2 * n)


@pytest.mark.slow
def test_harmonic_chain_point_transformation_learns_normal_modes():
    """neuralCT's set-up: a RealNVP point transformation + harmonic prior by maximum likelihood.
    The slow-mode shapes ``dQ_k/dq`` must align with the exact normal modes; frequencies within the
    statistical tolerance of the fast test (4 standard errors, ``4/sqrt(N)``)."""
    n = 20_000
    K = chain_stiffness(DIM)
    exact_w2, modes = torch.linalg.eigh(K)
    p, q = boltzmann_samples(K, n, seed=25)
    torch.manual_seed(1)
    flow = real_nvp(DIM, 4, hidden=(32,), activation="tanh")
    model = harmonic_model(PointTransformation(flow), torch.linspace(0.5, 2.0, DIM))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    steps = 1000
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        batch = torch.randint(0, n, (1024,), generator=gen)
        optimizer.zero_grad()
        model.nll(p[batch], q[batch]).backward()
        optimizer.step()
        schedule.step()
    order, learned = model.slow_modes()
    assert torch.allclose(learned, exact_w2.sqrt(), rtol=4 / math.sqrt(n), atol=0)
    shapes = model.mode_jacobian(q[:256]).mean(0)[order]
    overlap = (torch.nn.functional.normalize(shapes, dim=1) * modes.T).sum(1).abs()
    assert (overlap > 0.98).all()
