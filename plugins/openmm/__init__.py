"""OpenMM adapters: energy bridge, platform choice, CV export, metadynamics, reporters."""
from .bridge import OpenMMEnergy
from .export import check_export, export_cv, load_cv_force, save_cv_force, to_custom_cv_force, to_tabulated_cv_force
from .platforms import available_platforms, select_platform

__all__ = [
    "check_export", "export_cv", "load_cv_force", "save_cv_force", "to_custom_cv_force", "to_tabulated_cv_force","OpenMMEnergy", "available_platforms", "select_platform"]

from .torch_energy import TorchEnergy, TorchEnergyFallbackWarning, batched_energy

__all__ += ["TorchEnergy", "TorchEnergyFallbackWarning", "batched_energy"]
