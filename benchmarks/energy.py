"""Energy + force evaluations per second: the per-configuration OpenMM loop vs the batched torch path.

The per-configuration loop is ``OpenMMEnergy.energy_and_forces`` (one ``setPositions`` +
``getState`` per configuration, the way Boltzmann-generator bridges do it); the batched path is
``TorchEnergy.energy_and_forces`` (analytic forces; on a CPU every force runs as a compiled
kernel, ``--torch-ops`` for torch ops throughout). Both run in the same process on the same
configurations; the OpenMM loop is timed on at most ``max_loop_configs`` of them and reported per
second. The batched path is built with ``keep_freed_memory=True`` (glibc keeps freed memory in the
process, see ``openflow.plugins.openmm.forcefield.heap``): a process-wide setting that every
measurement here shares, so that the numbers stay comparable across runs.

    python benchmarks/energy.py --system alanine_dipeptide --solvent implicit --batch 1024 --json
    python benchmarks/energy.py --system harmonic_chain --n 32 --batch 1 64 1024 16384

``--json`` prints one JSON object (for several batches: ``{"machine": ..., "runs": [...]}``);
``--out FILE`` also writes it to ``FILE``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from openflow.benchmarks.common import (
    add_output_arguments,
    emit,
    machine_description,
    machine_line,
    parse_arguments,
    rate,
    synchronizer,
)
from openflow.plugins.openmm import OpenMMEnergy
from openflow.plugins.openmm.forcefield import TorchEnergy
from openflow.systems import System, build

BATCHES = (1, 64, 1024, 16384)


def configurations(system: System, batch: int, seed: int = 0) -> torch.Tensor:
    """Plausible configurations ``(batch, d)`` float64: the chain ~ N(0, kT/k) per bond scale, the
    others the starting structure plus Gaussian noise (0.005 nm for molecules, 0.05 nm for clusters)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, system.dim, generator=generator, dtype=torch.float64)
    if system.name == "harmonic_chain":
        return noise * (system.kT_kjmol / system.parameters["k"]) ** 0.5
    scale = 0.005 if system.name == "alanine_dipeptide" else 0.05
    return system.from_positions(system.positions) + scale * noise


def benchmark_energy(
    system_name: str,
    batch: int = 1024,
    device: str = "cpu",
    platform: str | None = None,
    dtype: str = "float64",
    seconds: float = 2.0,
    max_loop_configs: int = 256,
    seed: int = 0,
    compile: bool = False,
    cpu_kernels: bool = True,
    **system_kwargs,
) -> dict:
    """Measure energy+force evaluations/s of both paths on one system and batch size.

    Args:
        system_name: ``alanine_dipeptide``, ``coulomb_cluster`` or ``harmonic_chain``.
        batch: configurations per batched call (1, 64, 1024, 16384, ...).
        device: torch device of the batched path (``cpu`` or ``cuda``).
        platform: OpenMM platform of the loop; ``None``/``"auto"``: what ``OpenMMEnergy`` picks.
        dtype: ``float64`` or ``float32``, for the batched path (OpenMM's Reference is float64).
        seconds: wall time per measurement; max_loop_configs: configurations timed in the loop.
        compile: ``TorchEnergy(compile=True)`` (compiled once in the warm-up call, not timed).
        cpu_kernels: ``TorchEnergy(cpu_kernels=...)``: the compiled CPU kernels for every force
            (default) or torch ops throughout.
        system_kwargs: passed to the system builder (``solvent="implicit"``, ``n=13``, ...).

    Returns a flat dict: ``per_config_evals_per_s``, ``batched_evals_per_s``, ``ratio``, the
    settings and ``machine``.
    """
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    system = build(system_name, **system_kwargs)
    x = configurations(system, batch, seed)

    loop = OpenMMEnergy(system, platform=platform)
    x_loop = x[: min(batch, max_loop_configs)]
    per_config = rate(lambda: loop.energy_and_forces(x_loop), len(x_loop), seconds)

    batched = TorchEnergy(
        system,
        dtype=getattr(torch, dtype),
        device=device,
        cpu_kernels=cpu_kernels,
        compile=compile,
        keep_freed_memory=True,
    )  # process-wide, on purpose: comparable numbers
    x_batched = x.to(device=device, dtype=getattr(torch, dtype))
    batched_rate = rate(lambda: batched.energy_and_forces(x_batched), batch, seconds, synchronizer(batched.device))

    u_loop, _ = loop.energy_and_forces(x_loop)
    u_batched, _ = batched.energy_and_forces(x_batched[: len(x_loop)])
    max_abs_energy_difference = float((u_batched.double().cpu() - u_loop).abs().max())
    return {
        "system": system_name,
        "system_kwargs": {k: v for k, v in system_kwargs.items()},
        "n_atoms": system.n_atoms,
        "dim": system.dim,
        "batch": int(batch),
        "dtype": dtype,
        "per_config_platform": loop.platform_name,
        "per_config_configs_timed": len(x_loop),
        "per_config_evals_per_s": per_config,
        "batched_device": str(batched.device),
        "batched_evals_per_s": batched_rate,
        "batched_compiled": bool(compile),
        "batched_cpu_kernels": bool(cpu_kernels) and batched.device.type == "cpu" and not compile,
        "ratio": batched_rate / per_config,
        "max_abs_energy_difference_kT": max_abs_energy_difference,
        "seconds_per_measurement": seconds,
        "machine": machine_description(str(batched.device)),
    }


def format_table(runs: list[dict]) -> str:
    header = (
        f"{'system':<34} {'batch':>6} {'OpenMM loop (platform)':>26} {'batched torch (device, dtype)':>34} {'ratio':>8}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        label = run["system"] + "".join(f" {k}={v}" for k, v in run["system_kwargs"].items())
        loop = f"{run['per_config_evals_per_s']:,.0f}/s ({run['per_config_platform']})"
        torch_path = f"{run['batched_evals_per_s']:,.0f}/s ({run['batched_device']}, {run['dtype']})"
        lines.append(f"{label:<34} {run['batch']:>6} {loop:>26} {torch_path:>34} {run['ratio']:>7.1f}x")
    lines.append(machine_line(runs[0]["machine"]))
    return "\n".join(lines)


def _system_kwargs(args: argparse.Namespace) -> dict:
    names = ("solvent", "forcefield", "constraints", "n", "dim", "boundary")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--system", default="alanine_dipeptide", choices=["alanine_dipeptide", "coulomb_cluster", "harmonic_chain"]
    )
    parser.add_argument("--solvent", choices=["vacuum", "implicit"])
    parser.add_argument("--forcefield", choices=["amber99sbildn", "amber14", "ff96"])
    parser.add_argument("--constraints", choices=["hbonds"])
    parser.add_argument("--n", type=int, help="particles (coulomb_cluster, harmonic_chain)")
    parser.add_argument("--dim", type=int, choices=[2, 3], help="coulomb_cluster dimension")
    parser.add_argument("--boundary", choices=["fixed-fixed", "fixed-free"])
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[1024], help=f"batch size(s), e.g. {' '.join(map(str, BATCHES))}"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the batched path (cpu, cuda)")
    parser.add_argument(
        "--platform", default=None, help="OpenMM platform of the loop (default: OpenMMEnergy's automatic choice)"
    )
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--seconds", type=float, default=2.0, help="wall time per measurement")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the batched path (TorchEnergy(compile=True))"
    )
    parser.add_argument(
        "--torch-ops",
        action="store_true",
        help="no compiled CPU kernels: torch ops for every force (TorchEnergy(cpu_kernels=False))",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; use 1 on a shared, busy machine)"
    )
    add_output_arguments(parser)
    args = parse_arguments(parser, argv)
    runs = [
        benchmark_energy(
            args.system,
            batch,
            args.device,
            args.platform,
            dtype=args.dtype,
            seconds=args.seconds,
            compile=args.compile,
            cpu_kernels=not args.torch_ops,
            **_system_kwargs(args),
        )
        for batch in args.batch
    ]
    result = runs[0] if len(runs) == 1 else {"machine": runs[0]["machine"], "runs": runs}
    return emit(result, format_table(runs), args.json, args.out)


if __name__ == "__main__":
    sys.exit(main() and 0)
