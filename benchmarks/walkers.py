"""Walkers on Dask: the wall time of the same total biased ns with one walker and with N, and their ΔF.

Alanine dipeptide (vacuum, 300 K, Reference platform), well-tempered metadynamics on (phi, psi)
(1.2 kJ/mol, bias factor 6, a Gaussian per ps, 60 x 60 grid, a frame per 0.2 ps): ``--ns`` in all,
first as one walker in this process, then as ``--walkers`` walkers sharing one bias, each a task
in a LocalCluster of one-thread worker processes (its start-up timed apart). For each: wall time,
ΔF(phi > 0 - phi < 0) with its error bar, phi transitions. Then what limits scaling: the cost of one
bias-file exchange (save own file, list the folder, load the others') as the number of walkers grows.

    openflow bench walkers --ns 4 --walkers 2 --out benchmarks/results/walkers_cpu.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from openflow import analysis, estimators
from openflow.benchmarks.common import add_output_arguments, emit, machine_description, machine_line
from openflow.plugins.openmm.bias import torsion_bias_variables
from openflow.plugins.openmm.walkers import biased_run, dask_client
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import PHI_CORE_MARGIN, backbone_torsions, phi_psi_observables, phi_states


def phi_summary(result) -> dict:
    """ΔF(phi > 0 - phi < 0) (kT) with its error, and phi transitions (inside each walker)."""
    phi = result.observables["phi"]
    estimate = estimators.state_free_energy(phi_states(phi) == 1, result.log_weights, n_blocks=20)
    transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN), result.observables.get("walker"))
    return {"delta_f_kT": estimate.delta_f, "delta_f_error_kT": estimate.error, "phi_transitions": transitions}


def exchange_seconds(walkers: int, shape=(60, 60), repeats: int = 200) -> float:
    """Seconds of one bias-file exchange as OpenMM does it with ``walkers`` walkers: save this walker's
    grid under a temp name, rename it, list the folder, load every other walker's file."""
    with tempfile.TemporaryDirectory() as folder:
        grid = np.random.default_rng(0).random(shape)
        for other in range(1, walkers):
            np.save(Path(folder) / f"bias_{other}_1.npy", grid)
        start = time.perf_counter()
        for index in range(repeats):
            temp = Path(folder) / f"temp_0_{index}.npy"
            np.save(temp, grid)
            os.replace(temp, Path(folder) / f"bias_0_{index}.npy")
            (Path(folder) / f"bias_0_{index - 1}.npy").unlink(missing_ok=True)
            for name in os.listdir(folder):
                if name.startswith("bias_") and not name.startswith("bias_0_"):
                    np.load(Path(folder) / name)
        return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=float, default=4.0, help="biased ns in all, shared among the walkers")
    parser.add_argument("--walkers", type=int, default=2, help="walkers of the second run (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", help="where the runs go (default: a temporary folder)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.walkers < 2 or not args.ns > 0:
        parser.error("--walkers must be >= 2 and --ns positive")
    system = alanine_dipeptide()
    torsions = backbone_torsions(system)
    variables = torsion_bias_variables([torsions["phi"][0], torsions["psi"][0]], width=0.35, grid=60)
    settings = dict(
        ns=args.ns,
        height=1.2,
        bias_factor=6.0,
        frequency=1000,
        interval=200,
        platform="Reference",
        seed=args.seed,
        cv_names=["cv_phi", "cv_psi"],
        observables=phi_psi_observables(),
        progress=False,
        overwrite=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder or scratch)
        start = time.perf_counter()
        one = biased_run(system, variables, folder / "one", **settings)
        one_wall = time.perf_counter() - start
        start = time.perf_counter()
        with dask_client(n_workers=args.walkers) as client:
            cluster_s = time.perf_counter() - start
            start = time.perf_counter()
            many = biased_run(system, variables, folder / "many", client, args.walkers, **settings)
            many_wall = time.perf_counter() - start
    result = {
        "benchmark": "walkers",
        "system": "alanine_dipeptide vacuum, phi/psi well-tempered metadynamics, Reference",
        "ns_total": args.ns,
        "walkers": args.walkers,
        "one_walker": dict(phi_summary(one), wall_s=one_wall),
        "walkers_run": dict(phi_summary(many), wall_s=many_wall, cluster_start_s=cluster_s),
        "wall_ratio": many_wall / one_wall,
        "wall_ratio_with_cluster_start": (many_wall + cluster_s) / one_wall,
        "exchange_ms": {str(n): 1e3 * exchange_seconds(n) for n in (1, 2, 4, 8, 16)},
        "machine": machine_description(),
    }
    a, b = result["one_walker"], result["walkers_run"]
    table = "\n".join(
        [
            f"{args.ns:g} biased ns of phi/psi metadynamics, alanine dipeptide (Reference):",
            f"  1 walker : {a['wall_s']:6.1f} s, ΔF {a['delta_f_kT']:.2f} ± {a['delta_f_error_kT']:.2f} kT, "
            f"{a['phi_transitions']} phi transitions",
            f"  {args.walkers} walkers: {b['wall_s']:6.1f} s (+{cluster_s:.1f} s cluster start), ΔF "
            f"{b['delta_f_kT']:.2f} ± {b['delta_f_error_kT']:.2f} kT, {b['phi_transitions']} phi transitions",
            f"  wall ratio {result['wall_ratio']:.2f} ({result['wall_ratio_with_cluster_start']:.2f} with the start)",
            "  bias-file exchange per deposit (ms) by walkers: "
            + ", ".join(f"{n}: {ms:.2f}" for n, ms in result["exchange_ms"].items()),
            machine_line(result["machine"]),
        ]
    )
    return emit(result, table, args.json, args.out)
