"""Walkers sharing one bias on Dask, and runs that survive being killed: OpenMM's bias files read safely
whatever moment a walker died at, a run that resumes from its checkpoint without a lost or doubled
frame, and two walkers in a 2-process LocalCluster, one of whose worker processes is killed."""

import json
import os
import signal
import threading
import time

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
from helpers import TINY_LOOP, WORKFLOWS

from openflow import analysis
from openflow.cli import main
from openflow.plugins.openmm import bias_files
from openflow.plugins.openmm.bias import bias_grid, torsion_bias_variables
from openflow.plugins.openmm.md import create_simulation, simulate
from openflow.plugins.openmm.metadynamics import run_metadynamics
from openflow.plugins.openmm.reporters import read_colvar
from openflow.plugins.openmm.segments import CHECKPOINT, join_dcd
from openflow.plugins.openmm.walkers import dask_client, run_walkers
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, backbone_torsions, phi_states
from openflow.workflows import run


@pytest.fixture(scope="module")
def ala():
    return alanine_dipeptide()


def phi_variable(system):
    return torsion_bias_variables([backbone_torsions(system)["phi"][0]], width=0.35, grid=60)


def metadynamics_in(system, bias_dir, seed=1):
    """A real OpenMM Metadynamics walker writing into ``bias_dir`` at every deposit."""
    omm_system = openmm.XmlSerializer.clone(system.system)
    meta = app.Metadynamics(
        omm_system, phi_variable(system), 300 * unit.kelvin, 5.0, 2.0 * unit.kilojoule_per_mole, 20, 20, str(bias_dir)
    )
    simulation = create_simulation(system, seed, "Reference", openmm_system=omm_system)
    return meta, simulation


def test_bias_files_read_safely_whatever_moment_a_walker_died_at(ala, tmp_path):
    """A walker killed while writing leaves a temp_ file, or two indices of its id: neither OpenMM nor
    shared_bias reads a wrong bias; restore() takes back the deposits made after a snapshot."""
    meta, simulation = metadynamics_in(ala, tmp_path)
    meta.step(simulation, 200)
    own = meta._id  # OpenMM's name for this walker's files
    total = bias_grid(meta)
    shape = (60,)
    np.testing.assert_allclose(bias_files.shared_bias(tmp_path, shape), total, atol=1e-12)
    index, path = bias_files.newest_files(tmp_path)[own]
    (tmp_path / f"temp_{own}_{index + 1}.npy").write_bytes(path.read_bytes()[:50])  # killed mid-write
    older = tmp_path / f"bias_{own}_{index - 1}.npy"
    np.save(older, np.zeros(shape))  # killed between the rename and the delete: an older index left
    np.testing.assert_allclose(bias_files.shared_bias(tmp_path, shape), total, atol=1e-12)
    other, _ = metadynamics_in(ala, tmp_path, seed=2)  # a new walker loads the newest file of each id
    np.testing.assert_allclose(bias_grid(other), total, atol=1e-12)

    bias_files.snapshot(tmp_path, [own], tmp_path / "checkpoint")
    meta.step(simulation, 200)  # deposits after the checkpoint, then a kill
    assert bias_files.shared_bias(tmp_path, shape).sum() > total.sum() + 1.0
    assert bias_files.restore(tmp_path, tmp_path / "checkpoint") == [own]
    np.testing.assert_allclose(bias_files.shared_bias(tmp_path, shape), total, atol=1e-12)
    assert set(bias_files.newest_files(tmp_path)) == {own, other._id}  # the second walker's file, empty
    assert len([p for p in tmp_path.glob(f"bias_{own}_*.npy")]) == 1  # older indices removed


class StopAt:
    """A reporter that interrupts the run at ``step`` (as a Ctrl-C or a kill would)."""

    def __init__(self, step):
        self.step = step

    def describeNextReport(self, simulation):
        return {"steps": self.step - simulation.currentStep % self.step, "periodic": None, "include": []}

    def report(self, simulation, state):
        if simulation.currentStep >= self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_from_its_checkpoint_without_lost_or_doubled_frames(ala, tmp_path):
    options = dict(
        steps=2000,
        out=tmp_path / "m",
        height=2.0,
        bias_factor=5.0,
        frequency=100,
        interval=50,
        platform="Reference",
        seed=3,
        progress=False,
        checkpoint_ps=0.5,  # 500 steps
        cv_names=["phi"],
    )
    with pytest.raises(KeyboardInterrupt):
        run_metadynamics(ala, phi_variable(ala), reporters=[StopAt(1300)], **options)
    record = json.loads((tmp_path / "m" / CHECKPOINT).read_text())
    assert record["step"] == 1000 and record["segments"] == 2 and not (tmp_path / "m" / "COLVAR").exists()
    result = run_metadynamics(ala, phi_variable(ala), **options)
    settings = json.loads(result.files["settings"].read_text())
    assert settings["results"]["restarts"] == 1
    np.testing.assert_allclose(result.time_ps, 0.05 * np.arange(1, 41), atol=1e-9)  # 40 frames, once each
    assert result.log_weights.shape == (40,) and np.isfinite(result.log_weights).all()
    assert len(mdtraj_frames(result)) == 40
    assert not (tmp_path / "m" / CHECKPOINT).exists() and not (tmp_path / "m" / "segments").exists()
    own = bias_files.newest_files(result.files["bias_dir"])
    assert len(own) == 2  # the first process's bias (restored to its checkpoint) and the resumed one's
    np.testing.assert_allclose(
        bias_files.shared_bias(result.files["bias_dir"], (60,)), np.load(result.files["bias"])["bias_kjmol"], atol=1e-9
    )


def mdtraj_frames(result):
    import mdtraj

    return mdtraj.load_dcd(str(result.files["trajectory"]), top=str(result.files["topology"]))


def test_two_walkers_share_one_bias_and_survive_a_killed_worker(ala, tmp_path):
    """2 walkers in a 2-process LocalCluster; the worker process running walker 0 is killed after its
    second checkpoint: walker 0 resumes from it, walker 1 goes on, every frame is there once."""
    steps, interval = 100_000, 100
    options = dict(
        steps=steps, height=1.5, bias_factor=6.0, frequency=200, interval=interval, cv_names=["phi"], progress=False
    )
    out, outcome = tmp_path / "walkers", {}
    with dask_client(n_workers=2) as client:

        def walk():
            try:
                outcome["result"] = run_walkers(
                    ala, phi_variable(ala), 2, out, client, seed=0, checkpoint_ps=10.0, platform="Reference", **options
                )
            except BaseException as error:  # reported below
                outcome["error"] = error

        thread = threading.Thread(target=walk)
        thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads((out / "walker0" / CHECKPOINT).read_text())["segments"] >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        pids = client.run(os.getpid)
        running = {worker: keys for worker, keys in client.processing().items()}
        victim = [worker for worker, keys in running.items() if any(str(k).startswith("walker0-") for k in keys)]
        assert victim, f"walker 0 is not running: {running}"
        os.kill(pids[victim[0]], signal.SIGKILL)
        thread.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    walkers = json.loads((out / "walkers.json").read_text())["walkers"]
    assert walkers[0]["restarts"] >= 1 and walkers[1]["restarts"] == 0
    frames = steps // interval
    walker = result.observables["walker"]
    assert result.time_ps.size == 2 * frames and (np.bincount(walker.astype(int)) == frames).all()
    for i in range(2):
        times = result.time_ps[walker == i]
        np.testing.assert_allclose(np.diff(times), interval * 0.001, atol=1e-9)  # no frame lost or doubled
    colvar = read_colvar(out / "COLVAR")
    assert colvar["walker"].size == 2 * frames and np.isfinite(result.log_weights).all()
    assert np.load(out / "weights.npy").sum() == pytest.approx(1.0)
    bias = np.load(out / "bias.npz")["bias_kjmol"]
    np.testing.assert_allclose(bias, bias_files.shared_bias(out / "bias", (60,)), atol=1e-12)
    assert bias.max() > 0 and len(mdtraj_frames(result)) == 2 * frames


def test_the_learned_cv_loop_and_the_metad_command_run_with_two_walkers(tmp_path, capsys):
    """Round 0 as two runs (of round0.ns each), each biased run as two walkers started apart along the CV, production
    continuing each walker's own state and the shared bias; ``openflow metad --walkers 2`` pools them."""
    tiny = dict(
        TINY_LOOP,
        walkers=2,
        round0={"ns": 0.04},
        rounds={"max": 1, "ns": 0.02},
        production={"ns": 0.02},
        checkpoint_ps=5.0,
        report={"compare": False},
    )
    metrics = run(WORKFLOWS / "quickstart.yaml", tmp_path / "loop", tiny)
    assert metrics["walkers"] == 2 and metrics["round0_runs"] == 2 and metrics["round1_frames"] == 800
    for folder in ("round1/metadynamics", "production"):
        walkers = json.loads((tmp_path / "loop" / folder / "walkers.json").read_text())["walkers"]
        assert [w["frames"] for w in walkers] == [100, 100], folder
    first = [read_colvar(tmp_path / "loop" / "round1" / "metadynamics" / f"walker{i}" / "COLVAR") for i in range(2)]
    assert first[0]["cv"][0] != first[1]["cv"][0]  # started apart along the CV
    production = read_colvar(tmp_path / "loop" / "production" / "walker0" / "COLVAR")
    assert production["time"][0] == pytest.approx(first[0]["time"][-1] + 0.1)  # each walker goes on from its state
    assert metrics["biased_ns_total"] == pytest.approx(0.04)

    out = tmp_path / "metad"
    argv = ["metad", "--system", "alanine_dipeptide", "--cv", "phi-psi", "--steps", "4000", "--interval", "100"]
    argv += ["--frequency", "100", "--platform", "Reference", "--walkers", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    colvar = read_colvar(out / "COLVAR")
    assert colvar["walker"].tolist() == [0] * 20 + [1] * 20 and (out / "rama.png").exists()
    counted = analysis.count_transitions(phi_states(colvar["phi"], PHI_CORE_MARGIN), colvar["walker"])
    assert json.loads((out / "populations.json").read_text())["transitions"] == counted  # inside each walker
    capsys.readouterr()
    assert main(argv + ["--walkers", "0"]) == 2  # checked before any work
    assert "walkers must be a positive integer" in capsys.readouterr().err


def test_joined_segments_are_an_exact_copy_of_the_frames(ala, tmp_path):
    """A run written in segments reads back bit for bit as the frames OpenMM wrote (float32 Angstrom)."""
    import mdtraj

    md = simulate(ala, steps=600, interval=100, out=tmp_path / "md", seed=1, platform="Reference", progress=False)
    join_dcd([md.trajectory, md.trajectory], tmp_path / "joined.dcd", md.topology, 0.001, 100)
    with (
        mdtraj.formats.DCDTrajectoryFile(str(md.trajectory)) as one,
        mdtraj.formats.DCDTrajectoryFile(str(tmp_path / "joined.dcd")) as joined,
    ):
        frames, twice = one.read()[0], joined.read()[0]
    assert twice.shape == (12, 22, 3)
    np.testing.assert_array_equal(twice, np.concatenate([frames, frames]))
