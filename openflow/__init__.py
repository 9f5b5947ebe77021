"""openflow: normalizing flows and learned collective variables for OpenMM."""

__version__ = "0.1.0"
