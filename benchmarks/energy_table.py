"""The README's energy table: the per-configuration OpenMM loop vs the batched path for the four
systems, each loop against the batched path of its own precision (Reference platform: double,
batched float64; CPU platform: single, batched float32), with the compiled CPU kernels and with
torch ops (``TorchEnergy(cpu_kernels=False)``), ``--runs`` times in one process.

    python benchmarks/energy_table.py --out benchmarks/results/energy_cpu.json

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
SETTINGS = (("Reference", "float64"), ("CPU", "float32"))  # loop platform, batched dtype


def _span(values: list, scale: float = 1e-3, unit: str = "k") -> str:
    low, high = min(values) * scale, max(values) * scale
    digits = 0 if low >= 10 else 1
    return f"{low:.{digits}f}{unit}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}-{high:.{digits}f}{unit}"


def format_table(runs: list[dict]) -> str:
    """Markdown: per system and setting, loop and batched evaluations/s and their ratio (kernels),
    then the kernels' speed-up over torch ops."""
    columns = [f"loop, {platform} | batched, {dtype} | ratio" for platform, dtype in SETTINGS]
    lines = [f"| system | {' | '.join(columns)} | kernels / torch ops ({', '.join(d for _, d in SETTINGS)}) |",
             "|---" * (2 + 3 * len(SETTINGS)) + "|"]
    for label, (name, kwargs) in SYSTEMS.items():
        cells, speedups = [], []
        for platform, dtype in SETTINGS:
            mine = [r for r in runs if (r["system"], r["system_kwargs"], r["per_config_platform"], r["dtype"]) == (name, kwargs, platform, dtype)]
            kernels = [r for r in mine if r["batched_cpu_kernels"]]
            ops = [r for r in mine if not r["batched_cpu_kernels"]]
            cells += [_span([r["per_config_evals_per_s"] for r in kernels]), _span([r["batched_evals_per_s"] for r in kernels]),
                      f"**{_span([r['ratio'] for r in kernels], 1.0, 'x')}**"]
            speedups.append(_span([k["batched_evals_per_s"] / o["batched_evals_per_s"] for k, o in zip(kernels, ops)], 1.0, "x"))
        lines.append(f"| {label} | {' | '.join(cells)} | {', '.join(speedups)} |")
    lines.append(machine_line(runs[0]["machine"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2, help="repetitions of every measurement (the table gives their range)")
    parser.add_argument("--seconds", type=float, default=2.0, help="wall time per measurement")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_output_arguments(parser)
    args = parse_arguments(parser, argv)
    runs = [
        benchmark_energy(name, args.batch, "cpu", platform, dtype=dtype, seconds=args.seconds, cpu_kernels=cpu_kernels, **kwargs)
        for _ in range(args.runs)
        for platform, dtype in SETTINGS
        for name, kwargs in SYSTEMS.values()
        for cpu_kernels in (True, False)  # both paths back to back: this box drifts between runs
    ]
    return emit({"machine": runs[0]["machine"], "runs": runs}, format_table(runs), args.json, args.out)


if __name__ == "__main__":
    sys.exit(main() and 0)
