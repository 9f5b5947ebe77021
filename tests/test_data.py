"""Trajectories: the MD driver (every system), loading into torch, mdshare offline and online."""

import functools
import http.server
import json
import socket
import threading
import time

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest
import torch

from openflow.data import fetch_mdshare, kabsch, load
from openflow.plugins.openmm.md import SimulationResult, default_timestep, simulate
from openflow.systems import build, harmonic_chain

STEPS, INTERVAL = 300, 30
SYSTEMS = {
    "chain": ("harmonic_chain", dict(n=16, boundary="fixed-free")),
    "cluster2d": ("coulomb_cluster", dict(n=6, dim=2)),
    "cluster3d": ("coulomb_cluster", dict(n=13, dim=3)),
    "ala_vacuum": ("alanine_dipeptide", dict(solvent="vacuum")),
    "ala_implicit": ("alanine_dipeptide", dict(solvent="implicit")),
}


def run_short(system, out, seed=1, **kwargs):
    options = dict(
        steps=STEPS, interval=INTERVAL, seed=seed, platform="Reference", equilibration_steps=100, progress=False
    )
    return simulate(system, out=out, **{**options, **kwargs})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short simulation per system: name -> (System, SimulationResult)."""
    results = {}
    for key, (name, kwargs) in SYSTEMS.items():
        system = build(name, **kwargs)
        results[key] = system, run_short(system, tmp_path_factory.mktemp(key))
    return results


def read_log(path) -> np.ndarray:
    """energies.csv -> (frames, 6): step, time, potential, kinetic, temperature, speed."""
    return np.loadtxt(path, delimiter=",", comments="#", ndmin=2)


# ----------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("key", SYSTEMS)
def test_simulation_writes_complete_readable_outputs(runs, key):
    system, result = runs[key]
    assert isinstance(result, SimulationResult)
    frames = mdtraj.load(str(result.trajectory), top=str(result.topology))
    assert frames.n_frames == result.n_frames == STEPS // INTERVAL
    assert frames.n_atoms == system.n_atoms
    assert np.isfinite(frames.xyz).all()
    log = read_log(result.energies)
    assert log.shape == (STEPS // INTERVAL, 6)
    np.testing.assert_array_equal(log[:, 0], INTERVAL * np.arange(1, STEPS // INTERVAL + 1))
    np.testing.assert_allclose(log[:, 1], log[:, 0] * result.timestep_ps, rtol=1e-9)
    assert np.isfinite(log[:, 2:5]).all() and (log[:, 3:5] > 0).all()
    metadata = json.loads(result.metadata.read_text())
    assert metadata["seed"] == 1 and metadata["platform"] == "Reference" and metadata["parameters"] == system.parameters
    assert not list(result.trajectory.parent.glob("*.part"))


@pytest.mark.parametrize("key", ["ala_vacuum", "ala_implicit"])
def test_alanine_dipeptide_output_has_backbone_dihedrals(runs, key):
    _, result = runs[key]
    frames = mdtraj.load(str(result.trajectory), top=str(result.topology))
    for compute in (mdtraj.compute_phi, mdtraj.compute_psi):
        indices, angles = compute(frames)
        assert indices.shape == (1, 4) and angles.shape == (frames.n_frames, 1)
        assert np.isfinite(angles).all() and (np.abs(angles) <= np.pi).all()


def test_default_timesteps_follow_constraints():
    from openflow.systems import alanine_dipeptide

    def femtoseconds(system):
        return default_timestep(system).value_in_unit(unit.femtosecond)

    assert femtoseconds(alanine_dipeptide()) == pytest.approx(1.0)
    assert femtoseconds(alanine_dipeptide(constraints="hbonds")) == pytest.approx(2.0)
    assert femtoseconds(harmonic_chain(n=4)) == pytest.approx(10.0)


def test_logged_potential_is_the_physical_chain_energy(runs):
    """The log's potential equals V = 1/2 q^T K q of the saved frames (tethers left out)."""
    system, result = runs["chain"]
    x = mdtraj.load(str(result.trajectory), top=str(result.topology)).xyz[:, :, 0].astype(np.float64)
    exact = 0.5 * np.einsum("bi,ij,bj->b", x, system.stiffness_matrix(), x)
    np.testing.assert_allclose(read_log(result.energies)[:, 2], exact, rtol=1e-4, atol=1e-5)


def test_chain_thermalises_and_inactive_components_stay_tethered(tmp_path):
    """Kinetic temperature equals T; tethered y, z have <c^2> = kT / k_tether = 0.1 nm^2 (x free)."""
    system = harmonic_chain(n=32)
    result = run_short(system, tmp_path, seed=7, steps=4000, interval=10, equilibration_steps=500)
    xyz = mdtraj.load(str(result.trajectory), top=str(result.topology)).xyz.astype(np.float64)
    assert np.mean(xyz[:, :, 1:] ** 2) == pytest.approx(0.1, rel=0.15)
    assert np.abs(xyz[:, :, 1:]).max() < 2.0
    temperature = read_log(result.energies)[:, 4].mean()
    assert temperature == pytest.approx(system.temperature.value_in_unit(unit.kelvin), rel=0.1)


def test_same_seed_same_trajectory_on_reference(tmp_path):
    system = build("alanine_dipeptide")
    first, again, other = (
        run_short(system, tmp_path / name, seed=seed, steps=100, interval=20)
        for name, seed in (("a", 5), ("b", 5), ("c", 6))
    )
    xyz = [mdtraj.load(str(r.trajectory), top=str(r.topology)).xyz for r in (first, again, other)]
    np.testing.assert_array_equal(xyz[0], xyz[1])
    assert np.abs(xyz[0] - xyz[2]).max() > 1e-4


class _Interrupt:
    """An OpenMM reporter that stops the run like Ctrl-C after ``at`` steps."""

    def __init__(self, at):
        self.at = at

    def describeNextReport(self, simulation):
        return {"steps": self.at - simulation.currentStep, "periodic": None, "include": []}

    def report(self, simulation, state):
        raise KeyboardInterrupt


def test_interrupted_run_leaves_no_complete_looking_file_and_no_part_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_short(harmonic_chain(n=4), tmp_path, reporters=[_Interrupt(at=90)])
    assert not list(tmp_path.glob("*.dcd")) and not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob("*.json"))
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=10, ns=1.0), "exactly one"),
        (dict(), "exactly one"),
        (dict(steps=10, interval=20), "no frame"),
        (dict(steps=10, interval=5, timestep=-1.0), "timestep"),
        (dict(steps=10, interval=5, friction=0.0), "friction"),
        (dict(steps=10, interval=5, seed=-3), "seed"),
    ],
)
def test_simulate_rejects_bad_input(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        simulate(harmonic_chain(n=2), out=tmp_path, progress=False, **kwargs)


# ----------------------------------------------------------------------------- load


def test_load_shapes_selections_and_stride(runs):
    system, result = runs["ala_vacuum"]
    frames = STEPS // INTERVAL
    assert load(result.trajectory, result.topology, selection="heavy").shape == (frames, 30)
    assert load(result.trajectory, result.topology, selection="backbone").shape == (frames, 24)
    everything = load(result.trajectory, result.topology, dtype=torch.float64)
    assert everything.shape == (frames, 66) and everything.dtype == torch.float64
    xyz = mdtraj.load(str(result.trajectory), top=str(result.topology)).xyz
    np.testing.assert_array_equal(everything.numpy(), xyz.reshape(frames, -1))
    assert torch.equal(load(result.trajectory, system=system, stride=2), everything[::2].float())


def test_load_with_system_drops_inactive_components(runs):
    system, result = runs["cluster2d"]
    x = load(result.trajectory, result.topology, system=system)
    xyz = mdtraj.load(str(result.trajectory), top=str(result.topology)).xyz
    assert x.shape == (STEPS // INTERVAL, system.dim) == (STEPS // INTERVAL, 12)
    np.testing.assert_array_equal(x.numpy(), xyz[:, :, :2].reshape(len(xyz), -1))
    with pytest.raises(ValueError, match="inactive"):
        load(result.trajectory, result.topology, system=system, align=True)


def _rmsd_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Plain (no superposition) RMSD of every frame ``(B, 3n)`` to ``reference`` ``(3n,)``."""
    return ((x - reference) ** 2).view(len(x), -1, 3).sum(-1).mean(-1).sqrt()


def test_alignment_removes_rigid_body_motion(runs, tmp_path):
    _, result = runs["ala_vacuum"]
    raw = load(result.trajectory, result.topology, selection="heavy", dtype=torch.float64)
    aligned = load(result.trajectory, result.topology, selection="heavy", align=True, dtype=torch.float64)
    assert (_rmsd_to(aligned, aligned[0]) <= _rmsd_to(raw, raw[0]) + 1e-6).all()
    np.testing.assert_allclose(aligned[0], raw[0], atol=1e-6)  # the reference stays where it is

    frame = mdtraj.load_frame(str(result.trajectory), 0, top=str(result.topology))
    angle = 1.1
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    moved = frame.xyz[0] @ rotation.T + np.array([0.7, -1.2, 2.0])
    both = mdtraj.Trajectory(np.stack([frame.xyz[0], moved]).astype(np.float32), frame.topology)
    both.save_dcd(str(tmp_path / "rotated.dcd"))
    x = load(tmp_path / "rotated.dcd", result.topology, align=True, dtype=torch.float64)
    np.testing.assert_allclose(x[1], x[0], atol=1e-5)
    assert np.abs(both.xyz[1] - both.xyz[0]).max() > 1.0  # the test is not vacuous

    for reference in (moved, torch.as_tensor(moved.reshape(-1))):
        target = load(tmp_path / "rotated.dcd", result.topology, align=True, reference=reference, dtype=torch.float64)
        np.testing.assert_allclose(target[0], moved.reshape(-1), atol=1e-5)


def test_kabsch_undoes_rotations_and_translations_but_not_reflections():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    rotations = torch.linalg.qr(torch.randn(5, 3, 3, generator=generator, dtype=torch.float64))[0]
    rotations = rotations * torch.sign(torch.linalg.det(rotations))[:, None, None]  # proper rotations
    moved = reference @ rotations + torch.randn(5, 1, 3, generator=generator, dtype=torch.float64)
    assert torch.allclose(kabsch(moved, reference), reference.expand(5, -1, -1), atol=1e-12)
    mirrored = kabsch(-moved, reference)  # a mirror image cannot be rotated onto the reference
    assert ((mirrored - reference) ** 2).sum(-1).mean(-1).sqrt().min() > 0.1


def test_load_bad_input(runs, tmp_path):
    _, result = runs["ala_vacuum"]
    with pytest.raises(FileNotFoundError, match="nothing.dcd"):
        load(tmp_path / "nothing.dcd", result.topology)
    with pytest.raises(FileNotFoundError, match="nothing.pdb"):
        load(result.trajectory, tmp_path / "nothing.pdb")
    with pytest.raises(ValueError, match="selection"):
        load(result.trajectory, result.topology, selection="name XYZ")
    with pytest.raises(ValueError, match="selection"):
        load(result.trajectory, result.topology, selection="resname (")
    with pytest.raises(ValueError, match="topology"):
        load(result.trajectory)


# ----------------------------------------------------------------------------- mdshare


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("url", ["closed", "http://192.0.2.1/"])  # refused; unroutable (TEST-NET-1)
def test_fetch_mdshare_offline_returns_none_quickly_with_one_line(tmp_path, capsys, url):
    url = _closed_port_url() if url == "closed" else url
    start = time.perf_counter()
    assert fetch_mdshare("alanine-dipeptide-nowater.pdb", tmp_path, timeout=0.5, url=url) is None
    assert time.perf_counter() - start < 2.0
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "not reachable" in message
    assert not list(tmp_path.iterdir())


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server over ``tmp_path / 'served'``; yields (folder, url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_mdshare_downloads_and_checks_md5(file_server, tmp_path, capsys):
    folder, url = file_server
    (folder / "notes.txt").write_bytes(b"not in mdshare's catalogue\n")
    (folder / "alanine-dipeptide-nowater.pdb").write_text("REMARK not the real file\nEND\n")
    local = tmp_path / "local"
    path = fetch_mdshare("notes.txt", local, url=url, progress=False)
    assert path == local / "notes.txt" and path.read_bytes() == b"not in mdshare's catalogue\n"
    assert fetch_mdshare("alanine-dipeptide-nowater.pdb", local, url=url, progress=False) is None
    assert "md5" in capsys.readouterr().err
    assert sorted(p.name for p in local.iterdir()) == ["notes.txt"]
    assert fetch_mdshare("notes.txt", local, url=_closed_port_url()) == path  # cached: no network


def test_simulate_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    from openflow.cli import main

    command = [
        "simulate",
        "--system",
        "harmonic_chain",
        "--n",
        "3",
        "--steps",
        "20",
        "--interval",
        "10",
        "--seed",
        "1",
        "--platform",
        "Reference",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(command) == 0
    stamp = (tmp_path / "trajectory.dcd").stat().st_mtime_ns
    assert main(command) == 2 and "exists" in capsys.readouterr().err
    assert (tmp_path / "trajectory.dcd").stat().st_mtime_ns == stamp
    assert main([*command, "--overwrite"]) == 0 and (tmp_path / "trajectory.dcd").stat().st_mtime_ns != stamp


def test_reuse_returns_a_finished_run_with_the_same_settings_only(tmp_path):
    chain = harmonic_chain(3)
    first = simulate(chain, steps=200, interval=20, out=tmp_path, seed=4, progress=False, platform="Reference")
    stamp = first.trajectory.stat().st_mtime_ns
    again = simulate(
        chain, steps=200, interval=20, out=tmp_path, seed=4, progress=False, platform="Reference", reuse=True
    )
    assert again.trajectory.stat().st_mtime_ns == stamp and again.n_frames == first.n_frames
    other = simulate(
        chain, steps=200, interval=20, out=tmp_path, seed=5, progress=False, platform="Reference", reuse=True
    )
    assert other.trajectory.stat().st_mtime_ns != stamp  # a different seed runs again
