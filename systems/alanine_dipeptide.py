"""Alanine dipeptide (Ace-Ala-Nme, 22 atoms) in vacuum or OBC2 implicit solvent, 300 K.

Default: amber99sb-ildn through ``openmm.app.ForceField``, no cutoff, **no constraints**, so
that every degree of freedom a flow generates carries energy (with ``constraints="hbonds"`` the
12 X-H bond lengths are fixed and their bond terms vanish). ``forcefield="ff96"`` gives
openmmtools' ``AlanineDipeptideVacuum``/``AlanineDipeptideImplicit`` (Amber ff96, the system of
published Boltzmann generators), for comparison.
"""
from __future__ import annotations

from importlib import resources

import numpy as np
import openmm.app as app
import openmm.unit as unit

from .base import System, kelvin

FORCEFIELDS = {
    # name: (protein file, implicit-solvent file giving OBC2)
    "amber99sbildn": ("amber99sbildn.xml", "amber99_obc.xml"),
    "amber14": ("amber14-all.xml", "implicit/obc2.xml"),
}
SOLVENTS = ("vacuum", "implicit")
CONSTRAINTS = {None: None, "none": None, "hbonds": app.HBonds}
PDB_FILE = "alanine_dipeptide.pdb"


def pdb_path() -> str:
    """Path of the shipped alanine dipeptide PDB (22 atoms, Amber names)."""
    return str(resources.files("openflow.systems") / "data" / PDB_FILE)


def alanine_dipeptide(
    solvent: str = "vacuum",
    forcefield: str = "amber99sbildn",
    constraints: str | None = None,
    temperature=300.0 * unit.kelvin,
) -> System:
    """Build alanine dipeptide.

    Args:
        solvent: ``"vacuum"`` or ``"implicit"`` (OBC2 generalized Born).
        forcefield: ``"amber99sbildn"`` (default), ``"amber14"``, or ``"ff96"`` (openmmtools).
        constraints: ``None`` (default, all bonds flexible) or ``"hbonds"``.
        temperature: Quantity (default 300 K) or a reduced kT in kJ/mol.
    """
    if solvent not in SOLVENTS:
        raise ValueError(f"solvent must be one of {SOLVENTS}, got {solvent!r}")
    if constraints not in CONSTRAINTS:
        raise ValueError(f"constraints must be None or 'hbonds', got {constraints!r}")
    if forcefield == "ff96":
        from openmmtools import testsystems

        builder = testsystems.AlanineDipeptideVacuum if solvent == "vacuum" else testsystems.AlanineDipeptideImplicit
        test_system = builder(constraints=CONSTRAINTS[constraints])
        system, topology, positions = test_system.system, test_system.topology, test_system.positions
    elif forcefield in FORCEFIELDS:
        protein, implicit = FORCEFIELDS[forcefield]
        pdb = app.PDBFile(pdb_path())
        files = (protein, implicit) if solvent == "implicit" else (protein,)
        system = app.ForceField(*files).createSystem(
            pdb.topology, nonbondedMethod=app.NoCutoff, constraints=CONSTRAINTS[constraints]
        )
        topology, positions = pdb.topology, pdb.positions
    else:
        raise ValueError(f"forcefield must be one of {sorted(FORCEFIELDS) + ['ff96']}, got {forcefield!r}")
    positions = np.asarray(positions.value_in_unit(unit.nanometer)) * unit.nanometer
    return System(
        name="alanine_dipeptide",
        system=system,
        topology=topology,
        positions=positions,
        temperature=kelvin(temperature),
        active=np.ones((system.getNumParticles(), 3), dtype=bool),
        parameters=dict(solvent=solvent, forcefield=forcefield, constraints=constraints),
    )
