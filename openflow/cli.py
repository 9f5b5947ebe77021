"""The ``openflow`` command.

Subcommands live in a registry: each is one small function taking the parsed arguments, plus
an optional function adding its arguments to its parser. A new subcommand is added with::

    def _train_arguments(parser): parser.add_argument("config")

    @subcommand("train", "train a flow", _train_arguments)
    def train(args): ...

Bad input (``ValueError``, ``TypeError``, missing files and other ``OSError``s, argparse errors)
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform as python_platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

USAGE_ERROR = 2


class UsageError(Exception):
    """Bad command-line input found after parsing; reported in one line with exit status 2."""


@dataclass
class Subcommand:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register the decorated function ``run(args) -> exit status | None`` as ``openflow NAME``."""

    def register(run):
        SUBCOMMANDS[name] = Subcommand(name, help, arguments, run)
        return run

    return register


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line (no usage block)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openflow")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="openflow", description="Normalizing flows, canonical transformations and learned CVs for OpenMM."
    )
    parser.add_argument("--version", action="version", version=f"openflow {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, command in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if command.arguments is not None:
            command.arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``openflow`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return USAGE_ERROR
        return SUBCOMMANDS[args.command].run(args) or 0
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except UsageError as error:
        print(f"{error}", file=sys.stderr)
    except BrokenPipeError:  # output piped into a closed reader, e.g. `openflow info | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, OSError) as error:
        print(f"openflow: error: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("openflow: interrupted", file=sys.stderr)
        return 130
    return USAGE_ERROR


# ----------------------------------------------------------------------------- info


def _info_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the information as JSON")


def environment() -> dict:
    """Versions, OpenMM platforms and the torch device, as a flat-ish dict."""
    import mdtraj
    import numba
    import numpy
    import openmm
    import torch

    import openflow
    from openflow.plugins.openmm import available_platforms

    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "openflow": openflow.__version__,
            "openmm": openmm.__version__,
            "torch": torch.__version__,
            "mdtraj": mdtraj.__version__,
            "numpy": numpy.__version__,
            "numba": numba.__version__,
            "python": python_platform.python_version(),
        },
        "openmm_platforms": available_platforms(),
        "openmm_plugin_load_failures": list(openmm.Platform.getPluginLoadFailures()),
        "torch_cuda_available": cuda,
        "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


@subcommand("info", "print versions, OpenMM platforms and the torch device", _info_arguments)
def info(args):
    facts = environment()
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    for name, version in facts["versions"].items():
        print(f"{name:10s} {version}")
    print(f"OpenMM platforms: {', '.join(facts['openmm_platforms'])}")
    if facts["openmm_plugin_load_failures"]:
        print(
            f"  ({len(facts['openmm_plugin_load_failures'])} OpenMM plugins did not load; "
            "`openflow info --json` says why)"
        )
    print(f"torch device: {facts['torch_device']} (CUDA available: {'yes' if facts['torch_cuda_available'] else 'no'})")


# ----------------------------------------------------------------------------- simulate

# Command-line options that are passed to the system builder when it takes them.
SYSTEM_OPTIONS = ("solvent", "forcefield", "constraints", "n", "dim", "boundary")


def _system_arguments(parser):
    """``--system NAME`` with its builder's options, or ``--xml system.xml --pdb structure.pdb``."""
    from openflow.systems import BUILDERS

    system = parser.add_argument_group("system (a builder by name, or any OpenMM system as files)")
    system.add_argument("--system", choices=sorted(BUILDERS), help="which system to build")
    system.add_argument("--xml", help="a serialized openmm.System (openmm.XmlSerializer), with --pdb")
    system.add_argument("--pdb", help="a PDB of the same atoms: topology and starting positions (with --xml)")
    system.add_argument(
        "--solvent", choices=("vacuum", "implicit"), help="alanine dipeptide: vacuum or OBC2 implicit solvent"
    )
    system.add_argument("--forcefield", help="alanine dipeptide: amber99sbildn (default), amber14, ff96")
    system.add_argument(
        "--constraints", choices=("none", "hbonds"), help="alanine dipeptide: bond constraints (default none)"
    )
    system.add_argument("--n", type=int, help="harmonic chain / Coulomb cluster: number of particles")
    system.add_argument("--dim", type=int, choices=(2, 3), help="Coulomb cluster: 2 or 3 dimensions")
    system.add_argument("--boundary", choices=("fixed-fixed", "fixed-free"), help="harmonic chain: boundary condition")
    heat = system.add_mutually_exclusive_group()
    heat.add_argument("--temperature", type=float, help="temperature in K (default 300 K, or the builder's)")
    heat.add_argument("--kT", type=float, help="reduced temperature kT in kJ/mol (model systems: default 1)")


def system_from_args(args, command: str):
    """The system of ``--system NAME`` (with the options given on the command line) or of ``--xml`` +
    ``--pdb``. An option the chosen builder does not take is a ``UsageError``; ``--temperature`` is in
    K, ``--kT`` in kJ/mol (both reach the builder's ``temperature``)."""
    import openmm.unit as unit

    from openflow.systems import BUILDERS, build, from_files

    given = {name: getattr(args, name) for name in SYSTEM_OPTIONS if getattr(args, name) is not None}
    if (args.xml is None) != (args.pdb is None):
        raise UsageError(
            f"openflow {command}: --xml and --pdb go together (a serialized openmm.System and a PDB of its atoms)"
        )
    if args.xml is not None:
        if args.system is not None or given or args.kT is not None:
            raise UsageError(
                f"openflow {command}: --xml/--pdb take no --system or builder options (only --temperature)"
            )
        return from_files(args.xml, args.pdb, temperature_K=300.0 if args.temperature is None else args.temperature)
    if args.system is None:
        raise UsageError(f"openflow {command}: give --system NAME or --xml system.xml --pdb structure.pdb")
    if args.temperature is not None:
        given["temperature"] = args.temperature * unit.kelvin
    if args.kT is not None:
        given["temperature"] = args.kT
    accepted = inspect.signature(BUILDERS[args.system]).parameters
    foreign = sorted(name for name in given if name not in accepted)
    if foreign:
        flags = ", ".join("--temperature/--kT" if name == "temperature" else f"--{name}" for name in foreign)
        raise UsageError(
            f"openflow {command}: {flags} {'does' if len(foreign) == 1 else 'do'} not apply to --system {args.system}"
        )
    if given.get("constraints") == "none":
        given["constraints"] = None
    return build(args.system, **given)


def _simulate_arguments(parser):
    _system_arguments(parser)
    run = parser.add_argument_group("run")
    length = run.add_mutually_exclusive_group(required=True)
    length.add_argument("--ns", type=float, help="simulated time in ns (reduced systems: 1 ps is the time unit)")
    length.add_argument("--steps", type=int, help="number of production steps")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--interval", type=int, help="steps between saved frames (default: one frame per ps)")
    run.add_argument("--platform", help="OpenMM platform (default: automatic, by measurement)")
    run.add_argument("--seed", type=int, help="random seed (velocities and Langevin noise)")
    run.add_argument(
        "--timestep", type=float, help="time step in ps (default: 1 fs, 2 fs with hbonds, 0.01 ps for model systems)"
    )
    run.add_argument("--friction", type=float, help="Langevin friction in 1/ps (default 1)")
    run.add_argument("--equilibration-steps", type=int, help="unsaved steps after minimisation (default: 10 ps worth)")
    run.add_argument("--overwrite", action="store_true", help="replace a trajectory already in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


@subcommand("simulate", "run Langevin MD of a system; write DCD + PDB + energy log", _simulate_arguments)
def simulate(args):
    from openflow.plugins.openmm.md import simulate as run_simulation

    system = system_from_args(args, "simulate")
    result = run_simulation(
        system,
        steps=args.steps,
        ns=args.ns,
        interval=args.interval,
        out=args.out,
        seed=args.seed,
        platform=args.platform,
        timestep=args.timestep,
        friction=args.friction,
        equilibration_steps=args.equilibration_steps,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(
        f"{result.n_frames} frames ({result.steps} steps of {result.timestep_ps:g} ps) on {result.platform}: "
        f"{result.ns_per_day:.1f} ns/day"
    )
    for label, path in (
        ("trajectory", result.trajectory),
        ("topology", result.topology),
        ("energies", result.energies),
        ("settings", result.metadata),
    ):
        print(f"  {label:10s} {path}")


# ----------------------------------------------------------------------------- run


def _run_arguments(parser):
    parser.add_argument("workflow", help="workflow file (YAML), e.g. workflows/harmonic_chain.yaml")
    parser.add_argument("--out", required=True, help="output folder (metrics.json, plots, checkpoints, config.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, dotted for nested ones (e.g. --set mle.steps=50); repeatable",
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object on stdout")


@subcommand("run", "run an end-to-end workflow file; write metrics.json, plots and checkpoints", _run_arguments)
def run(args):
    from openflow.io import plain_json
    from openflow.workflows import parse_overrides
    from openflow.workflows import run as run_workflow

    metrics = run_workflow(args.workflow, args.out, parse_overrides(args.set))
    if args.json:  # valid JSON: non-finite numbers are null, as in metrics.json
        print(json.dumps(plain_json(metrics), sort_keys=True, allow_nan=False))
    else:
        print(os.path.join(args.out, "metrics.json"))


# ----------------------------------------------------------------------------- rama


def _rama_arguments(parser):
    parser.add_argument("trajectory", help="trajectory file (DCD, XTC, PDB, ... anything mdtraj reads)")
    parser.add_argument("--top", help="topology file (PDB); not needed for a PDB trajectory")
    parser.add_argument(
        "--weights", help="per-frame weights: .npy or a one-column text file (metadynamics or flow importance weights)"
    )
    parser.add_argument(
        "--units", choices=("kT", "kJ/mol"), default="kT", help="free-energy units of the plot (default kT)"
    )
    parser.add_argument("--temperature", type=float, default=300.0, help="temperature in K for kJ/mol (default 300)")
    parser.add_argument("--bins", type=int, help="bins per angle (default: from the frames' effective number)")
    parser.add_argument(
        "--vmax", type=float, help="top of the colour scale, in --units (default: the highest sampled cell)"
    )
    parser.add_argument("--title", help="plot title (default: the trajectory's file name)")
    parser.add_argument("--out", required=True, help="output folder (rama.png, populations.json)")


@subcommand(
    "rama",
    "Ramachandran plot (PNG) and phi<0 / phi>0 basin populations (JSON) of a peptide trajectory",
    _rama_arguments,
)
def rama(args):
    from openflow import analysis
    from openflow.data import load_trajectory
    from openflow.io import write_json
    from openflow.systems.alanine_dipeptide import PHI_POSITIVE_BASIN, phi_psi, phi_states

    for path, what in ((args.trajectory, "trajectory"), (args.top, "topology")):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file not found: {path}")
    phi, psi = phi_psi(load_trajectory(args.trajectory, args.top))
    weights = analysis.load_weights(args.weights) if args.weights else None
    surface = analysis.ramachandran(
        (phi, psi), weights=weights, bins=args.bins, units=args.units, temperature=args.temperature
    )
    state = analysis.state_populations(phi_states(phi) == 1, surface.weights)
    populations = {
        "negative": state["rest"],
        "positive": state["state"],
        "delta_f_kT": state["delta_f_kT"],
        "n_frames": state["n_frames"],
        "ess_fraction": state["ess_fraction"],
    }
    os.makedirs(args.out, exist_ok=True)
    plot = analysis.plot_ramachandran(
        surface,
        os.path.join(args.out, "rama.png"),
        title=args.title or os.path.basename(args.trajectory),
        vmax=args.vmax,
        boundaries=PHI_POSITIVE_BASIN,
    )
    report = write_json(os.path.join(args.out, "populations.json"), populations)
    print(
        f"{phi.size} frames: phi<0 basin {populations['negative']:.4f}, phi>0 basin {populations['positive']:.4f}, "
        f"dF = {populations['delta_f_kT']:.3f} kT"
    )
    print(f"  plot        {plot}\n  populations {report}")


# ----------------------------------------------------------------------------- metad


def _metad_arguments(parser):
    _system_arguments(parser)
    parser.add_argument(
        "--cv",
        required=True,
        help="'phi-psi' (a peptide's first backbone torsions, periodic), or an exported "
        "CV force XML file (see --cv-range)",
    )
    parser.add_argument(
        "--cv-range",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="CV range of an XML CV (the bias is zero outside it; CVModel.bounds() gives a safe one)",
    )
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--ns", type=float, help="simulated time in ns")
    length.add_argument("--steps", type=int, help="number of MD steps")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--width", type=float, help="Gaussian width in CV units (default 0.35 rad for phi-psi, range/50 for XML CVs)"
    )
    parser.add_argument("--grid", type=int, help="bias grid points per CV (default: OpenMM's 5 * range / width)")
    parser.add_argument("--height", type=float, default=1.0, help="initial Gaussian height in kJ/mol (default 1)")
    parser.add_argument(
        "--bias-factor", type=float, default=6.0, help="well-tempered bias factor gamma > 1 (default 6)"
    )
    parser.add_argument("--frequency", type=int, default=500, help="steps between Gaussians (default 500)")
    parser.add_argument("--interval", type=int, help="steps between frames and COLVAR rows (default: 1 ps)")
    parser.add_argument("--platform", help="OpenMM platform (default: automatic, by measurement)")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--continue-from", help="output folder of an earlier run with the same CV: continue its bias and state"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="empty --out of an earlier run (its bias would otherwise be loaded)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    walkers = parser.add_argument_group("walkers (Dask)")
    walkers.add_argument(
        "--walkers", type=int, default=1, help="walkers sharing one bias; --ns/--steps is their total (default 1)"
    )
    walkers.add_argument("--scheduler", help="a Dask scheduler's address (default: a LocalCluster on this machine)")
    walkers.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per walker)")
    walkers.add_argument(
        "--checkpoint-ps", type=float, default=50.0, help="ps between a walker's checkpoints (default 50)"
    )


@subcommand(
    "metad", "well-tempered metadynamics of any system on phi/psi (peptides) or an exported CV", _metad_arguments
)
def metad(args):
    import numpy as np

    from openflow import analysis, estimators
    from openflow.io import write_json
    from openflow.plugins.openmm.bias import learned_bias_variables, torsion_bias_variables
    from openflow.plugins.openmm.export import load_cv_force
    from openflow.plugins.openmm.walkers import biased_run, check_walkers, client_for
    from openflow.systems.alanine_dipeptide import (
        PHI_CORE_MARGIN,
        PHI_POSITIVE_BASIN,
        backbone_torsions,
        phi_psi_observables,
        phi_states,
    )

    system = system_from_args(args, "metad")
    try:
        torsions = backbone_torsions(system)
    except ValueError:
        torsions = None  # not a peptide: no phi/psi to bias or report
    if args.cv == "phi-psi":
        if args.cv_range:
            raise UsageError("openflow metad: --cv-range does not apply to --cv phi-psi (the range is [-pi, pi])")
        if torsions is None:
            raise UsageError("openflow metad: --cv phi-psi needs a peptide (residues with backbone N, CA, C atoms)")
        variables = torsion_bias_variables(
            [torsions["phi"][0], torsions["psi"][0]], width=args.width or 0.35, grid=args.grid
        )
    else:
        if not args.cv_range:
            raise UsageError("openflow metad: an XML CV needs --cv-range MIN MAX (the bias is zero outside it)")
        lo, hi = args.cv_range
        variables = learned_bias_variables(
            [load_cv_force(args.cv)], args.width or (hi - lo) / 50.0, args.grid, [(lo, hi)]
        )
    check_walkers(args.walkers, {"address": args.scheduler, "n_workers": args.workers})
    with client_for(args.walkers, args.scheduler, args.workers) as client:
        result = biased_run(
            system,
            variables,
            args.out,
            client,
            args.walkers,
            steps=args.steps,
            ns=args.ns,
            height=args.height,
            bias_factor=args.bias_factor,
            frequency=args.frequency,
            interval=args.interval,
            platform=args.platform,
            seed=args.seed if args.walkers == 1 else (args.seed or 0),
            continue_from=args.continue_from,
            cv_names=["cv_phi", "cv_psi"] if args.cv == "phi-psi" else None,
            observables=phi_psi_observables() if torsions else None,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            checkpoint_ps=args.checkpoint_ps,
        )
    print(
        f"{result.steps} steps on {result.platform}: {result.ns_per_day:.1f} ns/day, {len(result.time_ps)} frames, "
        f"ESS of the reweighting weights {result.summary()['weights_ess_fraction']:.3f}"
    )
    if torsions:
        phi, psi = result.observables["phi"], result.observables["psi"]
        state = analysis.state_populations(phi_states(phi) == 1, result.weights)
        estimate = estimators.state_free_energy(phi_states(phi) == 1, result.log_weights, n_blocks=min(20, phi.size))
        transitions = analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN), result.observables.get("walker"))
        surface = analysis.ramachandran((phi, psi), weights=result.weights, temperature=system.temperature_K)
        bias_fes = None
        if args.cv == "phi-psi":  # the bias is a function of (phi, psi): its sum_hills FES goes beside the histogram
            fes = np.load(result.files["fes"])
            bias_fes = (fes["free_energy_kjmol"], fes["axis_0"], fes["axis_1"])
        plot = analysis.plot_ramachandran(
            surface,
            os.path.join(args.out, "rama.png"),
            title="metadynamics, reweighted",
            boundaries=PHI_POSITIVE_BASIN,
            bias_fes=bias_fes,
        )
        write_json(
            os.path.join(args.out, "populations.json"),
            {
                "negative": state["rest"],
                "positive": state["state"],
                "delta_f_kT": state["delta_f_kT"],
                "delta_f_error_kT": estimate.error,
                "transitions": transitions,
            },
        )
        print(
            f"  {transitions} phi transitions ({transitions / result.ns:.1f}/ns), "
            f"dF(phi>0 - phi<0) = {state['delta_f_kT']:.3f} +- {estimate.error:.3f} kT (reweighted, 20 blocks)"
        )
        print(f"  {'rama':10s} {plot}")
    for key in ("trajectory", "topology", "colvar", "weights", "fes", "bias_dir", "state"):
        print(f"  {key:10s} {result.files[key]}")


# ----------------------------------------------------------------------------- bench

BENCHMARKS = ("energy", "energy_table", "flows", "md", "walkers")


def _bench_arguments(parser):
    parser.add_argument(
        "benchmark",
        choices=BENCHMARKS,
        help="which benchmark (energy: OpenMM loop vs batched torch; energy_table: the README's table of it; "
        "flows: sampling and training step per flow family; md: ns/day bare and with a CV bias; walkers: wall "
        "time of the same biased ns with 1 and N walkers on Dask)",
    )
    parser.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        help="the benchmark's own options, e.g. --system alanine_dipeptide --batch 1024 --json "
        "(see openflow bench NAME --help)",
    )


@subcommand("bench", "run a speed benchmark; print a table, or one JSON object with --json", _bench_arguments)
def bench(args):
    import importlib

    importlib.import_module(f"openflow.benchmarks.{args.benchmark}").main(args.options)


if __name__ == "__main__":
    sys.exit(main())
