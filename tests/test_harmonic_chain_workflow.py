"""The harmonic-chain workflow end to end on a tiny chain, against the exact normal modes."""

import json

import pytest
import yaml
from helpers import WORKFLOWS

from openflow.workflows import load_config, merge, parse_overrides, run

SMALL = {
    "system": {"n": 4},
    "boundaries": ["fixed-free"],
    "md": {"steps": 40000, "interval": 20, "platform": "Reference"},
    "mle": {"steps": 40},
    "variational": {"steps": 60, "batch": 256},
    "evaluation": {"samples": 4000, "slow_modes_plotted": 2},
    "progress": False,
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("chain")
    return out, run(WORKFLOWS / "harmonic_chain.yaml", out, SMALL)


def test_variational_route_recovers_the_exact_spectrum_and_free_energy(small_run):
    _, metrics = small_run
    # Exact family + deterministic objective: the only errors are optimizer tolerance.
    assert metrics["fixed_free_variational_omega_max_rel_error"] < 1e-4
    assert metrics["fixed_free_variational_mode_overlap_min"] > 0.9999
    # F_q >= F holds for the expectation; its Monte Carlo estimate may dip by a few standard errors.
    stderr = metrics["fixed_free_variational_free_energy_stderr_kT"]
    assert -5 * stderr <= metrics["fixed_free_variational_free_energy_gap_kT"] < 1e-5
    assert abs(metrics["fixed_free_variational_free_energy_is_kT"] - metrics["fixed_free_free_energy_exact_kT"]) < 1e-4
    assert metrics["fixed_free_variational_ess_fraction"] > 0.999


def test_maximum_likelihood_reaches_the_optimum_the_data_allow(small_run):
    _, metrics = small_run
    # The MLE in the rotation family is known in closed form from the data's second moments.
    assert metrics["fixed_free_mle_vs_data_optimum_omega_max_rel_diff"] < 1e-4
    # 2000 ps of MD hold ~200 independent samples of the slowest mode (relaxation ~10 ps), so the
    # data's own frequencies scatter by ~1/sqrt(2 * 200) = 5 %; 0.25 is five of those.
    assert metrics["fixed_free_data_optimum_omega_max_rel_error"] < 0.25
    assert metrics["fixed_free_mle_free_energy_gap_kT"] > 0  # a variational bound


def test_outputs_are_written_and_a_rerun_resumes_from_checkpoints(small_run):
    out, metrics = small_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["fixed_free_variational_train_steps"] == SMALL["variational"]["steps"]
    for name in (
        "spectrum_fixed-free.png",
        "slow_modes_fixed-free.png",
        "config.yaml",
        "fixed_free/mle/checkpoint.pt",
        "fixed_free/variational/metrics.jsonl",
        "fixed_free/md/trajectory.dcd",
    ):
        assert (out / name).exists(), name
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["system"]["n"] == 4 and resolved["system"]["k"] == 1.0
    again = run(WORKFLOWS / "harmonic_chain.yaml", out, SMALL)  # nothing left to train
    assert again["fixed_free_variational_omega_max_rel_error"] == pytest.approx(
        metrics["fixed_free_variational_omega_max_rel_error"]
    )
    # more variational steps: that stage continues from its checkpoint, the likelihood stage is untouched
    mle_checkpoint = (out / "fixed_free/mle/checkpoint.pt").stat().st_mtime_ns
    steps = SMALL["variational"]["steps"]
    longer = run(
        WORKFLOWS / "harmonic_chain.yaml", out, {**SMALL, "variational": {**SMALL["variational"], "steps": steps + 5}}
    )
    assert longer["fixed_free_variational_train_steps"] == steps + 5
    lines = (out / "fixed_free/variational/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, steps + 6))
    assert (out / "fixed_free/mle/checkpoint.pt").stat().st_mtime_ns == mle_checkpoint


def test_settings_are_checked():
    kind, settings = load_config(WORKFLOWS / "harmonic_chain.yaml")
    assert kind == "harmonic_chain"
    with pytest.raises(ValueError, match="unknown setting 'mle.stepz'"):
        merge({"mle": {"steps": 1}}, parse_overrides(["mle.stepz=3"]))
    with pytest.raises(ValueError):
        parse_overrides(["no_equals_sign"])
    with pytest.raises(FileNotFoundError):
        load_config(WORKFLOWS / "missing.yaml")
    assert parse_overrides(["a.b=[1, 2]", "c=0.5"]) == {"a": {"b": [1, 2]}, "c": 0.5}
    assert settings["md"]["steps"] == 400_000 and settings["boundaries"] == [
        "fixed-fixed",
        "fixed-free",
    ]  # the file, not defaults
