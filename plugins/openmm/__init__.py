"""OpenMM adapters: energy bridge, platform choice, CV export, metadynamics, reporters."""
from .platforms import available_platforms, select_platform

__all__ = ["available_platforms", "select_platform"]
