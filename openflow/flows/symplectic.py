"""Neural canonical transformations: exactly symplectic maps of phase space (Li, Dong, Zhang, Wang, PRX 2020).

Phase space is a pair ``(p, q)`` of momenta and positions, each ``(B, d)``; the phase-space vector is
``x = cat([p, q], -1)`` of shape ``(B, 2d)`` and the symplectic form in that order is
``J = [[0, I], [-I, 0]]`` (:func:`symplectic_form`). Every layer's Jacobian ``M`` satisfies
``M^T J M = J``, so ``|det M| = 1``: densities move between the two sides without a log-determinant.

Direction convention (the same as :class:`openflow.flows.base.Flow`, ``forward(z) -> x``):

    forward(P, Q) -> (p, q)    latent -> data, like Flow.forward (sampling)
    inverse(p, q) -> (P, Q)    data -> latent, like Flow.inverse (likelihood, encoding)

The model :class:`NeuralCanonicalTransformation` puts the latent harmonic prior
``K(P, Q) = sum_k (P_k^2 + w_k^2 Q_k^2) / 2`` (:class:`~openflow.flows.priors.LatentHarmonicPrior`)
on the latent side. Everything is in reduced units (energies in kT) and in mass-weighted
coordinates (:func:`mass_weight`), so the physical kinetic energy is ``|p|^2 / 2``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import BoltzmannGenerator, Flow
from .coupling import check_batch


def symplectic_form(dim: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """``J = [[0, I_d], [-I_d, 0]]``, shape ``(2d, 2d)``, for phase-space vectors ordered ``(p, q)``."""
    eye = torch.eye(int(dim), dtype=dtype, device=device)
    zero = torch.zeros_like(eye)
    return torch.cat([torch.cat([zero, eye], 1), torch.cat([-eye, zero], 1)], 0)


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str, dim: int | None = None) -> None:
    """Raise unless ``a`` and ``b`` are floating tensors of the same shape ``(B, d)`` (``d = dim`` if given)."""
    name_a, name_b = names.split(",")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name_a} and {name_b} must be torch.Tensors, got {type(a).__name__}, {type(b).__name__}")
    width = a.shape[-1] if dim is None else dim
    check_batch(a, width, name_a)
    check_batch(b, width, name_b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _vjp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product ``(d fn/dx)^T v`` at ``x (B, d)``, batched over rows (``fn`` acts row by row).

    Under grad mode the result is differentiable (``create_graph=True``, so the parameters of ``fn``
    train through it); under ``torch.no_grad()`` it comes back detached.
    """
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        (vjp,) = torch.autograd.grad(fn(x), x, v, create_graph=differentiable)
    return vjp


class CanonicalLayer(nn.Module):
    """Base class of a canonical (symplectic) map of phase space.

    Subclasses implement ``forward(P, Q) -> (p, q)`` (latent -> data) and ``inverse(p, q) -> (P, Q)``
    (data -> latent), all ``(B, d)``. ``is_point_transformation`` is True when the latent positions
    ``Q`` depend on the positions ``q`` only (never on ``p``); then :meth:`encode_positions` gives ``Q(q)``.
    """

    is_point_transformation: bool = False

    def forward(self, P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def encode_positions(self, q: torch.Tensor) -> torch.Tensor:
        """Latent positions ``Q (B, d)`` of positions ``q (B, d)``; point transformations only."""
        if not self.is_point_transformation:
            raise TypeError(
                f"{type(self).__name__} mixes momenta into the latent positions Q, so Q(q) is not defined; "
                "collective variables need a transform made of point transformations only "
                "(PointTransformation, SymplecticScaling)"
            )
        return self.inverse(torch.zeros_like(q), q)[1]


class CanonicalSequential(CanonicalLayer):
    """Composition of canonical layers: ``forward`` applies them in order (latent -> data),
    ``inverse`` in reverse order, like :class:`~openflow.flows.base.SequentialFlow`."""

    def __init__(self, *layers: CanonicalLayer):
        super().__init__()
        if not layers:
            raise ValueError("CanonicalSequential needs at least one layer")
        for layer in layers:
            if not isinstance(layer, CanonicalLayer):
                raise TypeError(f"every layer must be a CanonicalLayer, got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)

    @property
    def is_point_transformation(self) -> bool:
        return all(layer.is_point_transformation for layer in self.layers)

    def forward(self, P, Q):
        for layer in self.layers:
            P, Q = layer(P, Q)
        return P, Q

    def inverse(self, p, q):
        for layer in reversed(self.layers):
            p, q = layer.inverse(p, q)
        return p, q

    def encode_positions(self, q):
        if not self.is_point_transformation:
            return super().encode_positions(q)  # raises the explanatory TypeError
        for layer in reversed(self.layers):
            q = layer.encode_positions(q)
        return q


class PointTransformation(CanonicalLayer):
    """Neural point transformation: positions through an invertible flow ``g``, momenta moved so
    the map is canonical (generating function ``F2(q, P) = P . g^{-1}(q)``).

        forward:  q = g(Q),        p = (dQ/dq)^T P   (a VJP of g^{-1} at q)
        inverse:  Q = g^{-1}(q),   P = (dq/dQ)^T p   (a VJP of g at Q)

    ``g = flow.forward`` for any :class:`~openflow.flows.base.Flow` on ``(B, d)`` acting row by row
    (e.g. :func:`~openflow.flows.coupling.real_nvp`); no Jacobian is ever formed. Each direction
    costs one pass of ``g`` and one of ``g^{-1}``. A data-initialised ActNorm inside ``flow`` must be
    initialised (by a first ``inverse`` on data, or ``initialize``) before sampling in training mode.
    """

    is_point_transformation = True

    def __init__(self, flow: Flow):
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"flow must be an openflow Flow, got {type(flow).__name__}")
        self.flow = flow

    def _to_data(self, Q: torch.Tensor) -> torch.Tensor:
        return self.flow(Q)[0]

    def _to_latent(self, q: torch.Tensor) -> torch.Tensor:
        return self.flow.inverse(q)[0]

    def forward(self, P, Q):
        _check_pair(P, Q, "P,Q")
        q = self._to_data(Q)
        p = _vjp(self._to_latent, q, P)
        return p, q

    def inverse(self, p, q):
        _check_pair(p, q, "p,q")
        Q = self._to_latent(q)
        P = _vjp(self._to_data, Q, p)
        return P, Q

    def encode_positions(self, q):
        return self._to_latent(q)


class LinearSymplectic(CanonicalLayer):
    """Linear symplectic map ``x = M z`` on ``x = (p, q)``, ``z = (P, Q)``, with ``M = exp(J S)``:
    ``J S`` (``S`` symmetric ``2d x 2d``) spans the Lie algebra sp(2d), so ``M`` is symplectic.
    ``S`` starts at 0 (the identity); the inverse is ``exp(-J S)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.weight = nn.Parameter(torch.zeros(2 * self.dim, 2 * self.dim))

    def hamiltonian_matrix(self) -> torch.Tensor:
        """``J S`` with ``S = (W + W^T) / 2``, shape ``(2d, 2d)``."""
        S = 0.5 * (self.weight + self.weight.T)
        return torch.cat([S[self.dim :], -S[: self.dim]], 0)

    def _map(self, a: torch.Tensor, b: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(a, b, "p,q" if sign < 0 else "P,Q", self.dim)
        M = torch.linalg.matrix_exp(sign * self.hamiltonian_matrix())
        out = torch.cat([a, b], -1) @ M.T
        return out[:, : self.dim], out[:, self.dim :]

    def forward(self, P, Q):
        return self._map(P, Q, 1.0)

    def inverse(self, p, q):
        return self._map(p, q, -1.0)


class SymplecticScaling(CanonicalLayer):
    """Diagonal symplectic scaling, data -> latent ``Q = q e^{s}``, ``P = p e^{-s}`` with learnable
    ``s (d,)`` starting at 0; a point transformation."""

    is_point_transformation = True

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.log_scale = nn.Parameter(torch.zeros(self.dim))

    def forward(self, P, Q):
        _check_pair(P, Q, "P,Q", self.dim)
        scale = torch.exp(self.log_scale)
        return P * scale, Q / scale

    def inverse(self, p, q):
        _check_pair(p, q, "p,q", self.dim)
        scale = torch.exp(self.log_scale)
        return p / scale, q * scale


class GradientNet(nn.Module):
    """A scalar potential ``U(x) = sum_j a_j tanh(w_j . x + b_j)`` on ``(B, d)`` with its analytic
    gradient ``dU/dx = ((1 - tanh^2) * a) @ W``, shape ``(B, d)`` (no nested autograd).
    ``a`` starts at 0, so ``U`` starts flat."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1:
            raise ValueError(f"dim and hidden must be >= 1, got {dim}, {hidden}")
        self.linear = nn.Linear(int(dim), int(hidden))
        self.amplitude = nn.Parameter(torch.zeros(int(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``U(x)``, shape ``(B,)``."""
        return torch.tanh(self.linear(x)) @ self.amplitude

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``dU/dx``, shape ``(B, d)``."""
        t = torch.tanh(self.linear(x))
        return ((1.0 - t * t) * self.amplitude) @ self.linear.weight


class HamiltonianFlow(CanonicalLayer):
    """Time-``T`` map of a learned separable Hamiltonian ``H(p, q) = T_nn(p) + V_nn(q)``, integrated
    with ``steps`` leapfrog steps of size ``h = T / steps`` (latent -> data):

        p <- p - h/2 dV/dq(q);   q <- q + h dT/dp(p);   p <- p - h/2 dV/dq(q)

    Each substep is a shear, so the map is exactly symplectic, and running the steps with ``-h`` is
    its exact inverse. Both potentials start flat, so the layer starts as the identity.
    """

    def __init__(self, dim: int, hidden: int = 64, T: float = 1.0, steps: int = 4):
        super().__init__()
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if not (float(T) > 0 and float(T) < float("inf")):
            raise ValueError(f"T must be finite and > 0, got {T}")
        self.dim = int(dim)
        self.kinetic = GradientNet(dim, hidden)
        self.potential = GradientNet(dim, hidden)
        self.T = float(T)
        self.steps = int(steps)

    def _leapfrog(self, p: torch.Tensor, q: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.steps):
            p = p - 0.5 * h * self.potential.gradient(q)
            q = q + h * self.kinetic.gradient(p)
            p = p - 0.5 * h * self.potential.gradient(q)
        return p, q

    def forward(self, P, Q):
        _check_pair(P, Q, "P,Q", self.dim)
        return self._leapfrog(P, Q, self.T / self.steps)

    def inverse(self, p, q):
        _check_pair(p, q, "p,q", self.dim)
        return self._leapfrog(p, q, -self.T / self.steps)


class NeuralCanonicalTransformation(nn.Module):
    """A latent harmonic prior pushed through a canonical transformation: the density over phase
    space ``log rho(p, q) = log prior(transform.inverse(p, q))`` (no log-determinant: volume is preserved).

    ``transform``: a :class:`CanonicalLayer` (latent -> data in ``forward``); ``prior``: a
    :class:`~openflow.flows.priors.LatentHarmonicPrior` (``dim``, ``log_prob(P, Q)``, ``sample(n, generator)``,
    ``slow_modes()``). Learned frequencies are ``prior.omega``; the slowest modes are the smallest.
    """

    def __init__(self, transform: CanonicalLayer, prior: nn.Module):
        super().__init__()
        if not isinstance(transform, CanonicalLayer):
            raise TypeError(f"transform must be a CanonicalLayer, got {type(transform).__name__}")
        for method in ("log_prob", "sample", "slow_modes"):
            if not callable(getattr(prior, method, None)):
                raise TypeError(f"prior must provide {method}(), got {type(prior).__name__}")
        if not isinstance(getattr(prior, "dim", None), int):
            raise TypeError(f"prior must have an integer attribute dim, got {type(prior).__name__}")
        self.transform = transform
        self.prior = prior

    def encode(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``(P, Q)``, each ``(B, d)``, of data ``(p, q)``."""
        _check_pair(p, q, "p,q", self.prior.dim)
        return self.transform.inverse(p, q)

    def log_prob(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Exact normalised ``log rho(p, q)``, shape ``(B,)``."""
        return self.prior.log_prob(*self.encode(p, q))

    def nll(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of a batch (a scalar, in nats): the maximum-likelihood loss."""
        return -self.log_prob(p, q).mean()

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws ``(p, q)``, each ``(n, d)``: latent harmonic samples mapped to data."""
        return self.transform(*self.prior.sample(n, generator=generator))

    def slow_modes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent mode indices sorted slowest first, ``(d,)``, and their frequencies ``w_k``."""
        return self.prior.slow_modes()

    def collective_variables(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` slowest latent positions ``Q`` of positions ``q (B, d)``, slowest first, ``(B, k)``.

        Differentiable in ``q``. Needs a point transformation (``Q`` independent of ``p``): TypeError otherwise.
        """
        check_batch(q, self.prior.dim, "q")
        order, _ = self.slow_modes()
        if not 1 <= int(k) <= order.numel():
            raise ValueError(f"k must be in [1, {order.numel()}], got {k}")
        return self.transform.encode_positions(q)[:, order[: int(k)].to(q.device)]

    def mode_jacobian(self, q: torch.Tensor) -> torch.Tensor:
        """``dQ/dq`` at positions ``q (B, d)``, shape ``(B, d, d)`` with ``[b, k, i] = dQ_k/dq_i``, in
        latent order (row ``k`` is mode ``k``'s shape; pick slow ones with :meth:`slow_modes`).

        Point transformations only (TypeError otherwise). Costs ``d`` backward passes; not differentiable.
        """
        check_batch(q, self.prior.dim, "q")
        with torch.enable_grad():
            q = q.detach().requires_grad_(True)
            Q = self.transform.encode_positions(q)
            rows = [
                torch.autograd.grad(Q[:, k].sum(), q, retain_graph=k + 1 < Q.shape[1])[0] for k in range(Q.shape[1])
            ]
        return torch.stack(rows, 1)

    def as_flow(self) -> PhaseSpaceFlow:
        """The transform as a :class:`~openflow.flows.base.Flow` on ``cat([p, q], -1)`` (shares parameters)."""
        return PhaseSpaceFlow(self.transform)

    def as_boltzmann_generator(self) -> BoltzmannGenerator:
        """A :class:`~openflow.flows.base.BoltzmannGenerator` over ``x = cat([p, q], -1)`` of shape
        ``(B, 2d)``, sharing this model's parameters, for the generic losses and estimators."""
        return BoltzmannGenerator(PhaseSpacePrior(self.prior), self.as_flow())


def _split(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"{name} must be a (B, 2d) tensor cat([p, q], -1), got {getattr(x, 'shape', type(x))}")
    return x.chunk(2, dim=1)


class PhaseSpaceFlow(Flow):
    """A canonical transformation as a Flow on ``x = cat([p, q], -1)``, ``(B, 2d)``; logdet is exactly 0."""

    def __init__(self, transform: CanonicalLayer):
        super().__init__()
        if not isinstance(transform, CanonicalLayer):
            raise TypeError(f"transform must be a CanonicalLayer, got {type(transform).__name__}")
        self.transform = transform

    def forward(self, z):
        p, q = self.transform(*_split(z, "z"))
        return torch.cat([p, q], 1), z.new_zeros(z.shape[0])

    def inverse(self, x):
        P, Q = self.transform.inverse(*_split(x, "x"))
        return torch.cat([P, Q], 1), x.new_zeros(x.shape[0])


class PhaseSpacePrior(nn.Module):
    """A phase-space prior (``sample(n) -> (P, Q)``, ``log_prob(P, Q)``) on concatenated ``z = cat([P, Q], -1)``."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior
        self.dim = 2 * prior.dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, 2d)`` draws."""
        return torch.cat(self.prior.sample(n, generator=generator), 1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``(B,)`` log-density of ``z (B, 2d)``."""
        return self.prior.log_prob(*_split(z, "z"))


def _sqrt_masses(masses, like: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(masses, dtype=like.dtype, device=like.device)
    if m.shape != like.shape[-1:]:
        raise ValueError(f"masses must have shape ({like.shape[-1]},), got {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all() and (m > 0).all()):
        raise ValueError("masses must be finite and > 0")
    return m.sqrt()


def mass_weight(p: torch.Tensor, q: torch.Tensor, masses) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass-weighted ``(p / sqrt(m), sqrt(m) q)`` so the kinetic energy is ``|p|^2 / 2``.

    ``p, q (B, d)``; ``masses (d,)`` in the units of ``p, q`` (e.g. dalton with nm and nm/ps * dalton).
    The map is itself canonical (unit Jacobian), so densities carry over unchanged.
    """
    _check_pair(p, q, "p,q")
    root = _sqrt_masses(masses, q)
    return p / root, q * root


def mass_unweight(p: torch.Tensor, q: torch.Tensor, masses) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`mass_weight`: ``(sqrt(m) p, q / sqrt(m))``."""
    _check_pair(p, q, "p,q")
    root = _sqrt_masses(masses, q)
    return p * root, q / root
