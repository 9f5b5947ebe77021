"""CV features in torch: distances, angles, dihedrals (as sin/cos), built from atom tuples.

Every feature layer maps positions ``(B, n_atoms, 3)`` (or flat ``(B, 3 n_atoms)``), nm, to
``(B, n_out)`` features, computed without periodic boundary conditions (as OpenMM's bonded custom
forces do by default). Each kind has an exact OpenMM twin (a custom bond, angle or torsion force
whose per-term weights sum the features), written by ``openflow.plugins.openmm.export``: this is
what the first layer of a CV network is folded into.

Conventions are OpenMM's (``openflow.geometry``): distances in nm, angles in radians in
``[0, pi]``, dihedrals in ``(-pi, pi]`` with the IUPAC sign (mdtraj's, and ``CustomTorsionForce``'s
``theta``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mdtraj
import numpy as np
import torch
from torch import nn

from openflow import geometry


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

    Subclasses define ``arity``, ``per_tuple`` (features per tuple), ``kind``, the guaranteed
    value range ``value_range`` of each feature and ``compute`` (one position tensor per tuple atom,
    each ``(B, n_tuples, 3)`` -> ``(B, n_tuples * per_tuple)``).
    """

    arity: int
    per_tuple: int = 1
    kind: str

    def __init__(self, atoms: Sequence[Sequence[int]]):
        super().__init__()
        array = np.asarray(atoms)
        if array.ndim != 2 or array.shape[1] != self.arity or array.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__} needs a non-empty list of {self.arity}-atom tuples, got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
            raise ValueError(f"{type(self).__name__}: atom indices must be non-negative integers")
        if self.arity > 1 and any(len(set(row)) != self.arity for row in array.tolist()):
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
        return self.compute(*(xyz[:, self.atoms[:, k]] for k in range(self.arity)))

    def names(self) -> list[str]:
        """One readable name per output column."""
        tuples = ["-".join(map(str, row)) for row in self.atoms.tolist()]
        return [f"{self.kind}({t})" for t in tuples]

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Guaranteed range ``(lo, hi)`` of every column, ``(n_out,)`` float64 (may be infinite)."""
        lo, hi = self.value_range
        return torch.full((self.n_out,), lo, dtype=torch.float64), torch.full((self.n_out,), hi, dtype=torch.float64)


class Distances(Feature):
    """Interatomic distances (nm)."""

    arity, kind, value_range = 2, "d", (0.0, math.inf)

    def compute(self, a, b):
        return geometry.distance(a, b)


class Angles(Feature):
    """Bond angles a-b-c at b (radians, ``[0, pi]``)."""

    arity, kind, value_range = 3, "angle", (0.0, math.pi)

    def compute(self, a, b, c):
        return geometry.angle(a, b, c)


class Dihedrals(Feature):
    """Dihedral angles as ``(sin, cos)`` pairs, columns ``[sin0, cos0, sin1, cos1, ...]`` (IUPAC sign)."""

    arity, per_tuple, kind, value_range = 4, 2, "dihedral", (-1.0, 1.0)

    def compute(self, a, b, c, d):
        return torch.stack(geometry.dihedral_sin_cos(a, b, c, d), dim=-1).flatten(-2)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """The dihedral angles themselves, ``(B, n_tuples)`` radians in ``(-pi, pi]``."""
        xyz = as_atom_positions(positions)
        return geometry.dihedral(*(xyz[:, self.atoms[:, k]] for k in range(4)))

    def names(self) -> list[str]:
        return [f"{f}({name})" for name in super().names() for f in ("sin", "cos")]


class Positions(Feature):
    """Cartesian coordinates of atoms (nm), columns ``[x0, y0, z0, x1, ...]``: features for a system whose
    energy is not invariant under rigid motions (e.g. particles in an external field)."""

    arity, per_tuple, kind, value_range = 1, 3, "xyz", (-math.inf, math.inf)

    def compute(self, a):
        return a.flatten(-2)

    def names(self) -> list[str]:
        return [f"{c}({i})" for (i,) in self.atoms.tolist() for c in "xyz"]


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


# ----------------------------------------------------------------------------- from a topology


def mdtraj_topology(topology):
    """An ``mdtraj.Topology`` from an openflow System, an OpenMM Topology or an mdtraj Topology."""
    topology = getattr(topology, "mdtraj_topology", topology)
    if isinstance(topology, mdtraj.Topology):
        return topology
    if hasattr(topology, "atoms") and hasattr(topology, "bonds") and hasattr(topology, "getNumAtoms"):
        return mdtraj.Topology.from_openmm(topology)
    raise TypeError(f"expected an openflow System, an OpenMM or an mdtraj Topology, got {type(topology).__name__}")


def select_atoms(topology, atoms: str = "heavy") -> np.ndarray:
    """Atom indices ``(k,)`` of an mdtraj selection string (``"heavy"``: every atom that is not hydrogen;
    ``"all"``); a bad or empty selection is a ValueError."""
    top = mdtraj_topology(topology)
    expression = {"heavy": "not element H", "all": "all"}.get(atoms, atoms)
    try:
        selected = top.select(expression)
    except Exception as error:  # mdtraj raises several types for a bad expression
        raise ValueError(f"bad atom selection {atoms!r}: {error}") from None
    if len(selected) == 0:
        raise ValueError(f"atom selection {atoms!r} matches no atom")
    return selected


def atom_pairs(topology, atoms: str = "heavy") -> list[tuple[int, int]]:
    """All pairs ``i < j`` of the selected atoms: 45 heavy-atom pairs for alanine dipeptide (mlcolvar's features)."""
    selected = select_atoms(topology, atoms).tolist()
    return [(i, j) for k, i in enumerate(selected) for j in selected[k + 1 :]]


def distance_features(topology, atoms: str = "heavy") -> FeatureSet:
    """All pair distances of the selected atoms (mdtraj selection, default heavy atoms)."""
    return FeatureSet(Distances(atom_pairs(topology, atoms)))


def proper_torsions(topology, atoms: str = "heavy") -> list[tuple[int, int, int, int]]:
    """Every proper torsion ``a-b-c-d`` (bonds a-b, b-c, c-d) whose four atoms are selected, one per
    central bond and outer pair, from the topology's bonds (never a hand-picked list)."""
    top = mdtraj_topology(topology)
    selected = set(select_atoms(top, atoms).tolist())
    neighbours = {i: set() for i in selected}
    for bond in top.bonds:
        i, j = bond[0].index, bond[1].index
        if i in selected and j in selected:
            neighbours[i].add(j)
            neighbours[j].add(i)
    torsions = []
    for b in sorted(selected):
        for c in sorted(neighbours[b]):
            if c <= b:
                continue
            for a in sorted(neighbours[b] - {c}):
                for d in sorted(neighbours[c] - {b, a}):
                    torsions.append((a, b, c, d))
    if not torsions:
        raise ValueError(f"no proper torsion among the atoms {atoms!r} (they need bonded chains of four)")
    return torsions


def torsion_features(topology, atoms: str = "heavy") -> FeatureSet:
    """sin/cos of every proper torsion over the selected atoms (:func:`proper_torsions`)."""
    return FeatureSet(Dihedrals(proper_torsions(topology, atoms)))


def position_features(topology, atoms: str = "heavy") -> FeatureSet:
    """The Cartesian coordinates of the selected atoms."""
    return FeatureSet(Positions([(int(i),) for i in select_atoms(topology, atoms)]))
