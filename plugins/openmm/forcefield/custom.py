"""Custom forces as torch terms, from their Lepton expressions: positions ``(3, N, B)`` nm -> ``(B,)`` kJ/mol.

``CustomBonded`` covers the per-term custom forces (external, bond, angle, torsion, compound
bond), ``CustomNonbonded`` a ``CustomNonbondedForce`` with ``NoCutoff`` and ``CustomGB`` a
``CustomGBForce`` with ``NoCutoff``. Each evaluates its ``lepton.LeptonExpression`` in torch with
the global and per-term parameters substituted, measures distances, angles and dihedrals with
``openflow.geometry`` (``base.measure``), and differentiates symbolically where it can (autograd
otherwise). Each also has a compiled CPU kernel generated from the same expression in Cartesian
coordinates (``expression_kernels``). The expressions are read and checked off an
``openmm.System`` by ``translate``.
"""

from __future__ import annotations

import re

import numpy as np
import openmm
import torch

from .base import Term, index_table, kernel_arrays, measure, scatter_chain, sum_terms
from .expression_kernels import expression_kernel, gb_kernel
from .lepton import (
    GEOMETRY_NODES,
    LeptonExpression,
    coordinate,
    coordinate_leaves,
    derivative,
    geometry_calls,
    in_coordinates,
)


class CustomBonded(Term):
    """Any per-term custom force: external (``x, y, z``), bond (``r``), angle/torsion (``theta``),
    compound bond (``x1, y1, ..., distance(p1,p2), angle(...), dihedral(...)``).

    Args:
        kind: ``"external"``, ``"bond"``, ``"angle"``, ``"torsion"`` or ``"compound"``.
        particles: ``(M, n_particles)`` particle indices of each term.
        parameters: ``(M, p)`` per-term parameters named ``names``; ``constants``: globals.
    """

    GEOMETRIC = {"external": {"x", "y", "z"}, "bond": {"r"}, "angle": {"theta"}, "torsion": {"theta"}}
    MEASURED = {
        "bond": ("r", "distance"),
        "angle": ("theta", "angle"),
        "torsion": ("theta", "dihedral"),
    }  # variable, geometry

    def __init__(
        self, kind: str, expression: LeptonExpression, particles, n_particles: int, parameters, names, constants: dict
    ):
        super().__init__()
        self.kind, self.expression, self.names, self.constants = kind, expression, list(names), dict(constants)
        self.register_buffer("particles", index_table(particles, n_particles))
        parameters = np.asarray(parameters, dtype=np.float64).reshape(len(particles), len(self.names))
        self.register_buffer("values_per_term", torch.as_tensor(parameters))
        targets = [("variable", name) for name in sorted(expression.variables - set(self.names) - set(self.constants))]
        self.slopes = _slopes(expression, targets + sorted(geometry_calls(expression.root)))
        if kind in self.MEASURED:
            variable, function = self.MEASURED[kind]
            geometric = {("variable", variable): GEOMETRY_NODES[function](*range(n_particles))}
        else:  # coordinates: x, y, z (external) or x1, y2, ... (compound)
            geometric = {target: coordinate(*_coordinate(target[1])) for target in targets if _coordinate(target[1])}
        geometric.update(
            {call: GEOMETRY_NODES[call[1]](*(n - 1 for n in call[2])) for call in geometry_calls(expression.root)}
        )
        self._kernel_spec = _expression_kernel(
            expression, geometric, self.particles, parameters, self.names, self.constants
        )

    def cpu_kernel(self):
        return _spec_kernel(self._kernel_spec)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        variables, geometry, _ = self._variables(positions, with_gradient=False)
        return sum_terms(self.expression(variables, geometry), positions, len(self.particles))

    def energy_gradient(self, positions, gradient):
        if gradient is None or self.slopes is None:
            return super().energy_gradient(positions, gradient)
        variables, geometry, chains = self._variables(positions, with_gradient=True)
        energy, *slopes = self.expression.evaluate(
            [self.expression.root, *(node for _, node in self.slopes)], variables, geometry
        )
        shape = (len(self.particles), positions.shape[-1])
        for (target, _), slope in zip(self.slopes, slopes):
            slope = slope.expand(shape) if isinstance(slope, torch.Tensor) else positions.new_full(shape, slope)
            if target in chains:  # a distance, angle or dihedral
                scatter_chain(gradient, *chains[target][:2], slope)
            else:  # a coordinate x, y, z or x1, y2, ...
                axis, particle = _coordinate(target[1])
                gradient[axis].index_add_(0, self.particles[:, particle], slope)
        return sum_terms(energy, positions, len(self.particles))

    def _variables(self, positions, with_gradient: bool) -> tuple[dict, object, dict]:
        """``(variables, geometry function, chains)``; with_gradient, ``chains`` collects each geometric
        target measured (now or later, through the geometry function): its particle columns, gradients, value."""
        variables = dict(self.constants)
        variables.update({name: self.values_per_term[:, c, None] for c, name in enumerate(self.names)})
        columns = self.particles.T
        used, chains = self.expression.variables, {}

        def measure_term(function: str, particles: tuple, target: tuple):
            indices = [columns[n - 1] for n in particles]
            if not with_gradient:
                return measure(function, positions, indices)
            if target not in chains:
                value, grads = measure(function, positions, indices, with_gradient=True)
                chains[target] = (indices, grads, value)
            return chains[target][2]

        if self.kind in ("external", "compound"):
            for name in used:
                if name not in variables and _coordinate(name) is not None:
                    axis, particle = _coordinate(name)
                    variables[name] = positions[axis].index_select(0, columns[particle])
        elif self.MEASURED[self.kind][0] in used:
            variable, function = self.MEASURED[self.kind]
            variables[variable] = measure_term(function, tuple(range(1, len(columns) + 1)), ("variable", variable))
        geometry = lambda function, numbers: measure_term(function, numbers, ("call", function, numbers))  # noqa: E731
        return variables, geometry, chains


def _expression_kernel(
    expression: LeptonExpression, geometric: dict, particles, values, names: list, constants: dict
) -> tuple:
    """``(kernel inputs, kernel parameters)`` for ``expression_kernels.expression_kernel`` of ``expression``
    summed over terms of ``particles`` ``(M, k)`` with parameters ``values`` ``(M, len(names))`` and
    global ``constants``; ``geometric`` maps its geometric variables and calls to coordinate trees
    (the kernel differentiates with respect to the coordinates)."""
    root = in_coordinates(expression.root, geometric)
    slopes = [(leaf[1], leaf[2], derivative(root, leaf)) for leaf in sorted(coordinate_leaves(root))]
    columns = sorted(expression.variables & (set(names) | set(constants)))
    table = np.empty((len(particles), len(columns)))
    for c, name in enumerate(columns):
        table[:, c] = values[:, names.index(name)] if name in names else constants[name]
    particles = np.ascontiguousarray(particles, dtype=np.int64)
    return (root, [s for s in slopes if s[2] is not None], particles.shape[1], columns), (particles, table)


def _spec_kernel(spec: tuple) -> tuple:
    """``cpu_kernel()`` of a custom term from its ``_expression_kernel`` spec."""
    return expression_kernel(*spec[0]), spec[1]


def _coordinate(name: str) -> tuple[int, int] | None:
    """``"x"`` -> ``(0, 0)``, ``"y3"`` -> ``(1, 2)``: (axis, particle column) of a coordinate variable."""
    match = re.fullmatch(r"([xyz])(\d*)", name)
    return None if match is None else ("xyz".index(match[1]), int(match[2] or 1) - 1)


def _slopes(expression: LeptonExpression, targets: list) -> list | None:
    """``[(target, derivative node)]`` of the targets the expression depends on; ``None`` (autograd
    instead) where a function has no symbolic derivative."""
    try:
        pairs = [(target, expression.derivative(target)) for target in targets]
    except NotImplementedError:
        return None
    return [(target, node) for target, node in pairs if node is not None]


class CustomNonbonded(Term):
    """``CustomNonbondedForce`` with ``NoCutoff``: the expression over all non-excluded pairs,
    per-particle parameters with suffixes 1 and 2."""

    def __init__(self, expression: LeptonExpression, pairs, parameters, names, constants: dict):
        super().__init__()
        self.expression, self.names, self.constants = expression, list(names), dict(constants)
        self.register_buffer("pairs", index_table(pairs, 2))
        self.register_buffer("values_per_term", torch.as_tensor(np.asarray(parameters, dtype=np.float64)))
        i, j = self.pairs.numpy().T
        per_pair = np.concatenate([self.values_per_term.numpy()[i], self.values_per_term.numpy()[j]], 1)
        suffixed = [name + "1" for name in self.names] + [name + "2" for name in self.names]
        geometric = {("variable", "r"): GEOMETRY_NODES["distance"](0, 1)}
        self._kernel_spec = _expression_kernel(expression, geometric, self.pairs, per_pair, suffixed, self.constants)

    def cpu_kernel(self):
        return _spec_kernel(self._kernel_spec)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        i, j = self.pairs.T
        variables = dict(self.constants)
        for c, name in enumerate(self.names):
            variables[name + "1"], variables[name + "2"] = (
                self.values_per_term[i, c, None],
                self.values_per_term[j, c, None],
            )
        if "r" in self.expression.variables:
            variables["r"] = measure("distance", positions, (i, j))
        return sum_terms(self.expression(variables), positions, len(self.pairs))


class CustomGB(Term):
    """``CustomGBForce`` with ``NoCutoff``: computed values and energy terms, in order.

    Per-particle values are ``(N, B)``; a pair value of particle ``i`` sums its expression over
    every ``j != i`` (excluded pairs left out unless ``NoExclusions``); pair energy terms sum over
    ``i < j``.
    """

    def __init__(self, n_atoms, parameters, names, constants, values, energies, exclusions):
        super().__init__()
        self.n_atoms, self.names, self.constants = n_atoms, list(names), dict(constants)
        self.values = values  # [(name, LeptonExpression, type)]
        self.energies = energies  # [(LeptonExpression, type)]
        self.register_buffer(
            "values_per_term",
            torch.as_tensor(np.asarray(parameters, dtype=np.float64).reshape(n_atoms, len(self.names))),
        )
        i, j = np.triu_indices(n_atoms, k=1)
        excluded = np.zeros((n_atoms, n_atoms), dtype=bool)
        for a, b in exclusions:
            excluded[a, b] = excluded[b, a] = True
        kept = ~excluded[i, j]
        for suffix, (a, b) in {"all": (i, j), "kept": (i[kept], j[kept])}.items():
            self.register_buffer(f"pairs_{suffix}", index_table(np.stack([a, b], 1), 2))
        value_names = [name for name, _, _ in values]
        self._kernel_spec = (
            tuple(
                self._kernel_tree(expression, kind, value_names[:k]) for k, (_, expression, kind) in enumerate(values)
            ),
            tuple(self._kernel_tree(expression, kind, value_names) for expression, kind in energies),
        )
        self._kernel_parameters = (
            *kernel_arrays(self.pairs_kept, self.pairs_all),
            self.values_per_term.numpy().copy(),
            np.array(list(self.constants.values()), dtype=np.float64),
        )

    KINDS = {
        openmm.CustomGBForce.SingleParticle: "single",
        openmm.CustomGBForce.ParticlePair: "pair",
        openmm.CustomGBForce.ParticlePairNoExclusions: "pair_all",
    }

    def _kernel_tree(self, expression: LeptonExpression, kind: int, known: list) -> tuple:
        """``(kind, tree in coordinates, roles)`` of one expression for ``expression_kernels.gb_kernel``; names
        resolve as in ``_pair_variables``/``_single_variables`` (computed values ``known`` so far)."""

        def role(name: str, side: int):
            if name in known:
                return ("value", known.index(name), side)
            return ("param", self.names.index(name), side) if name in self.names else None

        if kind == openmm.CustomGBForce.SingleParticle:
            geometric = {("variable", axis): coordinate(k, 0) for k, axis in enumerate("xyz")}
            roles = {v: role(v, 0) for v in expression.variables - set("xyz")}
        else:
            geometric = {("variable", "r"): GEOMETRY_NODES["distance"](0, 1)}
            roles = {
                v: role(v[:-1], int(v[-1]) - 1) if v[-1:] in ("1", "2") else None for v in expression.variables - {"r"}
            }
        constants = list(self.constants)
        roles = {v: r or ("constant", constants.index(v), 0) for v, r in roles.items()}
        return self.KINDS[kind], in_coordinates(expression.root, geometric), tuple(sorted(roles.items()))

    def cpu_kernel(self):
        return gb_kernel(*self._kernel_spec), self._kernel_parameters

    def _pair_variables(self, positions, pairs, per_particle: dict) -> dict:
        i, j = pairs.T
        variables = dict(self.constants, r=measure("distance", positions, (i, j)))
        for name, value in per_particle.items():
            variables[name + "1"] = value.index_select(0, i)
            variables[name + "2"] = value.index_select(0, j)
        return variables

    def _single_variables(self, positions, per_particle: dict) -> dict:
        variables = dict(self.constants, **per_particle)
        variables.update(x=positions[0], y=positions[1], z=positions[2])
        return variables

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        batch = positions.shape[-1]
        per_particle = {name: self.values_per_term[:, c, None] for c, name in enumerate(self.names)}
        for name, expression, kind in self.values:
            if kind == openmm.CustomGBForce.SingleParticle:
                value = expression(self._single_variables(positions, per_particle))
                value = (value if isinstance(value, torch.Tensor) else positions.new_tensor(value)).expand(
                    self.n_atoms, batch
                )
            else:
                pairs = self.pairs_all if kind == openmm.CustomGBForce.ParticlePairNoExclusions else self.pairs_kept
                ordered = torch.cat([pairs, pairs.flip(1)])
                terms = expression(self._pair_variables(positions, ordered, per_particle))
                terms = (terms if isinstance(terms, torch.Tensor) else positions.new_tensor(terms)).expand(
                    len(ordered), batch
                )
                value = positions.new_zeros(self.n_atoms, batch).index_add(0, ordered[:, 0], terms)
            per_particle[name] = value
        energy = positions.new_zeros(batch)
        for expression, kind in self.energies:
            if kind == openmm.CustomGBForce.SingleParticle:
                energy = energy + sum_terms(
                    expression(self._single_variables(positions, per_particle)), positions, self.n_atoms
                )
            else:
                pairs = self.pairs_all if kind == openmm.CustomGBForce.ParticlePairNoExclusions else self.pairs_kept
                energy = energy + sum_terms(
                    expression(self._pair_variables(positions, pairs, per_particle)), positions, len(pairs)
                )
        return energy
