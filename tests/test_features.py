"""Feature layers against mdtraj and against their OpenMM twins (``export.feature_force``) on real
alanine dipeptide MD frames."""

import mdtraj
import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openflow.features import Angles, Dihedrals, Distances, FeatureSet, atom_pairs, distance_features, select_atoms
from openflow.plugins.openmm.export import feature_force
from openflow.plugins.openmm.md import simulate
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import backbone_torsions


@pytest.fixture(scope="module")
def ala():
    return alanine_dipeptide()


@pytest.fixture(scope="module")
def trajectory(ala, tmp_path_factory):
    """Real MD frames (300 steps of 1 fs) plus their mirror images, so phi and psi take both signs."""
    out = tmp_path_factory.mktemp("md")
    result = simulate(
        ala, steps=300, interval=10, out=out, seed=3, platform="Reference", equilibration_steps=100, progress=False
    )
    traj = mdtraj.load(str(result.trajectory), top=str(result.topology))
    mirrored = traj.xyz * np.array([-1.0, 1.0, 1.0], dtype=np.float32)
    return mdtraj.Trajectory(np.concatenate([traj.xyz, mirrored]), traj.topology)


def _positions(trajectory) -> torch.Tensor:
    return torch.as_tensor(trajectory.xyz, dtype=torch.float64)


def test_alanine_dipeptide_helpers_match_mdtraj(ala, trajectory):
    torsions = backbone_torsions(ala)
    phi_atoms, _ = mdtraj.compute_phi(trajectory)
    psi_atoms, _ = mdtraj.compute_psi(trajectory)
    assert torsions["phi"] == [tuple(int(i) for i in row) for row in phi_atoms]
    assert torsions["psi"] == [tuple(int(i) for i in row) for row in psi_atoms]
    assert backbone_torsions(ala.topology) == torsions == backbone_torsions(trajectory.topology)
    pairs = atom_pairs(ala)
    heavy = {a.index for a in trajectory.topology.atoms if a.element.symbol != "H"}
    assert len(heavy) == 10 and len(pairs) == 45 == len(set(pairs))
    assert all(i < j and i in heavy and j in heavy for i, j in pairs)
    assert distance_features(ala).n_out == 45 and set(select_atoms(ala.topology, "heavy")) == heavy
    assert atom_pairs(trajectory.topology, "resname ALA and (name N or name CA)") == [(6, 8)]
    with pytest.raises(ValueError, match="matches no atom"):
        select_atoms(ala, "element Xe")
    with pytest.raises(ValueError, match="bad atom selection"):
        select_atoms(ala, "name and or")


def test_features_match_mdtraj(ala, trajectory):
    x = _positions(trajectory)
    torsions = backbone_torsions(ala)
    quads = torsions["phi"] + torsions["psi"]
    reference = mdtraj.compute_dihedrals(trajectory, quads)
    assert (reference[:, 0] > 0).any() and (reference[:, 0] < 0).any()  # both signs of phi are tested
    dihedrals = Dihedrals(quads)
    np.testing.assert_allclose(dihedrals.angles(x).numpy(), reference, atol=2e-5)
    sin_cos = dihedrals(x).numpy().reshape(len(x), 2, 2)
    np.testing.assert_allclose(sin_cos[..., 0], np.sin(reference), atol=2e-5)
    np.testing.assert_allclose(sin_cos[..., 1], np.cos(reference), atol=2e-5)
    pairs = atom_pairs(ala)
    np.testing.assert_allclose(Distances(pairs)(x).numpy(), mdtraj.compute_distances(trajectory, pairs), rtol=1e-5)
    triplets = [(4, 6, 8), (6, 8, 14), (8, 14, 16), (1, 4, 5)]
    np.testing.assert_allclose(Angles(triplets)(x).numpy(), mdtraj.compute_angles(trajectory, triplets), atol=2e-5)


def _openmm_energies_and_forces(force: openmm.Force, xyz: np.ndarray):
    system = openmm.System()
    for _ in range(xyz.shape[1]):
        system.addParticle(1.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for frame in xyz:
        context.setPositions(frame)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


@pytest.mark.parametrize("kind", ["distances", "angles", "dihedrals"])
def test_openmm_twin_equals_weighted_feature_sum(ala, trajectory, kind):
    """OpenMM energy of ``feature_force(feature, w)`` = ``w . features`` and its forces = ``-grad``, random weights."""
    torsions = backbone_torsions(ala)
    feature = {
        "distances": lambda: Distances(atom_pairs(ala)),
        "angles": lambda: Angles([(4, 6, 8), (6, 8, 14), (8, 14, 16), (6, 8, 10)]),
        "dihedrals": lambda: Dihedrals(torsions["phi"] + torsions["psi"] + [(1, 4, 6, 8)]),
    }[kind]()
    weights = torch.as_tensor(np.random.default_rng(7).normal(size=feature.n_out))
    x = _positions(trajectory).requires_grad_(True)
    energy = feature(x) @ weights
    (gradient,) = torch.autograd.grad(energy.sum(), x)
    omm_energy, omm_forces = _openmm_energies_and_forces(
        feature_force(feature, weights.numpy()), trajectory.xyz.astype(np.float64)
    )
    np.testing.assert_allclose(omm_energy, energy.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(omm_forces, -gradient.numpy(), rtol=1e-8, atol=1e-8)


def test_dihedral_sign_matches_openmm_theta(ala, trajectory):
    torsions = backbone_torsions(ala)
    quads = torsions["phi"] + torsions["psi"]
    x = _positions(trajectory)
    ours = Dihedrals(quads).angles(x).numpy()
    for k, quad in enumerate(quads):
        force = openmm.CustomTorsionForce("theta")
        force.addTorsion(*quad, [])
        theta, _ = _openmm_energies_and_forces(force, trajectory.xyz.astype(np.float64))
        np.testing.assert_allclose(theta, ours[:, k], atol=1e-10)


def test_feature_set_shapes_names_and_ranges(ala, trajectory):
    torsions = backbone_torsions(ala)
    features = FeatureSet([Distances([(1, 4), (4, 14)]), Dihedrals(torsions["phi"])])
    x = _positions(trajectory)
    out = features(x)
    assert out.shape == (len(x), 4) and features.n_out == 4
    torch.testing.assert_close(features(x.reshape(len(x), -1)), out)  # flat (B, 3n) input
    assert features.names() == ["d(1-4)", "d(4-14)", "sin(dihedral(4-6-8-14))", "cos(dihedral(4-6-8-14))"]
    lo, hi = features.ranges()
    assert lo.tolist() == [0.0, 0.0, -1.0, -1.0] and hi.tolist() == [np.inf, np.inf, 1.0, 1.0]
    assert [s for _, s in features.slices()] == [slice(0, 2), slice(2, 4)]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="2-atom tuples"):
        Distances([(0, 1, 2)])
    with pytest.raises(ValueError, match="distinct"):
        Angles([(0, 1, 1)])
    with pytest.raises(ValueError, match="non-negative"):
        Dihedrals([(0, 1, 2, -3)])
    with pytest.raises(ValueError, match="uses atom 30"):
        Distances([(0, 30)])(torch.zeros(2, 22, 3))
    with pytest.raises(ValueError, match="positions must be"):
        Distances([(0, 1)])(torch.zeros(2, 22, 2))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Distances([(0, 1)])(np.zeros((2, 22, 3)))
    with pytest.raises(ValueError, match="3 weights"):
        feature_force(Distances([(0, 1), (1, 2)]), [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="Feature layers"):
        FeatureSet([])
