"""A user's own system: a serialized ``openmm.System`` (XML) and a PDB with the same atoms, or both in memory.

    system = from_files("system.xml", "structure.pdb", temperature_K=300.0)
    system = from_openmm(openmm_system, pdb.topology, pdb.positions, temperature_K=300.0)

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


def _temperature(temperature_K) -> float:
    if (
        isinstance(temperature_K, bool)
        or not isinstance(temperature_K, (int, float))
        or not np.isfinite(temperature_K)
        or temperature_K <= 0
    ):
        raise ValueError(f"temperature_K must be a positive number of kelvin, got {temperature_K!r}")
    return float(temperature_K)


def _system(system, topology, positions, temperature_K, name: str, parameters: dict, where: str) -> System:
    """The checked ``System``: atom counts, positions and a finite starting energy (``where``: what to name)."""
    n_system, n_atoms = system.getNumParticles(), topology.getNumAtoms()
    if n_system != n_atoms:
        raise ValueError(f"{where}: the System has {n_system} particles but the topology {n_atoms} atoms")
    xyz = np.asarray(positions.value_in_unit(unit.nanometer) if unit.is_quantity(positions) else positions, float)
    if xyz.shape != (n_system, 3) or not np.isfinite(xyz).all():
        raise ValueError(f"{where}: positions must be finite, shape ({n_system}, 3) in nm, got shape {xyz.shape}")
    energy = starting_energy(system, xyz)
    if not np.isfinite(energy):
        raise ValueError(
            f"{where}: the starting structure has a non-finite energy ({energy}): clashing atoms or a broken system"
        )
    return System(
        name=name,
        system=system,
        topology=topology,
        positions=xyz * unit.nanometer,
        temperature=_temperature(temperature_K) * unit.kelvin,
        active=np.ones((n_system, 3), dtype=bool),
        parameters=parameters,
    )


def from_openmm(
    system: openmm.System, topology: app.Topology, positions, temperature_K: float = 300.0, name: str = "system"
) -> System:
    """A ``System`` from an ``openmm.System`` in memory, its ``openmm.app.Topology`` and starting
    ``positions`` (a Quantity or an array ``(n_atoms, 3)`` in nm) at ``temperature_K`` kelvin.

    Raises ``ValueError`` (one line) for other types, an atom-count or shape mismatch, a non-positive
    temperature or a starting structure with a non-finite energy.
    """
    if not isinstance(system, openmm.System) or not isinstance(topology, app.Topology):
        raise ValueError(
            f"from_openmm takes an openmm.System and an openmm.app.Topology, got {type(system).__name__} "
            f"and {type(topology).__name__}"
        )
    _temperature(temperature_K)
    digest = hashlib.sha256(openmm.XmlSerializer.serialize(system).encode()).hexdigest()[:16]
    return _system(system, topology, positions, temperature_K, name, dict(sha256=digest), name)


def from_files(xml, pdb, temperature_K: float = 300.0, name: str | None = None) -> System:
    """A ``System`` from a serialized ``openmm.System`` (``xml``) and a PDB (``pdb``) of the same atoms.

    ``temperature_K``: the simulation temperature in K. Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` (one line naming the files) for an unreadable file, an atom-count
    mismatch, a non-positive temperature or a starting structure with a non-finite energy.
    """
    xml_path, pdb_path = _existing(xml, "system XML"), _existing(pdb, "PDB")
    _temperature(temperature_K)
    system, structure = _read_system(xml_path), _read_pdb(pdb_path)
    digest = hashlib.sha256(xml_path.read_bytes() + pdb_path.read_bytes()).hexdigest()[:16]
    parameters = dict(xml=str(xml_path), pdb=str(pdb_path), sha256=digest)
    where = f"{xml_path} and {pdb_path}"
    return _system(
        system, structure.topology, structure.positions, temperature_K, name or xml_path.stem, parameters, where
    )
