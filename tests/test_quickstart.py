"""The quickstart workflow end to end at tiny scale: every file is written, each exported output of the
two-mode CV equals torch, and the biased run's COLVAR is that CV on the saved frames."""

import json

import mdtraj
import numpy as np
import pytest
import torch
import yaml
from helpers import WORKFLOWS

from openflow import analysis, estimators, nct
from openflow.plugins.openmm.export import VALUE_TOLERANCE, check_export, load_cv_force
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, phi_states
from openflow.workflows import run
from openflow.workflows.quickstart import DEFAULTS, cv_model, fit_and_export

TINY = {
    "data": {"ns": 0.02, "interval": 100, "platform": "Reference"},  # 200 frames
    "nct": {"steps": 4, "batch": 64, "hidden": [8], "layers": 2},
    "cv": {"hidden": [8], "epochs": 3, "export_frames": 20},
    "metad": {"ns": 0.01, "interval": 100, "frequency": 100, "platform": "Reference"},  # 10000 steps, 100 Gaussians
    "speed": {"steps": 200, "repeats": 1},
    "progress": False,
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run(WORKFLOWS / "quickstart.yaml", out, TINY)


def _trained_cv(out):
    config = yaml.safe_load((out / "config.yaml").read_text())
    cv = cv_model(alanine_dipeptide(), config)
    cv.load_state_dict(torch.load(out / "cv.pt"))
    return cv


def test_every_file_is_written(tiny_run):
    out, metrics = tiny_run
    for name in (
        "config.yaml",
        "metrics.json",
        "md/trajectory.dcd",
        "md/topology.pdb",
        "nct/checkpoint.pt",
        "cv_q1.xml",
        "cv_q2.xml",
        "cv.pt",
        "metadynamics/trajectory.dcd",
        "metadynamics/topology.pdb",
        "metadynamics/COLVAR",
        "metadynamics/weights.npy",
    ):
        assert (out / name).is_file(), name
    assert (out / "ramachandran.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["frames"] == 200  # 0.02 ns at 1 fs, a frame every 100 steps
    assert saved["nct_steps"] == 4
    assert saved["nct_omega_1_per_ps"] <= saved["nct_omega_2_per_ps"] <= saved["nct_omega_4_per_ps"]
    assert saved["cv_features"] == "torsions" and saved["cv_export_method"] == "table"
    assert saved["metad_speed_relative_to_bare_md"] == pytest.approx(
        saved["bare_md_us_per_step"] / saved["metad_biased_us_per_step"]
    )
    assert all(
        saved[f"time_{stage}_s"] > 0 for stage in ("simulate", "train_nct", "fit_export_cv", "metadynamics", "plot")
    )


def test_saved_cv_forces_equal_torch_on_biased_frames(tiny_run):
    out, metrics = tiny_run
    assert metrics["cv_export_max_value_error"] <= VALUE_TOLERANCE
    frames = mdtraj.load(str(out / "metadynamics/trajectory.dcd"), top=str(out / "metadynamics/topology.pdb"))
    cv = _trained_cv(out)
    assert cv.n_out == 2
    for k in range(2):
        report = check_export(cv, load_cv_force(out / f"cv_q{k + 1}.xml"), frames.xyz, output=k)  # raises when off
        assert report["n_frames"] == frames.n_frames == 100


def test_metadynamics_biased_both_exported_outputs(tiny_run):
    out, metrics = tiny_run
    colvar = read_colvar(out / "metadynamics/COLVAR")
    frames = mdtraj.load(str(out / "metadynamics/trajectory.dcd"), top=str(out / "metadynamics/topology.pdb"))
    with torch.no_grad():
        values = _trained_cv(out)(torch.as_tensor(frames.xyz, dtype=torch.float64)).numpy()
    for k in range(2):
        np.testing.assert_allclose(
            colvar[f"q{k + 1}"], values[:, k], atol=1e-4
        )  # COLVAR is written in text, DCD in float32
    assert colvar["bias"][-1] > 0  # Gaussians were deposited
    bias = np.load(out / "metadynamics/bias.npz")
    assert bias["bias_kjmol"].shape == (DEFAULTS["metad"]["grid"],) * 2  # one axis per mode
    for k in range(2):  # each axis spans the CV's guaranteed range
        axis = bias[f"axis_{k}"]
        assert axis[0] == pytest.approx(metrics[f"cv_lo_q{k + 1}"]) and axis[-1] == pytest.approx(
            metrics[f"cv_hi_q{k + 1}"]
        )
    weights = np.load(out / "metadynamics/weights.npy")
    assert metrics["metad_transitions"] == analysis.count_transitions(phi_states(colvar["phi"], PHI_CORE_MARGIN))
    assert metrics["metad_ess_fraction"] == pytest.approx(estimators.effective_sample_size(np.log(weights)), rel=1e-9)


def test_distance_features_export_through_lepton(tiny_run, tmp_path):
    out, _ = tiny_run
    frames = mdtraj.load(str(out / "md/trajectory.dcd"), top=str(out / "md/topology.pdb"))[:80]
    config = {"seed": 0, "cv": dict(DEFAULTS["cv"], features="distances", hidden=[4], epochs=2, export_frames=10)}
    xyz = torch.as_tensor(frames.xyz, dtype=torch.float64)
    targets = torch.stack([xyz[:, 4] - xyz[:, 14], xyz[:, 6] - xyz[:, 16]], 1).norm(dim=-1)  # any smooth (80, 2) target
    forces, ranges, stds, metrics, files = fit_and_export(alanine_dipeptide(), frames, targets, config, tmp_path)
    assert metrics["cv_features"] == "distances" and metrics["cv_export_method"] == "lepton"
    assert metrics["cv_export_frames"] == 10 and metrics["cv_export_max_value_error"] <= VALUE_TOLERANCE
    cv = cv_model(alanine_dipeptide(), config)
    cv.load_state_dict(torch.load(files["cv_model"]))
    with torch.no_grad():
        values = cv(xyz).numpy()
    for k in range(2):
        assert ranges[k][0] <= values[:, k].min() and values[:, k].max() <= ranges[k][1]
        assert stds[k] == pytest.approx(values[:, k].std(ddof=1))
        check_export(cv, load_cv_force(files[f"cv_q{k + 1}_xml"]), frames.xyz[::8], output=k)


def test_slowest_modes_are_the_smallest_frequency_latent_positions(tmp_path):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(64, 24, generator=generator, dtype=torch.float64) * torch.linspace(
        1.0, 0.1, 24, dtype=torch.float64
    )
    p = torch.randn(64, 24, generator=generator, dtype=torch.float64)
    settings = dict(DEFAULTS["nct"], steps=2, batch=32, hidden=[8], layers=2)
    model, _ = nct.train_nct(p, q, q.var(0), settings, 0, tmp_path, progress=False)
    modes = nct.latent_modes(model, q, 3)
    assert modes.shape == (64, 3) and modes.dtype == torch.float64
    assert torch.equal(modes[:, 0], nct.latent_modes(model, q, 1)[:, 0])
    order = torch.argsort(model.prior.omega.detach())[:3]  # the three smallest learned frequencies
    with torch.no_grad():
        latent = model.transform.encode_positions(q.to(nct.NCT_DTYPE))
    torch.testing.assert_close(modes, latent[:, order].double())


def test_bad_settings_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="temperature_K"):
        run(WORKFLOWS / "quickstart.yaml", tmp_path, {"data": {"temperature_K": -5.0}, "progress": False})
    config = {"seed": 0, "cv": dict(DEFAULTS["cv"], features="cartesian")}
    with pytest.raises(ValueError, match="cv.features"):
        cv_model(alanine_dipeptide(), config)
    with pytest.raises(ValueError, match="cv.modes"):
        cv_model(alanine_dipeptide(), {"seed": 0, "cv": dict(DEFAULTS["cv"], modes=4)})


def test_a_rerun_reuses_every_finished_stage(tiny_run):
    """The same settings on the same folder: MD, the NCT, the CV and the metadynamics run are all reused
    (nothing is retrained or simulated again), and the metrics are the same."""
    out, metrics = tiny_run
    watched = [
        "md/trajectory.dcd",
        "nct/checkpoint.pt",
        "nct/metrics.jsonl",
        "cv_q1.xml",
        "metadynamics/trajectory.dcd",
        "metadynamics/COLVAR",
    ]
    stamps = {name: (out / name).stat().st_mtime_ns for name in watched}
    again = run(WORKFLOWS / "quickstart.yaml", out, TINY)
    assert {name: (out / name).stat().st_mtime_ns for name in watched} == stamps
    for key, value in metrics.items():
        if not key.startswith(("time_", "wall_time", "metad_speed", "bare_md", "metad_biased")):
            np.testing.assert_equal(again[key], value, err_msg=key)  # NaN (an empty basin) equals NaN
