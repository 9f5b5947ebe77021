"""Boltzmann generators over molecular configurations: couplings on internal coordinates, optionally
with a torus flow for the marginal of a few torsions.

:func:`internal_coordinate_generator` builds ``StandardNormal -> couplings -> internal coordinates
-> Cartesian`` from a topology. With ``marginal_torsions`` (indices among the Z-matrix torsions)
the density factorises as ``q(t) q(rest | t)``: a torus flow (:func:`circular_flow`) on those
torsions, kept as plain angles, and spline couplings that condition every layer on their
``(cos, sin)`` and never transform them. :func:`marginal_generator` returns that torus part as a
generator of its own, sharing the parameters (to fit or freeze it separately).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import BoltzmannGenerator, SequentialFlow, SubsetFlow
from .circular import circular_flow
from .coupling import real_nvp
from .internal import InternalCoordinatesFlow, ZMatrix
from .priors import StandardNormal
from .spline import spline_flow


def internal_coordinate_generator(
    zmatrix: ZMatrix,
    x_train: torch.Tensor,
    coupling: str = "spline",
    layers: int = 6,
    hidden: Sequence[int] = (64, 64),
    bins: int = 8,
    marginal_torsions: Sequence[int] = (),
    marginal: dict | None = None,
    seed: int = 0,
) -> BoltzmannGenerator:
    """A generator of Cartesian positions ``(B, 3n)`` nm of the molecule of ``zmatrix``.

    ``x_train (T, 3n)``: frames that fix the internal coordinates' standardisation and torsion cuts;
    ``coupling``: ``"spline"`` (rational-quadratic: multimodal torsions) or ``"affine"`` (RealNVP, only
    without a marginal); ``marginal_torsions`` with ``marginal`` (``layers``, ``hidden``, ``bins`` of
    the torus flow): the factorised density of the module. float32.
    """
    torch.manual_seed(seed)
    marginal_torsions = list(marginal_torsions) if marginal else []
    internal = InternalCoordinatesFlow(zmatrix, circular_torsions=marginal_torsions).fit(x_train)
    if coupling == "spline":
        couplings = spline_flow(
            internal.dim, n_layers=layers, hidden=hidden, bins=bins, circular=internal.circular_dims
        )
    elif coupling == "affine" and not marginal_torsions:
        couplings = real_nvp(internal.dim, n_layers=layers, hidden=hidden)
    else:
        raise ValueError(f"coupling must be 'spline' or 'affine' (affine only without a marginal), got {coupling!r}")
    flows = [couplings, internal]
    if marginal_torsions:
        torus = circular_flow(
            len(marginal_torsions), n_layers=marginal["layers"], hidden=marginal["hidden"], bins=marginal["bins"]
        )
        flows.insert(0, SubsetFlow(torus, internal.circular_dims, internal.dim))
    return BoltzmannGenerator(StandardNormal(internal.dim), SequentialFlow(*flows)).float()


def marginal_generator(model: BoltzmannGenerator) -> tuple[BoltzmannGenerator, list[int]] | None:
    """The torus part of a generator from :func:`internal_coordinate_generator` with a marginal: a
    generator of the marginal torsions ``(B, k)`` rad sharing the model's parameters, and the columns
    of the internal coordinates it fills; None without a marginal."""
    first = model.flow.layers[0]
    if not isinstance(first, SubsetFlow):
        return None
    torus = first.flow
    prior = StandardNormal(torus.layers[0].dim).to(next(torus.parameters()).dtype)
    return BoltzmannGenerator(prior, torus), first.indices.tolist()
