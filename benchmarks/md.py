"""MD speed (ns/day) per OpenMM platform, bare and with a metadynamics bias on an exported learned CV.

For alanine dipeptide a small ``CVModel`` (features -> 16 tanh -> 1, seeded, distances standardised
on perturbed copies of the starting structure) is exported and biased with well-tempered
``openmm.app.Metadynamics`` (bias factor 5, 1 kJ/mol Gaussians every ``--frequency`` steps,
width 1/20 of the CV's guaranteed range ``cv.bounds()``). Bias variants (``--bias``):

- ``phi_psi_table``: sin/cos(phi, psi) CV as a periodic 2D spline table (``to_tabulated_cv_force``);
- ``phi_psi_lepton``: the same kind of CV as a Lepton expression (``to_custom_cv_force``, 16 CVs);
- ``distances_lepton``: 45 heavy-atom distances as a Lepton expression (16 CVs, first layer folded).

Each biased run checks the CV force it actually simulated (taken from the Metadynamics force of
the running System) against torch with ``export.check_export`` on two frames (start and end of
the run) and reports the errors; ``speed_vs_bare`` is biased ns/day over bare ns/day on the same
platform (issue 6 asks for >= 0.8). The model systems (harmonic chain n=32, Coulomb 3D n=13) run
bare. Steps: ``LangevinMiddleIntegrator`` (1/ps friction) at ``openflow.plugins.openmm.md.default_timestep``
(1 fs alanine without constraints, 0.01 ps model systems in reduced units), after
minimisation and 100 warm-up steps; best of ``--repeats`` timings of ``--steps`` steps, the bare
and biased runs of a system and platform timed in interleaved rounds (fair under changing load).

    python -m openflow.benchmarks.md --platform Reference CPU --steps 5000 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

from openflow.benchmarks.common import add_output_arguments, emit, machine_description, machine_line, parse_arguments
from openflow.cv import CVModel
from openflow.features import Dihedrals, FeatureSet, distance_features
from openflow.plugins.openmm import platforms
from openflow.plugins.openmm.export import check_export, to_custom_cv_force, to_tabulated_cv_force
from openflow.plugins.openmm.md import create_simulation, default_timestep
from openflow.systems import System, build
from openflow.systems.alanine_dipeptide import backbone_torsions

SYSTEMS = {
    "alanine_dipeptide": dict(solvent="vacuum"),
    "harmonic_chain": dict(n=32),
    "coulomb_cluster": dict(n=13, dim=3),
}
BIASES = ("none", "phi_psi_table", "phi_psi_lepton", "distances_lepton")
PLATFORMS = ("Reference", "CPU", "CUDA")


def available_platforms() -> list[str]:
    """The platforms of :data:`PLATFORMS` this OpenMM installation has."""
    return [name for name in PLATFORMS if name in platforms.available_platforms()]


def learned_cv(system: System, bias: str, seed: int = 0) -> tuple[CVModel, openmm.Force]:
    """A seeded ``CVModel`` (features -> 16 tanh -> 1) for ``bias`` and its exported ``openmm.Force``.

    sin/cos features stay unstandardised (already O(1) over the Ramachandran plane); distances are
    standardised on 64 copies of the starting structure with 0.02 nm Gaussian noise.
    """
    if bias not in BIASES[1:]:
        raise ValueError(f"bias must be one of {BIASES[1:]}, got {bias!r}")
    if system.name != "alanine_dipeptide":
        raise ValueError(f"learned CV biases are defined for alanine_dipeptide, got {system.name!r}")
    torsions = backbone_torsions(system)
    features = (
        FeatureSet(Dihedrals(torsions["phi"] + torsions["psi"]))
        if bias.startswith("phi_psi")
        else distance_features(system)
    )
    cv = CVModel(features, hidden=(16,), seed=seed).double()
    if bias == "distances_lepton":
        generator = torch.Generator().manual_seed(seed)
        start = torch.as_tensor(system.positions.value_in_unit(unit.nanometer), dtype=torch.float64)
        cv.set_standardization(start + 0.02 * torch.randn(64, *start.shape, generator=generator, dtype=torch.float64))
    export = to_tabulated_cv_force if bias == "phi_psi_table" else to_custom_cv_force
    return cv, export(cv, system.system)


def _platform_properties(name: str, threads: int | None) -> dict:
    if name == "CUDA":
        return {"Precision": "mixed"}
    return {"Threads": str(threads)} if name == "CPU" and threads is not None else {}


class _Run:
    """One prepared simulation (bare or metadynamics-biased), minimised and warmed up, ready to time."""

    def __init__(self, system: System, platform: str, bias: str, frequency: int, threads: int | None, seed: int):
        self.system, self.platform, self.bias, self.frequency = system, platform, bias, frequency
        self.omm_system = openmm.XmlSerializer.clone(system.system)
        self.meta, self.cv = None, None
        if bias != "none":
            self.cv, force = learned_cv(system, bias, seed)
            lo, hi = (float(v[0]) for v in self.cv.bounds())
            variable = app.BiasVariable(force, lo, hi, (hi - lo) / 20, False)
            state = np.random.get_state()  # Metadynamics names its bias with numpy's global generator
            np.random.seed(seed)
            self.meta = app.Metadynamics(
                self.omm_system, [variable], system.temperature, 5.0, 1.0 * unit.kilojoule_per_mole, frequency
            )
            np.random.set_state(state)
        self.dt = default_timestep(system)
        self.properties = _platform_properties(platform, threads)
        start = time.perf_counter()
        self.simulation = create_simulation(
            system, seed + 1, platform, openmm_system=self.omm_system, platform_properties=self.properties
        )
        self.setup_seconds = time.perf_counter() - start
        self.steps_done, self.times = 0, []
        self.advance(100)
        self.first_frame = self.positions()

    def advance(self, steps: int) -> None:
        if self.meta is None:
            self.simulation.step(steps)
        else:
            self.meta.step(self.simulation, steps)
        self.steps_done += steps

    def positions(self) -> np.ndarray:
        return (
            self.simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        )

    def time(self, steps: int) -> None:
        begin = time.perf_counter()
        self.advance(steps)
        self.times.append(time.perf_counter() - begin)

    def result(self, steps: int) -> dict:
        s_per_step = min(self.times) / steps
        dt_ps = self.dt.value_in_unit(unit.picosecond)
        result = {
            "system": self.system.name,
            "n_atoms": self.system.n_atoms,
            "platform": self.platform,
            "platform_properties": self.properties,
            "bias": self.bias,
            "timestep_ps": dt_ps,
            "steps": int(steps),
            "repeats": len(self.times),
            "s_per_step": s_per_step,
            "steps_per_s": 1.0 / s_per_step,
            "ns_per_day": dt_ps * 1e-3 * 86400.0 / s_per_step,
            "setup_seconds": self.setup_seconds,
        }
        if self.meta is not None:
            simulated = self.omm_system.getForce(self.omm_system.getNumForces() - 1).getCollectiveVariable(
                0
            )  # the CV that ran
            report = check_export(self.cv, simulated, np.stack([self.first_frame, self.positions()]))
            result.update(
                cv_model=f"{self.cv.n_features}-16-1 tanh",
                cv_check=report,
                cv_context_seconds=report["context_seconds"],
                metadynamics_frequency=int(self.frequency),
                n_gaussians=self.steps_done // self.frequency,
            )
        return result


def benchmark_md(
    system_name: str,
    platform: str = "Reference",
    biases=("none",),
    steps: int = 2000,
    repeats: int = 3,
    frequency: int = 500,
    threads: int | None = 1,
    seed: int = 0,
    **system_kwargs,
) -> list[dict]:
    """ns/day of Langevin MD of one system on one platform, bare (``"none"``) and metadynamics-biased.

    The simulations of all ``biases`` are prepared first, then timed in ``repeats`` interleaved
    rounds of ``steps`` steps each (best round kept), so that load changes on a shared machine hit
    them alike. Returns one flat dict per bias: ``ns_per_day``, ``steps_per_s``, ``s_per_step``,
    the settings, and for a biased run ``cv_check`` (``export.check_export``'s report on the CV
    force that ran, at the start and end frames), ``cv_context_seconds`` and ``n_gaussians``.
    """
    biases = [biases] if isinstance(biases, str) else list(biases)
    unknown = [bias for bias in biases if bias not in BIASES]
    if unknown or not biases:
        raise ValueError(f"biases must be taken from {BIASES}, got {biases!r}")
    if steps < 1 or repeats < 1 or frequency < 1:
        raise ValueError(f"steps, repeats and frequency must be >= 1, got {steps}, {repeats}, {frequency}")
    kwargs = system_kwargs or SYSTEMS.get(system_name, {})
    system = build(system_name, **kwargs)
    runs = [_Run(system, platform, bias, frequency, threads, seed) for bias in biases]
    for _ in range(repeats):
        for run in runs:
            run.time(steps)
    return [dict(run.result(steps), system_kwargs=kwargs) for run in runs]


def _with_ratios(runs: list[dict]) -> list[dict]:
    """Add ``speed_vs_bare`` (biased ns/day / bare ns/day, same system and platform) to biased runs."""
    bare = {(r["system"], r["platform"]): r["ns_per_day"] for r in runs if r["bias"] == "none"}
    for run in runs:
        reference = bare.get((run["system"], run["platform"]))
        run["speed_vs_bare"] = None if reference is None else run["ns_per_day"] / reference
    return runs


def format_table(runs: list[dict], machine: dict) -> str:
    header = (
        f"{'system':<20} {'platform':<10} {'bias':<18} {'ns/day':>10} {'us/step':>9} {'vs bare':>8} "
        f"{'CV check (value, force rel.)':>30}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        ratio = "" if run["speed_vs_bare"] is None or run["bias"] == "none" else f"{run['speed_vs_bare']:.2f}"
        check = run.get("cv_check")
        check = "" if check is None else f"{check['max_value_error']:.1e}, {check['max_force_relative_error']:.1e}"
        lines.append(
            f"{run['system']:<20} {run['platform']:<10} {run['bias']:<18} {run['ns_per_day']:>10.1f} "
            f"{1e6 * run['s_per_step']:>9.1f} {ratio:>8} {check:>30}"
        )
    lines.append(
        f"steps {runs[0]['steps']} (best of {runs[0]['repeats']}); "
        "alanine dt 1 fs, model systems 0.01 ps (reduced units)"
    )
    lines.append(machine_line(machine))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the MD benchmarks; print a table (or one JSON object with ``--json``); return
    ``{"machine": ..., "runs": [benchmark_md(...), ...]}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument(
        "--platform", nargs="+", default=None, help=f"OpenMM platforms (default: those of {PLATFORMS} present)"
    )
    parser.add_argument(
        "--bias", nargs="+", default=list(BIASES), choices=BIASES, help="alanine dipeptide biases (model systems: none)"
    )
    parser.add_argument("--steps", type=int, default=2000, help="timed MD steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frequency", type=int, default=500, help="metadynamics deposition interval (steps)")
    parser.add_argument(
        "--threads", type=int, default=1, help="OpenMM CPU-platform and torch threads (default 1: shared machines)"
    )
    parser.add_argument("--device", default="cpu", help="recorded in the machine description (MD runs in OpenMM)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parse_arguments(parser, argv)
    present = available_platforms()
    platforms = args.platform or present
    missing = [name for name in platforms if name not in present]
    if missing:
        parser.error(f"OpenMM platform(s) {missing} not available here; present: {present}")
    runs = []
    for system_name in args.system:
        biases = args.bias if system_name == "alanine_dipeptide" else ["none"]
        for platform in platforms:
            runs += benchmark_md(
                system_name,
                platform,
                list(dict.fromkeys(["none", *biases])),
                args.steps,
                args.repeats,
                args.frequency,
                args.threads,
                args.seed,
            )
    machine = machine_description(args.device)
    result = {"benchmark": "md", "machine": machine, "runs": _with_ratios(runs)}
    return emit(result, format_table(runs, machine), args.json, args.out)


if __name__ == "__main__":
    sys.exit(main() and 0)
