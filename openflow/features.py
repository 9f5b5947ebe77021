"""CV features in torch, each with an exact OpenMM twin: distances, angles, dihedrals (as sin/cos).

Every feature layer maps positions ``(B, n_atoms, 3)`` (or flat ``(B, 3 n_atoms)``), nm, to
``(B, n_out)`` features, computed without periodic boundary conditions (as OpenMM's bonded custom
forces do by default), and knows how to write any weighted sum of its features as one OpenMM force
(:meth:`Feature.openmm_force`): this is what ``plugins/openmm/export.py`` folds the first layer of
a CV network into.

Conventions are OpenMM's: distances in nm, angles in radians in ``[0, pi]``, dihedrals in
``(-pi, pi]`` with the IUPAC sign (the one of mdtraj and of ``CustomTorsionForce``'s ``theta``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import openmm
import torch
from torch import nn


def as_atom_positions(positions: torch.Tensor) -> torch.Tensor:
    """``(B, n_atoms, 3)`` or flat ``(B, 3 n_atoms)`` -> ``(B, n_atoms, 3)`` (a view)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.ndim == 3 and positions.shape[-1] == 3:
        return positions
    if positions.ndim == 2 and positions.shape[-1] % 3 == 0:
        return positions.reshape(positions.shape[0], -1, 3)
    raise ValueError(f"positions must be (B, n_atoms, 3) or flat (B, 3*n_atoms), got shape {tuple(positions.shape)}")


class Feature(nn.Module):
    """A set of same-kind features over atom tuples of length ``arity``.

    Subclasses define ``arity``, ``per_tuple`` (features per tuple), ``_compute`` and the OpenMM twin:
    ``_openmm`` (force class, its add-parameter and add-term methods), ``_openmm_expression`` (the
    energy of one term, weights as per-term parameters) and ``_parameter_names``.
    """

    arity: int
    per_tuple: int = 1
    kind: str

    def __init__(self, atoms: Sequence[Sequence[int]]):
        super().__init__()
        array = np.asarray(atoms)
        if array.ndim != 2 or array.shape[1] != self.arity or array.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs a non-empty list of {self.arity}-atom tuples, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
            raise ValueError(f"{type(self).__name__}: atom indices must be non-negative integers")
        if any(len(set(row)) != self.arity for row in array.tolist()):
            raise ValueError(f"{type(self).__name__}: the atoms of a tuple must be distinct")
        self.register_buffer("atoms", torch.as_tensor(array, dtype=torch.long))

    @property
    def n_tuples(self) -> int:
        return self.atoms.shape[0]

    @property
    def n_out(self) -> int:
        return self.n_tuples * self.per_tuple

    @property
    def max_atom(self) -> int:
        return int(self.atoms.max())

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions ``(B, n_atoms, 3)`` or ``(B, 3 n_atoms)`` nm -> features ``(B, n_out)``."""
        xyz = as_atom_positions(positions)
        if xyz.shape[1] <= self.max_atom:
            raise ValueError(f"{type(self).__name__} uses atom {self.max_atom}, positions hold {xyz.shape[1]} atoms")
        return self._compute(*(xyz[:, self.atoms[:, k]] for k in range(self.arity)))

    def names(self) -> list[str]:
        """One readable name per output column."""
        tuples = ["-".join(map(str, row)) for row in self.atoms.tolist()]
        return [f"{self.kind}({t})" for t in tuples]

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Guaranteed range ``(lo, hi)`` of every column, ``(n_out,)`` float64 (may be infinite)."""
        lo, hi = self._range
        return torch.full((self.n_out,), lo, dtype=torch.float64), torch.full((self.n_out,), hi, dtype=torch.float64)

    def openmm_force(self, weights) -> openmm.Force:
        """An OpenMM force whose energy is ``sum_i weights[i] * feature_i`` (``weights``: ``(n_out,)``).

        The weights are per-bond/angle/torsion parameters of one Custom*Force; tuples whose
        weights are all zero are left out.
        """
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape[0] != self.n_out:
            raise ValueError(f"{type(self).__name__} has {self.n_out} features, got {w.shape[0]} weights")
        force_class, add_parameter, add_term = self._openmm
        force = force_class(self._openmm_expression)
        for name in self._parameter_names:
            getattr(force, add_parameter)(name)
        add_term = getattr(force, add_term)
        for row, params in zip(self.atoms.tolist(), w.reshape(self.n_tuples, self.per_tuple).tolist()):
            if any(p != 0.0 for p in params):
                add_term(*row, params)
        return force


class Distances(Feature):
    """Interatomic distances (nm); OpenMM twin ``CustomBondForce("w*r")``."""

    arity, kind, _range = 2, "d", (0.0, math.inf)
    _openmm = (openmm.CustomBondForce, "addPerBondParameter", "addBond")
    _openmm_expression, _parameter_names = "w*r", ("w",)

    def _compute(self, a, b):
        return torch.linalg.vector_norm(b - a, dim=-1)


class Angles(Feature):
    """Bond angles a-b-c at b (radians, ``[0, pi]``); OpenMM twin ``CustomAngleForce("w*theta")``."""

    arity, kind, _range = 3, "angle", (0.0, math.pi)
    _openmm = (openmm.CustomAngleForce, "addPerAngleParameter", "addAngle")
    _openmm_expression, _parameter_names = "w*theta", ("w",)

    def _compute(self, a, b, c):
        u, v = a - b, c - b
        return torch.atan2(torch.linalg.vector_norm(torch.cross(u, v, dim=-1), dim=-1), (u * v).sum(-1))


class Dihedrals(Feature):
    """Dihedral angles as ``(sin, cos)`` pairs, columns ``[sin0, cos0, sin1, cos1, ...]``.

    IUPAC sign convention (mdtraj's and OpenMM's ``theta``). OpenMM twin
    ``CustomTorsionForce("ws*sin(theta)+wc*cos(theta)")``.
    """

    arity, per_tuple, kind, _range = 4, 2, "dihedral", (-1.0, 1.0)
    _openmm = (openmm.CustomTorsionForce, "addPerTorsionParameter", "addTorsion")
    _openmm_expression = "ws*sin(theta)+wc*cos(theta)"
    _parameter_names = ("ws", "wc")

    @staticmethod
    def _sin_cos_parts(a, b, c, d):
        """``(y, x)`` with ``theta = atan2(y, x)`` and ``y, x`` both scaled by ``|n1||n2|``."""
        b1, b2, b3 = b - a, c - b, d - c
        n1, n2 = torch.cross(b1, b2, dim=-1), torch.cross(b2, b3, dim=-1)
        y = torch.linalg.vector_norm(b2, dim=-1) * (b1 * n2).sum(-1)
        return y, (n1 * n2).sum(-1)

    def _compute(self, a, b, c, d):
        y, x = self._sin_cos_parts(a, b, c, d)
        r = torch.sqrt(x * x + y * y)
        return torch.stack((y / r, x / r), dim=-1).flatten(-2)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """The dihedral angles themselves, ``(B, n_tuples)`` radians in ``(-pi, pi]``."""
        xyz = as_atom_positions(positions)
        return torch.atan2(*self._sin_cos_parts(*(xyz[:, self.atoms[:, k]] for k in range(4))))

    def names(self) -> list[str]:
        return [f"{f}({name})" for name in super().names() for f in ("sin", "cos")]


class FeatureSet(nn.Module):
    """Several feature layers side by side: positions -> ``(B, sum of n_out)``."""

    def __init__(self, features: Sequence[Feature] | Feature):
        super().__init__()
        features = [features] if isinstance(features, Feature) else list(features)
        if not features or not all(isinstance(f, Feature) for f in features):
            raise TypeError("FeatureSet needs one or more Feature layers (Distances, Angles, Dihedrals)")
        self.blocks = nn.ModuleList(features)

    @property
    def n_out(self) -> int:
        return sum(f.n_out for f in self.blocks)

    @property
    def max_atom(self) -> int:
        return max(f.max_atom for f in self.blocks)

    def slices(self) -> list[tuple[Feature, slice]]:
        """Each block with the columns it fills."""
        out, start = [], 0
        for feature in self.blocks:
            out.append((feature, slice(start, start + feature.n_out)))
            start += feature.n_out
        return out

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """positions ``(B, n_atoms, 3)`` or ``(B, 3 n_atoms)`` nm -> ``(B, n_out)``."""
        return torch.cat([f(positions) for f in self.blocks], dim=-1)

    def names(self) -> list[str]:
        return [name for f in self.blocks for name in f.names()]

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = zip(*(f.ranges() for f in self.blocks))
        return torch.cat(lo), torch.cat(hi)


# ----------------------------------------------------------------------------- peptide helpers


def _mdtraj_topology(topology):
    """An ``mdtraj.Topology`` from an openflow System, an OpenMM Topology or an mdtraj Topology."""
    import mdtraj
    import openmm.app as app

    topology = getattr(topology, "mdtraj_topology", topology)
    if isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    if isinstance(topology, mdtraj.Topology):
        return topology
    raise TypeError(f"expected an openflow System, an OpenMM or an mdtraj Topology, got {type(topology).__name__}")


def backbone_torsions(topology) -> dict[str, list[tuple[int, int, int, int]]]:
    """Backbone ``phi`` (C_prev-N-CA-C) and ``psi`` (N-CA-C-N_next) atom quadruples of a peptide.

    Alanine dipeptide (Ace-Ala-Nme): one phi and one psi, ``{"phi": [(4, 6, 8, 14)], "psi": [(6, 8, 14, 16)]}``.
    """
    top = _mdtraj_topology(topology)
    residues = list(top.residues)

    def atom(residue, name):
        found = [a.index for a in residue.atoms if a.name == name]
        return found[0] if found else None

    out = {"phi": [], "psi": []}
    for prev, res, nxt in zip([None] + residues[:-1], residues, residues[1:] + [None]):
        n, ca, c = atom(res, "N"), atom(res, "CA"), atom(res, "C")
        if None in (n, ca, c):
            continue
        c_prev = atom(prev, "C") if prev is not None else None
        n_next = atom(nxt, "N") if nxt is not None else None
        if c_prev is not None:
            out["phi"].append((c_prev, n, ca, c))
        if n_next is not None:
            out["psi"].append((n, ca, c, n_next))
    if not out["phi"] and not out["psi"]:
        raise ValueError("no backbone phi/psi found (needs residues with N, CA, C atoms)")
    return out


def heavy_atom_pairs(topology) -> list[tuple[int, int]]:
    """All pairs ``i < j`` of heavy (non-hydrogen) atoms: 45 for alanine dipeptide (mlcolvar's features)."""
    top = _mdtraj_topology(topology)
    heavy = [a.index for a in top.atoms if a.element is None or a.element.symbol != "H"]
    return [(i, j) for k, i in enumerate(heavy) for j in heavy[k + 1:]]


def phi_psi_features(topology) -> FeatureSet:
    """sin/cos of every backbone phi and psi: 4 features for alanine dipeptide."""
    torsions = backbone_torsions(topology)
    return FeatureSet(Dihedrals(torsions["phi"] + torsions["psi"]))


def heavy_atom_distance_features(topology) -> FeatureSet:
    """All heavy-atom pair distances: 45 features for alanine dipeptide."""
    return FeatureSet(Distances(heavy_atom_pairs(topology)))
