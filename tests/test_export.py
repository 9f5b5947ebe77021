"""CV models (bounds, fitting) and their export as CustomCVForce: values and forces against torch on
real alanine dipeptide frames, platforms, XML round trip, the CV limit, and a check that can fail."""

import copy

import mdtraj
import numpy as np
import openmm
import pytest
import torch

from openflow.cv import CVModel, fit_cv, r2_score
from openflow.features import Angles, Dihedrals, Distances, FeatureSet, atom_pairs
from openflow.plugins.openmm.export import (
    MAX_CVS,
    ExportMismatchError,
    check_export,
    export_cv,
    load_cv_force,
    openmm_cv_values_and_forces,
    save_cv_force,
    to_custom_cv_force,
    to_tabulated_cv_force,
)
from openflow.plugins.openmm.md import simulate
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import backbone_torsions

PLATFORMS = ["Reference", "CPU", "CUDA"]


@pytest.fixture(scope="module")
def ala():
    return alanine_dipeptide()


@pytest.fixture(scope="module")
def frames(ala, tmp_path_factory) -> torch.Tensor:
    """Real MD frames (300 steps) and their mirror images (phi of both signs), ``(B, 22, 3)`` nm float64."""
    out = tmp_path_factory.mktemp("md")
    result = simulate(
        ala, steps=300, interval=10, out=out, seed=5, platform="Reference", equilibration_steps=100, progress=False
    )
    xyz = torch.as_tensor(mdtraj.load(str(result.trajectory), top=str(result.topology)).xyz, dtype=torch.float64)
    return torch.cat([xyz, xyz * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)])


def _features(ala, kind: str) -> FeatureSet:
    torsions = backbone_torsions(ala)
    return FeatureSet(
        {
            "distances": lambda: [Distances(atom_pairs(ala))],
            "dihedrals": lambda: [Dihedrals(torsions["phi"] + torsions["psi"])],
            "mixed": lambda: [
                Distances(atom_pairs(ala)[:12]),
                Angles([(4, 6, 8), (6, 8, 14)]),
                Dihedrals(torsions["phi"]),
            ],
        }[kind]()
    )


def _random_cv(ala, frames, kind="distances", hidden=(16,), scale=3.0, seed=0, standardize=True, **kwargs) -> CVModel:
    """A seeded CV, standardised on the frames, weights scaled so the activations are far from linear."""
    cv = CVModel(_features(ala, kind), hidden=hidden, seed=seed, **kwargs).double()
    if standardize:
        cv.set_standardization(frames)
    with torch.no_grad():
        for layer in cv.layers:
            layer.weight.mul_(scale)
    return cv


def _require(platform: str) -> None:
    names = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    if platform not in names:
        pytest.skip(f"OpenMM platform {platform} is not available here")


# ----------------------------------------------------------------------------- export vs torch


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("kind", ["distances", "dihedrals"])
def test_export_equals_torch_on_real_frames(ala, frames, kind, platform):
    _require(platform)
    cv = _random_cv(ala, frames, kind)
    values = cv(frames).detach()
    assert values.std() > 0.05  # a non-trivial function on these frames
    force = to_custom_cv_force(cv, ala)
    assert force.getNumCollectiveVariables() == 16
    report = check_export(cv, force, frames, platform=platform)
    assert report["n_frames"] == len(frames) and report["platform"] == platform
    assert report["max_value_error"] <= 1e-4 and report["max_force_relative_error"] <= 1e-3
    assert report["context_seconds"] < 10.0  # the default CV must compile fast


def test_export_of_deeper_multi_output_and_linear_cvs(ala, frames):
    deep = _random_cv(ala, frames, "mixed", hidden=(4, 3), activation="sigmoid", n_out=2, seed=1)
    with pytest.warns(UserWarning, match="hidden layers"):
        force = to_custom_cv_force(deep, ala, output=1)
    assert force.getNumCollectiveVariables() == 4 * 3  # first-layer units x feature blocks
    check_export(deep, force, frames, output=1)
    linear = _random_cv(ala, frames, "mixed", hidden=(), n_out=2, seed=2)
    check_export(linear, to_custom_cv_force(linear, ala, output=0), frames, output=0)


def test_tabulated_export_of_a_phi_psi_cv(ala, frames):
    """A table resolves functions smooth on the whole torus (here unstandardised sin/cos inputs); a CV
    standardised on one basin is steep elsewhere and check_export rejects its coarse table."""
    smooth = _random_cv(ala, frames, "dihedrals", scale=1.0, seed=4, standardize=False)
    check_export(smooth, to_tabulated_cv_force(smooth, ala, points=129), frames)
    steep = _random_cv(ala, frames, "dihedrals", scale=1.0, seed=4)
    with pytest.raises(ExportMismatchError):
        check_export(steep, to_tabulated_cv_force(steep, ala, points=33), frames)


def test_check_export_catches_a_misspelled_name(ala, frames):
    cv = _random_cv(ala, frames, "dihedrals", hidden=(6, 4), seed=3)
    with pytest.warns(UserWarning):
        force = to_custom_cv_force(cv, ala)
    check_export(cv, force, frames)
    expression = force.getEnergyFunction()
    assert "a1_2" in expression
    force.setEnergyFunction(expression.replace("a1_2", "a1_x", 1))  # Lepton reads the unknown name as 0
    with pytest.raises(ExportMismatchError, match="worst value at frame"):
        check_export(cv, force, frames)


def test_cv_limit_and_bad_arguments(ala, frames):
    at_limit = _random_cv(ala, frames, "distances", hidden=(MAX_CVS,))
    assert to_custom_cv_force(at_limit).getNumCollectiveVariables() == MAX_CVS == 32
    too_many = _random_cv(ala, frames, "mixed", hidden=(11,))  # 11 units x 3 feature blocks = 33
    with pytest.raises(ValueError, match="needs 33 collective variables.*at most 32"):
        to_custom_cv_force(too_many)
    with pytest.raises(ValueError, match="output must be in"):
        to_custom_cv_force(at_limit, output=1)
    with pytest.raises(ValueError, match="particles"):
        to_custom_cv_force(at_limit, system=openmm.System())
    with pytest.raises(TypeError, match="CVModel"):
        to_custom_cv_force(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="one Dihedrals block"):
        to_tabulated_cv_force(at_limit)


# ----------------------------------------------------------------------------- XML


def test_xml_round_trip_gives_identical_values(ala, frames, tmp_path):
    cv = _random_cv(ala, frames, "distances", seed=6)
    force = to_custom_cv_force(cv, ala)
    path = save_cv_force(force, tmp_path / "cv" / "cv.xml")
    assert path.exists() and not list(path.parent.glob("*.part"))
    loaded = load_cv_force(path)
    assert isinstance(loaded, openmm.CustomCVForce) and loaded.getEnergyFunction() == force.getEnergyFunction()
    before, forces_before, _ = openmm_cv_values_and_forces(force, frames)
    after, forces_after, _ = openmm_cv_values_and_forces(loaded, frames)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(forces_after, forces_before)
    check_export(cv, loaded, frames)
    (tmp_path / "bad.xml").write_text("<not a force/>")
    with pytest.raises(ValueError, match="not an OpenMM force XML"):
        load_cv_force(tmp_path / "bad.xml")
    with pytest.raises(FileNotFoundError):
        load_cv_force(tmp_path / "missing.xml")


# ----------------------------------------------------------------------------- CV model


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("kind,hidden", [("mixed", (8,)), ("mixed", (6, 5)), ("dihedrals", ())])
def test_bounds_contain_every_output(ala, frames, activation, kind, hidden):
    cv = _random_cv(ala, frames, kind, hidden=hidden, activation=activation, n_out=2, seed=8)
    lo, hi = cv.bounds()
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all()  # bounded activations or sin/cos inputs
    generator = torch.Generator().manual_seed(0)
    wild = (
        torch.randn(4000, 22, 3, generator=generator, dtype=torch.float64)
        * torch.logspace(-2, 1, 4000, dtype=torch.float64)[:, None, None]
    )
    x = torch.cat([frames, wild])
    for model, inputs in ((cv, x), (copy.deepcopy(cv).float(), x.float())):  # float32 rounding stays inside too
        out = model(inputs).detach().double()
        assert (out >= lo).all() and (out <= hi).all()
    if hidden == (8,) and activation == "tanh":  # the textbook bound |s - b| <= sum |w|
        last = cv.layers[-1]
        textbook = last.weight.detach().abs().sum(1)
        torch.testing.assert_close(hi - last.bias.detach(), textbook, rtol=1e-5, atol=0.0)  # up to the rounding margin
        assert (hi - last.bias.detach() >= textbook).all()


def test_bounds_of_a_linear_distance_cv_are_infinite(ala, frames):
    lo, hi = _random_cv(ala, frames, "distances", hidden=()).bounds()
    assert torch.isinf(lo).all() and torch.isinf(hi).all()


def test_fit_cv_recovers_a_teacher_and_reports_held_out_r2(ala, frames):
    teacher = _random_cv(ala, frames, "dihedrals", hidden=(4,), scale=1.0, seed=11, standardize=False)
    generator = torch.Generator().manual_seed(1)
    x = torch.cat(
        [frames + 0.05 * torch.randn(frames.shape, generator=generator, dtype=torch.float64) for _ in range(4)]
    )
    targets = 5.0 + 20.0 * teacher(x).detach()[:, 0]  # far from zero mean / unit scale
    student = CVModel(_features(ala, "dihedrals"), hidden=(8,), seed=12).double()
    fit = fit_cv(student, x, targets, validation_fraction=0.25, epochs=100, lr=1e-2, batch_size=64, seed=0)
    assert fit.n_train + fit.n_validation == len(x) and fit.n_validation == round(0.25 * len(x))
    assert fit.r2_validation[0] > 0.98 and fit.r2_train[0] > 0.98
    assert fit.losses[-1] < 0.1 * fit.losses[0]
    prediction = student(x).detach()
    assert r2_score(prediction, targets[:, None]).item() > 0.98  # target units, scale folded back
    check_export(student, to_custom_cv_force(student, ala), frames)  # a fitted model exports exactly too
    noise = torch.randn(len(x), generator=generator, dtype=torch.float64)  # nothing to learn: held-out R^2 says so
    assert (
        fit_cv(
            CVModel(_features(ala, "dihedrals"), hidden=(8,), seed=12).double(), x, noise, epochs=30, seed=0
        ).r2_validation[0]
        < 0.2
    )
    with pytest.raises(ValueError, match="targets must be"):
        fit_cv(student, x, targets[:, None].repeat(1, 2))


def test_export_cv_picks_the_table_when_exact_enough_else_lepton(ala, frames):
    smooth = _random_cv(ala, frames, "dihedrals", scale=1.0, seed=4, standardize=False)
    force, report = export_cv(smooth, frames, ala)
    assert report["method"] == "table" and force.getNumTabulatedFunctions() == 1
    steep = _random_cv(ala, frames, "dihedrals", scale=1.0, seed=4)
    force, report = export_cv(steep, frames, ala, points=33)  # the coarse table fails its check
    assert report["method"] == "lepton" and report["max_value_error"] <= 1e-4
    assert export_cv(_random_cv(ala, frames, "distances"), frames, ala)[1]["method"] == "lepton"
    with pytest.raises(ValueError, match="method must be"):
        export_cv(smooth, frames, method="torch")
