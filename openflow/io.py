"""Atomic file output and the run records that let a rerun reuse finished work.

A reader never sees a half-written file, and an interrupted run leaves the old one. A *record* is a
JSON file ``{"settings": ..., ...}`` written next to a stage's outputs when the stage is complete:
:func:`read_record` returns it only while the settings are the same, so a rerun reuses a finished
stage and redoes a changed one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path

import numpy as np


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


def write_json(path, data) -> Path:
    """Write ``data`` as indented JSON atomically; numpy/torch values are converted."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_plain(data), indent=2, sort_keys=True) + "\n")
    return Path(path)


def plain_json(value):
    """``value`` as it reads back from JSON (tuples as lists, numpy numbers as floats, paths as strings)."""
    return json.loads(json.dumps(_plain(value), default=str))


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
