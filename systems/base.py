"""The ``System`` dataclass: an OpenMM system plus the map between flat coordinates and positions.

Flows see a flat batch ``x`` of shape ``(B, d)`` holding only the *active* Cartesian components
(nm); OpenMM sees positions ``(B, n_atoms, 3)`` nm. Inactive components (the y, z of a 1D chain,
the z of a 2D cluster) are held at their reference values and carry no energy: where an
integrator would let them drift, they are tethered by a harmonic force placed in
``INACTIVE_FORCE_GROUP``, which energy evaluations leave out (it is separable from the active
coordinates, so their Boltzmann distribution is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

INACTIVE_FORCE_GROUP = 31
MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(
    unit.kilojoule_per_mole / unit.kelvin
)  # kJ/(mol K), OpenMM's value


def kT_kjmol(temperature_K: float) -> float:
    """Thermal energy ``R T`` in kJ/mol of a temperature in K (the package's one gas constant, OpenMM's)."""
    return (unit.MOLAR_GAS_CONSTANT_R * float(temperature_K) * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)


def kelvin(temperature) -> unit.Quantity:
    """A temperature as a Quantity in K.

    A plain number is a *reduced* temperature ``kT`` in kJ/mol (the convention of the model
    systems written in reduced units); a Quantity is taken as it is.
    """
    if unit.is_quantity(temperature):
        value = temperature.value_in_unit(unit.kelvin)
    else:
        value = float(temperature) / MOLAR_GAS_CONSTANT
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return value * unit.kelvin


@dataclass
class System:
    """An OpenMM system with the bookkeeping flows need.

    Attributes:
        name: short identifier, e.g. ``"harmonic_chain"``.
        system: the ``openmm.System``.
        topology: the ``openmm.app.Topology``.
        positions: a valid starting structure, Quantity ``(n_atoms, 3)`` nm.
        temperature: Quantity in K.
        active: bool array ``(n_atoms, 3)``; ``True`` where a Cartesian component is a degree of
            freedom seen by flows. ``dim = active.sum()``.
        parameters: the builder's arguments, for provenance and configs.
    """

    name: str
    system: openmm.System
    topology: app.Topology
    positions: unit.Quantity
    temperature: unit.Quantity
    active: np.ndarray
    parameters: dict = field(default_factory=dict)

    def __post_init__(self):
        self.active = np.asarray(self.active, dtype=bool)
        n = self.system.getNumParticles()
        if self.active.shape != (n, 3):
            raise ValueError(f"active must have shape ({n}, 3), got {self.active.shape}")
        self._reference = np.asarray(self.positions.value_in_unit(unit.nanometer), dtype=np.float64)

    @property
    def n_atoms(self) -> int:
        return self.system.getNumParticles()

    @property
    def dim(self) -> int:
        """Number of active coordinates ``d``."""
        return int(self.active.sum())

    def check_batch(self, x) -> None:
        """Raise ``TypeError``/``ValueError`` (one line) unless ``x`` is a floating-point tensor ``(B, d)``."""
        d = self.dim
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"x must be a floating-point torch.Tensor of shape (B, {d}), "
                f"got {type(x).__name__} {getattr(x, 'dtype', '')}"
            )
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(
                f"x must have shape (B, {d}) (a batch of {d} active coordinates in nm), got {tuple(x.shape)}"
            )

    @property
    def temperature_K(self) -> float:
        """The temperature in K as a float."""
        return float(self.temperature.value_in_unit(unit.kelvin))

    @property
    def kT(self) -> unit.Quantity:
        """Thermal energy as a Quantity in kJ/mol."""
        return kT_kjmol(self.temperature.value_in_unit(unit.kelvin)) * unit.kilojoule_per_mole

    @property
    def kT_kjmol(self) -> float:
        """Thermal energy in kJ/mol as a float."""
        return self.kT.value_in_unit(unit.kilojoule_per_mole)

    @property
    def masses(self) -> np.ndarray:
        """Particle masses ``(n_atoms,)`` in amu (dalton)."""
        return np.array([self.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(self.n_atoms)])

    @property
    def active_masses(self) -> np.ndarray:
        """Mass of each active coordinate ``(d,)`` in amu, in the order of ``x``."""
        return np.repeat(self.masses, 3).reshape(self.n_atoms, 3)[self.active]

    @property
    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.Topology.from_openmm(self.topology)

    def to_positions(self, x) -> np.ndarray:
        """Active coordinates ``(..., d)`` (tensor or array, nm) -> positions ``(..., n_atoms, 3)`` nm."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"expected (..., {self.dim}) active coordinates, got shape {x.shape}")
        pos = np.broadcast_to(self._reference, x.shape[:-1] + self._reference.shape).copy()
        pos[..., self.active] = x
        return pos

    def from_positions(self, positions, dtype=torch.float64) -> torch.Tensor:
        """Positions (Quantity or array ``(..., n_atoms, 3)`` nm) -> active coordinates ``(..., d)``."""
        if unit.is_quantity(positions):
            positions = positions.value_in_unit(unit.nanometer)
        pos = np.asarray(positions, dtype=np.float64)
        if pos.shape[-2:] != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape (..., {self.n_atoms}, 3), got {pos.shape}")
        return torch.as_tensor(pos[..., self.active], dtype=dtype)

    def energy_groups(self) -> int:
        """Bit mask of the force groups that make up the physical energy (excludes the tethers)."""
        return 0xFFFFFFFF & ~(1 << INACTIVE_FORCE_GROUP)


def tether_inactive(system: openmm.System, active: np.ndarray, reference_nm: np.ndarray, k: float) -> None:
    """Hold inactive components near their reference with ``k/2 (c - c_ref)^2`` (kJ/mol/nm^2).

    The force goes to ``INACTIVE_FORCE_GROUP`` so that energies used by flows leave it out.
    """
    inactive = ~np.asarray(active, dtype=bool)
    if not inactive.any():
        return
    terms = [f"{'xyz'[c]}_on*(({'xyz'[c]}-{'xyz'[c]}0)^2)" for c in range(3)]
    force = openmm.CustomExternalForce(f"0.5*k_tether*({'+'.join(terms)})")
    force.addGlobalParameter("k_tether", k)
    for c in "xyz":
        force.addPerParticleParameter(f"{c}_on")
    for c in "xyz":
        force.addPerParticleParameter(f"{c}0")
    for i, row in enumerate(inactive):
        if row.any():
            force.addParticle(i, [float(v) for v in row] + [float(v) for v in reference_nm[i]])
    force.setForceGroup(INACTIVE_FORCE_GROUP)
    system.addForce(force)


def point_particle_topology(n: int, residue: str, element_symbol: str = "Ar") -> app.Topology:
    """A topology of ``n`` unbonded particles, one residue each (for trajectories and PDB files)."""
    topology = app.Topology()
    chain = topology.addChain()
    element = app.Element.getBySymbol(element_symbol)
    for i in range(n):
        res = topology.addResidue(residue, chain)
        topology.addAtom(f"{element_symbol}{i + 1}"[:4], element, res)
    return topology
