"""Batched reduced energies of an OpenMM ``System`` in torch: ``TorchEnergy`` and ``batched_energy``.

``TorchEnergy(system)(x)`` maps active coordinates ``x`` ``(B, d)`` nm to reduced energies
``u = E / kT`` ``(B,)``, vectorised over the batch and over the terms of every force, and
differentiable (forces ``= -du/dx``), on CPU and CUDA, in float32 or float64. Every number comes
from the ``openmm.System`` itself (``translate.translate_force``); only the force groups in
``System.energy_groups()`` count. On a CPU every force runs as a compiled kernel (``kernels`` for
the standard forces, ``expression_kernels`` for the custom ones; ``cpu_kernels=False`` keeps torch
ops), checked against the torch terms to rounding.

A force that does not translate raises ``NotImplementedError`` naming it; ``batched_energy(system)``
then warns loudly (``TorchEnergyFallbackWarning``) and falls back to the per-configuration OpenMM
bridge. Non-finite energies (overlapping atoms, NaN input) become ``u = +inf`` with zero gradient
and are counted, exactly as in ``OpenMMEnergy``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import numpy as np
import openmm.unit as unit
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from openflow.systems import System

from ..bridge import EvaluationCounts, OpenMMEnergy
from . import heap
from .parallel import evaluate, torch_on_one_thread
from .translate import translate_force

NONFINITE_WARNING = (
    "TorchEnergy gave non-finite energies or forces for some configurations; they are set to "
    "u = +inf with zero gradient (counts in TorchEnergy.stats())"
)


class TorchEnergyFallbackWarning(UserWarning):
    """``batched_energy(energy="auto")`` could not translate a force and uses the slow OpenMM bridge."""


class _ZeroGradientRows(torch.autograd.Function):
    """Identity on ``x`` ``(B, d)``; its backward zeroes the rows flagged in ``bad`` ``(B,)``.

    ``bad`` is filled *after* the forward pass, once the energies are known, so that rows with a
    non-finite energy (whose backward may hold inf or NaN) get an exact zero gradient. Rows whose
    gradient alone is non-finite (a finite energy at a singular geometry, e.g. an exactly linear
    angle) are zeroed too, so that no NaN ever reaches a flow's parameters.
    """

    @staticmethod
    def forward(ctx, x, bad):
        ctx.bad = bad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        rows = ctx.bad | ~torch.isfinite(grad).all(1)
        return grad.masked_fill(rows[:, None], 0.0), None


class _EnergyWithGradient(torch.autograd.Function):
    """``TorchEnergy._energy_gradient`` as one autograd node: energies ``(B,)`` of positions
    ``(3, N, B)``, their gradient computed in the same pass and kept for the backward."""

    @staticmethod
    def forward(ctx, positions, energy):
        gradient = torch.zeros_like(positions)
        result = energy._energy_gradient(positions.detach(), gradient)
        ctx.save_for_backward(gradient)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_energy):
        (gradient,) = ctx.saved_tensors
        return gradient * grad_energy, None


class TorchEnergy(EvaluationCounts, nn.Module):
    """Reduced energy ``u(x) = E(x) / kT`` of a ``System``, batched in torch (see the module docstring).

    Args:
        system: an ``openflow.systems.System``; ``x`` holds its ``dim`` active coordinates (nm).
        dtype: the precision of the computation (``x`` of another dtype is cast to it and the
            results cast back to ``x.dtype``).
        device: where the parameters live first; they follow ``x`` to its device afterwards.
        soft_cap: as in ``OpenMMEnergy``: ``__call__`` returns ``u_high + log(1 + u - u_high)``
            above ``u_high``; ``energy_and_forces`` and ``forces`` stay uncapped.
        cpu_kernels: on the CPU, evaluate every force with the compiled kernels (numba,
            vectorised, float64 inside, threaded over the batch: ``parallel.evaluate``), written out
            for the standard forces (``kernels``) and generated from the expressions for the custom
            ones (``expression_kernels``). ``False``: torch ops everywhere. Ignored on a GPU and
            with ``compile=True``.
        compile: ``energy_and_forces`` runs the energy and its analytic gradient as one
            ``torch.compile``'d graph per chunk size and device (the last chunk is padded to the chunk
            size, so nothing recompiles). Experimental: the first call compiles (a C++ compiler is
            needed) and torch.compile has miscompiled such graphs before, so check its results
            against ``compile=False``. If compiling fails it warns and stays eager. ``forward`` is
            never compiled.
        keep_freed_memory: call ``heap.keep_freed_memory()``: glibc then keeps freed memory in the
            process for reuse instead of returning it to the operating system, which speeds up the
            torch ops' multi-MB temporaries on a CPU. **Process-wide and permanent** (``mallopt``),
            so off by default; the benchmarks turn it on.

    Raises ``NotImplementedError`` naming the first force it cannot translate.

    Side effects: construction looks up (and, the first time, compiles) the CPU kernels: generated
    ones are written as modules into ``expression_kernels.cache_folder()`` and numba caches machine
    code on disk. ``energy_and_forces`` of a system whose kernels are heavy runs inside
    ``parallel.torch_on_one_thread()``, a scoped change of torch's (process-wide) thread count that
    is restored on return, also on an exception. The kernels' thread pool is kept per process.
    Nothing else outside the object changes unless ``keep_freed_memory=True``.
    """

    def __init__(
        self,
        system: System,
        dtype: torch.dtype = torch.float64,
        device=None,
        soft_cap: float | None = None,
        cpu_kernels: bool = True,
        compile: bool = False,
        keep_freed_memory: bool = False,
    ):
        super().__init__()
        if not isinstance(system, System):
            raise TypeError(f"system must be an openflow.systems.System, got {type(system).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if soft_cap is not None and not np.isfinite(soft_cap):
            raise ValueError(f"soft_cap must be a finite reduced energy or None, got {soft_cap}")
        if any(system.system.isVirtualSite(k) for k in range(system.n_atoms)):
            raise NotImplementedError(f"{system.name}: virtual sites have no torch translation")
        self.system, self.soft_cap, self.kT = system, None if soft_cap is None else float(soft_cap), system.kT_kjmol
        groups = system.energy_groups()
        terms = [
            translate_force(f, system.n_atoms) for f in system.system.getForces() if groups >> f.getForceGroup() & 1
        ]
        self.terms = nn.ModuleList(t for t in terms if t is not None)
        reference = np.asarray(system.positions.value_in_unit(unit.nanometer), dtype=np.float64).reshape(-1, 1)
        self.register_buffer("reference", torch.as_tensor(reference))
        self.register_buffer("active_index", torch.as_tensor(np.flatnonzero(system.active.reshape(-1))))
        self.all_active = bool(system.active.all())
        components = np.flatnonzero(system.active[0])  # the same leading components of every atom (chain: x; 2D: x, y)
        uniform = (system.active == system.active[0]).all() and np.array_equal(components, np.arange(len(components)))
        self._components = slice(0, len(components)) if uniform and not self.all_active else None
        self.compile, self._compiled = bool(compile), None
        self.cpu_kernels = bool(cpu_kernels)
        # CPU chunks: torch ops' per-term temporaries (rows x chunk float64) of at most ~2 MB stay off fresh,
        # page-faulting memory; the compiled kernels have none, so chunks of only-kernel systems are large
        use_kernels = self.cpu_kernels and not self.compile
        found = [(term, term.cpu_kernel() if use_kernels else None) for term in self.terms]
        self._kernel_terms = [term for term, kernel in found if kernel]
        self._cpu_torch_terms = [term for term, kernel in found if not kernel]
        self._kernels = [
            kernel for _, kernel in found if kernel
        ]  # (kernel, parameters); a lookup hashes expression trees: once
        rows = max((len(b) for t in self._cpu_torch_terms for b in t.buffers() if b.dtype == torch.int64), default=0)
        self.cpu_chunk_size = 512 if rows > 256 else 1024 if self._cpu_torch_terms else 16384
        self._kernels_only = (
            not self._cpu_torch_terms
        )  # CPU positions then stay in the caller's layout (the kernels read any strides)
        # torch's own ops run serially around kernels with >= 3 terms per coordinate (parallel.torch_on_one_thread);
        # around lighter ones their threads win (measured at batch 1024 on 2 cores: chain n=32, Coulomb n=13 vs n=24)
        kernel_rows = sum(len(parameters[0]) for _, parameters in self._kernels)
        self._serial_torch = self._kernels_only and kernel_rows >= 9 * system.n_atoms
        self.to(device=device, dtype=dtype)
        self.reset_stats()
        if keep_freed_memory:  # opt-in only: it changes malloc for the whole process, for good
            heap.keep_freed_memory()

    # -- public API ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of active coordinates ``d``."""
        return self.system.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.dtype

    @property
    def device(self) -> torch.device:
        return self.reference.device

    def potential(self, positions: torch.Tensor) -> torch.Tensor:
        """Potential energy ``(B,)`` kJ/mol of full positions ``(B, n_atoms, 3)`` nm; differentiable, raw
        (non-finite values are returned as they come)."""
        return self._potential(positions.permute(2, 1, 0).contiguous())

    def _potential(self, positions: torch.Tensor) -> torch.Tensor:
        """The same on the internal layout ``(3, n_atoms, B)``; under grad mode its gradient is computed
        together with the energies (analytically where the terms can, see ``base.Term``); first order only."""
        if torch.is_grad_enabled() and positions.requires_grad:
            return _EnergyWithGradient.apply(positions, self)
        return self._energy_gradient(positions, None)

    def _energy_gradient(self, positions: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        """Energies ``(B,)`` kJ/mol of positions ``(3, n_atoms, B)``; adds ``dE/dpositions`` into ``gradient``."""
        energy = positions.new_zeros(positions.shape[-1])
        terms = self.terms
        if positions.device.type == "cpu" and self._kernel_terms:
            if self._kernels is None:  # unpickled: generated kernels are looked up again, not pickled
                self._kernels = [term.cpu_kernel() for term in self._kernel_terms]
            energy = energy + evaluate(self._kernels, positions, gradient).to(energy.dtype)
            terms = self._cpu_torch_terms
        for term in terms:
            energy = energy + term.energy_gradient(positions, gradient)
        return energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced energies ``(B,)`` (kT, soft-capped if set) of ``x`` ``(B, d)`` nm; ``+inf`` and zero
        gradient where non-finite."""
        xc = self._coordinates(x)
        bad = torch.zeros(xc.shape[0], dtype=torch.bool, device=xc.device)
        u = self._potential(self._layout(_ZeroGradientRows.apply(xc, bad))) / self.kT
        bad.copy_(~torch.isfinite(u))
        u = u.masked_fill(bad, math.inf)
        if self.soft_cap is not None:
            excess = torch.clamp(u - self.soft_cap, min=0.0)
            u = torch.where(u > self.soft_cap, self.soft_cap + torch.log1p(excess), u)
        self._count(bad)
        return u.to(x.dtype)

    def energy_and_forces(self, x: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies ``(B,)`` kT and reduced forces ``-du/dx`` ``(B, d)`` kT/nm, no graph, uncapped.

        Evaluated ``chunk_size`` configurations at a time to bound memory; ``None``: on the CPU 512
        when a term in torch ops has over 256 rows (pairs, ...), 1024 for smaller ones, 16384 when
        the compiled kernels do everything; 16384 on a GPU. The gradient is analytic: written out
        for the standard forces, symbolic derivatives of the expressions for the custom ones
        (in torch ops, autograd for CustomNonbonded and CustomGB). Non-finite energies or forces give ``+inf`` and 0.
        On a CPU, where the compiled kernels do everything and are heavy (at least 9 kernel rows per
        atom), the call runs inside ``parallel.torch_on_one_thread()``: torch's thread count is 1
        meanwhile and restored on return, also on an exception.
        """
        serial_torch = self._serial_torch and isinstance(x, torch.Tensor) and x.device.type == "cpu"
        with torch_on_one_thread() if serial_torch else contextlib.nullcontext():
            xc = self._coordinates(x).detach()
            if chunk_size is None:
                chunk_size = self.cpu_chunk_size if xc.device.type == "cpu" else 16384
            if int(chunk_size) != chunk_size or chunk_size < 1:
                raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
            energies, forces = [], []
            for chunk in xc.split(chunk_size):
                u, grad = self._chunk_energy_gradient(chunk, chunk_size)
                finite = torch.isfinite(u) & torch.isfinite(grad.sum(-1))  # a NaN or inf component makes the sum one
                energies.append(u.masked_fill(~finite, math.inf))
                forces.append(grad.masked_fill_(~finite[:, None], 0.0).neg_())
            u, f = torch.cat(energies), torch.cat(forces)
            self._count(~torch.isfinite(u))
            return u.to(x.dtype), f.to(x.dtype)

    def forces(self, x: torch.Tensor) -> torch.Tensor:
        """Reduced forces ``-du/dx`` ``(B, d)`` kT/nm of ``x`` ``(B, d)`` nm (zero where non-finite)."""
        return self.energy_and_forces(x)[1]

    def potential_energy(self, x: torch.Tensor) -> torch.Tensor:
        """Potential energies ``(B,)`` kJ/mol (no graph, uncapped, ``+inf`` where non-finite)."""
        with torch.no_grad():
            energy = self._potential(self._layout(self._coordinates(x)))
        bad = ~torch.isfinite(energy)
        self._count(bad)
        return energy.masked_fill(bad, math.inf).to(x.dtype)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """Active coordinates ``(B, d)`` -> positions ``(B, n_atoms, 3)`` nm (inactive ones at the reference)."""
        return self._layout(x).permute(2, 1, 0)

    def _stats_label(self) -> str:
        return f"torch ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"

    def extra_repr(self) -> str:
        return f"{self.system.name}, d={self.dim}, dtype={self.dtype}, device={self.device}, soft_cap={self.soft_cap}"

    # -- internals -----------------------------------------------------------------------------
    def _reduced_energy_gradient(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced energies ``(B,)`` and ``du/dx`` ``(B, d)`` of ``chunk`` ``(B, d)``, raw."""
        positions = self._layout(chunk)
        gradient = torch.zeros_like(positions)  # same strides: a view of (B, n_atoms, 3) for the kernels
        u = self._energy_gradient(positions, gradient) / self.kT
        grad = gradient.permute(2, 1, 0)  # (B, n_atoms, 3)
        if self._components is not None:  # a strided slice: 5x an index_select
            grad = grad[:, :, self._components]
        grad = grad.reshape(len(chunk), grad.shape[1] * grad.shape[2])
        if self._components is None and not self.all_active:
            grad = grad.index_select(1, self.active_index)
        return u, grad / self.kT

    def _chunk_energy_gradient(self, chunk: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_reduced_energy_gradient``, compiled (``compile=True``) on chunks padded to ``chunk_size``."""
        if self.compile and self._compiled is None:
            self._compiled = torch.compile(self._reduced_energy_gradient, dynamic=False)
        if not self.compile or len(chunk) == 0:
            return self._reduced_energy_gradient(chunk)
        n = len(chunk)
        padded = torch.cat([chunk, chunk[-1:].expand(chunk_size - n, -1)]) if n < chunk_size else chunk
        try:
            u, grad = self._compiled(padded)
        except Exception as error:  # noqa: BLE001 - any compiler failure: stay correct, eager
            warnings.warn(
                f"TorchEnergy(compile=True): torch.compile failed ({type(error).__name__}: {error}); running eager",
                RuntimeWarning,
                stacklevel=3,
            )
            self.compile = False
            return self._reduced_energy_gradient(chunk)
        return u[:n], grad[:n]

    def __getstate__(self) -> dict:
        return dict(super().__getstate__(), _compiled=None, _kernels=None)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """Active coordinates ``(B, d)`` -> positions in the internal layout ``(3, n_atoms, B)`` nm:
        contiguous for torch ops, a transposed view of ``(B, n_atoms, 3)`` where only the CPU kernels
        read it (any strides; one array type for them to compile for)."""
        if self._components is not None:  # slice assignment: 5x an index_copy
            full = self.reference.to(x.dtype).view(1, self.system.n_atoms, 3).expand(x.shape[0], -1, -1).clone()
            full[:, :, self._components] = x.view(x.shape[0], self.system.n_atoms, self._components.stop)
            x = full
        elif not self.all_active:
            x = self.reference.to(x.dtype).expand(-1, x.shape[0]).index_copy(0, self.active_index, x.T).T
        positions = x.reshape(x.shape[0], self.system.n_atoms, 3).permute(2, 1, 0)
        return positions if self._kernels_only and x.device.type == "cpu" else positions.contiguous()

    def _coordinates(self, x) -> torch.Tensor:
        """Validate ``x`` ``(B, d)``; move the parameters to its device; return it in ``self.dtype``."""
        self.system.check_batch(x)
        if x.device != self.device:
            self.to(x.device)
        return x.to(self.dtype)

    def _count(self, bad: torch.Tensor) -> None:
        n_bad = int(bad.sum())
        self.n_evaluations += len(bad)
        self.n_nonfinite += n_bad
        if n_bad:
            warnings.warn(NONFINITE_WARNING, RuntimeWarning, stacklevel=3)


_measured_faster: dict[tuple, bool] = {}


def _faster(batched: TorchEnergy, bridge: OpenMMEnergy, system: System, batch: int) -> bool:
    """Whether ``batched`` computes energy + gradient of ``batch`` configurations faster than ``bridge``."""
    key = (
        system.n_atoms,
        tuple(sorted(type(f).__name__ for f in system.system.getForces())),
        batch,
        str(batched.device),
    )
    if key not in _measured_faster:
        generator = torch.Generator().manual_seed(0)
        start = system.from_positions(system.positions)
        x = start + 0.005 * torch.randn((batch, system.dim), generator=generator, dtype=start.dtype)

        def seconds(energy) -> float:
            best = float("inf")
            for _ in range(3):
                xi = x.clone().requires_grad_(True)
                began = time.perf_counter()
                energy(xi).sum().backward()
                best = min(best, time.perf_counter() - began)
            return best

        _measured_faster[key] = seconds(batched) < seconds(bridge)
    return _measured_faster[key]


def batched_energy(
    system: System,
    energy: str = "auto",
    *,
    dtype: torch.dtype = torch.float64,
    device=None,
    platform: str | None = None,
    platform_properties: dict | None = None,
    soft_cap: float | None = None,
    batch_hint: int = 256,
    keep_freed_memory: bool = False,
):
    """The energy ``u(x) -> (B,)`` to train and reweight with.

    Args:
        energy: ``"torch"`` (``TorchEnergy``; ``NotImplementedError`` if a force does not
            translate), ``"openmm"`` (``OpenMMEnergy``, one OpenMM call per configuration) or
            ``"auto"``: ``TorchEnergy`` when every force translates (else a
            ``TorchEnergyFallbackWarning`` naming the force and ``OpenMMEnergy``) and, off the GPU,
            when it is also *measured* faster than the OpenMM loop on ``batch_hint`` configurations
            of this system (energy + gradient, best of 3; the answer is kept per system kind, batch
            and device for the process): a fast CPU core running OpenMM's loop can beat slower
            cores running torch.
        dtype, device, keep_freed_memory: for ``TorchEnergy`` (``keep_freed_memory=True`` changes
            malloc for the whole process, see ``heap``); platform, platform_properties: for
            ``OpenMMEnergy``; soft_cap: for both.
    """
    if energy not in ("auto", "torch", "openmm"):
        raise ValueError(f"energy must be 'auto', 'torch' or 'openmm', got {energy!r}")
    bridge = OpenMMEnergy(system, platform=platform, platform_properties=platform_properties, soft_cap=soft_cap)
    if energy != "openmm":
        try:
            batched = TorchEnergy(
                system, dtype=dtype, device=device, soft_cap=soft_cap, keep_freed_memory=keep_freed_memory
            )
            if energy == "torch" or batched.device.type == "cuda" or _faster(batched, bridge, system, batch_hint):
                return batched
            return bridge
        except NotImplementedError as error:
            if energy == "torch":
                raise
            warnings.warn(
                f"batched torch energy unavailable for {system.name!r}: {error}. FALLING BACK to the "
                "per-configuration OpenMM bridge (OpenMMEnergy): one OpenMM call per configuration, "
                "no batching, no GPU speed-up for large batches",
                TorchEnergyFallbackWarning,
                stacklevel=2,
            )
    return bridge
