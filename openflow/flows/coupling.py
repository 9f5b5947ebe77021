"""RealNVP building blocks: affine coupling layers, ActNorm, and a stack builder.

All layers follow the protocol of :mod:`openflow.flows.base` on batches ``(B, d)``:
``forward(z) -> (x, log|det dx/dz|)`` and ``inverse(x) -> (z, log|det dz/dx|)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .base import Flow, SequentialFlow

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


def check_batch(x: torch.Tensor, dim: int, name: str = "x") -> None:
    """Raise a ValueError/TypeError unless ``x`` is a floating tensor of shape ``(B, dim)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _activation(activation: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    if isinstance(activation, str):
        try:
            return _ACTIVATIONS[activation.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)} or pass an nn.Module class"
            ) from None
    if callable(activation):
        return activation
    raise TypeError(f"activation must be a name or an nn.Module class, got {activation!r}")


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (64, 64),
    activation: str | Callable[[], nn.Module] = "silu",
    zero_last: bool = False,
) -> nn.Sequential:
    """A multilayer perceptron ``(B, in_dim) -> (B, out_dim)``.

    ``activation`` is a name (``"silu"``, ``"tanh"``, ``"relu"``, ``"gelu"``, ``"elu"``,
    ``"softplus"``) or a zero-argument callable returning a module (e.g. ``nn.Tanh``).
    ``zero_last=True`` zeroes the output layer, so the network starts as the constant 0.
    """
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise TypeError(f"hidden must be a sequence of layer widths, e.g. (64, 64) or (256,), got {hidden!r}")
    hidden = tuple(int(h) for h in hidden)
    if in_dim < 1 or out_dim < 1 or any(h < 1 for h in hidden):
        raise ValueError(f"layer widths must be >= 1, got in={in_dim}, hidden={hidden}, out={out_dim}")
    make_activation = _activation(activation)
    widths = (in_dim, *hidden)
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), make_activation()]
    last = nn.Linear(widths[-1], out_dim)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class MaskedCoupling(Flow):
    """Base of coupling layers: ``mask`` (a binary ``(d,)`` buffer) marks with 1 the conditioning
    (unchanged) dimensions; ``cond_idx`` / ``trans_idx`` index the two halves (``n_cond``, ``n_trans``).

    ``circular``: indices of dimensions that are angles (rad). The conditioner sees a conditioning
    angle as ``(cos, sin)``, continuous across ``+-pi``: :meth:`features` has ``n_features`` columns.
    Subclasses write :meth:`_transform`; ``forward`` and ``inverse`` check the batch and call it.
    """

    def __init__(self, mask: torch.Tensor | Sequence[int], circular: Sequence[int] = ()):
        super().__init__()
        mask = torch.as_tensor(mask)
        if mask.dim() != 1:
            raise ValueError(f"mask must be one-dimensional (d,), got shape {tuple(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 and 1")
        mask = mask.bool()
        self.n_cond = int(mask.sum())
        if self.n_cond == 0 or self.n_cond == mask.numel():
            raise ValueError("mask must have at least one 1 (conditioning) and one 0 (transformed) entry")
        self.dim = mask.numel()
        self.n_trans = self.dim - self.n_cond
        self.register_buffer("mask", mask)
        self.register_buffer("cond_idx", torch.nonzero(mask).flatten(), persistent=False)
        self.register_buffer("trans_idx", torch.nonzero(~mask).flatten(), persistent=False)
        angles = torch.zeros_like(mask)
        circular = [int(i) for i in circular]
        if any(not 0 <= i < self.dim for i in circular):
            raise ValueError(f"circular indices must be in [0, {self.dim}), got {circular}")
        angles[circular] = True
        self.register_buffer("plain_idx", torch.nonzero(mask & ~angles).flatten(), persistent=False)
        self.register_buffer("angle_idx", torch.nonzero(mask & angles).flatten(), persistent=False)
        self.register_buffer("transformed_angle_idx", torch.nonzero(~mask & angles).flatten(), persistent=False)
        self.n_features = self.plain_idx.numel() + 2 * self.angle_idx.numel()

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Conditioner input ``(B, n_features)``: the conditioning coordinates, angles as (cos, sin)."""
        if self.angle_idx.numel() == 0:
            return y.index_select(1, self.cond_idx)
        angles = y.index_select(1, self.angle_idx)
        return torch.cat([y.index_select(1, self.plain_idx), torch.cos(angles), torch.sin(angles)], 1)

    def _transform(self, y: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's map of ``y (B, d)`` (its inverse if ``inverse``): ``(out (B, d), log|det| (B,))``."""
        raise NotImplementedError

    def forward(self, z):
        check_batch(z, self.dim, "z")
        return self._transform(z, inverse=False)

    def inverse(self, x):
        check_batch(x, self.dim, "x")
        return self._transform(x, inverse=True)

    def _refuse_transformed_angles(self) -> None:
        if self.transformed_angle_idx.numel():
            raise ValueError(
                f"{type(self).__name__} cannot transform the circular dimensions "
                f"{self.transformed_angle_idx.tolist()}: give them mask 1 (conditioning)"
            )


class AffineCoupling(MaskedCoupling):
    """RealNVP affine coupling: ``x = z`` where ``mask == 1``, elsewhere
    ``x = z * exp(s) + t`` with ``(s_raw, t) = MLP(z[mask])`` and ``s = a * tanh(s_raw)``.

    ``mask``: binary ``(d,)`` tensor (a buffer); 1 marks the conditioning (unchanged) dimensions.
    ``a`` is a learnable per-dimension bound on the log-scale, initialised to ``scale_init``.
    The conditioner's output layer starts at zero, so the layer starts as the identity.
    """

    def __init__(
        self,
        mask: torch.Tensor | Sequence[int],
        hidden: Sequence[int] = (64, 64),
        activation: str | Callable[[], nn.Module] = "silu",
        scale_init: float = 1.0,
        circular: Sequence[int] = (),
    ):
        if not scale_init > 0:
            raise ValueError(f"scale_init must be > 0, got {scale_init}")
        super().__init__(mask, circular)
        self._refuse_transformed_angles()
        self.conditioner = mlp(self.n_features, 2 * self.n_trans, hidden, activation, zero_last=True)
        self.scale_factor = nn.Parameter(torch.full((self.n_trans,), float(scale_init)))

    def _scale_shift(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-width ``log-scale (B, d)``, ``shift (B, d)`` (zero on the conditioning dims)
        and the per-sample sum of log-scales ``(B,)``."""
        raw_scale, shift = self.conditioner(self.features(y)).chunk(2, dim=1)
        log_scale = self.scale_factor * torch.tanh(raw_scale)
        zeros = y.new_zeros(y.shape)
        return (
            zeros.index_copy(1, self.trans_idx, log_scale),
            zeros.index_copy(1, self.trans_idx, shift),
            log_scale.sum(dim=1),
        )

    def _transform(self, y: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        log_scale, shift, logdet = self._scale_shift(y)
        if inverse:
            return (y - shift) * torch.exp(-log_scale), -logdet
        return y * torch.exp(log_scale) + shift, logdet


class ActNorm(Flow):
    """Per-dimension affine map ``x = z * exp(s) + b`` with ``s, b`` of shape ``(d,)``.

    Data-dependent initialisation: the first ``inverse`` call in training mode (the data
    direction) sets ``b = mean(x)``, ``s = log std(x)`` so that this batch comes out with zero
    mean and unit variance; or call :meth:`initialize` explicitly. ``data_init=False`` starts
    as the identity and never initialises from data. The ``initialized`` flag is a buffer, so
    a loaded checkpoint is not re-initialised; setting it True before the first ``inverse``
    also skips the data initialisation.
    """

    def __init__(self, dim: int, data_init: bool = True, eps: float = 1e-6):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.eps = float(eps)
        self.log_scale = nn.Parameter(torch.zeros(self.dim))
        self.shift = nn.Parameter(torch.zeros(self.dim))
        self.register_buffer("initialized", torch.tensor(not data_init))
        # False once the buffer has been seen True: later calls skip reading it (no GPU sync)
        self._maybe_uninitialized = data_init
        self.register_load_state_dict_post_hook(ActNorm._recheck_after_load)

    @staticmethod
    def _recheck_after_load(module: ActNorm, incompatible_keys) -> None:
        module._maybe_uninitialized = True

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``b, s`` from a data batch ``x (B, d)``, ``B >= 2``, so ``inverse(x)`` is standardised."""
        check_batch(x, self.dim)
        if x.shape[0] < 2:
            raise ValueError("ActNorm data initialisation needs a batch of at least 2 samples")
        self.shift.copy_(x.mean(dim=0))
        self.log_scale.copy_(torch.log(x.std(dim=0).clamp_min(self.eps)))
        self.initialized.fill_(True)
        self._maybe_uninitialized = False

    def forward(self, z):
        check_batch(z, self.dim, "z")
        return z * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(z.shape[0])

    def inverse(self, x):
        check_batch(x, self.dim, "x")
        if self.training and self._maybe_uninitialized:
            if not bool(self.initialized):
                self.initialize(x)
            self._maybe_uninitialized = False
        return (x - self.shift) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(x.shape[0])


def coupling_masks(
    dim: int, n_layers: int, mask: str | torch.Tensor | Sequence, conditioning: Sequence[int] = ()
) -> torch.Tensor:
    """The ``(n_layers, dim)`` boolean masks of a coupling stack; the ``conditioning`` dimensions are
    1 (never transformed) in every layer."""
    masks = _alternating_masks(dim, n_layers, mask).bool().clone()
    masks[:, [int(i) for i in conditioning]] = True
    return masks


def _alternating_masks(dim: int, n_layers: int, mask: str | torch.Tensor | Sequence) -> torch.Tensor:
    if isinstance(mask, str):
        if mask == "alternate":
            first = torch.arange(dim) % 2 == 0
        elif mask == "half":
            first = torch.arange(dim) < dim // 2
        else:
            raise ValueError(f"mask must be 'alternate', 'half' or a tensor, got {mask!r}")
    else:
        first = torch.as_tensor(mask)
        if first.dim() == 2:
            if first.shape != (n_layers, dim):
                raise ValueError(f"a 2D mask must have shape ({n_layers}, {dim}), got {tuple(first.shape)}")
            return first
        if first.shape != (dim,):
            raise ValueError(f"mask must have shape ({dim},) or ({n_layers}, {dim}), got {tuple(first.shape)}")
        first = first.bool()
    return torch.stack([first if i % 2 == 0 else ~first for i in range(n_layers)])


def real_nvp(
    dim: int,
    n_layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    mask: str | torch.Tensor | Sequence = "alternate",
    actnorm: bool = True,
    activation: str | Callable[[], nn.Module] = "silu",
    scale_init: float = 1.0,
) -> SequentialFlow:
    """A RealNVP stack of ``n_layers`` affine couplings on ``(B, dim)``.

    ``mask``: ``"alternate"`` (even/odd dimensions), ``"half"`` (first/second half), a ``(dim,)``
    binary tensor (used with its complement in alternation) or an ``(n_layers, dim)`` tensor (one
    mask per layer). Successive layers use complementary masks. With ``actnorm=True`` an
    :class:`ActNorm` follows every coupling, so the data side of the stack starts with one.
    """
    if int(dim) < 2:
        raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
    if int(n_layers) < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    layers: list[Flow] = []
    for layer_mask in coupling_masks(int(dim), int(n_layers), mask):
        layers.append(AffineCoupling(layer_mask, hidden, activation, scale_init))
        if actnorm:
            layers.append(ActNorm(dim))
    return SequentialFlow(*layers)
