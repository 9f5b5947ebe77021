"""Optional TorchForce export, available only where ``openmmtorch`` imports."""
