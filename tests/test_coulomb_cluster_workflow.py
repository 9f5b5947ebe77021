"""Coulomb-cluster workflow: the MBAR/TI reference on exactly solvable cases, and a tiny run."""

import json
import math
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from scipy.integrate import quad

from openflow.analysis import lindemann_index
from openflow.plugins.openmm import alchemical, batched_energy
from openflow.systems import coulomb_cluster
from openflow.training import load_checkpoint
from openflow.workflows import run
from openflow.workflows.coulomb_cluster import DEFAULTS, build_flow, train_reverse_kl

YAML = Path(__file__).resolve().parents[1] / "workflows" / "coulomb_cluster.yaml"


def _two_charges_free_energy(dim: int, kT: float) -> float:
    """-log Z of two unit charges in the trap: centre of mass exp(-2 R^2/kT), relative
    coordinate exp(-(r^2/2 + 1/r)/kT), integrated radially by quadrature."""
    shell = 4 * math.pi if dim == 3 else 2 * math.pi
    radial = quad(lambda r: shell * r ** (dim - 1) * math.exp(-(r * r / 2 + 1 / r) / kT), 0, np.inf)[0]
    return -math.log((math.pi * kT / 2) ** (dim / 2) * radial)


def test_trap_free_energy_is_the_gaussian_integral():
    kT = 0.7
    one = quad(lambda x: math.exp(-x * x / kT), -np.inf, np.inf)[0]
    assert math.isclose(alchemical.harmonic_trap_free_energy(5, kT), -5 * math.log(one), rel_tol=1e-10)
    with pytest.raises(ValueError):
        alchemical.harmonic_trap_free_energy(3, -1.0)


def test_coupled_system_scales_only_the_chosen_force():
    cluster = coulomb_cluster(3, dim=3, temperature=1.0)
    scaled = alchemical.coupled_system(cluster, force_index=0)
    pos = cluster.positions
    energies = {}
    for name, system in (("original", cluster.system), ("scaled", scaled)):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(pos)
        if name == "scaled":
            context.setParameter(alchemical.LAMBDA_PARAMETER, 0.25)
            state = context.getState(
                getEnergy=True, getParameterDerivatives=True, groups={alchemical.COUPLED_FORCE_GROUP}
            )
            energies["pair_derivative"] = state.getEnergyParameterDerivatives()[alchemical.LAMBDA_PARAMETER]
            energies["pair_scaled"] = state.getPotentialEnergy()._value
        energies[name] = context.getState(getEnergy=True).getPotentialEnergy()._value
    r = np.asarray(pos._value)
    pair = sum(1 / np.linalg.norm(r[i] - r[j]) for i in range(3) for j in range(i + 1, 3))
    assert math.isclose(energies["pair_derivative"], pair, rel_tol=1e-10)
    assert math.isclose(energies["pair_scaled"], 0.25 * pair, rel_tol=1e-10)
    assert math.isclose(energies["original"] - energies["scaled"], 0.75 * pair, rel_tol=1e-10)
    with pytest.raises(ValueError):
        alchemical.coupled_system(cluster, force_index=7)


@pytest.mark.parametrize("dim", [2, 3])
def test_mbar_and_ti_recover_two_charges(dim):
    kT = 1.0
    cluster = coulomb_cluster(2, dim=dim, temperature=kT)
    samples = alchemical.sample_coupling(
        cluster, 0, alchemical.lambda_schedule(8), n_samples=500, interval=20, equilibration=500, seed=1, n_chains=2
    )
    exact = _two_charges_free_energy(dim, kT) - alchemical.harmonic_trap_free_energy(2 * dim, kT)
    assert samples.n_nonfinite == 0 and samples.positions.shape == (1000, 2 * dim)
    assert samples.coupling_energy.shape == (8, 1000)
    for estimate in (alchemical.mbar_free_energy(samples, n_blocks=4), alchemical.ti_free_energy(samples, n_blocks=4)):
        assert 0 < estimate.block_error <= estimate.error < 0.03
        assert 0 < estimate.analytic_error <= estimate.error
        assert abs(estimate.delta_f - exact) < 3 * estimate.error + 0.005


def test_chains_are_independent_and_reproducible():
    cluster = coulomb_cluster(2, dim=2, temperature=1.0)
    kwargs = dict(lambdas=[0.0, 1.0], n_samples=50, interval=5, equilibration=10, seed=3)
    one = alchemical.sample_coupling(cluster, 0, **kwargs)
    two = alchemical.sample_coupling(cluster, 0, n_chains=2, **kwargs)
    assert two.coupling_energy.shape == (2, 100) and two.positions.shape == (100, 4)
    np.testing.assert_array_equal(two.coupling_energy[:, :50], one.coupling_energy)
    np.testing.assert_array_equal(two.positions[:50], one.positions)
    assert not np.allclose(two.coupling_energy[:, 50:], one.coupling_energy)
    with pytest.raises(ValueError, match="n_chains"):
        alchemical.sample_coupling(cluster, 0, n_chains=0, **kwargs)


def test_lambda_schedule_and_bad_input():
    np.testing.assert_allclose(alchemical.lambda_schedule(3, power=2.0), [0.0, 0.25, 1.0])
    with pytest.raises(ValueError):
        alchemical.lambda_schedule(1)
    with pytest.raises(ValueError):
        alchemical.sample_coupling(coulomb_cluster(2), 0, [0.5], n_samples=10, interval=1, equilibration=0)


def test_tiny_workflow_end_to_end(tmp_path):
    overrides = {
        "clusters": [{"n": 3, "dim": 2, "temperature": 1.0}],
        "reference": {"n_states": 6, "n_chains": 2, "n_samples": 300, "interval": 50, "equilibration": 200},
        "reverse_kl": {"steps": 5},
        "flow_matching": {"steps": 20},
        "evaluation": {"n_samples": 1000, "n_bootstrap": 20},
        "ground_state": {"n_starts": 4, "n_quench": 2},
    }
    metrics = run(YAML, tmp_path, overrides)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (tmp_path / "2d_n3_T1.0_histograms.png").stat().st_size > 1000
    tag = "2d_n3_T1.0_"
    # equilateral triangle: side a^3 = 3/2, energy per particle a^2
    ground = 1.5 ** (2 / 3)
    assert math.isclose(metrics[tag + "ground_state_energy_per_particle_multistart_kjmol"], ground, rel_tol=1e-6)
    assert metrics[tag + "ground_state_energy_per_particle_flow_quench_kjmol"] >= ground - 1e-6
    for variant in ("rkl", "fm"):
        assert metrics[f"{tag}nonfinite_fraction_{variant}"] == 0.0
        # importance sampling is unbiased whatever the training: flow and MBAR must agree
        assert metrics[f"{tag}deviation_sigma_{variant}"] < 4
        # the variational bound lies above the importance-sampled estimate
        assert metrics[f"{tag}free_energy_variational_kT_{variant}"] > metrics[f"{tag}free_energy_flow_kT_{variant}"]
    best = max(
        ("rkl", "fm"), key=lambda v: metrics[f"{tag}ess_fraction_{v}"]
    )  # the headline numbers are the higher-ESS flow's
    assert (
        metrics[tag + "flow_variant"] == best and metrics[tag + "ess_fraction"] == metrics[f"{tag}ess_fraction_{best}"]
    )


def test_bad_cluster_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cluster"):
        run(YAML, tmp_path, {"clusters": [{"n": 3, "dim": 2}]})


def test_lindemann_is_zero_for_a_rigid_cluster_and_sees_swaps():
    rng = np.random.default_rng(0)
    shape = rng.normal(size=(3, 3))
    rotations = [np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(10)]
    rigid = np.stack([shape @ q.T for q in rotations]).reshape(10, 9)
    assert lindemann_index(rigid, 3, 3, 1) < 1e-12
    # two particles in 2D: a rigid first chain, then a pair distance alternating between 1 and 3
    near, far = np.array([0.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 3.0, 0.0])
    frames = np.stack([near] * 4 + [near, far] * 2)
    assert math.isclose(lindemann_index(frames, 2, 2, 2), 0.5 * (3 - 1) / (3 + 1), rel_tol=1e-12)


def test_reverse_kl_keeps_the_last_parameters_its_solver_check_passed(tmp_path):
    system = coulomb_cluster(3, dim=2, temperature=1.0)
    energy = batched_energy(system, "torch", dtype=torch.float64)
    for tolerance, kept in ((1e-12, 0), (1.0, 2)):
        torch.manual_seed(0)
        model = build_flow(system.dim, 1.0, 3, 2, DEFAULTS["flow"])
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = dict(DEFAULTS["reverse_kl"], steps=2, check_every=1, solver_tolerance=tolerance)
        result = train_reverse_kl(model, energy, cfg, 0, tmp_path / str(tolerance))
        assert result["reverse_kl_steps_kept"] == kept
        moved = any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())
        # the identity flow (zero last layer) has no solver error; a trained one has some
        assert moved == (kept > 0) and (result["reverse_kl_solver_gap_kT"] > 0) == (kept > 0)
        saved = load_checkpoint(tmp_path / str(tolerance) / "checkpoint.pt")["model"]
        assert all(
            torch.equal(v, model.state_dict()[k]) for k, v in saved.items()
        )  # the checkpoint holds what was kept
    with pytest.raises(ValueError, match="check_every"):
        train_reverse_kl(model, energy, dict(cfg, check_every=0), 0, tmp_path / "bad")
