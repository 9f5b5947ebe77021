"""Coulomb clusters: ``n`` unit charges in an isotropic harmonic trap, in 2D or 3D.

``E = sum_{i<j} 1/r_ij + sum_i |r_i|^2`` in reduced units: lengths nm, energies kJ/mol, masses
amu (time in ps). A plain-number ``temperature`` is the reduced temperature ``kT`` in kJ/mol.
In 2D only x and y are active and the pair distance uses x and y alone.
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.unit as unit

from .base import System, kelvin, kT_kjmol, point_particle_topology, tether_inactive


def _spread_points(n: int, dim: int, radius: float) -> np.ndarray:
    """Deterministic, well separated starting points ``(n, 3)`` (golden-angle spiral)."""
    i = np.arange(n) + 0.5
    golden = np.pi * (3.0 - np.sqrt(5.0))
    pos = np.zeros((n, 3))
    if dim == 2:
        r = radius * np.sqrt(i / n)
        pos[:, 0], pos[:, 1] = r * np.cos(golden * i), r * np.sin(golden * i)
    else:
        z = 1.0 - 2.0 * i / n
        rho = np.sqrt(1.0 - z**2)
        r = radius * (i / n) ** (1.0 / 3.0)
        pos[:, 0], pos[:, 1], pos[:, 2] = r * rho * np.cos(golden * i), r * rho * np.sin(golden * i), r * z
    return pos


def coulomb_cluster(n: int = 6, dim: int = 2, temperature=1.0, mass: float = 1.0) -> System:
    """Build a trapped Coulomb cluster as an OpenMM System.

    Args:
        n: number of unit charges (>= 1).
        dim: 2 (x, y active) or 3.
        temperature: reduced kT in kJ/mol (float) or a Quantity in K.
        mass: particle mass, amu (> 0); it sets only the dynamics, not the equilibrium.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if not mass > 0:
        raise ValueError(f"mass must be positive, got {mass}")
    n = int(n)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(mass)

    # All pairs as bonds: for small n faster per evaluation on the Reference platform than a
    # CustomNonbondedForce, and in 2D it lets the distance ignore z.
    if dim == 3:
        pairs = openmm.CustomBondForce("1/r")
        trap = openmm.CustomExternalForce("x^2+y^2+z^2")
    else:
        pairs = openmm.CustomCompoundBondForce(2, "1/sqrt((x2-x1)^2+(y2-y1)^2)")
        trap = openmm.CustomExternalForce("x^2+y^2")
    for i in range(n):
        for j in range(i + 1, n):
            if dim == 3:
                pairs.addBond(i, j, [])
            else:
                pairs.addBond([i, j], [])
    for i in range(n):
        trap.addParticle(i, [])
    system.addForce(pairs)
    system.addForce(trap)

    active = np.zeros((n, 3), dtype=bool)
    active[:, :dim] = True
    positions = _spread_points(n, dim, radius=max(1.0, (n / 2.0) ** (1.0 / 3.0)))
    T = kelvin(temperature)
    kT = kT_kjmol(T.value_in_unit(unit.kelvin))
    tether_inactive(system, active, positions, k=10.0 * kT)
    return System(
        name="coulomb_cluster",
        system=system,
        topology=point_particle_topology(n, "ION"),
        positions=positions * unit.nanometer,
        temperature=T,
        active=active,
        parameters=dict(n=n, dim=dim, mass=float(mass), kT=kT),
    )
