"""Helpers shared by the tests."""

from pathlib import Path

import torch

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"  # the YAML files, wherever pytest is started
TINY_LOOP = {  # the learned-CV loop at toy length: every stage runs, in seconds
    "frame_ps": 0.1,
    "round0": {"ns": 0.02},
    "nct": {"steps": 4, "batch": 64, "hidden": [8], "layers": 2},
    "cv": {"epochs": 3, "export_frames": 20},
    "rounds": {"max": 1, "ns": 0.01},
    "production": {"ns": 0.01},
    "speed": {"steps": 200, "repeats": 1},
    "progress": False,
}


def randomize_(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Overwrite every parameter (zero-initialised output layers included) with ``N(0, scale^2)`` draws
    in place; returns the module in eval mode (an ActNorm keeps the drawn values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()
