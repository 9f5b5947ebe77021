"""OpenMM adapters: energy bridge, batched torch energies, platform choice, CV export."""

from .bridge import OpenMMEnergy
from .export import check_export, export_cv, load_cv_force, save_cv_force, to_custom_cv_force, to_tabulated_cv_force
from .forcefield import TorchEnergy, TorchEnergyFallbackWarning, batched_energy
from .platforms import available_platforms, select_platform

__all__ = [
    "OpenMMEnergy",
    "TorchEnergy",
    "TorchEnergyFallbackWarning",
    "available_platforms",
    "batched_energy",
    "check_export",
    "export_cv",
    "load_cv_force",
    "save_cv_force",
    "select_platform",
    "to_custom_cv_force",
    "to_tabulated_cv_force",
]
