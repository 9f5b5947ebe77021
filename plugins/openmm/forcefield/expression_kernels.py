"""CPU kernels (numba) generated from Lepton expression trees: the custom forces, ``CustomGBForce`` included.

``expression_kernel`` writes the kernel of one expression summed over a force's terms,
``gb_kernel`` that of a ``CustomGBForce`` (computed values in order, energy terms, then the
gradient backwards through them, as OpenMM's reference implementation does). Both follow the
kernel contract of ``kernels`` (signature, layout, float64 inside) and its ``BLOCK`` loop. The
trees come from ``lepton`` with distances, angles and dihedrals already rewritten in Cartesian
coordinates (``lepton.in_coordinates``); the derivatives are symbolic (``lepton.derivative``),
shared subexpressions are computed once and integer powers are written as products.

Side effects, on purpose: each kernel is written as a Python module into ``cache_folder()`` (so
that numba caches its machine code on disk beside it and a later process loads it instead of
compiling), imported into ``sys.modules`` under an ``openflow_kernel_...`` name, and kept per
process; where that folder cannot be written it is compiled in memory only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from numba import njit

from openflow.io import atomic_path

from . import kernels
from .lepton import ELEMENTARY, coordinate_leaves, derivative

_CODE = {  # Lepton function -> Python code (numba), given its arguments' code
    **{name: f"math.{name}({{0}})" for name in ELEMENTARY},
    "floor": "np.floor({0})",  # a float, as Lepton's (math.floor gives an integer)
    "ceil": "np.ceil({0})",
    "atan2": "math.atan2({0}, {1})",
    "sec": "(1.0 / math.cos({0}))",
    "csc": "(1.0 / math.sin({0}))",
    "cot": "(1.0 / math.tan({0}))",
    "step": "(1.0 if {0} >= 0.0 else 0.0)",
    "delta": "(1.0 if {0} == 0.0 else 0.0)",
    "square": "({0} * {0})",
    "cube": "({0} * {0} * {0})",
    "recip": "(1.0 / {0})",
    "min": "min({0}, {1})",
    "max": "max({0}, {1})",
    "abs": "abs({0})",
    "select": "({1} if {0} != 0.0 else {2})",
}
_KERNEL = """
def kernel(positions, gradient, energy, with_gradient, start, stop, particles, values):
    n = positions.shape[1]
    for b0 in range(start, stop, BLOCK):
        nb = min(stop - b0, BLOCK)
        p, g, e = np.empty(({n_axes}, n, nb)), np.zeros(({n_gradient_axes}, n, nb)), np.zeros(nb)
        d = np.empty(({n_slopes}, nb))
{copy}
        for m in range(particles.shape[0]):
{per_term}
            if with_gradient:
                for b in range(nb):
{per_configuration}
{gradient}
            else:
                for b in range(nb):
{energy_only}
        for b in range(nb):
            energy[b0 + b] += e[b]
        if with_gradient:
{store}
"""
_ROWS = """for a in range(n):
    for b in range(nb):
        {0}"""
_generated: dict = {}  # kernel inputs -> compiled kernel, in this process
_PRELUDE = (
    "import math\n\nimport numpy as np\n\n"
    "from openflow.plugins.openmm.forcefield.kernels import BLOCK, copy_block, store_block\n"
)
# a changed helper (kernels.py) or template (here) makes new kernel files, never stale machine code
_VERSION = hashlib.sha256(Path(kernels.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:12]


def cache_folder() -> Path:
    """Where generated kernels are written as modules, for numba to cache their machine code beside
    them: ``$OPENFLOW_CACHE_DIR/kernels``, by default ``~/.cache/openflow/kernels``."""
    return Path(os.environ.get("OPENFLOW_CACHE_DIR") or Path.home() / ".cache" / "openflow") / "kernels"


def _compiled(source: str):
    """``kernel`` of ``source``, jitted. Written (atomically) as a module in ``cache_folder()`` so that
    numba caches its machine code on disk: a later process loads it instead of compiling; compiled
    in memory only where that folder cannot be written."""
    text = _PRELUDE + source
    name = f"kernel_{hashlib.sha256(text.encode()).hexdigest()[:20]}_{_VERSION}"
    path = cache_folder() / f"{name}.py"
    try:
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_text(text)
        spec = importlib.util.spec_from_file_location(f"openflow_{name}", path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # numba's cache imports it by name
        spec.loader.exec_module(module)
        return njit(**kernels.JIT_OPTIONS)(module.kernel)
    except (OSError, RuntimeError):  # RuntimeError: numba finds no writable place for its cache
        namespace = {}
        exec(compile(text, "<openflow generated kernel>", "exec"), namespace)  # noqa: S102 - generated here
        return njit(**dict(kernels.JIT_OPTIONS, cache=False))(namespace["kernel"])


def expression_kernel(energy: tuple, slopes: list, n_particles: int, columns: list):
    """A kernel (the signature of ``kernels``; parameters ``particles`` ``(M, n_particles)`` int64 and ``values``
    ``(M, len(columns))``) of the sum over terms ``m`` of one expression.

    ``energy`` and ``slopes`` are Lepton trees (``lepton``) whose leaves are numbers, the variables
    named in ``columns`` (read from ``values[m]``) and ``("coordinate", axis, slot)`` (component
    ``axis`` of atom ``particles[m, slot]``); ``slopes`` lists ``(axis, slot, dE/dcoordinate)``.
    Common subexpressions are computed once. Generated and compiled once per process and input.
    """
    key = (energy, tuple(slopes), n_particles, tuple(columns))
    if key not in _generated:
        _generated[key] = _compiled(_source(*key))
    return _generated[key]


class _Code:
    """Straight-line code for Lepton trees: one line ``{prefix}{k} = ...`` per distinct subtree (shared
    subtrees computed once), appended to ``lines``; ``symbols`` gives the code of the leaves
    (variables and coordinates), numbers are literals."""

    def __init__(self, symbols: dict, prefix: str = "t"):
        self.symbols, self.prefix, self.lines, self.names = symbols, prefix, [], {}

    def __call__(self, node: tuple) -> str:
        if node in self.names:
            return self.names[node]
        kind = node[0]
        if kind == "number":
            return repr(float(node[1]))
        if kind in ("variable", "coordinate"):
            text = self.symbols[node]
        elif kind == "negate":
            text = f"(-{self(node[1])})"
        elif kind == "call":
            text = _CODE[node[1]].format(*map(self, node[2]))
        elif kind == "^" and node[2][0] == "number" and node[2][1] == int(node[2][1]) and 1 <= abs(node[2][1]) <= 16:
            text = self._power(self(node[1]), int(node[2][1]))
        else:
            text = f"({self(node[1])} {'**' if kind == '^' else kind} {self(node[2])})"
        return self._line(node, text)

    def _line(self, node, text: str) -> str:
        name = f"{self.prefix}{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        if node is not None:
            self.names[node] = name
        return name

    def _power(self, base: str, n: int) -> str:
        """``base ** n`` for integer ``1 <= |n| <= 16`` by repeated squaring (a vectorisable product, not ``pow``)."""
        factors, square, k = [], base, abs(n)
        while k:
            if k & 1:
                factors.append(square)
            k >>= 1
            if k:
                square = self._line(None, f"{square} * {square}")
        product = " * ".join(factors)
        return f"({product})" if n > 0 else f"(1.0 / ({product}))"


def _source(energy: tuple, slopes: tuple, n_particles: int, columns: tuple) -> str:
    """Python source of ``expression_kernel``'s kernel."""
    axes = sorted({node[1] for node in coordinate_leaves(energy)})
    gradient_axes = sorted({axis for axis, _, _ in slopes})
    symbols = {("variable", name): f"v{c}" for c, name in enumerate(columns)}
    symbols.update({leaf: f"p[{axes.index(leaf[1])}, a{leaf[2]}, b]" for leaf in coordinate_leaves(energy)})
    code = _Code(symbols)
    result = code(energy)
    energy_lines = [*code.lines, f"e[b] += {result}"]
    stores = [f"d[{s}, b] = {code(slope)}" for s, (_, _, slope) in enumerate(slopes)]
    per_term = [f"a{slot} = particles[m, {slot}]" for slot in range(n_particles)]
    per_term += [f"v{c} = values[m, {c}]" for c in range(len(columns))]
    adds = [f"g[{gradient_axes.index(axis)}, a{slot}, b] += d[{s}, b]" for s, (axis, slot, _) in enumerate(slopes)]
    copy = [_ROWS.format(f"p[{row}, a, b] = positions[{axis}, a, b0 + b]") for row, axis in enumerate(axes)]
    store = [_ROWS.format(f"gradient[{axis}, a, b0 + b] += g[{row}, a, b]") for row, axis in enumerate(gradient_axes)]
    return _KERNEL.format(
        n_slopes=len(slopes),
        n_axes=len(axes),
        n_gradient_axes=len(gradient_axes),
        copy=_indent(copy, 8),
        store=_indent(store, 12),
        per_term=_indent(per_term, 12),
        per_configuration=_indent([*code.lines, f"e[b] += {result}", *stores], 20),
        gradient=_indent(["for b in range(nb):", *("    " + a for a in adds)] if adds else [], 16),
        energy_only=_indent(energy_lines, 20),
    )


_GB_KERNEL = """
def kernel(positions, gradient, energy, with_gradient, start, stop, pairs_kept, pairs_all, params, constants):
    n = positions.shape[1]
    for b0 in range(start, stop, BLOCK):
        nb, p, g, e = copy_block(positions, b0, stop)
        val, adj = np.zeros(({n_values}, n, nb)), np.zeros(({n_values}, n, nb))  # computed values, dE/dvalue
{forward}
        if with_gradient:
{backward}
        store_block(gradient, energy, b0, g, e, with_gradient)
"""
_PAIR_LOOP = """for m in range({pairs}.shape[0]):
    i, j = {pairs}[m, 0], {pairs}[m, 1]
    for b in range(nb):
"""
_SINGLE_LOOP = """for a in range(n):
    for b in range(nb):
"""


def gb_kernel(values: tuple, energies: tuple):
    """The kernel of a ``CustomGBForce`` (parameters ``pairs_kept``, ``pairs_all`` ``(P, 2)`` with
    ``i < j``, ``params`` ``(N, q)``, ``constants`` ``(c,)``): the computed values in order, the energy
    terms, and, backwards through them, the gradient.

    ``values`` and ``energies`` list ``(kind, tree, roles)``: kind ``"single"``, ``"pair"`` (excluded
    pairs left out) or ``"pair_all"``; the tree in coordinate leaves (slot 0: the particle itself or
    particle 1 of a pair, slot 1: particle 2); ``roles`` the pairs ``(variable, (what, index, side))``,
    what ``"param"``, ``"value"`` or ``"constant"``, side 0 or 1 (particle 1 or 2). A pair value of
    particle i sums its expression over j with i as particle 1; pair energies sum over ``i < j``.
    """
    key = (values, energies)
    if key not in _generated:
        _generated[key] = _compiled(_gb_source(values, energies))
    return _generated[key]


def _gb_symbols(tree: tuple, roles: tuple, atoms: tuple) -> dict:
    """Code of the leaves of a CustomGB tree for particles ``atoms`` (their loop variables)."""
    symbols = {leaf: f"p[{leaf[1]}, {atoms[leaf[2]]}, b]" for leaf in coordinate_leaves(tree)}
    for name, (what, index, side) in roles:
        symbols[("variable", name)] = {
            "param": f"params[{atoms[side]}, {index}]",
            "value": f"val[{index}, {atoms[side]}, b]",
            "constant": f"constants[{index}]",
        }[what]
    return symbols


def _gb_lines(
    tree: tuple, roles: tuple, atoms: tuple, prefix: str, use: str | None = None, scale: str | None = None
) -> list:
    """Lines computing ``tree`` for particles ``atoms``: ``use`` (a template of its value ``{}``), or,
    with ``scale`` (the code of dE/d(tree)), adding its derivatives into ``adj`` and ``g``."""
    code = _Code(_gb_symbols(tree, roles, atoms), prefix)
    if scale is None:
        value = code(tree)
        return [*code.lines, use.format(value)]
    targets = sorted(coordinate_leaves(tree)) + [("variable", name) for name, (what, _, _) in roles if what == "value"]
    for target in targets:
        slope = derivative(tree, target)
        if slope is not None:
            if target[0] == "coordinate":
                destination = f"g[{target[1]}, {atoms[target[2]]}, b]"
            else:
                _, index, side = dict(roles)[target[1]]
                destination = f"adj[{index}, {atoms[side]}, b]"
            code.lines.append(f"{destination} += {scale} * {code(slope)}")
    return code.lines


def _gb_loop(kind: str, body: list) -> str:
    """``body`` inside the loop over the configurations of every particle (single) or pair."""
    loop = (
        _SINGLE_LOOP if kind == "single" else _PAIR_LOOP.format(pairs="pairs_kept" if kind == "pair" else "pairs_all")
    )
    return loop + "\n".join(" " * 8 + line for line in body or ["pass"])


def _gb_source(values: tuple, energies: tuple) -> str:
    """Python source of ``gb_kernel``'s kernel."""
    forward, backward = [], []
    for k, (kind, tree, roles) in enumerate(values):
        directions = [("a",)] if kind == "single" else [("i", "j"), ("j", "i")]  # a pair value: both particles' sums
        store = "=" if kind == "single" else "+="
        forward.append(
            _gb_loop(
                kind,
                [
                    line
                    for d, atoms in enumerate(directions)
                    for line in _gb_lines(tree, roles, atoms, f"v{k}_{d}_", f"val[{k}, {atoms[0]}, b] {store} {{}}")
                ],
            )
        )
        backward.insert(
            0,
            _gb_loop(
                kind,
                [
                    line
                    for d, atoms in enumerate(directions)
                    for line in (
                        f"s{k}_{d} = adj[{k}, {atoms[0]}, b]",
                        *_gb_lines(tree, roles, atoms, f"w{k}_{d}_", scale=f"s{k}_{d}"),
                    )
                ],
            ),
        )
    for t, (kind, tree, roles) in enumerate(energies):
        atoms = ("a",) if kind == "single" else ("i", "j")
        forward.append(_gb_loop(kind, _gb_lines(tree, roles, atoms, f"e{t}_", "e[b] += {}")))
        backward.insert(0, _gb_loop(kind, _gb_lines(tree, roles, atoms, f"f{t}_", scale="1.0")))
    return _GB_KERNEL.format(n_values=max(len(values), 1), forward=_indent(forward, 8), backward=_indent(backward, 12))


def _indent(blocks: list, spaces: int) -> str:
    """Lines of code (each may hold several) indented by ``spaces``; ``pass`` if there are none."""
    return "\n".join(" " * spaces + line for block in blocks or ["pass"] for line in block.split("\n"))
