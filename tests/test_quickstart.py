"""The quickstart workflow end to end at tiny scale: every file is written, the exported CV equals
torch, and the biased run's COLVAR is that CV on the saved frames."""
import json

import mdtraj
import numpy as np
import pytest
import torch

from openflow.cv import CVModel
from openflow.features import heavy_atom_distance_features
from openflow.plugins.openmm.export import VALUE_TOLERANCE, check_export, load_cv_force
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.workflows import run

TINY = {
    "data": {"ns": 0.02, "interval": 100, "platform": "Reference"},  # 200 frames
    "nct": {"steps": 4, "batch": 64, "hidden": [8], "layers": 2},
    "cv": {"hidden": [8], "epochs": 3, "export_frames": 20},
    "metad": {"ns": 0.01, "interval": 100, "frequency": 100, "platform": "Reference"},  # 10000 steps, 100 Gaussians
    "progress": False,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run("workflows/quickstart.yaml", out, TINY)


def test_every_file_is_written(tiny_run):
    out, metrics = tiny_run
    for name in ("config.yaml", "metrics.json", "md/trajectory.dcd", "md/topology.pdb", "nct/checkpoint.pt", "cv.xml",
                 "cv.pt", "metadynamics/trajectory.dcd", "metadynamics/topology.pdb", "metadynamics/COLVAR",
                 "metadynamics/weights.npy"):
        assert (out / name).is_file(), name
    assert (out / "ramachandran.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["frames"] == 200  # 0.02 ns at 1 fs, a frame every 100 steps
    assert saved["nct_steps"] == 4
    assert saved["nct_omega_1_per_ps"] <= saved["nct_omega_2_per_ps"] <= saved["nct_omega_4_per_ps"]
    assert all(saved[f"time_{stage}_s"] > 0 for stage in ("simulate", "train_nct", "fit_export_cv", "metadynamics", "plot"))


def _trained_cv(out):
    cv = CVModel(heavy_atom_distance_features(alanine_dipeptide()), hidden=TINY["cv"]["hidden"]).double()
    cv.load_state_dict(torch.load(out / "cv.pt"))
    return cv


def test_saved_cv_force_equals_torch_on_biased_frames(tiny_run):
    out, metrics = tiny_run
    assert metrics["cv_export_max_value_error"] <= VALUE_TOLERANCE
    frames = mdtraj.load(str(out / "metadynamics/trajectory.dcd"), top=str(out / "metadynamics/topology.pdb"))
    report = check_export(_trained_cv(out), load_cv_force(out / "cv.xml"), frames.xyz)  # raises when off
    assert report["n_frames"] == frames.n_frames == 100


def test_metadynamics_biased_the_exported_cv(tiny_run):
    out, metrics = tiny_run
    colvar = read_colvar(out / "metadynamics/COLVAR")
    frames = mdtraj.load(str(out / "metadynamics/trajectory.dcd"), top=str(out / "metadynamics/topology.pdb"))
    with torch.no_grad():
        values = _trained_cv(out)(torch.as_tensor(frames.xyz, dtype=torch.float64))[:, 0].numpy()
    np.testing.assert_allclose(colvar["q1"], values, atol=1e-4)  # COLVAR is written in text, DCD in float32
    assert colvar["bias"][-1] > 0  # Gaussians were deposited
    assert metrics["metad_transitions"] >= 0 and np.isfinite(metrics["metad_effective_sample_size"])


def test_unphysical_temperature_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="temperature_K"):
        run("workflows/quickstart.yaml", tmp_path, {"data": {"temperature_K": -5.0}, "progress": False})
