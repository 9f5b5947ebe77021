"""From MD frames to slow CVs as checked ``CustomCVForce``s, for any OpenMM system.

    cv = learn_cv(system, "md/trajectory.dcd", "md/topology.pdb", out="cv")   # frames (and weights) in
    meta = openmm.app.Metadynamics(system.system, cv.bias_variables(), ...)   # checked CustomCVForces out

- :func:`choose_features`: ``auto`` tests the System's energy for invariance under rigid motions
  (:func:`energy_is_rigid_invariant`): invariant -> pair distances of the selected atoms (and the
  canonical transformation sees Kabsch-aligned positions), not invariant -> their Cartesian
  positions (nothing aligned); or ``distances``, ``torsions`` (every proper torsion over bonded
  selected atoms), ``positions``.
- :func:`slow_modes_of_trajectory`: trajectories -> the neural canonical transformation of the
  selected atoms (``openflow.nct``, weighted by the frames' reweighting weights) and the latent
  positions of its lowest-frequency modes on every frame.
- :func:`learn_slow_cv`: the kinetic choice among those modes (their leading TICA component over
  the runs' own time order, so not the widest mode but the slowest; and the next one too when its
  process is about as slow) regressed by a ``CVModel`` over the features and exported
  (:func:`fit_and_export`): checked value-for-value and force-for-force against torch, saved as
  OpenMM XML.

Nothing here assumes a molecule: the atoms are an mdtraj selection, the features are chosen from
the System itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

from openflow import nct
from openflow.cv import CVModel, fit_cv
from openflow.data import dcd_header, load, load_trajectory
from openflow.features import FeatureSet, distance_features, position_features, select_atoms, torsion_features
from openflow.flows.symplectic import NeuralCanonicalTransformation
from openflow.io import digest, read_record, write_record

from .export import export_cv, load_cv_force, save_cv_force

DTYPE = torch.float64  # frames, CV fit and export (checked against OpenMM in float64)
FEATURES = ("auto", "distances", "torsions", "positions")


def energy_is_rigid_invariant(system, seed: int = 0, tolerance: float = 1e-6) -> bool:
    """Whether the System's energy stays the same (to ``tolerance`` relative, plus 1e-6 kJ/mol) when its
    starting structure is rotated and translated at random (three draws; Reference platform)."""
    context = openmm.Context(
        system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    xyz = np.asarray(system.positions.value_in_unit(unit.nanometer), dtype=np.float64)

    def energy(positions) -> float:
        context.setPositions(positions)
        state = context.getState(getEnergy=True, groups=system.energy_groups())
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    reference = energy(xyz)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        moved = (xyz - xyz.mean(0)) @ rotation.T + xyz.mean(0) + rng.normal(scale=0.5, size=3)
        if abs(energy(moved) - reference) > tolerance * abs(reference) + 1e-6:
            return False
    return True


def choose_features(system, kind: str = "auto", atoms: str = "heavy") -> tuple[FeatureSet, bool, str]:
    """The CV's input features, whether positions are to be Kabsch-aligned, and the kind chosen.

    ``kind``: ``auto`` (see the module), ``distances``, ``torsions`` or ``positions``; ``atoms``: an
    mdtraj selection (``heavy``: every atom that is not hydrogen). Alignment is used only where
    the energy is invariant under rigid motions, whatever the features.
    """
    if kind not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {kind!r}")
    invariant = energy_is_rigid_invariant(system)
    if kind == "auto":
        kind = "distances" if invariant else "positions"
    build = {"distances": distance_features, "torsions": torsion_features, "positions": position_features}[kind]
    return build(system, atoms), invariant, kind


@dataclass
class SlowModes:
    """The trained transformation, its principal frame, the frames' coordinates ``q (T, k)`` on it,
    the latent positions ``modes (T, n_modes)`` of the smallest frequencies, every frequency ``omega
    (k,)`` 1/ps in increasing order, and the training's metrics (``nct_steps`` kept of ``nct_steps_trained``, ...)."""

    model: NeuralCanonicalTransformation
    frame: nct.PrincipalFrame
    q: torch.Tensor
    modes: torch.Tensor
    omega: torch.Tensor
    metrics: dict


def slow_modes_of_trajectory(
    system,
    trajectory,
    topology,
    n_modes: int,
    settings: dict,
    seed: int,
    out: Path,
    progress: bool,
    atoms: str = "heavy",
    align: bool = True,
    weights=None,
    segments=None,
    lag: int = 10,
) -> SlowModes:
    """Train the canonical transformation on the selected atoms of a trajectory file, or a list of them
    (``topology``: their PDB), of ``system`` (masses, temperature): positions aligned by Kabsch onto the
    first frame when ``align`` (the energy is invariant under rigid motions), mass-weighted principal
    axes, Maxwell-Boltzmann momenta drawn with ``seed``. ``settings``: ``openflow.nct.train_nct``'s;
    ``weights (T,)``: frame weights of all frames in order; ``segments (T,)``: each frame's run
    (default: one run), for the kinetic choice of the training length at ``lag`` frames
    (``openflow.nct.train_nct_kinetically``)."""
    positions = load(trajectory, topology, selection=atoms, align=align, dtype=DTYPE)
    masses = system.masses[select_atoms(system, atoms)]
    w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=DTYPE)
    frame = nct.principal_frame(positions, masses, system.kT_kjmol, rigid_body=align, weights=w)
    p, q = nct.phase_space(frame, positions, torch.Generator().manual_seed(seed))
    segments = np.zeros(len(q), dtype=int) if segments is None else np.asarray(segments)
    model, metrics = nct.train_nct_kinetically(
        p, q, frame.variances, settings, seed, out, progress, n_modes, segments, lag, weights=w
    )
    return SlowModes(model, frame, q, nct.latent_modes(model, q, n_modes), model.slow_modes()[1].detach(), metrics)


@dataclass
class ExportedCV:
    """Checked ``CustomCVForce``s, one per CV output, their guaranteed ``(lo, hi)`` ranges
    (``CVModel.bounds()``), the standard deviations of the outputs over the fitted frames, the
    fit's and export's numbers as flat metrics, and the written files."""

    forces: list
    ranges: list
    stds: list
    metrics: dict
    files: dict


def fit_and_export(
    cv: CVModel,
    frames: mdtraj.Trajectory,
    targets: torch.Tensor,
    epochs: int,
    seed: int,
    out: Path,
    export_frames: int = 100,
    table_points: int = 129,
    names=None,
) -> ExportedCV:
    """Regress ``cv`` on ``targets (T, n_out)`` over ``frames``, export each output checked on
    ``export_frames`` of them (a periodic table when the CV is over at most three torsions and
    passes, else Lepton), save ``{name}.xml`` per output (``names``: default ``cv_q1, cv_q2, ...``)
    and ``cv.pt`` (the model's state) in ``out``, with the record ``cv.json``: a call with the same
    model, frames, targets and settings returns the saved CV (``cv`` gets its fitted state)."""
    names = list(names) if names is not None else [f"cv_q{k + 1}" for k in range(cv.n_out)]
    positions = torch.as_tensor(frames.xyz, dtype=DTYPE)
    settings = dict(
        names=names,
        epochs=epochs,
        seed=seed,
        export_frames=export_frames,
        table_points=table_points,
        features=cv.features.names(),
        hidden=list(cv.hidden),
        data=digest(positions, targets, *cv.state_dict().values()),
    )
    files = {f"{name}_xml": out / f"{name}.xml" for name in names}
    files["cv_model"] = out / "cv.pt"
    record = read_record(out / "cv.json", settings, files.values())
    if record is not None:
        cv.load_state_dict(torch.load(files["cv_model"]))
        forces = [load_cv_force(files[f"{name}_xml"]) for name in names]
        return ExportedCV(forces, [tuple(r) for r in record["ranges"]], record["stds"], record["metrics"], files)
    fit = fit_cv(cv, positions, targets, epochs=epochs, seed=seed)
    stride = max(1, len(positions) // int(export_frames))
    exported = [
        export_cv(cv, positions[::stride], output=k, method="auto", points=int(table_points)) for k in range(cv.n_out)
    ]
    for name, (force, _) in zip(names, exported):
        save_cv_force(force, files[f"{name}_xml"])
    torch.save(cv.state_dict(), files["cv_model"])
    with torch.no_grad():
        stds = cv(positions).std(0).tolist()
    lo, hi = cv.bounds()
    reports = [report for _, report in exported]
    metrics = {
        "cv_export_method": "+".join(sorted({r["method"] for r in reports})),
        "cv_export_frames": reports[0]["n_frames"],
        "cv_export_max_value_error": max(r["max_value_error"] for r in reports),
        "cv_export_max_force_relative_error": max(r["max_force_relative_error"] for r in reports),
        "cv_export_context_s": max(r["context_seconds"] for r in reports),
    }
    for k in range(cv.n_out):
        metrics.update(
            {
                f"cv_r2_train_q{k + 1}": fit.r2_train[k],
                f"cv_r2_validation_q{k + 1}": fit.r2_validation[k],
                f"cv_lo_q{k + 1}": float(lo[k]),
                f"cv_hi_q{k + 1}": float(hi[k]),
                f"cv_data_std_q{k + 1}": stds[k],
            }
        )
    ranges = [(float(a), float(b)) for a, b in zip(lo, hi)]
    write_record(out / "cv.json", settings, metrics=metrics, ranges=ranges, stds=stds)
    return ExportedCV([force for force, _ in exported], ranges, stds, metrics, files)


@dataclass
class LearnedCV:
    """Learned slow CVs, slowest first: the torch ``models`` (features -> MLP, one output each), their
    exported and checked OpenMM ``forces``, the guaranteed ``ranges`` ``[(lo, hi), ...]`` of their
    values, their standard deviations ``stds`` on the training frames, the models' ``values (T, n)``
    and the kinetic ``target (T, n)`` they were fitted to on those frames, flat ``metrics`` and the
    written ``files``."""

    models: list
    forces: list
    ranges: list
    stds: list
    values: np.ndarray
    target: np.ndarray
    metrics: dict
    files: dict

    def __call__(self, positions) -> np.ndarray:
        """The CVs ``(B, n)`` of positions ``(B, n_atoms, 3)`` nm (torch, float64)."""
        xyz = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        with torch.no_grad():
            return torch.cat([model(xyz) for model in self.models], 1).numpy()

    def bias_variables(self, width_std: float = 0.25, max_grid: int = 2000) -> list:
        """One non-periodic ``openmm.app.BiasVariable`` per CV, on a copy of its force over its whole
        range (the bias is zero outside it), Gaussians ``width_std`` of its standard deviation wide,
        OpenMM's ``5 * range / width`` grid points (at most ``max_grid``)."""
        variables = []
        for force, (lo, hi), std in zip(self.forces, self.ranges, self.stds):
            width = width_std * std
            if not (width > 0 and np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"cannot bias a CV with range ({lo}, {hi}) and width {width}: use hidden tanh units")
            points = int(min(max_grid, np.ceil(5.0 * (hi - lo) / width)))
            variables.append(app.BiasVariable(openmm.XmlSerializer.clone(force), lo, hi, width, False, points))
        return variables


def check_dims(dims) -> None:
    """``dims``, the number of slow CVs: 1, 2 or ``"auto"``, else a ``ValueError``."""
    if dims != "auto" and not (type(dims) is int and dims in (1, 2)):
        raise ValueError(f"the number of CVs (dims) must be 1, 2 or auto, got {dims!r}")


def learn_slow_cv(
    system,
    trajectories,
    topology,
    features: FeatureSet,
    align: bool,
    nct_settings: dict,
    hidden=(1,),
    epochs: int = 60,
    n_modes: int = 8,
    lag: int = 10,
    seed: int = 0,
    out: Path = Path("cv"),
    progress: bool = True,
    atoms: str = "heavy",
    weights=None,
    export_frames: int = 100,
    dims="auto",
) -> LearnedCV:
    """The slow CVs of ``trajectories`` (one path or a list, each an unbroken run; ``topology``: PDB) of
    ``system``: the canonical transformation of the selected ``atoms`` (weighted by ``weights``, one
    per frame of all runs in order), the leading TICA components of its ``n_modes`` lowest-frequency
    latent modes at ``lag`` frames inside each run (the kinetically slowest combinations), and for
    each a ``CVModel`` over ``features`` with ``hidden`` tanh units regressed on it, exported (checked
    on ``export_frames`` frames) into ``out/cv.xml`` (the second: ``out/cv2/cv2.xml``). ``dims``: how
    many CVs, 1, 2 or ``auto`` (the second when its process is about as slow as the first:
    ``openflow.nct.slow_together``). Everything is kept in ``out`` and reused by a call with the same
    data and settings."""
    check_dims(dims)
    paths = [trajectories] if isinstance(trajectories, (str, Path)) else list(trajectories)
    frames = [load_trajectory(path, topology) for path in paths]
    segments = np.concatenate([np.full(part.n_frames, k) for k, part in enumerate(frames)])
    out = Path(out)
    n_modes = min(n_modes, 3 * len(select_atoms(system, atoms)) - (nct.RIGID_BODY_DOF if align else 0))
    slow = slow_modes_of_trajectory(
        system,
        paths,
        topology,
        n_modes,
        nct_settings,
        seed,
        out / "nct",
        progress,
        atoms,
        align,
        weights,
        segments,
        lag,
    )
    modes = slow.modes.double().numpy()  # at most as many modes as the frame has axes
    # two components' spectrum decide how many CVs; the targets are then the transform of exactly that many
    spectrum = nct.kinetic_slowest(modes, segments, lag, dim=min(2, n_modes))[0].eigenvalues
    dims = min(nct.slow_together(spectrum) if dims == "auto" else dims, n_modes)
    tica_model, target = nct.kinetic_slowest(modes, segments, lag, dim=dims)
    share = tica_model.eigenvectors[:, 0] * modes.std(0)
    share = share / np.linalg.norm(share)
    joined = frames[0] if len(frames) == 1 else mdtraj.join(frames)
    positions = torch.as_tensor(joined.xyz, dtype=DTYPE)
    models, exported, metrics = [], [], {}
    for k in range(dims):
        name = "cv" if k == 0 else f"cv{k + 1}"
        cv = CVModel(features, hidden=hidden, n_out=1, seed=seed + k).double()
        part = fit_and_export(
            cv,
            joined,
            torch.as_tensor(target[:, k : k + 1]),
            epochs,
            seed + k,
            out if k == 0 else out / name,
            export_frames,
            names=[name],
        )
        models.append(cv)
        exported.append(part)
        metrics.update({key if k == 0 else key.replace("cv_", f"{name}_", 1): v for key, v in part.metrics.items()})
    with torch.no_grad():
        values = torch.cat([cv(positions) for cv in models], 1).numpy()
    metrics.update(
        slow.metrics,
        cv_dims=dims,
        cv_features=len(features.names()),
        frames=int(len(segments)),
        kinetic_lag_frames=int(lag),
        kinetic_autocorrelation=float(spectrum[0]),
    )
    if len(spectrum) > 1:
        metrics["kinetic_autocorrelation_2"] = float(spectrum[1])
    metrics.update({f"nct_omega_{k + 1}_per_ps": float(w) for k, w in enumerate(slow.omega[:n_modes])})
    metrics.update({f"kinetic_weight_q{k + 1}": float(v) for k, v in enumerate(share)})
    return LearnedCV(
        models,
        [part.forces[0] for part in exported],
        [part.ranges[0] for part in exported],
        [float(part.stds[0]) for part in exported],
        values,
        target,
        metrics,
        {key: value for part in exported for key, value in part.files.items()},
    )


def learn_cv(
    system,
    trajectories,
    topology,
    weights=None,
    features: str = "auto",
    atoms: str = "heavy",
    out: Path = Path("cv"),
    seed: int = 0,
    lag_ps: float = 1.0,
    frame_ps: float | None = None,
    **settings,
) -> LearnedCV:
    """A checked slow CV of any ``system`` from its frames: features chosen from the System
    (:func:`choose_features`), the kinetic lag ``lag_ps`` in frames of ``frame_ps`` (default: from the
    first trajectory's DCD header). ``settings``: ``nct`` (a dict of ``openflow.nct.SETTINGS``'s keys,
    missing ones from there), ``hidden``, ``epochs``, ``n_modes``, ``export_frames``, ``dims``, ``progress`` of
    :func:`learn_slow_cv`."""
    feature_set, invariant, _ = choose_features(system, features, atoms)
    paths = [trajectories] if isinstance(trajectories, (str, Path)) else list(trajectories)
    if frame_ps is None:
        header = dcd_header(paths[0]) if str(paths[0]).lower().endswith(".dcd") else None
        if header is None:
            raise ValueError(f"give frame_ps: the time between frames of {paths[0]} is not in a DCD header")
        frame_ps = header["frame_ps"]
    nct_settings = nct.nct_settings(settings.pop("nct", None))
    return learn_slow_cv(
        system,
        paths,
        topology,
        feature_set,
        invariant,
        nct_settings,
        seed=seed,
        out=out,
        atoms=atoms,
        weights=weights,
        lag=max(1, round(lag_ps / frame_ps)),
        **settings,
    )
