"""Continuous normalizing flows on torchdiffeq, and the Monge-Ampère (potential) flow.

A continuous flow integrates ``dx/dt = v(t, x)`` from ``t0`` to ``t1`` together with the
log-Jacobian, ``d log|det dx/dz| / dt = div v(t, x)`` (the instantaneous change of variables:
``d ln p / dt = -div v``). The Monge-Ampère flow takes ``v = grad_x phi(t, x)`` for a scalar
potential ``phi``, so ``div v`` is the Laplacian of ``phi`` and a potential invariant under a
symmetry group (particle permutations, rotations) gives an equivariant velocity and, with an
invariant prior, an invariant density.

Call conventions (all tensors on the device/dtype of the input):

* velocity field: ``velocity(t, x) -> (B, d)`` for ``x (B, d)``; ``t`` is a scalar tensor (ODE
  integration) or a ``(B,)`` tensor (flow matching, one time per sample);
* potential: ``potential(t, x) -> (B,)``, same ``t`` convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from .base import Flow

DIVERGENCES = ("exact", "hutchinson")
SOLVERS = (
    "dopri8",
    "dopri5",
    "bosh3",
    "fehlberg2",
    "adaptive_heun",
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
    "scipy_solver",
)


# ----------------------------------------------------------------------------------------------
# divergence estimators
# ----------------------------------------------------------------------------------------------


def _gradient(output: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``d output.sum() / dx``; zeros where ``output`` does not depend on ``x``."""
    if not output.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(output.sum(), x, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def exact_divergence(v: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Exact ``div v = sum_i dv_i/dx_i`` of shape ``(B,)`` by ``d`` backward passes.

    ``v (B, d)`` must have been computed from ``x (B, d)`` with grad enabled; samples must not
    interact (row ``b`` of ``v`` depends only on row ``b`` of ``x``).
    """
    return sum(_gradient(v[:, i], x, create_graph)[:, i] for i in range(x.shape[1]))


def hutchinson_divergence(
    v: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    """Unbiased estimate ``eps^T (dv/dx) eps`` of ``div v`` (shape ``(B,)``), one backward pass.

    ``noise (B, d)`` holds probe vectors with ``E[eps eps^T] = I`` (e.g. Rademacher).
    """
    return (_gradient((v * noise).sum(dim=1), x, create_graph) * noise).sum(dim=1)


def rademacher(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random signs ``+-1`` of ``shape`` on the device and dtype of ``like``."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


# ----------------------------------------------------------------------------------------------
# the continuous flow
# ----------------------------------------------------------------------------------------------


class _AugmentedDynamics(nn.Module):
    """Right-hand side of the augmented ODE ``d(x, l)/dt = (v(t, x), div v(t, x))`` of one solve.

    A fresh instance per solve keeps the Hutchinson probes fixed for that solve, including the
    backward (adjoint) solve that may run later. ``calls`` counts function evaluations.
    """

    def __init__(self, velocity: Callable, noise: torch.Tensor | None):
        super().__init__()
        self.velocity = velocity
        self.noise = noise
        self.calls = 0

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x, _ = state
        self.calls += 1
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = self.velocity(t, x)
            if v.shape != x.shape:
                raise ValueError(f"velocity returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
            if self.noise is None:
                div = exact_divergence(v, x, create_graph)
            else:
                div = hutchinson_divergence(v, x, self.noise, create_graph)
        if not create_graph:
            v, div = v.detach(), div.detach()
        return v, div


class ContinuousFlow(Flow):
    """Continuous normalizing flow: the time-``t0 -> t1`` map of ``dx/dt = velocity(t, x)``.

    ``forward(z) -> (x, log|det dx/dz|)`` integrates ``t0 -> t1``; ``inverse(x) -> (z,
    log|det dz/dx|)`` integrates back. Both take ``(B, d)`` and return ``(B, d), (B,)``.

    Args:
        velocity: ``velocity(t, x) -> (B, d)`` (an ``nn.Module`` when ``adjoint=True``).
        t0, t1: integration interval (dimensionless time).
        method, rtol, atol, options: torchdiffeq solver settings; fixed-step solvers such as
            ``"rk4"`` take e.g. ``options={"step_size": 0.05}``.
        divergence: ``"exact"`` (``d`` backward passes per evaluation, for small ``d``) or
            ``"hutchinson"`` (one pass, Rademacher probes fixed for each solve; an unbiased but
            noisy log-Jacobian, for large ``d``).
        adjoint: use ``odeint_adjoint`` (memory O(1) in the number of steps; gradients from a
            backward solve over the velocity's parameters).

    After each solve ``nfe`` holds its number of velocity evaluations (forward solve only).
    Works under ``torch.no_grad()`` (grad is enabled locally for the divergence only): sample
    that way, or the whole solve is kept for backprop. ``self.velocity`` is what a flow-matching
    loss regresses. A Hutchinson ``generator`` must live on the device of the input.
    """

    def __init__(
        self,
        velocity: Callable,
        t0: float = 0.0,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        divergence: str = "exact",
        adjoint: bool = False,
        options: dict | None = None,
    ):
        super().__init__()
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x), got {type(velocity).__name__}")
        if adjoint and not isinstance(velocity, nn.Module):
            raise TypeError(
                "adjoint=True needs the velocity to be an nn.Module (its parameters are the adjoint parameters)"
            )
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if method not in SOLVERS:
            raise ValueError(f"unknown ODE solver {method!r}; torchdiffeq offers {SOLVERS}")
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"need finite t0 != t1, got t0={t0}, t1={t1}")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
        self.velocity = velocity
        self.t0, self.t1 = float(t0), float(t1)
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.options = dict(options) if options is not None else None
        self.divergence = divergence
        self.adjoint = bool(adjoint)
        self.nfe = 0

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None):
        """``z (B, d) -> x (B, d), log|det dx/dz| (B,)``; ``generator`` draws Hutchinson probes."""
        return self._solve(z, self.t0, self.t1, generator)

    def inverse(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """``x (B, d) -> z (B, d), log|det dz/dx| (B,)``; ``generator`` draws Hutchinson probes."""
        return self._solve(x, self.t1, self.t0, generator)

    def _solve(self, x: torch.Tensor, t_start: float, t_end: float, generator: torch.Generator | None):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(
                f"expected a floating-point tensor of shape (B, d), got {getattr(x, 'shape', type(x).__name__)}"
            )
        dynamics = self._dynamics(x, generator)
        times = torch.tensor([t_start, t_end], dtype=x.dtype, device=x.device)
        state = (x, x.new_zeros(x.shape[0]))
        settings = dict(rtol=self.rtol, atol=self.atol, method=self.method, options=self.options)
        if self.adjoint:
            xs, logdets = odeint_adjoint(
                dynamics, state, times, adjoint_params=tuple(self.velocity.parameters()), **settings
            )
        else:
            xs, logdets = odeint(dynamics, state, times, **settings)
        self.nfe = dynamics.calls
        return xs[-1], logdets[-1]

    def _dynamics(self, x: torch.Tensor, generator: torch.Generator | None) -> nn.Module:
        """The augmented ODE right-hand side ``(x, logdet)`` for one solve (fresh probes each)."""
        noise = rademacher(x.shape, x, generator) if self.divergence == "hutchinson" else None
        return _AugmentedDynamics(self.velocity, noise)

    def extra_repr(self) -> str:
        return (
            f"t=({self.t0}, {self.t1}), method={self.method!r}, rtol={self.rtol}, "
            f"atol={self.atol}, divergence={self.divergence!r}, adjoint={self.adjoint}"
        )


# ----------------------------------------------------------------------------------------------
# networks: time embedding, velocity and potentials
# ----------------------------------------------------------------------------------------------


def _mlp(
    n_in: int, hidden: Sequence[int], n_out: int, activation: type[nn.Module], final_bias: bool = True
) -> nn.Sequential:
    sizes = [n_in, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    layers.append(nn.Linear(sizes[-1], n_out, bias=final_bias))
    return nn.Sequential(*layers)


def _check_hidden(hidden: Sequence[int]) -> tuple[int, ...]:
    hidden = tuple(hidden)
    if not hidden or any(int(h) != h or h < 1 for h in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden}")
    return tuple(int(h) for h in hidden)


def batch_times(t, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Times ``t`` (a scalar or ``(batch,)``) as a ``(batch,)`` tensor with ``like``'s dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
    return t


class TimeEmbedding(nn.Module):
    """``t -> [t, sin(pi k t), cos(pi k t)]_{k=1..n}`` of shape ``(B, 1 + 2 n)``.

    ``t`` is a scalar or ``(B,)`` tensor; ``batch`` is ``B``.
    """

    def __init__(self, n_frequencies: int = 4):
        super().__init__()
        if int(n_frequencies) != n_frequencies or n_frequencies < 0:
            raise ValueError(f"n_frequencies must be a non-negative int, got {n_frequencies}")
        self.n_frequencies = int(n_frequencies)
        self.out_features = 1 + 2 * self.n_frequencies

    def forward(self, t: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = batch_times(t, batch, like).unsqueeze(1)
        k = torch.arange(1, self.n_frequencies + 1, dtype=like.dtype, device=like.device)
        return torch.cat([t, torch.sin(math.pi * k * t), torch.cos(math.pi * k * t)], dim=1)


def _check_input(x: torch.Tensor, dim: int) -> None:
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"expected x of shape (B, {dim}), got {tuple(x.shape)}")


class _TimeConditionedMLP(nn.Module):
    """``MLP([x, emb(t)])`` on ``x (B, dim)`` with ``t`` a scalar or ``(B,)``: the shared body of
    the velocity and potential networks."""

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int],
        time_embedding: int,
        activation: type[nn.Module],
        n_out: int,
        final_bias: bool = True,
    ):
        super().__init__()
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim}")
        self.dim = int(dim)
        self.embed = TimeEmbedding(time_embedding)
        self.net = _mlp(
            self.dim + self.embed.out_features, _check_hidden(hidden), n_out, activation, final_bias=final_bias
        )

    def _evaluate(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim)
        return self.net(torch.cat([x, self.embed(t, x.shape[0], x)], dim=1))


class MLPVelocity(_TimeConditionedMLP):
    """Generic velocity ``v(t, x) = MLP([x, emb(t)])``: ``(B, dim) -> (B, dim)``.

    Smooth activations (default SiLU) keep the divergence differentiable for training.
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64), time_embedding: int = 4, activation: type[nn.Module] = nn.SiLU
    ):
        super().__init__(dim, hidden, time_embedding, activation, n_out=int(dim))

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(t, x)


class MLPPotential(_TimeConditionedMLP):
    """Scalar potential ``phi(t, x) = MLP([x, emb(t)])``: ``(B, dim) -> (B,)``."""

    def __init__(
        self, dim: int, hidden: Sequence[int] = (64, 64), time_embedding: int = 4, activation: type[nn.Module] = nn.SiLU
    ):
        # no bias on the output: a constant offset of phi moves nothing
        super().__init__(dim, hidden, time_embedding, activation, n_out=1, final_bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._evaluate(t, x).squeeze(1)


class SymmetricPotential(nn.Module):
    """Potential of identical particles, invariant under their permutations.

    ``x (B, n * s)`` is read as ``(B, n, s)`` positions (``s = spatial_dim``) and

        phi(t, x) = rho( mean_i psi(f_i, t), mean_{i<j} chi(r_ij, t), t )

    with single-particle features ``f_i = r_i`` (or ``|r_i|^2`` when ``rotation_invariant``) and
    softened pair distances ``r_ij = sqrt(|r_i - r_j|^2 + softening^2)`` (``softening`` in the
    units of ``x``; it keeps the Laplacian finite when two particles meet). With
    ``rotation_invariant=True`` phi is also invariant under rotations and reflections about the
    origin (the trap centre of a Coulomb cluster). ``psi``, ``chi`` map to ``hidden[-1]``
    features through ``hidden`` layers; ``rho`` has the same hidden layers and a scalar output.
    Returns ``(B,)``.
    """

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        hidden: Sequence[int] = (64, 64),
        rotation_invariant: bool = False,
        softening: float = 0.1,
        time_embedding: int = 4,
        activation: type[nn.Module] = nn.SiLU,
    ):
        super().__init__()
        if int(n_particles) != n_particles or n_particles < 2:
            raise ValueError(f"n_particles must be an int >= 2, got {n_particles}")
        if int(spatial_dim) != spatial_dim or spatial_dim < 1:
            raise ValueError(f"spatial_dim must be a positive int, got {spatial_dim}")
        if not softening > 0:
            raise ValueError(f"softening must be positive, got {softening}")
        hidden = _check_hidden(hidden)
        self.n_particles, self.spatial_dim = int(n_particles), int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        self.rotation_invariant = bool(rotation_invariant)
        self.softening = float(softening)
        self.embed = TimeEmbedding(time_embedding)
        n_time, width = self.embed.out_features, hidden[-1]
        n_single = 1 if self.rotation_invariant else self.spatial_dim
        self.psi = _mlp(n_single + n_time, hidden[:-1], width, activation)
        self.chi = _mlp(1 + n_time, hidden[:-1], width, activation)
        self.rho = _mlp(2 * width + n_time, hidden, 1, activation, final_bias=False)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.dim)
        batch = x.shape[0]
        r = x.reshape(batch, self.n_particles, self.spatial_dim)
        emb = self.embed(t, batch, x)
        single = (r * r).sum(dim=2, keepdim=True) if self.rotation_invariant else r
        diff = r[:, self.pair_i] - r[:, self.pair_j]
        pair = torch.sqrt((diff * diff).sum(dim=2, keepdim=True) + self.softening**2)
        n_pairs = pair.shape[1]
        psi = self.psi(torch.cat([single, emb.unsqueeze(1).expand(-1, self.n_particles, -1)], dim=2))
        chi = self.chi(torch.cat([pair, emb.unsqueeze(1).expand(-1, n_pairs, -1)], dim=2))
        return self.rho(torch.cat([psi.mean(dim=1), chi.mean(dim=1), emb], dim=1)).squeeze(1)


class PotentialVelocity(nn.Module):
    """Gradient field ``v(t, x) = grad_x potential(t, x)``, ``(B, d) -> (B, d)``.

    The gradient is built with ``create_graph=True`` so that its divergence (the Laplacian) and
    parameter gradients (training, flow matching) can be taken through it.
    """

    def __init__(self, potential: nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            phi = self.potential(t, x)
            if phi.shape != x.shape[:1]:
                raise ValueError(f"potential must return shape ({x.shape[0]},), got {tuple(phi.shape)}")
            return _gradient(phi, x, create_graph=True)


class MongeAmpereFlow(ContinuousFlow):
    """Monge-Ampère flow: a continuous flow with velocity ``grad_x phi(t, x)``.

    ``divergence="exact"`` takes the Laplacian of ``phi`` with ``d`` backward passes (small
    ``d``), ``"hutchinson"`` estimates it with one (large ``d``). A ``phi`` invariant under a
    group acting linearly and orthogonally on ``x`` gives an equivariant map and, with an
    invariant prior, an invariant density. Other arguments as in ``ContinuousFlow``.
    """

    def __init__(
        self,
        potential: nn.Module,
        t0: float = 0.0,
        t1: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        divergence: str = "exact",
        adjoint: bool = False,
        options: dict | None = None,
    ):
        if not isinstance(potential, nn.Module):
            raise TypeError(f"potential must be an nn.Module, got {type(potential).__name__}")
        super().__init__(
            PotentialVelocity(potential),
            t0=t0,
            t1=t1,
            method=method,
            rtol=rtol,
            atol=atol,
            divergence=divergence,
            adjoint=adjoint,
            options=options,
        )

    @property
    def potential(self) -> nn.Module:
        return self.velocity.potential


# ----------------------------------------------------------------------------------------------
# pair potential with analytic gradient and Laplacian (cheap symmetric Monge-Ampère flow)
# ----------------------------------------------------------------------------------------------


class PairPotential(nn.Module):
    """Permutation- and rotation-invariant potential of ``n`` particles in ``D`` dimensions,

        phi(t, x) = sum_{i<j} F(|r_i - r_j|^2, t) + sum_i G(|r_i|^2, t),

    with ``F(s, t) = sum_k a_k(t) b_k(sqrt(s + eps^2)) + a_lin(t) s`` (``G`` likewise with its own
    coefficients) and Gaussian bumps ``b_k(u) = exp(-(u - mu_k)^2 / (2 w^2))`` centred on
    ``n_basis`` points evenly spaced in ``[0, r_max]`` (``w`` their spacing). The coefficients
    are a small MLP of a time embedding whose last layer starts at zero (the flow starts as the
    identity). ``x (B, n * D)``; ``forward(t, x) -> (B,)``. The velocity ``grad phi`` and the
    exact Laplacian come in closed form from :meth:`velocity_and_laplacian` in O(B n^2 K):

        grad_i phi = sum_{j != i} 2 F'(s_ij) (r_i - r_j) + 2 G'(s_i) r_i,
        lap phi    = sum_{i != j} (2 D F' + 4 s_ij F'') + sum_i (2 D G' + 4 s_i G'').

    ``r_max`` and ``softening`` (``eps``) are in the units of ``x``.
    """

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        n_basis: int = 16,
        r_max: float = 3.0,
        softening: float = 0.1,
        hidden: Sequence[int] = (32,),
        time_embedding: int = 4,
    ):
        super().__init__()
        if int(n_particles) != n_particles or n_particles < 1:
            raise ValueError(f"n_particles must be a positive int, got {n_particles}")
        if int(spatial_dim) != spatial_dim or spatial_dim < 1:
            raise ValueError(f"spatial_dim must be a positive int, got {spatial_dim}")
        if int(n_basis) != n_basis or n_basis < 2:
            raise ValueError(f"n_basis must be an int >= 2, got {n_basis}")
        if not (r_max > 0 and softening > 0):
            raise ValueError(f"r_max and softening must be positive, got {r_max}, {softening}")
        self.n_particles, self.spatial_dim = int(n_particles), int(spatial_dim)
        self.dim = self.n_particles * self.spatial_dim
        self.n_basis, self.softening = int(n_basis), float(softening)
        self.register_buffer("centres", torch.linspace(0.0, float(r_max), self.n_basis))
        self.width = float(r_max) / (self.n_basis - 1)
        self.embed = TimeEmbedding(time_embedding)
        self.coefficients = _mlp(self.embed.out_features, _check_hidden(hidden), 2 * (self.n_basis + 1), nn.SiLU)
        nn.init.zeros_(self.coefficients[-1].weight)
        nn.init.zeros_(self.coefficients[-1].bias)
        i, j = torch.triu_indices(self.n_particles, self.n_particles, offset=1)
        self.register_buffer("pair_i", i, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)

    def _coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """Pair and single coefficients, each ``(B or 1, n_basis + 1)`` (bumps, then linear)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        batch = 1 if t.dim() == 0 else x.shape[0]
        c = self.coefficients(self.embed(t, batch, x))
        return c[:, : self.n_basis + 1], c[:, self.n_basis + 1 :]

    def _bumps(self, s: torch.Tensor):
        """Softened distance ``u = sqrt(s + eps^2)`` of ``s (B, m)``, scaled offsets ``z`` and
        Gaussian bumps ``b``, both ``(B, m, n_basis)``."""
        u = torch.sqrt(s + self.softening**2)
        z = (u.unsqueeze(-1) - self.centres) / self.width
        return u, z, torch.exp(-0.5 * z * z)

    @staticmethod
    def _contract(values: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``sum_k values[b, m, k] a[b or 0, k]`` -> ``(B, m)``."""
        if a.shape[0] == 1:
            return values @ a[0]
        return torch.einsum("bmk,bk->bm", values, a)

    def _value(self, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``F(s)`` for squared distances ``s (B, m)`` and coefficients ``c`` -> ``(B, m)``."""
        _, _, bump = self._bumps(s)
        return self._contract(bump, c[:, : self.n_basis]) + c[:, -1:] * s

    def _derivatives(self, s: torch.Tensor, c: torch.Tensor):
        """``F'(s), F''(s)`` for squared distances ``s (B, m)`` -> two ``(B, m)``."""
        u, z, bump = self._bumps(s)
        a = c[:, : self.n_basis]
        bz = bump * z
        h0, h1, h2 = self._contract(bump, a), self._contract(bz, a), self._contract(bz * z, a)
        dh = -h1 / self.width  # h(u) = sum_k a_k b_k(u)
        d2h = (h2 - h0) / self.width**2
        return dh / (2 * u) + c[:, -1:], d2h / (4 * u * u) - dh / (4 * u**3)

    def _geometry(self, x: torch.Tensor):
        _check_input(x, self.dim)
        r = x.reshape(x.shape[0], self.n_particles, self.spatial_dim)
        diff = r.unsqueeze(2) - r.unsqueeze(1)
        s_pair = (diff * diff).sum(-1)[:, self.pair_i, self.pair_j]
        return r, diff, s_pair, (r * r).sum(-1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _, _, s_pair, s_single = self._geometry(x)
        c_pair, c_single = self._coefficients(t, x)
        return self._value(s_pair, c_pair).sum(1) + self._value(s_single, c_single).sum(1)

    def velocity_and_laplacian(self, t: torch.Tensor, x: torch.Tensor):
        """``grad_x phi (B, n * D)`` and ``laplacian_x phi (B,)`` in closed form."""
        r, diff, s_pair, s_single = self._geometry(x)
        batch, n, dim = r.shape
        c_pair, c_single = self._coefficients(t, x)
        df, d2f = self._derivatives(s_pair, c_pair)
        dg, d2g = self._derivatives(s_single, c_single)
        df_full = x.new_zeros(batch, n, n)
        df_full[:, self.pair_i, self.pair_j] = df
        df_full[:, self.pair_j, self.pair_i] = df
        v = 2 * (df_full.unsqueeze(-1) * diff).sum(2) + 2 * dg.unsqueeze(-1) * r
        lap = 2 * (2 * dim * df + 4 * s_pair * d2f).sum(1) + (2 * dim * dg + 4 * s_single * d2g).sum(1)
        return v.reshape(batch, n * dim), lap


class PairPotentialVelocity(nn.Module):
    """``v(t, x) = grad_x phi`` of a :class:`PairPotential`, in closed form (``(B, d) -> (B, d)``)."""

    def __init__(self, potential: PairPotential):
        super().__init__()
        self.potential = potential

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.potential.velocity_and_laplacian(t, x)[0]


class _AnalyticDynamics(nn.Module):
    """``d(x, l)/dt = (grad phi, lap phi)`` from the closed forms of a :class:`PairPotential`."""

    def __init__(self, potential: PairPotential):
        super().__init__()
        self.potential = potential
        self.calls = 0

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        self.calls += 1
        return self.potential.velocity_and_laplacian(t, state[0])


class PairMongeAmpereFlow(ContinuousFlow):
    """Monge-Ampère flow of a :class:`PairPotential` with its closed-form velocity and exact
    Laplacian (no autograd in the dynamics: O(n^2) per evaluation, any batch size).

    ``forward(z) -> (x, log|det dx/dz|)``, ``inverse(x) -> (z, log|det dz/dx|)`` on ``(B, d)``.
    Solver arguments as in :class:`ContinuousFlow` (default: fixed-step RK4, 32 steps).
    ``self.velocity`` (a :class:`PairPotentialVelocity`) is what flow matching regresses.
    """

    def __init__(
        self,
        potential: PairPotential,
        t0: float = 0.0,
        t1: float = 1.0,
        method: str = "rk4",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: bool = False,
        options: dict | None = None,
    ):
        if not isinstance(potential, PairPotential):
            raise TypeError(f"potential must be a PairPotential, got {type(potential).__name__}")
        if options is None and method == "rk4":
            options = {"step_size": abs(t1 - t0) / 32}
        super().__init__(
            PairPotentialVelocity(potential),
            t0=t0,
            t1=t1,
            method=method,
            rtol=rtol,
            atol=atol,
            divergence="exact",
            adjoint=adjoint,
            options=options,
        )

    @property
    def potential(self) -> PairPotential:
        return self.velocity.potential

    def _dynamics(self, x: torch.Tensor, generator: torch.Generator | None) -> nn.Module:
        return _AnalyticDynamics(self.potential)
