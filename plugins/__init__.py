"""Engine adapters (installed as ``openflow.plugins``)."""
