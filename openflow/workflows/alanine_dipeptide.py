"""Alanine dipeptide: slow collective variables and a Boltzmann generator from OpenMM data.

For each solvent in ``solvents`` (``implicit``: OBC2, the headline case; ``vacuum``), amber99sb-ildn
at ``temperature_K`` (300 K):

1. **Data, two OpenMM runs.** The phi > 0 basin is rare *and* long-lived (a visit lasts hundreds
   of ps even at 600 K; plain MD at 800 K did not enter it in 0.3 ns), so temperature alone does not
   give transitions in affordable time. Therefore:
   - *biased*: well-tempered metadynamics on (phi, psi) at 300 K (``data.metadynamics``) crosses
     between the basins hundreds of times; every frame carries the Tiwary-Parrinello ``c(t)``
     reweighting weight, so weighted averages over these frames are Boltzmann averages at 300 K.
     They are the flows' training data and the reference ("MD") for the Ramachandran histogram
     and the basin free-energy difference.
   - *unbiased*: parallel tempering (``openflow.tempering``, ``data.tempering``) gives Boltzmann
     frames at 300 K in *segments* of unbroken 300 K dynamics between accepted swaps; the
     kinetic measures (TICA, VAMP-2, implied timescales) pair frames only inside a segment.
2. **Slow modes**: a neural canonical transformation on heavy-atom phase space (positions aligned by
   Kabsch on the heavy atoms, mass-weighted, on the 24 principal axes alignment leaves, Maxwell-
   Boltzmann momenta; ``openflow.workflows.quickstart.train_nct``) of the biased frames. Its two
   slowest latent positions ``(Q1, Q2)`` are compared with two linear baselines on the same
   coordinates, principal components ``(PC1, PC2)`` and TICA ``(IC1, IC2)``: mutual information with
   phi and psi (KSG, nats) and ROC AUC for the phi > 0 basin on the biased frames; VAMP-2 scores
   and implied timescales on the unbiased segments. The latent interpolations along ``Q1`` and
   ``Q2`` (other modes at their median) are written as PDB + DCD of the heavy atoms.
3. **Boltzmann generator** on all 22 atoms: internal coordinates (bonds, angles, torsions; rigid-body
   motion removed by a canonical frame, exact log-det). The density factorises as
   ``q(phi, psi) q(rest | phi, psi)`` (``bg.marginal``): the bias acts on (phi, psi) only, so the biased
   frames sample the Boltzmann conditional of everything else exactly, and only the two-dimensional
   marginal needs the reweighting. A torus flow (periodic splines, nothing cut open) is fitted to
   the reweighted (phi, psi) by weighted maximum likelihood and frozen; rational-quadratic spline
   couplings conditioned on (cos, sin) of phi and psi learn the rest by maximum likelihood on all
   biased frames, with early stopping on held-out blocks interleaved through the run, then by
   reverse KL with OpenMM energies plus ``nll_weight`` times the likelihood; the energy stage is kept
   only if it raises the ESS on fresh samples. Reported:
   held-out NLL, ESS, KL of the reweighted flow's Ramachandran histogram against the reweighted
   MD's, the basin free-energy difference (flow vs MD, with errors), non-finite energies.

When mdshare's explicit-solvent data can be reached (``data.mdshare``), the slow-mode part also runs
on them (``mdshare_`` metrics). Metrics are flat, prefixed by the data set (``implicit_``, ``vacuum_``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mdtraj
import numpy as np
import openmm.unit as unit
import torch

from openflow import analysis, estimators
from openflow.cv import implied_timescales, tica, vamp2_score
from openflow.data import ALANINE_FILES, MDSHARE_FRAME_PS, default_timestep, fetch_mdshare, kabsch
from openflow.flows.base import BoltzmannGenerator, SequentialFlow, SubsetFlow
from openflow.flows.circular import circular_flow
from openflow.flows.coupling import real_nvp
from openflow.flows.internal import InternalCoordinatesFlow, zmatrix_from_topology
from openflow.flows.priors import StandardNormal
from openflow.flows.spline import spline_flow
from openflow.losses import nll, reverse_kl
from openflow.plugins.openmm.metadynamics import (OUTPUTS as METAD_FILES, phi_psi_bias_variables, run_metadynamics,
                                                  variable_signature)
from openflow.plugins.openmm.torch_energy import batched_energy
from openflow.systems import alanine_dipeptide
from openflow.tempering import geometric_temperatures, simulate_tempering
from openflow.training import Trainer
from openflow.workflows.quickstart import NCT_DTYPE, principal_frame, project, train_nct

DEFAULTS = {
    "seed": 0,
    "solvents": ["implicit", "vacuum"],
    "temperature_K": 300.0,
    "data": {"interval": 100, "platform": None, "validation_fraction": 0.2, "validation_block": 100, "mdshare": True,
             "metadynamics": {"ns": 10.0, "height": 1.2, "bias_factor": 6.0, "frequency": 1000},
             "tempering": {"ns": 2.0, "replicas": 4, "max_temperature_K": 600.0, "exchange_interval": 1000}},
    "nct": {"layers": 6, "hidden": [64, 64], "steps": 5000, "batch": 256, "lr": 2e-3},
    "slow_modes": {"lag_ps": 0.5, "timescale_lags_ps": [0.1, 0.2, 0.5], "mi_neighbours": 3,
                   "interpolation_frames": 40, "mdshare_stride": 5, "kinetic_modes": 4, "kinetic_lag_ps": 5.0},
    "bg": {"reweighted": False, "marginal": {"layers": 4, "hidden": [64, 64], "bins": 16, "batch": 1024, "lr": 2e-3,
                                           "mle_steps": 4000, "eval_every": 250, "patience": 6},
           "coupling": "spline", "bins": 8, "layers": 6, "hidden": [64, 64], "batch": 256, "lr": 1e-3, "mle_steps": 6000, "eval_every": 250,
           "patience": 8, "kl_steps": 500, "kl_batch": 256, "kl_lr": 5e-5, "nll_weight": 1.0, "energy_cap_kT": 1e4,
           "samples": 100000, "energy": "auto", "rama_bins": 24, "blocks": 10},
    "progress": None,
}
BG_DTYPE = torch.float32
TWO_PI = 2.0 * np.pi
MOLAR_GAS_CONSTANT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


# ----------------------------------------------------------------------------- data


def _system(solvent: str, temperature_k: float):
    if solvent not in ("implicit", "vacuum"):
        raise ValueError(f"solvents must be 'implicit' or 'vacuum', got {solvent!r}")
    if not temperature_k > 0:
        raise ValueError(f"temperature_K must be positive, got {temperature_k}")
    return alanine_dipeptide(solvent=solvent, temperature=float(temperature_k) * unit.kelvin)


def tempering_data(system, config: dict, out: Path, progress: bool):
    """Unbiased parallel-tempering frames at the target temperature: the run and its ``mdtraj.Trajectory``."""
    data, settings = config["data"], config["data"]["tempering"]
    temperatures = geometric_temperatures(config["temperature_K"], settings["max_temperature_K"], settings["replicas"])
    run = simulate_tempering(system, temperatures, ns=settings["ns"], interval=data["interval"],
                             exchange_interval=settings["exchange_interval"], out=out, seed=config["seed"],
                             platform=data["platform"], progress=progress, reuse=True)
    return run, mdtraj.load(str(run.trajectory), top=str(run.topology))


def _finished_metadynamics(out: Path, system, variables, settings: dict, interval: int, seed: int, steps: int) -> dict | None:
    try:
        saved = json.loads((out / METAD_FILES["settings"]).read_text())
    except (OSError, ValueError):
        return None
    wanted = dict(variables=variable_signature(variables), height_kjmol=settings["height"], bias_factor=settings["bias_factor"],
                  frequency=settings["frequency"], interval=interval, seed=seed,
                  temperature_K=system.temperature.value_in_unit(unit.kelvin))
    if any(saved.get(key) != value for key, value in wanted.items()) or saved["results"]["steps"] != steps:
        return None
    return saved["results"] if all((out / METAD_FILES[k]).exists() for k in ("trajectory", "topology", "weights")) else None


def metadynamics_data(system, config: dict, out: Path, progress: bool) -> tuple[mdtraj.Trajectory, np.ndarray, dict]:
    """Well-tempered metadynamics on (phi, psi) at the target temperature (reused when ``out`` holds the
    same run): frames, their normalised reweighting weights ``(T,)`` and the run's summary."""
    data, settings = config["data"], config["data"]["metadynamics"]
    variables = phi_psi_bias_variables(system)
    steps = round(settings["ns"] * 1000.0 / default_timestep(system).value_in_unit(unit.picosecond))
    summary = _finished_metadynamics(out, system, variables, settings, data["interval"], config["seed"], steps)
    if summary is None:
        result = run_metadynamics(system, variables, ns=settings["ns"], out=out, height=settings["height"],
                                  bias_factor=settings["bias_factor"], frequency=settings["frequency"],
                                  interval=data["interval"], platform=data["platform"], seed=config["seed"], progress=progress)
        summary = result.summary()
    frames = mdtraj.load(str(out / METAD_FILES["trajectory"]), top=str(out / METAD_FILES["topology"]))
    return frames, np.load(out / METAD_FILES["weights"]), summary


def backbone_torsions(frames: mdtraj.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """``(phi, psi)``, each ``(T,)`` rad."""
    return mdtraj.compute_phi(frames)[1][:, 0], mdtraj.compute_psi(frames)[1][:, 0]


def heavy_positions(frames: mdtraj.Trajectory, reference: mdtraj.Trajectory) -> tuple[torch.Tensor, mdtraj.Topology]:
    """Heavy-atom positions ``(T, 3m)`` nm superposed on ``reference`` (its heavy atoms), and their topology."""
    heavy = frames.atom_slice(frames.topology.select("not element H"))
    target = torch.as_tensor(reference.xyz[0], dtype=torch.float64)
    aligned = kabsch(torch.as_tensor(heavy.xyz, dtype=torch.float64), target) - target.mean(0)
    return aligned.reshape(len(heavy), -1), heavy.topology


def split_segments(values: np.ndarray, segments: np.ndarray) -> list[np.ndarray]:
    """Rows of ``values (T, k)`` grouped into the runs of equal ``segments (T,)`` labels, in order."""
    return np.split(values, np.flatnonzero(np.diff(segments)) + 1)


def block_delta_f(phi: np.ndarray, weights: np.ndarray | None, blocks: int, n_bootstrap: int = 200,
                  seed: int = 0) -> tuple[float, float]:
    """``F(phi > 0) - F(phi < 0)`` in kT from all frames (weighted), and its standard error from a
    bootstrap over ``blocks`` consecutive blocks (correlated frames: the blocks are the independent
    units; a block may miss a basin, the resampled union rarely does)."""
    weights = np.full(phi.size, 1.0 / phi.size) if weights is None else np.asarray(weights, dtype=float)
    value = analysis.basin_populations(phi, weights=weights)["delta_f_kT"]
    pieces = list(zip(np.array_split(phi, blocks), np.array_split(weights, blocks)))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        pick = rng.integers(0, blocks, blocks)
        w = np.concatenate([pieces[i][1] for i in pick])
        if w.sum() > 0:
            draws.append(analysis.basin_populations(np.concatenate([pieces[i][0] for i in pick]), weights=w)["delta_f_kT"])
    draws = np.asarray(draws)
    finite = draws[np.isfinite(draws)]
    return float(value), float(np.std(finite, ddof=1)) if finite.size == draws.size and finite.size > 1 else float("inf")


def held_out(n_frames: int, fraction: float, block: int) -> np.ndarray:
    """Boolean mask ``(n_frames,)`` of held-out frames: whole blocks of ``block`` consecutive frames,
    evenly interleaved through the run (so held-out and training frames share the ensemble, which a
    biased run changes over time, while correlated neighbours rarely straddle the split)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    index = np.arange(n_frames) // block
    mask = (index * fraction) % 1.0 >= 1.0 - fraction - 1e-12
    if not 0 < mask.sum() < n_frames:
        raise ValueError(f"{n_frames} frames in blocks of {block} leave no held-out or no training frame: lower validation_block")
    return mask


# ----------------------------------------------------------------------------- slow modes


def latent_interpolation(model, frame: dict, mode: int, n_frames: int) -> torch.Tensor:
    """Heavy-atom positions ``(n_frames, 3m)`` nm along latent mode ``mode`` (0: slowest), from its
    2nd to its 98th percentile over the data, every other latent position at its median."""
    with torch.no_grad():
        latent = model.transform.encode_positions(frame["q"].to(NCT_DTYPE))
        index = int(model.slow_modes()[0][mode])
        path = latent.median(0).values.repeat(n_frames, 1)
        lo, hi = torch.quantile(latent[:, index], torch.tensor([0.02, 0.98], dtype=latent.dtype))
        path[:, index] = torch.linspace(float(lo), float(hi), n_frames, dtype=latent.dtype)
        q = model.transform(torch.zeros_like(path), path)[1].to(frame["q"].dtype)
    return q @ frame["axes"].T / frame["sqrt_mass"] + frame["mean"]


def write_interpolation(positions: torch.Tensor, topology: mdtraj.Topology, stem: Path) -> dict:
    """Write heavy-atom frames ``(F, 3m)`` nm as ``stem.pdb`` and ``stem.dcd``; return the paths."""
    trajectory = mdtraj.Trajectory(positions.reshape(len(positions), -1, 3).numpy(), topology)
    files = {"pdb": stem.with_suffix(".pdb"), "dcd": stem.with_suffix(".dcd")}
    for kind, path in files.items():
        part = path.with_name(path.stem + ".part" + path.suffix)
        getattr(trajectory, f"save_{kind}")(str(part))
        part.replace(path)
    return files


def plot_modes(features: np.ndarray, slowest: np.ndarray, phi: np.ndarray, psi: np.ndarray, path: Path, title: str) -> Path:
    """Scatter of ``(Q1, Q2)`` coloured by phi and by psi, and of the kinetically slowest CV
    ``slowest (T,)`` against phi coloured by psi (three panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openflow.io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [(features[:, 0], features[:, 1], phi, r"$\phi$", "Q1 (lowest frequency)", "Q2", r"coloured by $\phi$"),
              (features[:, 0], features[:, 1], psi, r"$\psi$", "Q1 (lowest frequency)", "Q2", r"coloured by $\psi$"),
              (phi, slowest, psi, r"$\psi$", r"$\phi$ (rad)", "slowest CV (TICA of Q1-Qk)", "kinetically slowest CV")]
    for ax, (x, y, angle, name, xlabel, ylabel, caption) in zip(axes, panels):
        points = ax.scatter(x, y, c=angle, s=2, cmap="twilight", vmin=-np.pi, vmax=np.pi, rasterized=True)
        fig.colorbar(points, ax=ax, label=f"{name} (rad)")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}: {caption}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def kinetically_slowest(features: np.ndarray, train: dict, basin: np.ndarray, settings: dict, name: str) -> tuple[dict, np.ndarray]:
    """The leading TICA component of ``features (T, k)`` on the training trajectory (``train``'s
    ``segments``, ``frame_ps``, ``phi``, ``psi``) at ``settings["kinetic_lag_ps"]``: its metrics
    (autocorrelation, implied timescale, MI with phi and psi, AUC for ``basin (T,)``, and for ``nct``
    each feature's share in units of its spread), prefixed by ``name``, and its values ``(T,)``."""
    lag = max(1, round(settings["kinetic_lag_ps"] / train["frame_ps"]))
    model = tica(split_segments(features, train["segments"]), lag=lag, dim=1)
    values = model.transform(features)[:, 0]
    metrics = {f"{name}_kinetic_autocorrelation": float(model.eigenvalues[0]),
               f"{name}_kinetic_timescale_ps": float(model.timescales(lag * train["frame_ps"])[0]),
               f"auc_{name}_kinetic": analysis.basin_separation_auc(values, basin) if 0 < basin.sum() < basin.size else float("nan")}
    for angle in ("phi", "psi"):
        metrics[f"mi_{name}_kinetic_{angle}_nats"] = analysis.mutual_information(values, train[angle], k=settings["mi_neighbours"], period_y=TWO_PI)
    if name == "nct":
        share = model.eigenvectors[:, 0] * features.std(0)
        metrics.update({f"nct_kinetic_weight_q{i + 1}": float(v) for i, v in enumerate(share / np.linalg.norm(share))})
    return metrics, values


def slow_modes(train: dict, dynamics: dict, topology: mdtraj.Topology, config: dict, out: Path,
               progress: bool) -> tuple[dict, dict]:
    """NCT slow modes against PCA and TICA on the same aligned heavy-atom coordinates.

    ``train``: ``heavy (T, 3m)`` nm, ``phi``, ``psi`` ``(T,)`` rad: the frames the NCT and PCA are fitted
    to and MI/AUC are measured on, in time order: ``segments (T,)`` labels its unbroken pieces and
    ``frame_ps`` is the time between frames. ``dynamics``: ``heavy (T', 3m)`` nm aligned the same way,
    ``segments (T',)`` and ``frame_ps``: unbroken (unbiased) dynamics for TICA, VAMP-2 and implied
    timescales. ``topology``: of the heavy atoms (masses, interpolation files).

    The NCT orders its modes by latent frequency, a static measure (``w_k^2 = <P_k^2> / <Q_k^2>``).
    The *kinetically* slowest CV is the leading TICA component of its ``kinetic_modes``
    lowest-frequency modes on the training trajectory at ``kinetic_lag_ps``: the combination of them
    with the longest measured autocorrelation. TICA of the raw coordinates on the same trajectory and
    lag is its linear baseline.
    """
    settings = config["slow_modes"]
    kT_kjmol = float(MOLAR_GAS_CONSTANT * config["temperature_K"])
    frame = principal_frame(train["heavy"], [atom.element.mass for atom in topology.atoms], kT_kjmol)
    n_kinetic, dim = settings["kinetic_modes"], frame["q"].shape[1]
    if isinstance(n_kinetic, bool) or not isinstance(n_kinetic, int) or not 1 <= n_kinetic <= dim:
        raise ValueError(f"slow_modes.kinetic_modes must be an integer in [1, {dim}] (the NCT's modes), got {n_kinetic!r}")
    if not settings["kinetic_lag_ps"] > 0:
        raise ValueError(f"slow_modes.kinetic_lag_ps must be a positive time in ps, got {settings['kinetic_lag_ps']}")
    generator = torch.Generator().manual_seed(config["seed"])
    p = torch.randn(frame["q"].shape, generator=generator, dtype=frame["q"].dtype)  # Maxwell-Boltzmann, reduced
    model, metrics = train_nct(p, frame["q"], frame["variances"], config, out / "nct", progress)
    _, omega = model.slow_modes()
    metrics.update({f"nct_omega_{i + 1}_per_ps": float(w) for i, w in enumerate(omega[:4])})

    def nct(q: torch.Tensor, modes: int) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model.collective_variables(b.to(NCT_DTYPE), modes) for b in q.split(4096)]).double().numpy()

    frame_ps, segments = dynamics["frame_ps"], dynamics["segments"]
    q_train, q_dynamics = frame["q"].numpy(), project(frame, dynamics["heavy"]).numpy()
    lag = max(1, round(settings["lag_ps"] / frame_ps))
    ica = tica(split_segments(q_dynamics, segments), lag=lag, dim=2)
    basin = analysis.basin_of(train["phi"]) == 1
    # the kinetically slowest CV: TICA of the NCT's lowest-frequency modes on the (time-ordered) training frames
    modes = nct(frame["q"], max(4, n_kinetic))
    kinetic, slowest_nct = kinetically_slowest(modes[:, :n_kinetic], train, basin, settings, "nct")
    metrics.update(kinetic)
    metrics.update(kinetically_slowest(q_train, train, basin, settings, "tica")[0])
    # MI and AUC for the NCT's four slowest modes (a torsion is a circle: a flow may spread it over two
    # latent lines, one cos-like, one sin-like); VAMP-2 and timescales for two coordinates of each method
    on_train = {"nct": modes[:, :4], "pca": q_train[:, :2], "tica": ica.transform(q_train)}
    on_dynamics = {"nct": nct(torch.as_tensor(q_dynamics), 2), "pca": q_dynamics[:, :2], "tica": ica.transform(q_dynamics)}
    lags = sorted({max(1, round(t / frame_ps)) for t in settings["timescale_lags_ps"]})
    for name in on_train:
        for i in range(on_train[name].shape[1]):
            label = f"{name}{i + 1}"
            for angle in ("phi", "psi"):
                metrics[f"mi_{label}_{angle}_nats"] = analysis.mutual_information(
                    on_train[name][:, i], train[angle], k=settings["mi_neighbours"], period_y=TWO_PI)
            metrics[f"auc_{label}"] = (analysis.basin_separation_auc(on_train[name][:, i], basin)
                                       if 0 < basin.sum() < basin.size else float("nan"))
        pieces = split_segments(on_dynamics[name], segments)
        metrics[f"vamp2_{name}_lag{lag * frame_ps:g}ps"] = vamp2_score(pieces, lag=lag, dim=2)
        for lag_frames, row in zip(lags, implied_timescales(pieces, lags, frame_ps, dim=2)):
            metrics.update({f"its_{name}_{k + 1}_lag{lag_frames * frame_ps:g}ps_ps": float(v) for k, v in enumerate(row)})
    metrics.update(frames_train=int(len(q_train)), frames_dynamics=int(len(q_dynamics)), dynamics_segments=len(np.unique(segments)))

    files = {"modes_plot": plot_modes(on_train["nct"], slowest_nct, train["phi"], train["psi"], out / "slow_modes.png", "NCT")}
    for mode in (0, 1):
        positions = latent_interpolation(model, frame, mode, settings["interpolation_frames"])
        written = write_interpolation(positions, topology, out / f"interpolation_q{mode + 1}")
        files.update({f"interpolation_q{mode + 1}_{kind}": path for kind, path in written.items()})
        for name, angle in zip(("phi", "psi"), backbone_torsions(mdtraj.Trajectory(positions.reshape(len(positions), -1, 3).numpy(), topology))):
            metrics[f"interpolation_q{mode + 1}_{name}_span_rad"] = float(np.ptp(np.unwrap(angle)))
    return metrics, files


def mdshare_slow_modes(config: dict, out: Path, progress: bool) -> tuple[dict, dict]:
    """The slow-mode comparison on mdshare's explicit-solvent data (3 x 250 ns, heavy atoms, every
    ``slow_modes.mdshare_stride``-th frame; one data set for both roles) when its server answers or
    the files are already in ``out``; else nothing (one line on stderr says why)."""
    paths = {}
    for key, name in ALANINE_FILES.items():
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
    return slow_modes(train, dynamics, heavy_topology, config, out, progress)


# ----------------------------------------------------------------------------- Boltzmann generator


def backbone_torsion_indices(topology, zmatrix) -> list[int]:
    """Indices of phi and psi among the Z-matrix torsions (``topology``: openmm or mdtraj)."""
    if not isinstance(topology, mdtraj.Topology):
        topology = mdtraj.Topology.from_openmm(topology)
    frame = mdtraj.Trajectory(np.zeros((1, topology.n_atoms, 3), dtype=np.float32), topology)
    return [zmatrix.torsion_index(compute(frame)[0][0]) for compute in (mdtraj.compute_phi, mdtraj.compute_psi)]


def build_generator(topology, x_train: torch.Tensor, settings: dict, seed: int) -> BoltzmannGenerator:
    """StandardNormal -> couplings (``settings["coupling"]``: ``"spline"``, rational-quadratic, which
    can shape the multimodal torsion marginals, or ``"affine"``, RealNVP) -> internal coordinates
    (statistics from ``x_train``) -> Cartesian.

    With ``settings["marginal"]`` (spline couplings only) the density factorises as
    ``q(phi, psi) q(rest | phi, psi)``: a torus flow (:func:`circular_flow`) on the two backbone
    torsions, kept as plain angles, and couplings that condition every layer on their (cos, sin) and
    never transform them (:func:`torus_marginal` returns that part as a generator of its own).
    """
    torch.manual_seed(seed)
    zmatrix = zmatrix_from_topology(topology)
    marginal = settings.get("marginal")
    circular = backbone_torsion_indices(topology, zmatrix) if marginal else ()
    internal = InternalCoordinatesFlow(zmatrix, circular_torsions=circular).fit(x_train)
    if settings["coupling"] == "spline":
        couplings = spline_flow(internal.dim, n_layers=settings["layers"], hidden=settings["hidden"], bins=settings["bins"],
                                circular=internal.circular_dims)
    elif settings["coupling"] == "affine" and not marginal:
        couplings = real_nvp(internal.dim, n_layers=settings["layers"], hidden=settings["hidden"])
    else:
        raise ValueError(f"bg.coupling must be 'spline' or 'affine' (affine only with bg.marginal null), got {settings['coupling']!r}")
    layers = [couplings, internal]
    if marginal:
        torus = circular_flow(len(circular), n_layers=marginal["layers"], hidden=marginal["hidden"], bins=marginal["bins"])
        layers.insert(0, SubsetFlow(torus, internal.circular_dims, internal.dim))
    return BoltzmannGenerator(StandardNormal(internal.dim), SequentialFlow(*layers)).to(BG_DTYPE)


def torus_marginal(model: BoltzmannGenerator) -> tuple[BoltzmannGenerator, list[int]] | None:
    """The ``(phi, psi)`` part of a generator from :func:`build_generator` with ``bg.marginal``: a
    generator of the two angles ``(B, 2)`` rad sharing the model's parameters, and the columns of
    the flow's internal coordinates it fills; None without a marginal."""
    first = model.flow.layers[0]
    if not isinstance(first, SubsetFlow):
        return None
    torus = first.flow
    prior = StandardNormal(torus.layers[0].dim).to(next(torus.parameters()).dtype)
    return BoltzmannGenerator(prior, torus), first.indices.tolist()


def _mean_nll(model, x: torch.Tensor, weights: torch.Tensor | None = None, chunk: int = 4096) -> float:
    """``-sum_i w_i log q(x_i) / sum_i w_i`` over frames ``x (T, d)`` (``weights (T,)``; None: plain mean)."""
    with torch.no_grad():
        log_q = torch.cat([model.log_prob(block) for block in x.split(chunk)])
    weights = torch.ones_like(log_q) if weights is None else weights.to(log_q)
    return float(-(weights * log_q).sum() / weights.sum())


def train_likelihood(model, train: tuple, validation: tuple, settings: dict, seed: int, out: Path,
                     progress: bool) -> dict:
    """Adam on the weighted NLL of ``train = (x, w)`` with early stopping: every ``eval_every`` steps the
    held-out weighted NLL of ``validation = (x, w)`` is measured and the best parameters are kept;
    training stops after ``patience`` evaluations without improvement."""
    trainer = Trainer(model, lambda m, batch: nll(m, *batch), data=train, batch_size=min(settings["batch"], len(train[0])), lr=settings["lr"],
                      device="cpu", seed=seed, out_dir=out, checkpoint_every=settings["eval_every"], progress=progress,
                      config={"bg": settings})
    best, best_state, best_step, waited = float("inf"), None, 0, 0
    while trainer.step < settings["mle_steps"] and waited < settings["patience"]:
        trainer.fit(min(trainer.step + settings["eval_every"], settings["mle_steps"]))
        model.eval()
        value = _mean_nll(model, *validation)
        if value < best:
            best, best_step, waited = value, trainer.step, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
    if best_state is None:
        raise RuntimeError(f"the held-out NLL was never finite in {trainer.step} steps of maximum likelihood")
    model.load_state_dict(best_state)
    return {"bg_mle_steps": trainer.step, "bg_mle_best_step": best_step, "bg_nll_validation_mle": best,
            "bg_nll_train_mle": _mean_nll(model, *train)}


def train_torus_marginal(model, marginal: tuple, x: torch.Tensor, weights: np.ndarray, validation: torch.Tensor,
                         settings: dict, seed: int, out: Path, progress: bool) -> dict:
    """Fit the generator's ``(phi, psi)`` torus flow to the frames ``x (T, 66)`` nm reweighted to the
    Boltzmann ensemble (``weights (T,)``, held out where ``validation``), then freeze it.

    The metadynamics bias depends on (phi, psi) only, so the biased frames sample the Boltzmann
    *conditional* ``p(rest | phi, psi)`` exactly: the couplings learn it from every frame unweighted,
    and only this two-dimensional marginal needs the weights."""
    generator, columns = marginal
    internal = model.flow.layers[-1]
    with torch.no_grad():
        angles = internal.inverse(x.to(internal.mean))[0][:, columns].to(BG_DTYPE)
    w = torch.as_tensor(weights, dtype=BG_DTYPE)
    part = lambda mask: (angles[mask], w[mask] / w[mask].mean())  # noqa: E731
    torus_settings = {**settings, **settings["marginal"]}
    metrics = train_likelihood(generator, part(~validation), part(validation), torus_settings, seed, out / "marginal", progress)
    generator.requires_grad_(False)
    return {key.replace("bg_", "bg_marginal_", 1): value for key, value in metrics.items()}


def train_reverse_kl(model, energy, train: tuple, validation: tuple, settings: dict, seed: int, out: Path,
                     progress: bool) -> dict:
    """Adam on ``F_q + nll_weight * NLL(data)``: reverse KL with OpenMM energies (soft-capped above
    ``energy_cap_kT`` so that clashing samples cannot dominate) plus the weighted likelihood of the MD
    frames ``train = (x, w)``, which keeps the flow on both basins."""
    cap = settings["energy_cap_kT"]

    def loss_fn(m, batch):
        free_energy, stats = reverse_kl(m, energy, settings["kl_batch"], u_high=cap, u_max=10.0 * cap)
        data_term = nll(m, *batch)
        return free_energy + settings["nll_weight"] * data_term, {**stats, "nll": data_term.item()}

    Trainer(model, loss_fn, data=train, batch_size=min(settings["batch"], len(train[0])), lr=settings["kl_lr"], device="cpu", seed=seed + 1,
            out_dir=out, checkpoint_every=max(1, settings["kl_steps"] // 4), progress=progress,
            config={"bg": settings}).fit(settings["kl_steps"], resume=True)
    model.eval()
    return {"bg_nll_validation": _mean_nll(model, *validation)}


def sample_and_weigh(model, energy, n: int, chunk: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` flow samples ``x (n, 66)`` nm and their log-weights ``-u - log q`` ``(n,)`` (``-inf`` where the
    energy is not finite: those samples carry no weight and are counted)."""
    xs, log_ws = [], []
    with torch.no_grad():
        for size in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else []):
            x, log_q = model.sample(size)
            u = energy(x.double()).double()
            log_w = -u - log_q.double()
            xs.append(x)
            log_ws.append(torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -torch.inf)))
    return torch.cat(xs), torch.cat(log_ws)


def ramachandran_kl(reference: tuple, other: tuple, bins: int) -> float:
    """``KL(reference || other)`` in nats between weighted (phi, psi) histograms on ``bins x bins`` cells.

    ``reference``, ``other``: ``(phi, psi, weights)`` with ``(T,)`` arrays (rad; weights may be None).
    A cell where ``reference`` has mass and none of the ``N`` samples of ``other`` falls gets half a
    sample's share, ``1 / (2N)`` (the add-one-half estimate of an empty cell's probability; then
    ``other`` is renormalised), so the value stays finite. (A floor at the smallest non-zero
    probability instead lets one negligible importance weight, 1e-50 say, set the value.)
    """
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    p, q = (np.histogram2d(analysis.wrap_angle(phi), analysis.wrap_angle(psi), bins=(edges, edges), weights=w)[0].ravel()
            for phi, psi, w in (reference, other))
    p, q = p / p.sum(), q / q.sum()
    q = np.where((p > 0) & (q == 0), 0.5 / len(other[0]), q)
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def bootstrap_delta_f(phi: np.ndarray, log_w: torch.Tensor, n: int, seed: int) -> tuple[float, float]:
    """Reweighted ``F(phi > 0) - F(phi < 0)`` (kT) and its bootstrap standard error over samples."""
    weights = torch.softmax(log_w, 0).numpy()
    value = analysis.basin_populations(phi, weights=weights)["delta_f_kT"]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        pick = rng.integers(0, phi.size, phi.size)
        if weights[pick].sum() > 0:
            draws.append(analysis.basin_populations(phi[pick], weights=weights[pick])["delta_f_kT"])
    draws = np.asarray(draws)
    draws = draws[np.isfinite(draws)]
    return float(value), float(np.std(draws, ddof=1)) if draws.size > 1 else float("inf")


def boltzmann_generator(system, frames: mdtraj.Trajectory, weights: np.ndarray, config: dict, out: Path,
                        progress: bool) -> tuple[dict, dict]:
    """Train the all-atom BG on ``frames`` (likelihood, then reverse KL) and compare its reweighted samples
    with the frames reweighted by ``weights (T,)`` (the Boltzmann reference)."""
    settings, seed = config["bg"], config["seed"]
    x = torch.as_tensor(frames.xyz.reshape(len(frames), -1), dtype=torch.float64)
    validation = torch.as_tensor(held_out(len(x), config["data"]["validation_fraction"], config["data"]["validation_block"]))
    x_train, x_val = x[~validation], x[validation]
    model = build_generator(system.topology, x_train, settings, seed)
    metrics = {}
    if (marginal := torus_marginal(model)) is not None:
        metrics.update(train_torus_marginal(model, marginal, x, weights, validation, settings, seed, out, progress))
    # the Boltzmann ensemble (frames reweighted) or, with bg.reweighted false, the biased one as sampled
    w = torch.as_tensor(weights if settings["reweighted"] else np.ones(len(x)), dtype=BG_DTYPE)
    train = (x_train.to(BG_DTYPE), w[~validation] / w[~validation].mean())
    held = (x_val.to(BG_DTYPE), w[validation] / w[validation].mean())
    metrics.update(train_likelihood(model, train, held, settings, seed, out / "mle", progress))
    energy = batched_energy(system, settings["energy"])
    metrics["bg_energy"] = type(energy).__name__
    check = min(settings["samples"], 4000)
    torch.manual_seed(seed + 2)
    metrics["bg_ess_fraction_mle"] = estimators.effective_sample_size(sample_and_weigh(model, energy, check)[1])
    after_likelihood = {k: v.clone() for k, v in model.state_dict().items()}
    metrics.update(train_reverse_kl(model, energy, train, held, settings, seed, out / "reverse_kl", progress))
    metrics["bg_ess_fraction_kl"] = estimators.effective_sample_size(sample_and_weigh(model, energy, check)[1])
    metrics["bg_kl_kept"] = metrics["bg_ess_fraction_kl"] >= metrics["bg_ess_fraction_mle"]
    if not metrics["bg_kl_kept"]:  # the energy stage made the weights worse on these samples: keep the likelihood model
        model.load_state_dict(after_likelihood)
        metrics["bg_nll_validation"] = metrics["bg_nll_validation_mle"]
    torch.save(model.state_dict(), out / "generator.pt")

    torch.manual_seed(seed + 3)
    samples, log_w = sample_and_weigh(model, energy, settings["samples"])
    finite = torch.isfinite(log_w)
    flow_frames = mdtraj.Trajectory(samples[finite].reshape(int(finite.sum()), -1, 3).double().numpy(), frames.topology)
    flow_phi, flow_psi = backbone_torsions(flow_frames)
    flow_weights = torch.softmax(log_w[finite], 0).numpy()
    md_phi, md_psi = backbone_torsions(frames)
    md_delta, md_error = block_delta_f(md_phi, weights, settings["blocks"])
    flow_delta, flow_error = bootstrap_delta_f(flow_phi, log_w[finite], 200, seed)
    reference, bins = (md_phi, md_psi, weights), settings["rama_bins"]
    metrics.update({
        "bg_samples": int(log_w.numel()),
        "bg_nonfinite_fraction": float(1.0 - finite.double().mean()),
        "bg_ess_fraction": estimators.effective_sample_size(log_w),
        "bg_rama_kl_reweighted": ramachandran_kl(reference, (flow_phi, flow_psi, flow_weights), bins),
        "bg_rama_kl_raw": ramachandran_kl(reference, (flow_phi, flow_psi, None), bins),
        "md_weights_ess_fraction": float(1.0 / np.sum(weights**2) / weights.size),
        "md_rama_kl_halves": ramachandran_kl(*(tuple(a[half] for a in reference) for half in np.array_split(np.arange(md_phi.size), 2)),
                                             bins),
        "md_delta_f_kT": md_delta, "md_delta_f_error_kT": md_error,
        "bg_delta_f_kT": flow_delta, "bg_delta_f_error_kT": flow_error,
        "bg_delta_f_deviation_kT": flow_delta - md_delta,
    })
    files = {"generator": out / "generator.pt"}
    for name, (phi, psi, w) in {"md_reweighted": reference, "flow_raw": (flow_phi, flow_psi, None),
                                "flow_reweighted": (flow_phi, flow_psi, flow_weights)}.items():
        surface = analysis.ramachandran((phi, psi), weights=w, bins=36)
        files[f"rama_{name}"] = analysis.plot_ramachandran(surface, out / f"ramachandran_{name}.png",
                                                           title=f"{system.parameters['solvent']}: {name.replace('_', ' ')}", vmax=12.0)
    return metrics, files


# ----------------------------------------------------------------------------- workflow


def run_solvent(solvent: str, config: dict, out: Path, progress: bool) -> tuple[dict, dict]:
    """Data, slow modes and Boltzmann generator for one solvent; metrics and files without prefix."""
    system = _system(solvent, config["temperature_K"])
    clock = time.perf_counter()
    biased, weights, summary = metadynamics_data(system, config, out / "metadynamics", progress)
    unbiased_run, unbiased = tempering_data(system, config, out / "tempering", progress)
    phi, psi = backbone_torsions(biased)
    unbiased_phi = backbone_torsions(unbiased)[0]
    metrics = {"metad_ns": summary["steps"] * summary["timestep_ps"] / 1000.0, "metad_transitions": summary["transitions"],
               "metad_ns_per_day": summary["ns_per_day"], "metad_frames": len(biased),
               "tempering_frames": unbiased_run.n_frames, "tempering_round_trips": unbiased_run.round_trips,
               "tempering_swap_acceptance_min": min(unbiased_run.acceptance),
               "tempering_transitions": analysis.count_transitions(unbiased_phi),
               "tempering_population_positive": analysis.basin_populations(unbiased_phi)["positive"],
               "time_data_s": time.perf_counter() - clock}

    clock = time.perf_counter()
    reference = biased.atom_slice(biased.topology.select("not element H"))[0]
    heavy, topology = heavy_positions(biased, reference)
    segments = unbiased_run.segments
    train = {"heavy": heavy, "phi": phi, "psi": psi, "segments": np.zeros(len(heavy), dtype=int),
             "frame_ps": config["data"]["interval"] * summary["timestep_ps"]}
    dynamics = {"heavy": heavy_positions(unbiased, reference)[0], "segments": segments,
                "frame_ps": unbiased_run.interval * unbiased_run.timestep_ps}
    slow, files = slow_modes(train, dynamics, topology, config, out, progress)
    metrics.update(slow, time_slow_modes_s=time.perf_counter() - clock)

    clock = time.perf_counter()
    bg, bg_files = boltzmann_generator(system, biased, weights, config, out / "bg", progress)
    metrics.update(bg, time_bg_s=time.perf_counter() - clock)
    return metrics, {**files, **bg_files}


def run(config: dict, out: Path) -> dict:
    progress = sys.stderr.isatty() if config["progress"] is None else bool(config["progress"])
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
