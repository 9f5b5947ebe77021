"""Metadynamics with openmm.app.Metadynamics: a short biased run of alanine dipeptide with an exported
learned CV (bias deposited, COLVAR columns against torch/mdtraj, continuation), the well-tempered
FES formula and the reweighting constant c(t) against closed forms, and the COLVAR reporter."""

import json

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest
import torch
from helpers import WORKFLOWS
from scipy.special import i0

from openflow import analysis
from openflow.cli import main
from openflow.cv import CVModel
from openflow.features import distance_features
from openflow.plugins.openmm.bias import (
    fes_from_bias,
    fes_state_delta_f,
    learned_bias_variables,
    reweighting_constant,
    torsion_bias_variables,
)
from openflow.plugins.openmm.export import save_cv_force, to_custom_cv_force
from openflow.plugins.openmm.metadynamics import run_metadynamics
from openflow.plugins.openmm.reporters import read_colvar
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, backbone_torsions, phi_psi_observables, phi_states

STEPS, INTERVAL, FREQUENCY = 3000, 50, 100


@pytest.fixture(scope="module")
def ala():
    return alanine_dipeptide()


def phi_psi_bias_variables(system, width: float = 0.35):
    torsions = backbone_torsions(system)
    return torsion_bias_variables([torsions["phi"][0], torsions["psi"][0]], width=width)


@pytest.fixture(scope="module")
def learned_cv(ala):
    """A seeded 45 distances -> 4 tanh -> 1 CV (exported as a Lepton CustomCVForce), standardised on the
    start structure's scale."""
    cv = CVModel(distance_features(ala), hidden=(4,), seed=3).double()
    with torch.no_grad():
        cv.std.fill_(0.02)  # distances move ~0.02 nm: a CV that changes on this scale
        cv.mean.copy_(
            cv.features(torch.as_tensor(ala.positions.value_in_unit(unit.nanometer), dtype=torch.float64)[None])[0]
        )
    return cv


@pytest.fixture(scope="module")
def run(ala, learned_cv, tmp_path_factory):
    out = tmp_path_factory.mktemp("metad")
    lo, hi = (float(v[0]) for v in learned_cv.bounds())
    variables = learned_bias_variables([learned_cv], width=(hi - lo) / 100)
    first = run_metadynamics(
        ala,
        variables,
        steps=STEPS,
        out=out / "first",
        height=2.0,
        bias_factor=5.0,
        frequency=FREQUENCY,
        interval=INTERVAL,
        platform="Reference",
        seed=11,
        observables=phi_psi_observables(),
        progress=False,
    )
    second = run_metadynamics(
        ala,
        variables,
        steps=1000,
        out=out / "second",
        height=2.0,
        bias_factor=5.0,
        frequency=FREQUENCY,
        interval=INTERVAL,
        platform="Reference",
        seed=12,
        progress=False,
        continue_from=out / "first",
    )
    return first, second, variables


def test_colvar_header_columns_and_values(run, learned_cv):
    first, _, _ = run
    header = first.files["colvar"].read_text().splitlines()[0]
    assert header == "#! FIELDS time cv1 bias phi psi"
    data = read_colvar(first.files["colvar"])
    assert len(data["time"]) == STEPS // INTERVAL
    assert np.allclose(data["time"], INTERVAL * first.timestep_ps * np.arange(1, STEPS // INTERVAL + 1), atol=1e-9)
    frames = mdtraj.load(str(first.files["trajectory"]), top=str(first.files["topology"]))
    assert frames.n_frames == STEPS // INTERVAL
    phi = mdtraj.compute_phi(frames)[1][:, 0]
    psi = mdtraj.compute_psi(frames)[1][:, 0]
    assert np.abs(np.angle(np.exp(1j * (data["phi"] - phi)))).max() < 1e-3  # DCD holds float32 positions
    assert np.abs(np.angle(np.exp(1j * (data["psi"] - psi)))).max() < 1e-3
    with torch.no_grad():
        expected = learned_cv(torch.as_tensor(frames.xyz, dtype=torch.float64))[:, 0].numpy()
    assert np.abs(data["cv1"] - expected).max() < 1e-2 * (1 + np.abs(expected).max())


def test_bias_is_deposited_and_grows(run):
    first, _, _ = run
    bias = np.load(first.files["bias"])["bias_kjmol"]
    assert bias.max() > 0 and abs(bias.min()) < 1e-9 * bias.max()  # Gaussians where the run went, zero far from it
    column = read_colvar(first.files["colvar"])["bias"]
    assert column[0] == 0.0  # the first row (step 50) comes before the first Gaussian (step 100)
    half = column.size // 2
    assert column[half:].mean() > column[:half].mean() > 0
    # the grid holds one Gaussian per deposit, each of height <= 2 kJ/mol
    assert bias.max() <= 2.0 * STEPS // FREQUENCY + 1e-9
    weights = np.load(first.files["weights"])
    assert weights.shape == column.shape and weights.sum() == pytest.approx(1.0)


def test_continuation_keeps_and_adds_to_the_bias(run):
    first, second, _ = run
    before = np.load(first.files["bias"])["bias_kjmol"]
    after = np.load(second.files["bias"])["bias_kjmol"]
    assert after.shape == before.shape
    assert (after >= before - 1e-9).all() and after.sum() > before.sum()
    start = read_colvar(second.files["colvar"])["time"][0]
    assert start == pytest.approx(read_colvar(first.files["colvar"])["time"][-1] + INTERVAL * first.timestep_ps)


def test_bad_continuations_are_refused(run, ala):
    first, _, _ = run
    with pytest.raises(ValueError, match="differ"):
        run_metadynamics(
            ala,
            phi_psi_bias_variables(ala),
            steps=100,
            interval=10,
            out=first.out.parent / "other",
            platform="Reference",
            seed=1,
            progress=False,
            continue_from=first.out,
        )
    with pytest.raises(ValueError, match="new folder"):
        run_metadynamics(
            ala,
            run[2],
            steps=100,
            interval=10,
            out=first.out,
            platform="Reference",
            seed=1,
            progress=False,
            continue_from=first.out,
        )


def test_phi_psi_bias_lands_where_the_run_was(ala, tmp_path):
    """The bias grid is indexed [phi, psi]: its maximum sits at the visited (phi, psi)."""
    result = run_metadynamics(
        ala,
        phi_psi_bias_variables(ala, width=0.3),
        steps=1000,
        out=tmp_path,
        frequency=100,
        interval=100,
        platform="Reference",
        seed=4,
        observables=phi_psi_observables(),
        progress=False,
    )
    grid = np.load(result.files["bias"])
    i, j = np.unravel_index(grid["bias_kjmol"].argmax(), grid["bias_kjmol"].shape)
    data = read_colvar(result.files["colvar"])
    mean_phi = np.angle(np.exp(1j * data["phi"]).mean())
    mean_psi = np.angle(np.exp(1j * data["psi"]).mean())
    assert abs(np.angle(np.exp(1j * (grid["axis_0"][i] - mean_phi)))) < 0.5
    assert abs(np.angle(np.exp(1j * (grid["axis_1"][j] - mean_psi)))) < 0.5


def test_fes_from_bias_is_the_well_tempered_formula():
    s = np.linspace(-2, 2, 101)
    free_energy = 3.0 * (s**2 - 1) ** 2  # a double well, kJ/mol
    gamma = 8.0
    bias = -(gamma - 1) / gamma * free_energy  # the converged well-tempered bias, up to a constant
    assert np.allclose(fes_from_bias(bias + 7.0, gamma), free_energy - free_energy.min(), atol=1e-12)
    with pytest.raises(ValueError):
        fes_from_bias(bias, 1.0)


def test_reweighting_constant_closed_forms():
    kT, gamma = 2.5, 6.0
    assert reweighting_constant(np.full((7, 9), 4.0), gamma, kT, periodic=False) == pytest.approx(4.0, abs=1e-12)
    # V(s) = A cos(s) on a periodic grid: c = kT ln(I0(a gamma/(gamma-1)) / I0(a/(gamma-1))), a = A/kT
    amplitude = 3.0
    s = np.linspace(-np.pi, np.pi, 201)  # periodic grid: the last point repeats the first
    a = amplitude / kT
    exact = kT * np.log(i0(a * gamma / (gamma - 1)) / i0(a / (gamma - 1)))
    assert reweighting_constant(amplitude * np.cos(s), gamma, kT, periodic=True) == pytest.approx(exact, abs=1e-10)


def test_bad_inputs(ala):
    with pytest.raises(ValueError, match="bias_factor"):
        run_metadynamics(ala, phi_psi_bias_variables(ala), steps=10, out="unused", bias_factor=1.0, progress=False)
    with pytest.raises(ValueError, match="ranges"):
        learned_bias_variables([phi_psi_bias_variables(ala)[0].force], width=0.1)
    with pytest.raises(ValueError, match="1 to 3"):
        learned_bias_variables([], width=0.1)


def test_delta_f_convergence_matches_state_populations():
    rng = np.random.default_rng(0)
    phi = rng.uniform(-np.pi, np.pi, 1000)
    log_w = rng.normal(size=1000)
    ends, delta = analysis.delta_f_convergence(phi_states(phi) == 1, log_w, n_points=4)
    assert ends.tolist() == [250, 500, 750, 1000]
    for end, value in zip(ends, delta):
        expected = analysis.state_populations(phi_states(phi[:end]) == 1, weights=np.exp(log_w[:end]))["delta_f_kT"]
        assert value == pytest.approx(expected, abs=1e-12)


def test_state_delta_f_from_a_known_fes():
    kT, lift = 2.5, 4.0  # kJ/mol: the phi > 0 basin lies 4 kJ/mol higher, flat elsewhere
    phi = np.linspace(-np.pi, np.pi, 73)  # periodic grid, last point = first
    positive = phi_states(phi[:-1]) == 1
    free_energy = np.where(phi_states(phi) == 1, lift, 0.0)[:, None] * np.ones((1, 11))
    expected = np.log((~positive).sum()) - np.log(positive.sum() * np.exp(-lift / kT))
    assert fes_state_delta_f(free_energy, phi_states(phi) == 1, kT, periodic=True) == pytest.approx(expected, abs=1e-12)


def test_metad_command_with_an_xml_cv(tmp_path, learned_cv):
    path = save_cv_force(to_custom_cv_force(learned_cv), tmp_path / "cv.xml")
    assert (
        main(
            ["metad", "--system", "alanine_dipeptide", "--cv", str(path), "--steps", "10", "--out", str(tmp_path / "o")]
        )
        == 2
    )  # no --cv-range
    lo, hi = (float(v[0]) for v in learned_cv.bounds())
    status = main(
        [
            "metad",
            "--system",
            "alanine_dipeptide",
            "--cv",
            str(path),
            "--cv-range",
            str(lo),
            str(hi),
            "--steps",
            "400",
            "--interval",
            "50",
            "--frequency",
            "50",
            "--platform",
            "Reference",
            "--seed",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert status == 0
    data = read_colvar(tmp_path / "run" / "COLVAR")
    assert data["cv1"].size == 8 and data["bias"].max() > 0
    assert (tmp_path / "run" / "rama.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("source", ["learned", "stand_in"])
def test_workflow_smoke(tmp_path, source):
    """The workflow end to end at toy length, with the CV learned by the learned-CV loop's first round or
    the stand-in: every run writes its files, metrics agree with the COLVARs."""
    from openflow.workflows import run as run_workflow

    overrides = {
        "md": {"ns": 0.004, "interval": 100, "platform": "Reference", "equilibration_steps": 100},
        "metad": {"frequency": 100},
        "cv": {"source": source, "epochs": 5, "features": "phi_psi"},
        "learn": {
            "data": {"ns": 0.02, "interval": 100, "platform": "Reference"},
            "nct": {"steps": 4, "batch": 64, "hidden": [8], "layers": 2},
            "epochs": 3,
        },
        "speed": {"steps": 200, "repeats": 1},
        "progress": False,
    }
    metrics = run_workflow(WORKFLOWS / "metadynamics.yaml", tmp_path, overrides)
    if source == "learned":
        assert (tmp_path / "learn" / "cv.xml").is_file() and metrics["nct_steps_trained"] == 4
        assert metrics["nct_steps"] in (0, 1, 2, 3, 4) and len(metrics["nct_check_autocorrelations"]) == 5
        assert metrics["cv_export_max_value_error"] < 1e-10 and metrics["cv_export_method"] == "lepton"
    else:
        assert metrics["learned_cv_export_method"] == "table"
    for name in ("unbiased", "phipsi", "learned"):
        phi = read_colvar(tmp_path / name / "COLVAR")["phi"]
        assert phi.size == 40
        assert metrics[f"{name}_transitions"] == analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN))
        assert (tmp_path / f"rama_{name}.png").exists()
    assert metrics["phipsi_speed_relative_to_bare_md"] == pytest.approx(
        metrics["phipsi_bare_md_us_per_step"] / metrics["phipsi_biased_us_per_step"]
    )


@pytest.mark.parametrize(
    "cv, message", [({"source": "flow"}, "cv.source must be"), ({"source": "xml"}, "needs cv.xml")]
)
def test_workflow_refuses_a_bad_cv_source_before_any_md(tmp_path, cv, message):
    from openflow.workflows import run as run_workflow

    with pytest.raises(ValueError, match=message):
        run_workflow(WORKFLOWS / "metadynamics.yaml", tmp_path, {"cv": cv, "progress": False})
    assert not (tmp_path / "unbiased").exists()


def test_workflow_reads_one_or_several_xml_cvs(tmp_path, learned_cv, ala):
    from openflow.workflows.metadynamics import xml_cvs

    paths = [save_cv_force(to_custom_cv_force(learned_cv), tmp_path / f"cv{k}.xml") for k in range(2)]
    forces, ranges = xml_cvs(str(paths[0]), [-1, 2])
    assert len(forces) == 1 and ranges == [(-1.0, 2.0)]
    forces, ranges = xml_cvs([str(p) for p in paths], [[-1, 2], [0, 3.5]])
    assert len(forces) == 2 and ranges == [(-1.0, 2.0), (0.0, 3.5)]
    variables = learned_bias_variables(forces, [0.1, 0.2], 20, ranges)  # two non-periodic axes
    assert [(v.minValue, v.maxValue, v.biasWidth, v.periodic) for v in variables] == [
        (-1.0, 2.0, 0.1, False),
        (0.0, 3.5, 0.2, False),
    ]
    for paths_, range_ in (
        ([str(p) for p in paths], [-1, 2]),
        (str(paths[0]), None),
        ([str(paths[0])] * 4, [[0, 1]] * 4),
    ):
        with pytest.raises(ValueError, match="cv.range"):
            xml_cvs(paths_, range_)


def test_a_used_folder_is_refused_or_emptied_never_silently_continued(ala, learned_cv, tmp_path):
    """OpenMM's Metadynamics loads every bias file in its folder: a second run into the same folder must
    not start from the first run's bias unless asked (continue_from)."""
    lo, hi = (float(v[0]) for v in learned_cv.bounds())
    variables = learned_bias_variables([learned_cv], width=(hi - lo) / 100)
    options = dict(
        steps=400,
        out=tmp_path / "m",
        height=2.0,
        bias_factor=5.0,
        frequency=50,
        interval=50,
        platform="Reference",
        progress=False,
    )
    first = run_metadynamics(ala, variables, seed=1, **options)
    assert read_colvar(first.files["colvar"])["bias"][0] == 0.0 and np.load(first.files["bias"])["bias_kjmol"].max() > 0
    with pytest.raises(FileExistsError, match="earlier metadynamics run"):
        run_metadynamics(ala, variables, seed=2, **options)
    second = run_metadynamics(ala, variables, seed=2, overwrite=True, **options)
    assert read_colvar(second.files["colvar"])["bias"][0] == 0.0  # a fresh bias: no Gaussian before the first deposit
    assert len(list(second.files["bias_dir"].glob("bias_*.npy"))) == 1  # only this run's bias file
    settings = json.loads(second.files["settings"].read_text())["settings"]
    assert settings["continue_from"] is None and settings["seed"] == 2
    again = run_metadynamics(ala, variables, seed=2, reuse=True, **options)  # the same settings: the finished run
    assert again.files["trajectory"].stat().st_mtime_ns == second.files["trajectory"].stat().st_mtime_ns
    np.testing.assert_array_equal(again.log_weights, second.log_weights)
    out = str(tmp_path / "cli")
    command = [
        "metad",
        "--system",
        "alanine_dipeptide",
        "--cv",
        "phi-psi",
        "--steps",
        "100",
        "--interval",
        "50",
        "--frequency",
        "50",
        "--platform",
        "Reference",
        "--seed",
        "3",
        "--no-progress",
        "--out",
        out,
    ]
    assert main(command) == 0 and main(command) == 2 and main([*command, "--overwrite"]) == 0


class _Fail:
    """A reporter that fails like a blown-up simulation after ``at`` steps."""

    def __init__(self, at):
        self.at = at

    def describeNextReport(self, simulation):
        return {"steps": self.at - simulation.currentStep, "periodic": None, "include": []}

    def report(self, simulation, state):
        raise RuntimeError("particle coordinate is NaN")


def test_a_failed_run_leaves_no_folder_behind(ala, tmp_path):
    with pytest.raises(RuntimeError, match="NaN"):
        run_metadynamics(
            ala,
            phi_psi_bias_variables(ala),
            steps=200,
            interval=50,
            frequency=50,
            out=tmp_path / "failed",
            platform="Reference",
            seed=1,
            reporters=[_Fail(at=120)],
            progress=False,
        )
    assert not (tmp_path / "failed").exists()
