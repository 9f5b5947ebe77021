"""Latent densities: standard and isotropic normals over ``z (B, d)`` and the harmonic prior over phase space.

Both follow the device and dtype of the module (``.to(device)``, ``.double()``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .coupling import check_batch

_LOG_2PI = math.log(2.0 * math.pi)


class StandardNormal(nn.Module):
    """Unit Gaussian ``N(0, I_d)``: ``log p(z) = -|z|^2/2 - (d/2) log 2 pi``."""

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        # a scalar carrying the device and dtype the samples follow
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent draws, shape ``(n, d)``."""
        return torch.randn(int(n), self.dim, generator=generator, device=self._anchor.device, dtype=self._anchor.dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised log-density of ``z (B, d)``, shape ``(B,)``."""
        check_batch(z, self.dim, "z")
        return -0.5 * z.pow(2).sum(dim=1) - 0.5 * self.dim * _LOG_2PI


class IsotropicNormal(nn.Module):
    """Isotropic Gaussian ``N(0, std^2 I_d)`` over ``z (B, d)`` (e.g. a harmonic trap's Boltzmann density,
    ``std = sqrt(kT / 2k)`` for the energy ``k |x|^2``); ``scale`` is ``std`` as a buffer that follows
    ``.to()``/``.double()``."""

    def __init__(self, dim: int, std: float):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std}")
        self.dim, self.std = int(dim), float(std)
        self.register_buffer("scale", torch.tensor(self.std))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` independent draws, shape ``(n, d)``."""
        return self.scale * torch.randn(
            int(n), self.dim, generator=generator, dtype=self.scale.dtype, device=self.scale.device
        )

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised log-density of ``z (B, d)``, shape ``(B,)``."""
        check_batch(z, self.dim, "z")
        return -0.5 * (z / self.std).pow(2).sum(1) - self.dim * math.log(self.std * math.sqrt(2 * math.pi))


class LatentHarmonicPrior(nn.Module):
    """Harmonic density over phase space ``(P, Q)``, each ``(B, d)``, in units of kT:

        K(P, Q) = sum_k (P_k^2 + w_k^2 Q_k^2) / 2,    p(P, Q) = exp(-K) / Z,
        Z = prod_k 2 pi / w_k,

    with learnable frequencies ``w_k = exp(log_omega_k)``. ``omega``: a positive float (all
    modes equal) or a ``(d,)`` tensor of positive frequencies (a floating tensor keeps its
    dtype; otherwise the default dtype). The slowest modes have the smallest ``w_k``.
    """

    def __init__(self, dim: int, omega: float | torch.Tensor = 1.0):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        omega = torch.as_tensor(omega)
        if not omega.is_floating_point():
            omega = omega.to(torch.get_default_dtype())
        if omega.dim() == 0:
            omega = omega.expand(self.dim)
        if omega.shape != (self.dim,):
            raise ValueError(f"omega must be a scalar or have shape ({self.dim},), got {tuple(omega.shape)}")
        if not bool(torch.isfinite(omega).all() and (omega > 0).all()):
            raise ValueError(f"omega must be finite and > 0, got {omega.tolist()}")
        self.log_omega = nn.Parameter(torch.log(omega).clone())

    @property
    def omega(self) -> torch.Tensor:
        """Frequencies ``w_k``, shape ``(d,)``."""
        return torch.exp(self.log_omega)

    def energy(self, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """``K(P, Q)`` in kT, shape ``(B,)``."""
        check_batch(P, self.dim, "P")
        check_batch(Q, self.dim, "Q")
        if P.shape != Q.shape:
            raise ValueError(f"P and Q must have the same shape, got {tuple(P.shape)} and {tuple(Q.shape)}")
        return 0.5 * (P.pow(2) + (self.omega * Q).pow(2)).sum(dim=1)

    def free_energy(self) -> torch.Tensor:
        """``-log Z = -sum_k log(2 pi / w_k)`` in kT, a scalar tensor."""
        return (self.log_omega - _LOG_2PI).sum()

    def log_prob(self, P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """Normalised ``log p(P, Q) = -K(P, Q) + free_energy()``, shape ``(B,)``."""
        return -self.energy(P, Q) + self.free_energy()

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws ``(P, Q)``, each ``(n, d)``: ``P ~ N(0, 1)``, ``Q ~ N(0, 1/w^2)``.

        ``Q = eps / w`` is reparametrised, so gradients reach ``log_omega``.
        """
        shape = (2, int(n), self.dim)
        eps = torch.randn(shape, generator=generator, device=self.log_omega.device, dtype=self.log_omega.dtype)
        return eps[0], eps[1] / self.omega

    def slow_modes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mode indices sorted by ``w_k`` ascending (slowest first), ``(d,)`` long, and the sorted ``w``."""
        omega_sorted, order = torch.sort(self.omega.detach(), stable=True)
        return order, omega_sorted


def moment_matched_normal(
    n: int, dim: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """``n`` standard-normal draws ``(n, dim)`` whitened so that their sample mean is exactly 0
    and their sample covariance exactly the identity (needs ``n > dim``).

    A variance-reduction device for a *fixed* batch of latent noise: every quadratic
    expectation is then estimated without error, so a variational free energy of a Gaussian
    target over a linear flow evaluated on this batch equals the exact one, and a deterministic
    optimizer (L-BFGS) reaches the exact optimum.
    """
    if int(n) <= int(dim):
        raise ValueError(f"moment matching needs more samples than dimensions, got n={n}, dim={dim}")
    eps = torch.randn(int(n), int(dim), generator=generator, dtype=dtype, device=device)
    eps = eps - eps.mean(0)
    chol = torch.linalg.cholesky(eps.T @ eps / int(n))
    return torch.linalg.solve_triangular(chol, eps.T, upper=False).T
