"""Flow sampling throughput (samples/s, with log-density) and one training step (ms) per flow family.

Families (``--family``, default all) at the dimensions of the systems (``--dim``, default
12 = Coulomb 2D n=6, 39 = Coulomb 3D n=13, 32 = chain n=32, 66 = alanine dipeptide 22 atoms):

- ``realnvp_bg``: ``BoltzmannGenerator(StandardNormal(d), real_nvp(d))``; training step: ``reverse_kl``
  against a cheap analytic energy (a double well in the first coordinate, harmonic in the rest).
- ``nct_realnvp`` / ``nct_linear``: ``NeuralCanonicalTransformation(PointTransformation(real_nvp(d)
  or LinearExp(d, orthogonal=True)), LatentHarmonicPrior(d))``; a sample is ``(p, q)``, ``2d`` numbers;
  training step: ``nll`` on Gaussian ``(p, q)`` data.
- ``cnf_{rk4,dopri5}_{exact,hutchinson}``: ``ContinuousFlow(MLPVelocity(d))``; RK4 with ``--rk4-steps``
  fixed steps or adaptive dopri5 (rtol = atol = 1e-5); training step: ``flow_matching``.
- ``monge_ampere_mlp``: ``MongeAmpereFlow(MLPPotential(d))`` (RK4, exact Laplacian);
  ``monge_ampere_pair``: ``PairMongeAmpereFlow(PairPotential(n, D))`` (closed-form velocity and
  Laplacian, permutation and rotation symmetric; ``d = n D``); training step: ``flow_matching``.

Sampling draws ``--samples`` points with their ``log q`` under ``torch.no_grad()``; a training step is
zero_grad + loss + backward + Adam step on a batch of ``--batch`` (the median of ``--repeats`` steps
after one warm-up). Untrained networks: adaptive solvers take more steps once trained. Exact
divergences cost ``d`` backward passes per velocity evaluation: at d = 66 on one CPU thread they
sample ~10^2 points/s, so use ``--samples 1000`` for them (each rate needs two sampling calls).

    python -m openflow.benchmarks.flows --dim 12 39 --family realnvp_bg cnf_rk4_exact --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

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
from openflow.flows import (
    BoltzmannGenerator,
    ContinuousFlow,
    LatentHarmonicPrior,
    LinearExp,
    MLPPotential,
    MLPVelocity,
    MongeAmpereFlow,
    NeuralCanonicalTransformation,
    PointTransformation,
    StandardNormal,
    real_nvp,
)
from openflow.flows.cnf import PairMongeAmpereFlow, PairPotential
from openflow.losses import flow_matching, reverse_kl

DIMS = (12, 39, 32, 66)
# d -> (particles, spatial dimension) of the system it stands for; other d: d particles on a line
PARTICLES = {12: (6, 2), 39: (13, 3), 32: (32, 1), 66: (22, 3)}
SYSTEMS = {
    12: "coulomb_cluster 2D n=6",
    39: "coulomb_cluster 3D n=13",
    32: "harmonic_chain n=32",
    66: "alanine_dipeptide",
}
FAMILIES = (
    "realnvp_bg",
    "nct_realnvp",
    "nct_linear",
    "cnf_rk4_exact",
    "cnf_rk4_hutchinson",
    "cnf_dopri5_exact",
    "cnf_dopri5_hutchinson",
    "monge_ampere_mlp",
    "monge_ampere_pair",
)


def double_well_energy(x: torch.Tensor) -> torch.Tensor:
    """Cheap analytic reduced energy ``(B,)``: ``(x_0^2 - 1)^2 + sum_{i>0} x_i^2 / 2`` for ``x (B, d)``."""
    return (x[:, 0] ** 2 - 1) ** 2 + 0.5 * (x[:, 1:] ** 2).sum(1)


class _CNFSampler(torch.nn.Module):
    """A standard-normal prior through a continuous flow: ``sample(n) -> (x, log q(x))``."""

    def __init__(self, dim: int, flow: ContinuousFlow):
        super().__init__()
        self.prior, self.flow = StandardNormal(dim), flow

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.prior.sample(n)
        x, logdet = self.flow(z)
        return x, self.prior.log_prob(z) - logdet


def build_family(family: str, dim: int, hidden: int = 64, rk4_steps: int = 16) -> tuple[torch.nn.Module, Callable]:
    """The model of ``family`` at dimension ``dim`` and its sampler ``sample(n) -> (x, log q)``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if int(dim) != dim or dim < 2:
        raise ValueError(f"dim must be an integer >= 2, got {dim}")
    widths = (hidden, hidden)
    rk4 = dict(method="rk4", options={"step_size": 1.0 / rk4_steps})
    if family == "realnvp_bg":
        model = BoltzmannGenerator(StandardNormal(dim), real_nvp(dim, hidden=widths))
        return model, model.sample
    if family.startswith("nct_"):
        inner = real_nvp(dim, hidden=widths) if family == "nct_realnvp" else LinearExp(dim, orthogonal=True)
        model = NeuralCanonicalTransformation(PointTransformation(inner), LatentHarmonicPrior(dim))
        return model, model.as_boltzmann_generator().sample
    if family.startswith("cnf_"):
        _, method, divergence = family.split("_")
        solver = rk4 if method == "rk4" else dict(method="dopri5", rtol=1e-5, atol=1e-5)
        model = _CNFSampler(dim, ContinuousFlow(MLPVelocity(dim, hidden=widths), divergence=divergence, **solver))
        return model, model.sample
    if family == "monge_ampere_mlp":
        model = _CNFSampler(dim, MongeAmpereFlow(MLPPotential(dim, hidden=widths), **rk4))
        return model, model.sample
    n, spatial = PARTICLES.get(dim, (dim, 1))
    model = _CNFSampler(dim, PairMongeAmpereFlow(PairPotential(n, spatial), **rk4))
    return model, model.sample


def _loss_function(
    family: str,
    model: torch.nn.Module,
    dim: int,
    batch: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[str, Callable[[], torch.Tensor]]:
    """The training loss of ``family`` (its name and a closure computing it on fixed data)."""
    data = torch.randn(2, batch, dim, generator=generator, dtype=dtype).to(device)
    if family == "realnvp_bg":
        return "reverse_kl", lambda: reverse_kl(model, double_well_energy, batch)[0]
    if family.startswith("nct_"):
        model.transform.inverse(data[0], data[1])  # data-initialise ActNorm layers before timing
        return "nll", lambda: model.nll(data[0], data[1])
    velocity = model.flow.velocity
    x0 = model.prior.sample(batch).to(dtype)
    return "flow_matching", lambda: flow_matching(velocity, x0, data[1], generator=None)


def benchmark_flow(
    family: str,
    dim: int,
    samples: int = 10_000,
    batch: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    seconds: float = 1.0,
    repeats: int = 5,
    hidden: int = 64,
    rk4_steps: int = 16,
    seed: int = 0,
) -> dict:
    """Sampling rate (samples/s with log q) and median training-step time (ms) of one family at ``dim``.

    Returns a flat dict: ``family``, ``dim``, ``samples_per_s``, ``train_step_ms``, ``loss`` (its
    name), ``nfe`` (velocity evaluations per continuous solve, else None), the settings and ``machine``.
    """
    if samples < 1 or batch < 2 or repeats < 1:
        raise ValueError(f"need samples >= 1, batch >= 2, repeats >= 1; got {samples}, {batch}, {repeats}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    torch_dtype, torch_device = getattr(torch, dtype), torch.device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, sample = build_family(family, dim, hidden, rk4_steps)
    model = model.to(device=torch_device, dtype=torch_dtype)
    sync = synchronizer(torch_device)
    loss_name, loss_function = _loss_function(family, model, dim, batch, generator, torch_device, torch_dtype)

    def draw():
        with torch.no_grad():
            x, log_q = sample(samples)
        if not bool(torch.isfinite(log_q).all()):
            raise FloatingPointError(f"{family}: non-finite log q in the samples")
        return x

    samples_per_s = rate(draw, samples, seconds, sync)
    flow = getattr(model, "flow", None)
    nfe = flow.nfe if isinstance(flow, ContinuousFlow) else None

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(repeats + 1):  # the first step is a warm-up
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function()
        loss.backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"{family}: non-finite {loss_name} loss")
    return {
        "family": family,
        "dim": int(dim),
        "system": SYSTEMS.get(int(dim), "custom"),
        "samples": int(samples),
        "samples_per_s": samples_per_s,
        "nfe": nfe,
        "loss": loss_name,
        "batch": int(batch),
        "train_step_ms": 1e3 * statistics.median(times[1:]),
        "dtype": dtype,
        "device": str(torch_device),
        "hidden": int(hidden),
        "rk4_steps": int(rk4_steps),
    }


def format_table(runs: list[dict], machine: dict) -> str:
    header = f"{'family':<24} {'dim':>4} {'samples/s (log q)':>18} {'nfe':>5} {'train step':>12} {'loss':>14}"
    lines = [header, "-" * len(header)]
    for run in runs:
        nfe = "" if run["nfe"] is None else str(run["nfe"])
        lines.append(
            f"{run['family']:<24} {run['dim']:>4} {run['samples_per_s']:>18,.0f} {nfe:>5} "
            f"{run['train_step_ms']:>9.1f} ms {run['loss']:>14}"
        )
    first = runs[0]
    lines.append(
        f"samples per call {first['samples']}, train batch {first['batch']}, {first['dtype']} on {first['device']}, "
        f"hidden {first['hidden']}, RK4 steps {first['rk4_steps']}"
    )
    lines.append(machine_line(machine))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the flow benchmarks; print a table (or one JSON object with ``--json``); return
    ``{"machine": ..., "runs": [benchmark_flow(...), ...]}``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--dim", type=int, nargs="+", default=list(DIMS), help=f"dimensions (default {' '.join(map(str, DIMS))})"
    )
    parser.add_argument("--samples", type=int, default=10_000, help="points per sampling call")
    parser.add_argument("--batch", type=int, default=256, help="training batch")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers of every network")
    parser.add_argument("--rk4-steps", type=int, default=16, help="fixed RK4 steps over t in [0, 1]")
    parser.add_argument("--seconds", type=float, default=1.0, help="wall time per sampling measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parse_arguments(parser, argv)
    runs = [
        benchmark_flow(
            family,
            dim,
            args.samples,
            args.batch,
            args.device,
            args.dtype,
            args.seconds,
            args.repeats,
            args.hidden,
            args.rk4_steps,
            args.seed,
        )
        for dim in args.dim
        for family in args.family
    ]
    machine = machine_description(args.device)
    result = {"benchmark": "flows", "machine": machine, "runs": runs}
    return emit(result, format_table(runs, machine), args.json, args.out)


if __name__ == "__main__":
    sys.exit(main() and 0)
