"""Smoke tests of the benchmarks (tiny sizes): one parseable JSON object, documented keys, positive rates,
and exactness checks on what they time (log q of the samplers, the CV force of a biased MD run)."""

import json
import math
import time

import numpy as np
import openmm.unit as unit
import pytest
import torch

from openflow.benchmarks import energy, energy_table, flows, md
from openflow.benchmarks.common import machine_description, rate
from openflow.plugins.openmm.export import check_export
from openflow.systems import build

MACHINE_KEYS = {"cpu_model", "cpu_cores", "torch_threads", "torch_version", "openmm_version", "device"}


def _printed_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json must print exactly one line"
    return json.loads(lines[0])


def test_machine_description_and_rate():
    machine = machine_description("cpu")
    assert MACHINE_KEYS <= set(machine) and machine["device"] == "cpu" and machine["cpu_cores"] >= 1
    calls = []
    start = time.perf_counter()
    items_per_s = rate(lambda: (calls.append(1), time.sleep(0.01)), 10, seconds=0.0)
    assert len(calls) == 2  # one warm-up call, then at least one timed call
    assert (
        10 / (time.perf_counter() - start) < items_per_s < 10 / 0.01
    )  # ten items in one 10 ms call, warm-up not counted


def test_flows_main_json(capsys, tmp_path):
    families = [
        "realnvp_bg",
        "nct_linear",
        "cnf_rk4_hutchinson",
        "cnf_dopri5_exact",
        "monge_ampere_mlp",
        "monge_ampere_pair",
    ]
    out = tmp_path / "flows.json"
    result = flows.main(
        [
            "--family",
            *families,
            "--dim",
            "6",
            "--samples",
            "32",
            "--batch",
            "8",
            "--seconds",
            "0.01",
            "--repeats",
            "1",
            "--hidden",
            "8",
            "--rk4-steps",
            "2",
            "--json",
            "--out",
            str(out),
        ]
    )
    printed = _printed_json(capsys)
    assert printed == json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert MACHINE_KEYS <= set(printed["machine"])
    assert [run["family"] for run in printed["runs"]] == families
    for run in printed["runs"]:
        assert (
            run["dim"] == 6 and 1.0 < run["samples_per_s"] < 1e9 and 1e-4 < run["train_step_ms"] < 1e4
        )  # timed, not 0 or inf
        assert run["loss"] in {"reverse_kl", "nll", "flow_matching"}
    nfe = {run["family"]: run["nfe"] for run in printed["runs"]}
    assert nfe["realnvp_bg"] is None and nfe["cnf_rk4_hutchinson"] == 2 * 4  # RK4: 4 evaluations per step


def test_energy_table_runs_both_paths_and_prints_the_readme_table(capsys, tmp_path):
    out = tmp_path / "table.json"
    result = energy_table.main(
        ["--platform", "Reference", "--batch", "8", "--runs", "1", "--seconds", "0.01", "--out", str(out)]
    )
    table = capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = result["runs"]
    assert [r["batched_cpu_kernels"] for r in runs] == [True, False] * len(energy_table.SYSTEMS)
    assert all(r["per_config_platform"] == "Reference" and r["dtype"] == "float64" and r["ratio"] > 0 for r in runs)
    assert all(r["max_abs_energy_difference_kT"] < 1e-6 for r in runs)
    assert table[0].startswith(
        "| system | loop, Reference | batched, float64 | ratio | kernels / torch ops (float64) |"
    )
    assert [line.split(" | ")[0][2:] for line in table[2:-1]] == list(energy_table.SYSTEMS)


@pytest.mark.parametrize("family", ["realnvp_bg", "nct_realnvp", "nct_linear"])
def test_flow_sampler_log_density_is_exact(family):
    """The timed sampler returns log q(x) equal to the model's exact log-density (float64)."""
    torch.manual_seed(0)
    model, sample = flows.build_family(family, 4, hidden=8)
    model = model.double()
    if family.startswith("nct_"):
        model.transform.inverse(torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64))
        sample = model.as_boltzmann_generator().sample
        x, log_q = sample(16)
        p, q = x.detach().chunk(2, dim=1)
        exact = model.log_prob(p, q)
    else:
        model.log_prob(torch.randn(16, 4, dtype=torch.float64) * 2 + 1)  # data-initialise ActNorm first
        x, log_q = sample(16)
        exact = model.log_prob(x.detach())
    torch.testing.assert_close(log_q.detach(), exact.detach(), rtol=1e-9, atol=1e-9)


def test_flow_benchmark_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown family"):
        flows.build_family("glow", 6)
    with pytest.raises(ValueError, match="dim"):
        flows.build_family("realnvp_bg", 1)


def test_double_well_energy_is_analytic():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(flows.double_well_energy(x), torch.tensor([0.0, 3.0], dtype=torch.float64))


def test_md_main_json_biased_run_is_exact(capsys):
    result = md.main(
        [
            "--system",
            "alanine_dipeptide",
            "--platform",
            "Reference",
            "--bias",
            "phi_psi_table",
            "distances_lepton",
            "--steps",
            "20",
            "--repeats",
            "1",
            "--frequency",
            "10",
            "--json",
        ]
    )
    printed = _printed_json(capsys)
    assert printed == json.loads(json.dumps(result)) and MACHINE_KEYS <= set(printed["machine"])
    runs = {run["bias"]: run for run in printed["runs"]}
    assert list(runs) == ["none", "phi_psi_table", "distances_lepton"]
    for run in runs.values():
        assert run["platform"] == "Reference" and run["s_per_step"] == pytest.approx(1 / run["steps_per_s"])
        assert math.isclose(run["ns_per_day"], run["timestep_ps"] * 1e-3 * 86400 * run["steps_per_s"])
    assert runs["none"]["speed_vs_bare"] == 1.0
    for bias in ("phi_psi_table", "distances_lepton"):
        run = runs[bias]
        assert run["speed_vs_bare"] > 0 and run["n_gaussians"] >= 2
        check = run["cv_check"]  # the CV force that ran, against torch on the start and end frames
        assert check["n_frames"] == 2 and check["max_value_error"] < 1e-4 and check["max_force_relative_error"] < 1e-3
    assert runs["distances_lepton"]["cv_check"]["max_value_error"] < 1e-10  # Lepton route: exact to rounding


def test_md_model_systems_bare(capsys):
    result = md.main(
        [
            "--system",
            "harmonic_chain",
            "coulomb_cluster",
            "--platform",
            "Reference",
            "--steps",
            "20",
            "--repeats",
            "1",
            "--json",
        ]
    )
    printed = _printed_json(capsys)
    assert [(run["system"], run["bias"]) for run in printed["runs"]] == [
        ("harmonic_chain", "none"),
        ("coulomb_cluster", "none"),
    ]
    assert printed["runs"][1]["n_atoms"] == 13 and all(run["ns_per_day"] > 0 for run in result["runs"])


def test_learned_cv_export_matches_torch_on_two_frames():
    """The exported phi/psi Lepton CV agrees with torch on the start frame and a perturbed one."""
    system = build("alanine_dipeptide")
    cv, force = md.learned_cv(system, "phi_psi_lepton", seed=1)
    start = system.positions.value_in_unit(unit.nanometer)
    frames = np.stack([start, start + 0.02 * np.random.default_rng(0).standard_normal(start.shape)])
    report = check_export(cv, force, frames)
    assert report["n_frames"] == 2 and report["max_value_error"] < 1e-10 and report["max_force_relative_error"] < 1e-8
    with pytest.raises(ValueError, match="alanine_dipeptide"):
        md.learned_cv(build("harmonic_chain", n=4), "phi_psi_table")


def test_energy_main_json(capsys):
    result = energy.main(
        ["--system", "harmonic_chain", "--n", "4", "--batch", "8", "--seconds", "0.01", "--threads", "1", "--json"]
    )
    printed = _printed_json(capsys)
    assert printed == json.loads(json.dumps(result)) and MACHINE_KEYS <= set(printed["machine"])
    assert printed["batched_evals_per_s"] / printed["per_config_evals_per_s"] == pytest.approx(
        printed["ratio"], rel=1e-9
    )
    assert printed["max_abs_energy_difference_kT"] < 1e-8
