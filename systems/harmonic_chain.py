"""A 1D harmonic chain, the test bed of the neural canonical transformation.

``H = sum_i p_i^2 / 2m + k/2 sum_i (q_i - q_{i-1})^2`` with ``q_0 = 0`` and, for
``boundary="fixed-fixed"``, also ``q_{n+1} = 0``. Only the x component of each particle is
active. Written in reduced units: lengths nm, energies kJ/mol, masses amu (so time is ps), and a
plain-number ``temperature`` is ``kT`` in kJ/mol (default 1, i.e. T = 120.27 K).
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.unit as unit

from .base import System, kelvin, kT_kjmol, point_particle_topology, tether_inactive

BOUNDARIES = ("fixed-fixed", "fixed-free")


class HarmonicChain(System):
    """A harmonic chain ``System`` with its exact normal modes."""

    def stiffness_matrix(self) -> np.ndarray:
        """``K`` ``(n, n)`` in kJ/mol/nm^2 with ``V = 1/2 q^T K q``."""
        n, k = self.parameters["n"], self.parameters["k"]
        K = 2.0 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
        if self.parameters["boundary"] == "fixed-free":
            K[-1, -1] = 1.0
        return k * K

    def normal_modes(self) -> tuple[np.ndarray, np.ndarray]:
        """Angular frequencies ``(n,)`` in 1/ps, ascending, and mass-weighted modes ``(n, n)`` as columns."""
        m = self.parameters["mass"]
        eigval, eigvec = np.linalg.eigh(self.stiffness_matrix() / m)
        return np.sqrt(eigval), eigvec

    def exact_frequencies(self) -> np.ndarray:
        """Normal-mode angular frequencies ``(n,)`` in 1/ps, smallest (slowest) first."""
        return self.normal_modes()[0]

    def exact_free_energy(self, phase_space: bool = True) -> float:
        """Exact reduced free energy ``-ln Z`` (units of kT).

        ``phase_space=True``: ``Z = prod_k 2 pi kT / omega_k`` over (p, q), with momenta in
        amu nm/ps; in mass-weighted coordinates at kT = 1 this is the normalisation of the
        latent harmonic prior. ``phase_space=False``: configurational part only,
        ``Z_q = prod_k sqrt(2 pi kT / lambda_k)`` with ``lambda_k`` the eigenvalues of ``K``.
        """
        kT = self.kT_kjmol
        if phase_space:
            return float(-np.sum(np.log(2.0 * np.pi * kT / self.exact_frequencies())))
        lam = np.linalg.eigvalsh(self.stiffness_matrix())
        return float(-0.5 * np.sum(np.log(2.0 * np.pi * kT / lam)))


def harmonic_chain(
    n: int = 32, boundary: str = "fixed-fixed", k: float = 1.0, mass: float = 1.0, temperature=1.0
) -> HarmonicChain:
    """Build the chain as an OpenMM System.

    Args:
        n: number of moving particles (>= 1).
        boundary: ``"fixed-fixed"`` (q_0 = q_{n+1} = 0) or ``"fixed-free"`` (q_0 = 0).
        k: spring constant, kJ/mol/nm^2 (> 0).
        mass: particle mass, amu (> 0).
        temperature: reduced kT in kJ/mol (float) or a Quantity in K.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if not (k > 0 and mass > 0):
        raise ValueError(f"k and mass must be positive, got k={k}, mass={mass}")
    n = int(n)
    system = openmm.System()
    for _ in range(n):
        system.addParticle(mass)

    springs = openmm.CustomCompoundBondForce(2, "0.5*k_spring*(x2-x1)^2")
    springs.addGlobalParameter("k_spring", k)
    for i in range(n - 1):
        springs.addBond([i, i + 1], [])
    walls = openmm.CustomExternalForce("0.5*k_wall*x^2")
    walls.addGlobalParameter("k_wall", k)
    walls.addParticle(0, [])
    if boundary == "fixed-fixed":
        walls.addParticle(n - 1, [])  # for n = 1 both walls act on the same particle
    system.addForce(springs)
    system.addForce(walls)

    active = np.zeros((n, 3), dtype=bool)
    active[:, 0] = True
    positions = np.zeros((n, 3))
    T = kelvin(temperature)
    kT = kT_kjmol(T.value_in_unit(unit.kelvin))
    tether_inactive(system, active, positions, k=10.0 * kT)
    return HarmonicChain(
        name="harmonic_chain",
        system=system,
        topology=point_particle_topology(n, "CHN"),
        positions=positions * unit.nanometer,
        temperature=T,
        active=active,
        parameters=dict(n=n, boundary=boundary, k=float(k), mass=float(mass), kT=kT),
    )
