"""End-to-end workflows, one YAML file each, run with ``openflow run FILE --out DIR``.

A workflow file names its kind (``workflow: harmonic_chain``) and its settings; each kind is a
module here with ``DEFAULTS`` (a nested dict) and ``run(config, out) -> metrics``. The runner
merges the file over the defaults, writes the resolved config to ``DIR/config.yaml`` and the
flat metrics to ``DIR/metrics.json`` (both atomically).
"""
from __future__ import annotations

import copy
import importlib
import time
from pathlib import Path

import yaml

from openflow.io import atomic_path, write_json

KINDS = ("harmonic_chain", "coulomb_cluster", "alanine_dipeptide", "metadynamics", "quickstart")


def merge(defaults: dict, overrides: dict, where: str = "") -> dict:
    """Deep-merge ``overrides`` into a copy of ``defaults``; unknown keys are a ValueError."""
    merged = copy.deepcopy(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            raise ValueError(f"unknown setting '{where}{key}'; known: {', '.join(sorted(defaults))}")
        if isinstance(defaults[key], dict) and defaults[key]:
            if not isinstance(value, dict):
                raise ValueError(f"setting '{where}{key}' must be a mapping")
            merged[key] = merge(defaults[key], value, f"{where}{key}.")
        else:
            merged[key] = value
    return merged


def load_config(path) -> tuple[str, dict]:
    """Read a workflow file: returns its kind and its settings (not yet merged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow file not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
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
        node[leaf] = yaml.safe_load(value)
    return overrides


def run(path, out, overrides: dict | None = None) -> dict:
    """Run the workflow file ``path`` into the folder ``out``; return the metrics.

    ``overrides``: nested settings applied over the file (``--set`` on the command line).
    """
    kind, settings = load_config(path)
    module = importlib.import_module(f"openflow.workflows.{kind}")
    config = merge(merge(module.DEFAULTS, settings), overrides or {})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"workflow": kind, **config}, sort_keys=False))
    start = time.perf_counter()
    metrics = module.run(config, out)
    metrics["wall_time_s"] = time.perf_counter() - start
    write_json(out / "metrics.json", metrics)
    return metrics
