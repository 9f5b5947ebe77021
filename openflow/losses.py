"""Training objectives: likelihood on data, variational free energy, conditional flow matching.

An *energy* is any callable ``u(x) -> (B,)`` giving the reduced energy (units of kT) of a batch
``x (B, d)``, differentiable in ``x``. A *model* has ``log_prob(x) -> (B,)`` and/or
``sample(n) -> (x (n, d), log q(x) (n,))`` (e.g. :class:`openflow.flows.base.BoltzmannGenerator`).
Nothing here depends on OpenMM.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from openflow.flows.cnf import batch_times

Energy = Callable[[torch.Tensor], torch.Tensor]


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, d) with B >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_per_sample(values: torch.Tensor, batch: int, name: str) -> None:
    if not isinstance(values, torch.Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name} must return one value per sample, shape ({batch},), got {shape}")


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values (B,)`` with optional non-negative ``weights (B,)``, normalised to sum 1."""
    if weights is None:
        return values.mean()
    if not isinstance(weights, torch.Tensor) or weights.shape != values.shape:
        shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"weights must have shape {tuple(values.shape)}, got {shape}")
    weights = weights.to(values)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    total = weights.sum()
    if not total > 0:
        raise ValueError("weights must not all be zero")
    return (weights * values).sum() / total


def nll(model, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood ``-E_data[log q(x)]`` (forward KL up to the data entropy).

    ``x``: data ``(B, d)``; ``weights``: optional non-negative ``(B,)`` sample weights (normalised
    internally). Returns a scalar in nats.
    """
    _check_batch(x, "x")
    log_q = model.log_prob(x)
    _check_per_sample(log_q, x.shape[0], "model.log_prob")
    return -_weighted_mean(log_q, weights)


def mean_nll(model, x: torch.Tensor, weights: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """Evaluation, without a graph: ``-sum_i w_i log q(x_i) / sum_i w_i`` over ``x (T, d)`` in chunks
    (``weights (T,)``; None: plain mean)."""
    with torch.no_grad():
        log_q = torch.cat([model.log_prob(block) for block in x.split(chunk)])
    return float(-_weighted_mean(log_q, weights))


def soft_cap_energy(u: torch.Tensor, u_high: float | None = None, u_max: float | None = None) -> torch.Tensor:
    """Tame high energies: clamp at ``u_max``, then continue logarithmically above ``u_high``.

    ``u_soft = u`` for ``u <= u_high`` and ``u_high + log(1 + u - u_high)`` above, so value and
    slope are continuous at ``u_high`` and the gradient decays as ``1 / (1 + u - u_high)``.
    Above ``u_max`` the raw energy is constant (zero gradient). ``None`` disables either step.
    """
    if u_high is not None and u_max is not None and not u_max > u_high:
        raise ValueError(f"u_max must exceed u_high, got u_high={u_high}, u_max={u_max}")
    if u_max is not None:
        u = u.clamp(max=u_max)
    if u_high is not None:
        excess = (u - u_high).clamp(min=0.0)
        u = torch.where(u > u_high, u_high + torch.log1p(excess), u)
    return u


def _zero_grad_rows(x: torch.Tensor, keep: torch.Tensor) -> None:
    """Make the gradient reaching ``x (B, d)`` exactly zero on rows where ``keep (B,)`` is False.

    A dropped sample gets zero weight in the loss, but the energy's backward can still turn that
    zero into ``0 * inf = nan`` (e.g. a force at overlapping atoms); this stops it at ``x``.
    """
    if x.requires_grad:
        mask = keep.view(-1, *([1] * (x.dim() - 1)))
        x.register_hook(lambda grad: torch.where(mask, grad, torch.zeros_like(grad)))


def reverse_kl(
    model, energy: Energy, n: int, beta: float = 1.0, u_high: float | None = None, u_max: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variational free energy ``F_q = E_{x~q}[beta u(x) + log q(x)]`` from ``n`` model samples.

    ``model.sample(n)`` must return reparametrised ``x (n, d)`` and ``log q(x) (n,)``; ``energy``
    maps ``x`` to reduced energies ``(n,)`` (kT). ``beta`` scales the energy (the target is
    ``exp(-beta u)``; ``beta < 1`` anneals from a hotter target). Samples whose energy or log q is
    NaN/inf are dropped (the loss is the mean over the others, their gradients are exactly zero)
    and counted. ``u_high`` / ``u_max`` soft-cap the energies entering the *loss* (see
    :func:`soft_cap_energy`); the reported statistics always use the raw energies.

    Returns ``(loss, stats)``: ``loss`` a scalar (NaN when no sample is finite), ``stats`` floats
    ``free_energy_kT`` (the F_q estimate, an upper bound of ``-log Z_beta`` in expectation) and its
    ``free_energy_stderr_kT``, ``energy_mean_kT`` (raw ``u``), ``log_q_mean``, ``n_nonfinite`` /
    ``frac_nonfinite`` (non-finite energies) and ``n_nonfinite_log_q``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta}")
    x, log_q = model.sample(n)
    _check_batch(x, "model.sample(n)[0]")
    _check_per_sample(log_q, n, "model.sample(n)[1] (log q)")
    u = energy(x)
    _check_per_sample(u, n, "energy")

    finite_u = torch.isfinite(u)
    keep = finite_u & torch.isfinite(log_q)
    _zero_grad_rows(x, keep)
    u_kept, log_q_kept = u[keep], log_q[keep]
    loss = (beta * soft_cap_energy(u_kept, u_high, u_max) + log_q_kept).mean()

    with torch.no_grad():
        f_samples = (beta * u_kept + log_q_kept).double()
        n_kept = f_samples.numel()
        stderr = f_samples.std() / math.sqrt(n_kept) if n_kept > 1 else f_samples.new_tensor(math.nan)
        counts = torch.stack([(~finite_u).sum(), (finite_u & ~keep).sum()])
        summary = torch.cat(
            [
                torch.stack([f_samples.mean(), stderr, u_kept.double().mean(), log_q_kept.double().mean()]),
                counts.double(),
            ]
        ).tolist()
    f_mean, f_err, u_mean, log_q_mean, n_bad_u, n_bad_log_q = summary
    stats = {
        "free_energy_kT": f_mean,
        "free_energy_stderr_kT": f_err,
        "energy_mean_kT": u_mean,
        "log_q_mean": log_q_mean,
        "n_nonfinite": int(n_bad_u),
        "frac_nonfinite": n_bad_u / n,
        "n_nonfinite_log_q": int(n_bad_log_q),
    }
    return loss, stats


def flow_matching(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Conditional flow matching with the linear interpolant ``x_t = (1 - t) x0 + t x1``.

    Regresses ``velocity(t, x_t)`` (``t (B,)``, ``x_t (B, d)`` -> ``(B, d)``) on the conditional
    velocity ``x1 - x0``: loss ``= sum_i w_i |v(t_i, x_t,i) - (x1_i - x0_i)|^2 / sum_i w_i``
    (squared norm summed over ``d``). ``x0``: prior samples, ``x1``: data samples, both ``(B, d)``.
    ``t``: ``(B,)`` or a scalar; by default ``t ~ U(0, 1)`` per sample, drawn with ``generator``.
    ``weights``: optional non-negative ``(B,)`` importance weights (normalised internally).
    """
    _check_batch(x0, "x0")
    _check_batch(x1, "x1")
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    batch = x0.shape[0]
    if t is None:
        rng_device = generator.device if generator is not None else x0.device
        t = torch.rand(batch, generator=generator, device=rng_device, dtype=x0.dtype).to(x0.device)
    else:
        t = batch_times(t, batch, x0)
    tc = t.unsqueeze(1)
    x_t = (1 - tc) * x0 + tc * x1
    v = velocity(t, x_t)
    if not isinstance(v, torch.Tensor) or v.shape != x_t.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"velocity(t, x_t) must have the shape of x_t {tuple(x_t.shape)}, got {shape}")
    per_sample = (v - (x1 - x0)).pow(2).sum(dim=1)
    return _weighted_mean(per_sample, weights)
