"""One geometry: the force field's own formulas (Lepton coordinate trees, hand-written and generated
numba kernels) against ``openflow.geometry`` on random points, values and gradients, float64."""

import math

import numpy as np
import openmm
import pytest
import torch

from openflow import geometry
from openflow.plugins.openmm.forcefield import translate_force
from openflow.plugins.openmm.forcefield.lepton import GEOMETRY_NODES, coordinate, derivative, evaluate
from openflow.plugins.openmm.forcefield.parallel import evaluate as evaluate_kernels
from openflow.plugins.openmm.forcefield.terms import HarmonicAngles, HarmonicBonds, PeriodicTorsions

ARITY = {"distance": 2, "angle": 3, "dihedral": 4}
GRADIENT = {
    "distance": geometry.distance_and_gradient,
    "angle": geometry.angle_and_gradient,
    "dihedral": geometry.dihedral_and_gradient,
}


def _points(batch: int, n: int, seed: int) -> torch.Tensor:
    """Random positions ``(batch, n, 3)`` nm, float64."""
    return 0.2 * torch.randn(batch, n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kernel_energy_gradient(term, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies ``(B,)`` and ``dE/dpoints`` ``(B, n, 3)`` of ``term``'s compiled CPU kernel at ``points``."""
    positions = points.permute(2, 1, 0).contiguous()  # the force field's layout (3, N, B)
    gradient = torch.zeros_like(positions)
    energy = evaluate_kernels([term.cpu_kernel()], positions, gradient)
    return energy, gradient.permute(2, 1, 0)


def _geometry_energy_gradient(energy_of, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies ``(B,)`` of ``energy_of(points)`` (written with ``openflow.geometry``) and their autograd gradient."""
    points = points.clone().requires_grad_(True)
    energy = energy_of(points)
    (gradient,) = torch.autograd.grad(energy.sum(), points)
    return energy.detach(), gradient


def _assert_close(energy, gradient, energy_ref, gradient_ref):
    np.testing.assert_allclose(energy.numpy(), energy_ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        gradient.numpy(), gradient_ref.numpy(), rtol=1e-9, atol=1e-10 * float(gradient_ref.abs().max())
    )


@pytest.mark.parametrize("name", list(ARITY))
def test_lepton_geometry_trees_equal_openflow_geometry(name):
    """``GEOMETRY_NODES`` (the coordinate trees the generated kernels compile) and their symbolic
    derivatives give ``openflow.geometry``'s values and analytic gradients."""
    points = _points(200, ARITY[name], seed=ARITY[name])
    tree = GEOMETRY_NODES[name](*range(ARITY[name]))
    variables = {coordinate(axis, slot): points[:, slot, axis] for slot in range(ARITY[name]) for axis in range(3)}
    value, grads = GRADIENT[name](*points.unbind(1))
    np.testing.assert_allclose(evaluate(tree, variables).numpy(), value.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        value.numpy(), getattr(geometry, name)(*points.unbind(1)).numpy(), rtol=1e-14, atol=1e-14
    )
    for slot in range(ARITY[name]):
        for axis in range(3):
            slope = evaluate(derivative(tree, coordinate(axis, slot)), variables)
            np.testing.assert_allclose(slope.numpy(), grads[slot][:, axis].numpy(), rtol=1e-8, atol=1e-8)


def test_bond_kernel_equals_openflow_geometry():
    pairs, length, k = [[0, 1], [2, 4], [1, 5]], [0.1, 0.25, 0.2], [300.0, 50.0, 120.0]
    points = _points(300, 6, seed=1)
    expected = _geometry_energy_gradient(
        lambda p: sum(
            0.5 * kk * (geometry.distance(p[:, i], p[:, j]) - r0) ** 2 for (i, j), r0, kk in zip(pairs, length, k)
        ),
        points,
    )
    _assert_close(*_kernel_energy_gradient(HarmonicBonds(pairs, length, k), points), *expected)


def test_angle_kernel_equals_openflow_geometry():
    triples, angle, k = [[0, 1, 2], [3, 2, 5], [4, 0, 1]], [1.9, 2.1, 1.2], [20.0, 10.0, 35.0]
    points = _points(300, 6, seed=2)
    expected = _geometry_energy_gradient(
        lambda p: sum(
            0.5 * kk * (geometry.angle(p[:, i], p[:, j], p[:, l]) - theta0) ** 2
            for (i, j, l), theta0, kk in zip(triples, angle, k)
        ),
        points,
    )
    _assert_close(*_kernel_energy_gradient(HarmonicAngles(triples, angle, k), points), *expected)


def test_torsion_kernel_equals_openflow_geometry():
    """Several periodicities on one dihedral, reversed and distinct dihedrals, arbitrary phases."""
    rng = np.random.default_rng(3)
    quadruples = [[0, 1, 2, 3]] * 3 + [[5, 4, 3, 2], [1, 2, 4, 5]]
    periodicity = [1, 2, 4, 3, 6]
    phase, k = rng.uniform(-math.pi, math.pi, 5), rng.uniform(0.5, 3.0, 5)
    points = _points(300, 6, seed=3)
    expected = _geometry_energy_gradient(
        lambda p: sum(
            kk * (1.0 + torch.cos(n * geometry.dihedral(*(p[:, a] for a in q)) - phi0))
            for q, n, phi0, kk in zip(quadruples, periodicity, phase, k)
        ),
        points,
    )
    _assert_close(*_kernel_energy_gradient(PeriodicTorsions(quadruples, periodicity, phase, k), points), *expected)


def test_generated_geometry_kernel_equals_openflow_geometry():
    """A ``CustomCompoundBondForce`` using ``distance``, ``angle`` and ``dihedral``: its generated kernel
    (geometry rewritten as coordinate trees) and its torch term against ``openflow.geometry``."""
    force = openmm.CustomCompoundBondForce(
        4, "c*distance(p1,p4)^2 + 0.5*angle(p1,p2,p3) + 0.3*sin(dihedral(p1,p2,p3,p4))"
    )
    force.addPerBondParameter("c")
    bonds = [([0, 2, 4, 5], 0.8), ([5, 3, 1, 0], -0.3)]
    for particles, c in bonds:
        force.addBond(particles, [c])
    term = translate_force(force, 6)
    points = _points(300, 6, seed=4)

    def energy_of(p):
        return sum(
            c * geometry.distance(p[:, a], p[:, d]) ** 2
            + 0.5 * geometry.angle(p[:, a], p[:, b], p[:, cc])
            + 0.3 * torch.sin(geometry.dihedral(p[:, a], p[:, b], p[:, cc], p[:, d]))
            for (a, b, cc, d), c in bonds
        )

    expected = _geometry_energy_gradient(energy_of, points)
    _assert_close(*_kernel_energy_gradient(term, points), *expected)
    positions = points.permute(2, 1, 0).contiguous()
    gradient = torch.zeros_like(positions)
    energy = term.energy_gradient(positions, gradient)  # the torch term: base.measure, symbolic slopes
    _assert_close(energy, gradient.permute(2, 1, 0), *expected)
