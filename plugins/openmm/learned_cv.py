"""From MD frames to slow CVs as checked ``CustomCVForce``s: the steps every learned-CV run shares.

- :func:`slow_modes_of_trajectory`: a trajectory of any ``openflow.systems.System`` -> the neural
  canonical transformation of its selected atoms (``openflow.nct``) and the latent positions of
  its slowest modes on every frame;
- :func:`fit_and_export`: a ``CVModel`` (features OpenMM can compute -> MLP) regressed on target
  values (e.g. those modes), each output exported as a ``CustomCVForce`` checked value-for-value
  and force-for-force against torch (``export.export_cv``) and saved as OpenMM XML.

Nothing here assumes a molecule: the atoms are an mdtraj selection, the features are passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import mdtraj
import numpy as np
import torch

from openflow import nct
from openflow.cv import CVModel, fit_cv
from openflow.data import load
from openflow.features import select_atoms
from openflow.flows.symplectic import NeuralCanonicalTransformation
from openflow.io import read_record, write_record

from .export import export_cv, load_cv_force, save_cv_force

DTYPE = torch.float64  # frames, CV fit and export (checked against OpenMM in float64)


@dataclass
class SlowModes:
    """The trained transformation, its principal frame, the frames' coordinates ``q (T, k)`` on it,
    the latent positions ``modes (T, n_modes)`` of the smallest frequencies, every frequency ``omega
    (k,)`` 1/ps in increasing order, and the training's metrics (``nct_steps``, ``nct_final_loss``)."""

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
) -> SlowModes:
    """Train the canonical transformation on the selected atoms of a trajectory file (``topology``: its
    PDB) of ``system`` (masses, temperature): positions aligned by Kabsch when ``align`` (the energy is
    invariant under rigid motions), mass-weighted principal axes, Maxwell-Boltzmann momenta drawn
    with ``seed``. ``settings``: ``openflow.nct.train_nct``'s; ``weights (T,)``: frame weights."""
    positions = load(trajectory, topology, selection=atoms, align=align, dtype=DTYPE)
    masses = system.masses[select_atoms(system, atoms)]
    w = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=DTYPE)
    frame = nct.principal_frame(positions, masses, system.kT_kjmol, rigid_body=align, weights=w)
    p, q = nct.phase_space(frame, positions, torch.Generator().manual_seed(seed))
    model, metrics = nct.train_nct(p, q, frame.variances, settings, seed, out, progress, weights=w)
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
    digest = hashlib.sha256()
    for array in (positions, torch.as_tensor(targets, dtype=DTYPE), *cv.state_dict().values()):
        digest.update(array.detach().cpu().double().numpy().tobytes())
    settings = dict(
        names=names,
        epochs=epochs,
        seed=seed,
        export_frames=export_frames,
        table_points=table_points,
        features=cv.features.names(),
        hidden=list(cv.hidden),
        data=digest.hexdigest()[:16],
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
