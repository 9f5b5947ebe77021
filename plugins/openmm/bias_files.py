"""OpenMM's metadynamics bias files: read, snapshot and restore them safely.

``openmm.app.Metadynamics(..., saveFrequency=n, biasDir=d)`` gives each process (a walker) a random
id and keeps its own deposits in ``d/bias_<id>_<index>.npy``: every ``n`` steps it writes
``temp_<id>_<index+1>.npy``, renames it to ``bias_<id>_<index+1>.npy`` (atomic on a POSIX
filesystem) and deletes ``bias_<id>_<index>.npy``; then it loads, for every other id, a file with a
higher index than the one it holds (a file deleted meanwhile is skipped) and sums them into its
bias. A walker killed at any moment therefore leaves a stray ``temp_`` file (ignored: the name does
not match), or two indices of its id (the higher one wins everywhere), never a half-written
``bias_`` file. Arrays are stored with the CV axes reversed (OpenMM's layout).

A killed walker that restarts from a checkpoint must take back the deposits it made after that
checkpoint: :func:`restore` writes the checkpoint's copy of its files as a higher index of the same
id, which every other walker then reloads in place of the newer one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np

PATTERN = re.compile(r"^bias_(\d+)_(\d+)\.npy$")


def newest_files(bias_dir) -> dict[int, tuple[int, Path]]:
    """``{id: (index, path)}`` of the newest bias file of every walker id in ``bias_dir``."""
    newest: dict[int, tuple[int, Path]] = {}
    directory = Path(bias_dir)
    if not directory.is_dir():
        return newest
    for name in os.listdir(directory):
        match = PATTERN.match(name)
        if match is not None:
            walker, index = int(match.group(1)), int(match.group(2))
            if walker not in newest or index > newest[walker][0]:
                newest[walker] = (index, directory / name)
    return newest


def shared_bias(bias_dir, shape: tuple[int, ...]) -> np.ndarray:
    """The bias every walker feels, kJ/mol in OpenMM's layout ``shape``: the sum of the newest file
    of every id (a file replaced while it is read is read again in its newer version)."""
    total = np.zeros(shape)
    for walker in newest_files(bias_dir):
        for _ in range(5):
            index, path = newest_files(bias_dir)[walker]
            try:
                data = np.load(path)
            except (FileNotFoundError, ValueError, OSError):
                continue  # replaced by a newer index meanwhile
            if data.shape != tuple(shape):
                raise ValueError(f"{path} holds a bias of shape {data.shape}, expected {tuple(shape)}")
            total += data
            break
        else:
            raise OSError(f"could not read a stable version of walker {walker}'s bias in {bias_dir}")
    return total


def snapshot(bias_dir, ids, folder) -> None:
    """Copy the newest file of each walker id in ``ids`` into ``folder/bias_<id>.npy``."""
    newest = newest_files(bias_dir)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for walker in ids:
        if walker in newest:
            shutil.copy2(newest[walker][1], Path(folder) / f"bias_{walker}.npy")


def restore(bias_dir, folder) -> list[int]:
    """Put the snapshot in ``folder`` back into ``bias_dir``: each ``bias_<id>.npy`` becomes the newest
    index of its id (written as ``temp_`` and renamed, as OpenMM does), older indices are removed.
    Returns the ids restored."""
    bias_dir = Path(bias_dir)
    restored = []
    for copy in sorted(Path(folder).glob("bias_*.npy")):
        walker = int(copy.stem.split("_")[1])
        index = newest_files(bias_dir).get(walker, (0, None))[0] + 1
        temp = bias_dir / f"temp_{walker}_{index}.npy"
        shutil.copy2(copy, temp)
        os.replace(temp, bias_dir / f"bias_{walker}_{index}.npy")
        for name in os.listdir(bias_dir):
            match = PATTERN.match(name)
            if match is not None and int(match.group(1)) == walker and int(match.group(2)) < index:
                (bias_dir / name).unlink(missing_ok=True)
        restored.append(walker)
    return restored
