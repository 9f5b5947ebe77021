"""OpenMM adapters: energy bridge, platform choice, CV export, metadynamics, reporters."""
from .bridge import OpenMMEnergy
from .platforms import available_platforms, select_platform

__all__ = ["OpenMMEnergy", "available_platforms", "select_platform"]
