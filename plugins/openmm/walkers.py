"""Metadynamics walkers sharing one bias, and independent unbiased runs, as Dask tasks.

    with dask_client(n_workers=2) as client:        # a LocalCluster, or Client(address) of a cluster
        result = run_walkers(system, variables, 2, out="metad", client=client, ns=1.0, seed=0)

Each walker is one :func:`~openflow.plugins.openmm.metadynamics.run_metadynamics` call in its own
folder ``out/walker<i>`` with its own seed and starting frame, all sharing ``out/bias`` (OpenMM's
``biasDir``: every walker writes its own deposits there and sums the others' in at each deposit;
see :mod:`~openflow.plugins.openmm.bias_files`). Each walker is checkpointed every ``checkpoint_ps``:
when its worker dies, Dask runs the task again on a live worker and the walker resumes from its own
checkpoint (state and bias), having lost the work since then, while the others go on.

**Reweighting.** Every walker computes c(t) from the bias it feels at each frame (its own deposits
and the others' as last read), so the weight ``exp((V(s,t) - c(t))/kT)`` of each frame is the
Tiwary-Parrinello weight under the common bias at that moment; the walkers' frames are pooled with
these log-weights as they are (one ensemble, one normalisation). ``out`` then holds the pooled
``trajectory.dcd`` (walker after walker), ``COLVAR`` (with a ``walker`` column), ``weights.npy``,
``log_weights.npy``, the total bias ``bias.npz`` / ``fes.npz`` and ``walkers.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from openflow.io import plain_json, read_record, say, write_json, write_record

from . import bias_files
from .bias import fes_from_bias, grid_axes, variable_signature
from .md import positive_integer, simulate
from .metadynamics import OUTPUTS, MetadynamicsResult, copy_bias_files, run_metadynamics, start_signature
from .platforms import select_platform
from .segments import CHECKPOINT, join_dcd

POLL_S = 2.0  # seconds between looks at the walkers' checkpoints
RUN_RECORD = "walkers_run.json"  # the settings of the run that owns out/bias


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None):
    """A ``dask.distributed.Client``: of the scheduler at ``address`` (a cluster whose workers share
    this filesystem), else of a ``LocalCluster`` of ``n_workers`` one-thread processes (default: one
    per CPU core), closed on exit."""
    from dask.distributed import Client, LocalCluster

    if address is not None:
        with Client(address) as client:
            yield client
        return
    workers = n_workers or os.cpu_count() or 1
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(importlib.import_module, __name__)  # every worker imports OpenMM, torch and openflow once, now
        yield client


def check_walkers(walkers, cluster: dict) -> None:
    """One-line errors for ``walkers`` (a positive integer) and ``cluster`` (``address``: a scheduler
    address or None, ``n_workers``: a positive integer or None), before any work starts."""
    positive_integer(walkers, "walkers")
    if not isinstance(cluster, dict) or set(cluster) != {"address", "n_workers"}:
        raise ValueError(f"cluster must be a mapping with address and n_workers, got {cluster!r}")
    if cluster["address"] is not None and not isinstance(cluster["address"], str):
        raise ValueError(
            f"cluster.address must be a scheduler address such as tcp://host:8786, got {cluster['address']!r}"
        )
    if cluster["n_workers"] is not None:
        positive_integer(cluster["n_workers"], "cluster.n_workers")


@contextlib.contextmanager
def client_for(walkers: int, address: str | None = None, n_workers: int | None = None):
    """A :func:`dask_client` when more than one walker will run (default one worker per walker, at
    most one per CPU core), else None: one walker runs in this process."""
    if walkers <= 1:
        yield None
        return
    with dask_client(address, n_workers or min(walkers, os.cpu_count() or 1)) as client:
        yield client


def biased_run(system, variables, out, client=None, walkers: int = 1, ns=None, steps=None, **settings):
    """``ns`` (or ``steps``) of metadynamics in all: one :func:`run_metadynamics` in this process
    (``walkers`` 1), or :func:`run_walkers` with a ``walkers``-th of it each on ``client``.
    ``settings``: theirs (``starts`` for walkers; one walker starts from ``starts[0]`` if given)."""
    if walkers <= 1:
        starts = settings.pop("starts", None)
        if starts is not None and starts[0] is not None:
            settings.update(_start_of(starts[0], None, 0))
        return run_metadynamics(system, variables, ns=ns, steps=steps, out=out, **settings)
    if client is None:
        raise ValueError(f"{walkers} walkers need a Dask client (client_for)")
    settings.pop("reuse", None)  # walkers always reuse what is finished and resume what is not
    if steps is not None:
        return run_walkers(system, variables, walkers, out, client, steps=max(1, steps // walkers), **settings)
    return run_walkers(system, variables, walkers, out, client, ns=None if ns is None else ns / walkers, **settings)


def run_walkers(
    system,
    variables,
    n_walkers: int,
    out,
    client,
    starts=None,
    seed: int = 0,
    checkpoint_ps: float = 50.0,
    continue_from=None,
    overwrite: bool = False,
    progress: bool = True,
    platform: str | None = None,
    **settings,
) -> MetadynamicsResult:
    """``n_walkers`` well-tempered metadynamics walkers of ``system`` on ``variables`` sharing one bias,
    each a Dask task on ``client``, pooled into one result (see the module).

    ``starts``: one starting point per walker (positions ``(n_atoms, 3)`` nm or a state file), default
    the system's positions; walker ``i`` gets seed ``seed + i``. ``continue_from``: a finished
    walkers folder (each walker continues its namesake's bias and state) or a single run's folder
    (its bias, every walker from its state). ``settings``: :func:`run_metadynamics`'s (``ns`` or
    ``steps`` per walker, ``height``, ``bias_factor``, ``frequency``, ``interval``, ``cv_names``,
    ``observables``, ...). A folder whose shared bias came from another run is refused unless
    ``overwrite``; an interrupted one resumes (each walker from its checkpoint).
    """
    n_walkers = positive_integer(n_walkers, "walkers")
    starts = [None] * n_walkers if starts is None else list(starts)
    if len(starts) != n_walkers:
        raise ValueError(f"{len(starts)} starting points for {n_walkers} walkers")
    out, bias_dir = Path(out), Path(out) / OUTPUTS["bias_dir"]
    folders = [out / f"walker{i}" for i in range(n_walkers)]
    chosen = select_platform(platform, system.system, system.positions, task="md")
    platform = chosen.getName()  # measured once here, not in every walker
    record = dict(
        walkers=n_walkers,
        seed=seed,
        checkpoint_ps=checkpoint_ps,
        continue_from=str(continue_from) if continue_from else None,
        variables=variable_signature(variables),
        starts=[start_signature(**_start_of(start, None, i)) for i, start in enumerate(starts)],
        settings={key: value for key, value in settings.items() if key != "observables"},
        observables=sorted(settings.get("observables") or {}),
    )
    _prepare_shared_bias(out, bias_dir, folders, record, continue_from, overwrite)
    futures = []
    for i, (folder, start) in enumerate(zip(folders, starts)):
        where = _start_of(start, continue_from, i)
        futures.append(
            client.submit(
                run_metadynamics,
                system,
                variables,
                out=folder,
                seed=seed + i,
                bias_dir=bias_dir,
                checkpoint_ps=checkpoint_ps,
                platform=platform,
                reuse=True,
                overwrite=True,
                progress=False,
                **where,
                **settings,
                pure=False,
                key=f"walker{i}-{os.urandom(4).hex()}",
            )
        )
    _follow(futures, folders, progress)
    results = client.gather(futures)
    return pool_walkers(results, variables, out, bias_dir)


def _prepare_shared_bias(out: Path, bias_dir: Path, folders, record: dict, continue_from, overwrite: bool) -> None:
    """The shared bias of this run: one left by this very run (same ``record`` in ``out/walkers_run.json``)
    is resumed; one left by another run is refused, or emptied with ``overwrite``; a continuation's
    bias is copied in once."""
    ours = read_record(out / RUN_RECORD, record) is not None
    if not ours and (bias_files.newest_files(bias_dir) or any(folder.exists() for folder in folders)):
        if not overwrite:
            raise FileExistsError(
                f"{out} holds another walkers run (its bias would be loaded): continue it with continue_from, "
                "or overwrite it"
            )
        shutil.rmtree(bias_dir, ignore_errors=True)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    if not ours and continue_from is not None:
        copy_bias_files(Path(continue_from) / OUTPUTS["bias_dir"], bias_dir)
    bias_dir.mkdir(parents=True, exist_ok=True)
    write_record(out / RUN_RECORD, record)


def _start_of(start, continue_from, i: int) -> dict:
    """``positions=`` or ``state=`` for walker ``i``: its own start, else the continued run's state."""
    if start is not None:
        return {"state": str(start)} if isinstance(start, (str, Path)) else {"positions": np.asarray(start)}
    if continue_from is None:
        return {}
    own = Path(continue_from) / f"walker{i}" / OUTPUTS["state"]
    state = own if own.is_file() else Path(continue_from) / OUTPUTS["state"]
    if not state.is_file():
        raise FileNotFoundError(f"cannot continue from {continue_from}: no {OUTPUTS['state']} for walker {i}")
    return {"state": str(state)}


def _follow(futures, folders, progress: bool) -> None:
    """Until every walker is done: a line per walker whenever its checkpoint moves (ns, transitions)."""
    seen: dict[int, tuple] = {}
    while not all(future.done() for future in futures):
        time.sleep(POLL_S)
        for i, folder in enumerate(folders):
            try:
                record = json.loads((folder / CHECKPOINT).read_text())
            except (OSError, ValueError):
                continue
            line = (record["segments"], record["restarts"])
            if progress and seen.get(i) != line:
                seen[i] = line
                done = record["progress"]
                crossings = "" if done["transitions"] is None else f", {done['transitions']} transitions"
                again = f", restarted {record['restarts']}x" if record["restarts"] else ""
                say(f"walker {i}: {done['ns_done']:.2f}/{done['ns_total']:.2f} ns{crossings}{again}")


def pool_walkers(results, variables, out: Path, bias_dir: Path) -> MetadynamicsResult:
    """The walkers' frames as one run (see the module): pooled files in ``out``, arrays walker after
    walker, ``observables["walker"]`` the walker of each frame."""
    files = {key: out / name for key, name in OUTPUTS.items()}
    shutil.copy2(results[0].files["topology"], files["topology"])
    join_dcd(
        [r.files["trajectory"] for r in results],
        files["trajectory"],
        files["topology"],
        results[0].timestep_ps,
        results[0].settings["interval"],
    )
    walker = np.concatenate([np.full(r.time_ps.size, i) for i, r in enumerate(results)])
    names = results[0].settings["cv_names"]
    observables = {name: np.concatenate([r.observables[name] for r in results]) for name in results[0].observables}
    columns = {
        "time": np.concatenate([r.time_ps for r in results]),
        **{name: np.concatenate([r.cvs[:, k] for r in results]) for k, name in enumerate(names)},
        "bias": np.concatenate([r.bias_kjmol for r in results]),
        **observables,
        "walker": walker,
    }
    with open(files["colvar"], "w") as handle:
        handle.write("#! FIELDS " + " ".join(columns) + "\n")
        np.savetxt(handle, np.column_stack(list(columns.values())), fmt="%.8g")
    log_w = np.concatenate([r.log_weights for r in results])
    np.save(files["log_weights"], log_w)
    if variables:
        shape = tuple(v.gridWidth for v in reversed(variables))
        bias = np.ascontiguousarray(bias_files.shared_bias(bias_dir, shape).transpose())
        axes = {f"axis_{i}": a for i, a in enumerate(grid_axes(variables))}
        np.savez(files["bias"], bias_kjmol=bias, names=np.array(names), **axes)
        fes = fes_from_bias(bias, results[0].settings["bias_factor"])
        np.savez(files["fes"], free_energy_kjmol=fes, names=np.array(names), **axes)
    steps = sum(r.steps for r in results)
    wall = max(r.wall_time_s for r in results)
    pooled = MetadynamicsResult(
        out=out,
        files=files,
        steps=steps,
        timestep_ps=results[0].timestep_ps,
        wall_time_s=wall,
        ns_per_day=steps * results[0].timestep_ps / 1000.0 / (wall / 86400.0),
        platform=results[0].platform,
        time_ps=columns["time"],
        cvs=np.stack([columns[n] for n in names], 1) if names else np.empty((walker.size, 0)),
        bias_kjmol=columns["bias"],
        log_weights=log_w,
        observables=dict(observables, walker=walker),
        settings=dict(results[0].settings, walkers=len(results), variables=variable_signature(variables)),
    )
    np.save(files["weights"], pooled.weights)
    summaries = [dict(r.summary(), restarts=_restarts(r)) for r in results]
    write_json(
        out / "walkers.json", dict(settings=plain_json(pooled.settings), results=pooled.summary(), walkers=summaries)
    )
    return pooled


def _restarts(result: MetadynamicsResult) -> int:
    return int(json.loads(result.files["settings"].read_text())["results"].get("restarts", 0))


def run_independent(system, n_runs: int, out, client, seed: int = 0, platform: str | None = None, **settings) -> list:
    """``n_runs`` independent unbiased runs (:func:`~openflow.plugins.openmm.md.simulate`, seeds
    ``seed + i``, folders ``out/run<i>``) as Dask tasks on ``client``; their results in order."""
    n_runs = positive_integer(n_runs, "runs")
    platform = select_platform(platform, system.system, system.positions, task="md").getName()
    futures = [
        client.submit(
            simulate,
            system,
            out=Path(out) / f"run{i}",
            **dict(settings, seed=seed + i, platform=platform, progress=False, reuse=True),
            pure=False,
            key=f"run{i}-{os.urandom(4).hex()}",
        )
        for i in range(n_runs)
    ]
    return client.gather(futures)
