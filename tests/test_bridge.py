"""The OpenMM energy bridge: values, forces, gradients, failures, dtypes, platforms."""

import pickle
import warnings
from functools import cache

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from openflow.cli import main
from openflow.plugins.openmm import OpenMMEnergy, available_platforms, bridge
from openflow.plugins.openmm import platforms as platforms_module
from openflow.systems import INACTIVE_FORCE_GROUP, System, alanine_dipeptide, coulomb_cluster, harmonic_chain
from openflow.systems.base import kelvin, point_particle_topology

BUILDERS = {
    "chain-fixed-fixed": lambda: harmonic_chain(4, boundary="fixed-fixed", k=1.7, temperature=0.8),
    "chain-fixed-free": lambda: harmonic_chain(4, boundary="fixed-free", k=1.7, temperature=0.8),
    "cluster-2d": lambda: coulomb_cluster(3, dim=2, temperature=1.3),
    "cluster-3d": lambda: coulomb_cluster(3, dim=3, temperature=1.3),
    "alanine-vacuum": lambda: alanine_dipeptide("vacuum"),
    "alanine-implicit": lambda: alanine_dipeptide("implicit"),
}
NAMES = list(BUILDERS)


@cache
def build(name: str) -> System:
    return BUILDERS[name]()


def configurations(system: System, batch: int, seed: int) -> torch.Tensor:
    """Random float64 configurations ``(batch, d)``: chain ~ N(0, 1); others = reference + noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, system.dim, generator=generator, dtype=torch.float64)
    if system.name == "harmonic_chain":
        return noise
    scale = 0.1 if system.name == "coulomb_cluster" else 0.005  # keeps charges apart, bonds sane
    return system.from_positions(system.positions) + scale * noise


def direct_openmm(system: System, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``(B,)`` kJ/mol and full forces ``(B, n_atoms, 3)`` kJ/mol/nm from our own Reference Context."""
    context = openmm.Context(
        system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    energies, forces = [], []
    for positions in system.to_positions(x):
        context.setPositions(positions * unit.nanometer)
        state = context.getState(energy=True, forces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


# -- values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_matches_direct_context(name):
    system = build(name)
    x = configurations(system, 5, seed=1)
    energy = OpenMMEnergy(system, platform="Reference")
    u, f = energy.energy_and_forces(x)
    e_ref, f_ref = direct_openmm(system, x)
    kT = system.kT_kjmol
    np.testing.assert_allclose(u.numpy(), e_ref / kT, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(energy.potential_energy(x).numpy(), e_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(f.numpy(), f_ref[:, system.active] / kT, rtol=1e-6, atol=1e-6 * np.abs(f_ref).max() / kT)
    assert energy.stats()["evaluations"] == 2 * len(x) and energy.n_nonfinite == 0


def test_tether_group_is_left_out():
    """A constant 5 kJ/mol placed in the tether group must not reach u (nor the forces)."""
    system = harmonic_chain(4, boundary="fixed-fixed", k=1.7, temperature=0.8)
    offset = openmm.CustomExternalForce("5.0 + 3.0*x")
    offset.addParticle(0, [])
    offset.setForceGroup(INACTIVE_FORCE_GROUP)
    system.system.addForce(offset)
    x = configurations(system, 3, seed=15)
    u, f = OpenMMEnergy(system, platform="Reference").energy_and_forces(x)
    e_exact, f_exact = chain_analytic(x.numpy(), k=1.7, boundary="fixed-fixed")
    np.testing.assert_allclose(u.numpy(), e_exact / 0.8, rtol=1e-9)
    np.testing.assert_allclose(f.numpy(), f_exact / 0.8, rtol=1e-9, atol=1e-12)


def chain_analytic(q: np.ndarray, k: float, boundary: str) -> tuple[np.ndarray, np.ndarray]:
    """E = k/2 sum (q_i - q_{i-1})^2 with q_0 = 0 (and q_{n+1} = 0 for fixed-fixed); F = -dE/dq."""
    left = np.concatenate([np.zeros((len(q), 1)), q], axis=1)  # q_0 .. q_n
    right_end = np.zeros((len(q), 1)) if boundary == "fixed-fixed" else q[:, -1:]
    padded = np.concatenate([left, right_end], axis=1)  # q_0 .. q_{n+1}
    bonds = np.diff(padded, axis=1)  # q_i - q_{i-1}, i = 1 .. n+1
    return 0.5 * k * (bonds**2).sum(1), k * (bonds[:, 1:] - bonds[:, :-1])


def cluster_analytic(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """E = sum_{i<j} 1/r_ij + sum_i |r_i|^2 in ``dim`` dimensions; F = -dE/dx, flattened like x."""
    r = x.reshape(len(x), -1, dim)
    diff = r[:, :, None, :] - r[:, None, :, :]
    dist = np.linalg.norm(diff, axis=-1)
    iu = np.triu_indices(r.shape[1], k=1)
    energy = (1.0 / dist[:, iu[0], iu[1]]).sum(1) + (r**2).sum((1, 2))
    dist = dist + np.diag(np.full(r.shape[1], np.inf))  # i == j: zero difference over infinite distance
    forces = (diff / dist[..., None] ** 3).sum(2) - 2.0 * r
    return energy, forces.reshape(len(x), -1)


@pytest.mark.parametrize("name", ["chain-fixed-fixed", "chain-fixed-free", "cluster-2d", "cluster-3d"])
def test_matches_analytic_formula(name):
    system = build(name)
    x = configurations(system, 6, seed=2)
    u, f = OpenMMEnergy(system, platform="Reference").energy_and_forces(x)
    if system.name == "harmonic_chain":
        e_exact, f_exact = chain_analytic(x.numpy(), k=1.7, boundary=system.parameters["boundary"])
    else:
        e_exact, f_exact = cluster_analytic(x.numpy(), dim=system.parameters["dim"])
    kT = system.kT_kjmol
    np.testing.assert_allclose(u.numpy(), e_exact / kT, rtol=1e-6)
    np.testing.assert_allclose(f.numpy(), f_exact / kT, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["cluster-3d", "alanine-vacuum", "alanine-implicit"])
def test_cpu_platform_agrees_with_reference(name):
    """The CPU platform computes nonbonded terms in single precision (eps ~ 6e-8 per term), hence 1e-5."""
    system = build(name)
    x = configurations(system, 4, seed=3)
    u_ref, f_ref = OpenMMEnergy(system, platform="Reference").energy_and_forces(x)
    u_cpu, f_cpu = OpenMMEnergy(system, platform="CPU").energy_and_forces(x)
    assert torch.allclose(u_cpu, u_ref, rtol=0, atol=1e-5 * u_ref.abs().max())
    assert torch.allclose(f_cpu, f_ref, rtol=0, atol=1e-5 * f_ref.abs().max())


# -- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chain-fixed-free", "cluster-2d", "cluster-3d", "alanine-vacuum", "alanine-implicit"])
def test_gradient_matches_central_differences(name):
    """Directional derivatives along random unit vectors v: autograd vs (u(x+hv) - u(x-hv)) / 2h.

    h = 1e-5 nm: the truncation error h^2/6 |u'''| stays below ~2e-5 kT/nm for |u'''| <= 1e6
    kT/nm^3 (covalent terms on a 0.1 nm scale; the chain and trap are quadratic, FD exact there),
    round-off eps |u| / h ~ 1e-8 kT/nm. A wrong sign, unit or component order errs by O(1-100).
    """
    system = build(name)
    x = configurations(system, 4, seed=4).requires_grad_(True)
    energy = OpenMMEnergy(system, platform="Reference")
    (grad,) = torch.autograd.grad(energy(x).sum(), x)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    h = 1e-5
    with torch.no_grad():
        central = (energy(x + h * v) - energy(x - h * v)) / (2 * h)
    analytic = (grad * v).sum(1)
    assert torch.allclose(analytic, central, rtol=1e-7, atol=1e-4), (analytic, central)
    assert torch.equal(grad, -energy.forces(x.detach()))


@pytest.mark.parametrize("name", ["chain-fixed-fixed", "cluster-2d", "alanine-vacuum"])
def test_gradcheck(name):
    system = build(name)
    x = configurations(system, 2, seed=6).requires_grad_(True)
    energy = OpenMMEnergy(system, platform="Reference")
    # eps 1e-6 nm: truncation <= 1e-12/6 * 1e6 ~ 2e-7 and round-off ~ 1e-16 * 500 / 1e-6 ~ 5e-8 kT/nm
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-6, atol=1e-5, rtol=1e-6)


def test_soft_cap_values_and_gradient():
    system = build("chain-fixed-fixed")
    x = configurations(system, 64, seed=7).requires_grad_(True)
    raw = OpenMMEnergy(system, platform="Reference")
    u_raw, f_raw = raw.energy_and_forces(x)
    cap = float(u_raw.median())
    capped = OpenMMEnergy(system, platform="Reference", soft_cap=cap)
    u = capped(x)
    above = u_raw > cap
    assert above.any() and (~above).any()
    expected = torch.where(above, cap + torch.log(1 + u_raw - cap), u_raw)
    assert torch.allclose(u, expected, rtol=1e-12)
    (grad,) = torch.autograd.grad(u.sum(), x)
    factor = torch.where(above, 1 / (1 + u_raw - cap), torch.ones_like(u_raw))
    assert torch.allclose(grad, -f_raw * factor[:, None], rtol=1e-12, atol=1e-14)
    assert torch.equal(capped.forces(x.detach()), f_raw)  # forces() stays physical
    with pytest.raises(ValueError, match="soft_cap"):
        OpenMMEnergy(system, soft_cap=float("inf"))


# -- failures ----------------------------------------------------------------------------------
def assert_failed_rows_are_isolated(energy: OpenMMEnergy, x: torch.Tensor, bad: list[int]):
    """Bad rows: +inf energy, zero gradient, counted; a loss over the good rows is unaffected."""
    x = x.clone().requires_grad_(True)
    energy.reset_stats()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        u = energy(x)
    good = [i for i in range(len(x)) if i not in bad]
    assert torch.isposinf(u[bad]).all() and torch.isfinite(u[good]).all()
    assert energy.stats()["nonfinite"] == len(bad) and energy.stats()["evaluations"] == len(x)
    (grad,) = torch.autograd.grad(u[torch.isfinite(u)].sum(), x)
    assert torch.equal(grad[bad], torch.zeros_like(grad[bad]))
    x_good = x.detach()[good].clone().requires_grad_(True)
    u_good = energy(x_good)
    (grad_good,) = torch.autograd.grad(u_good.sum(), x_good)
    # the CPU platform balances threads dynamically: sums are reproducible only to float32 rounding
    torch.testing.assert_close(u[good].detach(), u_good.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[good], grad_good, rtol=1e-6, atol=1e-6 * grad_good.abs().max().item())
    (grad_all,) = torch.autograd.grad(energy(x).mean(), x)  # an infinite loss still has zero there
    assert torch.equal(grad_all[bad], torch.zeros_like(grad_all[bad])) and torch.isfinite(grad_all).all()
    assert torch.equal(energy.forces(x.detach())[bad], torch.zeros_like(grad[bad]))


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_coulomb_clash_and_nan(platform):
    system = build("cluster-2d")
    x = configurations(system, 4, seed=8)
    x[0, 2:4] = x[0, 0:2]  # charges 0 and 1 on top of each other
    x[2, 3] = float("nan")
    assert_failed_rows_are_isolated(OpenMMEnergy(system, platform=platform), x, bad=[0, 2])


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_alanine_collapse(platform):
    system = build("alanine-vacuum")
    x = configurations(system, 3, seed=9)
    x[1] = 0.3  # every atom at (0.3, 0.3, 0.3)
    assert_failed_rows_are_isolated(OpenMMEnergy(system, platform=platform), x, bad=[1])


@pytest.mark.skipif(not hasattr(openmm, "PythonForce"), reason="openmm.PythonForce needs OpenMM >= 8.5")
def test_openmm_exception_becomes_inf():
    """A force that raises for x > 1 nm: OpenMM's exception turns into +inf, the next sample is fine."""

    def trap_that_fails_far_out(state):
        r = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        if r[0, 0] > 1.0:
            raise ValueError("outside the tabulated range")
        return 0.5 * (r**2).sum(), -r

    omm = openmm.System()
    omm.addParticle(1.0)
    omm.addForce(openmm.PythonForce(trap_that_fails_far_out))
    system = System(
        "python_force",
        omm,
        point_particle_topology(1, "PYF"),
        np.zeros((1, 3)) * unit.nanometer,
        kelvin(2.0),
        np.ones((1, 3), dtype=bool),
    )
    x = torch.tensor([[0.5, 0.1, 0.0], [2.0, 0.0, 0.0], [0.3, -0.2, 0.4]], dtype=torch.float64)
    energy = OpenMMEnergy(system, platform="Reference")
    assert_failed_rows_are_isolated(energy, x, bad=[1])
    u = energy.energy_and_forces(x)[0]
    assert torch.allclose(u[[0, 2]], 0.5 * (x[[0, 2]] ** 2).sum(1) / 2.0, rtol=1e-12)


# -- tensors, platforms, lifecycle -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_input(dtype):
    system = build("alanine-vacuum")
    x64 = configurations(system, 3, seed=10)
    energy = OpenMMEnergy(system, platform="Reference")
    x = x64.to(dtype).requires_grad_(True)
    u = energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    assert u.dtype == dtype and grad.dtype == dtype and energy.forces(x).dtype == dtype
    assert u.shape == (3,) and grad.shape == x.shape
    expected = energy(x.detach().double())  # same float32-rounded coordinates, evaluated in float64
    assert torch.allclose(u.double(), expected, rtol=torch.finfo(dtype).eps * 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA torch device")
def test_device_follows_input():
    system = build("cluster-2d")
    x = configurations(system, 3, seed=11).cuda().requires_grad_(True)
    energy = OpenMMEnergy(system, platform="Reference")
    u = energy(x)
    (grad,) = torch.autograd.grad(u.sum(), x)
    assert u.device == x.device and grad.device == x.device
    assert torch.allclose(u.cpu(), energy(x.detach().cpu()))


def test_bad_inputs():
    system = build("cluster-3d")  # d = 9
    energy = OpenMMEnergy(system, platform="Reference")
    for shape in [(9,), (2, 8), (2, 3, 3)]:
        with pytest.raises(ValueError, match=r"\(B, 9\)"):
            energy(torch.zeros(shape, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        energy(np.zeros((2, 9)))
    with pytest.raises(TypeError, match="floating"):
        energy.forces(torch.zeros((2, 9), dtype=torch.int64))
    with pytest.raises(TypeError, match="System"):
        OpenMMEnergy(system.system)
    assert energy(torch.zeros((0, 9))).shape == (0,)


def test_unknown_platform_names_available_ones():
    with pytest.raises(ValueError) as error:
        OpenMMEnergy(build("chain-fixed-fixed"), platform="Quantum")
    for name in available_platforms():
        assert name in str(error.value)


@pytest.mark.skipif("CUDA" in available_platforms(), reason="CUDA is present here")
def test_missing_cuda_is_an_error_and_only_auto_falls_back(capsys):
    """An explicit request that cannot be met is an error naming what exists; "auto" falls back, saying so once."""
    system = build("chain-fixed-free")
    with pytest.raises(ValueError, match=r"'CUDA' is not available here .*available: .*Reference"):
        OpenMMEnergy(system, platform="CUDA")
    platforms_module._noticed.clear()
    energy = OpenMMEnergy(system, platform="auto")
    assert energy.platform_name in ("Reference", "CPU")
    assert OpenMMEnergy(system).platform_name == energy.platform_name
    notices = [line for line in capsys.readouterr().err.splitlines() if "no CUDA platform" in line]
    assert len(notices) == 1
    x = configurations(system, 3, seed=12)
    e_exact, _ = chain_analytic(x.numpy(), k=1.7, boundary="fixed-free")
    np.testing.assert_allclose(energy(x).numpy(), e_exact / system.kT_kjmol, rtol=1e-6)
    assert (
        main(
            [
                "simulate",
                "--system",
                "harmonic_chain",
                "--steps",
                "20",
                "--interval",
                "10",
                "--platform",
                "CUDA",
                "--out",
                "unused",
            ]
        )
        == 2
    )
    assert "not available here" in capsys.readouterr().err


def test_lazy_context_auto_platform_and_pickle():
    system = build("alanine-vacuum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        energy = OpenMMEnergy(system)
    assert energy._context is None and energy._platform_name is None  # nothing built or measured yet
    x = configurations(system, 3, seed=13)
    u = energy(x)
    assert energy.platform_name in available_platforms() and energy.stats()["platform"] == energy.platform_name
    clone = pickle.loads(pickle.dumps(energy))
    assert clone._context is None and clone.platform_name == energy.platform_name
    assert torch.equal(clone(x), u)


def test_public_and_fast_state_readers_agree():
    system = build("alanine-implicit")
    context = openmm.Context(
        system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(system.to_positions(configurations(system, 1, seed=14))[0])
    state = context.getState(energy=True, forces=True)
    fast, public = np.empty((system.n_atoms, 3)), np.empty((system.n_atoms, 3))
    assert bridge._read_state_fast(state, fast) == bridge._read_state_public(state, public)
    assert np.array_equal(fast, public)
