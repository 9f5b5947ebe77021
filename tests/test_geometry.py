"""openflow.geometry: distances, angles and dihedrals against mdtraj, autograd, and along any axis."""

import math

import mdtraj
import numpy as np
import pytest
import torch

from openflow import geometry


def _points(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mdtraj(points: torch.Tensor) -> mdtraj.Trajectory:
    topology = mdtraj.Topology()
    residue = topology.add_residue("X", topology.add_chain())
    for k in range(4):
        topology.add_atom(f"C{k}", mdtraj.element.carbon, residue)
    return mdtraj.Trajectory(points.numpy(), topology)


def test_geometry_matches_mdtraj():
    points = _points()
    frames = _mdtraj(points)
    a, b, c, d = points.unbind(1)
    np.testing.assert_allclose(
        geometry.distance(a, b).numpy(), mdtraj.compute_distances(frames, [[0, 1]])[:, 0], rtol=1e-6
    )
    np.testing.assert_allclose(
        geometry.angle(a, b, c).numpy(), mdtraj.compute_angles(frames, [[0, 1, 2]])[:, 0], atol=1e-5
    )
    reference = mdtraj.compute_dihedrals(frames, [[0, 1, 2, 3]], periodic=False)[:, 0]
    np.testing.assert_allclose(geometry.dihedral(a, b, c, d).numpy(), reference, atol=1e-5)
    sin, cos = geometry.dihedral_sin_cos(a, b, c, d)
    np.testing.assert_allclose(sin.numpy(), np.sin(reference), atol=1e-5)
    np.testing.assert_allclose(cos.numpy(), np.cos(reference), atol=1e-5)
    assert geometry.dihedral(d, c, b, a).sub(geometry.dihedral(a, b, c, d)).abs().max() < 1e-12  # symmetric


@pytest.mark.parametrize("name, arity", [("distance", 2), ("angle", 3), ("dihedral", 4)])
def test_analytic_gradients_match_autograd_along_any_axis(name, arity):
    points = _points(32, seed=1)[:, :arity].requires_grad_(True)
    value = getattr(geometry, name)(*points.unbind(1))
    (expected,) = torch.autograd.grad(value.sum(), points)
    for dim in (-1, 0):
        inputs = [p.detach().T if dim == 0 else p.detach() for p in points.unbind(1)]  # (3, B) when dim=0
        got, grads = getattr(geometry, f"{name}_and_gradient")(*inputs, dim=dim)
        torch.testing.assert_close(got, value.detach(), rtol=1e-12, atol=1e-12)
        for k, grad in enumerate(grads):
            torch.testing.assert_close(grad.T if dim == 0 else grad, expected[:, k], rtol=1e-9, atol=1e-9)


def test_wrap_angle():
    theta = torch.tensor([-math.pi, math.pi, 3 * math.pi / 2, -7.0], dtype=torch.float64)
    wrapped = geometry.wrap_angle(theta)
    assert ((wrapped >= -math.pi) & (wrapped < math.pi)).all()
    torch.testing.assert_close(torch.cos(wrapped), torch.cos(theta))
    torch.testing.assert_close(torch.sin(wrapped), torch.sin(theta))
