"""OpenMM reporters: a PLUMED-style COLVAR file, a DCD written to an open handle, an energy log.

The COLVAR file starts with one header line ``#! FIELDS time <cv names> bias`` and has one row per
report: time in ps, the CV values (CV units) and the bias energy in kJ/mol (the potential energy
of one force group, 0 when no bias group is given). ``numpy.loadtxt`` reads it back (``#`` lines
are comments); :func:`read_colvar` returns the columns by name, :func:`add_colvar_columns` appends
columns computed afterwards (e.g. observables of the saved trajectory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import openmm.app as app
import openmm.unit as unit


class DCDStreamReporter:
    """Writes positions (nm) to an open binary DCD file handle every ``interval`` steps (so that the
    caller decides where the file goes, e.g. a ``.part`` name renamed when the run is complete)."""

    def __init__(self, handle, interval: int):
        self._handle, self._interval, self._dcd = handle, interval, None

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state):
        if self._dcd is None:
            dt = simulation.integrator.getStepSize()
            self._dcd = app.DCDFile(self._handle, simulation.topology, dt, self._interval, self._interval)
        self._dcd.writeModel(state.getPositions(asNumpy=True))


class PhysicalEnergyReporter(app.StateDataReporter):
    """A CSV ``StateDataReporter`` (step, time, potential, kinetic, temperature, speed) whose potential
    energy counts only the force groups in the bit mask ``groups`` (e.g. without the tethers of
    inactive components)."""

    def __init__(self, handle, interval: int, groups: int):
        super().__init__(
            handle,
            interval,
            step=True,
            time=True,
            potentialEnergy=True,
            kineticEnergy=True,
            temperature=True,
            speed=True,
        )
        self._groups = groups

    def report(self, simulation, state):
        super().report(simulation, simulation.context.getState(getEnergy=True, groups=self._groups))


class ColvarReporter:
    """Writes a COLVAR text file every ``interval`` steps.

    Args:
        file: path (opened for writing, or appending with ``append=True``) or an open text handle.
        interval: steps between rows.
        cv_values: ``simulation -> sequence of floats`` (e.g. ``Metadynamics.getCollectiveVariables``),
            or None for no CV columns.
        cv_names: names of the CV columns (default ``cv1, cv2, ...``; needs ``cv_values``).
        bias_group: force group whose potential energy is the ``bias`` column (kJ/mol), or None (0).
        append: continue an existing file (no second header).
    """

    def __init__(
        self,
        file,
        interval: int,
        cv_values: Callable | None = None,
        cv_names: Sequence[str] | None = None,
        bias_group: int | None = None,
        append: bool = False,
    ):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be a positive integer, got {interval}")
        if cv_names is not None and cv_values is None:
            raise ValueError("cv_names needs cv_values")
        if bias_group is not None and not 0 <= int(bias_group) < 32:
            raise ValueError(f"bias_group must be a force group in [0, 32), got {bias_group}")
        self._interval, self._cv_values, self._bias_group = int(interval), cv_values, bias_group
        self._cv_names = list(cv_names or [])
        self._own = not hasattr(file, "write")
        header_needed = not (append and self._own and Path(file).exists() and Path(file).stat().st_size > 0)
        self._handle = open(file, "a" if append else "w") if self._own else file
        self._header_needed = header_needed

    def describeNextReport(self, simulation):
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": None, "include": []}

    def report(self, simulation, state):
        cvs = list(self._cv_values(simulation)) if self._cv_values is not None else []
        if self._header_needed:
            names = self._cv_names or [f"cv{i + 1}" for i in range(len(cvs))]
            if len(names) != len(cvs):
                raise ValueError(f"{len(names)} CV names for {len(cvs)} CV values")
            self._cv_names = names
            self._handle.write("#! FIELDS " + " ".join(["time", *names, "bias"]) + "\n")
            self._header_needed = False
        bias = 0.0
        if self._bias_group is not None:
            energy = simulation.context.getState(getEnergy=True, groups={int(self._bias_group)}).getPotentialEnergy()
            bias = energy.value_in_unit(unit.kilojoule_per_mole)
        time_ps = state.getTime().value_in_unit(unit.picosecond)
        self._handle.write(" ".join(f"{v:.8g}" for v in [time_ps, *cvs, bias]) + "\n")
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


def add_colvar_columns(path, columns: dict) -> Path:
    """Append named columns ``{name: (T,) array}`` (one value per row) to a COLVAR file, atomically."""
    path = Path(path)
    data = read_colvar(path)
    n_rows = len(next(iter(data.values()))) if data else 0
    clash = sorted(set(columns) & set(data))
    if clash:
        raise ValueError(f"{path} already has the columns {clash}")
    for name, values in columns.items():
        if np.shape(values) != (n_rows,):
            raise ValueError(f"column {name!r} has shape {np.shape(values)}, the COLVAR file {n_rows} rows")
    names = [*data, *columns]
    table = (
        np.column_stack([*data.values(), *(np.asarray(v, dtype=np.float64) for v in columns.values())])
        if n_rows
        else np.empty((0, len(names)))
    )
    part = path.with_name(path.name + ".part")
    with open(part, "w") as handle:
        handle.write("#! FIELDS " + " ".join(names) + "\n")
        for row in table:
            handle.write(" ".join(f"{v:.8g}" for v in row) + "\n")
    part.replace(path)
    return path
