"""Atomic file output and the run records that let a rerun reuse finished work.

A reader never sees a half-written file, and an interrupted run leaves the old one. A *record* is a
JSON file ``{"settings": ..., ...}`` written next to a stage's outputs when the stage is complete:
:func:`read_record` returns it only while the settings are the same, so a rerun reuses a finished
stage and redoes a changed one.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def _plain(value):
    """JSON-friendly version of numpy/torch scalars and arrays; non-finite floats become null."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_folder(path) -> None:
    """Raise ``NotADirectoryError`` (one line) when ``path`` or a folder above it exists as a file, so
    that an unusable output folder is an error before any work (nothing is created)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is a file, not a folder: cannot write {path}")
            return


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON atomically; numpy/torch values are converted."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(data), indent=2, sort_keys=True) + "\n")
    return Path(path)


def plain_json(value):
    """``value`` as it reads back from JSON (tuples as lists, numpy numbers as floats, paths as strings)."""
    return json.loads(json.dumps(_plain(value), default=str))


def digest(*arrays) -> str:
    """A short hash of arrays (numpy, or torch tensors on the CPU; None skipped) taken as float64:
    what a cached result was computed from."""
    hashed = hashlib.sha256()
    for array in arrays:
        if array is not None:
            hashed.update(np.asarray(array, dtype=np.float64).tobytes())
    return hashed.hexdigest()[:16]


def read_record(path, settings: dict, files=()) -> dict | None:
    """The record in ``path`` if its ``"settings"`` equal ``settings`` (compared as JSON) and every
    path in ``files`` exists; else None (missing, unreadable or changed: the stage runs again)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("settings") != plain_json(settings):
        return None
    return saved if all(Path(f).exists() for f in files) else None


def write_record(path, settings: dict, **data) -> Path:
    """Write the record of a finished stage: its settings and ``data`` (JSON), atomically."""
    return write_json(path, dict(data, settings=plain_json(settings)))


def differences(saved, wanted, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf where two JSON-like settings differ."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [
            line
            for key in sorted(set(saved) | set(wanted), key=str)
            for line in differences(saved.get(key), wanted.get(key), f"{prefix}{key}.")
        ]
    if plain_json(saved) != plain_json(wanted):
        return [f"{prefix.rstrip('.')}: {saved!r} -> {wanted!r}"]
    return []


def changes(saved, wanted, limit: int = 3) -> str:
    """The first ``limit`` :func:`differences`, as one phrase."""
    found = differences(saved, wanted)
    return "; ".join(found[:limit]) + (", ..." if len(found) > limit else "")


def cached_stage(path, settings: dict, compute) -> tuple[dict, dict]:
    """A stage ``compute() -> (metrics, files)`` run once per ``settings``: a rerun with the same settings
    returns the recorded metrics and files (while the files exist); changed settings run it again, and
    one line on stderr says what changed. The record is ``path`` (JSON)."""
    path = Path(path)
    record = read_record(path, settings)
    if record is not None and all(Path(f).exists() for f in record["files"].values()):
        return record["metrics"], {key: Path(value) for key, value in record["files"].items()}
    try:
        previous = json.loads(path.read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous is not None:
        why = changes(previous, plain_json(settings)) or "an output file is missing"
        say(f"{path.parent}: running {path.stem} again: {why}")
    metrics, files = compute()
    write_record(path, settings, metrics=metrics, files={key: str(value) for key, value in files.items()})
    return metrics, files


def say(message: str) -> None:
    """One line for the user on stderr (stdout stays for results)."""
    print(f"openflow: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stdout():
    """Silence what C libraries print on the process's standard output inside the block (mdtraj's DCD
    plugin announces every file it opens), so that stdout carries only results. Python's own
    ``print`` is unaffected before and after."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to silence
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # what the C library still buffers goes to /dev/null too
        os.dup2(saved, 1)
        os.close(saved)


class _LineProgress:
    """Progress off a terminal: a line on stderr at each quarter of the work (no carriage returns in logs)."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        self.total, self.desc, self.done, self.start = max(int(total), 1), desc, int(initial), time.perf_counter()
        self.next_quarter = self.done * 4 // self.total + 1

    def update(self, n: int = 1) -> None:
        self.done += n
        while self.next_quarter <= 4 and self.done * 4 >= self.next_quarter * self.total:
            say(f"{self.desc}: {25 * self.next_quarter}% ({time.perf_counter() - self.start:.0f} s)")
            self.next_quarter += 1

    def set_postfix(self, **_) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def progress(total: int, desc: str, enabled: bool | None = True, initial: int = 0, **options):
    """A progress bar for ``total`` units of work: tqdm on a terminal, a line per quarter on stderr off one
    (logs, pipes), nothing when ``enabled`` is False (``None``: only on a terminal). Use as a context
    manager or call ``update(n)`` and ``close()``."""
    terminal = sys.stderr.isatty()
    if enabled is False or (enabled is None and not terminal):
        return tqdm(total=total, disable=True)
    if terminal:
        return tqdm(total=total, desc=desc, initial=initial, **options)
    return _LineProgress(total, desc, initial)
