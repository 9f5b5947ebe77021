"""Alanine dipeptide (Ace-Ala-Nme, 22 atoms) in vacuum or OBC2 implicit solvent, 300 K.

Default: amber99sb-ildn through ``openmm.app.ForceField``, no cutoff, **no constraints**, so
that every degree of freedom a flow generates carries energy (with ``constraints="hbonds"`` the
12 X-H bond lengths are fixed and their bond terms vanish). ``forcefield="ff96"`` gives
openmmtools' ``AlanineDipeptideVacuum``/``AlanineDipeptideImplicit`` (Amber ff96, the system of
published Boltzmann generators), for comparison.

The peptide's reporting coordinates live here too, for the alanine workflows and ``openflow rama``
(the learning code never sees them): the backbone torsions (:func:`backbone_torsions`,
:func:`phi_psi`) and the two basins along phi (:func:`phi_states`), chosen at the two free-energy
barriers of phi (near 0 and near 2 rad = 115 deg):

- ``+1``: ``0 < phi < 2.0`` -- alpha_L and C7ax (the phi > 0 basin);
- ``-1``: everything else -- C7eq, C5/beta and alpha_R (phi < 0), including ``phi > 2.0``, the part
  of the beta basin that wraps across +-pi.

With a ``margin`` the basins shrink to their *cores* (``0`` between them), the hysteresis with
which ``openflow.analysis.count_transitions`` counts a transition only when the trajectory reaches
the core of the other basin: with the default 0.5 rad the cores are ``(0.5, 1.5)`` and
``phi < -0.5`` or ``phi > 2.5``.
"""

from __future__ import annotations

from importlib import resources

import mdtraj
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
PHI_POSITIVE_BASIN = (0.0, 2.0)  # rad: alpha_L / C7ax
PHI_CORE_MARGIN = 0.5  # rad


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


def _mdtraj_topology(topology) -> mdtraj.Topology:
    """An ``mdtraj.Topology`` of an openflow System, an OpenMM Topology or an mdtraj Topology."""
    topology = getattr(topology, "mdtraj_topology", topology)
    if isinstance(topology, app.Topology):
        return mdtraj.Topology.from_openmm(topology)
    if isinstance(topology, mdtraj.Topology):
        return topology
    raise TypeError(f"expected an openflow System, an OpenMM or an mdtraj Topology, got {type(topology).__name__}")


def backbone_torsions(topology) -> dict[str, list[tuple[int, int, int, int]]]:
    """Backbone ``phi`` (C_prev-N-CA-C) and ``psi`` (N-CA-C-N_next) atom quadruples of a peptide.

    Alanine dipeptide (Ace-Ala-Nme): one phi and one psi, ``{"phi": [(4, 6, 8, 14)], "psi": [(6, 8, 14, 16)]}``.
    """
    top = _mdtraj_topology(topology)
    residues = list(top.residues)

    def atom(residue, name):
        found = [a.index for a in residue.atoms if a.name == name]
        return found[0] if found else None

    out = {"phi": [], "psi": []}
    for prev, res, nxt in zip([None] + residues[:-1], residues, residues[1:] + [None]):
        n, ca, c = atom(res, "N"), atom(res, "CA"), atom(res, "C")
        if None in (n, ca, c):
            continue
        c_prev = atom(prev, "C") if prev is not None else None
        n_next = atom(nxt, "N") if nxt is not None else None
        if c_prev is not None:
            out["phi"].append((c_prev, n, ca, c))
        if n_next is not None:
            out["psi"].append((n, ca, c, n_next))
    if not out["phi"] or not out["psi"]:
        raise ValueError("the topology has no backbone phi/psi pair (needs residues with N, CA, C atoms)")
    return out


def phi_psi(frames: mdtraj.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """The first backbone phi and psi of every frame, each ``(T,)`` float64 rad in ``(-pi, pi]``."""
    torsions = backbone_torsions(frames.topology)
    angles = mdtraj.compute_dihedrals(frames, np.array([torsions["phi"][0], torsions["psi"][0]]), periodic=False)
    return angles[:, 0].astype(np.float64), angles[:, 1].astype(np.float64)


def phi_states(phi, margin: float = 0.0) -> np.ndarray:
    """Basin of each frame along phi ``(T,)`` rad in ``[-pi, pi]``: +1 (phi > 0 core), -1 (phi < 0 core),
    0 (between the cores) -> ``(T,)`` int. With ``margin = 0`` every frame is +1 or -1 (see the module)."""
    phi = np.asarray(phi, dtype=np.float64)
    if not (np.abs(phi) <= np.pi + 1e-6).all():
        raise ValueError("phi must be finite angles in [-pi, pi] rad")
    lo, hi = PHI_POSITIVE_BASIN
    if not 0 <= margin < (hi - lo) / 2:
        raise ValueError(f"margin must be in [0, {(hi - lo) / 2}), got {margin}")
    positive = (phi > lo + margin) & (phi < hi - margin)
    inside = (phi > lo - margin) & (phi < hi + margin)
    return np.where(positive, 1, np.where(inside, 0, -1))


def phi_psi_observables() -> dict:
    """``{"phi": f, "psi": g}``: the backbone torsions of saved frames, ``mdtraj.Trajectory -> (T,)``
    rad, as a metadynamics run's ``observables``."""
    return {"phi": lambda frames: phi_psi(frames)[0], "psi": lambda frames: phi_psi(frames)[1]}
