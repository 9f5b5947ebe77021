"""One ``Trainer`` for every objective: likelihood on data, energy-based (reverse KL), flow matching.

The loss is a closure ``loss_fn(model, batch) -> loss`` or ``(loss, {name: scalar})``; ``batch``
is ``None`` in energy-based training. The trainer owns the device, optimizer, learning-rate
schedule, gradient clipping, skipping of non-finite steps, the progress bar, the metrics log
(``out/metrics.jsonl``) and checkpoints (``out/checkpoint.pt``) from which a run resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from openflow.io import differences, say
from openflow.io import progress as progress_bar

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "config", "step", "n_skipped", "rng", "data")


def _lbfgs(params, lr: float, weight_decay: float) -> torch.optim.LBFGS:
    """One L-BFGS iteration (with a strong-Wolfe line search) per Trainer step: for deterministic
    objectives, e.g. a fixed moment-matched batch or full-batch maximum likelihood."""
    if weight_decay:
        raise ValueError("weight_decay is not supported with optimizer='lbfgs'")
    return torch.optim.LBFGS(
        params,
        lr=lr,
        max_iter=1,
        max_eval=25,
        history_size=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )


_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "lbfgs": _lbfgs}
_SCHEDULES = ("none", "cosine", "step")


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; otherwise the named device (``"cpu"``, ``"cuda:1"``).

    Asking explicitly for CUDA without a usable GPU is a ``ValueError`` (only ``"auto"`` falls back).
    """
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but torch has no usable CUDA device here; use 'auto' (CUDA when "
                "present, else the CPU) or 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :class:`Trainer` (tensors, numbers and strings only).

    An empty, truncated or foreign file is a ``ValueError`` naming it (never a pickle traceback).
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises EOFError, RuntimeError, UnpicklingError, OSError, ... for a bad file
        why = (str(error) or "empty").splitlines()[0][:120]
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {why}); delete it to train that stage again"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Trainer checkpoint; delete it to train that stage again")
    return state


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        warnings.warn("the checkpoint's CUDA RNG states do not match the devices present; not restored", stacklevel=3)
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def _to_device(obj, device: torch.device):
    """Move the tensors of a batch (a tensor, or tuples/lists/dicts of them) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(item, device) for item in obj)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    return obj


class _TensorBatches:
    """Minibatches of rows drawn without replacement, reshuffled every epoch (last partial batch
    dropped). ``data``: a tensor ``(N, ...)`` or a tuple of tensors sharing ``N`` (batches are
    then tuples). The permutation comes from a private CPU generator; its state at the start of
    the epoch plus the position inside it make the exact-resume state."""

    def __init__(self, data, batch_size: int, seed: int, device: torch.device):
        tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("data must be a tensor, a tuple of tensors, an iterable loader or None")
        self.n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
        if any(t.dim() == 0 or t.shape[0] != self.n for t in tensors):
            raise ValueError(f"data tensors must share their first dimension, got {[tuple(t.shape) for t in tensors]}")
        if batch_size > self.n:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.n} data samples")
        self.single = isinstance(data, torch.Tensor)
        self.tensors = tuple(t.to(device) for t in tensors)
        self.batch_size = batch_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_rng: torch.Tensor | None = None
        self.perm: torch.Tensor | None = None
        self.cursor = 0

    def _new_epoch(self) -> None:
        self.epoch_rng = self.generator.get_state()
        self.perm = torch.randperm(self.n, generator=self.generator).to(self.device)
        self.cursor = 0

    def next(self):
        if self.perm is None or self.cursor + self.batch_size > self.n:
            self._new_epoch()
        index = self.perm[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        batch = tuple(t[index] for t in self.tensors)
        return batch[0] if self.single else batch

    def state_dict(self) -> dict:
        return {"epoch_rng": self.epoch_rng, "cursor": self.cursor, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["epoch_rng"] is None:
            self.perm, self.cursor = None, 0
        else:
            self.generator.set_state(state["epoch_rng"])
            self._new_epoch()
            self.cursor = state["cursor"]
        self.generator.set_state(state["generator"])


class _LoaderBatches:
    """Endless batches from an iterable (e.g. a ``DataLoader``), restarted at each exhaustion.

    For exact resume, the global torch RNG state (and the loader's ``generator``, if any) is
    recorded at each epoch start; resuming replays that epoch's start and skips the batches
    already used. This is exact whenever the shuffling draws from those generators."""

    def __init__(self, loader: Iterable, device: torch.device):
        self.loader = loader
        self.device = device
        self.iterator = None
        self.epoch_rng: dict | None = None
        self.cursor = 0

    def _loader_generator(self) -> torch.Generator | None:
        generator = getattr(self.loader, "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def _new_epoch(self) -> None:
        generator = self._loader_generator()
        self.epoch_rng = {
            "torch": torch.get_rng_state(),
            "loader": generator.get_state() if generator is not None else None,
        }
        self.iterator = iter(self.loader)
        self.cursor = 0

    def _draw(self):
        batch = next(self.iterator)
        self.cursor += 1
        return batch

    def next(self):
        if self.iterator is None:
            self._new_epoch()
        try:
            batch = self._draw()
        except StopIteration:
            self._new_epoch()
            try:
                batch = self._draw()
            except StopIteration:
                raise ValueError("the data loader yields no batches") from None
        return _to_device(batch, self.device)

    def state_dict(self) -> dict:
        return {"epoch_rng": self.epoch_rng, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        """Replay to the saved position; the caller restores the global RNG state afterwards."""
        if state["epoch_rng"] is None:
            self.iterator, self.cursor = None, 0
            return
        torch.set_rng_state(state["epoch_rng"]["torch"])
        generator = self._loader_generator()
        if generator is not None and state["epoch_rng"]["loader"] is not None:
            generator.set_state(state["epoch_rng"]["loader"])
        self._new_epoch()
        for _ in range(state["cursor"]):
            self._draw()


def _canonical(config) -> str:
    """A run config as canonical JSON (tuples and lists alike, keys sorted), for comparisons."""
    return json.dumps(config, sort_keys=True, default=str)


def _check_positive(name: str, value, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = (int, np.integer) if integer else (int, float, np.number)
    if isinstance(value, bool) or not isinstance(value, kind) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")


def _json_value(value):
    """A metric as a JSON-safe Python scalar (non-finite floats become ``None``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics must be scalars, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"metrics must be numbers, bools or strings, got {type(value).__name__}")
    return value


class Trainer:
    """Train ``model`` by minimising ``loss_fn(model, batch)``.

    data: ``None`` (energy-based: ``batch is None``), a tensor ``(N, ...)`` or tuple of tensors
        (shuffled into minibatches of ``batch_size`` every epoch, moved to the device once), or
        an iterable such as a ``DataLoader`` (batches moved to the device, restarted when spent).
    optimizer: ``"adam"`` or ``"adamw"`` with ``lr`` and ``weight_decay``, or ``"lbfgs"`` (one iteration
        with a strong-Wolfe line search per step; for deterministic losses, e.g. full-batch).
    schedule: ``"none"``, ``"cosine"`` (to ``min_lr`` over ``total_steps``) or ``"step"``
        (multiply by ``gamma`` every ``step_size`` steps).
    grad_clip: maximal global gradient norm, or ``None``.
    device: ``"auto"`` (CUDA when present), or a name; the model is moved there.
    seed: seeds ``random``, NumPy, torch (:func:`set_seed`) and the data shuffling.
    out_dir: where ``metrics.jsonl`` and ``checkpoint.pt`` go (``None``: nothing is written).
    checkpoint_every: steps between checkpoints (one is also written at the end of ``fit``).
    log_every: steps between metric records.
    progress: a progress bar (``openflow.io.progress``; ``None``: only on a terminal).
    config: JSON-serialisable description of the run, stored in every checkpoint.

    A step whose loss or gradient norm is not finite leaves parameters, optimizer and schedule
    untouched; it still counts as a step and is recorded with ``"skipped": True``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable,
        data=None,
        *,
        batch_size: int = 256,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "none",
        total_steps: int | None = None,
        step_size: int = 1000,
        gamma: float = 0.5,
        min_lr: float = 0.0,
        grad_clip: float | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1000,
        log_every: int = 1,
        progress: bool | None = None,
        config: dict | None = None,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        optimizer, schedule = str(optimizer).lower(), str(schedule).lower()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {list(_SCHEDULES)}, got {schedule!r}")
        for name, value, integer, allow_none in (
            ("batch_size", batch_size, True, False),
            ("lr", lr, False, False),
            ("total_steps", total_steps, True, schedule != "cosine"),
            ("step_size", step_size, True, False),
            ("gamma", gamma, False, False),
            ("grad_clip", grad_clip, False, True),
            ("checkpoint_every", checkpoint_every, True, False),
            ("log_every", log_every, True, False),
        ):
            _check_positive(name, value, integer, allow_none)
        if not (weight_decay >= 0 and min_lr >= 0):
            raise ValueError(f"weight_decay and min_lr must be >= 0, got {weight_decay}, {min_lr}")
        try:
            json.dumps(config)
        except (TypeError, ValueError) as err:
            raise TypeError(f"config must be JSON-serialisable: {err}") from None

        set_seed(seed)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = _OPTIMIZERS[optimizer](self.params, lr=lr, weight_decay=weight_decay)
        if schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, total_steps, eta_min=min_lr)
        elif schedule == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size, gamma)
        else:
            self.scheduler = None
        if data is None:
            self.batches = None
        elif isinstance(data, (torch.Tensor, tuple, list)):
            self.batches = _TensorBatches(data, int(batch_size), seed, self.device)
        elif isinstance(data, Iterable):
            self.batches = _LoaderBatches(data, self.device)
        else:
            raise TypeError(
                f"data must be None, a tensor, a tuple of tensors or an iterable, got {type(data).__name__}"
            )

        self.grad_clip = float(grad_clip) if grad_clip is not None else math.inf
        self.checkpoint_every = int(checkpoint_every)
        self.log_every = int(log_every)
        self.progress = progress
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.settings = {
            "optimizer": optimizer,
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "schedule": schedule,
            "total_steps": total_steps,
            "step_size": int(step_size),
            "gamma": float(gamma),
            "min_lr": float(min_lr),
            "grad_clip": grad_clip,
            "batch_size": int(batch_size),
            "seed": int(seed),
            "device": str(self.device),
            "data": type(data).__name__,
        }
        self.config = config
        self.step = 0
        self.n_skipped = 0
        self.history: list[dict] = []
        self._saved_step: int | None = None

    # ------------------------------------------------------------------ files
    @property
    def checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir is not None else None

    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / "metrics.jsonl" if self.out_dir is not None else None

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write model, optimizer, scheduler, config, step and all RNG states atomically."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: give one or construct the Trainer with out_dir")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "config": {"trainer": self.settings, "run": self.config},
            "step": self.step,
            "n_skipped": self.n_skipped,
            "rng": _rng_state(),
            "data": self.batches.state_dict() if self.batches is not None else None,
        }
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._saved_step = self.step
        return path

    def resume(self, path: str | os.PathLike | None = None) -> Trainer:
        """Load a checkpoint (default ``out_dir/checkpoint.pt``) and continue exactly from it.

        The metrics history is reloaded from ``metrics.jsonl`` up to the checkpoint's step.
        """
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.exists():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        return self._restore(load_checkpoint(path), path)

    def _why_not_resume(self, state: dict, steps: int) -> str | None:
        """Why a loaded checkpoint cannot be continued towards ``steps`` (None when it can)."""
        config = state.get("config", {})
        changed = differences(config.get("run"), self.config)
        saved = config.get("trainer", {})
        changed += differences(
            {k: v for k, v in saved.items() if k != "device"},
            {k: v for k, v in self.settings.items() if k != "device"},
            "trainer.",
        )
        if changed:
            return (
                "it was written with other settings ("
                + "; ".join(changed[:3])
                + (", ..." if len(changed) > 3 else "")
                + ")"
            )
        if int(state.get("step", 0)) > steps:
            return f"it holds {int(state['step'])} steps, more than the {steps} asked for"
        return None

    def _restore(self, state: dict, path: Path) -> Trainer:
        """Continue from a loaded checkpoint ``state`` (read from ``path``)."""
        missing = [key for key in CHECKPOINT_KEYS if key not in state]
        if missing:
            raise ValueError(f"{path} is not a Trainer checkpoint (missing {missing})")
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("the checkpoint and this Trainer disagree on whether a schedule is used")
        if (state["data"] is None) != (self.batches is None):
            raise ValueError("the checkpoint and this Trainer disagree on whether data batches are used")
        saved = state["config"]["trainer"]
        changed = sorted(k for k in self.settings if k != "device" and saved.get(k) != self.settings[k])
        if changed:
            warnings.warn(
                f"resuming with changed settings {changed}; the checkpoint's optimizer "
                "state (including lr) is restored",
                stacklevel=2,
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.n_skipped = int(state["step"]), int(state["n_skipped"])
        if self.batches is not None:
            self.batches.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.history = self._read_metrics(up_to=self.step)
        self._saved_step = self.step
        return self

    def _read_metrics(self, up_to: int) -> list[dict]:
        if self.metrics_path is None or not self.metrics_path.exists():
            return []
        with open(self.metrics_path) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        return [record for record in records if record["step"] <= up_to]

    def _rewrite_metrics(self) -> None:
        """Make ``metrics.jsonl`` hold exactly ``self.history`` (drops lines of a crashed run)."""
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        with open(tmp, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.history)
        os.replace(tmp, self.metrics_path)

    # --------------------------------------------------------------- training
    def _train_step(self) -> dict:
        start = time.perf_counter()
        batch = self.batches.next() if self.batches is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss_fn(self.model, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(metrics, dict):
            raise TypeError(f"loss_fn must return loss or (loss, dict of metrics), got {type(metrics).__name__}")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor (or (loss, metrics)), got {loss!r}")
        if not loss.requires_grad:
            raise TypeError("the loss does not require grad: it is not connected to the model parameters")
        lr = self.optimizer.param_groups[0]["lr"]
        loss_value = loss.item()
        grad_norm = math.nan
        ok = math.isfinite(loss_value)
        if ok:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
            ok = math.isfinite(grad_norm)
        if ok:
            if isinstance(self.optimizer, torch.optim.LBFGS):
                evaluated = [loss]  # L-BFGS opens with the loss and gradient just computed

                def closure():
                    return evaluated.pop() if evaluated else self._reevaluate(batch)

                self.optimizer.step(closure)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.n_skipped += 1
        self.step += 1
        record = {
            "step": self.step,
            "loss": loss_value,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": not ok,
            "n_skipped": self.n_skipped,
            "step_time_s": time.perf_counter() - start,
        }
        clash = sorted(set(record) & set(metrics))
        if clash:
            raise ValueError(f"metric names {clash} are reserved by the Trainer")
        record.update(metrics)
        return {key: _json_value(value) for key, value in record.items()}

    def _reevaluate(self, batch) -> torch.Tensor:
        """Loss and gradient on the same batch, for optimizers that evaluate several times a step."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss_fn(self.model, batch)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss

    def fit(self, steps: int, resume: bool = False) -> list[dict]:
        """Train until ``self.step == steps`` (the total, counting steps done before a resume).

        ``resume=True`` first loads ``out_dir/checkpoint.pt`` when it exists (else starts fresh),
        so the same script can be rerun after an interruption or extended with more ``steps``. A
        checkpoint written with another ``config`` or other trainer settings, or with more steps
        than ``steps``, is not resumed: one line on stderr says why, and training starts fresh (and
        overwrites it), so a changed run never continues from stale weights. ``config`` should
        therefore describe the run without its length. Returns the history: one dict per
        logged step (``step``, ``loss``, ``grad_norm``, ``lr``, ``skipped``, ``n_skipped``,
        ``step_time_s`` and the loss's own metrics; non-finite values as ``None``).
        """
        _check_positive("steps", steps, integer=True)
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            why = self._why_not_resume(state, steps)
            if why is None:
                self._restore(state, self.checkpoint_path)
            else:
                say(f"{self.checkpoint_path}: training from the start: {why}")
        elif resume and self.checkpoint_path is None:
            raise ValueError("resume=True needs an out_dir")
        if self.step >= steps and self._saved_step == self.step:
            return self.history  # a finished run: its files stay as they are
        if self.metrics_path is not None:
            self._rewrite_metrics()
        metrics_file = open(self.metrics_path, "a") if self.metrics_path is not None else None
        bar = progress_bar(steps, "training", self.progress, initial=min(self.step, steps))
        self.model.train()
        try:
            while self.step < steps:
                record = self._train_step()
                bar.update(1)
                if self.step % self.log_every == 0:
                    self.history.append(record)
                    bar.set_postfix(loss=record["loss"], refresh=False)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                if metrics_file is not None and self.step % self.checkpoint_every == 0:
                    metrics_file.flush()
                    self.save_checkpoint()
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        if self.checkpoint_path is not None and self._saved_step != self.step:
            self.save_checkpoint()
        return self.history


def interleaved_holdout(n_frames: int, fraction: float, block: int) -> np.ndarray:
    """Boolean mask ``(n_frames,)`` of held-out frames: whole blocks of ``block`` consecutive frames,
    evenly interleaved through the run (so held-out and training frames share the ensemble, which a
    biased run changes over time, while correlated neighbours rarely straddle the split)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    index = np.arange(n_frames) // block
    mask = (index * fraction) % 1.0 >= 1.0 - fraction - 1e-12
    if not 0 < mask.sum() < n_frames:
        raise ValueError(
            f"{n_frames} frames in blocks of {block} leave no held-out or no training frame: lower validation_block"
        )
    return mask


def fit_with_early_stopping(
    trainer: Trainer, validate: Callable[[], float], max_steps: int, eval_every: int, patience: int
) -> tuple[float, int]:
    """Train until ``max_steps`` or until ``patience`` evaluations in a row did not improve.

    Every ``eval_every`` steps the model is put in eval mode and ``validate()`` (e.g. a held-out NLL,
    lower is better) is measured; the best parameters are kept and restored at the end. Returns the
    best value and the step it was reached at. Raises ``RuntimeError`` when it was never finite.
    """
    model = trainer.model
    best, best_state, best_step, waited = float("inf"), None, 0, 0
    while trainer.step < max_steps and waited < patience:
        trainer.fit(min(trainer.step + eval_every, max_steps))
        model.eval()
        value = validate()
        if value < best:
            best, best_step, waited = value, trainer.step, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
    if best_state is None:
        raise RuntimeError(f"the validation loss was never finite in {trainer.step} training steps")
    model.load_state_dict(best_state)
    return best, best_step
