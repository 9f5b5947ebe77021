"""Analysis: torsion free-energy surfaces, two-state populations and transition counting (synthetic data
with exact answers; the phi basins of alanine dipeptide as the states) and `openflow rama` on a short
real trajectory."""

import json

import mdtraj
import numpy as np
import pytest

from openflow import analysis
from openflow.cli import main
from openflow.plugins.openmm.md import simulate
from openflow.systems import MOLAR_GAS_CONSTANT, alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, phi_states

R = MOLAR_GAS_CONSTANT


def test_transition_counting_on_synthetic_phi():
    # cores: positive (0.5, 1.5), negative phi < -0.5 or phi > 2.5; between them nothing counts
    phi = np.array(
        [
            -1.5,
            -1.4,
            0.2,
            -1.5,  # barrier visit, back: no transition
            1.0,  # 1: into the positive core (frame 4)
            0.2,
            1.0,
            -0.2,
            1.2,  # recrossings that never reach the negative core
            2.0,
            3.0,  # 2: negative core across +-pi (frame 10)
            -3.1,
            2.2,
            1.4,  # 3: positive core again (frame 13)
            -0.6,
        ]
    )  # 4: negative core (frame 14)
    assert analysis.transition_frames(phi_states(phi, PHI_CORE_MARGIN)).tolist() == [4, 10, 13, 14]
    assert analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN)) == 4
    assert analysis.count_transitions(phi_states(phi, margin=0.0)) == 8  # without hysteresis every sign change counts
    assert analysis.count_transitions(phi_states(np.full(10, 0.1), PHI_CORE_MARGIN)) == 0  # never in a core
    two_runs = np.concatenate([phi, phi[4:]])  # two walkers one after the other: the join is no transition
    walker = np.repeat([0, 1], [phi.size, phi.size - 4])
    states = phi_states(two_runs, PHI_CORE_MARGIN)
    assert analysis.transition_frames(states, walker).tolist() == [4, 10, 13, 14, 21, 24, 25]
    assert analysis.count_transitions(states) == 8  # counted as one run: the join (-1 -> +1) as well


def test_state_populations_weighted_exact():
    phi = np.array([-1.5, 1.0, 2.5, -0.1, 0.3])
    weights = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # positive: 1.0 and 0.3 -> 7/15
    result = analysis.state_populations(phi_states(phi) == 1, weights=weights)
    assert result["state"] == pytest.approx(7 / 15, abs=1e-15)
    assert result["rest"] + result["state"] == pytest.approx(1.0, abs=1e-15)
    assert result["delta_f_kT"] == pytest.approx(np.log(8 / 7), abs=1e-14)
    assert result["ess_fraction"] == pytest.approx(15**2 / np.sum(weights**2) / 5, rel=1e-14)
    assert analysis.state_populations(phi_states(phi), weights=weights) == result  # a state series: the state is +1
    # a uniform density on the circle: the positive basin holds 2.0 / (2 pi) of it
    uniform = np.linspace(-np.pi, np.pi, 200_001)[:-1]
    assert analysis.state_populations(phi_states(uniform) == 1)["state"] == pytest.approx(2.0 / (2 * np.pi), abs=1e-5)
    # Boltzmann weights of U(phi) = -cos(phi - 1) kT on a fine grid against the integral of exp(cos)
    w = np.exp(np.cos(uniform - 1.0))
    grid = np.linspace(0.0, 2.0, 400_001)
    exact = np.trapezoid(np.exp(np.cos(grid - 1.0)), grid) / (2 * np.pi * np.i0(1.0))
    assert analysis.state_populations(phi_states(uniform) == 1, weights=w)["state"] == pytest.approx(exact, abs=1e-5)
    with pytest.raises(ValueError, match="weights"):
        analysis.state_populations(phi_states(phi) == 1, weights=-weights)
    with pytest.raises(ValueError, match="frames"):
        analysis.state_populations(phi_states(phi) == 1, weights=weights[:3])


def test_ramachandran_free_energy_difference_and_units():
    # two frames in two cells, weights 1 and e^-2: F differs by exactly 2 kT
    angles = np.array([[-1.5, 2.0], [1.0, -0.5]])
    weights = np.array([1.0, np.exp(-2.0)])
    surface = analysis.ramachandran(angles, weights=weights, bins=12)
    filled = np.isfinite(surface.free_energy)
    assert filled.sum() == 2 and np.nanmin(surface.free_energy) == 0.0
    assert np.nanmax(surface.free_energy) == pytest.approx(2.0, abs=1e-12)
    in_kj = analysis.ramachandran(angles, weights=weights, bins=12, units="kJ/mol", temperature=350.0)
    assert np.nanmax(in_kj.free_energy) == pytest.approx(2.0 * R * 350.0, rel=1e-12)
    i, j = np.unravel_index(np.nanargmax(surface.free_energy), surface.free_energy.shape)
    assert (
        surface.phi_edges[i] <= 1.0 < surface.phi_edges[i + 1]
        and surface.psi_edges[j] <= -0.5 < surface.psi_edges[j + 1]
    )
    with pytest.raises(ValueError, match="units"):
        analysis.ramachandran(angles, units="kcal")


def test_free_energy_profile_of_boltzmann_samples():
    # weights exp(-s^2/2) on a uniform grid: F(s) = s^2/2 up to the bin average
    s = np.linspace(-3, 3, 600_001)
    centers, f = analysis.free_energy_profile(s, weights=np.exp(-(s**2) / 2), bins=30, range=(-3, 3))
    edges = np.linspace(-3, 3, 31)
    exact = -np.log([np.mean(np.exp(-(np.linspace(a, b, 2001) ** 2) / 2)) for a, b in zip(edges[:-1], edges[1:])])
    assert np.allclose(f, exact - exact.min(), atol=1e-4)


def short_md(folder):
    """400 steps of alanine dipeptide, 20 frames, in ``folder/md``."""
    return simulate(
        alanine_dipeptide(),
        steps=400,
        interval=20,
        out=folder / "md",
        seed=2,
        platform="Reference",
        equilibration_steps=50,
        progress=False,
    )


def test_rama_command_on_a_short_trajectory(tmp_path):
    md = short_md(tmp_path)
    weights = np.arange(1.0, 21.0)
    np.savetxt(tmp_path / "w.txt", weights)
    status = main(
        [
            "rama",
            str(md.trajectory),
            "--top",
            str(md.topology),
            "--weights",
            str(tmp_path / "w.txt"),
            "--units",
            "kJ/mol",
            "--out",
            str(tmp_path / "rama"),
        ]
    )
    assert status == 0
    assert (tmp_path / "rama" / "rama.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    populations = json.loads((tmp_path / "rama" / "populations.json").read_text())
    assert populations["negative"] + populations["positive"] == pytest.approx(1.0, abs=1e-12)
    assert populations["n_frames"] == 20
    phi = mdtraj.compute_phi(mdtraj.load(str(md.trajectory), top=str(md.topology)))[1][:, 0]
    assert populations["positive"] == pytest.approx(weights[phi_states(phi) == 1].sum() / weights.sum(), abs=1e-12)
    np.save(tmp_path / "bad.npy", np.ones(3))
    assert (
        main(
            [
                "rama",
                str(md.trajectory),
                "--top",
                str(md.topology),
                "--weights",
                str(tmp_path / "bad.npy"),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )


def test_rama_refuses_a_truncated_trajectory_and_takes_plot_options(tmp_path, capsys):
    md = short_md(tmp_path)
    data = md.trajectory.read_bytes()
    cut = tmp_path / "cut.dcd"
    cut.write_bytes(data[: len(data) - len(data) // 3])  # an interrupted copy: the header still promises 20 frames
    assert main(["rama", str(cut), "--top", str(md.topology), "--out", str(tmp_path / "cut")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "of the 20 frames its header promises" in error[0]
    status = main(
        [
            "rama",
            str(md.trajectory),
            "--top",
            str(md.topology),
            "--bins",
            "24",
            "--vmax",
            "6",
            "--title",
            "my run",
            "--out",
            str(tmp_path / "ok"),
        ]
    )
    assert status == 0 and (tmp_path / "ok" / "rama.png").read_bytes()[:4] == b"\x89PNG"
    assert "dcdplugin" not in capsys.readouterr().out  # stdout carries results only


def test_histogram_bins_follow_the_effective_sample_size():
    assert analysis.histogram_bins(0) == 12 and analysis.histogram_bins(1e9) == 72
    assert analysis.histogram_bins(5 * 30**2) == 30  # about five effective samples per cell of a filled square
    weights = np.r_[np.ones(100), np.zeros(9900)]  # 10 000 frames, 100 effective
    angles = np.random.default_rng(0).uniform(-np.pi, np.pi, (10_000, 2))
    assert analysis.ramachandran(angles, weights=weights).free_energy.shape == (12, 12)
    assert analysis.ramachandran(angles).free_energy.shape == (45, 45)
