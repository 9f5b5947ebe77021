"""Trajectories in, tensors out: mdtraj loading into torch, Kabsch alignment, mdshare downloads.

- :func:`load` reads a trajectory with mdtraj into a ``(B, d)`` tensor of positions in nm.
- :func:`fetch_mdshare` gets a file of the mdshare repository when its server answers, and
  otherwise says so in one line and returns None, so that the caller falls back to its own data
  (e.g. an OpenMM simulation); downloads are written under a ``.part`` name and renamed when complete.

Simulations themselves are run by ``openflow.plugins.openmm.md``.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import os
import socket
import struct
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import mdtraj
import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from openflow.features import select_atoms
from openflow.io import quiet_stdout

# ----------------------------------------------------------------------------- loading


def _existing(path, what: str) -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return str(path)


AKMA_PS = 0.04888821  # the CHARMM time unit of DCD headers, in ps


def dcd_header(path) -> dict | None:
    """What a DCD file's header says: ``frames`` (OpenMM updates it after every frame), ``interval``
    (steps between frames) and ``frame_ps`` (time between frames); None when ``path`` is not a DCD
    file with a readable header."""
    with open(path, "rb") as handle:
        head = handle.read(48)
    for order in "<>":
        if len(head) == 48 and struct.unpack(order + "i", head[:4])[0] == 84 and head[4:8] == b"CORD":
            frames, _, interval = struct.unpack(order + "3i", head[8:20])
            (delta,) = struct.unpack(order + "f", head[44:48])
            return {"frames": frames, "interval": interval, "frame_ps": interval * float(delta) * AKMA_PS}
    return None


def load_trajectory(traj, top=None, stride: int = 1, atom_indices=None) -> mdtraj.Trajectory:
    """``mdtraj.load`` of one or several trajectory files, with a clear error for a missing file and for a
    DCD shorter than its header promises (an interrupted copy or run), and without the DCD plugin's
    messages on stdout."""
    paths = [traj] if isinstance(traj, (str, os.PathLike)) else list(traj)
    paths = [_existing(p, "trajectory") for p in paths]
    if top is not None and not isinstance(top, mdtraj.Topology):
        top = _existing(top, "topology")
    with quiet_stdout():
        frames = [mdtraj.load(path, top=top, stride=int(stride), atom_indices=atom_indices) for path in paths]
    for path, part in zip(paths, frames):
        header = dcd_header(path) if path.lower().endswith(".dcd") else None
        promised = header["frames"] if header else None
        if promised is not None and promised > 0 and -(-promised // int(stride)) > part.n_frames:
            raise ValueError(
                f"{path} holds {part.n_frames * int(stride)} of the {promised} frames its header promises: "
                "the file is truncated (an interrupted copy or run); use a complete file"
            )
    return frames[0] if len(frames) == 1 else mdtraj.join(frames)


def kabsch(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Superpose ``x (T, m, 3)`` on ``reference (m, 3)``: the optimal rotation (batched SVD) about the
    centroids, then the reference's centroid; same dtype as ``x``.

    Used instead of mdtraj's ``superpose``, whose float32 QCP iteration returns the identity (an
    unaligned frame) for the rare frame where it does not converge (1 in 20 000 alanine frames).
    """
    x = x - x.mean(1, keepdim=True)
    centre = reference.mean(0)
    u, _, vt = torch.linalg.svd(x.transpose(1, 2) @ (reference - centre))
    sign = torch.sign(torch.linalg.det(u @ vt))
    u = torch.cat([u[..., :2], u[..., 2:] * sign[:, None, None]], -1)
    return x @ (u @ vt) + centre


def load(
    traj,
    top=None,
    selection: str | None = None,
    align: bool = False,
    system=None,
    stride: int = 1,
    dtype: torch.dtype = torch.float32,
    reference=None,
) -> torch.Tensor:
    """Read a trajectory into a ``(B, d)`` tensor of positions in nm.

    Args:
        traj: trajectory file (DCD, XTC, PDB, ... anything mdtraj reads) or a list of them.
        top: topology file (PDB); may be omitted when ``system`` is given.
        selection: an mdtraj selection string, or ``"heavy"`` (no hydrogens) or ``"all"``;
            ``d = 3 * n_selected``, atoms in file order, xyz interleaved.
        align: superpose every frame on ``reference`` (default: the first loaded frame) by the
            optimal translation and rotation (Kabsch) over the selected atoms. This removes
            rigid-body motion, which carries no energy but would otherwise be modelled by a flow.
        system: an ``openflow.systems.System``; without ``selection`` the result holds its active
            coordinates (``system.from_positions``), so the inactive components are dropped.
        stride: keep every ``stride``-th frame.
        reference: alignment target, an ``mdtraj.Trajectory`` or positions of the selected atoms,
            ``(n_selected, 3)`` or flat ``(3 * n_selected,)`` like one row of the result, nm.
    """
    if top is None:
        if system is None:
            raise ValueError("give a topology file (top=) or a system (system=)")
        topology = system.mdtraj_topology
    else:
        with quiet_stdout():
            topology = mdtraj.load_topology(_existing(top, "topology"))
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride}")

    atoms = None
    if selection is not None:
        atoms = select_atoms(topology, selection)
    elif system is not None and align and not system.active.all():
        raise ValueError("align=True would mix active and inactive components of this system")
    frames = load_trajectory(traj, topology, stride=int(stride), atom_indices=atoms)

    if align:
        if reference is None:
            target = frames[0]
        elif isinstance(reference, mdtraj.Trajectory):
            target = reference
        else:
            xyz = np.asarray(
                reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference, dtype=np.float32
            )
            if xyz.size != 3 * frames.n_atoms:
                raise ValueError(f"reference must hold {frames.n_atoms} x 3 positions, got shape {xyz.shape}")
            target = mdtraj.Trajectory(xyz.reshape(1, frames.n_atoms, 3), frames.topology)
        if target.n_atoms != frames.n_atoms:
            raise ValueError(f"reference has {target.n_atoms} atoms, the selection {frames.n_atoms}")
        aligned = kabsch(
            torch.as_tensor(frames.xyz, dtype=torch.float64), torch.as_tensor(target.xyz[0], dtype=torch.float64)
        )
        frames.xyz = aligned.numpy()

    if selection is None and system is not None:
        return system.from_positions(frames.xyz, dtype=dtype)
    return torch.as_tensor(frames.xyz.reshape(frames.n_frames, -1), dtype=dtype)


def save_frames(positions, topology, stem) -> dict:
    """Write frames ``(F, 3n)`` or ``(F, n, 3)`` nm of an ``mdtraj.Topology`` as ``stem.pdb`` and
    ``stem.dcd`` (each complete or absent: written under a ``.part`` name); returns both paths."""
    xyz = np.asarray(positions.detach().cpu().numpy() if isinstance(positions, torch.Tensor) else positions)
    trajectory = mdtraj.Trajectory(xyz.reshape(len(xyz), -1, 3), topology)
    stem = Path(stem)
    files = {"pdb": stem.with_suffix(".pdb"), "dcd": stem.with_suffix(".dcd")}
    for kind, path in files.items():
        part = path.with_name(path.stem + ".part" + path.suffix)
        getattr(trajectory, f"save_{kind}")(str(part))
        part.replace(path)
    return files


# ----------------------------------------------------------------------------- mdshare

MDSHARE_URL = "http://ftp.imp.fu-berlin.de/pub/cmb-data/"


def _say(message: str) -> None:
    print(f"openflow: {message}", file=sys.stderr)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` s (name lookup included), or None."""
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    outcome: list = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    worker = threading.Thread(target=connect, daemon=True)  # a stuck name lookup cannot block us
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _mdshare_checksums() -> dict[str, str]:
    """md5 of every file in mdshare's catalogue, read from the installed package's data.

    The catalogue is read as a file: importing mdshare 0.4.2 fails on setuptools >= 81
    (it needs ``pkg_resources``), and the download itself needs nothing from it.
    """
    spec = importlib.util.find_spec("mdshare")
    if spec is None or not spec.submodule_search_locations:
        return {}
    catalogue = Path(list(spec.submodule_search_locations)[0]) / "data" / "mdshare-catalogue.yaml"
    if not catalogue.exists():
        return {}
    index = yaml.safe_load(catalogue.read_text()).get("index", {})
    return {name: entry["hash"] for name, entry in index.items()}


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_mdshare(
    filename: str, directory="mdshare", timeout: float = 3.0, url: str = MDSHARE_URL, progress: bool = True
) -> Path | None:
    """Download ``filename`` from the mdshare repository into ``directory``; return its path.

    A file already in ``directory`` is returned without touching the network. When the server
    cannot be reached within ``timeout`` seconds (or the download fails or its md5 differs from
    mdshare's catalogue) one line goes to stderr and the result is ``None``: never a traceback,
    never a hang.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https") or not urllib.parse.urlsplit(url).hostname:
        raise ValueError(f"url must look like http://host/folder/, got {url!r}")
    target = Path(directory) / filename
    if target.exists():
        return target
    why = _unreachable(url, timeout)
    if why is not None:
        _say(f"mdshare ({urllib.parse.urlsplit(url).hostname}) is not reachable ({why}); {filename} not fetched")
        return None
    checksum = _mdshare_checksums().get(filename)
    partial = target.with_name(target.name + ".part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # the host answered: allow a slow transfer, but not a stalled one
        with (
            urllib.request.urlopen(url.rstrip("/") + "/" + filename, timeout=max(timeout, 30.0)) as response,
            open(partial, "wb") as handle,
        ):
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    handle.write(block)
                    bar.update(len(block))
        if checksum is not None and _md5(partial) != checksum:
            raise OSError("md5 checksum differs from mdshare's catalogue")
    except (OSError, http.client.HTTPException) as error:
        partial.unlink(missing_ok=True)
        _say(f"downloading {filename} from mdshare failed ({error})")
        return None
    os.replace(partial, target)
    return target
