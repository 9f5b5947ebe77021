"""Reading an ``openmm.System``'s forces into torch terms: ``translate_force``.

Translated forces (everything else raises ``NotImplementedError`` naming the force and why):

- ``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce`` (``terms``);
- ``NonbondedForce`` with ``NoCutoff``: Coulomb + Lennard-Jones (Lorentz-Berthelot), exceptions
  with their own ``chargeProd``/``sigma``/``epsilon``, excluded pairs left out;
- ``GBSAOBCForce`` with ``NoCutoff`` (OBC2 as in OpenMM's ``ReferenceObc.cpp``, ACE surface term);
- ``CustomBondForce``, ``CustomAngleForce``, ``CustomTorsionForce``, ``CustomExternalForce``,
  ``CustomCompoundBondForce``, ``CustomNonbondedForce`` (``NoCutoff``) and ``CustomGBForce``
  (``NoCutoff``, e.g. ``openmm.app``'s ``implicit/obc2.xml``) (``custom``): their Lepton
  expressions are parsed by ``lepton`` (Lepton's grammar and precedence, ``;`` definitions
  included); unknown names and tabulated functions are refused, not read as 0;
- ``CMMotionRemover`` and ``AndersenThermostat`` contribute no energy (``None``).

Not translated: cutoffs, periodic boxes, parameter offsets, interaction groups, computed values of
a ``CustomNonbondedForce``, tabulated functions, other force types. Units are stripped in OpenMM's
(nm, kJ/mol, radians, elementary charges).
"""

from __future__ import annotations

import itertools

import numpy as np
import openmm
import openmm.unit as unit

from .base import Term
from .custom import CustomBonded, CustomGB, CustomNonbonded
from .lepton import LeptonExpression
from .terms import OBC2, ONE_4PI_EPS0, CoulombLennardJones, HarmonicAngles, HarmonicBonds, PeriodicTorsions

NO_ENERGY_FORCES = (openmm.CMMotionRemover, openmm.AndersenThermostat)


def _value(quantity, unit_):
    return quantity.value_in_unit(unit_) if unit.is_quantity(quantity) else quantity


def _table(rows, units: tuple) -> np.ndarray:
    """OpenMM parameter tuples -> float64 ``(M, len(units))``, each column stripped in its unit."""
    return np.array([[_value(v, u) for v, u in zip(row, units)] for row in rows], dtype=np.float64).reshape(
        -1, len(units)
    )


KJ_MOL, NM, RAD, CHARGE = unit.kilojoule_per_mole, unit.nanometer, unit.radian, unit.elementary_charge


def _require(condition: bool, force, reason: str) -> None:
    if not condition:
        raise NotImplementedError(
            f"{type(force).__name__} (force group {force.getForceGroup()}): {reason}; no torch translation"
        )


def _globals(force) -> dict:
    return {
        force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
        for k in range(force.getNumGlobalParameters())
    }


def _check_expression(force, text: str, allowed: set) -> LeptonExpression:
    """Parse ``text`` for ``force``; unknown variables or functions -> ``NotImplementedError``."""
    name = type(force).__name__
    try:
        expression = LeptonExpression(text)
    except (ValueError, NotImplementedError) as error:
        raise NotImplementedError(f"{name}: {error}") from None
    unknown = expression.variables - allowed
    if unknown:
        raise NotImplementedError(f"{name}: expression {text!r} uses unknown name(s) {sorted(unknown)}")
    return expression


def _nonbonded(force: openmm.NonbondedForce, n_atoms: int) -> CoulombLennardJones:
    _require(force.getNonbondedMethod() == openmm.NonbondedForce.NoCutoff, force, "only NoCutoff is translated")
    _require(
        force.getNumParticleParameterOffsets() == 0 and force.getNumExceptionParameterOffsets() == 0,
        force,
        "parameter offsets",
    )
    params = _table(map(force.getParticleParameters, range(n_atoms)), (CHARGE, NM, KJ_MOL))
    exceptions = [force.getExceptionParameters(k) for k in range(force.getNumExceptions())]
    ex_pairs = np.sort(np.array([e[:2] for e in exceptions], dtype=np.int64).reshape(-1, 2), axis=1)
    ex_params = _table([e[2:] for e in exceptions], (CHARGE**2, NM, KJ_MOL))
    i, j = np.triu_indices(n_atoms, k=1)
    normal = ~np.isin(i * n_atoms + j, ex_pairs[:, 0] * n_atoms + ex_pairs[:, 1])
    i, j = i[normal], j[normal]
    pairs = np.concatenate([np.stack([i, j], 1), ex_pairs])
    charge_products = np.concatenate([params[i, 0] * params[j, 0], ex_params[:, 0]])
    sigma = np.concatenate([0.5 * (params[i, 1] + params[j, 1]), ex_params[:, 1]])
    epsilon = np.concatenate([np.sqrt(params[i, 2] * params[j, 2]), ex_params[:, 2]])
    keep = (charge_products != 0) | (epsilon != 0)
    return CoulombLennardJones(pairs[keep], ONE_4PI_EPS0 * charge_products[keep], sigma[keep], epsilon[keep])


def _obc(force: openmm.GBSAOBCForce, n_atoms: int) -> OBC2:
    _require(force.getNonbondedMethod() == openmm.GBSAOBCForce.NoCutoff, force, "only NoCutoff is translated")
    params = _table(map(force.getParticleParameters, range(n_atoms)), (CHARGE, NM, None))
    surface_area_energy = _value(force.getSurfaceAreaEnergy(), KJ_MOL / NM**2)
    return OBC2(*params.T, force.getSoluteDielectric(), force.getSolventDielectric(), surface_area_energy)


def _custom_bonded(force, kind: str, terms: list, n_particles: int, names: list) -> CustomBonded:
    """Build ``CustomBonded`` from ``terms`` = [(particle indices, parameters)] read off ``force``."""
    constants = _globals(force)
    geometric = CustomBonded.GEOMETRIC.get(kind) or {f"{a}{p}" for a in "xyz" for p in range(1, n_particles + 1)}
    expression = _check_expression(force, force.getEnergyFunction(), geometric | set(names) | set(constants))
    if expression.particles and (kind != "compound" or max(expression.particles) > n_particles):
        raise NotImplementedError(
            f"{type(force).__name__}: geometry functions need particles p1..p{n_particles} of a compound bond"
        )
    particles = [list(p) for p, _ in terms]
    parameters = [list(q) for _, q in terms]
    return CustomBonded(kind, expression, particles, n_particles, parameters, names, constants)


def _custom_nonbonded(force: openmm.CustomNonbondedForce, n_atoms: int) -> CustomNonbonded:
    _require(force.getNonbondedMethod() == openmm.CustomNonbondedForce.NoCutoff, force, "only NoCutoff is translated")
    _require(force.getNumInteractionGroups() == 0, force, "interaction groups")
    _require(force.getNumComputedValues() == 0, force, "computed values")
    _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
    names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
    constants = _globals(force)
    allowed = {"r"} | {n + s for n in names for s in "12"} | set(constants)
    expression = _check_expression(force, force.getEnergyFunction(), allowed)
    excluded = {tuple(sorted(force.getExclusionParticles(k))) for k in range(force.getNumExclusions())}
    pairs = [(a, b) for a, b in itertools.combinations(range(n_atoms), 2) if (a, b) not in excluded]
    parameters = np.array([force.getParticleParameters(k) for k in range(n_atoms)], dtype=np.float64).reshape(
        n_atoms, len(names)
    )
    return CustomNonbonded(expression, np.array(pairs, dtype=np.int64).reshape(-1, 2), parameters, names, constants)


def _custom_gb(force: openmm.CustomGBForce, n_atoms: int) -> CustomGB:
    _require(force.getNonbondedMethod() == openmm.CustomGBForce.NoCutoff, force, "only NoCutoff is translated")
    _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
    names = [force.getPerParticleParameterName(k) for k in range(force.getNumPerParticleParameters())]
    constants = _globals(force)
    known, values = set(names), []
    for k in range(force.getNumComputedValues()):
        name, text, kind = force.getComputedValueParameters(k)
        values.append((name, _check_expression(force, text, _gb_allowed(known, constants, kind)), kind))
        known.add(name)
    energies = []
    for k in range(force.getNumEnergyTerms()):
        text, kind = force.getEnergyTermParameters(k)
        energies.append((_check_expression(force, text, _gb_allowed(known, constants, kind)), kind))
    parameters = [force.getParticleParameters(k) for k in range(n_atoms)]
    exclusions = [force.getExclusionParticles(k) for k in range(force.getNumExclusions())]
    return CustomGB(n_atoms, parameters, names, constants, values, energies, exclusions)


def _gb_allowed(known: set, constants: dict, kind: int) -> set:
    if kind == openmm.CustomGBForce.SingleParticle:
        return known | set(constants) | {"x", "y", "z"}
    return {n + s for n in known for s in "12"} | set(constants) | {"r"}


_CUSTOM_BONDED = (  # force class, kind, particles per term, term counter, term getter, parameter prefix
    (openmm.CustomExternalForce, "external", 1, "getNumParticles", "getParticleParameters", "PerParticle"),
    (openmm.CustomBondForce, "bond", 2, "getNumBonds", "getBondParameters", "PerBond"),
    (openmm.CustomAngleForce, "angle", 3, "getNumAngles", "getAngleParameters", "PerAngle"),
    (openmm.CustomTorsionForce, "torsion", 4, "getNumTorsions", "getTorsionParameters", "PerTorsion"),
    (openmm.CustomCompoundBondForce, "compound", None, "getNumBonds", "getBondParameters", "PerBond"),
)


def _custom_bonded_force(force, kind, n_particles, counter, getter, prefix) -> CustomBonded:
    names = [
        getattr(force, f"get{prefix}ParameterName")(k) for k in range(getattr(force, f"getNum{prefix}Parameters")())
    ]
    terms = [getattr(force, getter)(k) for k in range(getattr(force, counter)())]
    if kind == "compound":
        _require(force.getNumTabulatedFunctions() == 0, force, "tabulated functions")
        n_particles = force.getNumParticlesPerBond()
        terms = [(list(particles), list(parameters)) for particles, parameters in terms]
    else:
        terms = [(list(term[:-1]), list(term[-1])) for term in terms]
    return _custom_bonded(force, kind, terms, n_particles, names)


def translate_force(force: openmm.Force, n_atoms: int) -> Term | None:
    """The term (a ``base.Term``) computing ``force``'s energy: positions ``(3, N, B)`` nm (the
    internal layout, see ``base``) -> ``(B,)`` kJ/mol, for a system of ``n_atoms`` particles.

    Returns ``None`` for forces without energy (``CMMotionRemover``); raises
    ``NotImplementedError`` naming the force for anything it cannot translate exactly.
    """
    if isinstance(force, NO_ENERGY_FORCES):
        return None
    _require(not force.usesPeriodicBoundaryConditions(), force, "periodic boundary conditions")
    if isinstance(force, openmm.HarmonicBondForce):
        bonds = [force.getBondParameters(k) for k in range(force.getNumBonds())]
        values = _table([b[2:] for b in bonds], (NM, KJ_MOL / NM**2))
        return HarmonicBonds([b[:2] for b in bonds], values[:, 0], values[:, 1])
    if isinstance(force, openmm.HarmonicAngleForce):
        angles = [force.getAngleParameters(k) for k in range(force.getNumAngles())]
        values = _table([a[3:] for a in angles], (RAD, KJ_MOL / RAD**2))
        return HarmonicAngles([a[:3] for a in angles], values[:, 0], values[:, 1])
    if isinstance(force, openmm.PeriodicTorsionForce):
        torsions = [force.getTorsionParameters(k) for k in range(force.getNumTorsions())]
        values = _table([t[4:] for t in torsions], (None, RAD, KJ_MOL))
        return PeriodicTorsions([t[:4] for t in torsions], values[:, 0], values[:, 1], values[:, 2])
    if isinstance(force, openmm.NonbondedForce):
        return _nonbonded(force, n_atoms)
    if isinstance(force, openmm.GBSAOBCForce):
        return _obc(force, n_atoms)
    if isinstance(force, openmm.CustomNonbondedForce):
        return _custom_nonbonded(force, n_atoms)
    if isinstance(force, openmm.CustomGBForce):
        return _custom_gb(force, n_atoms)
    for cls, *spec in _CUSTOM_BONDED:
        if isinstance(force, cls):
            return _custom_bonded_force(force, *spec)
    raise NotImplementedError(f"{type(force).__name__} (force group {force.getForceGroup()}) has no torch translation")
