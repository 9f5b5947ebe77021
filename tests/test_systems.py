"""The three systems: OpenMM energies and forces against the analytic formulas, exact chain physics."""

import numpy as np
import openmm
import openmm.unit as unit
import pytest
from scipy import integrate

from openflow.systems import INACTIVE_FORCE_GROUP, alanine_dipeptide, build, coulomb_cluster, harmonic_chain

RNG = np.random.default_rng(7)


def openmm_energy_forces(sys, positions):
    """Physical energy (kJ/mol) and forces (n, 3) kJ/mol/nm on the Reference platform."""
    context = openmm.Context(sys.system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups=sys.energy_groups())
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces)


def chain_energy_forces(q, k, boundary):
    """Analytic chain: V = k/2 sum (q_i - q_{i-1})^2, q_0 = 0 (and q_{n+1} = 0 for fixed-fixed)."""
    right = [0.0] if boundary == "fixed-fixed" else []
    padded = np.concatenate([[0.0], q, right])
    energy = 0.5 * k * np.sum(np.diff(padded) ** 2)
    grad = np.zeros_like(q)
    diff = np.diff(padded)
    grad += k * diff[: len(q)]
    grad[: len(diff) - 1] -= k * diff[1:]
    return energy, -grad


def cluster_energy_forces(r):
    """Analytic cluster: sum_{i<j} 1/r_ij + sum_i |r_i|^2 on (n, dim) coordinates."""
    delta = r[:, None, :] - r[None, :, :]
    dist = np.sqrt((delta**2).sum(-1))
    iu = np.triu_indices(len(r), 1)
    energy = np.sum(1.0 / dist[iu]) + np.sum(r**2)
    np.fill_diagonal(dist, np.inf)
    forces = (delta / dist[..., None] ** 3).sum(1) - 2.0 * r
    return energy, forces


@pytest.mark.parametrize("boundary", ["fixed-fixed", "fixed-free"])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_chain_energy_and_forces_match_formula(n, boundary):
    k = 1.7
    sys = harmonic_chain(n, boundary=boundary, k=k)
    for _ in range(3):
        q = RNG.normal(size=n)
        pos = sys.to_positions(q)
        pos[:, 1:] += RNG.normal(size=(n, 2))  # inactive components carry no physical energy
        energy, forces = openmm_energy_forces(sys, pos)
        ref_energy, ref_forces = chain_energy_forces(q, k, boundary)
        assert energy == pytest.approx(ref_energy, rel=1e-6)
        np.testing.assert_allclose(forces[:, 0], ref_forces, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(forces[:, 1:], 0.0, atol=1e-12)


@pytest.mark.parametrize("dim,n", [(2, 3), (2, 6), (3, 4), (3, 13)])
def test_cluster_energy_and_forces_match_formula(dim, n):
    sys = coulomb_cluster(n, dim=dim)
    assert sys.dim == n * dim
    for _ in range(3):
        r = RNG.normal(size=(n, dim))
        pos = sys.to_positions(r.reshape(-1))
        if dim == 2:
            pos[:, 2] += RNG.normal(size=n)  # z is inactive in 2D
        energy, forces = openmm_energy_forces(sys, pos)
        ref_energy, ref_forces = cluster_energy_forces(r)
        assert energy == pytest.approx(ref_energy, rel=1e-6)
        np.testing.assert_allclose(forces[:, :dim], ref_forces, rtol=1e-6, atol=1e-8)


def test_inactive_components_are_tethered_outside_the_energy_groups():
    sys = coulomb_cluster(4, dim=2)
    groups = {f.getForceGroup() for f in sys.system.getForces()}
    assert INACTIVE_FORCE_GROUP in groups
    assert not sys.energy_groups() & (1 << INACTIVE_FORCE_GROUP)
    assert not any(f.getForceGroup() == INACTIVE_FORCE_GROUP for f in alanine_dipeptide().system.getForces())


@pytest.mark.parametrize(
    "boundary,mode",
    [("fixed-fixed", lambda j, n: j / (2 * (n + 1))), ("fixed-free", lambda j, n: (2 * j - 1) / (2 * (2 * n + 1)))],
)
def test_chain_exact_frequencies_are_the_textbook_dispersion(boundary, mode):
    n, k, m = 32, 2.0, 0.5
    sys = harmonic_chain(n, boundary=boundary, k=k, mass=m)
    j = np.arange(1, n + 1)
    expected = 2.0 * np.sqrt(k / m) * np.sin(np.pi * mode(j, n))
    np.testing.assert_allclose(sys.exact_frequencies(), expected, rtol=1e-12)


@pytest.mark.parametrize("boundary", ["fixed-fixed", "fixed-free"])
def test_chain_free_energy_equals_quadrature(boundary):
    k, kT = 1.3, 0.8
    sys = harmonic_chain(2, boundary=boundary, k=k, temperature=kT)
    _, stiffness = sys.parameters, sys.stiffness_matrix()

    def boltzmann(q2, q1):
        q = np.array([q1, q2])
        return np.exp(-0.5 * q @ stiffness @ q / kT)

    z_q, _ = integrate.dblquad(boltzmann, -12, 12, -12, 12, epsabs=1e-11)
    assert sys.exact_free_energy(phase_space=False) == pytest.approx(-np.log(z_q), abs=1e-7)
    z_p = 2.0 * np.pi * kT * 1.0  # two momenta of mass 1: (sqrt(2 pi m kT))^2
    assert sys.exact_free_energy(phase_space=True) == pytest.approx(-np.log(z_q * z_p), abs=1e-7)


def test_reduced_temperature_and_bad_parameters():
    sys = harmonic_chain(3, temperature=2.5)
    assert sys.kT.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(2.5)
    assert coulomb_cluster(3, temperature=300 * unit.kelvin).temperature == 300 * unit.kelvin
    for bad in [
        lambda: harmonic_chain(0),
        lambda: harmonic_chain(3, boundary="free"),
        lambda: harmonic_chain(3, k=-1),
        lambda: coulomb_cluster(3, dim=4),
        lambda: coulomb_cluster(3, temperature=-1.0),
        lambda: alanine_dipeptide(solvent="water"),
        lambda: alanine_dipeptide(forcefield="charmm"),
        lambda: build("argon"),
    ]:
        with pytest.raises(ValueError):
            bad()


def test_position_mapping_round_trip_and_shape_errors():
    sys = coulomb_cluster(5, dim=2)
    x = RNG.normal(size=(7, sys.dim))
    pos = sys.to_positions(x)
    assert pos.shape == (7, 5, 3)
    np.testing.assert_array_equal(sys.from_positions(pos).numpy(), x)
    np.testing.assert_array_equal(sys.from_positions(pos * unit.nanometer).numpy(), x)
    with pytest.raises(ValueError):
        sys.to_positions(np.zeros((2, sys.dim + 1)))
    with pytest.raises(ValueError):
        sys.from_positions(np.zeros((2, 4, 3)))


VARIANTS = [
    dict(solvent=s, forcefield=f, constraints=c)
    for s in ("vacuum", "implicit")
    for f in ("amber99sbildn", "amber14", "ff96")
    for c in (None, "hbonds")
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_alanine_dipeptide_builds_with_finite_energy(kwargs):
    sys = alanine_dipeptide(**kwargs)
    assert sys.n_atoms == 22 and sys.dim == 66
    assert sys.system.getNumConstraints() == (12 if kwargs["constraints"] == "hbonds" else 0)
    names = {type(f).__name__ for f in sys.system.getForces()}
    assert ("GBSAOBCForce" in names or "CustomGBForce" in names) == (kwargs["solvent"] == "implicit")
    context = openmm.Context(sys.system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(sys.positions)
    before = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 200)
    after = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(before) and np.isfinite(after) and after <= before
    assert sys.kT.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(2.494339, rel=1e-5)
