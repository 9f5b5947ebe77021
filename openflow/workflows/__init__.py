"""End-to-end workflows, one YAML file each, run with ``openflow run FILE --out DIR``.

A workflow file names its kind (``workflow: harmonic_chain``) and its settings; each kind is a
module here with ``DEFAULTS`` (a nested dict), optionally ``SIGNED`` (dotted names of numbers that
may take either sign) and ``FREE`` (dotted names its own ``check`` handles alone), optionally
``check(config)`` (its own rules) and ``run(config, out) -> metrics``.
The runner merges the file and the ``--set`` overrides over the defaults and checks the whole
result before any work starts (:func:`check_settings`: every setting has the type of its default,
numbers keep its sign), then writes the resolved config to ``DIR/config.yaml`` and the flat metrics
to ``DIR/metrics.json`` (both atomically). Every bad setting is a ``ValueError`` naming it.
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import time
from pathlib import Path

import yaml

from openflow.io import atomic_path, say, write_json

KINDS = ("harmonic_chain", "coulomb_cluster", "alanine_dipeptide", "metadynamics", "learned_cv")


def merge(defaults: dict, overrides: dict, where: str = "") -> dict:
    """Deep-merge ``overrides`` into a copy of ``defaults``; unknown keys are a ValueError."""
    merged = copy.deepcopy(defaults)
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"setting '{where.rstrip('.') or 'the file'}' must be a mapping, got {overrides!r}")
    for key, value in (overrides or {}).items():
        if key not in defaults:
            raise ValueError(f"unknown setting '{where}{key}'; known: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict) and defaults[key]:
            if not isinstance(value, dict):
                raise ValueError(f"setting '{where}{key}' must be a mapping, got {value!r}")
            merged[key] = merge(defaults[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(name: str, value, default, signed: bool) -> None:
    """One setting against its default: same type, and a positive (zero) default stays positive (non-negative)."""
    if default is None:
        if name.rsplit(".", 1)[-1] == "progress" and value not in (None, True, False):
            raise ValueError(f"{name} must be true, false or null (a bar on a terminal, lines in a log), got {value!r}")
        return  # other optional settings: the workflow checks them
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return
    if isinstance(default, (int, float)):
        integer = isinstance(default, int)
        noun = "integer" if integer else "number"
        sign = "" if signed or default < 0 else ("positive " if default > 0 else "non-negative ")
        wanted = f"a {sign}{noun}" if sign else f"{'an' if integer else 'a'} {noun}"
        if (
            not _number(value)
            or (integer and value != int(value))
            or (sign == "positive " and not value > 0)
            or (sign == "non-negative " and value < 0)
        ):
            raise ValueError(f"{name} must be {wanted}, got {value!r}")
        return
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if default and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in default):
            for item in value:
                if not (_number(item) and item == int(item) and item > 0):
                    raise ValueError(f"{name} must be a list of positive integers, got {value!r}")


def check_settings(config: dict, defaults: dict, signed=(), free=(), where: str = "") -> None:
    """Check every setting of ``config`` against ``defaults`` (see the module); ``signed``: dotted names
    of numbers that may take either sign; ``free``: dotted names left to the workflow's own check."""
    for key, default in defaults.items():
        name = f"{where}{key}"
        if name in free:
            continue
        if isinstance(default, dict) and default:
            check_settings(config[key], default, signed, free, f"{name}.")
        else:
            _check_value(name, config[key], default, name in signed)


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{at}: {problem}") from None


def load_config(path) -> tuple[str, dict]:
    """Read a workflow file: returns its kind and its settings (not yet merged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow file not found: {path}")
    config = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(config, dict) or "workflow" not in config:
        raise ValueError(f"{path}: a workflow file is a mapping with a 'workflow:' key ({', '.join(KINDS)})")
    kind = config.pop("workflow")
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown workflow {kind!r}; known: {', '.join(KINDS)}")
    return kind, config


def parse_overrides(items) -> dict:
    """``["mle.steps=50", "system.n=8"]`` -> ``{"mle": {"steps": 50}, "system": {"n": 8}}`` (values as YAML)."""
    overrides: dict = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE (dotted keys for nested settings), got {item!r}")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item}: {part} is given both as a value and as a mapping")
        node[leaf] = _yaml(value, f"--set {item}")
    return overrides


def resolve(path, overrides: dict | None = None) -> tuple[str, object, dict]:
    """The kind, module and checked, merged settings of the workflow file ``path`` with ``overrides``."""
    kind, settings = load_config(path)
    module = importlib.import_module(f"openflow.workflows.{kind}")
    config = merge(merge(module.DEFAULTS, settings), overrides or {})
    check_settings(config, module.DEFAULTS, getattr(module, "SIGNED", ()), getattr(module, "FREE", ()))
    if hasattr(module, "check"):
        module.check(config)
    return kind, module, config


def run(path, out, overrides: dict | None = None) -> dict:
    """Run the workflow file ``path`` into the folder ``out``; return the metrics.

    ``overrides``: nested settings applied over the file (``--set`` on the command line). Every
    setting is checked before any work starts.
    """
    kind, module, config = resolve(path, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"workflow": kind, **config}, sort_keys=False))
    if not sys.stderr.isatty():
        say(f"{kind}: started, writing into {out}")
    start = time.perf_counter()
    metrics = module.run(config, out)
    metrics["wall_time_s"] = time.perf_counter() - start
    write_json(out / "metrics.json", metrics)
    say(f"{kind}: done in {metrics['wall_time_s']:.0f} s; metrics in {out / 'metrics.json'}")
    return metrics
