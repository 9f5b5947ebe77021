"""A user's own system from files: a serialized ``openmm.System`` (XML) and a PDB with the same atoms.

    system = from_files("system.xml", "structure.pdb", temperature_K=300.0)

``openmm.XmlSerializer.serialize(system)`` is how OpenMM users save a System; the PDB gives the
topology (bonds, elements, residues) and the starting positions. Every Cartesian component is
active. Nothing else is assumed: a molecule, a cluster or one particle in an external field.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from .base import System


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def _read_system(path: Path) -> openmm.System:
    try:
        system = openmm.XmlSerializer.deserialize(path.read_text())
    except Exception as error:  # OpenMM raises a bare Exception for malformed XML
        raise ValueError(
            f"{path} is not a serialized openmm.System ({str(error).strip() or type(error).__name__})"
        ) from None
    if not isinstance(system, openmm.System):
        raise ValueError(
            f"{path} holds a {type(system).__name__}, not an openmm.System "
            "(save one with openmm.XmlSerializer.serialize)"
        )
    return system


def _read_pdb(path: Path) -> app.PDBFile:
    try:
        return app.PDBFile(str(path))
    except Exception as error:  # the PDB reader raises several types for a malformed file
        raise ValueError(f"{path} is not a readable PDB file ({error})") from None


def starting_energy(system: openmm.System, positions) -> float:
    """Potential energy (kJ/mol) of ``positions`` on the Reference platform; NaN if OpenMM fails."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    try:
        context.setPositions(positions)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    except openmm.OpenMMException:
        return float("nan")
    finally:
        del context


def from_files(xml, pdb, temperature_K: float = 300.0, name: str | None = None) -> System:
    """A ``System`` from a serialized ``openmm.System`` (``xml``) and a PDB (``pdb``) of the same atoms.

    ``temperature_K``: the simulation temperature in K. Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` (one line naming the file) for an unreadable file, an atom-count
    mismatch, a non-positive temperature or a starting structure with a non-finite energy.
    """
    xml_path, pdb_path = _existing(xml, "system XML"), _existing(pdb, "PDB")
    if (
        isinstance(temperature_K, bool)
        or not isinstance(temperature_K, (int, float))
        or not np.isfinite(temperature_K)
        or temperature_K <= 0
    ):
        raise ValueError(f"temperature_K must be a positive number of kelvin, got {temperature_K!r}")
    system, structure = _read_system(xml_path), _read_pdb(pdb_path)
    n_system, n_pdb = system.getNumParticles(), structure.topology.getNumAtoms()
    if n_system != n_pdb:
        raise ValueError(
            f"{xml_path} has {n_system} particles but {pdb_path} has {n_pdb} atoms: they must describe the same atoms"
        )
    positions = np.asarray(structure.positions.value_in_unit(unit.nanometer)) * unit.nanometer
    energy = starting_energy(system, positions)
    if not np.isfinite(energy):
        raise ValueError(
            f"the structure in {pdb_path} has a non-finite energy ({energy}) in {xml_path}: "
            "clashing atoms or a broken system"
        )
    digest = hashlib.sha256(xml_path.read_bytes() + pdb_path.read_bytes()).hexdigest()[:16]
    return System(
        name=name or xml_path.stem,
        system=system,
        topology=structure.topology,
        positions=positions,
        temperature=float(temperature_K) * unit.kelvin,
        active=np.ones((n_system, 3), dtype=bool),
        parameters=dict(xml=str(xml_path), pdb=str(pdb_path), sha256=digest),
    )
