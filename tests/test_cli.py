"""The `openflow` command: info, simulate, one-line errors with exit status 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mdtraj
import pytest

from openflow.cli import SUBCOMMANDS, main, subcommand

FAST = [
    "--steps",
    "200",
    "--interval",
    "20",
    "--seed",
    "1",
    "--platform",
    "Reference",
    "--equilibration-steps",
    "50",
    "--no-progress",
]


def console_script() -> str:
    """The installed `openflow` entry point next to this Python (the venv's bin folder)."""
    path = Path(sys.executable).with_name("openflow")
    return str(path) if path.exists() else shutil.which("openflow")


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "simulate" in out


def test_info_prints_versions_platforms_and_device(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in (
        "openflow",
        "openmm",
        "torch",
        "mdtraj",
        "numpy",
        "numba",
        "python",
        "OpenMM platforms:",
        "Reference",
        "torch device:",
    ):
        assert word in out
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert set(facts["versions"]) == {"openflow", "openmm", "torch", "mdtraj", "numpy", "numba", "python"}
    assert "Reference" in facts["openmm_platforms"] and isinstance(facts["torch_cuda_available"], bool)


def test_simulate_alanine_dipeptide(tmp_path, capsys):
    assert (
        main(["simulate", "--system", "alanine_dipeptide", "--solvent", "vacuum", "--out", str(tmp_path), *FAST]) == 0
    )
    out = capsys.readouterr().out
    assert str(tmp_path / "trajectory.dcd") in out and "ns/day" in out
    frames = mdtraj.load(str(tmp_path / "trajectory.dcd"), top=str(tmp_path / "topology.pdb"))
    assert (frames.n_frames, frames.n_atoms) == (10, 22)


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            ["--system", "harmonic_chain", "--n", "5", "--boundary", "fixed-free", "--kT", "2.0"],
            dict(n=5, boundary="fixed-free", kT=2.0),
        ),
        (["--system", "coulomb_cluster", "--n", "4", "--dim", "3"], dict(n=4, dim=3)),
        (
            ["--system", "alanine_dipeptide", "--solvent", "implicit", "--temperature", "310"],
            dict(solvent="implicit", temperature_K=310.0),
        ),
    ],
)
def test_simulate_passes_system_options_to_the_builder(tmp_path, capsys, options, expected):
    assert main(["simulate", *options, "--out", str(tmp_path), *FAST]) == 0
    metadata = json.loads((tmp_path / "simulation.json").read_text())
    seen = {**metadata["parameters"], "temperature_K": metadata["temperature_K"]}
    for key, value in expected.items():
        assert seen[key] == pytest.approx(value) if isinstance(value, float) else seen[key] == value


@pytest.fixture
def file_reading_subcommand(tmp_path):
    """Registers `openflow read-test-file`, which opens a missing file, for one test."""

    @subcommand("read-test-file", "(test only) read a missing file")
    def read(args):
        return (tmp_path / "missing.txt").read_text()

    yield
    del SUBCOMMANDS["read-test-file"]


def test_missing_file_in_a_subcommand_is_one_line(file_reading_subcommand, tmp_path, capsys):
    assert main(["read-test-file"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"openflow: error: [Errno 2] No such file or directory: '{tmp_path / 'missing.txt'}'"
    ]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["simulate", "--system", "nonsense", "--ns", "1", "--out", "OUT"], "invalid choice"),
        (["simulate", "--system", "harmonic_chain", "--ns", "1", "--steps", "10", "--out", "OUT"], "not allowed with"),
        (["simulate", "--system", "harmonic_chain", "--out", "OUT"], "--ns --steps"),
        (
            ["simulate", "--system", "harmonic_chain", "--solvent", "vacuum", "--steps", "10", "--out", "OUT"],
            "--solvent does not apply",
        ),
        (
            [
                "simulate",
                "--system",
                "harmonic_chain",
                "--kT",
                "1",
                "--temperature",
                "300",
                "--steps",
                "10",
                "--out",
                "OUT",
            ],
            "not allowed with",
        ),
        (
            ["simulate", "--system", "harmonic_chain", "--steps", "0", "--out", "OUT"],
            "steps must be a positive integer",
        ),
        (["simulate", "--system", "harmonic_chain", "--steps", "10", "--interval", "5", "--out", "FILE/sub"], "FILE"),
        (
            [
                "simulate",
                "--system",
                "alanine_dipeptide",
                "--platform",
                "Nonexistent",
                "--steps",
                "2000",
                "--out",
                "OUT",
            ],
            "Nonexistent",
        ),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, argv, says):
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [str(tmp_path / a) if a in ("OUT", "FILE/sub") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_console_script_runs_and_fails_cleanly(tmp_path):
    script = console_script()
    assert script, "the openflow console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [script, "simulate", "--system", "coulomb_cluster", "--n", "6", "--out", str(tmp_path), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert str(tmp_path / "trajectory.dcd") in run.stdout and (tmp_path / "trajectory.dcd").exists()
    bad = subprocess.run(
        [script, "simulate", "--system", "harmonic_chain", "--ns", "1", "--steps", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_bench_energy_prints_one_json_object_with_both_rates(capsys):
    status = main(
        ["bench", "energy", "--system", "harmonic_chain", "--n", "4", "--batch", "8", "--json", "--seconds", "0.05"]
    )
    assert status == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1])
    assert result["batched_evals_per_s"] / result["per_config_evals_per_s"] == pytest.approx(result["ratio"], rel=1e-9)
