"""Coulomb clusters: flow free energies against an independent MBAR reference, and ground states.

For each cluster named in ``clusters`` (``n``, ``dim``, reduced ``temperature`` kT):

1. **Reference**: OpenMM Langevin MD at each coupling ``lambda`` of ``E_lambda = lambda sum 1/r_ij
   + sum r_i^2`` (``plugins.openmm.alchemical``) in ``n_chains`` independent chains, MBAR from
   the analytic trap, ``F_trap = -(n D / 2) log(pi kT)``; TI on the same frames as a cross-check.
   Errors: the larger of the analytic error and the spread of ``n_blocks`` blocks (by default
   one block per chain: the spread between independent chains). Timestep 0.005 ps: close
   encounters at small ``lambda`` make the integrator's configurational bias visible at 0.01 ps
   (2D n=6: MBAR about 0.02 kT low, partly already at ``lambda < 0.1`` against exact trap
   reweighting).
2. **Flows**: a Monge-Ampère flow whose potential is a sum of pair and one-body radial terms
   (``PairMongeAmpereFlow``: permutation and rotation invariant, exact log q in closed form) on
   the trap's own Gaussian as prior, trained (a) by reverse KL from the batched torch energy and
   (b) by flow matching on the MD frames at ``lambda = 1``.
3. **Estimates**: variational ``F_q``, importance-sampled ``F`` with a bootstrap error, ESS and
   non-finite fraction per flow; agreement with the reference; radial and pair-distance
   histograms of reweighted flow samples against MD (PNG).
4. **Ground state**: OpenMM minimisations from the lowest-energy flow samples ("quench") next to
   a multistart minimisation from random starts, energy per particle in kJ/mol.

Both free energies are ``-log Z`` (kT) with ``Z`` the configurational integral over all of
``R^{nD}`` (labelled particles, no ``1/n!``, no momenta).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from openflow import estimators
from openflow.analysis import lindemann_index, radii_and_distances
from openflow.flows.base import BoltzmannGenerator
from openflow.flows.cnf import PairMongeAmpereFlow, PairPotential
from openflow.flows.priors import IsotropicNormal
from openflow.io import cached_stage, save_figure, say
from openflow.losses import flow_matching, reverse_kl
from openflow.plugins.openmm import alchemical, batched_energy
from openflow.plugins.openmm.md import minimized_energies
from openflow.systems import coulomb_cluster
from openflow.training import Trainer

DEFAULTS = {
    "clusters": [{"n": 6, "dim": 2, "temperature": 1.0}, {"n": 13, "dim": 3, "temperature": 1.0}],
    "seed": 0,
    "energy": "auto",
    "reference": {
        "n_states": 16,
        "power": 2.0,
        "n_chains": 8,
        "n_samples": 1250,
        "interval": 100,
        "n_blocks": 8,
        "equilibration": 4000,
        "timestep": 0.005,
        "friction": 1.0,
        "platform": "Reference",
    },
    "flow": {"n_basis": 10, "r_max": 4.0, "softening": 0.1, "hidden": [32], "time_embedding": 4, "rk4_steps": 10},
    "reverse_kl": {
        "steps": 300,
        "batch_size": 256,
        "lr": 3e-3,
        "grad_clip": 10.0,
        "check_every": 25,
        "solver_tolerance": 0.1,
    },
    "flow_matching": {"steps": 2000, "batch_size": 256, "lr": 5e-3},
    "evaluation": {"n_samples": 40000, "batch_size": 1000, "n_bootstrap": 200, "rk4_steps": 20},
    "ground_state": {"n_starts": 20, "n_quench": 20, "tolerance_kjmol_nm": 1e-4},
}
VARIANTS = ("rkl", "fm")


def _tag(cluster: dict) -> str:
    return f"{cluster['dim']}d_n{cluster['n']}_T{float(cluster['temperature'])}"


def _check_cluster(cluster) -> dict:
    if not isinstance(cluster, dict) or set(cluster) != {"n", "dim", "temperature"}:
        raise ValueError(f"each cluster is a mapping with exactly n, dim, temperature; got {cluster!r}")
    n, dim, kT = cluster["n"], cluster["dim"], cluster["temperature"]
    if (
        isinstance(n, bool)
        or not isinstance(n, int)
        or n < 1
        or dim not in (2, 3)
        or isinstance(kT, bool)
        or not isinstance(kT, (int, float))
        or not kT > 0
    ):
        raise ValueError(f"a cluster needs n a positive integer, dim 2 or 3 and temperature (kT) > 0; got {cluster!r}")
    return cluster


def build_flow(dim: int, kT: float, n: int, spatial_dim: int, cfg: dict) -> BoltzmannGenerator:
    potential = PairPotential(
        n,
        spatial_dim,
        n_basis=cfg["n_basis"],
        r_max=cfg["r_max"],
        softening=cfg["softening"],
        hidden=cfg["hidden"],
        time_embedding=cfg["time_embedding"],
    )
    flow = PairMongeAmpereFlow(potential, method="rk4", options={"step_size": 1.0 / cfg["rk4_steps"]})
    return BoltzmannGenerator(
        IsotropicNormal(dim, math.sqrt(kT / 2.0)), flow
    )  # the lambda = 0 trap's Boltzmann density


def _solver_gap(model, z: torch.Tensor) -> float:
    """Mean ``|log det|`` difference between the flow's RK4 grid and one twice as fine, on latent
    draws ``z (B, d)``: a check on the training grid that needs neither data nor reference."""
    coarse = model.flow.options
    with torch.no_grad():
        logdet = model.flow(z)[1]
        model.flow.options = {"step_size": coarse["step_size"] / 2}
        fine = model.flow(z)[1]
    model.flow.options = coarse
    return float((logdet - fine).abs().mean())


def _check_reverse_kl(cfg: dict) -> None:
    if int(cfg["check_every"]) != cfg["check_every"] or cfg["check_every"] < 1 or not cfg["solver_tolerance"] > 0:
        raise ValueError(
            "reverse_kl.check_every must be a positive int and solver_tolerance positive, got "
            f"{cfg['check_every']}, {cfg['solver_tolerance']}"
        )


def train_reverse_kl(model, energy, cfg: dict, seed: int, out: Path) -> dict:
    """Reverse KL in chunks of ``check_every`` steps. After each chunk the solver gap
    (:func:`_solver_gap`, 256 fixed latent draws) is measured; once it exceeds
    ``solver_tolerance`` (kT) the flow has begun to exploit the log-det error of its coarse grid
    (F_q then falls far below any free energy), so training stops and the last parameters that
    passed are restored (and checkpointed). Returns the step kept and its solver gap."""
    _check_reverse_kl(cfg)

    def loss_fn(m, _):
        return reverse_kl(m, energy, cfg["batch_size"])

    trainer = Trainer(
        model,
        loss_fn,
        None,
        lr=cfg["lr"],
        schedule="cosine",
        total_steps=cfg["steps"],
        grad_clip=cfg["grad_clip"],
        device="cpu",
        seed=seed,
        out_dir=out,
        progress=False,
        checkpoint_every=max(cfg["steps"], 1),
    )
    probe = torch.Generator().manual_seed(seed)  # its own stream: training draws are unchanged
    z = model.prior.scale * torch.randn(256, model.prior.dim, generator=probe)
    kept, kept_step, gap = copy.deepcopy(model.state_dict()), 0, 0.0
    for step in range(cfg["check_every"], cfg["steps"] + cfg["check_every"], cfg["check_every"]):
        step = min(step, cfg["steps"])
        trainer.fit(step)
        new_gap = _solver_gap(model, z)
        if not new_gap <= cfg["solver_tolerance"]:
            model.load_state_dict(kept)
            trainer.save_checkpoint()  # the file then holds the parameters kept, not the rejected chunk's
            break
        kept, kept_step, gap = copy.deepcopy(model.state_dict()), step, new_gap
    return {"reverse_kl_steps_kept": kept_step, "reverse_kl_solver_gap_kT": gap}


def _train_flow_matching(model, data: torch.Tensor, cfg: dict, seed: int, out: Path) -> None:
    def loss_fn(m, batch):
        (x1,) = batch
        return flow_matching(m.flow.velocity, m.prior.sample(x1.shape[0]).to(x1), x1)

    Trainer(
        model,
        loss_fn,
        (data,),
        batch_size=min(cfg["batch_size"], len(data)),
        lr=cfg["lr"],
        schedule="cosine",
        total_steps=cfg["steps"],
        device="cpu",
        seed=seed,
        out_dir=out,
        progress=False,
        checkpoint_every=max(cfg["steps"], 1),
    ).fit(cfg["steps"])


def _evaluate(model, energy, cfg: dict, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Importance sampling in float64: metrics (unprefixed), samples ``x``, log-weights. The
    trained continuous flow is solved with ``cfg["rk4_steps"]`` RK4 steps, finer than in
    training: reverse KL can learn to exploit the log-det error of its own coarse grid (3D n=13,
    kT=0.1 with a wide prior: F_q 0.2 kT lower on the training grid than on a 4x finer one).
    Also the largest |log det| difference between that RK4 map and an adaptive dopri5 solve
    (rtol = atol = 1e-8) on 256 latent draws: the size of the solver error in log q."""
    if int(cfg["rk4_steps"]) != cfg["rk4_steps"] or cfg["rk4_steps"] < 1:
        raise ValueError(f"evaluation.rk4_steps must be a positive int, got {cfg['rk4_steps']}")
    model = model.double()
    model.flow.options = {"step_size": 1.0 / cfg["rk4_steps"]}
    torch.manual_seed(seed)
    with torch.no_grad():
        xs, us, lqs = [], [], []
        for start in range(0, cfg["n_samples"], cfg["batch_size"]):
            x, log_q = model.sample(min(cfg["batch_size"], cfg["n_samples"] - start))
            xs.append(x)
            lqs.append(log_q)
            us.append(energy(x).double())
        z = model.prior.sample(256)
        fine = PairMongeAmpereFlow(model.flow.potential, method="dopri5", rtol=1e-8, atol=1e-8)
        solver_error = float((model.flow(z)[1] - fine(z)[1]).abs().max())
    x, u, log_q = torch.cat(xs), torch.cat(us), torch.cat(lqs)
    log_w = estimators.log_weights(u, log_q)
    estimate = estimators.free_energy(log_w, n_bootstrap=cfg["n_bootstrap"], seed=seed)
    finite = torch.isfinite(u) & torch.isfinite(log_q)
    f_q = (u + log_q)[finite]
    metrics = {
        "free_energy_variational_kT": float(f_q.mean()),
        "free_energy_variational_error_kT": float(f_q.std() / math.sqrt(f_q.numel())),
        "free_energy_flow_kT": estimate.value,
        "free_energy_flow_error_kT": estimate.error,
        "ess_fraction": estimate.ess,
        "nonfinite_fraction": float((~finite).double().mean()),
        "logdet_rk4_vs_dopri5_max_abs": solver_error,
    }
    return metrics, x, log_w


def _histograms(md: np.ndarray, flows: dict, n: int, dim: int, title: str, path: Path) -> dict:
    """Radial density and pair-distance histograms, MD vs reweighted flow samples; returns the
    total-variation distance of each flow histogram from MD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md_r, md_d = radii_and_distances(md, n, dim)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    tv = {}
    for ax, k, label in ((axes[0], 0, "distance from trap centre |r_i| (nm)"), (axes[1], 1, "pair distance r_ij (nm)")):
        reference = (md_r, md_d)[k]
        bins = np.linspace(0.0, np.quantile(reference, 0.999) * 1.2, 60)
        h_md, _ = np.histogram(reference.ravel(), bins=bins, density=True)
        ax.stairs(h_md, bins, label="OpenMM MD", color="k", linewidth=2)
        for name, (x, log_w) in flows.items():
            values = radii_and_distances(x, n, dim)[k]
            w = np.exp(log_w - log_w.max())
            w = np.repeat(w / w.sum(), values.shape[1])
            h, _ = np.histogram(values.ravel(), bins=bins, weights=w, density=True)
            ax.stairs(h, bins, label=f"flow ({name}), reweighted")
            tv[f"{name}_{('radial', 'pair')[k]}"] = 0.5 * float(np.abs(h - h_md) @ np.diff(bins))
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return tv


def _run_cluster(cluster: dict, config: dict, out: Path) -> tuple[dict, dict]:
    n, dim, kT = int(cluster["n"]), int(cluster["dim"]), float(cluster["temperature"])
    tag, seed = _tag(cluster), int(config["seed"])
    folder = out / tag
    folder.mkdir(parents=True, exist_ok=True)
    system = coulomb_cluster(n, dim=dim, temperature=kT)
    metrics, times = {}, {}

    # 1. reference free energy (MBAR over lambda), TI as a cross-check
    start = time.perf_counter()
    ref = config["reference"]
    samples = alchemical.sample_coupling(
        system,
        force_index=0,
        lambdas=alchemical.lambda_schedule(ref["n_states"], ref["power"]),
        n_samples=ref["n_samples"],
        interval=ref["interval"],
        equilibration=ref["equilibration"],
        timestep=ref["timestep"],
        friction=ref["friction"],
        platform=ref["platform"],
        seed=seed,
        n_chains=ref["n_chains"],
        out=folder / "reference",
    )
    f_trap = alchemical.harmonic_trap_free_energy(system.dim, kT)
    mbar = alchemical.mbar_free_energy(samples, n_blocks=ref["n_blocks"])
    ti = alchemical.ti_free_energy(samples, n_blocks=ref["n_blocks"])
    metrics.update(
        {
            "free_energy_trap_kT": f_trap,
            "free_energy_reference_kT": f_trap + mbar.delta_f,
            "free_energy_reference_error_kT": mbar.error,
            "free_energy_reference_analytic_error_kT": mbar.analytic_error,
            "free_energy_reference_block_error_kT": mbar.block_error,
            "free_energy_reference_ti_kT": f_trap + ti.delta_f,
            "free_energy_reference_ti_error_kT": ti.error,
            "reference_chains": int(ref["n_chains"]),
            "reference_md_frames": int(samples.coupling_energy.size),
            "reference_decorrelated_frames": int(mbar.per_state.sum()),
            "reference_nonfinite": samples.n_nonfinite,
            "lindemann_md": lindemann_index(samples.positions, n, dim, int(ref["n_chains"])),
        }
    )
    times["reference"] = time.perf_counter() - start

    # 2. flows: reverse KL from the energy, flow matching on the MD frames at lambda = 1
    energy = batched_energy(system, config["energy"], dtype=torch.float64)
    md = torch.as_tensor(samples.positions, dtype=torch.float32)
    flows, best = {}, None
    for variant in VARIANTS:
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = build_flow(system.dim, kT, n, dim, config["flow"])
        if variant == "rkl":
            metrics.update(train_reverse_kl(model, energy, config["reverse_kl"], seed, folder / variant))
        else:
            _train_flow_matching(model, md, config["flow_matching"], seed, folder / variant)
        times[variant] = time.perf_counter() - start
        result, x, log_w = _evaluate(model, energy, config["evaluation"], seed + 1)
        deviation = result["free_energy_flow_kT"] - metrics["free_energy_reference_kT"]
        sigma = math.hypot(result["free_energy_flow_error_kT"], metrics["free_energy_reference_error_kT"])
        result.update(
            {
                "deviation_kT": deviation,
                "deviation_per_particle_kT": deviation / n,
                "deviation_sigma": abs(deviation) / sigma if sigma > 0 else math.inf,
                "agrees": bool(abs(deviation) <= 2 * sigma and abs(deviation) / n <= 0.01),
            }
        )
        metrics.update({f"{key}_{variant}": value for key, value in result.items()})
        flows[variant] = (x.numpy(), log_w.numpy())
        if best is None or result["ess_fraction"] > metrics[f"ess_fraction_{best}"]:
            best = variant
    for key in (
        "free_energy_variational_kT",
        "free_energy_flow_kT",
        "free_energy_flow_error_kT",
        "ess_fraction",
        "nonfinite_fraction",
        "deviation_kT",
        "deviation_sigma",
        "agrees",
    ):
        metrics[key] = metrics[f"{key}_{best}"]
    metrics["flow_variant"] = best

    # 3. histograms of reweighted flow samples against MD
    distances = _histograms(
        samples.positions, flows, n, dim, f"Coulomb cluster {dim}D, n={n}, kT={kT}", out / f"{tag}_histograms.png"
    )
    metrics.update({f"histogram_tv_{key}": value for key, value in distances.items()})

    # 4. ground state: quench the lowest-energy flow samples; multistart from random starts
    start = time.perf_counter()
    gs = config["ground_state"]
    x_best, _ = flows[best]
    with torch.no_grad():
        u_best = energy(torch.as_tensor(x_best)).numpy()
    lowest = x_best[np.argsort(u_best)[: gs["n_quench"]]]
    rng = np.random.default_rng(seed)
    random_starts = rng.normal(0.0, max(1.0, n ** (1.0 / dim) / 2), size=(gs["n_starts"], system.dim))
    quench = minimized_energies(system, lowest, gs["tolerance_kjmol_nm"]).min()
    multistart = minimized_energies(system, random_starts, gs["tolerance_kjmol_nm"]).min()
    metrics["ground_state_energy_per_particle_flow_quench_kjmol"] = quench / n
    metrics["ground_state_energy_per_particle_multistart_kjmol"] = multistart / n
    times["ground_state"] = time.perf_counter() - start
    metrics.update({f"wall_time_{key}_s": value for key, value in times.items()})
    return {f"{tag}_{key}": value for key, value in metrics.items()}, {"histograms": out / f"{tag}_histograms.png"}


def check(config: dict) -> None:
    """The workflow's own rules (types and signs are checked by the runner)."""
    clusters = [_check_cluster(c) for c in config["clusters"]]
    if not clusters:
        raise ValueError("clusters is empty: name at least one {n, dim, temperature}")
    if config["energy"] not in ("auto", "torch", "openmm"):
        raise ValueError(f"energy must be auto, torch or openmm, got {config['energy']!r}")
    _check_reverse_kl(config["reverse_kl"])


def run(config: dict, out) -> dict:
    """Run every cluster in ``config["clusters"]``; returns flat metrics ``{tag}_{name}``
    (``tag`` like ``2d_n6_T1.0``), plots ``{tag}_histograms.png`` and checkpoints under ``out``."""
    out = Path(out)
    clusters = [_check_cluster(c) for c in config["clusters"]]
    if not clusters:
        raise ValueError("clusters is empty: name at least one {n, dim, temperature}")
    if config["energy"] not in ("auto", "torch", "openmm"):
        raise ValueError(f"energy must be auto, torch or openmm, got {config['energy']!r}")
    _check_reverse_kl(config["reverse_kl"])  # before any reference MD is spent
    metrics = {}
    for cluster in clusters:
        settings = {key: value for key, value in config.items() if key not in ("clusters", "progress")}
        say(f"coulomb_cluster: {_tag(cluster)}")
        these, _ = cached_stage(
            out / _tag(cluster) / "stage.json",
            {**settings, "cluster": cluster},
            lambda c=cluster: _run_cluster(c, config, out),
        )
        metrics.update(these)
    return metrics
