"""The quickstart (the README's first command) is a short run of the learned-CV loop on alanine dipeptide:
at tiny scale every file is written, the biased run's COLVAR is the exported CV on the saved frames, no
phi/psi enters the learning, and a rerun reuses every finished stage."""

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_LOOP, WORKFLOWS

from openflow import analysis
from openflow.cv import CVModel
from openflow.data import load_trajectory
from openflow.features import distance_features
from openflow.plugins.openmm.export import check_export, load_cv_force
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, phi_states
from openflow.workflows import run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run(WORKFLOWS / "quickstart.yaml", out, TINY_LOOP)


def test_every_file_is_written(tiny_run):
    out, metrics = tiny_run
    for name in (
        "config.yaml",
        "metrics.json",
        "curves.json",
        "round0/trajectory.dcd",
        "round1/nct/checkpoint.pt",
        "round1/cv.xml",
        "round1/cv.pt",
        "round1/metadynamics/COLVAR",
        "production/trajectory.dcd",
        "production/topology.pdb",
        "production/weights.npy",
        "production/COLVAR",
        "production/cv.xml",
    ):
        assert (out / name).is_file(), name
    for name in ("ramachandran.png", "delta_f_rounds.png", "delta_f_convergence.png", "cv_vs_phi.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["features"] == "distances" and saved["n_features"] == 45 and saved["energy_rigid_invariant"]
    assert (
        saved["round1_nct_steps_trained"] == 4 and saved["round1_frames"] == 200
    )  # 0.02 ns at 1 fs, a frame every 100 steps
    assert saved["biased_ns_total"] == pytest.approx(0.02) and saved["production_frame_ps"] == pytest.approx(0.1)
    assert saved["reference_delta_f_kT"] == 3.52  # the reference of the system it names
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["workflow"] == "learned_cv" and config["report"]["compare"] is False


def test_the_learning_sees_no_phi_psi(tiny_run):
    """The CV is a function of the 45 heavy-atom distances: its torch twin (the saved state) reproduces
    the biased run's COLVAR on the saved frames, and the exported force equals torch on them."""
    out, metrics = tiny_run
    cv = CVModel(distance_features(alanine_dipeptide()), hidden=(1,), n_out=1).double()
    cv.load_state_dict(torch.load(out / "round1" / "cv.pt"))
    frames = load_trajectory(out / "production" / "trajectory.dcd", out / "production" / "topology.pdb")
    colvar = read_colvar(out / "production" / "COLVAR")
    with torch.no_grad():
        values = cv(torch.as_tensor(frames.xyz, dtype=torch.float64))[:, 0].numpy()
    np.testing.assert_allclose(colvar["cv"], values, atol=1e-4)  # COLVAR is text, the DCD float32
    check_export(cv, load_cv_force(out / "production" / "cv.xml"), frames.xyz)  # raises when off
    weights = np.load(out / "production" / "weights.npy")
    assert weights.shape == colvar["cv"].shape and weights.sum() == pytest.approx(1.0)
    assert metrics["production_phi_transitions"] == analysis.count_transitions(
        phi_states(colvar["phi"], PHI_CORE_MARGIN)
    )


def test_a_rerun_reuses_every_finished_stage(tiny_run):
    """The same settings on the same folder: MD, the NCT, the CV and the metadynamics runs are all reused
    (nothing is retrained or simulated again), and the metrics are the same."""
    out, metrics = tiny_run
    watched = [
        "round0/trajectory.dcd",
        "round1/nct/checkpoint.pt",
        "round1/nct/metrics.jsonl",
        "round1/cv.xml",
        "round1/metadynamics/trajectory.dcd",
        "production/COLVAR",
    ]
    stamps = {name: (out / name).stat().st_mtime_ns for name in watched}
    again = run(WORKFLOWS / "quickstart.yaml", out, TINY_LOOP)
    assert {name: (out / name).stat().st_mtime_ns for name in watched} == stamps
    for key, value in metrics.items():
        if not key.startswith(("wall_time", "speed_relative")):
            np.testing.assert_equal(again[key], value, err_msg=key)  # NaN (an empty basin) equals NaN


def test_bad_settings_are_refused_before_any_work(tmp_path):
    for overrides, message in (
        ({"round0": {"temperature_K": -5.0}}, "round0.temperature_K must be a positive number"),
        ({"features": "phi_psi"}, "features must be one of"),
        ({"rounds": {"min": 3, "max": 2}}, "rounds.min"),
        ({"metad": {"bias_factor": 1.0}}, "bias_factor"),
    ):
        with pytest.raises(ValueError, match=message):
            run(WORKFLOWS / "quickstart.yaml", tmp_path, {**overrides, "progress": False})
    assert not (tmp_path / "round0").exists()
