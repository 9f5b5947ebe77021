"""The README's energy table: the per-configuration OpenMM loop vs the batched path for the four
systems, each loop against the batched path of its own precision (Reference platform: double,
batched float64; CPU or CUDA platform: single, batched float32), on the CPU with the compiled
kernels and with torch ops (``TorchEnergy(cpu_kernels=False)``), ``--runs`` times in one process.
Every batched path keeps freed memory in the process (``benchmark_energy``: ``TorchEnergy(...,
keep_freed_memory=True)``), as the README's numbers were measured.

    python benchmarks/energy_table.py --out benchmarks/results/energy_cpu.json
    python benchmarks/energy_table.py --device cuda --platform CUDA --batch 16384

Prints the Markdown table (ranges over the runs) and writes every run as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from openflow.benchmarks.common import add_output_arguments, emit, machine_line, parse_arguments
from openflow.benchmarks.energy import benchmark_energy

SYSTEMS = {  # README label: (builder, keyword arguments)
    "alanine dipeptide, vacuum": ("alanine_dipeptide", {"solvent": "vacuum"}),
    "alanine dipeptide, OBC2": ("alanine_dipeptide", {"solvent": "implicit"}),
    "Coulomb 3D n=13": ("coulomb_cluster", {"n": 13, "dim": 3}),
    "harmonic chain n=32": ("harmonic_chain", {"n": 32}),
}
PLATFORMS = ("Reference", "CPU")


def _dtype(platform: str) -> str:
    """The batched precision that matches the loop's platform (Reference: double; others: single)."""
    return "float64" if platform == "Reference" else "float32"


def _span(values: list, scale: float = 1e-3, unit: str = "k") -> str:
    low, high = min(values) * scale, max(values) * scale
    digits = 0 if low >= 10 else 1
    return (
        f"{low:.{digits}f}{unit}"
        if f"{low:.{digits}f}" == f"{high:.{digits}f}"
        else f"{low:.{digits}f}-{high:.{digits}f}{unit}"
    )


def format_table(runs: list[dict]) -> str:
    """Markdown: per system and loop platform, loop and batched evaluations/s and their ratio, then
    (on the CPU) the kernels' speed-up over torch ops."""
    platforms = list(dict.fromkeys(r["per_config_platform"] for r in runs))
    on_cpu = runs[0]["batched_device"] == "cpu"
    columns = [f"loop, {platform} | batched, {_dtype(platform)} | ratio" for platform in platforms]
    if on_cpu:
        columns.append(f"kernels / torch ops ({', '.join(map(_dtype, platforms))})")
    lines = [f"| system | {' | '.join(columns)} |", "|---" * (1 + 3 * len(platforms) + on_cpu) + "|"]
    for label, (name, kwargs) in SYSTEMS.items():
        cells, speedups = [], []
        for platform in platforms:
            mine = [
                r
                for r in runs
                if (r["system"], r["system_kwargs"], r["per_config_platform"]) == (name, kwargs, platform)
            ]
            fast = [r for r in mine if r["batched_cpu_kernels"] or not on_cpu]
            ops = [r for r in mine if not r["batched_cpu_kernels"]]
            cells += [
                _span([r["per_config_evals_per_s"] for r in fast]),
                _span([r["batched_evals_per_s"] for r in fast]),
                f"**{_span([r['ratio'] for r in fast], 1.0, 'x')}**",
            ]
            if on_cpu:
                speedups.append(
                    _span([k["batched_evals_per_s"] / o["batched_evals_per_s"] for k, o in zip(fast, ops)], 1.0, "x")
                )
        lines.append(f"| {label} | {' | '.join(cells + ([', '.join(speedups)] if on_cpu else []))} |")
    lines.append(machine_line(runs[0]["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="torch device of the batched path (cpu, cuda)")
    parser.add_argument("--platform", nargs="+", default=list(PLATFORMS), help="OpenMM platforms of the loop")
    parser.add_argument(
        "--runs", type=int, default=2, help="repetitions of every measurement (the table gives their range)"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="wall time per measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_output_arguments(parser)
    args = parse_arguments(parser, argv)
    paths = (True, False) if args.device == "cpu" else (True,)  # kernels, then torch ops, back to back: this box drifts
    runs = [
        benchmark_energy(
            name,
            args.batch,
            args.device,
            platform,
            dtype=_dtype(platform),
            seconds=args.seconds,
            cpu_kernels=cpu_kernels,
            **kwargs,
        )
        for _ in range(args.runs)
        for platform in args.platform
        for name, kwargs in SYSTEMS.values()
        for cpu_kernels in paths
    ]
    return emit({"machine": runs[0]["machine"], "runs": runs}, format_table(runs), args.json, args.out)


if __name__ == "__main__":
    sys.exit(main() and 0)
