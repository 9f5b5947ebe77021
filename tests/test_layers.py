"""The architecture holds: imports run one way (systems <- core <- plugins <- workflows <- cli), the core
never imports OpenMM, nothing imports another module's private names, and no workflow imports another.

Every ``import`` statement of every module is read from the source (function bodies included), so an
import hidden inside a function to dodge a cycle counts like any other.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "openflow": ROOT / "openflow",
    "openflow.systems": ROOT / "systems",
    "openflow.plugins": ROOT / "plugins",
    "openflow.benchmarks": ROOT / "benchmarks",
}
LAYERS = ["systems", "core", "plugins", "workflows", "cli"]  # each may import only itself and the layers before it


def modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the installed package."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(folder).parts):
                continue
            if package == "openflow" and path.relative_to(folder).parts[0] in ("systems", "plugins", "benchmarks"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> str:
    if module.startswith("openflow.systems"):
        return "systems"
    if module.startswith("openflow.plugins"):
        return "plugins"
    if module.startswith("openflow.workflows") or module.startswith("openflow.benchmarks"):
        return "workflows"
    if module == "openflow.cli":
        return "cli"
    return "core"


def imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` of every import statement, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], node.lineno))
    return found


ALL = modules()


def test_the_walk_sees_the_whole_package():
    assert {
        "openflow.nct",
        "openflow.plugins.openmm.md",
        "openflow.systems.base",
        "openflow.workflows.learned_cv",
        "openflow.cli",
        "openflow.plugins.openmm.forcefield",
    } <= set(ALL)


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_point_one_way(module):
    own = LAYERS.index(layer(module))
    problems = []
    for target, names, line in imports(module, ALL[module]):
        candidates = [f"{target}.{name}" for name in names if f"{target}.{name}" in ALL] or [target]
        for imported in candidates:
            if imported.startswith("openflow") and LAYERS.index(layer(imported)) > own:
                problems.append(f"line {line}: {layer(module)} imports {imported} ({layer(imported)})")
        top = target.split(".")[0]
        if layer(module) == "core" and top == "openmm":
            problems.append(f"line {line}: the core imports {target} (OpenMM belongs to systems/ and plugins/)")
        if target.startswith("openflow.workflows.") and module.startswith("openflow.workflows.") and target != module:
            problems.append(f"line {line}: workflow {module} imports workflow {target}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", sorted(ALL))
def test_no_private_names_cross_a_module(module):
    problems = []
    for target, names, line in imports(module, ALL[module]):
        private_module = [part for part in target.split(".") if part.startswith("_") and part != "__future__"]
        private_names = [name for name in names if name.startswith("_") and f"{target}.{name}" not in ALL]
        if (private_module or private_names) and target != module:
            problems.append(f"line {line}: from {target} import {', '.join(names)}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_backward_arrow(tmp_path):
    """The walk itself can fail: a core module importing a plugin, or a private name, is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from openflow.plugins.openmm.md import _hidden\n")
    found = imports("openflow.bad", bad)
    assert found == [("openflow.plugins.openmm.md", ["_hidden"], 2)]
    assert LAYERS.index(layer(found[0][0])) > LAYERS.index(layer("openflow.bad"))
