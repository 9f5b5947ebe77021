"""The batched torch energy against OpenMM itself (Reference platform, float64).

Every system and variant is checked on real configurations: the starting structure, frames of a
short Langevin run made here with OpenMM, and those frames perturbed by 0.015 nm. Energies must
agree to 1e-5 and forces to 1e-4, relative (errors divided by ``max(|E|, 1 kT)`` and, per
configuration, by ``max(|F|, 1 kT/nm)`` with ``|.|`` the Euclidean norm over all components; the
floor of 1 keeps configurations with E = 0 exactly, like the chain at rest, meaningful).
"""

import dataclasses
import pickle
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

import openflow.plugins.openmm.forcefield.energy as energy_module
import openflow.plugins.openmm.forcefield.parallel as parallel_module
from openflow.plugins.openmm import OpenMMEnergy
from openflow.plugins.openmm.bridge import linear_log_cap
from openflow.plugins.openmm.forcefield import (
    LeptonExpression,
    TorchEnergy,
    TorchEnergyFallbackWarning,
    batched_energy,
    torch_on_one_thread,
)
from openflow.systems import INACTIVE_FORCE_GROUP, System, alanine_dipeptide, coulomb_cluster, harmonic_chain
from openflow.systems.base import kelvin, point_particle_topology

ENERGY_RTOL, FORCE_RTOL = 1e-5, 1e-4

VARIANTS = {
    **{
        f"alanine-{solvent}-{ff}-{constraints}": (
            alanine_dipeptide,
            dict(solvent=solvent, forcefield=ff, constraints=constraints),
        )
        for solvent in ("vacuum", "implicit")
        for ff in ("amber99sbildn", "amber14", "ff96")
        for constraints in (None, "hbonds")
    },
    **{
        f"cluster-{dim}d-{n}": (coulomb_cluster, dict(n=n, dim=dim, temperature=1.3))
        for dim in (2, 3)
        for n in (3, 6, 13)
    },
    "chain-fixed-fixed": (harmonic_chain, dict(n=32, boundary="fixed-fixed", k=1.7, temperature=0.8)),
    "chain-fixed-free": (harmonic_chain, dict(n=7, boundary="fixed-free", k=1.7, temperature=0.8)),
}


@cache
def build(name: str) -> System:
    builder, kwargs = VARIANTS[name]
    return builder(**kwargs)


def reference_context(system: System) -> openmm.Context:
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(system.system, integrator, openmm.Platform.getPlatformByName("Reference"))


def openmm_reduced(system: System, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """OpenMM's reduced energies ``(B,)`` and active forces ``(B, d)`` at ``x``, physical groups only."""
    context, kT = reference_context(system), system.kT_kjmol
    energies, forces = [], []
    for positions in system.to_positions(x):
        context.setPositions(positions * unit.nanometer)
        state = context.getState(energy=True, forces=True, groups=system.energy_groups())
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kT)
        forces.append(
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)[system.active] / kT
        )
    return np.array(energies), np.array(forces)


def md_frames(system: System, n_frames: int = 3, steps: int = 100, seed: int = 0) -> torch.Tensor:
    """Active coordinates ``(n_frames, d)`` every ``steps`` steps of Langevin dynamics (OpenMM, Reference)."""
    step = 1.0 * unit.femtosecond if system.name == "alanine_dipeptide" else 0.01 * unit.picosecond
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, 1.0 / unit.picosecond, step)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(system.positions)
    context.setVelocitiesToTemperature(system.temperature, seed + 1)
    frames = []
    for _ in range(n_frames):
        integrator.step(steps)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return system.from_positions(np.array(frames))


def real_configurations(system: System, seed: int = 0) -> torch.Tensor:
    """Start structure, 3 MD frames (300 steps), and those frames + N(0, 0.015 nm) noise: ``(7, d)``."""
    frames = md_frames(system, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    perturbed = frames + 0.015 * torch.randn(frames.shape, generator=generator, dtype=torch.float64)
    return torch.cat([system.from_positions(system.positions)[None], frames, perturbed])


def assert_matches(u, f, u_ref, f_ref, energy_rtol=ENERGY_RTOL, force_rtol=FORCE_RTOL):
    u, f = np.asarray(u), np.asarray(f)
    energy_error = np.abs(u - u_ref) / np.maximum(np.abs(u_ref), 1.0)
    force_error = np.linalg.norm(f - f_ref, axis=1) / np.maximum(np.linalg.norm(f_ref, axis=1), 1.0)
    assert energy_error.max() < energy_rtol, f"energies off by {energy_error.max():.2e} (relative): {u} vs {u_ref}"
    assert force_error.max() < force_rtol, f"forces off by {force_error.max():.2e} (relative norm)"


# -- every system and variant against OpenMM ---------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_openmm_on_real_configurations(name):
    system = build(name)
    x = real_configurations(system, seed=len(name))
    u_ref, f_ref = openmm_reduced(system, x)
    energy = TorchEnergy(system)
    u, f = energy.energy_and_forces(x)
    assert u.dtype == f.dtype == torch.float64 and f.shape == x.shape
    assert_matches(u, f, u_ref, f_ref)
    # the differentiable path gives the same numbers, and its gradient is minus the forces
    xg = x.clone().requires_grad_(True)
    u_call = energy(xg)
    u_call.sum().backward()
    assert_matches(u_call.detach(), -xg.grad, u_ref, f_ref)
    assert energy.stats()["evaluations"] == 2 * len(x) and energy.n_nonfinite == 0


def test_potential_of_full_positions_and_position_map():
    system = build("cluster-2d-6")
    energy = TorchEnergy(system)
    x = real_configurations(system)
    np.testing.assert_array_equal(energy.positions(x).numpy(), system.to_positions(x))
    e_kjmol = energy.potential(energy.positions(x)).numpy()
    np.testing.assert_allclose(e_kjmol, energy.potential_energy(x).numpy(), rtol=1e-14)
    np.testing.assert_allclose(e_kjmol / system.kT_kjmol, openmm_reduced(system, x)[0], rtol=ENERGY_RTOL)


# -- each custom force kind and the Lepton translator ------------------------------------------
def custom_force_system() -> System:
    """Six particles carrying one of every custom force kind the translator handles."""
    system = openmm.System()
    for _ in range(6):
        system.addParticle(1.0)
    bond = openmm.CustomBondForce("scale*k*(r-r0)^2")
    bond.addGlobalParameter("scale", 0.7)
    bond.addPerBondParameter("k")
    bond.addPerBondParameter("r0")
    bond.addBond(0, 1, [100.0, 0.15])
    bond.addBond(2, 4, [50.0, 0.3])
    angle = openmm.CustomAngleForce("0.5*ka*(theta-theta0)^2 + 0.3*sin(theta)")
    angle.addPerAngleParameter("ka")
    angle.addPerAngleParameter("theta0")
    angle.addAngle(0, 1, 2, [20.0, 1.9])
    angle.addAngle(3, 2, 5, [10.0, 2.1])
    torsion = openmm.CustomTorsionForce("kt*(1+cos(2*theta-0.3)) + 0.4*theta")  # odd in theta: the sign counts
    torsion.addPerTorsionParameter("kt")
    torsion.addTorsion(0, 1, 2, 3, [3.0])
    torsion.addTorsion(5, 4, 3, 2, [1.5])
    compound = openmm.CustomCompoundBondForce(
        4, "0.2*dihedral(p1,p2,p3,p4) + 0.5*angle(p1,p2,p3) + distance(p1,p4)^2 + c*x1*y2 - z3"
    )
    compound.addPerBondParameter("c")
    compound.addBond([0, 2, 4, 5], [0.8])
    compound.addBond([5, 3, 1, 0], [-0.3])
    nonbonded = openmm.CustomNonbondedForce(
        "4*eps*((sig/r)^12-(sig/r)^6) + f*q1*q2/r; sig=0.5*(s1+s2); eps=sqrt(e1*e2)"
    )
    nonbonded.addGlobalParameter("f", 1.4)
    for name in ("q", "s", "e"):
        nonbonded.addPerParticleParameter(name)
    for i in range(6):
        nonbonded.addParticle([(-1) ** i * 0.3, 0.1 + 0.01 * i, 0.5 + 0.1 * i])
    nonbonded.addExclusion(0, 1)
    nonbonded.addExclusion(3, 4)
    external = openmm.CustomExternalForce("a*(x-x0)^2 + y*z")
    external.addPerParticleParameter("a")
    external.addPerParticleParameter("x0")
    external.addParticle(2, [3.0, 0.1])
    external.addParticle(4, [1.0, -0.2])
    gb = openmm.CustomGBForce()
    gb.addPerParticleParameter("q")
    gb.addComputedValue("s", "exp(-r)*q2", openmm.CustomGBForce.ParticlePair)
    gb.addComputedValue("t", "s^2 + x", openmm.CustomGBForce.SingleParticle)
    gb.addEnergyTerm("q*t", openmm.CustomGBForce.SingleParticle)
    gb.addEnergyTerm("q1*q2*r*s1*t2", openmm.CustomGBForce.ParticlePair)
    gb.addEnergyTerm("0.1*r^2", openmm.CustomGBForce.ParticlePairNoExclusions)
    for i in range(6):
        gb.addParticle([0.5 - 0.2 * i])
    gb.addExclusion(0, 1)
    gb.addExclusion(2, 5)
    for force in (bond, angle, torsion, compound, nonbonded, external, gb):
        system.addForce(force)
    grid = np.stack(np.meshgrid([0.0, 0.35], [0.0, 0.35], [0.0, 0.35], indexing="ij"), -1).reshape(-1, 3)[:6]
    return System(
        name="custom",
        system=system,
        topology=point_particle_topology(6, "CUS"),
        positions=grid * unit.nanometer,
        temperature=kelvin(2.0),
        active=np.ones((6, 3), dtype=bool),
    )


def test_every_custom_force_kind_matches_openmm():
    system = custom_force_system()
    generator = torch.Generator().manual_seed(3)
    x = system.from_positions(system.positions) + 0.04 * torch.randn(
        6, system.dim, generator=generator, dtype=torch.float64
    )
    u_ref, f_ref = openmm_reduced(system, x)
    energy = TorchEnergy(system)
    assert len(energy.terms) == 7
    u, f = energy.energy_and_forces(x)
    assert_matches(u, f, u_ref, f_ref, energy_rtol=1e-10, force_rtol=1e-9)


LEPTON_CASES = [
    "-x^2+3*x-1",  # unary minus binds looser than ^
    "2^-x*y",  # ... and tighter than *
    "x^y^z",  # ^ is right-associative
    "x-y-z + x/y/z",  # - and / are left-associative
    "a*b-c; a=sin(x)+cos(y); b=tanh(z)+c; c=atan2(y,x)",  # definitions read last-to-first
    "select(step(x-0.5), x^2, -x) + delta(x-x) + min(x,y) + max(y,z)",
    "erf(x)+erfc(y)+sqrt(z)+exp(-y)+log(z)",
    "square(x)+cube(y)+recip(z)+abs(x-y)+floor(3*y)+ceil(2*z)",
    "sec(x)+csc(y)+cot(z)+asin(x/2)+acos(y/2)+atan(z)+sinh(x)+cosh(y)",
    "1e-1*x + .5*y + 2.E1*z - 3.5e+0 + 2*(x - (y + -z))",
]


@pytest.mark.parametrize("text", LEPTON_CASES)
def test_lepton_expressions_evaluate_like_openmm(text):
    """Values and gradients of ``LeptonExpression`` against OpenMM evaluating the same text."""
    system = openmm.System()
    system.addParticle(1.0)
    force = openmm.CustomExternalForce(text)
    force.addParticle(0, [])
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    points = np.random.default_rng(7).uniform([0.3, 0.2, 0.4], [0.9, 0.8, 1.0], size=(5, 3))
    xyz = torch.tensor(points, requires_grad=True)
    values = LeptonExpression(text)({"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]})
    values.sum().backward()
    for point, value, grad in zip(points, values.detach().numpy(), xyz.grad.numpy()):
        context.setPositions([openmm.Vec3(*point)])
        state = context.getState(energy=True, forces=True)
        assert value == pytest.approx(
            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), rel=1e-12, abs=1e-12
        )
        np.testing.assert_allclose(-grad, state.getForces(asNumpy=True)._value[0], rtol=1e-10, atol=1e-10)
    expression = LeptonExpression(text)  # its symbolic derivatives (the analytic forces of custom forces)
    nodes = [expression.derivative(("variable", v)) or ("number", 0.0) for v in "xyz"]
    slopes = expression.evaluate(nodes, {"x": xyz[:, 0].detach(), "y": xyz[:, 1].detach(), "z": xyz[:, 2].detach()})
    np.testing.assert_allclose(
        torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(5) for v in slopes], 1).numpy(),
        xyz.grad.numpy(),
        rtol=1e-12,
        atol=1e-12,
    )
    # the compiled CPU kernel generated from the same text (every function and operator of Lepton)
    wrapped = System(
        "lepton",
        system,
        point_particle_topology(1, "LEP"),
        points[:1] * unit.nanometer,
        kelvin(300.0),
        np.ones((1, 3), bool),
    )
    energy = TorchEnergy(wrapped)
    assert energy._kernel_terms == list(energy.terms)
    u, f = energy.energy_and_forces(torch.as_tensor(points))
    assert_matches(u, f, *openmm_reduced(wrapped, torch.as_tensor(points)), energy_rtol=1e-12, force_rtol=1e-10)


def test_lepton_errors():
    with pytest.raises(ValueError, match="unbalanced"):
        LeptonExpression("(x+1")
    with pytest.raises(ValueError, match="name"):
        LeptonExpression("x; =2")
    with pytest.raises(NotImplementedError, match="table"):
        LeptonExpression("table(x)")
    assert LeptonExpression("a*r; a=2*k").variables == {"r", "k"}


# -- what cannot be translated -----------------------------------------------------------------
def with_extra_force(system: System, force: openmm.Force) -> System:
    copy = openmm.XmlSerializer.clone(system.system)
    copy.addForce(force)
    return dataclasses.replace(system, system=copy)


def centroid_force() -> openmm.CustomCentroidBondForce:
    force = openmm.CustomCentroidBondForce(2, "0.1*distance(g1,g2)^2")
    force.addGroup([0, 1, 2])
    force.addGroup([10, 11])
    force.addBond([0, 1], [])
    return force


def test_untranslatable_force_falls_back_loudly():
    system = with_extra_force(build("alanine-vacuum-amber99sbildn-None"), centroid_force())
    with pytest.raises(NotImplementedError, match="CustomCentroidBondForce"):
        TorchEnergy(system)
    with pytest.raises(NotImplementedError, match="CustomCentroidBondForce"):
        batched_energy(system, energy="torch")
    with pytest.warns(TorchEnergyFallbackWarning, match="CustomCentroidBondForce"):
        fallback = batched_energy(system)
    assert isinstance(fallback, OpenMMEnergy)
    x = system.from_positions(system.positions)[None]
    np.testing.assert_allclose(fallback.energy_and_forces(x)[0].numpy(), openmm_reduced(system, x)[0], rtol=1e-9)


def test_auto_picks_the_measured_faster_path_and_ignores_the_tether_group():
    energy_module._measured_faster.clear()
    tether = centroid_force()
    tether.setForceGroup(INACTIVE_FORCE_GROUP)  # not part of the energy: must not block translation
    system = with_extra_force(build("cluster-3d-13"), tether)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy = batched_energy(system)
    # "auto" keeps whichever path it measured faster on this machine, and says which it measured.
    (faster,) = energy_module._measured_faster.values()
    assert isinstance(energy, TorchEnergy if faster else OpenMMEnergy)
    assert isinstance(batched_energy(system, energy="torch"), TorchEnergy)
    assert isinstance(batched_energy(system, energy="openmm"), OpenMMEnergy)
    with pytest.raises(ValueError, match="auto"):
        batched_energy(system, energy="fast")


@pytest.mark.parametrize(
    "force",
    [
        lambda: openmm.CustomNonbondedForce("1/r"),  # given a cutoff below
        lambda: openmm.CustomCompoundBondForce(2, "tab(distance(p1,p2))"),
        lambda: openmm.RBTorsionForce(),
    ],
    ids=["cutoff", "tabulated", "rb-torsion"],
)
def test_untranslatable_details_are_named(force):
    force = force()
    if isinstance(force, openmm.CustomNonbondedForce):
        force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
        for _ in range(13):
            force.addParticle([])
    if isinstance(force, openmm.CustomCompoundBondForce):
        force.addTabulatedFunction("tab", openmm.Continuous1DFunction([0.0, 1.0, 2.0], 0.0, 3.0))
        force.addBond([0, 1], [])
    with pytest.raises(NotImplementedError, match=type(force).__name__):
        TorchEnergy(with_extra_force(build("cluster-3d-13"), force))


def test_nonbonded_cutoff_is_refused():
    system = build("alanine-vacuum-amber99sbildn-None")
    copy = openmm.XmlSerializer.clone(system.system)
    for force in copy.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    with pytest.raises(NotImplementedError, match="NonbondedForce.*NoCutoff"):
        TorchEnergy(dataclasses.replace(system, system=copy))


# -- OBC2: the engulfed-atom branch the peptide never reaches ------------------------------------
@pytest.mark.parametrize("name", ["custom", "alanine-implicit-amber99sbildn-None"])
def test_analytic_gradients_equal_autograd(name):
    """Every term's ``energy_gradient`` (analytic, or symbolic for custom expressions) equals autograd
    through its plain ``forward``; ``TorchEnergy``'s backward (one fused node) equals its forces."""
    system = custom_force_system() if name == "custom" else build(name)
    energy = TorchEnergy(system)
    x = (
        real_configurations(system)
        if name != "custom"
        else system.from_positions(system.positions)
        + 0.04 * torch.randn(5, system.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    positions = energy._layout(x)
    for term in energy.terms:
        gradient = torch.zeros_like(positions)
        u = term.energy_gradient(positions, gradient)
        exact = positions.clone().requires_grad_(True)
        u_autograd = term(exact)
        (g_autograd,) = torch.autograd.grad(u_autograd.sum(), exact)
        assert torch.allclose(u, u_autograd, rtol=1e-12, atol=1e-12), type(term).__name__
        assert torch.allclose(gradient, g_autograd, rtol=1e-9, atol=1e-9 * float(g_autograd.abs().max())), type(
            term
        ).__name__
    xg = x.clone().requires_grad_(True)
    energy(xg).sum().backward()
    u, f = energy.energy_and_forces(x, chunk_size=3)
    assert torch.allclose(-xg.grad, f, rtol=1e-12, atol=1e-12) and torch.allclose(energy(x), u, rtol=1e-14)


def test_compiled_equals_eager():
    """``compile=True``: one compiled graph on chunks padded to the chunk size (ragged last chunk)."""
    system = build("cluster-2d-3")
    x = real_configurations(system)
    u, f = TorchEnergy(system).energy_and_forces(x)
    compiled = TorchEnergy(system, compile=True)
    uc, fc = compiled.energy_and_forces(x, chunk_size=4)
    assert compiled.compile, "compilation failed and fell back to eager"
    assert torch.allclose(uc, u, rtol=1e-12) and torch.allclose(fc, f, rtol=1e-10, atol=1e-12)
    assert torch.equal(pickle.loads(pickle.dumps(compiled))(x), compiled(x))


def test_obc_engulfed_atom_matches_openmm():
    """A small atom inside a large one (r < s_j - rho_i) takes Tinker's extra term in the Born radius."""
    system = openmm.System()
    gb = openmm.GBSAOBCForce()
    for charge, radius, scale in ((0.5, 0.3, 1.0), (-0.4, 0.1, 0.8), (0.2, 0.15, 0.9)):
        system.addParticle(1.0)
        gb.addParticle(charge, radius, scale)
    gb.setSolventDielectric(80.0)
    gb.setSoluteDielectric(2.0)
    system.addForce(gb)
    positions = np.array([[0.0, 0.0, 0.0], [0.05, 0.02, 0.0], [0.3, 0.1, 0.05]])
    wrapped = System(
        "obc", system, point_particle_topology(3, "OBC"), positions * unit.nanometer, kelvin(2.5), np.ones((3, 3), bool)
    )
    shifts = np.linspace(0, 0.03, 4)[:, None, None] * np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])  # (4, 3 atoms, 3)
    x = wrapped.from_positions(positions + shifts)
    u_ref, f_ref = openmm_reduced(wrapped, x)
    u, f = TorchEnergy(wrapped).energy_and_forces(x)
    assert_matches(u, f, u_ref, f_ref, energy_rtol=1e-10, force_rtol=1e-9)


# -- failures, precision, devices, interchangeability --------------------------------------------
@pytest.mark.parametrize("name", ["alanine-implicit-amber99sbildn-None", "cluster-3d-13"])
def test_clash_and_nan_give_inf_and_zero_gradient(name):
    """Hand-written (alanine) and generated (Coulomb cluster) kernels alike."""
    system = build(name)
    x = system.from_positions(system.positions).repeat(4, 1)
    x[1, 0:3] = x[1, -3:]  # atom 0 on top of the last atom (not excluded from each other)
    x[2, 5] = float("nan")
    energy = TorchEnergy(system)
    xg = x.clone().requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        u = energy(xg)
    u.sum().backward()
    assert torch.isinf(u[1]) and u[1] > 0 and torch.isinf(u[2]) and u[2] > 0
    assert torch.all(xg.grad[1:3] == 0)
    u_ref, f_ref = openmm_reduced(system, x[[0, 3]])
    assert_matches(u[[0, 3]].detach(), -xg.grad[[0, 3]], u_ref, f_ref)
    with pytest.warns(RuntimeWarning):
        u2, f2 = energy.energy_and_forces(x)
    assert torch.equal(u2, u.detach()) and torch.all(f2[1:3] == 0)
    assert energy.stats()["nonfinite"] == energy.n_nonfinite == 4 and energy.stats()["evaluations"] == 8
    # the OpenMM bridge reports the same configurations as non-finite
    with pytest.warns(RuntimeWarning):
        u_bridge, _ = OpenMMEnergy(system, platform="Reference").energy_and_forces(x)
    assert torch.equal(torch.isinf(u_bridge), torch.isinf(u2))


def test_soft_cap_matches_the_bridge():
    system = build("cluster-3d-3")
    x = real_configurations(system)
    x[0] = x[1] * 0.01 + 0.001  # charges squeezed together: far above the cap
    u_raw, _ = openmm_reduced(system, x)
    capped = TorchEnergy(system, soft_cap=5.0)
    expected, factor = linear_log_cap(u_raw, 5.0)
    np.testing.assert_allclose(capped(x).numpy(), expected, rtol=1e-10)
    xg = x.clone().requires_grad_(True)
    capped(xg).sum().backward()
    _, f_raw = openmm_reduced(system, x)
    np.testing.assert_allclose(-xg.grad.numpy(), f_raw * factor[:, None], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(capped.energy_and_forces(x)[0].numpy(), u_raw, rtol=1e-10)  # uncapped


def test_float32_and_dtype_following():
    system = build("alanine-implicit-amber99sbildn-None")
    x = real_configurations(system)
    u64, f64 = TorchEnergy(system).energy_and_forces(x)
    u32, f32 = TorchEnergy(system, dtype=torch.float32).energy_and_forces(x.float())
    assert u32.dtype == f32.dtype == torch.float32
    assert_matches(u32.double(), f32.double(), u64.numpy(), f64.numpy(), energy_rtol=1e-4, force_rtol=1e-3)
    mixed = TorchEnergy(system)(x.float())  # float64 inside, float32 out
    exact = TorchEnergy(system)(x.float().double())
    assert mixed.dtype == torch.float32 and torch.allclose(mixed.double(), exact, rtol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    system = build("alanine-implicit-amber99sbildn-None")
    x = real_configurations(system)
    u_cpu, f_cpu = TorchEnergy(system).energy_and_forces(x)
    energy = TorchEnergy(system, device="cuda")
    u, f = energy.energy_and_forces(x.cuda())
    assert u.is_cuda and energy.device.type == "cuda"
    assert_matches(u.cpu(), f.cpu(), u_cpu.numpy(), f_cpu.numpy(), energy_rtol=1e-10, force_rtol=1e-9)


def test_bad_inputs_and_pickle():
    system = build("chain-fixed-free")
    energy = TorchEnergy(system)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        energy(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(TypeError):
        energy(np.zeros((3, 7)))
    with pytest.raises(TypeError):
        TorchEnergy(system.system)
    with pytest.raises(TypeError):
        TorchEnergy(system, dtype=torch.int64)
    with pytest.raises(ValueError):
        TorchEnergy(system, soft_cap=float("inf"))
    x = real_configurations(system)
    restored = pickle.loads(pickle.dumps(energy))
    assert torch.equal(restored(x), energy(x))
    assert energy(x[:0]).shape == (0,) and energy.energy_and_forces(x[:0])[1].shape == (0, 7)


def test_forces_without_terms_contribute_zero():
    system = openmm.System()
    for _ in range(3):
        system.addParticle(1.0)
    nonbonded = openmm.NonbondedForce()
    for _ in range(3):
        nonbonded.addParticle(0.0, 0.3, 0.0)
    empty = [
        openmm.HarmonicBondForce(),
        openmm.HarmonicAngleForce(),
        openmm.PeriodicTorsionForce(),
        nonbonded,
        openmm.CustomExternalForce("x^2"),
        openmm.CustomBondForce("r"),
        openmm.CustomCompoundBondForce(2, "x1"),
    ]
    for force in empty:
        system.addForce(force)
    wrapped = System(
        "empty",
        system,
        point_particle_topology(3, "X"),
        np.zeros((3, 3)) * unit.nanometer,
        kelvin(1.0),
        np.ones((3, 3), bool),
    )
    u, f = TorchEnergy(wrapped).energy_and_forces(torch.randn(4, 9, dtype=torch.float64))
    assert torch.all(u == 0) and torch.all(f == 0)


# -- the compiled CPU kernels against the torch ops ---------------------------------------------
KERNEL_VARIANTS = [
    "alanine-vacuum-amber99sbildn-None",
    "alanine-implicit-amber99sbildn-hbonds",
    "alanine-implicit-amber14-None",
    "cluster-2d-6",
    "cluster-3d-13",
    "chain-fixed-free",
    "custom",
]


@pytest.mark.parametrize("name", KERNEL_VARIANTS)
def test_cpu_kernels_equal_torch_ops(name):
    """Every force has a kernel (written out for the standard forces, generated from the expressions
    for the custom ones, CustomGBForce included: the implicit solvent of amber14 and ff96); energies
    and forces of both paths agree to rounding, through ``energy_and_forces``, the energy-only path
    and autograd, in both precisions."""
    system = custom_force_system() if name == "custom" else build(name)
    x = real_configurations(system, seed=3)
    kernels, ops = TorchEnergy(system), TorchEnergy(system, cpu_kernels=False)
    assert kernels._kernel_terms == list(kernels.terms) and not kernels._cpu_torch_terms
    u, f = kernels.energy_and_forces(x)
    u_ops, f_ops = ops.energy_and_forces(x)
    assert torch.allclose(u, u_ops, rtol=1e-12, atol=1e-12) and torch.allclose(
        f, f_ops, rtol=1e-10, atol=1e-10 * float(f_ops.abs().max())
    )
    assert torch.allclose(kernels.potential_energy(x), ops.potential_energy(x), rtol=1e-12)
    xg = x.clone().requires_grad_(True)
    kernels(xg).sum().backward()
    assert torch.allclose(-xg.grad, f, rtol=1e-12, atol=1e-12)
    # float32: the kernels compute in float64, so only the input and the output are rounded
    u32, f32 = TorchEnergy(system, dtype=torch.float32).energy_and_forces(x.float())
    u_rounded, f_rounded = kernels.energy_and_forces(x.float().double())
    assert u32.dtype == torch.float32
    assert_matches(u32.double(), f32.double(), u_rounded.numpy(), f_rounded.numpy(), energy_rtol=1e-6, force_rtol=1e-6)


def test_torsion_kernel_every_periodicity_and_phase_matches_openmm():
    """The kernel's ``cos(n phi)`` from powers of ``exp(i phi)``: periodicities 1-6 (OpenMM's range), arbitrary phases,
    several terms on one dihedral, against OpenMM."""
    system = openmm.System()
    torsions = openmm.PeriodicTorsionForce()
    for _ in range(5):
        system.addParticle(1.0)
    rng = np.random.default_rng(4)
    for n in range(1, 7):
        torsions.addTorsion(0, 1, 2, 3, n, float(rng.uniform(-np.pi, np.pi)), float(rng.uniform(0.5, 3.0)))
        torsions.addTorsion(4, 3, 2, 1, n, float(rng.uniform(-np.pi, np.pi)), float(rng.uniform(0.5, 3.0)))
    system.addForce(torsions)
    positions = rng.normal(scale=0.15, size=(5, 3))
    wrapped = System(
        "torsions",
        system,
        point_particle_topology(5, "TOR"),
        positions * unit.nanometer,
        kelvin(300.0),
        np.ones((5, 3), bool),
    )
    x = wrapped.from_positions(positions[None] + rng.normal(scale=0.05, size=(9, 5, 3)))
    u_ref, f_ref = openmm_reduced(wrapped, x)
    for cpu_kernels in (True, False):
        u, f = TorchEnergy(wrapped, cpu_kernels=cpu_kernels).energy_and_forces(x)
        assert_matches(u, f, u_ref, f_ref, energy_rtol=1e-10, force_rtol=1e-9)


def _child_energy(energy, x, queue):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's OpenMP pool does not survive a fork
    u, f = energy.energy_and_forces(x)
    pool_works = list(parallel_module._pool(2).map(abs, [-1, -2])) == [1, 2]  # the child's own pool
    queue.put((pool_works, u.numpy(), f.numpy()))  # numpy: torch tensors would go through shared memory


def test_forked_child_computes_the_same():
    """A child forked after the kernels ran on the parent's thread pool gets its own pool and the
    same numbers."""
    import multiprocessing

    system = build("alanine-implicit-amber99sbildn-None")
    x = real_configurations(system).repeat(40, 1)  # 280 configurations: more than one block per thread
    energy = TorchEnergy(system)
    u, f = energy.energy_and_forces(x)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_energy, args=(energy, x, queue))
    child.start()
    pool_works, u_child, f_child = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and pool_works
    np.testing.assert_allclose(u_child, u.numpy(), rtol=1e-12)
    np.testing.assert_allclose(f_child, f.numpy(), rtol=1e-10, atol=1e-10)


def test_torch_runs_on_one_thread_only_around_the_kernels():
    """``energy_and_forces`` of a kernel-only system runs torch's own ops serially and restores torch's
    thread count afterwards, also when nested or interrupted by an error."""
    threads = torch.get_num_threads()
    system = build("alanine-vacuum-amber99sbildn-None")
    TorchEnergy(system).energy_and_forces(real_configurations(system))
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="inside"):
        with torch_on_one_thread():
            assert torch.get_num_threads() == 1
            with torch_on_one_thread():
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads


def _trap_system(text: str) -> System:
    """Two particles in a CustomExternalForce ``text``."""
    system = openmm.System()
    force = openmm.CustomExternalForce(text)
    for k in range(2):
        system.addParticle(1.0)
        force.addParticle(k, [])
    system.addForce(force)
    positions = np.array([[0.1, 0.2, 0.3], [-0.2, 0.1, 0.4]])
    return System(
        "trap",
        system,
        point_particle_topology(2, "TRP"),
        positions * unit.nanometer,
        kelvin(300.0),
        np.ones((2, 3), bool),
    )


def test_generated_kernels_are_cached_on_disk_and_work_without_a_cache(tmp_path, monkeypatch):
    """A generated kernel is written as a module into ``$OPENFLOW_CACHE_DIR/kernels`` and numba caches its
    machine code there; a fresh process reuses both and computes the same. An unwritable cache folder
    only means compiling in memory."""
    import subprocess
    import sys

    text = f"x^2 + {tmp_path.stat().st_ino % 1000 + 0.5}*y*z"  # an expression no other test compiled in this process
    monkeypatch.setenv("OPENFLOW_CACHE_DIR", str(tmp_path))
    system = _trap_system(text)
    x = system.from_positions(system.positions)[None]
    u, f = TorchEnergy(system).energy_and_forces(x)
    assert_matches(u, f, *openmm_reduced(system, x), energy_rtol=1e-12, force_rtol=1e-12)
    modules = sorted((tmp_path / "kernels").glob("*.py"))
    assert len(modules) == 1 and list((tmp_path / "kernels" / "__pycache__").glob("*.nbi"))
    child = (
        "import sys, torch; sys.path.insert(0, 'tests'); from test_torch_energy import _trap_system; "
        "from openflow.plugins.openmm.forcefield import TorchEnergy; s = _trap_system(sys.argv[1]); "
        "print(repr(TorchEnergy(s).energy_and_forces(s.from_positions(s.positions)[None])[0].item()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, text],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == u.item()
    assert sorted((tmp_path / "kernels").glob("*.py")) == modules
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("OPENFLOW_CACHE_DIR", str(blocked))  # kernels/ cannot be made below a file
    other = _trap_system(text.replace("x^2", "2*x^2"))
    u, f = TorchEnergy(other).energy_and_forces(x)
    assert_matches(u, f, *openmm_reduced(other, x), energy_rtol=1e-12, force_rtol=1e-12)
