"""Alanine dipeptide: slow collective variables and a Boltzmann generator from OpenMM data.

For each solvent in ``solvents`` (``implicit``: OBC2, the headline case; ``vacuum``), amber99sb-ildn
at ``temperature_K`` (300 K):

1. **Data, two OpenMM runs.** The phi > 0 basin is rare *and* long-lived, so temperature alone
   does not give transitions in affordable time. *Biased*: well-tempered metadynamics on (phi, psi)
   at 300 K (``data.metadynamics``); every frame carries its c(t) reweighting weight: the flows'
   training data and the reference ("MD") for the Ramachandran histogram and the basin free
   energy. *Unbiased*: parallel tempering (``data.tempering``) gives Boltzmann frames at 300 K in
   segments of unbroken 300 K dynamics, for the kinetic measures (TICA, VAMP-2, timescales).
2. **Slow modes**: a neural canonical transformation on heavy-atom phase space (``openflow.nct``)
   of the biased frames against PCA and TICA on the same coordinates: mutual information with phi
   and psi, ROC AUC for the phi > 0 basin, VAMP-2 and implied timescales on the unbiased
   segments; the kinetically slowest CV (TICA of the lowest-frequency modes); latent interpolations
   along ``Q1`` and ``Q2`` as PDB + DCD.
3. **Boltzmann generator** on all 22 atoms over internal coordinates
   (``openflow.flows.generators``), factorised as ``q(phi, psi) q(rest | phi, psi)``: the bias acts
   on (phi, psi) only, so only that marginal needs the reweighting (a torus flow fitted to the
   reweighted angles and frozen); the couplings learn the rest from all frames, with early
   stopping on held-out blocks, then reverse KL with OpenMM energies plus the likelihood, kept only
   if it raises the ESS. Reported: held-out NLL, ESS, Ramachandran KL against the reweighted MD,
   the basin free-energy difference (flow vs MD, with errors), non-finite energies.

When mdshare's explicit-solvent data can be reached (``data.mdshare``), the slow-mode part also runs
on them (``mdshare_`` metrics). Metrics are flat, prefixed by the data set (``implicit_``, ``vacuum_``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm.unit as unit
import torch

from openflow import analysis, estimators, nct
from openflow.cv import implied_timescales, tica, vamp2_score
from openflow.data import fetch_mdshare, kabsch, load_trajectory, save_frames
from openflow.flows.generators import internal_coordinate_generator, marginal_generator
from openflow.flows.internal import zmatrix_from_topology
from openflow.io import cached_stage, save_figure, say
from openflow.losses import mean_nll, nll, reverse_kl
from openflow.plugins.openmm import batched_energy
from openflow.plugins.openmm.bias import torsion_bias_variables
from openflow.plugins.openmm.metadynamics import run_metadynamics
from openflow.plugins.openmm.tempering import geometric_temperatures, simulate_tempering
from openflow.systems import kT_kjmol
from openflow.systems.alanine_dipeptide import (
    PHI_CORE_MARGIN,
    PHI_POSITIVE_BASIN,
    alanine_dipeptide,
    backbone_torsions,
    phi_psi,
    phi_psi_observables,
    phi_states,
)
from openflow.training import Trainer, fit_with_early_stopping, interleaved_holdout

DEFAULTS = {
    "seed": 0,
    "solvents": ["implicit", "vacuum"],
    "temperature_K": 300.0,
    "data": {
        "interval": 100,
        "platform": None,
        "validation_fraction": 0.2,
        "validation_block": 100,
        "mdshare": True,
        "metadynamics": {"ns": 10.0, "height": 1.2, "bias_factor": 6.0, "frequency": 1000},
        "tempering": {"ns": 2.0, "replicas": 4, "max_temperature_K": 600.0, "exchange_interval": 1000},
    },
    "nct": {"layers": 6, "hidden": [64, 64], "steps": 5000, "batch": 256, "lr": 2e-3},
    "slow_modes": {
        "lag_ps": 0.5,
        "timescale_lags_ps": [0.1, 0.2, 0.5],
        "mi_neighbours": 3,
        "interpolation_frames": 40,
        "mdshare_stride": 5,
        "kinetic_modes": 4,
        "kinetic_lag_ps": 5.0,
    },
    "bg": {
        "reweighted": False,
        "marginal": {
            "layers": 4,
            "hidden": [64, 64],
            "bins": 16,
            "batch": 1024,
            "lr": 2e-3,
            "mle_steps": 4000,
            "eval_every": 250,
            "patience": 6,
        },
        "coupling": "spline",
        "bins": 8,
        "layers": 6,
        "hidden": [64, 64],
        "batch": 256,
        "lr": 1e-3,
        "mle_steps": 6000,
        "eval_every": 250,
        "patience": 8,
        "kl_steps": 500,
        "kl_batch": 256,
        "kl_lr": 5e-5,
        "nll_weight": 1.0,
        "energy_cap_kT": 1e4,
        "samples": 100000,
        "energy": "auto",
        "rama_bins": 24,
        "blocks": 10,
    },
    "progress": None,
}
MDSHARE_FILES = dict(
    pdb="alanine-dipeptide-nowater.pdb",
    dihedrals="alanine-dipeptide-3x250ns-backbone-dihedrals.npz",
    positions="alanine-dipeptide-3x250ns-heavy-atom-positions.npz",
)
MDSHARE_FRAME_PS = 1.0
BG_DTYPE = torch.float32
TWO_PI = 2.0 * np.pi


def check(config: dict) -> None:
    """The workflow's own rules (types and signs are checked by the runner)."""
    unknown = [s for s in config["solvents"] if s not in ("implicit", "vacuum")]
    if unknown or not config["solvents"]:
        raise ValueError(f"solvents must be a non-empty list of 'implicit' and 'vacuum', got {config['solvents']!r}")
    if not 0 < config["data"]["validation_fraction"] < 1:
        raise ValueError(f"data.validation_fraction must be in (0, 1), got {config['data']['validation_fraction']}")
    if config["bg"]["coupling"] not in ("spline", "affine") or (
        config["bg"]["coupling"] == "affine" and config["bg"]["marginal"]
    ):
        raise ValueError(
            "bg.coupling must be 'spline' or 'affine' (affine only with bg.marginal null), "
            f"got {config['bg']['coupling']!r}"
        )
    if config["bg"]["energy"] not in ("auto", "torch", "openmm"):
        raise ValueError(f"bg.energy must be auto, torch or openmm, got {config['bg']['energy']!r}")
    if not config["data"]["metadynamics"]["bias_factor"] > 1:
        raise ValueError(
            f"data.metadynamics.bias_factor must be > 1, got {config['data']['metadynamics']['bias_factor']}"
        )


def heavy_positions(frames: mdtraj.Trajectory, reference: mdtraj.Trajectory) -> tuple[torch.Tensor, mdtraj.Topology]:
    """Heavy-atom positions ``(T, 3m)`` nm superposed on ``reference`` (its heavy atoms), and their topology."""
    heavy = frames.atom_slice(frames.topology.select("not element H"))
    target = torch.as_tensor(reference.xyz[0], dtype=torch.float64)
    aligned = kabsch(torch.as_tensor(heavy.xyz, dtype=torch.float64), target) - target.mean(0)
    return aligned.reshape(len(heavy), -1), heavy.topology


def kinetically_slowest(
    features: np.ndarray, train: dict, basin: np.ndarray, settings: dict, name: str
) -> tuple[dict, np.ndarray]:
    """The leading TICA component of ``features (T, k)`` on the training trajectory at ``kinetic_lag_ps``:
    its metrics (autocorrelation, timescale, MI with phi and psi, AUC for ``basin (T,)``, and for ``nct``
    each feature's share in units of its spread), prefixed by ``name``, and its values ``(T,)``."""
    lag = max(1, round(settings["kinetic_lag_ps"] / train["frame_ps"]))
    model, values = nct.kinetic_slowest(features, train["segments"], lag)
    values = values[:, 0]
    metrics = {
        f"{name}_kinetic_autocorrelation": float(model.eigenvalues[0]),
        f"{name}_kinetic_timescale_ps": float(model.timescales(lag * train["frame_ps"])[0]),
        f"auc_{name}_kinetic": analysis.basin_separation_auc(values, basin)
        if 0 < basin.sum() < basin.size
        else float("nan"),
    }
    for angle in ("phi", "psi"):
        metrics[f"mi_{name}_kinetic_{angle}_nats"] = analysis.mutual_information(
            values, train[angle], k=settings["mi_neighbours"], period_y=TWO_PI
        )
    if name == "nct":
        share = model.eigenvectors[:, 0] * features.std(0)
        metrics.update({f"nct_kinetic_weight_q{i + 1}": float(v) for i, v in enumerate(share / np.linalg.norm(share))})
    return metrics, values


def plot_modes(
    features: np.ndarray, slowest: np.ndarray, phi: np.ndarray, psi: np.ndarray, path: Path, title: str
) -> Path:
    """Scatter of ``(Q1, Q2)`` coloured by phi and by psi, and of the slowest CV against phi coloured by psi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        (features[:, 0], features[:, 1], phi, r"$\phi$", "Q1 (lowest frequency)", "Q2", r"coloured by $\phi$"),
        (features[:, 0], features[:, 1], psi, r"$\psi$", "Q1 (lowest frequency)", "Q2", r"coloured by $\psi$"),
        (phi, slowest, psi, r"$\psi$", r"$\phi$ (rad)", "slowest CV (TICA of Q1-Qk)", "kinetically slowest CV"),
    ]
    for ax, (x, y, angle, name, xlabel, ylabel, caption) in zip(axes, panels):
        points = ax.scatter(x, y, c=angle, s=2, cmap="twilight", vmin=-np.pi, vmax=np.pi, rasterized=True)
        fig.colorbar(points, ax=ax, label=f"{name} (rad)")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: {caption}")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def slow_modes(
    train: dict, dynamics: dict, topology: mdtraj.Topology, config: dict, out: Path, progress: bool
) -> tuple[dict, dict]:
    """NCT slow modes against PCA and TICA on the same aligned heavy-atom coordinates.

    ``train``: ``heavy (T, 3m)`` nm, ``phi``, ``psi`` ``(T,)`` rad, ``segments (T,)``, ``frame_ps``:
    the frames the NCT and PCA are fitted to and MI/AUC are measured on, in time order.
    ``dynamics``: ``heavy``, ``segments``, ``frame_ps`` of unbroken (unbiased) dynamics for TICA,
    VAMP-2 and implied timescales. ``topology``: of the heavy atoms.
    """
    settings = config["slow_modes"]
    frame = nct.principal_frame(
        train["heavy"], [atom.element.mass for atom in topology.atoms], kT_kjmol(config["temperature_K"])
    )
    n_kinetic, dim = settings["kinetic_modes"], frame.axes.shape[1]
    if isinstance(n_kinetic, bool) or not isinstance(n_kinetic, int) or not 1 <= n_kinetic <= dim:
        raise ValueError(
            f"slow_modes.kinetic_modes must be an integer in [1, {dim}] (the NCT's modes), got {n_kinetic!r}"
        )
    if not settings["kinetic_lag_ps"] > 0:
        raise ValueError(f"slow_modes.kinetic_lag_ps must be a positive time in ps, got {settings['kinetic_lag_ps']}")
    p, q = nct.phase_space(frame, train["heavy"], torch.Generator().manual_seed(config["seed"]))
    model, metrics = nct.train_nct(p, q, frame.variances, config["nct"], config["seed"], out / "nct", progress)
    _, omega = model.slow_modes()
    metrics.update({f"nct_omega_{i + 1}_per_ps": float(w) for i, w in enumerate(omega[:4])})

    frame_ps, segments = dynamics["frame_ps"], dynamics["segments"]
    q_train, q_dynamics = q.numpy(), frame.project(dynamics["heavy"]).numpy()
    lag = max(1, round(settings["lag_ps"] / frame_ps))
    ica = tica(nct.split_segments(q_dynamics, segments), lag=lag, dim=2)
    basin = phi_states(train["phi"]) == 1
    modes = nct.latent_modes(model, q, max(4, n_kinetic)).double().numpy()
    kinetic, slowest_nct = kinetically_slowest(modes[:, :n_kinetic], train, basin, settings, "nct")
    metrics.update(kinetic)
    metrics.update(kinetically_slowest(q_train, train, basin, settings, "tica")[0])
    on_train = {"nct": modes[:, :4], "pca": q_train[:, :2], "tica": ica.transform(q_train)}
    on_dynamics = {
        "nct": nct.latent_modes(model, torch.as_tensor(q_dynamics), 2).double().numpy(),
        "pca": q_dynamics[:, :2],
        "tica": ica.transform(q_dynamics),
    }
    lags = sorted({max(1, round(t / frame_ps)) for t in settings["timescale_lags_ps"]})
    for name in on_train:
        for i in range(on_train[name].shape[1]):
            label = f"{name}{i + 1}"
            for angle in ("phi", "psi"):
                metrics[f"mi_{label}_{angle}_nats"] = analysis.mutual_information(
                    on_train[name][:, i], train[angle], k=settings["mi_neighbours"], period_y=TWO_PI
                )
            metrics[f"auc_{label}"] = (
                analysis.basin_separation_auc(on_train[name][:, i], basin)
                if 0 < basin.sum() < basin.size
                else float("nan")
            )
        pieces = nct.split_segments(on_dynamics[name], segments)
        metrics[f"vamp2_{name}_lag{lag * frame_ps:g}ps"] = vamp2_score(pieces, lag=lag, dim=2)
        for lag_frames, row in zip(lags, implied_timescales(pieces, lags, frame_ps, dim=2)):
            metrics.update(
                {f"its_{name}_{k + 1}_lag{lag_frames * frame_ps:g}ps_ps": float(v) for k, v in enumerate(row)}
            )
    metrics.update(
        frames_train=int(len(q_train)), frames_dynamics=int(len(q_dynamics)), dynamics_segments=len(np.unique(segments))
    )

    files = {
        "modes_plot": plot_modes(
            on_train["nct"], slowest_nct, train["phi"], train["psi"], out / "slow_modes.png", "NCT"
        )
    }
    for mode in (0, 1):
        positions = nct.latent_interpolation(model, frame, q, mode, settings["interpolation_frames"])
        written = save_frames(positions, topology, out / f"interpolation_q{mode + 1}")
        files.update({f"interpolation_q{mode + 1}_{kind}": path for kind, path in written.items()})
        angles = phi_psi(mdtraj.Trajectory(positions.reshape(len(positions), -1, 3).numpy(), topology))
        for name, angle in zip(("phi", "psi"), angles):
            metrics[f"interpolation_q{mode + 1}_{name}_span_rad"] = float(np.ptp(np.unwrap(angle)))
    return metrics, files


def mdshare_slow_modes(config: dict, out: Path, progress: bool) -> tuple[dict, dict]:
    """The slow-mode comparison on mdshare's explicit-solvent data (3 x 250 ns, heavy atoms, every
    ``slow_modes.mdshare_stride``-th frame) when its server answers or the files are already in
    ``out``; else nothing (one line on stderr says why)."""
    paths = {}
    for key, name in MDSHARE_FILES.items():
        paths[key] = fetch_mdshare(name, out, progress=progress)
        if paths[key] is None:
            return {}, {}
    stride = config["slow_modes"]["mdshare_stride"]
    topology = mdtraj.load_topology(str(paths["pdb"]))
    heavy_topology = topology.subset(topology.select("not element H"))
    with np.load(paths["positions"]) as positions, np.load(paths["dihedrals"]) as dihedrals:
        keys = sorted(positions.files)
        xyz = np.concatenate([positions[k][::stride] for k in keys]).reshape(-1, heavy_topology.n_atoms, 3)
        angles = np.concatenate([dihedrals[k][::stride] for k in sorted(dihedrals.files)])
        segments = np.concatenate([np.full(len(positions[k][::stride]), i) for i, k in enumerate(keys)])
    frames = mdtraj.Trajectory(xyz, heavy_topology)
    heavy, _ = heavy_positions(frames, frames[0])
    dynamics = {"heavy": heavy, "segments": segments, "frame_ps": MDSHARE_FRAME_PS * stride}
    train = {"phi": angles[:, 0], "psi": angles[:, 1], **dynamics}
    settings = {key: config[key] for key in ("seed", "temperature_K", "nct", "slow_modes")}
    return cached_stage(
        out / "slow_modes.json", settings, lambda: slow_modes(train, dynamics, heavy_topology, config, out, progress)
    )


# ----------------------------------------------------------------------------- Boltzmann generator


def train_likelihood(
    model, train: tuple, validation: tuple, settings: dict, seed: int, out: Path, progress: bool, prefix: str = "bg"
) -> dict:
    """Adam on the weighted NLL of ``train = (x, w)``, early stopping on the held-out ``validation = (x, w)``."""
    trainer = Trainer(
        model,
        lambda m, batch: nll(m, *batch),
        data=train,
        batch_size=min(settings["batch"], len(train[0])),
        lr=settings["lr"],
        device="cpu",
        seed=seed,
        out_dir=out,
        checkpoint_every=settings["eval_every"],
        progress=progress,
        config={"bg": settings},
    )
    best, best_step = fit_with_early_stopping(
        trainer,
        lambda: mean_nll(model, *validation),
        settings["mle_steps"],
        settings["eval_every"],
        settings["patience"],
    )
    return {
        f"{prefix}_mle_steps": trainer.step,
        f"{prefix}_mle_best_step": best_step,
        f"{prefix}_nll_validation_mle": best,
        f"{prefix}_nll_train_mle": mean_nll(model, *train),
    }


def boltzmann_generator(
    system, frames: mdtraj.Trajectory, weights: np.ndarray, config: dict, out: Path, progress: bool
) -> tuple[dict, dict]:
    """Train the all-atom generator on ``frames`` (likelihood, then reverse KL) and compare its reweighted
    samples with the frames reweighted by ``weights (T,)`` (the Boltzmann reference)."""
    settings, seed = config["bg"], config["seed"]
    x = torch.as_tensor(frames.xyz.reshape(len(frames), -1), dtype=torch.float64)
    validation = torch.as_tensor(
        interleaved_holdout(len(x), config["data"]["validation_fraction"], config["data"]["validation_block"])
    )
    zmatrix = zmatrix_from_topology(system.topology)
    torsions = backbone_torsions(system)
    phi_psi_columns = [zmatrix.torsion_index(torsions[name][0]) for name in ("phi", "psi")]
    model = internal_coordinate_generator(
        zmatrix,
        x[~validation],
        settings["coupling"],
        settings["layers"],
        settings["hidden"],
        settings["bins"],
        phi_psi_columns,
        settings["marginal"],
        seed,
    )
    w = torch.as_tensor(weights, dtype=BG_DTYPE)
    metrics = {}
    if (
        marginal := marginal_generator(model)
    ) is not None:  # the (phi, psi) marginal from the reweighted frames, frozen
        torus, columns = marginal
        internal = model.flow.layers[-1]
        with torch.no_grad():
            angles = internal.inverse(x.to(internal.mean))[0][:, columns].to(BG_DTYPE)
        part = lambda mask: (angles[mask], w[mask] / w[mask].mean())  # noqa: E731
        metrics.update(
            train_likelihood(
                torus,
                part(~validation),
                part(validation),
                {**settings, **settings["marginal"]},
                seed,
                out / "marginal",
                progress,
                prefix="bg_marginal",
            )
        )
        torus.requires_grad_(False)
    w = w if settings["reweighted"] else torch.ones(len(x), dtype=BG_DTYPE)  # else the biased ensemble as sampled
    train = (x[~validation].to(BG_DTYPE), w[~validation] / w[~validation].mean())
    held = (x[validation].to(BG_DTYPE), w[validation] / w[validation].mean())
    metrics.update(train_likelihood(model, train, held, settings, seed, out / "mle", progress))
    energy = batched_energy(system, settings["energy"])
    metrics["bg_energy"] = type(energy).__name__
    check = min(settings["samples"], 4000)
    sample = lambda n, s: estimators.importance_sample(model, lambda y: energy(y.double()).double(), n, 2000, 0, seed=s)  # noqa: E731
    metrics["bg_ess_fraction_mle"] = sample(check, seed + 2).summary.ess
    after_likelihood = {k: v.clone() for k, v in model.state_dict().items()}
    cap = settings["energy_cap_kT"]

    def loss_fn(m, batch):
        free_energy, stats = reverse_kl(m, energy, settings["kl_batch"], u_high=cap, u_max=10.0 * cap)
        data_term = nll(m, *batch)
        return free_energy + settings["nll_weight"] * data_term, {**stats, "nll": data_term.item()}

    Trainer(
        model,
        loss_fn,
        data=train,
        batch_size=min(settings["batch"], len(train[0])),
        lr=settings["kl_lr"],
        device="cpu",
        seed=seed + 1,
        out_dir=out / "reverse_kl",
        checkpoint_every=max(1, settings["kl_steps"] // 4),
        progress=progress,
        config={"bg": settings},
    ).fit(settings["kl_steps"], resume=True)
    model.eval()
    metrics["bg_nll_validation"] = mean_nll(model, *held)
    metrics["bg_ess_fraction_kl"] = sample(check, seed + 2).summary.ess
    metrics["bg_kl_kept"] = metrics["bg_ess_fraction_kl"] >= metrics["bg_ess_fraction_mle"]
    if not metrics["bg_kl_kept"]:  # the energy stage made the weights worse on these samples: keep the likelihood model
        model.load_state_dict(after_likelihood)
        metrics["bg_nll_validation"] = metrics["bg_nll_validation_mle"]
    torch.save(model.state_dict(), out / "generator.pt")

    result = sample(settings["samples"], seed + 3)
    log_w = result.log_w
    finite = torch.isfinite(log_w)
    flow_frames = mdtraj.Trajectory(
        result.x[finite].reshape(int(finite.sum()), -1, 3).double().numpy(), frames.topology
    )
    flow_phi, flow_psi = phi_psi(flow_frames)
    flow_weights = torch.softmax(log_w[finite].double(), 0).numpy()
    md_phi, md_psi = phi_psi(frames)
    md = estimators.state_free_energy(phi_states(md_phi) == 1, np.log(weights), n_blocks=settings["blocks"])
    flow = estimators.state_free_energy(phi_states(flow_phi) == 1, log_w[finite].double().numpy())
    reference, bins = (md_phi, md_psi, weights), settings["rama_bins"]
    halves = [tuple(a[half] for a in reference) for half in np.array_split(np.arange(md_phi.size), 2)]
    metrics.update(
        {
            "bg_samples": int(log_w.numel()),
            "bg_nonfinite_fraction": float(1.0 - finite.double().mean()),
            "bg_ess_fraction": result.summary.ess,
            "bg_rama_kl_reweighted": analysis.torsion_histogram_kl(reference, (flow_phi, flow_psi, flow_weights), bins),
            "bg_rama_kl_raw": analysis.torsion_histogram_kl(reference, (flow_phi, flow_psi, None), bins),
            "md_weights_ess_fraction": estimators.effective_sample_size(np.log(weights)),
            "md_rama_kl_halves": analysis.torsion_histogram_kl(*halves, bins),
            "md_delta_f_kT": md.delta_f,
            "md_delta_f_error_kT": md.error,
            "bg_delta_f_kT": flow.delta_f,
            "bg_delta_f_error_kT": flow.error,
            "bg_delta_f_ess_positive": flow.ess_state,
            "bg_delta_f_deviation_kT": flow.delta_f - md.delta_f,
        }
    )
    files = {"generator": out / "generator.pt"}
    for name, (phi, psi, w) in {
        "md_reweighted": reference,
        "flow_raw": (flow_phi, flow_psi, None),
        "flow_reweighted": (flow_phi, flow_psi, flow_weights),
    }.items():
        surface = analysis.ramachandran((phi, psi), weights=w, bins=36)
        files[f"rama_{name}"] = analysis.plot_ramachandran(
            surface,
            out / f"ramachandran_{name}.png",
            vmax=12.0,
            title=f"{system.parameters['solvent']}: {name.replace('_', ' ')}",
            boundaries=PHI_POSITIVE_BASIN,
        )
    return metrics, files


# ----------------------------------------------------------------------------- workflow


def run_solvent(solvent: str, config: dict, out: Path, progress: bool) -> tuple[dict, dict]:
    """Data, slow modes and Boltzmann generator for one solvent; metrics and files without prefix."""
    if solvent not in ("implicit", "vacuum"):
        raise ValueError(f"solvents must be 'implicit' or 'vacuum', got {solvent!r}")
    if not config["temperature_K"] > 0:
        raise ValueError(f"temperature_K must be positive, got {config['temperature_K']}")
    system = alanine_dipeptide(solvent=solvent, temperature=float(config["temperature_K"]) * unit.kelvin)
    data, clock = config["data"], time.perf_counter()
    settings, torsions = data["metadynamics"], backbone_torsions(system)
    metad = run_metadynamics(
        system,
        torsion_bias_variables([torsions["phi"][0], torsions["psi"][0]]),
        ns=settings["ns"],
        out=out / "metadynamics",
        height=settings["height"],
        bias_factor=settings["bias_factor"],
        frequency=settings["frequency"],
        interval=data["interval"],
        platform=data["platform"],
        seed=config["seed"],
        observables=phi_psi_observables(),
        reuse=True,
        overwrite=True,
        progress=progress,
    )
    biased = load_trajectory(str(metad.files["trajectory"]), str(metad.files["topology"]))
    tempering = data["tempering"]
    temperatures = geometric_temperatures(
        config["temperature_K"], tempering["max_temperature_K"], tempering["replicas"]
    )
    unbiased_run = simulate_tempering(
        system,
        temperatures,
        ns=tempering["ns"],
        interval=data["interval"],
        exchange_interval=tempering["exchange_interval"],
        out=out / "tempering",
        seed=config["seed"],
        platform=data["platform"],
        progress=progress,
        reuse=True,
    )
    unbiased = load_trajectory(str(unbiased_run.trajectory), str(unbiased_run.topology))
    phi, psi = metad.observables["phi"], metad.observables["psi"]
    unbiased_phi = phi_psi(unbiased)[0]
    metrics = {
        "metad_ns": metad.ns,
        "metad_transitions": analysis.count_transitions(phi_states(phi, PHI_CORE_MARGIN)),
        "metad_ns_per_day": metad.ns_per_day,
        "metad_frames": len(biased),
        "tempering_frames": unbiased_run.n_frames,
        "tempering_round_trips": unbiased_run.round_trips,
        "tempering_swap_acceptance_min": min(unbiased_run.acceptance),
        "tempering_transitions": analysis.count_transitions(phi_states(unbiased_phi, PHI_CORE_MARGIN)),
        "tempering_population_positive": analysis.state_populations(phi_states(unbiased_phi) == 1)["state"],
        "time_data_s": time.perf_counter() - clock,
    }

    clock = time.perf_counter()
    reference = biased.atom_slice(biased.topology.select("not element H"))[0]
    heavy, topology = heavy_positions(biased, reference)
    train = {
        "heavy": heavy,
        "phi": phi,
        "psi": psi,
        "segments": np.zeros(len(heavy), dtype=int),
        "frame_ps": data["interval"] * metad.timestep_ps,
    }
    dynamics = {
        "heavy": heavy_positions(unbiased, reference)[0],
        "segments": unbiased_run.segments,
        "frame_ps": unbiased_run.interval * unbiased_run.timestep_ps,
    }
    data_settings = {"seed": config["seed"], "temperature_K": config["temperature_K"], "data": data, "solvent": solvent}
    say(f"alanine_dipeptide {solvent}: slow modes")
    slow, files = cached_stage(
        out / "slow_modes.json",
        {**data_settings, "nct": config["nct"], "slow_modes": config["slow_modes"]},
        lambda: slow_modes(train, dynamics, topology, config, out, progress),
    )
    metrics.update(slow, time_slow_modes_s=time.perf_counter() - clock)

    clock = time.perf_counter()
    say(f"alanine_dipeptide {solvent}: Boltzmann generator")
    bg, bg_files = cached_stage(
        out / "bg" / "stage.json",
        {**data_settings, "bg": config["bg"]},
        lambda: boltzmann_generator(system, biased, metad.weights, config, out / "bg", progress),
    )
    metrics.update(bg, time_bg_s=time.perf_counter() - clock)
    return metrics, {**files, **bg_files}


def run(config: dict, out: Path) -> dict:
    progress = config["progress"] is not False  # None: a bar on a terminal, a line per quarter in logs
    metrics, files = {}, {}
    sets = [(solvent, lambda s=solvent: run_solvent(s, config, out / s, progress)) for solvent in config["solvents"]]
    if config["data"]["mdshare"]:
        sets.append(("mdshare", lambda: mdshare_slow_modes(config, out / "mdshare", progress)))
    for name, compute in sets:
        these, paths = compute()
        metrics.update({f"{name}_{k}": v for k, v in these.items()})
        files.update({f"{name}_{k}": v for k, v in paths.items()})
    print("openflow alanine_dipeptide: done", file=sys.stderr)
    for label, path in files.items():
        print(f"  {label:36s} {path}", file=sys.stderr)
    return metrics
