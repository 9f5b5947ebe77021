"""The flow protocol, composition, and the Boltzmann generator (prior + flow).

Every flow maps a batch of latent points ``z`` of shape ``(B, d)`` to ``x`` of shape ``(B, d)``:

    forward(z) -> (x, logdet)   with logdet = log|det dx/dz|, shape (B,)
    inverse(x) -> (z, logdet)   with logdet = log|det dz/dx|, shape (B,)

so that ``inverse(forward(z)[0])[1] == -forward(z)[1]``.
"""

from __future__ import annotations

import torch
from torch import nn


class Flow(nn.Module):
    """Base class of an invertible map with a tractable log-Jacobian."""

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class InverseFlow(Flow):
    """The inverse of a flow, as a flow."""

    def __init__(self, flow: Flow):
        super().__init__()
        self.flow = flow

    def forward(self, z):
        return self.flow.inverse(z)

    def inverse(self, x):
        return self.flow.forward(x)


class SubsetFlow(Flow):
    """``flow`` applied to the columns ``indices`` of a ``(B, d)`` batch; the other columns pass unchanged
    (so the log-det is ``flow``'s). E.g. a torus flow on the two backbone torsions of a molecule."""

    def __init__(self, flow: Flow, indices, dim: int):
        super().__init__()
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        if (
            indices.numel() == 0
            or len(set(indices.tolist())) != indices.numel()
            or not 0 <= int(indices.min()) <= int(indices.max()) < dim
        ):
            raise ValueError(f"indices must be distinct columns in [0, {dim}), got {indices.tolist()}")
        self.flow = flow
        self.dim = int(dim)
        self.register_buffer("indices", indices, persistent=False)

    def _on_subset(self, direction, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(f"input must have shape (B, {self.dim}), got {tuple(y.shape)}")
        out, logdet = direction(y.index_select(1, self.indices))
        return y.index_copy(1, self.indices, out), logdet

    def forward(self, z):
        return self._on_subset(self.flow.forward, z)

    def inverse(self, x):
        return self._on_subset(self.flow.inverse, x)


class SequentialFlow(Flow):
    """Composition ``f_n o ... o f_1``: ``forward`` applies the layers in order."""

    def __init__(self, *layers: Flow):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, z):
        logdet = z.new_zeros(z.shape[0])
        for layer in self.layers:
            z, ld = layer(z)
            logdet = logdet + ld
        return z, logdet

    def inverse(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers):
            x, ld = layer.inverse(x)
            logdet = logdet + ld
        return x, logdet


class BoltzmannGenerator(nn.Module):
    """A prior density over ``z`` pushed through a flow: ``x = flow(z)``.

    ``prior`` must provide ``sample(n) -> (n, d)`` and ``log_prob(z) -> (B,)``.
    """

    def __init__(self, prior: nn.Module, flow: Flow):
        super().__init__()
        self.prior = prior
        self.flow = flow

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples: returns ``x (n, d)`` and ``log q(x) (n,)``."""
        z = self.prior.sample(n)
        x, logdet = self.flow(z)
        return x, self.prior.log_prob(z) - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log q(x)`` of shape ``(B,)`` for ``x (B, d)``."""
        z, logdet = self.flow.inverse(x)
        return self.prior.log_prob(z) + logdet
