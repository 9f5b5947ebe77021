"""Write a torch CV (``openflow.cv.CVModel``) as an ``openmm.CustomCVForce`` and check it.

Representation (see DESIGN.md, "Measured facts"): the standardisation and the first linear layer
are folded into the collective variables (hidden pre-activation ``j`` of feature block ``k`` is one
Custom*Force summing ``w_ji * feature_i`` with per-term parameters), and the rest of the network is
one Lepton expression with ``;`` definitions, written so that every name is defined *after* the
place it is used (Lepton reads the definitions from the last one backwards). A CustomCVForce holds
at most :data:`MAX_CVS` CVs. For CVs over at most three dihedrals
:func:`to_tabulated_cv_force` offers periodic spline tables instead; :func:`export_cv` picks
and checks a representation in one call.

What each representation costs (Context creation, MD step) is measured in the README ("What a
CV export costs").

Lepton evaluates unknown names silently as 0, so every export must pass :func:`check_export`:
values and forces from OpenMM against torch on real frames.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as unit
import torch

from openflow.cv import CVModel
from openflow.features import Angles, Dihedrals, Distances, Feature, Positions

MAX_CVS = 32
VALUE_TOLERANCE = 1e-4
FORCE_RELATIVE_TOLERANCE = 1e-3


class ExportMismatchError(ValueError):
    """OpenMM and torch disagree on an exported CV (see the message for the worst frame)."""


def _number(x: float) -> str:
    """A float as Lepton reads it back exactly (17 significant digits, parenthesised if negative)."""
    if not np.isfinite(x):
        raise ValueError(f"cannot export a non-finite weight ({x})")
    text = repr(float(x))
    return f"({text})" if text.startswith("-") else text


def _linear(bias: float, weights, names) -> str:
    """``bias + w_0*name_0 + ...`` as Lepton text, zero weights left out."""
    terms = [_number(bias)] + [f"{_number(w)}*{name}" for w, name in zip(weights, names) if w != 0.0]
    return "+".join(terms)


# feature kind -> (force class, energy of one term, per-term parameter names, add-parameter, add-term method)
FEATURE_FORCES = {
    Distances: (openmm.CustomBondForce, "w*r", ("w",), "addPerBondParameter", "addBond"),
    Angles: (openmm.CustomAngleForce, "w*theta", ("w",), "addPerAngleParameter", "addAngle"),
    Positions: (
        openmm.CustomExternalForce,
        "wx*x+wy*y+wz*z",
        ("wx", "wy", "wz"),
        "addPerParticleParameter",
        "addParticle",
    ),
    Dihedrals: (
        openmm.CustomTorsionForce,
        "ws*sin(theta)+wc*cos(theta)",
        ("ws", "wc"),
        "addPerTorsionParameter",
        "addTorsion",
    ),
}


def feature_force(feature: Feature, weights) -> openmm.Force:
    """The OpenMM twin of a feature layer: a force whose energy is ``sum_i weights[i] * feature_i``.

    ``weights``: ``(n_out,)``. The weights are per-bond/angle/torsion parameters of one Custom*Force;
    tuples whose weights are all zero are left out.
    """
    if type(feature) not in FEATURE_FORCES:
        raise TypeError(f"no OpenMM twin for a {type(feature).__name__} feature layer")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != feature.n_out:
        raise ValueError(f"{type(feature).__name__} has {feature.n_out} features, got {w.shape[0]} weights")
    force_class, expression, parameters, add_parameter, add_term = FEATURE_FORCES[type(feature)]
    force = force_class(expression)
    for name in parameters:
        getattr(force, add_parameter)(name)
    add = getattr(force, add_term)
    for row, params in zip(feature.atoms.tolist(), w.reshape(feature.n_tuples, feature.per_tuple).tolist()):
        if any(p != 0.0 for p in params):
            add(*row, params)
    return force


def _check_model(cv, output: int) -> None:
    if not isinstance(cv, CVModel):
        raise TypeError(f"expected an openflow.cv.CVModel, got {type(cv).__name__}")
    if not 0 <= int(output) < cv.n_out:
        raise ValueError(f"output must be in [0, {cv.n_out}), got {output}")


def _check_system(cv: CVModel, system) -> None:
    if system is None:
        return
    system = getattr(system, "system", system)  # an openflow System or an openmm.System
    if cv.features.max_atom >= system.getNumParticles():
        raise ValueError(
            f"the CV uses atom {cv.features.max_atom}, the system has {system.getNumParticles()} particles"
        )


def _affine(layer: torch.nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(out, in)`` and bias ``(out,)`` of a linear layer as float64 numpy arrays."""
    return layer.weight.detach().double().cpu().numpy(), layer.bias.detach().double().cpu().numpy()


def folded_first_layer(cv: CVModel, output: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """First affine map acting on raw features, standardisation folded in: ``W (k, F)``, ``b (k,)``.

    For a network without hidden layers only row ``output`` is kept (``k = 1``).
    """
    w, b = _affine(cv.layers[0])
    w = w / cv.std.detach().double().cpu().numpy()
    b = b - w @ cv.mean.detach().double().cpu().numpy()
    if len(cv.layers) == 1:
        w, b = w[output : output + 1], b[output : output + 1]
    return w, b


def to_custom_cv_force(cv: CVModel, system=None, output: int = 0) -> openmm.CustomCVForce:
    """A ``CustomCVForce`` whose energy is ``cv(positions)[:, output]`` (CV units; forces ``-dCV/dx``).

    Collective variables ``z{j}_{k}``: hidden pre-activation ``j`` (standardisation and first layer
    folded in) restricted to feature block ``k``; ``n_hidden_1 * n_blocks`` of them, at most
    :data:`MAX_CVS` (a ValueError otherwise). ``system`` (optional) is only checked for atom indices.
    Features are computed without periodic boundary conditions (molecules must be whole).

    Context creation compiles the expression and its derivatives: one hidden layer is cheap, deeper
    networks take seconds to minutes (README), so a warning is given for more than one hidden layer.
    """
    _check_model(cv, output)
    _check_system(cv, system)
    w, b = folded_first_layer(cv, output)
    blocks = cv.features.slices()
    n_cvs = w.shape[0] * len(blocks)
    if n_cvs > MAX_CVS:
        raise ValueError(
            f"this CV needs {n_cvs} collective variables "
            f"({w.shape[0]} first-layer units x {len(blocks)} feature blocks), "
            f"a CustomCVForce takes at most {MAX_CVS}: use fewer first-layer units or fewer feature kinds"
        )
    cv_names = [[f"z{j}_{k}" for k in range(len(blocks))] for j in range(w.shape[0])]
    pre_activations = ["+".join([_number(b[j])] + cv_names[j]) for j in range(w.shape[0])]

    layers = list(cv.layers)
    if len(layers) > 2:
        warnings.warn(
            f"a CV with {len(layers) - 1} hidden layers compiles slowly in OpenMM (seconds to minutes "
            "per Context); one hidden layer compiles in well under a second",
            stacklevel=2,
        )
    if len(layers) == 1:
        expression = pre_activations[0]
    else:
        act = cv.activation.lepton
        definitions = [f"a1_{j}={act.format(z)}" for j, z in enumerate(pre_activations)]
        inputs = [f"a1_{j}" for j in range(len(pre_activations))]
        for depth, layer in enumerate(layers[1:-1], start=2):
            lw, lb = _affine(layer)
            layer_defs = [f"a{depth}_{j}={act.format(_linear(lb[j], lw[j], inputs))}" for j in range(lw.shape[0])]
            definitions = layer_defs + definitions  # names used before (to the left of) their definitions
            inputs = [f"a{depth}_{j}" for j in range(lw.shape[0])]
        lw, lb = _affine(layers[-1])
        expression = ";".join([_linear(lb[output], lw[output], inputs)] + definitions)

    force = openmm.CustomCVForce(expression)
    for j in range(w.shape[0]):
        for k, (feature, columns) in enumerate(blocks):
            force.addCollectiveVariable(cv_names[j][k], feature_force(feature, w[j, columns]))
    force.setName("openflow CV")
    return force


def to_tabulated_cv_force(cv: CVModel, system=None, output: int = 0, points: int = 129) -> openmm.CustomCVForce:
    """A CV over at most three dihedrals as a periodic spline table (Continuous1/2/3DFunction).

    The CVs are the dihedral angles ``t0, t1, ...`` (``CustomTorsionForce("theta")``); the table
    holds ``cv`` on a ``points``-per-axis grid over ``[-pi, pi]`` (end points copied bitwise).
    Interpolation error shrinks as ``points^-4`` (values) and ``points^-3`` (forces): check it.
    """
    _check_model(cv, output)
    _check_system(cv, system)
    blocks = list(cv.features.blocks)
    if not (len(blocks) == 1 and isinstance(blocks[0], Dihedrals) and blocks[0].n_tuples <= 3):
        raise ValueError("a tabulated export needs a CV over one Dihedrals block of at most 3 dihedrals")
    if points < 4:
        raise ValueError(f"points must be at least 4, got {points}")
    n = blocks[0].n_tuples
    axis = torch.linspace(-np.pi, np.pi, points, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*([axis] * n), indexing="ij"), dim=-1).reshape(-1, n)
    features = torch.stack((torch.sin(grid), torch.cos(grid)), dim=-1).reshape(grid.shape[0], 2 * n)
    model = copy.deepcopy(cv).double().cpu()
    with torch.no_grad():
        table = model.head(features)[:, output].reshape([points] * n).numpy()
    for axis_index in range(n):  # periodic: last point bitwise equal to the first
        first = np.take(table, [0], axis=axis_index)
        table = np.concatenate([np.delete(table, -1, axis=axis_index), first], axis=axis_index)
    values = table.transpose().reshape(-1).tolist()  # OpenMM: x fastest
    limits = [-np.pi, np.pi] * n
    function = {
        1: lambda: openmm.Continuous1DFunction(values, -np.pi, np.pi, True),
        2: lambda: openmm.Continuous2DFunction(points, points, values, *limits, True),
        3: lambda: openmm.Continuous3DFunction(points, points, points, values, *limits, True),
    }[n]()
    names = [f"t{i}" for i in range(n)]
    force = openmm.CustomCVForce(f"cv_table({','.join(names)})")
    force.addTabulatedFunction("cv_table", function)
    for name, quad in zip(names, blocks[0].atoms.tolist()):
        torsion = openmm.CustomTorsionForce("theta")
        torsion.addTorsion(*quad, [])
        force.addCollectiveVariable(name, torsion)
    force.setName("openflow CV (table)")
    return force


# ----------------------------------------------------------------------------- checking


def _frames_nm(frames) -> np.ndarray:
    """mdtraj Trajectory, Quantity, array or tensor ``(B, n_atoms, 3)``/``(B, 3 n_atoms)`` -> float64 nm."""
    if hasattr(frames, "xyz") and hasattr(frames, "topology"):
        frames = frames.xyz
    if unit.is_quantity(frames):
        frames = frames.value_in_unit(unit.nanometer)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] % 3 == 0:
        array = array.reshape(array.shape[0], -1, 3)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be (B, n_atoms, 3) or (B, 3*n_atoms) with B >= 1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("frames hold non-finite positions")
    return array


def _context(force: openmm.Force, n_atoms: int, platform: str) -> tuple[openmm.Context, openmm.CustomCVForce, float]:
    """A Context of ``n_atoms`` free particles whose only force is ``s = force`` wrapped as one CV.

    The wrapper is what ``openmm.app.Metadynamics`` builds around a BiasVariable; its
    ``getCollectiveVariableValues`` returns the CV value. Returns the context, the wrapper and
    the seconds its creation took (expression compilation included).
    """
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(1.0)
    wrapper = openmm.CustomCVForce("s")
    wrapper.addCollectiveVariable("s", openmm.XmlSerializer.clone(force))
    system.addForce(wrapper)
    start = time.perf_counter()
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    return context, wrapper, time.perf_counter() - start


def openmm_cv_values_and_forces(
    force: openmm.Force, frames, platform: str = "Reference"
) -> tuple[np.ndarray, np.ndarray, float]:
    """CV values ``(B,)``, forces ``(B, n_atoms, 3)`` (CV units / nm) of ``force`` on ``frames`` (nm),
    and the Context creation time in s."""
    xyz = _frames_nm(frames)
    context, wrapper, seconds = _context(force, xyz.shape[1], platform)
    values, forces = np.empty(xyz.shape[0]), np.empty(xyz.shape)
    for i, frame in enumerate(xyz):
        context.setPositions(frame)
        values[i] = wrapper.getCollectiveVariableValues(context)[0]
        forces[i] = (
            context.getState(getForces=True)
            .getForces(asNumpy=True)
            .value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        )
    return values, forces, seconds


def torch_cv_values_and_forces(cv: CVModel, frames, output: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The reference: ``cv`` in float64 on ``frames``; values ``(B,)`` and forces ``-dCV/dx`` ``(B, n_atoms, 3)``."""
    xyz = torch.as_tensor(_frames_nm(frames)).requires_grad_(True)
    model = copy.deepcopy(cv).double().cpu()
    values = model(xyz)[:, output]
    (gradient,) = torch.autograd.grad(values.sum(), xyz)
    return values.detach().numpy(), -gradient.numpy()


def check_export(
    cv: CVModel,
    force: openmm.Force,
    frames,
    platform: str = "Reference",
    output: int = 0,
    value_tolerance: float = VALUE_TOLERANCE,
    force_tolerance: float = FORCE_RELATIVE_TOLERANCE,
) -> dict:
    """Compare an exported CV with torch on ``frames`` (nm); raise :class:`ExportMismatchError` if off.

    Values must agree within ``value_tolerance`` (CV units); forces within ``force_tolerance``
    relative to the largest torch force component of the frame. Returns a report: the platform,
    number of frames, Context creation seconds, max value error, max relative force error and the
    worst frames.
    """
    _check_model(cv, output)
    xyz = _frames_nm(frames)
    if cv.features.max_atom >= xyz.shape[1]:
        raise ValueError(f"the CV uses atom {cv.features.max_atom}, frames hold {xyz.shape[1]} atoms")
    omm_values, omm_forces, seconds = openmm_cv_values_and_forces(force, xyz, platform)
    ref_values, ref_forces = torch_cv_values_and_forces(cv, xyz, output)
    value_error = np.abs(omm_values - ref_values)
    scale = np.abs(ref_forces).reshape(len(xyz), -1).max(1)
    force_error = np.abs(omm_forces - ref_forces).reshape(len(xyz), -1).max(1) / np.maximum(scale, 1e-12)
    report = dict(
        platform=platform,
        n_frames=int(len(xyz)),
        context_seconds=float(seconds),
        max_value_error=float(value_error.max()),
        max_force_relative_error=float(force_error.max()),
        worst_value_frame=int(value_error.argmax()),
        worst_force_frame=int(force_error.argmax()),
    )
    if not (value_error.max() <= value_tolerance and force_error.max() <= force_tolerance):  # NaN fails too
        i, k = report["worst_value_frame"], report["worst_force_frame"]
        raise ExportMismatchError(
            f"exported CV differs from torch on {platform}: worst value at frame {i}: OpenMM {omm_values[i]:.8g}, "
            f"torch {ref_values[i]:.8g} (|diff| {value_error[i]:.3g}, tolerance {value_tolerance:g}); worst force at "
            f"frame {k}: relative error {force_error[k]:.3g} (tolerance {force_tolerance:g}). A misspelled or missing "
            f"name in the Lepton expression evaluates to 0 silently. Report: {report}"
        )
    return report


def export_cv(
    cv: CVModel,
    frames,
    system=None,
    output: int = 0,
    method: str = "auto",
    platform: str = "Reference",
    points: int = 129,
) -> tuple[openmm.CustomCVForce, dict]:
    """Export ``cv`` and check it on ``frames`` in one call: returns ``(force, report)``.

    ``method``: ``"lepton"`` (:func:`to_custom_cv_force`), ``"table"`` (:func:`to_tabulated_cv_force`)
    or ``"auto"``: the table when the CV is over at most three dihedrals and passes
    :func:`check_export` (it is the cheapest per MD step), else the Lepton expression. The report
    gains ``method``; an export that fails its check raises :class:`ExportMismatchError`.
    """
    builders = {
        "lepton": lambda: to_custom_cv_force(cv, system, output),
        "table": lambda: to_tabulated_cv_force(cv, system, output, points),
    }
    if method not in (*builders, "auto"):
        raise ValueError(f"method must be 'auto', 'lepton' or 'table', got {method!r}")
    blocks = list(cv.features.blocks) if isinstance(cv, CVModel) else []
    tabulable = len(blocks) == 1 and isinstance(blocks[0], Dihedrals) and blocks[0].n_tuples <= 3
    if method == "auto":
        if tabulable:
            try:
                force, table_report = export_cv(cv, frames, system, output, "table", platform, points)
                return force, table_report
            except ExportMismatchError:
                pass  # a CV too steep for the grid: the exact Lepton route below
        method = "lepton"
    force = builders[method]()
    report = check_export(cv, force, frames, platform, output)
    return force, dict(report, method=method)


# ----------------------------------------------------------------------------- XML


def save_cv_force(force: openmm.Force, path) -> Path:
    """Write ``force`` as OpenMM XML (``XmlSerializer``) atomically (``.part`` file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(openmm.XmlSerializer.serialize(force))
    os.replace(part, path)
    return path


def load_cv_force(path) -> openmm.Force:
    """Read a force written by :func:`save_cv_force` (any ``XmlSerializer`` force XML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CV force file not found: {path}")
    try:
        force = openmm.XmlSerializer.deserialize(path.read_text())
    except Exception as error:  # OpenMM raises a bare Exception for malformed XML
        raise ValueError(f"{path} is not an OpenMM force XML file: {error}") from None
    if not isinstance(force, openmm.Force):
        raise ValueError(f"{path} holds a {type(force).__name__}, not an OpenMM force")
    return force
