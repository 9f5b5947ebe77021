"""The alanine dipeptide workflow: its exact pieces, and a tiny end-to-end run from the CLI entry point."""

import math

import mdtraj
import numpy as np
import pytest
import torch
from helpers import WORKFLOWS

from openflow import nct
from openflow.analysis import torsion_histogram_kl as ramachandran_kl
from openflow.estimators import state_free_energy
from openflow.flows.generators import internal_coordinate_generator, marginal_generator
from openflow.flows.internal import zmatrix_from_topology
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems.alanine_dipeptide import phi_states
from openflow.training import interleaved_holdout as held_out
from openflow.workflows import run as run_workflow
from openflow.workflows.alanine_dipeptide import heavy_positions, kinetically_slowest

WORKFLOW = WORKFLOWS / "alanine_dipeptide.yaml"


def test_ramachandran_kl_equals_the_discrete_formula():
    centres = np.linspace(-np.pi, np.pi, 13)[:-1] + np.pi / 12  # bin centres of a 12 x 12 grid
    phi = np.repeat(centres[:3], [10, 20, 30]).astype(float)
    psi = np.zeros_like(phi) + centres[5]
    p = np.array([10, 20, 30]) / 60
    q_counts = np.array([30, 20, 10])
    other_phi = np.repeat(centres[:3], q_counts)
    other_psi = np.zeros_like(other_phi) + centres[5]
    q = q_counts / 60
    assert ramachandran_kl((phi, psi, None), (phi, psi, None), 12) == pytest.approx(0.0, abs=1e-15)
    assert ramachandran_kl((phi, psi, None), (other_phi, other_psi, None), 12) == pytest.approx(
        np.sum(p * np.log(p / q)), rel=1e-12
    )
    # weights act like counts
    weights = np.repeat([3.0, 1.0, 1 / 3], q_counts)
    assert ramachandran_kl((phi, psi, None), (other_phi, other_psi, weights), 12) == pytest.approx(
        np.sum(p * np.log(p / (q * [3, 1, 1 / 3] / np.sum(q * [3, 1, 1 / 3])))), rel=1e-12
    )
    # an empty cell of `other` gets half a sample's share, whatever the weights of the others
    missing = other_phi != centres[2]
    for w in (None, np.where(weights[missing] > 1, 1e-50, 1.0)):
        q_counts = np.histogram(other_phi[missing], bins=centres[:4] - np.pi / 12, weights=w)[0]
        q_empty = np.append(q_counts[:2] / q_counts[:2].sum(), 0.5 / missing.sum())
        q_empty = q_empty / q_empty.sum()
        assert ramachandran_kl((phi, psi, None), (other_phi[missing], other_psi[missing], w), 12) == pytest.approx(
            np.sum(p * np.log(p / q_empty)), rel=1e-12
        )


def test_basin_free_energy_with_and_without_weights():
    phi = np.tile([1.0, -1.0, -2.0, -2.5], 250)  # a quarter in the phi > 0 basin
    result = state_free_energy(phi > 0, None, n_blocks=10)
    assert result.delta_f == pytest.approx(math.log(3)) and result.error == pytest.approx(
        0.0, abs=1e-12
    )  # identical blocks
    weights = np.where(phi > 0, 2.0, 1.0)
    assert state_free_energy(phi > 0, np.log(weights), n_blocks=10).delta_f == pytest.approx(math.log(3 / 2))
    flow = state_free_energy(phi > 0, np.log(weights))  # independent samples: 1/ESS inside + 1/ESS outside
    assert flow.delta_f == pytest.approx(math.log(3 / 2)) and flow.error == pytest.approx(
        math.sqrt(1000 / 999 * (1 / 250 + 1 / 750))
    )


def test_held_out_blocks_are_interleaved():
    mask = held_out(1000, 0.2, 10)
    assert mask.sum() == 200
    blocks = mask.reshape(100, 10)
    assert np.all(blocks.all(1) | ~blocks.any(1))  # whole blocks
    assert np.array_equal(np.flatnonzero(blocks[:, 0]), np.arange(4, 100, 5))
    with pytest.raises(ValueError):
        held_out(100, 1.0, 10)
    with pytest.raises(ValueError, match="validation_block"):
        held_out(200, 0.2, 100)


def test_split_segments_follows_the_labels():
    values = np.arange(10).reshape(5, 2)
    pieces = nct.split_segments(values, np.array([0, 0, 1, 1, 1]))
    assert [p.tolist() for p in pieces] == [[[0, 1], [2, 3]], [[4, 5], [6, 7], [8, 9]]]


@pytest.fixture(scope="module")
def alanine_frames():
    import tempfile

    from openflow.plugins.openmm.md import simulate
    from openflow.systems import alanine_dipeptide

    out = tempfile.mkdtemp()
    run = simulate(alanine_dipeptide(), steps=4000, interval=20, out=out, seed=1, platform="Reference", progress=False)
    return mdtraj.load(str(run.trajectory), top=str(run.topology))


def test_kinetically_slowest_picks_the_rare_switch_over_the_wider_fast_mode():
    # column 0: fast AR(1) noise of standard deviation 3 (the larger spread: a static, variance-based
    # order puts it first); column 1: a two-state telegraph signal (switch probability p per frame)
    # plus noise 0.1, whose state is the phi basin. Exact lag-L autocorrelation of column 1:
    # (1 - 2p)^L / (1 + 0.1^2).
    rng = np.random.default_rng(0)
    n, p, lag = 40000, 0.002, 50
    fast = np.zeros(n)
    for t in range(1, n):
        fast[t] = 0.3 * fast[t - 1] + 3.0 * math.sqrt(1 - 0.09) * rng.standard_normal()
    state = np.cumsum(rng.random(n) < p) % 2 * 2 - 1
    features = np.stack([fast, state + 0.1 * rng.standard_normal(n)], 1)
    phi = np.where(state > 0, 1.0, -1.5) + 0.2 * rng.standard_normal(n)
    train = {"segments": np.zeros(n, dtype=int), "frame_ps": 0.1, "phi": phi, "psi": rng.uniform(-np.pi, np.pi, n)}
    basin = phi > 0
    metrics, values = kinetically_slowest(
        features, train, basin, {"kinetic_lag_ps": lag * 0.1, "mi_neighbours": 3}, "nct"
    )
    assert metrics["auc_nct_kinetic"] > 0.99
    assert abs(metrics["nct_kinetic_weight_q2"]) > 0.99 and abs(metrics["nct_kinetic_weight_q1"]) < 0.05
    exact = (1 - 2 * p) ** lag / 1.01
    assert abs(metrics["nct_kinetic_autocorrelation"] - exact) < 0.1  # ~60 switches: sampling error ~0.03
    assert math.isclose(
        metrics["nct_kinetic_timescale_ps"], -lag * 0.1 / math.log(metrics["nct_kinetic_autocorrelation"])
    )
    assert metrics["mi_nct_kinetic_phi_nats"] > 0.5 and metrics["mi_nct_kinetic_psi_nats"] < 0.05
    assert values.shape == (n,) and abs(np.corrcoef(values, features[:, 1])[0, 1]) > 0.99


def test_latent_interpolation_moves_one_mode_exactly(alanine_frames):
    """Positions along the path, projected and encoded again, have the requested latent values: the
    principal frame and the NCT are inverted exactly (up to float32 of the model)."""
    reference = alanine_frames.atom_slice(alanine_frames.topology.select("not element H"))[0]
    heavy, topology = heavy_positions(alanine_frames, reference)
    frame = nct.principal_frame(heavy, [a.element.mass for a in topology.atoms], 2.494)
    p, q = nct.phase_space(frame, heavy, torch.Generator().manual_seed(0))
    model, _ = nct.train_nct(
        p, q, frame.variances, {"layers": 2, "hidden": [16], "steps": 30, "batch": 64, "lr": 2e-3}, 0, None, False
    )
    positions = nct.latent_interpolation(model, frame, q, mode=1, n_frames=7)
    assert torch.allclose(frame.project(frame.positions(q)), q, atol=1e-10)
    with torch.no_grad():
        latent = model.transform.encode_positions(frame.project(positions).float()).double()
        data_latent = model.transform.encode_positions(q.float()).double()
    index = int(model.slow_modes()[0][1])
    lo, hi = torch.quantile(data_latent[:, index], torch.tensor([0.02, 0.98], dtype=torch.float64))
    assert torch.allclose(
        latent[:, index], torch.linspace(float(lo), float(hi), 7, dtype=torch.float64), atol=2e-3 * float(hi - lo)
    )
    others = [k for k in range(latent.shape[1]) if k != index]
    assert torch.allclose(latent[:, others], data_latent.median(0).values[others].expand(7, -1), atol=2e-3)


def test_generator_factorises_into_a_torus_marginal_and_a_conditional(alanine_frames):
    """With ``bg.marginal`` the generator's density is ``q(phi, psi) q(rest | phi, psi)``: its torus part
    sees mdtraj's phi/psi, and changing only the torus parameters changes ``log q(x)`` by exactly the
    change of ``log q(phi, psi)``."""
    marginal = {"layers": 2, "hidden": [8], "bins": 4}
    x = torch.as_tensor(alanine_frames.xyz.reshape(len(alanine_frames), -1), dtype=torch.float64)
    zmatrix = zmatrix_from_topology(alanine_frames.topology)
    phi_psi_columns = [
        zmatrix.torsion_index(f(alanine_frames[:1])[0][0]) for f in (mdtraj.compute_phi, mdtraj.compute_psi)
    ]

    def build(marginal, coupling="spline"):
        return internal_coordinate_generator(zmatrix, x, coupling, 2, [16], 4, phi_psi_columns, marginal, seed=0)

    model = build(marginal).double()
    generator, columns = marginal_generator(model)
    for parameter in model.parameters():
        parameter.data.normal_(0.0, 0.1)
    internal = model.flow.layers[-1]
    angles = internal.inverse(x[:50])[0][:, columns]
    phi, psi = (
        torch.as_tensor(f(alanine_frames[:50])[1][:, 0], dtype=torch.float64)
        for f in (mdtraj.compute_phi, mdtraj.compute_psi)
    )
    assert torch.allclose(
        torch.cos(angles - torch.stack([phi, psi], 1)), torch.ones(50, 2, dtype=torch.float64), atol=1e-8
    )
    with torch.no_grad():
        before = generator.log_prob(angles)
        conditional = model.log_prob(x[:50]) - before
        for parameter in generator.parameters():
            parameter.add_(0.3)
        changed = generator.log_prob(angles)
        assert (changed - before).abs().min() > 1e-3
        assert torch.allclose(model.log_prob(x[:50]) - changed, conditional, atol=1e-8)
    assert marginal_generator(build(None)) is None
    with pytest.raises(ValueError, match="affine"):
        build(marginal, coupling="affine")


def test_tiny_run_end_to_end(tmp_path):
    overrides = {
        "solvents": ["vacuum"],
        "data": {"mdshare": False, "validation_block": 10, "metadynamics": {"ns": 0.02}, "tempering": {"ns": 0.02}},
        "nct": {"steps": 10},
        "slow_modes": {"interpolation_frames": 5},
        "bg": {
            "mle_steps": 20,
            "eval_every": 10,
            "kl_steps": 4,
            "samples": 400,
            "layers": 2,
            "hidden": [16],
            "marginal": {"mle_steps": 20, "eval_every": 10, "hidden": [8]},
        },
    }
    metrics = run_workflow(WORKFLOW, tmp_path, overrides)
    assert metrics["vacuum_metad_frames"] == 200 and metrics["vacuum_tempering_frames"] == 200
    assert metrics["vacuum_bg_samples"] == 400 and (400 * metrics["vacuum_bg_nonfinite_fraction"]).is_integer()
    assert np.isfinite(metrics["vacuum_bg_nll_validation"]) and np.isfinite(
        metrics["vacuum_bg_marginal_nll_validation_mle"]
    )
    colvar = read_colvar(tmp_path / "vacuum" / "metadynamics" / "COLVAR")  # the MD reference, recomputed from the files
    weights = np.load(tmp_path / "vacuum" / "metadynamics" / "weights.npy")
    md = state_free_energy(phi_states(colvar["phi"]) == 1, np.log(weights), n_blocks=10)
    assert metrics["vacuum_md_delta_f_kT"] == pytest.approx(md.delta_f) and metrics[
        "vacuum_md_delta_f_error_kT"
    ] == pytest.approx(md.error)
    assert metrics["vacuum_bg_delta_f_deviation_kT"] == pytest.approx(metrics["vacuum_bg_delta_f_kT"] - md.delta_f)
    halves = [(colvar["phi"][h], colvar["psi"][h], weights[h]) for h in np.array_split(np.arange(weights.size), 2)]
    assert metrics["vacuum_md_rama_kl_halves"] == pytest.approx(ramachandran_kl(*halves, 24))
    for key in (
        "mi_nct1_psi_nats",
        "mi_nct4_phi_nats",
        "vamp2_tica_lag0.5ps",
        "its_pca_1_lag0.1ps_ps",
        "auc_nct4",
        "interpolation_q1_phi_span_rad",
        "auc_nct_kinetic",
        "mi_nct_kinetic_phi_nats",
        "nct_kinetic_weight_q4",
        "auc_tica_kinetic",
        "tica_kinetic_timescale_ps",
    ):
        assert f"vacuum_{key}" in metrics
    for name in (
        "slow_modes.png",
        "interpolation_q1.pdb",
        "interpolation_q2.dcd",
        "bg/ramachandran_flow_reweighted.png",
        "bg/generator.pt",
        "metadynamics/COLVAR",
        "tempering/trajectory.dcd",
    ):
        assert (tmp_path / "vacuum" / name).exists(), name
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "config.yaml").exists()
    again = run_workflow(WORKFLOW, tmp_path, overrides)  # both data sets are reused
    assert again["vacuum_time_data_s"] < metrics["vacuum_time_data_s"]
    with pytest.raises(ValueError, match="kinetic_modes"):
        run_workflow(WORKFLOW, tmp_path, {**overrides, "slow_modes": {"kinetic_modes": 0}})


def test_unknown_solvent_is_refused(tmp_path):
    with pytest.raises(ValueError, match="solvents"):
        run_workflow(WORKFLOW, tmp_path, {"solvents": ["water"], "data": {"mdshare": False}})
