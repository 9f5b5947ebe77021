"""Physical systems as OpenMM ``System``s (installed as ``openflow.systems``)."""

from .alanine_dipeptide import alanine_dipeptide
from .base import INACTIVE_FORCE_GROUP, MOLAR_GAS_CONSTANT, System, kT_kjmol
from .coulomb_cluster import coulomb_cluster
from .files import from_files, from_openmm
from .harmonic_chain import HarmonicChain, harmonic_chain

BUILDERS = {
    "alanine_dipeptide": alanine_dipeptide,
    "coulomb_cluster": coulomb_cluster,
    "harmonic_chain": harmonic_chain,
}


def build(name: str, **kwargs) -> System:
    """Build a system by name (as used by the CLI and workflow files)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown system {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](**kwargs)


__all__ = [
    "System",
    "HarmonicChain",
    "INACTIVE_FORCE_GROUP",
    "MOLAR_GAS_CONSTANT",
    "kT_kjmol",
    "alanine_dipeptide",
    "coulomb_cluster",
    "from_files",
    "from_openmm",
    "harmonic_chain",
    "build",
]
