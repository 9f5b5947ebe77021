"""Internal coordinates (bonds, angles, torsions) of a molecule, and the flow layer that maps them
to Cartesian positions: the last layer of a Boltzmann generator over molecular configurations.

    zmatrix = zmatrix_from_topology(topology)              # an OpenMM or mdtraj topology
    ic = InternalCoordinatesFlow(zmatrix).fit(x_train)     # x: (B, 3 n_atoms) nm, xyz interleaved
    bg = BoltzmannGenerator(StandardNormal(ic.dim), SequentialFlow(real_nvp(ic.dim), ic))

**Z-matrix.** The first three atoms (the *anchors* ``a0 - a1 - a2``, a bonded chain) fix the
frame; every other atom ``i`` is placed from three atoms placed before it: ``j`` (bond
``|x_i - x_j|``), ``k`` (angle ``i-j-k``) and ``l`` (torsion ``i-j-k-l``, the IUPAC dihedral).
The internal coordinates of an ``n``-atom molecule are ``n - 1`` bonds (``a0-a1``, ``a1-a2``, then
one per row), ``n - 2`` angles (``a2-a1-a0``, then one per row) and ``n - 3`` torsions: ``3n - 6``.

**Rigid-body motion (choice (a): a canonical frame).** The 6 external degrees of freedom carry no
energy and no information, so they are not modelled: :meth:`InternalCoordinates.to_cartesian`
puts ``a0`` at the origin, ``a1`` on the +x axis and ``a2`` in the xy plane (y > 0), and
:meth:`~InternalCoordinates.to_internal` accepts any pose (internal coordinates are invariant).
Keeping the 6 DOF as coordinates instead (choice (b)) would make the flow learn the arbitrary
translation and a uniform distribution over SO(3) with its coordinate singularities, for nothing.

*Relation to the Cartesian density.* Write every ``x in R^{3n}`` as ``x = T + R y`` with ``y`` in
the canonical frame, ``T in R^3`` and ``R in SO(3)`` (Haar measure ``dR``, total volume 8 pi^2).
Then ``dx = J(b, theta) dT dR d(bonds) d(angles) d(torsions)`` with

    log J = sum over all n - 1 bonds of 2 log b  +  sum over all n - 2 angles of log sin(theta).

Each placed atom contributes ``b^2 sin(theta)`` (spherical coordinates about ``j``); the anchors
contribute ``b1^2`` (the direction of ``a1``: a sphere) and ``b2^2 sin(theta2)`` (``a2`` about the
``a0-a1`` axis: a circle of radius ``b2 sin(theta2)`` times the polar element ``b2``). The flow's
log-det is this ``log J``, so ``log q(x)`` is a density of Cartesian configurations *per unit of
translation and rotation*. For a rotation- and translation-invariant target ``p(x) ~ exp(-u(x))``
the importance weight ``exp(-u(x)) / q(x)`` is then exact; normalising constants differ from the
full Cartesian ones by the constant factor ``8 pi^2 V`` only. (The Jacobian of the 3n - 6
free canonical-frame coordinates alone, ``log J - 2 log b1 - log(b2 sin theta2)``, is
``log_det_jacobian(..., rigid_body=False)``.)

**Unbounded coordinates for a flow.** :class:`InternalCoordinatesFlow` maps each coordinate
exactly onto R before a fixed standardisation (mean 0, std 1 on the data given to ``fit``):
bonds ``log b``; angles ``logit(theta / pi)``; torsions are circular: each one is first rotated so
that its cut (the point mapped to +-inf) sits in the middle of the widest gap between the
data's values, ``s = (t - cut) mod 2 pi``, then ``logit(s / 2 pi)``. The map is a bijection between
R^{3n-6} and the valid domain (b > 0, 0 < theta < pi, t != cut); a torsion exactly at its cut (a
set of measure zero, away from the data by construction) maps to +-inf.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from openflow.geometry import angle, dihedral, distance, wrap_angle

from .base import Flow
from .coupling import check_batch

TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------- Z-matrix


@dataclass(frozen=True)
class ZMatrix:
    """Placement order of a molecule.

    Attributes:
        anchors: ``(a0, a1, a2)``, atoms with bonds ``a0-a1`` and ``a1-a2``; they fix the frame.
        rows: int array ``(n_atoms - 3, 4)`` of ``(i, j, k, l)``: atom ``i`` is placed at bond
            length from ``j``, angle ``i-j-k`` and torsion ``i-j-k-l``; ``j, k, l`` come earlier.
        atom_names: one label per atom (``"ALA2-CA"``), for printing.
    """

    anchors: tuple[int, int, int]
    rows: np.ndarray
    atom_names: tuple[str, ...]

    def __post_init__(self):
        rows = np.asarray(self.rows, dtype=np.int64).reshape(-1, 4)
        object.__setattr__(self, "rows", rows)
        n = len(self.atom_names)
        if n < 3:
            raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
        order = list(self.anchors) + rows[:, 0].tolist()
        if len(self.anchors) != 3 or sorted(order) != list(range(n)):
            raise ValueError(f"anchors + rows must place each of the {n} atoms exactly once")
        position = {atom: p for p, atom in enumerate(order)}
        for p, (i, j, k, l) in enumerate(rows.tolist(), start=3):
            if len({i, j, k, l}) != 4 or max(position[j], position[k], position[l]) >= p:
                raise ValueError(f"row {(i, j, k, l)}: j, k, l must be distinct atoms placed before i")

    @property
    def n_atoms(self) -> int:
        return len(self.atom_names)

    @property
    def dim(self) -> int:
        """Number of internal coordinates, ``3 n_atoms - 6``."""
        return 3 * self.n_atoms - 6

    def levels(self) -> list[np.ndarray]:
        """Row indices grouped by dependency level: the rows of one level only need atoms placed
        by earlier levels (or the anchors), so each level is placed in one batched step."""
        level = {atom: 0 for atom in self.anchors}
        row_level = []
        for i, j, k, l in self.rows.tolist():
            level[i] = 1 + max(level[j], level[k], level[l])
            row_level.append(level[i])
        row_level = np.asarray(row_level, dtype=np.int64)
        return [np.flatnonzero(row_level == value) for value in np.unique(row_level)]

    def torsion_index(self, atoms: Sequence[int]) -> int:
        """Index among the ``n - 3`` torsions of the row whose torsion is the dihedral ``atoms``
        ``(a, b, c, d)`` (in either direction, e.g. phi ``C-N-CA-C``); ValueError if no row has it."""
        atoms = tuple(int(a) for a in atoms)
        for index, row in enumerate(self.rows.tolist()):
            if tuple(row) in (atoms, atoms[::-1]):
                return index
        raise ValueError(f"no Z-matrix row has the torsion {atoms}; build the Z-matrix so that one does")

    def describe(self) -> list[str]:
        """One line per row, ``"i  j  k  l"`` as atom names."""
        return ["  ".join(self.atom_names[a] for a in row) for row in self.rows.tolist()]


def _atoms_and_bonds(topology) -> tuple[list, list[tuple[int, int]]]:
    """Atoms and bonded index pairs of an ``openmm.app.Topology`` or an ``mdtraj.Topology``."""
    if not (hasattr(topology, "atoms") and hasattr(topology, "bonds")):
        raise TypeError(f"topology must be an openmm.app.Topology or mdtraj.Topology, got {type(topology).__name__}")
    atoms = list(topology.atoms() if callable(topology.atoms) else topology.atoms)
    bonds = topology.bonds() if callable(topology.bonds) else topology.bonds
    return atoms, [(bond[0].index, bond[1].index) for bond in bonds]


def _branch_size(neighbours: list[set], start: int, came_from: int, allowed: set) -> int:
    """Number of ``allowed`` atoms reachable from ``start`` without passing ``came_from``."""
    seen, queue = {came_from, start}, deque([start])
    while queue:
        for v in neighbours[queue.popleft()] & allowed:
            if v not in seen:
                seen.add(v)
                queue.append(v)
    return len(seen) - 1


def _default_anchors(neighbours: list[set], heavy: set) -> tuple[int, int, int]:
    """``a0``: the most central heavy atom (least eccentricity in the heavy-atom graph); ``a1`` and
    ``a2``: walk on along the largest heavy branch, preferring atoms that have further bonds."""
    core = heavy if len(heavy) >= 3 else set(range(len(neighbours)))

    def eccentricity(root):
        depth, queue = {root: 0}, deque([root])
        while queue:
            u = queue.popleft()
            for v in neighbours[u] & core:
                if v not in depth:
                    depth[v] = depth[u] + 1
                    queue.append(v)
        return max(depth.values()) if len(depth) == len(core) else math.inf

    a0 = min(sorted(core), key=eccentricity)

    def next_anchor(u, previous):
        candidates = sorted(neighbours[u] - {previous})
        if not candidates:
            return None
        return max(
            candidates,
            key=lambda v: (len(neighbours[v] - {u}) > 0, v in core, _branch_size(neighbours, v, u, core), -v),
        )

    a1 = next_anchor(a0, -1)
    a2 = None if a1 is None else next_anchor(a1, a0)
    if a2 is None:
        raise ValueError("could not find three bonded anchor atoms a0-a1-a2; pass anchors=")
    return a0, a1, a2


def zmatrix_from_topology(topology, anchors: tuple[int, int, int] | None = None) -> ZMatrix:
    """Build a Z-matrix that follows the bond graph of ``topology`` (openmm or mdtraj).

    Heavy atoms come first, in breadth-first order from the anchors, the larger heavy branch of
    an atom before the smaller (so the backbone precedes side chains); hydrogens follow, each
    placed from its bonded heavy atom. For atom ``i`` discovered from ``j``: ``k`` is the
    earliest placed neighbour of ``j``; ``l`` is an earlier-placed other neighbour of ``j`` (a
    torsion relative to a sibling: fixed by chirality or planarity, e.g. the 2nd and 3rd methyl
    hydrogens, CB from N-CA-C), else an earlier neighbour of ``k`` (a proper torsion: phi, psi,
    methyl rotations), else the earliest placed atom (only in graphs without such neighbours).

    anchors: ``(a0, a1, a2)`` with bonds ``a0-a1``, ``a1-a2``; default: the most central heavy
    atom and the two next along the largest heavy branch. Raises ValueError for fewer than 3
    atoms, a disconnected bond graph, or anchors that are not a bonded chain.
    """
    atoms, bonds = _atoms_and_bonds(topology)
    n = len(atoms)
    if n < 3:
        raise ValueError(f"a Z-matrix needs at least 3 atoms, got {n}")
    neighbours: list[set] = [set() for _ in range(n)]
    for a, b in bonds:
        neighbours[a].add(b)
        neighbours[b].add(a)
    heavy = {a.index for a in atoms if a.element is None or a.element.symbol != "H"}
    if anchors is None:
        anchors = _default_anchors(neighbours, heavy)
    anchors = tuple(int(a) for a in anchors)
    if len(anchors) != 3 or len(set(anchors)) != 3 or not all(0 <= a < n for a in anchors):
        raise ValueError(f"anchors must be three distinct atom indices in [0, {n}), got {anchors}")
    if anchors[1] not in neighbours[anchors[0]] or anchors[2] not in neighbours[anchors[1]]:
        raise ValueError(f"anchors {anchors} must be a bonded chain a0-a1-a2")

    order, parent = list(anchors), {}
    for allowed in (heavy, set(range(n))):  # heavy atoms first, then everything else
        queue = deque(order)
        while queue:
            u = queue.popleft()
            new = [v for v in neighbours[u] & allowed if v not in parent and v not in anchors]
            new.sort(key=lambda v: (-_branch_size(neighbours, v, u, allowed), v))
            for v in new:
                parent[v] = u
                order.append(v)
                queue.append(v)
    if len(order) != n:
        missing = sorted(set(range(n)) - set(order))
        raise ValueError(f"the bond graph is disconnected: atoms {missing} cannot be reached from the anchors")

    position = {atom: p for p, atom in enumerate(order)}

    def placed_before(i: int, candidates, exclude: set) -> list[int]:
        """``candidates`` placed before ``i`` and not in ``exclude``, earliest first."""
        return sorted((a for a in candidates if position[a] < position[i] and a not in exclude), key=position.get)

    rows = []
    for i in order[3:]:
        j = parent[i]
        k = placed_before(i, neighbours[j], {i})[0]
        l = (
            placed_before(i, neighbours[j], {i, k})
            or placed_before(i, neighbours[k], {i, j})
            or placed_before(i, order, {i, j, k})
        )[0]
        rows.append((i, j, k, l))
    names = tuple(f"{a.residue.name}{a.residue.index + 1}-{a.name}" for a in atoms)
    return ZMatrix(anchors=anchors, rows=np.asarray(rows, dtype=np.int64), atom_names=names)


# ----------------------------------------------------------------------------- placement


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def place_atoms(xj, xk, xl, bond, angle, torsion) -> torch.Tensor:
    """Positions ``(..., 3)`` of atoms at ``bond`` from ``xj``, angle ``i-j-k`` and dihedral
    ``i-j-k-l`` (natural extension reference frame), the inverse of ``openflow.geometry``'s
    ``distance``, ``angle`` and ``dihedral``."""
    axis = _unit(xj - xk)
    normal = _unit(torch.cross(xk - xl, axis, dim=-1))
    in_plane = torch.cross(normal, axis, dim=-1)
    radial = bond * torch.sin(angle)
    along = (-bond * torch.cos(angle)).unsqueeze(-1) * axis
    around = (radial * torch.cos(torsion)).unsqueeze(-1) * in_plane + (radial * torch.sin(torsion)).unsqueeze(
        -1
    ) * normal
    return xj + along + around


# ----------------------------------------------------------------------------- transform


class InternalCoordinates(torch.nn.Module):
    """Exact, batched map between Cartesian positions and internal coordinates of a ``ZMatrix``.

    Cartesian: ``x (B, 3 n_atoms)`` nm, xyz interleaved in atom order. Internal: ``bonds
    (B, n_atoms - 1)`` nm, ``angles (B, n_atoms - 2)`` rad in (0, pi), ``torsions (B, n_atoms - 3)``
    rad in [-pi, pi], in the order of the module docstring. No parameters; index buffers follow
    ``.to(device)``; values keep the inputs' dtype and device.
    """

    def __init__(self, zmatrix: ZMatrix):
        super().__init__()
        if not isinstance(zmatrix, ZMatrix):
            raise TypeError(f"zmatrix must be a ZMatrix, got {type(zmatrix).__name__}")
        self.zmatrix = zmatrix
        self.n_atoms = zmatrix.n_atoms
        self.register_buffer("anchors", torch.as_tensor(zmatrix.anchors), persistent=False)
        self.register_buffer("rows", torch.as_tensor(zmatrix.rows), persistent=False)
        levels = zmatrix.levels()
        self.level_sizes = [len(level) for level in levels]
        self.register_buffer("level_order", torch.as_tensor(np.concatenate(levels)), persistent=False)

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, 3 * self.n_atoms, "x")
        return x.reshape(x.shape[0], self.n_atoms, 3)

    def to_internal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, 3 n)`` nm -> ``bonds (B, n-1)`` nm, ``angles (B, n-2)`` rad, ``torsions (B, n-3)`` rad."""
        pos = self._positions(x)
        a0, a1, a2 = (pos[:, a] for a in self.anchors)
        i, j, k, l = (pos[:, self.rows[:, c]] for c in range(4))
        bonds = torch.cat([torch.stack([distance(a1, a0), distance(a2, a1)], 1), distance(i, j)], 1)
        angles = torch.cat([angle(a2, a1, a0).unsqueeze(1), angle(i, j, k)], 1)
        return bonds, angles, dihedral(i, j, k, l)

    def to_cartesian(self, bonds: torch.Tensor, angles: torch.Tensor, torsions: torch.Tensor) -> torch.Tensor:
        """Internal coordinates -> ``x (B, 3 n)`` nm in the canonical frame (``a0`` at the origin,
        ``a1`` on +x, ``a2`` in the xy plane with y > 0); one batched step per dependency level."""
        n = self.n_atoms
        for name, value, size in (("bonds", bonds, n - 1), ("angles", angles, n - 2), ("torsions", torsions, n - 3)):
            check_batch(value, size, name)
        if not bonds.shape[0] == angles.shape[0] == torsions.shape[0]:
            raise ValueError(f"batch sizes differ: {bonds.shape[0]}, {angles.shape[0]}, {torsions.shape[0]}")
        batch = bonds.shape[0]
        zero = bonds.new_zeros(batch)
        b1, b2, theta = bonds[:, 0], bonds[:, 1], angles[:, 0]
        anchor_xyz = torch.stack(
            [
                torch.stack([zero, zero, zero], 1),
                torch.stack([b1, zero, zero], 1),
                torch.stack([b1 - b2 * torch.cos(theta), b2 * torch.sin(theta), zero], 1),
            ],
            1,
        )
        pos = bonds.new_zeros(batch, n, 3).index_copy(1, self.anchors, anchor_xyz)
        start = 0
        for size in self.level_sizes:
            level = self.level_order[start : start + size]
            start += size
            i, j, k, l = self.rows[level].unbind(1)
            internal = bonds[:, 2 + level], angles[:, 1 + level], torsions[:, level]
            pos = pos.index_copy(1, i, place_atoms(pos[:, j], pos[:, k], pos[:, l], *internal))
        return pos.reshape(batch, 3 * n)

    def log_det_jacobian(self, bonds: torch.Tensor, angles: torch.Tensor, rigid_body: bool = True) -> torch.Tensor:
        """``log J (B,)`` of :meth:`to_cartesian`. ``rigid_body=True``: the volume factor of
        ``dx = J dT dR d(internal)`` (module docstring), ``sum 2 log b + sum log sin(theta)``.
        ``False``: the Jacobian onto the ``3n - 6`` free canonical-frame coordinates
        (``a1``'s x, ``a2``'s x and y, all xyz of the rest), ``J / (b1^2 b2 sin theta2)``."""
        log_j = 2.0 * torch.log(bonds).sum(1) + torch.log(torch.sin(angles)).sum(1)
        if rigid_body:
            return log_j
        return log_j - 2.0 * torch.log(bonds[:, 0]) - torch.log(bonds[:, 1] * torch.sin(angles[:, 0]))

    def canonical_frame(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 3 n)`` rotated and translated into the canonical frame of :meth:`to_cartesian`."""
        pos = self._positions(x)
        origin = pos[:, self.anchors[0]]
        e1 = _unit(pos[:, self.anchors[1]] - origin)
        v = pos[:, self.anchors[2]] - origin
        e2 = _unit(v - (v * e1).sum(-1, keepdim=True) * e1)
        rotation = torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], 1)  # rows: new axes
        return torch.einsum("bac,bnc->bna", rotation, pos - origin.unsqueeze(1)).reshape(x.shape)


# ----------------------------------------------------------------------------- flow layer


def _logit_interval(value: torch.Tensor, width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(0, width) -> R``: ``u = log(v / (width - v))`` and ``log|du/dv|`` elementwise."""
    rest = width - value
    return torch.log(value) - torch.log(rest), math.log(width) - torch.log(value) - torch.log(rest)


def _sigmoid_interval(u: torch.Tensor, width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``R -> (0, width)``: ``v = width * sigmoid(u)`` and ``log|dv/du|`` elementwise."""
    log_derivative = math.log(width) + torch.nn.functional.logsigmoid(u) + torch.nn.functional.logsigmoid(-u)
    return width * torch.sigmoid(u), log_derivative


def largest_gap_centre(torsions: torch.Tensor) -> torch.Tensor:
    """For ``torsions (N, m)`` rad, the middle of the largest circular gap between the samples of
    each column, in [-pi, pi), shape ``(m,)``: the point of the circle farthest from any sample."""
    if torsions.dim() != 2 or torsions.shape[0] < 1:
        raise ValueError(f"torsions must have shape (N, m) with N >= 1, got {tuple(torsions.shape)}")
    ordered = torch.sort(torch.remainder(torsions.detach() + math.pi, TWO_PI), dim=0).values
    gaps = torch.cat([ordered[1:] - ordered[:-1], ordered[:1] + TWO_PI - ordered[-1:]], 0)
    widest, start = gaps.max(0)
    centre = ordered.gather(0, start.unsqueeze(0))[0] + widest / 2
    return wrap_angle(centre - math.pi)


class InternalCoordinatesFlow(Flow):
    """Flow from standardised unbounded internal coordinates ``z (B, 3n - 6)`` to Cartesian
    positions ``x (B, 3n)`` nm (canonical frame), with ``log|det|`` as in the module docstring.

    ``z`` holds, in this order, the ``n-1`` bonds, ``n-2`` angles and ``n-3`` torsions, each
    mapped onto R (``log b``, ``logit(theta / pi)``, ``logit(((t - cut) mod 2 pi) / 2 pi)``)
    and standardised by fixed ``(value - mean) / std``. :meth:`fit` sets ``mean``, ``std`` and the
    torsion cuts from data; before it the standardisation is the identity and every cut is at
    ``pi``. These statistics are buffers (saved with the model), not trained.

    ``circular_torsions``: indices (among the ``n - 3`` torsions) of torsions kept as plain angles
    in ``[-pi, pi)``, neither cut open nor standardised (``z`` positions: :attr:`circular_dims`),
    for flows that model them on the circle (:mod:`openflow.flows.circular`).
    """

    def __init__(self, zmatrix: ZMatrix, data: torch.Tensor | None = None, circular_torsions: Sequence[int] = ()):
        super().__init__()
        self.transform = InternalCoordinates(zmatrix)
        n = zmatrix.n_atoms
        self.dim = zmatrix.dim
        self.sizes = (n - 1, n - 2, n - 3)
        circular = torch.zeros(n - 3, dtype=torch.bool)
        indices = [int(t) for t in circular_torsions]
        if any(not 0 <= t < n - 3 for t in indices):
            raise ValueError(f"circular_torsions must be torsion indices in [0, {n - 3}), got {indices}")
        circular[indices] = True
        self.register_buffer("circular", circular, persistent=False)
        self.circular_dims = [2 * n - 3 + t for t in sorted(set(indices))]
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))
        self.register_buffer("cut", torch.full((n - 3,), math.pi))
        if data is not None:
            self.fit(data)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> InternalCoordinatesFlow:
        """Set the torsion cuts and the standardisation from positions ``x (N, 3n)`` nm, ``N >= 2``."""
        check_batch(x, 3 * self.transform.n_atoms, "x")
        if x.shape[0] < 2:
            raise ValueError("fit needs at least 2 configurations")
        x = x.to(device=self.mean.device, dtype=torch.float64)
        torsions = self.transform.to_internal(x)[2]
        self.cut.copy_(largest_gap_centre(torsions))
        u = self._unbounded(x)[0]
        self.mean.copy_(u.mean(0))
        self.std.copy_(u.std(0).clamp_min(1e-8))
        self.mean[self.circular_dims] = 0.0
        self.std[self.circular_dims] = 1.0
        return self

    def _unbounded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions -> unbounded internal coordinates ``(B, dim)`` and ``log|du/dx|`` ``(B,)``."""
        bonds, angles, torsions = self.transform.to_internal(x)
        log_bonds = torch.log(bonds)
        u_angles, ld_angles = _logit_interval(angles, math.pi)
        u_torsions, ld_torsions = _logit_interval(torch.remainder(torsions - self.cut.to(torsions), TWO_PI), TWO_PI)
        u_torsions = torch.where(self.circular, wrap_angle(torsions), u_torsions)
        ld_torsions = torch.where(self.circular, torch.zeros_like(ld_torsions), ld_torsions)
        logdet = -log_bonds.sum(1) + ld_angles.sum(1) + ld_torsions.sum(1)
        logdet = logdet - self.transform.log_det_jacobian(bonds, angles)
        return torch.cat([log_bonds, u_angles, u_torsions], 1), logdet

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(z, self.dim, "z")
        mean, std = self.mean.to(z), self.std.to(z)
        u_bonds, u_angles, u_torsions = (z * std + mean).split(self.sizes, 1)
        bonds = torch.exp(u_bonds)
        angles, ld_angles = _sigmoid_interval(u_angles, math.pi)
        shifted, ld_torsions = _sigmoid_interval(u_torsions, TWO_PI)
        torsions = torch.where(self.circular, wrap_angle(u_torsions), wrap_angle(shifted + self.cut.to(z)))
        ld_torsions = torch.where(self.circular, torch.zeros_like(ld_torsions), ld_torsions)
        logdet = torch.log(std).sum() + u_bonds.sum(1) + ld_angles.sum(1) + ld_torsions.sum(1)
        logdet = logdet + self.transform.log_det_jacobian(bonds, angles)
        return self.transform.to_cartesian(bonds, angles, torsions), logdet

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, logdet = self._unbounded(x)
        mean, std = self.mean.to(x), self.std.to(x)
        return (u - mean) / std, logdet - torch.log(std).sum()
