"""The learned-CV loop for any OpenMM system: systems from files, features chosen from the System, the
kinetic choice of the slow mode, and the loop end to end on a particle in a 2-D double well given only
as XML + PDB, whose basin free energy is known by quadrature."""

import json
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch
from helpers import WORKFLOWS
from scipy.integrate import dblquad

from openflow import nct
from openflow.analysis import basin_separation_auc
from openflow.cli import main
from openflow.data import load_trajectory
from openflow.estimators import state_free_energy
from openflow.features import Positions, proper_torsions
from openflow.nct import nct_settings
from openflow.plugins.openmm.export import check_export, load_cv_force, openmm_cv_values_and_forces, to_custom_cv_force
from openflow.plugins.openmm.learned_cv import choose_features, energy_is_rigid_invariant, learn_cv
from openflow.plugins.openmm.md import simulate
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import MOLAR_GAS_CONSTANT, alanine_dipeptide, from_files, from_openmm
from openflow.systems.alanine_dipeptide import backbone_torsions, phi_psi, phi_states
from openflow.workflows import run

# U(x, y, z) = A ((x/a)^2 - 1)^2 - B x/a + C (y - 0.1 x/a)^2 + D z^2, kJ/mol and nm: a tilted double well in x
A, WELL, B, C, D = 25.0, 0.3, 3.0, 100.0, 100.0


def write_particle(folder, start_x=-WELL):
    """A carbon-mass particle in the double well, as a serialized System + PDB (what a user would bring)."""
    system = openmm.System()
    system.addParticle(12.0)
    force = openmm.CustomExternalForce(f"{A}*((x/{WELL})^2-1)^2-{B}*x/{WELL}+{C}*(y-0.1*x/{WELL})^2+{D}*z^2")
    force.addParticle(0, [])
    system.addForce(force)
    (folder / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    topology = app.Topology()
    topology.addAtom("C1", app.Element.getBySymbol("C"), topology.addResidue("PRT", topology.addChain()))
    with open(folder / "structure.pdb", "w") as handle:
        app.PDBFile.writeFile(topology, np.array([[start_x, 0.0, 0.0]]) * unit.nanometer, handle)
    return folder / "system.xml", folder / "structure.pdb"


def exact_delta_f(temperature_K: float = 300.0) -> float:
    """F(x > 0) - F(x < 0) in kT by quadrature (z is separable and cancels)."""
    kT = MOLAR_GAS_CONSTANT * temperature_K

    def boltzmann(y, x):
        return np.exp(-(A * ((x / WELL) ** 2 - 1) ** 2 - B * x / WELL + C * (y - 0.1 * x / WELL) ** 2) / kT)

    right = dblquad(boltzmann, 0.0, 1.0, -1.0, 1.0)[0]
    left = dblquad(boltzmann, -1.0, 0.0, -1.0, 1.0)[0]
    return float(-np.log(right / left))


def test_systems_from_files_and_their_errors(tmp_path, capsys):
    xml, pdb = write_particle(tmp_path)
    system = from_files(xml, pdb, temperature_K=350.0)
    assert system.n_atoms == 1 and system.dim == 3 and system.temperature_K == 350.0
    with pytest.raises(FileNotFoundError, match="system XML file not found"):
        from_files(tmp_path / "missing.xml", pdb)
    (tmp_path / "garbage.xml").write_text("<System version='1'><Particles>")
    with pytest.raises(ValueError, match="garbage.xml is not a serialized openmm.System"):
        from_files(tmp_path / "garbage.xml", pdb)
    ala = alanine_dipeptide()
    (tmp_path / "ala.xml").write_text(openmm.XmlSerializer.serialize(ala.system))
    with pytest.raises(ValueError, match="ala.xml and .*: the System has 22 particles but the topology 1 atoms"):
        from_files(tmp_path / "ala.xml", pdb)
    pair = openmm.System()  # two charges on top of each other: an infinite starting energy
    for _ in range(2):
        pair.addParticle(1.0)
    coulomb = openmm.CustomBondForce("1/r")
    coulomb.addBond(0, 1, [])
    pair.addForce(coulomb)
    (tmp_path / "pair.xml").write_text(openmm.XmlSerializer.serialize(pair))
    topology = app.Topology()
    residue = topology.addResidue("X", topology.addChain())
    for k in range(2):
        topology.addAtom(f"X{k}", app.Element.getBySymbol("Ar"), residue)
    with open(tmp_path / "pair.pdb", "w") as handle:
        app.PDBFile.writeFile(topology, np.zeros((2, 3)) * unit.nanometer, handle)
    with pytest.raises(ValueError, match="non-finite energy"):
        from_files(tmp_path / "pair.xml", tmp_path / "pair.pdb")
    command = [
        "run",
        str(WORKFLOWS / "learned_cv.yaml"),
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"system.xml={tmp_path / 'ala.xml'}",
        "--set",
        f"system.pdb={pdb}",
    ]
    capsys.readouterr()
    assert main(command) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "22 particles" in error[0] and not (tmp_path / "run" / "round0").exists()


def test_systems_in_memory_equal_their_files_and_their_errors(tmp_path):
    """from_openmm on the objects a user holds gives the System from_files reads from their saved copies."""
    xml, pdb = write_particle(tmp_path, start_x=0.25)
    structure = app.PDBFile(str(pdb))
    loaded = openmm.XmlSerializer.deserialize(xml.read_text())
    system = from_openmm(loaded, structure.topology, structure.positions, temperature_K=320.0, name="particle")
    saved = from_files(xml, pdb, temperature_K=320.0)
    np.testing.assert_array_equal(system.masses, saved.masses)
    np.testing.assert_array_equal(
        system.positions.value_in_unit(unit.nanometer), saved.positions.value_in_unit(unit.nanometer)
    )
    assert system.name == "particle" and system.kT_kjmol == saved.kT_kjmol and system.dim == 3
    with pytest.raises(ValueError, match="takes an openmm.System and an openmm.app.Topology, got str"):
        from_openmm(str(xml), structure.topology, structure.positions)
    with pytest.raises(ValueError, match=r"positions must be finite, shape \(1, 3\) in nm, got shape \(2, 3\)"):
        from_openmm(loaded, structure.topology, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="temperature_K must be a positive number"):
        from_openmm(loaded, structure.topology, structure.positions, temperature_K=-1.0)


def test_features_are_chosen_from_the_system(tmp_path):
    ala = alanine_dipeptide()
    particle = from_files(*write_particle(tmp_path))
    assert energy_is_rigid_invariant(ala) and not energy_is_rigid_invariant(particle)
    features, align, kind = choose_features(ala)
    assert (kind, align, features.n_out) == ("distances", True, 45)
    features, align, kind = choose_features(particle)
    assert (kind, align, features.n_out) == ("positions", False, 3)
    # every proper torsion over bonded heavy atoms, from the bonds alone: phi and psi are among them, unasked
    torsions = proper_torsions(ala)
    named = backbone_torsions(ala)
    for quad in (named["phi"][0], named["psi"][0]):
        assert tuple(quad) in torsions or tuple(reversed(quad)) in torsions
    assert all(len(set(t)) == 4 for t in torsions) and len(torsions) == len(set(torsions))
    with pytest.raises(ValueError, match="features must be one of"):
        choose_features(ala, "phi_psi")


def test_position_features_export_exactly(tmp_path):
    """Cartesian features fold into a CustomExternalForce: OpenMM's CV equals torch, values and forces."""
    from openflow.cv import CVModel

    cv = CVModel(Positions([(1,), (4,), (8,)]), hidden=(3,), seed=2).double()
    frames = np.random.default_rng(0).normal(scale=0.5, size=(8, 22, 3))
    report = check_export(cv, to_custom_cv_force(cv), frames)
    assert report["max_value_error"] < 1e-12 and report["max_force_relative_error"] < 1e-10


def test_kinetic_choice_finds_the_rare_basin_change_in_hot_alanine(tmp_path):
    """From 0.3 ns of 700 K MD (no phi/psi anywhere in the learning) the learned CV separates the phi basins."""
    hot = alanine_dipeptide(temperature=700.0 * unit.kelvin)
    md = simulate(hot, ns=0.3, interval=100, out=tmp_path / "md", seed=0, platform="Reference", progress=False)
    phi = phi_psi(load_trajectory(md.trajectory, md.topology))[0]
    basin = phi_states(phi) == 1
    assert 0.02 < basin.mean() < 0.98  # both basins visited: the test is meaningful

    def learn():
        small = {"layers": 2, "hidden": [16], "steps": 200}
        return learn_cv(hot, md.trajectory, md.topology, out=tmp_path / "cv", progress=False, nct=small, epochs=30)

    cv = learn()
    assert cv.metrics["cv_dims"] == 1 and cv.values.shape == cv.target.shape == (md.n_frames, 1)  # one slow process
    assert basin_separation_auc(cv.target[:, 0], basin) > 0.95 and basin_separation_auc(cv.values[:, 0], basin) > 0.95
    assert cv.metrics["cv_export_max_value_error"] < 1e-10 and cv.metrics["kinetic_lag_frames"] == 10
    (variable,) = cv.bias_variables(0.25)
    assert variable.minValue == cv.ranges[0][0] and variable.biasWidth == pytest.approx(0.25 * cv.stds[0])
    np.testing.assert_array_equal(learn().values, cv.values)  # the saved CV, reused


def test_slow_together_counts_processes_of_about_the_same_timescale():
    """A second CV when its implied timescale is at least half the slowest one's (rates ln(1/lambda))."""
    assert nct.slow_together([0.9, 0.9]) == 2 and nct.slow_together([0.9, 0.3]) == 1
    assert nct.slow_together([np.exp(-1.0), np.exp(-2.0)]) == 2  # exactly half as slow
    assert nct.slow_together([np.exp(-1.0), np.exp(-2.01)]) == 1
    assert nct.slow_together([0.9]) == 1 and nct.slow_together([0.9, -0.2]) == 1
    assert nct.slow_together([0.9, 0.9], most=1) == 1


def test_the_transformation_keeps_its_kinetically_best_training_length(tmp_path):
    """Checks after none and every ``steps / checks`` steps; the model returned is the one whose slowest
    mode combination has the largest autocorrelation, and a second call reads it back untrained."""
    rng = np.random.default_rng(0)
    slow = np.sign(np.cumsum(rng.normal(size=3000)) % 40 - 20)  # a two-state signal that switches now and then
    q = torch.as_tensor(np.stack([slow + 0.3 * rng.normal(size=3000), rng.normal(size=3000), rng.normal(size=3000)], 1))
    p = torch.as_tensor(rng.normal(size=q.shape))
    segments, settings = np.zeros(len(q), dtype=int), {"layers": 2, "hidden": [8], "steps": 20, "batch": 128}
    variances = q.var(0)

    def train():
        return nct.train_nct_kinetically(
            p, q, variances, settings, 0, tmp_path / "nct", False, 2, segments, 5, checks=4
        )

    model, metrics = train()
    scores = metrics["nct_check_autocorrelations"]
    assert len(scores) == 5 and metrics["nct_steps_trained"] == 20 and metrics["nct_steps"] in (0, 5, 10, 15, 20)
    modes = nct.latent_modes(model, q, 2).double().numpy()
    kept = nct.kinetic_slowest(modes, segments, 5)[0].eigenvalues[0]
    assert kept == pytest.approx(max(scores), abs=1e-6) and scores.index(max(scores)) == metrics["nct_steps"] // 5
    again, metrics_again = train()
    assert metrics_again == metrics
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def three_well_rotor():
    """A carbon-mass particle on a ring of radius 0.3 nm in xy with three equal wells 120 degrees apart
    (barriers 7 kJ/mol), as a System in memory: a three-state process, whose two slow eigenfunctions
    have the same timescale."""
    system = openmm.System()
    system.addParticle(12.0)
    force = openmm.CustomExternalForce("2000*(r-0.3)^2 + 3.5*(x^3-3*x*y^2)/r^3 + 1000*z^2; r=sqrt(x^2+y^2)")
    force.addParticle(0, [])
    system.addForce(force)
    topology = app.Topology()
    topology.addAtom("C1", app.Element.getBySymbol("C"), topology.addResidue("PRT", topology.addChain()))
    return from_openmm(system, topology, np.array([[-0.3, 0.0, 0.0]]), temperature_K=300.0)


def test_a_three_state_rotor_gets_two_cvs_that_tell_its_wells_apart(tmp_path):
    """Three equal wells on a ring: ``dims="auto"`` keeps the two equally slow TICA components, both exported
    exactly, together naming each frame's well (one CV alone puts a barrier and a well at one value);
    the pair drives OpenMM's own Metadynamics."""
    rotor = three_well_rotor()
    md = simulate(rotor, ns=2.0, interval=100, out=tmp_path / "md", seed=0, platform="Reference", progress=False)
    cv = learn_cv(rotor, md.trajectory, md.topology, out=tmp_path / "cv", nct={"steps": 200, "hidden": [16]}, epochs=30)
    xyz = load_trajectory(md.trajectory, md.topology).xyz[:, 0]
    well = np.round(np.mod(np.arctan2(xyz[:, 1], xyz[:, 0]) - np.pi / 3, 2 * np.pi) / (2 * np.pi / 3)).astype(int) % 3
    assert np.bincount(well, minlength=3).min() > 0.2 * well.size  # all three wells sampled: a fair test
    assert cv.metrics["cv_dims"] == 2 and cv.values.shape == (md.n_frames, 2) and len(cv.forces) == 2
    assert cv.metrics["cv_export_max_value_error"] < 1e-10 and cv.metrics["cv2_export_max_value_error"] < 1e-10
    assert (tmp_path / "cv" / "cv.xml").exists() and (tmp_path / "cv" / "cv2" / "cv2.xml").exists()
    centroids = np.array([cv.values[well == k].mean(0) for k in range(3)])
    nearest = np.argmin(((cv.values[:, None, :] - centroids[None]) ** 2).sum(-1), 1)
    assert (nearest == well).mean() > 0.95
    np.testing.assert_allclose(cv(xyz[:5, None, :]), cv.values[:5], rtol=0, atol=1e-12)
    meta = app.Metadynamics(rotor.system, cv.bias_variables(), 300 * unit.kelvin, 6.0, 1.2, 50)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picoseconds)
    simulation = app.Simulation(
        rotor.topology, rotor.system, integrator, openmm.Platform.getPlatformByName("Reference")
    )
    simulation.context.setPositions(rotor.positions)
    meta.step(simulation, 200)
    assert meta.getFreeEnergy().shape == tuple(v.gridWidth for v in reversed(cv.bias_variables())) and (
        meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole).min() < 0
    )


@pytest.mark.parametrize("dims", [0, 3, 2.0, True, "two"])
def test_a_bad_number_of_cvs_is_one_clear_error_before_any_work(dims, tmp_path):
    with pytest.raises(ValueError, match=r"dims\) must be 1, 2 or auto, got"):
        run(WORKFLOWS / "learned_cv.yaml", tmp_path / "run", {"cv": {"dims": dims}})
    assert not (tmp_path / "run").exists()


def test_partial_nct_settings_are_completed_and_bad_ones_named():
    """learn_cv's ``nct={...}`` may give only what it changes; a typo or a bad value is one clear error."""
    assert nct_settings({"steps": 5}) == {**nct.SETTINGS, "steps": 5}
    with pytest.raises(ValueError, match=r"unknown NCT settings \['step'\]"):
        nct_settings({"step": 5})
    with pytest.raises(ValueError, match="positive integers"):
        nct_settings({"hidden": [16, 0]})
    with pytest.raises(ValueError, match="lr must be a positive number"):
        nct_settings({"lr": "fast"})


def test_the_loop_on_a_particle_given_as_files_recovers_the_exact_basin_free_energy(tmp_path):
    """The workflow at its defaults (only the speed measurement shortened), started in the higher basin:
    ΔF(x > 0 - x < 0) from the production frames and weights within 0.2 kT of quadrature; the
    workflow's own states are the two wells."""
    xml, pdb = write_particle(tmp_path)
    overrides = {"system": {"xml": str(xml), "pdb": str(pdb)}, "speed": {"steps": 200, "repeats": 1}, "progress": False}
    metrics = run(WORKFLOWS / "learned_cv.yaml", tmp_path / "run", overrides)
    production = tmp_path / "run" / "production"
    for name in ("trajectory.dcd", "topology.pdb", "weights.npy", "COLVAR", "cv.xml"):
        assert (production / name).exists(), name
    x = load_trajectory(production / "trajectory.dcd", production / "topology.pdb").xyz[:, 0, 0]
    weights = np.load(production / "weights.npy")
    assert weights.shape == x.shape and (weights >= 0).all()
    estimate = state_free_energy(x > 0, np.log(weights), n_blocks=10)
    exact = exact_delta_f()
    assert abs(estimate.delta_f - exact) < min(0.2, 3 * estimate.error) and estimate.error < 0.15
    assert metrics["features"] == "positions" and metrics["production_states"] == 2
    assert abs(metrics["production_delta_f_kT"] - exact) < 0.3  # ΔF(other state - start state) along the CV
    assert metrics["production_transitions_per_ns"] > 10 and metrics["biased_ns_total"] <= 10.0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rounds"] == metrics["rounds"] and (tmp_path / "run" / "delta_f_rounds.png").exists()
    assert metrics["round1_cv_export_max_value_error"] < 1e-10  # the exported CV is the torch CV


B2_GUEST = Path(__file__).resolve().parents[1] / "systems" / "data" / "b2_guest"


@pytest.mark.slow
def test_the_loop_on_a_drug_like_guest_agrees_with_long_unbiased_md(tmp_path):
    """B2, a 30-atom GAFF guest in vacuum given as XML + PDB, the loop at its default settings: distance
    features; its slowest processes, two hydroxymethyl rotors of three rotamers, are about equally slow,
    so the kinetic choice keeps two CVs (one of them alone hides the barrier along the other: the
    loop's ΔF was then 0.5 kT off with a 0.05 kT error bar). ΔF between the first CV's states in
    production agrees within 1.5 kJ/mol with 40 ns of unbiased MD shipped with the system, evaluated
    with the production's own ``cv.xml`` and barrier; the shipped CVs are those of the COLVAR."""
    xml, pdb = B2_GUEST / "system.xml", B2_GUEST / "structure.pdb"
    metrics = run(WORKFLOWS / "learned_cv.yaml", tmp_path / "run", {"system": {"xml": str(xml), "pdb": str(pdb)}})
    assert metrics["features"] == "distances" and metrics["n_features"] == 66  # 12 heavy atoms
    assert metrics[f"round{metrics['rounds']}_cv_dims"] == 2
    assert metrics["production_states"] == 2 and metrics["production_transitions_per_ns"] >= 10
    production = tmp_path / "run" / "production"
    frames = load_trajectory(production / "trajectory.dcd", production / "topology.pdb")
    colvar = read_colvar(production / "COLVAR")
    for name in ("cv", "cv2"):
        values = openmm_cv_values_and_forces(load_cv_force(production / f"{name}.xml"), frames)[0]
        np.testing.assert_allclose(values, colvar[name], atol=1e-4)
    force, barrier = load_cv_force(production / "cv.xml"), metrics["production_barrier"]
    start = openmm_cv_values_and_forces(force, mdtraj.load(pdb))[0][0]
    values = openmm_cv_values_and_forces(force, mdtraj.load(B2_GUEST / "unbiased_300K.xtc", top=pdb))[0]
    other = (values > barrier) != (start > barrier)  # the state the loop did not start in
    reference = state_free_energy(other, np.zeros(values.size), n_blocks=10)
    assert reference.error < 0.5 and metrics["production_delta_f_error_kT"] < 0.5  # a comparison that can fail
    tolerance = 1.5 / (MOLAR_GAS_CONSTANT * 300.0)  # 1.5 kJ/mol in kT
    assert abs(metrics["production_delta_f_kT"] - reference.delta_f) < tolerance
