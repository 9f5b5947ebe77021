"""Batched energies of an ``openmm.System`` in torch, on CPU and GPU: the force-field engine.

``TorchEnergy(system)`` maps active coordinates ``(B, d)`` nm to reduced energies ``(B,)`` (and
forces), ``batched_energy(system)`` picks it or the per-configuration OpenMM bridge. The modules,
one job each:

- ``energy``: ``TorchEnergy``, ``batched_energy``, ``TorchEnergyFallbackWarning``;
- ``translate``: ``translate_force``, an ``openmm.Force`` -> a torch term (what is translated);
- ``base``: the internal layout ``(3, N, B)``, the ``Term`` base class, gathers/scatters and the
  geometry (``openflow.geometry``) every term uses;
- ``terms``: the standard forces (bonds, angles, torsions, Coulomb + Lennard-Jones, OBC2);
- ``custom``: the custom forces, from their Lepton expressions (``CustomGBForce`` included);
- ``lepton``: Lepton expressions: parser, symbolic derivatives, evaluation, geometry as trees;
- ``kernels``: compiled CPU kernels (numba) of the standard forces and the kernel contract;
- ``expression_kernels``: CPU kernels generated from Lepton trees, cached on disk;
- ``parallel``: running the kernels on threads; ``torch_on_one_thread`` (scoped);
- ``heap``: ``keep_freed_memory`` (glibc, process-wide; only on request).
"""

from .energy import TorchEnergy, TorchEnergyFallbackWarning, batched_energy
from .expression_kernels import cache_folder
from .heap import keep_freed_memory
from .lepton import LeptonExpression
from .parallel import torch_on_one_thread
from .translate import translate_force

__all__ = [
    "LeptonExpression",
    "TorchEnergy",
    "TorchEnergyFallbackWarning",
    "batched_energy",
    "cache_folder",
    "keep_freed_memory",
    "torch_on_one_thread",
    "translate_force",
]
