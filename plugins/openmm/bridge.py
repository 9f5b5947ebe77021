"""OpenMM energies and forces as a differentiable torch function of the active coordinates.

``OpenMMEnergy(system)(x)`` maps a batch of active coordinates ``x`` ``(B, d)`` in nm to reduced
energies ``u = E / kT`` ``(B,)``; the gradient comes from OpenMM's forces, ``du/dx = -F / kT``.
Only the system's physical force groups (``System.energy_groups()``) are evaluated.

Each configuration is one ``setPositions`` + ``getState`` on a single Context: a Python loop in
float64 on the CPU side, whatever the device of ``x`` (OpenMM's boundary); results go back to
``x``'s device and dtype. Expect a few thousand evaluations/s for small systems.

Configurations OpenMM cannot evaluate (overlapping atoms, NaN coordinates, an exception raised by
OpenMM) get ``u = +inf`` and a zero gradient, are counted (``stats()``) and raise a
``RuntimeWarning``: they are never handed to a loss as finite numbers.
"""

from __future__ import annotations

import warnings

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch.autograd.function import once_differentiable

from openflow.systems import System

from .platforms import select_platform

ENERGY_UNIT = unit.kilojoule_per_mole
FORCE_UNIT = unit.kilojoule_per_mole / unit.nanometer
NONFINITE_WARNING = (
    "OpenMM gave non-finite energies or forces for some configurations; they are set to "
    "u = +inf with zero gradient (counts in OpenMMEnergy.stats())"
)


def _read_state_public(state: openmm.State, forces_out: np.ndarray) -> float:
    """Copy the forces (kJ/mol/nm) into ``forces_out`` ``(n_atoms, 3)``; return the energy in kJ/mol."""
    forces_out[:] = state.getForces(asNumpy=True).value_in_unit(FORCE_UNIT)
    return state.getPotentialEnergy().value_in_unit(ENERGY_UNIT)


def _read_state_fast(state: openmm.State, forces_out: np.ndarray) -> float:
    """As ``_read_state_public``, without building unit Quantities (~4x less overhead per call).

    OpenMM's State always stores kJ/mol and kJ/mol/nm, so no conversion is needed.
    """
    state._getVectorAsNumpy(openmm.State.Forces, forces_out)
    return state.getPotentialEnergy()._value


_read_state = _read_state_fast if hasattr(openmm.State, "_getVectorAsNumpy") else _read_state_public


def linear_log_cap(u: np.ndarray, cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear-log cap: ``u`` below ``cap``, ``cap + log(1 + u - cap)`` above.

    Returns the capped energies and ``du_capped/du`` (both ``(B,)``); ``+inf`` stays ``+inf``
    with factor 0.
    """
    excess = np.maximum(u - cap, 0.0)
    return np.where(u > cap, cap + np.log1p(excess), u), 1.0 / (1.0 + excess)


class _ReducedEnergy(torch.autograd.Function):
    """``u(x)`` with ``du/dx = -f``, where ``f`` are the (capped) reduced forces from OpenMM."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, energy: OpenMMEnergy) -> torch.Tensor:
        u, f = energy._evaluate(x)
        if energy.soft_cap is not None:
            u, factor = linear_log_cap(u, energy.soft_cap)
            f = f * factor[:, None]
        u, f = energy._like(u, x), energy._like(f, x)
        ctx.save_for_backward(u, f)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: torch.Tensor):
        u, f = ctx.saved_tensors
        grad_x = torch.where(torch.isinf(u)[:, None], 0.0, -f * grad_u[:, None])
        return grad_x, None


class EvaluationCounts:
    """Counters every energy keeps: ``n_evaluations``, ``n_nonfinite``, ``stats()``, ``reset_stats()``."""

    n_evaluations: int = 0
    n_nonfinite: int = 0

    def _stats_label(self) -> str | None:  # pragma: no cover - each energy names itself
        raise NotImplementedError

    def stats(self) -> dict:
        """Counts since construction or ``reset_stats()``: evaluations, non-finite ones, and their fraction."""
        return {
            "platform": self._stats_label(),
            "evaluations": self.n_evaluations,
            "nonfinite": self.n_nonfinite,
            "nonfinite_fraction": self.n_nonfinite / max(self.n_evaluations, 1),
        }

    def reset_stats(self) -> None:
        self.n_evaluations = 0
        self.n_nonfinite = 0


class OpenMMEnergy(EvaluationCounts):
    """Reduced energy ``u(x) = E(x) / kT`` of an ``openflow.systems.System``, differentiable in ``x``.

    Args:
        system: the ``System`` (its active coordinates define ``d`` and ``x``'s layout).
        platform: an OpenMM platform name, or ``None``/``"auto"``: CUDA if present, else the
            faster of Reference and CPU measured on this system (see ``select_platform``).
            An unknown name is a ``ValueError``; a missing CUDA falls back with a warning.
        platform_properties: OpenMM platform properties, e.g. ``{"Precision": "double"}`` for
            CUDA (whose default single precision gives ~1e-6 relative energies).
        soft_cap: if set (a reduced energy ``u_high``), ``__call__`` returns
            ``u_high + log(1 + u - u_high)`` above ``u_high`` (with the matching gradient), to
            keep training losses finite-slope; ``forces``/``energy_and_forces`` stay uncapped.

    The OpenMM Context is created on first use, so construction is cheap and the object pickles
    (the Context is rebuilt after unpickling).
    """

    def __init__(
        self,
        system: System,
        platform: str | None = None,
        platform_properties: dict | None = None,
        soft_cap: float | None = None,
    ):
        if not isinstance(system, System):
            raise TypeError(f"system must be an openflow.systems.System, got {type(system).__name__}")
        if soft_cap is not None and not np.isfinite(soft_cap):
            raise ValueError(f"soft_cap must be a finite reduced energy or None, got {soft_cap}")
        self.system = system
        self.platform_properties = {str(k): str(v) for k, v in (platform_properties or {}).items()}
        self.soft_cap = None if soft_cap is None else float(soft_cap)
        self._kT = system.kT_kjmol
        self._groups = system.energy_groups()
        self._platform_name = None
        if platform not in (None, "auto"):
            self._platform_name = select_platform(platform, system.system, system.positions, task="energy").getName()
        self._context = None
        self.reset_stats()

    # -- public API ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of active coordinates ``d``."""
        return self.system.dim

    @property
    def platform_name(self) -> str:
        """Name of the OpenMM platform in use (chosen, and measured if automatic, on first access)."""
        if self._platform_name is None:
            platform = select_platform(None, self.system.system, self.system.positions, task="energy")
            self._platform_name = platform.getName()
        return self._platform_name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energies ``(B,)`` (units of kT, soft-capped if set) of ``x`` ``(B, d)`` nm; differentiable."""
        return _ReducedEnergy.apply(x, self)

    def energy_and_forces(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies ``(B,)`` in kT and reduced forces ``-du/dx`` ``(B, d)`` in kT/nm (no graph, uncapped)."""
        u, f = self._evaluate(x)
        return self._like(u, x), self._like(f, x)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced forces ``-du/dx`` ``(B, d)`` in kT/nm of ``x`` ``(B, d)`` nm (zero where non-finite)."""
        return self.energy_and_forces(x)[1]

    def potential_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Potential energies ``(B,)`` in kJ/mol (OpenMM units, no graph, uncapped) of ``x`` ``(B, d)`` nm."""
        u, _ = self._evaluate(x)
        return self._like(u * self._kT, x)

    def _stats_label(self) -> str | None:
        return self._platform_name

    def __repr__(self) -> str:
        platform = self._platform_name or "auto"
        return f"OpenMMEnergy({self.system.name}, d={self.dim}, platform={platform}, soft_cap={self.soft_cap})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_context"] = None
        return state

    # -- internals -----------------------------------------------------------------------------
    @property
    def context(self) -> openmm.Context:
        """The OpenMM Context, created on first use."""
        if self._context is None:
            platform = openmm.Platform.getPlatformByName(self.platform_name)
            integrator = openmm.VerletIntegrator(1.0 * unit.femtosecond)  # unused: single points only
            try:
                self._context = openmm.Context(self.system.system, integrator, platform, self.platform_properties)
            except openmm.OpenMMException as error:
                raise ValueError(
                    f"cannot create an OpenMM Context on {self.platform_name} with properties "
                    f"{self.platform_properties}: {error}"
                ) from None
        return self._context

    def _coordinates(self, x) -> np.ndarray:
        """Validate ``x`` ``(B, d)`` and return it as a float64 numpy array on the CPU."""
        self.system.check_batch(x)
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()

    @staticmethod
    def _like(values: np.ndarray, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(values).to(device=x.device, dtype=x.dtype)

    def _evaluate(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Reduced energies ``(B,)`` and forces ``(B, d)`` (float64 numpy); ``+inf`` and 0 where non-finite."""
        coordinates = self._coordinates(x)
        positions = self.system.to_positions(coordinates)
        energies = np.full(len(positions), np.nan)
        forces = np.zeros(positions.shape)
        context, groups = self.context, self._groups
        for b in np.flatnonzero(np.isfinite(coordinates).all(axis=1)).tolist():
            try:
                context.setPositions(positions[b])
                energies[b] = _read_state(context.getState(energy=True, forces=True, groups=groups), forces[b])
            except openmm.OpenMMException:
                pass  # energy stays NaN: handled as non-finite below
        finite = np.isfinite(energies) & np.isfinite(forces).all(axis=(1, 2))
        reduced_energies = np.where(finite, energies / self._kT, np.inf)
        reduced_forces = np.where(finite[:, None], forces[:, self.system.active] / self._kT, 0.0)
        n_bad = int(len(finite) - finite.sum())
        self.n_evaluations += len(finite)
        self.n_nonfinite += n_bad
        if n_bad:
            warnings.warn(NONFINITE_WARNING, RuntimeWarning, stacklevel=2)
        return reduced_energies, reduced_forces
