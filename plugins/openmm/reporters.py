"""OpenMM reporters: a PLUMED-style COLVAR file for any ``openmm.app.Simulation``.

The file starts with one header line ``#! FIELDS time <cv names> bias <torsion names>`` and has one
row per report: time in ps, the CV values (CV units), the bias energy in kJ/mol (the potential
energy of one force group, 0 when no bias group is given) and backbone torsions in radians
(``(-pi, pi]``, IUPAC sign, computed from the positions). ``numpy.loadtxt`` reads it back
(``#`` lines are comments); :func:`read_colvar` returns the columns by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import openmm.unit as unit


def dihedral_angles(xyz: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """Dihedral angles of ``quads`` ``(k, 4)`` atom indices in positions ``(..., n_atoms, 3)`` -> ``(..., k)`` radians."""
    a, b, c, d = (xyz[..., quads[:, i], :] for i in range(4))
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.sum(b1 * n2, axis=-1)
    return np.arctan2(y, np.sum(n1 * n2, axis=-1))


class ColvarReporter:
    """Writes a COLVAR text file every ``interval`` steps.

    Args:
        file: path (opened for writing, or appending with ``append=True``) or an open text handle.
        interval: steps between rows.
        cv_values: ``simulation -> sequence of floats`` (e.g. ``Metadynamics.getCollectiveVariables``),
            or None for no CV columns.
        cv_names: names of the CV columns (default ``cv1, cv2, ...``; needs ``cv_values``).
        bias_group: force group whose potential energy is the ``bias`` column (kJ/mol), or None (0).
        torsions: ``{name: (a, b, c, d)}`` atom quadruples written as torsion columns (radians),
            e.g. ``{"phi": (4, 6, 8, 14), "psi": (6, 8, 14, 16)}`` for alanine dipeptide.
        append: continue an existing file (no second header).
    """

    def __init__(self, file, interval: int, cv_values: Callable | None = None, cv_names: Sequence[str] | None = None,
                 bias_group: int | None = None, torsions: dict | None = None, append: bool = False):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval}")
        if cv_names is not None and cv_values is None:
            raise ValueError("cv_names needs cv_values")
        if bias_group is not None and not 0 <= int(bias_group) < 32:
            raise ValueError(f"bias_group must be a force group in [0, 32), got {bias_group}")
        torsions = dict(torsions or {})
        quads = np.asarray(list(torsions.values()), dtype=int).reshape(-1, 4)
        self._interval, self._cv_values, self._bias_group = int(interval), cv_values, bias_group
        self._cv_names, self._torsion_names, self._quads = list(cv_names or []), list(torsions), quads
        self._own = not hasattr(file, "write")
        header_needed = not (append and self._own and Path(file).exists() and Path(file).stat().st_size > 0)
        self._handle = open(file, "a" if append else "w") if self._own else file
        self._header_needed = header_needed

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state):
        cvs = list(self._cv_values(simulation)) if self._cv_values is not None else []
        if self._header_needed:
            names = self._cv_names or [f"cv{i + 1}" for i in range(len(cvs))]
            if len(names) != len(cvs):
                raise ValueError(f"{len(names)} CV names for {len(cvs)} CV values")
            self._cv_names = names
            self._handle.write("#! FIELDS " + " ".join(["time", *names, "bias", *self._torsion_names]) + "\n")
            self._header_needed = False
        bias = 0.0
        if self._bias_group is not None:
            energy = simulation.context.getState(getEnergy=True, groups={int(self._bias_group)}).getPotentialEnergy()
            bias = energy.value_in_unit(unit.kilojoule_per_mole)
        angles = []
        if len(self._quads):
            xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            angles = dihedral_angles(np.asarray(xyz), self._quads).tolist()
        time_ps = state.getTime().value_in_unit(unit.picosecond)
        self._handle.write(" ".join(f"{v:.8g}" for v in [time_ps, *cvs, bias, *angles]) + "\n")
        self._handle.flush()

    def close(self):
        if self._own and not self._handle.closed:
            self._handle.close()

    def __del__(self):
        self.close()


def read_colvar(path) -> dict[str, np.ndarray]:
    """Columns of a COLVAR file by name (from its ``#! FIELDS`` line): ``{name: (T,) array}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COLVAR file not found: {path}")
    with open(path) as handle:
        first = handle.readline().split()
    if first[:2] != ["#!", "FIELDS"]:
        raise ValueError(f"{path}: a COLVAR file starts with '#! FIELDS ...'")
    names = first[2:]
    data = np.loadtxt(path, comments="#", ndmin=2)
    if data.size and data.shape[1] != len(names):
        raise ValueError(f"{path}: {data.shape[1]} columns but {len(names)} field names")
    data = data.reshape(-1, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}
