"""Parallel tempering with OpenMM: the lowest-temperature stream is Boltzmann at that temperature."""

import json

import numpy as np
import openmm.unit as unit
import pytest

from openflow.plugins.openmm.tempering import geometric_temperatures, simulate_tempering, update_round_trips
from openflow.systems import harmonic_chain


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    system = harmonic_chain(n=4, boundary="fixed-fixed")
    low = system.temperature.value_in_unit(unit.kelvin)
    out = tmp_path_factory.mktemp("pt")
    run = simulate_tempering(
        system,
        geometric_temperatures(low, 4 * low, 4),
        steps=25000,
        interval=10,
        exchange_interval=100,
        out=out,
        seed=3,
        platform="Reference",
        progress=False,
    )
    return system, run


def test_lowest_temperature_frames_obey_equipartition(chain_run):
    """The chain is harmonic with 4 active coordinates: <U> = 4/2 kT at the lowest temperature exactly
    (the hottest replica would give 4 times that)."""
    system, run = chain_run
    table = np.loadtxt(run.frames, delimiter=",", skiprows=1)
    energy_kT = table[len(table) // 10 :, 2] / system.kT_kjmol
    blocks = np.array([b.mean() for b in np.array_split(energy_kT, 20)])
    error = blocks.std(ddof=1) / np.sqrt(len(blocks))
    assert abs(energy_kT.mean() - 2.0) < 4 * error + 0.02, (energy_kT.mean(), error)
    assert error < 0.2


def test_swaps_happen_and_segments_follow_them(chain_run):
    _, run = chain_run
    assert all(0.05 < a < 0.95 for a in run.acceptance)
    segments = run.segments
    assert segments.shape == (run.n_frames,)
    assert segments[0] == 0 and np.all(np.diff(segments) >= 0) and np.all(np.diff(segments) <= 1)
    # a new segment only starts right after an exchange attempt
    starts = np.flatnonzero(np.diff(segments)) + 1
    assert np.all(starts % (run.exchange_interval // run.interval) == 0)
    assert segments[-1] > 5
    metadata = json.loads(run.metadata.read_text())
    assert metadata["n_segments"] == segments[-1] + 1 and run.round_trips >= 1


def test_reuse_returns_the_finished_run(chain_run):
    system, run = chain_run
    again = simulate_tempering(
        system,
        run.temperatures_K,
        steps=run.steps,
        interval=run.interval,
        exchange_interval=run.exchange_interval,
        out=run.trajectory.parent,
        seed=3,
        platform="Reference",
        progress=False,
        reuse=True,
    )
    assert again.wall_time_s == run.wall_time_s and np.array_equal(again.segments, run.segments)


def test_round_trips_count_bottom_top_bottom():
    last_end = np.full(3, -1)
    walker_at = np.array([0, 1, 2])
    assert update_round_trips(walker_at, last_end) == 0  # walker 2 starts on top: no trip yet
    assert update_round_trips(np.array([2, 1, 0]), last_end) == 0  # walker 0 reached the top from the bottom
    assert update_round_trips(np.array([0, 1, 2]), last_end) == 1  # and came back
    assert update_round_trips(np.array([0, 1, 2]), last_end) == 0


def test_bad_input_is_refused(tmp_path):
    system = harmonic_chain(n=4)
    low = system.temperature.value_in_unit(unit.kelvin)
    with pytest.raises(ValueError, match="increase"):
        simulate_tempering(system, [low, low], steps=100, out=tmp_path)
    with pytest.raises(ValueError, match="system's"):
        simulate_tempering(system, [2 * low, 3 * low], steps=100, out=tmp_path)
    with pytest.raises(ValueError, match="multiple"):
        simulate_tempering(system, [low, 2 * low], steps=100, interval=30, exchange_interval=100, out=tmp_path)
    with pytest.raises(ValueError):
        geometric_temperatures(300, 200, 4)
