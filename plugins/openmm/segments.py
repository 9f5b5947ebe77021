"""A run written in segments, each closed by a checkpoint, so that a killed run resumes where it was.

Segment ``k`` of a run in ``out`` is ``out/segments/<k>.dcd`` (frames), ``<k>.colvar`` (COLVAR rows)
and ``<k>.npy`` (one number per frame, e.g. the reweighting constant c(t)), written under ``.part``
names and renamed when the segment ends. Then the checkpoint: ``out/checkpoint_<k>/`` (the
Simulation's state, copies of the run's own bias files) and ``out/checkpoint.json`` (the run's
settings, segments done, step, restarts, own bias ids, wall time), replaced in one rename; the
previous checkpoint folder is removed after it. A run that finds a checkpoint with its own settings
deletes whatever came after it and goes on from there: a kill costs the work since the last
checkpoint, and no frame is written twice or lost. :meth:`Segments.join` writes the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mdtraj
import numpy as np
import openmm.app as app
import openmm.unit as unit

from openflow.io import plain_json, quiet_stdout, write_json

from . import bias_files
from .reporters import read_colvar

CHECKPOINT = "checkpoint.json"


@dataclass
class SegmentFiles:
    """The ``.part`` paths of one segment and its per-frame ``values`` (filled by the caller)."""

    dcd: Path
    colvar: Path
    values: list = field(default_factory=list)


class Segments:
    """The segments and checkpoints of one run in ``out`` with ``settings`` (JSON-like)."""

    def __init__(self, out, settings: dict):
        self.out, self.settings = Path(out), plain_json(settings)
        self.folder = self.out / "segments"
        self.record = self._read()
        self.next = self.done  # the index of the segment to write next
        self._read_colvars: dict[Path, dict] = {}  # finished segments' COLVAR columns, read once

    def _read(self) -> dict | None:
        try:
            record = json.loads((self.out / CHECKPOINT).read_text())
        except (OSError, ValueError):
            return None
        if record.get("settings") != self.settings or not (self.out / record["folder"] / "state.xml").is_file():
            return None
        return record

    @property
    def resumed(self) -> bool:
        """Whether a checkpoint of this run was found."""
        return self.record is not None

    @property
    def done(self) -> int:
        return self.record["segments"] if self.record else 0

    @property
    def state(self) -> Path:
        """The checkpoint's state file (``Simulation.loadState``)."""
        return self.out / self.record["folder"] / "state.xml"

    def start(self, bias_dir) -> None:
        """Fresh run: remove earlier segments and checkpoints. Resumed run: remove what came after the
        checkpoint and put the checkpoint's own bias back into ``bias_dir`` (:func:`bias_files.restore`)."""
        if self.record is None:
            self.clear()
        else:
            for path in self.folder.glob("*"):
                if path.suffix == ".part" or int(path.name.split(".")[0]) >= self.done:
                    path.unlink()
            for folder in self.out.glob("checkpoint_*"):
                if folder.name != self.record["folder"]:
                    shutil.rmtree(folder, ignore_errors=True)
            if bias_dir is not None:
                bias_files.restore(bias_dir, self.out / self.record["folder"])
        self.folder.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Remove every segment and checkpoint of this folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
        for folder in self.out.glob("checkpoint_*"):
            shutil.rmtree(folder, ignore_errors=True)
        (self.out / CHECKPOINT).unlink(missing_ok=True)

    @contextlib.contextmanager
    def segment(self):
        """Yield the next segment's :class:`SegmentFiles`; on success rename them into place (the
        values saved as ``<k>.npy``), on failure delete them."""
        k = self.next
        files = SegmentFiles(self.folder / f"{k:05d}.dcd.part", self.folder / f"{k:05d}.colvar.part")
        try:
            yield files
        except BaseException:
            for path in (files.dcd, files.colvar):
                path.unlink(missing_ok=True)
            raise
        np.save(self.folder / f"{k:05d}.npy", np.asarray(files.values, dtype=np.float64))
        os.replace(files.colvar, self.folder / f"{k:05d}.colvar")
        os.replace(files.dcd, self.folder / f"{k:05d}.dcd")
        self.next = k + 1

    def checkpoint(self, simulation, step: int, bias_dir, own_ids, **extra) -> None:
        """Close the segments written so far with a checkpoint at ``step``: the state, copies of the
        own bias files (ids ``own_ids`` in ``bias_dir``), and the record (``extra`` included)."""
        k = self.next
        folder = self.out / f"checkpoint_{k:05d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        simulation.saveState(str(folder / "state.xml"))
        if bias_dir is not None:
            bias_files.snapshot(bias_dir, own_ids, folder)
        previous = self.record["folder"] if self.record else None
        self.record = dict(extra, settings=self.settings, segments=k, step=int(step), folder=folder.name)
        self.record["own_bias_ids"] = [int(i) for i in own_ids]
        write_json(self.out / CHECKPOINT, self.record)
        if previous and previous != folder.name:
            shutil.rmtree(self.out / previous, ignore_errors=True)

    def colvar(self) -> dict[str, np.ndarray]:
        """The COLVAR columns of every finished segment, joined."""
        paths = sorted(self.folder.glob("*.colvar"))
        for path in paths:
            if path not in self._read_colvars:
                self._read_colvars[path] = read_colvar(path)
        parts = [self._read_colvars[path] for path in paths]
        if not parts:
            return {}
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def values(self) -> np.ndarray:
        """The per-frame values of every finished segment, joined."""
        paths = sorted(self.folder.glob("*.npy"))
        return np.concatenate([np.load(path) for path in paths]) if paths else np.empty(0)

    def join(self, trajectory, colvar, pdb, simulation, interval: int, first_step: int) -> np.ndarray:
        """Write the whole run: ``trajectory`` (DCD, segment after segment, with the time step of
        ``simulation`` and the frame ``interval`` in its header), ``colvar`` (one header); ``pdb``:
        the topology file of the frames. Returns the joined per-frame values."""
        dt_ps = simulation.integrator.getStepSize().value_in_unit(unit.picosecond)
        join_dcd(sorted(self.folder.glob("*.dcd")), trajectory, pdb, dt_ps, interval, first_step)
        columns = self.colvar()
        with open(colvar, "w") as handle:
            handle.write("#! FIELDS " + " ".join(columns) + "\n")
            np.savetxt(handle, np.column_stack(list(columns.values())), fmt="%.8g")
        return self.values()

    def finish(self) -> None:
        """Remove the segments and checkpoints once the whole run is written."""
        self.clear()


def join_dcd(paths, trajectory, pdb, timestep_ps: float, interval: int, first_step: int = 0) -> None:
    """Write the frames of the DCD files ``paths`` (atoms of the PDB ``pdb``) one after the other into
    ``trajectory``, with the time step, the frame ``interval`` and the first frame's step in its header.
    The coordinates are copied exactly (the files' float32 Angstrom values, read raw), and so are the
    box lengths of a periodic system."""
    topology = app.PDBFile(str(pdb)).topology
    with open(trajectory, "wb") as handle:
        dcd = app.DCDFile(handle, topology, timestep_ps * unit.picosecond, first_step + interval, interval)
        for path in paths:
            with quiet_stdout(), mdtraj.formats.DCDTrajectoryFile(str(path)) as source:
                angstrom, lengths, _ = source.read()
            for k, xyz in enumerate(angstrom.astype(np.float64) / 10.0):
                box = None if lengths is None else lengths[k].astype(np.float64) / 10.0 * unit.nanometer
                dcd.writeModel(xyz * unit.nanometer, unitCellDimensions=box)
