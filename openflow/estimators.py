"""Estimators on top of a flow: importance weights, free energies, reweighting, exact samplers.

Conventions: an *energy* is a callable ``u(x) -> (B,)`` in units of kT, differentiable in ``x``;
a *model* has ``sample(n) -> (x (n, d), log_q (n,))`` and ``log_prob(x) -> (B,)``
(e.g. ``openflow.flows.base.BoltzmannGenerator``); a *flow* follows ``openflow.flows.base.Flow``.

Importance weights are ``w = exp(-u(x)) / q(x)``. A sample whose weight is not finite (energy
NaN/inf, e.g. a failed force-field evaluation or an overlap) gets weight 0 and is counted in
``n_nonfinite``. Free energies are reduced (kT) and relative to the normalisation of ``q``:
``F = -log Z`` with ``Z = int exp(-u(x)) dx``.

Samplers draw their random numbers from torch's global generator, forked and seeded when a
``seed`` is given, so that ``model.sample`` is reproducible too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from openflow.flows.base import Flow

Energy = Callable[[torch.Tensor], torch.Tensor]

_BOOTSTRAP_ELEMENTS = 2**22  # resampled indices held in memory at once
_PROPOSALS_PER_BATCH = 2**16  # default proposals per call to model.sample/energy


@dataclass(frozen=True)
class FreeEnergyEstimate:
    """``value``: F = -log mean w (kT); ``error``: its standard error; ``ess``: Kish ESS as a
    fraction of ``n``; ``n``: samples (zero-weight ones included); ``n_nonfinite``: zero-weight."""

    value: float
    error: float
    ess: float
    n: int
    n_nonfinite: int


@dataclass(frozen=True)
class ReweightedMean:
    """Self-normalised importance-sampling mean of an observable, shape ``()`` or ``(k,)``,
    its delta-method standard error (same shape), and the Kish ESS fraction of the weights."""

    mean: torch.Tensor
    error: torch.Tensor
    ess: float


@dataclass(frozen=True)
class ImportanceSample:
    """Samples ``x (n, d)`` from the model, their log-weights ``log_w (n,)`` and the summary."""

    x: torch.Tensor
    log_w: torch.Tensor
    summary: FreeEnergyEstimate


@dataclass(frozen=True)
class MCMCResult:
    """``samples (n_steps // thin, n_chains, d)`` in x, the fraction of accepted proposals per
    chain ``chain_acceptance (n_chains,)`` (a chain near 0 is stuck) and over all chains, and how
    many proposals had a non-finite energy (all rejected)."""

    samples: torch.Tensor
    chain_acceptance: torch.Tensor
    acceptance_rate: float
    n_nonfinite: int


# ---------------------------------------------------------------------------------------------
# weights, ESS, free energy, reweighting


def log_weights(u_x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``log w = -u(x) - log q(x)``, shape ``(B,)``; non-finite entries become ``-inf`` (w = 0)."""
    if not (isinstance(u_x, torch.Tensor) and isinstance(log_q, torch.Tensor)):
        raise TypeError("log_weights expects torch tensors u_x and log_q")
    if u_x.ndim != 1 or u_x.shape != log_q.shape:
        raise ValueError(f"u_x and log_q must both have shape (B,), got {tuple(u_x.shape)} and {tuple(log_q.shape)}")
    log_w = -u_x - log_q
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def _check_log_w(log_w: torch.Tensor) -> None:
    if not isinstance(log_w, torch.Tensor):
        raise TypeError("log_w must be a torch tensor")
    if log_w.ndim != 1 or log_w.numel() == 0:
        raise ValueError(f"log_w must have shape (B,) with B > 0, got {tuple(log_w.shape)}")
    if torch.isnan(log_w).any() or (log_w == math.inf).any():
        raise ValueError("log_w contains NaN or +inf: build it with log_weights()")


def _kish_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """``(sum w)^2 / (n sum w^2)`` as a 0-dim tensor; 0 when every weight is 0."""
    lse = torch.logsumexp(log_w, 0)
    if not torch.isfinite(lse):
        return log_w.new_zeros(())
    return torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0)) / log_w.numel()


def effective_sample_size(log_w) -> float:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` as a fraction of ``len(log_w)``, in ``[0, 1]``,
    from log-weights ``(B,)`` (a torch tensor or anything numpy reads; ``-inf`` for zero weights).
    The package's one ESS: weights ``w`` enter as ``log(w)``."""
    if not isinstance(log_w, torch.Tensor):
        log_w = torch.as_tensor(np.asarray(log_w, dtype=np.float64))
    _check_log_w(log_w)
    return float(_kish_fraction(log_w.detach()))


def _log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def _generator(seed: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


def _bootstrap_std(log_w: torch.Tensor, n_bootstrap: int, generator: torch.Generator | None) -> float:
    """Standard deviation of ``-log mean w`` over bootstrap resamples of the samples."""
    n = log_w.numel()
    per_chunk = max(1, _BOOTSTRAP_ELEMENTS // n)
    estimates = []
    for start in range(0, n_bootstrap, per_chunk):
        rows = min(per_chunk, n_bootstrap - start)
        idx = torch.randint(n, (rows, n), generator=generator, device=log_w.device)
        estimates.append(-_log_mean_exp(log_w[idx]))
    estimates = torch.cat(estimates)
    if not torch.isfinite(estimates).all():  # a resample with only zero weights
        return math.inf
    return float(estimates.std())


def free_energy(
    log_w: torch.Tensor, n_bootstrap: int = 200, seed: int | None = None, generator: torch.Generator | None = None
) -> FreeEnergyEstimate:
    """Importance-sampling free energy ``F = -log mean w`` (kT) with an error bar.

    ``log_w (B,)`` from :func:`log_weights`. The error is the standard deviation over
    ``n_bootstrap`` resamples; with ``n_bootstrap=0`` it is the delta-method estimate
    ``sqrt((1/ess - 1) / n)``. With no finite weight, ``value`` is ``inf`` and ``error`` NaN.
    """
    _check_log_w(log_w)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0 or n_bootstrap == 1:
        raise ValueError(f"n_bootstrap must be 0 (delta method) or an integer >= 2, got {n_bootstrap!r}")
    log_w = log_w.detach()
    n = log_w.numel()
    n_nonfinite = int((~torch.isfinite(log_w)).sum())
    ess = float(_kish_fraction(log_w))
    value = float(-_log_mean_exp(log_w))
    if ess == 0.0:
        return FreeEnergyEstimate(math.inf, math.nan, 0.0, n, n_nonfinite)
    if n_bootstrap == 0:
        w = torch.exp(log_w - log_w.max())  # in (0, 1]: no overflow
        error = float(w.std(correction=0) / (w.mean() * math.sqrt(n)))
    else:
        error = _bootstrap_std(log_w, n_bootstrap, _generator(seed, generator, log_w.device))
    return FreeEnergyEstimate(value, error, ess, n, n_nonfinite)


def reweight(values: torch.Tensor, log_w: torch.Tensor) -> ReweightedMean:
    """Weighted mean of an observable ``values (B,)`` or ``(B, k)`` under weights ``log_w (B,)``.

    Zero-weight samples are ignored even where their values are NaN. The standard error is the
    delta-method one of the self-normalised estimator, ``sqrt(sum p_i^2 (v_i - mean)^2)``.
    """
    _check_log_w(log_w)
    if not isinstance(values, torch.Tensor):
        raise TypeError("values must be a torch tensor")
    if values.ndim not in (1, 2) or values.shape[0] != log_w.shape[0]:
        raise ValueError(f"values must have shape (B,) or (B, k) with B = {log_w.shape[0]}, got {tuple(values.shape)}")
    log_w = log_w.detach()
    p = torch.exp(log_w - torch.logsumexp(log_w, 0)).to(values.dtype)
    if values.ndim == 2:
        p = p.unsqueeze(1)
    v = torch.where(p > 0, values, torch.zeros_like(values))
    mean = (p * v).sum(0)
    error = torch.sqrt((p**2 * (v - mean) ** 2).sum(0))
    return ReweightedMean(mean, error, float(_kish_fraction(log_w)))


@dataclass(frozen=True)
class StateFreeEnergy:
    """``delta_f``: ``F(state) - F(rest) = -ln[P(state) / P(rest)]`` in kT from weighted samples;
    ``error``: its standard error (delta method over independent units, see
    :func:`state_free_energy`); ``ess_state`` / ``ess_rest``: Kish effective sample sizes (counts)
    of the weights inside the state and outside it; ``n_units``: independent units (samples or blocks)."""

    delta_f: float
    error: float
    ess_state: float
    ess_rest: float
    n_units: int


def state_free_energy(in_state, log_weights=None, n_blocks: int | None = None) -> StateFreeEnergy:
    """ΔF of a state against the rest from samples ``in_state (T,)`` (bool) with ``log_weights (T,)``
    (None: equal weights), and its error bar.

    The error is the delta method on the two weight sums ``W_s`` (in the state) and ``W_r`` (the
    rest) over independent units ``b``: ``var = n/(n-1) sum_b (W_r^b / W_r - W_s^b / W_s)^2``.
    ``n_blocks=None``: every sample is a unit (independent samples, e.g. importance sampling); the
    variance is then ``1/ESS_s + 1/ESS_r`` with each side's own Kish ESS, so an estimate resting on
    few effective samples inside the state says so. ``n_blocks``: contiguous blocks of a time series
    (correlated frames, e.g. metadynamics) are the units. With no weight in the state (or none
    outside) ``delta_f`` is +inf (-inf) and ``error`` inf.
    """
    inside = np.asarray(in_state)
    if inside.ndim != 1 or inside.size < 2 or inside.dtype != bool:
        raise ValueError(f"in_state must be a bool array (T,) with T >= 2, got {inside.dtype} {inside.shape}")
    log_w = np.zeros(inside.size) if log_weights is None else np.asarray(log_weights, dtype=np.float64)
    if log_w.shape != inside.shape or np.isnan(log_w).any() or (log_w == np.inf).any():
        raise ValueError(f"log_weights must be (T,) = {inside.shape} without NaN or +inf, got {log_w.shape}")
    w = np.exp(log_w - log_w.max())
    units = inside.size if n_blocks is None else int(n_blocks)
    if not 2 <= units <= inside.size:
        raise ValueError(f"n_blocks must be in [2, {inside.size}], got {n_blocks}")
    size, extra = divmod(inside.size, units)  # contiguous blocks as np.array_split cuts them
    starts = np.concatenate([[0], np.cumsum([size + 1] * extra + [size] * (units - extra))[:-1]])
    state_sums = np.add.reduceat(np.where(inside, w, 0.0), starts)
    rest_sums = np.add.reduceat(np.where(inside, 0.0, w), starts)
    total_state, total_rest = state_sums.sum(), rest_sums.sum()
    ess = [float(a.sum() ** 2 / (a**2).sum()) if a.sum() > 0 else 0.0 for a in (w[inside], w[~inside])]
    if total_state == 0 or total_rest == 0:
        return StateFreeEnergy(math.inf if total_state == 0 else -math.inf, math.inf, *ess, units)
    variance = units / (units - 1) * np.sum((rest_sums / total_rest - state_sums / total_state) ** 2)
    return StateFreeEnergy(float(np.log(total_rest) - np.log(total_state)), float(np.sqrt(variance)), *ess, units)


# ---------------------------------------------------------------------------------------------
# sampling


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Run the block on torch's global generators seeded with ``seed``, restoring them after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        yield


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _energies(energy: Energy, x: torch.Tensor) -> torch.Tensor:
    u = energy(x)
    if not isinstance(u, torch.Tensor) or u.shape != (x.shape[0],):
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"energy must return a tensor of shape ({x.shape[0]},), got {shape}")
    return u


def _sample_model(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, log_q = model.sample(n)
    if x.ndim != 2 or x.shape[0] != n or log_q.shape != (n,):
        raise ValueError(
            f"model.sample({n}) must return x ({n}, d) and log_q ({n},), got {tuple(x.shape)} and {tuple(log_q.shape)}"
        )
    return x, log_q


def _model_log_weights(model, energy: Energy, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, log_q = _sample_model(model, n)
    return x, log_weights(_energies(energy, x), log_q)


def importance_sample(
    model,
    energy: Energy,
    n: int,
    batch_size: int = _PROPOSALS_PER_BATCH,
    n_bootstrap: int = 200,
    seed: int | None = None,
) -> ImportanceSample:
    """Draw ``n`` samples from ``model`` in batches, weight them by ``exp(-energy) / q``.

    Returns ``x (n, d)``, ``log_w (n,)`` and a :class:`FreeEnergyEstimate` of ``F = -log Z``.
    """
    _positive_int("n", n)
    _positive_int("batch_size", batch_size)
    with _seeded(seed), torch.no_grad():
        batches = [_model_log_weights(model, energy, min(batch_size, n - start)) for start in range(0, n, batch_size)]
        x = torch.cat([b[0] for b in batches])
        log_w = torch.cat([b[1] for b in batches])
        summary = free_energy(log_w, n_bootstrap=n_bootstrap)
    return ImportanceSample(x, log_w, summary)


def _check_chain_setup(n_steps, n_chains, thin) -> int:
    _positive_int("n_steps", n_steps)
    _positive_int("n_chains", n_chains)
    _positive_int("thin", thin)
    if thin > n_steps:
        raise ValueError(f"thin ({thin}) must not exceed n_steps ({n_steps})")
    return n_steps // thin


def _check_start(name: str, start: torch.Tensor, n_chains: int) -> None:
    if not isinstance(start, torch.Tensor) or start.ndim != 2 or start.shape[0] != n_chains:
        shape = tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
        raise ValueError(f"{name} must be a tensor of shape (n_chains={n_chains}, d), got {shape}")


def _mcmc_result(samples: torch.Tensor, n_accepted: torch.Tensor, n_steps: int, n_nonfinite: int) -> MCMCResult:
    rate = int(n_accepted.sum()) / (n_steps * n_accepted.numel())
    return MCMCResult(samples, n_accepted.to(samples.dtype) / n_steps, rate, n_nonfinite)


def independence_metropolis(
    model,
    energy: Energy,
    n_steps: int,
    n_chains: int,
    x0: torch.Tensor | None = None,
    seed: int | None = None,
    thin: int = 1,
    batch_size: int = _PROPOSALS_PER_BATCH,
) -> MCMCResult:
    """Metropolized independence sampler with proposals from ``model`` (exact MCMC).

    Every chain proposes ``x' ~ q`` and accepts with ``min(1, w(x') / w(x))``; chains start at
    ``x0 (n_chains, d)`` or, by default, at a draw from the model. Proposals are drawn and
    evaluated ``batch_size`` at a time; only the accept/reject runs step by step, vectorised
    over chains. Returns every ``thin``-th state, ``samples (n_steps // thin, n_chains, d)``.
    """
    n_keep = _check_chain_setup(n_steps, n_chains, thin)
    _positive_int("batch_size", batch_size)
    steps_per_batch = max(1, batch_size // n_chains)
    with _seeded(seed), torch.no_grad():
        if x0 is None:
            x, lw = _model_log_weights(model, energy, n_chains)
        else:
            _check_start("x0", x0, n_chains)
            x = x0
            lw = log_weights(_energies(energy, x0), model.log_prob(x0))
        chain = torch.arange(n_chains, device=x.device)
        samples = x.new_empty((n_keep, n_chains, x.shape[1]))
        n_accepted = torch.zeros(n_chains, dtype=torch.long, device=x.device)
        n_nonfinite = 0
        for t0 in range(0, n_steps, steps_per_batch):
            k = min(steps_per_batch, n_steps - t0)
            x_prop, lw_prop = _model_log_weights(model, energy, k * n_chains)
            if x_prop.shape[1] != x.shape[1]:
                raise ValueError(f"x0 has dimension {x.shape[1]}, the model samples {x_prop.shape[1]}")
            x_prop = x_prop.view(k, n_chains, -1)
            lw_prop = lw_prop.view(k, n_chains)
            n_nonfinite += int((~torch.isfinite(lw_prop)).sum())
            log_u = torch.rand((k, n_chains), dtype=lw.dtype, device=lw.device).log()
            accepted = torch.empty((k, n_chains), dtype=torch.bool, device=lw.device)
            for t in range(k):  # -inf - (-inf) is NaN: a zero-weight chain waits for w > 0
                accepted[t] = log_u[t] < lw_prop[t] - lw
                lw = torch.where(accepted[t], lw_prop[t], lw)
            n_accepted += accepted.sum(0)
            # the state after step t is the proposal of the last accepted step <= t
            step = torch.arange(k, device=lw.device).unsqueeze(1)
            last = torch.cummax(torch.where(accepted, step, -1), dim=0).values
            states = torch.where((last >= 0).unsqueeze(-1), x_prop[last.clamp(min=0), chain], x.unsqueeze(0))
            kept = (torch.arange(t0, t0 + k, device=lw.device) + 1) % thin == 0
            first = t0 // thin
            samples[first : first + int(kept.sum())] = states[kept]
            x = states[-1]
    return _mcmc_result(samples, n_accepted, n_steps, n_nonfinite)


def _latent_energy_and_grad(flow: Flow, energy: Energy, z: torch.Tensor):
    """``x = g(z)``, ``u_eff(z) = u(g(z)) - log|det dg/dz|`` and ``grad u_eff``, all detached."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        x, logdet = flow(z)
        u_eff = _energies(energy, x) - logdet
        (grad,) = torch.autograd.grad(u_eff.sum(), z)
    return x.detach(), u_eff.detach(), grad


def latent_hmc(
    flow: Flow,
    prior,
    energy: Energy,
    n_steps: int,
    n_chains: int,
    step_size: float,
    n_leapfrog: int,
    z0: torch.Tensor | None = None,
    seed: int | None = None,
    thin: int = 1,
) -> MCMCResult:
    """Hamiltonian Monte Carlo in the latent space of ``flow`` (NeuralRG), mapped back exactly.

    The chains sample ``z`` from ``exp(-u_eff(z))`` with ``u_eff(z) = u(g(z)) - log|det dg/dz|``
    (``g = flow.forward``), so that ``x = g(z)`` follows ``exp(-u(x))``; the prior does not enter
    the target and only supplies the start ``z ~ prior`` when ``z0 (n_chains, d)`` is not given.
    Unit mass, ``n_leapfrog`` leapfrog steps of ``step_size`` per proposal, Metropolis correction;
    proposals with a non-finite energy or position are rejected and counted. The start must have
    a finite energy; a chain started where the leapfrog is unstable for ``step_size`` (a stiff,
    high-energy region of a badly scaled flow) may never move: check ``chain_acceptance``.
    Returns every ``thin``-th state in x, ``samples (n_steps // thin, n_chains, d)``.
    """
    n_keep = _check_chain_setup(n_steps, n_chains, thin)
    _positive_int("n_leapfrog", n_leapfrog)
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
    with _seeded(seed):
        if z0 is None:
            if prior is None:
                raise ValueError("give a prior or a starting point z0")
            z0 = prior.sample(n_chains)
        _check_start("z0", z0, n_chains)
        z = z0.detach()
        x, u, grad = _latent_energy_and_grad(flow, energy, z)
        bad = ~(torch.isfinite(u) & torch.isfinite(grad).all(1))
        if bad.any():
            raise ValueError(
                f"non-finite effective energy or gradient at the start of chains "
                f"{bad.nonzero().flatten().tolist()}: pass a finite z0"
            )
        samples = x.new_empty((n_keep, n_chains, x.shape[1]))
        n_accepted = torch.zeros(n_chains, dtype=torch.long, device=z.device)
        n_nonfinite = torch.zeros((), dtype=torch.long, device=z.device)
        for step in range(n_steps):
            p = torch.randn_like(z)
            h_old = u + 0.5 * (p**2).sum(1)
            z_new, p_new = z, p - 0.5 * step_size * grad
            for i in range(n_leapfrog):
                z_new = z_new + step_size * p_new
                x_new, u_new, grad_new = _latent_energy_and_grad(flow, energy, z_new)
                p_new = p_new - (step_size if i < n_leapfrog - 1 else 0.5 * step_size) * grad_new
            h_new = u_new + 0.5 * (p_new**2).sum(1)
            finite = (
                torch.isfinite(h_new)
                & torch.isfinite(z_new).all(1)
                & torch.isfinite(x_new).all(1)
                & torch.isfinite(grad_new).all(1)
            )
            log_u = torch.rand_like(h_old).log()
            accept = finite & (log_u < h_old - h_new)
            z = torch.where(accept.unsqueeze(1), z_new, z)
            x = torch.where(accept.unsqueeze(1), x_new, x)
            grad = torch.where(accept.unsqueeze(1), grad_new, grad)
            u = torch.where(accept, u_new, u)
            n_accepted += accept
            n_nonfinite += (~finite).sum()
            if (step + 1) % thin == 0:
                samples[(step + 1) // thin - 1] = x
    return _mcmc_result(samples, n_accepted, n_steps, int(n_nonfinite))
