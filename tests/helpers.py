"""Helpers shared by the tests."""

from pathlib import Path

import torch

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"  # the YAML files, wherever pytest is started


def randomize_(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output layers included) with ``N(0, scale^2)`` draws
    in place; returns the module in eval mode (an ActNorm keeps the drawn values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()
