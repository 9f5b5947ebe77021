"""Lepton expressions (OpenMM's custom-force language): parsing, symbolic derivatives, evaluation.

``LeptonExpression(text)`` parses with Lepton's grammar and precedence (``;`` definitions included)
into a tree of tuple nodes; ``derivative`` differentiates it symbolically (the analytic forces of
custom forces); calling it evaluates on torch tensors, broadcasting like torch. Tree nodes:
``("number", v)``, ``("variable", name)``, ``("negate", a)``, ``(operator, a, b)`` with operator in
``+ - * / ^``, ``("call", name, args)``; geometry calls of a ``CustomCompoundBondForce``
(``distance``, ``angle``, ``dihedral``) hold particle numbers ``(1, 2, ...)`` as their args.
``in_coordinates`` rewrites a tree's geometry into ``("coordinate", axis, slot)`` leaves (the
compiled CPU kernels differentiate with respect to those); ``GEOMETRY_NODES`` builds those trees
with the formulas and sign conventions of ``openflow.geometry``. ``evaluate`` computes any tree.
"""

from __future__ import annotations

import math
import operator
import re

import torch

_PRECEDENCE = {"+": 0, "-": 0, "*": 1, "/": 1, "^": 3}  # as Lepton; unary minus binds at 2
_RIGHT_ASSOCIATIVE = {"^"}
_NEGATION_PRECEDENCE = 2
_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<function>[A-Za-z_][^\s+\-*/^(),]*)\("
    r"|(?P<name>[A-Za-z_][^\s+\-*/^(),]*)"
    r"|(?P<symbol>[-+*/^(),]))"
)
_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "^": operator.pow}
ELEMENTARY = ("sqrt", "exp", "log", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "erf", "erfc")
_FUNCTIONS = {  # name: (number of arguments, torch implementation)
    **{name: (1, getattr(torch, name)) for name in (*ELEMENTARY, "abs", "floor", "ceil")},
    "sec": (1, lambda a: 1.0 / torch.cos(a)),
    "csc": (1, lambda a: 1.0 / torch.sin(a)),
    "cot": (1, lambda a: 1.0 / torch.tan(a)),
    "atan2": (2, torch.atan2),
    "step": (1, lambda a: (a >= 0).to(a.dtype)),
    "delta": (1, lambda a: (a == 0).to(a.dtype)),
    "square": (1, lambda a: a * a),
    "cube": (1, lambda a: a * a * a),
    "recip": (1, lambda a: 1.0 / a),
    "min": (2, torch.minimum),
    "max": (2, torch.maximum),
    "select": (3, lambda c, a, b: torch.where(c != 0, a, b)),
}
# CustomCompoundBondForce geometry functions: their arguments name particles p1, p2, ...
_PARTICLE_FUNCTIONS = {"distance": 2, "angle": 3, "dihedral": 4}


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens, position, text = [], 0, text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"unexpected character {text[position:].strip()[:1]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _parse_tokens(tokens: list, position: int, definitions: dict, precedence: int) -> tuple[tuple, int]:
    """Lepton's precedence climbing: returns ``(node, next position)``.

    Nodes are tuples: ``("number", v)``, ``("variable", name)``, ``("negate", a)``,
    ``(operator, a, b)``, ``("call", name, args)``. A definition is substituted as the very same
    node object, so shared subexpressions are evaluated once (see ``_evaluate``).
    """
    if position == len(tokens):
        raise ValueError("unexpected end of expression")
    kind, text = tokens[position]
    position += 1
    if kind == "number":
        node = ("number", float(text))
    elif kind == "name":
        node = definitions.get(text, ("variable", text))
    elif kind == "symbol" and text == "(":
        node, position = _parse_tokens(tokens, position, definitions, 0)
        position = _expect(tokens, position, ")")
    elif kind == "function":
        args = []
        while True:
            arg, position = _parse_tokens(tokens, position, definitions, 0)
            args.append(arg)
            if position < len(tokens) and tokens[position] == ("symbol", ","):
                position += 1
                continue
            break
        position = _expect(tokens, position, ")")
        node = _call(text, args)
    elif kind == "symbol" and text == "-":
        operand, position = _parse_tokens(tokens, position, definitions, _NEGATION_PRECEDENCE)
        node = ("negate", operand)
    else:
        raise ValueError(f"unexpected token {text!r}")
    while position < len(tokens) and tokens[position][0] == "symbol" and tokens[position][1] in _PRECEDENCE:
        operator = tokens[position][1]
        if _PRECEDENCE[operator] < precedence:
            break
        next_precedence = _PRECEDENCE[operator] + (operator not in _RIGHT_ASSOCIATIVE)
        rhs, position = _parse_tokens(tokens, position + 1, definitions, next_precedence)
        node = (operator, node, rhs)
    return node, position


def _expect(tokens: list, position: int, symbol: str) -> int:
    if position == len(tokens) or tokens[position] != ("symbol", symbol):
        raise ValueError("unbalanced parentheses")
    return position + 1


def _call(name: str, args: list) -> tuple:
    if name in _PARTICLE_FUNCTIONS:
        if len(args) != _PARTICLE_FUNCTIONS[name] or any(
            a[0] != "variable" or not re.fullmatch(r"p\d+", a[1]) for a in args
        ):
            raise ValueError(f"{name}() takes {_PARTICLE_FUNCTIONS[name]} particle names p1, p2, ...")
        return ("call", name, tuple(int(a[1][1:]) for a in args))
    if name not in _FUNCTIONS:
        raise NotImplementedError(f"function {name}() (tabulated or unknown) has no torch translation")
    if len(args) != _FUNCTIONS[name][0]:
        raise ValueError(f"{name}() takes {_FUNCTIONS[name][0]} argument(s), got {len(args)}")
    return ("call", name, tuple(args))


class LeptonExpression:
    """A Lepton expression (OpenMM's custom-force language) evaluated on torch tensors.

    ``LeptonExpression("0.5*k*(r-r0)^2; r0=0.1")({"k": k, "r": r})`` broadcasts like torch.
    Definitions after ``;`` are read from the last one backwards, as Lepton does: a definition
    may use those written after it. ``variables`` lists the free names the expression needs.
    """

    def __init__(self, text: str):
        self.text = text
        try:
            main, *definition_texts = text.split(";")
            definitions = {}
            for piece in reversed(definition_texts):
                if not piece.strip():
                    continue
                name, equals, body = piece.partition("=")
                if not equals or not name.strip():
                    raise ValueError(f"definition {piece.strip()!r} does not name a value")
                definitions[name.strip()] = self._parse(body, definitions)
            self.root = self._parse(main, definitions)
        except ValueError as error:
            raise ValueError(f"cannot parse the Lepton expression {text!r}: {error}") from None
        self.variables = frozenset(_free_variables(self.root))
        self.particles = frozenset(_particles(self.root))

    @staticmethod
    def _parse(text: str, definitions: dict) -> tuple:
        tokens = _tokenize(text)
        node, position = _parse_tokens(tokens, 0, definitions, 0)
        if position != len(tokens):
            raise ValueError(f"unexpected text at the end: {tokens[position][1]!r}")
        return node

    def __call__(self, variables: dict, geometry=None):
        """Evaluate with ``variables`` (name -> tensor or float); ``geometry(name, particles)`` serves
        ``distance``/``angle``/``dihedral``. Returns a tensor (or a float if nothing is a tensor)."""
        return evaluate(self.root, variables, geometry)

    def derivative(self, target: tuple):
        """The node of ``d expression / d target`` (``target``: ``("variable", name)`` or a geometry call
        node such as ``("call", "distance", (1, 2))``), ``None`` where it is zero; evaluate it with
        ``evaluate``. Raises ``NotImplementedError`` for functions without a derivative."""
        return derivative(self.root, target)

    def evaluate(self, nodes: list, variables: dict, geometry=None) -> list:
        """Values of ``nodes`` (this expression's root and its derivatives), shared parts computed once."""
        memo = {}
        return [_evaluate(node, variables, geometry, memo) for node in nodes]

    def __repr__(self) -> str:
        return f"LeptonExpression({self.text!r})"


def _children(node: tuple) -> tuple:
    if node[0] in ("number", "variable", "coordinate"):
        return ()
    if node[0] == "call":
        return () if node[1] in _PARTICLE_FUNCTIONS else node[2]
    return node[1:]


def _free_variables(node: tuple) -> set:
    if node[0] == "variable":
        return {node[1]}
    return set().union(*(_free_variables(child) for child in _children(node)))


def geometry_calls(node: tuple) -> set:
    if node[0] == "call" and node[1] in _PARTICLE_FUNCTIONS:
        return {node}
    return set().union(*(geometry_calls(child) for child in _children(node)))


def coordinate_leaves(node: tuple) -> set:
    """The ``("coordinate", axis, slot)`` leaves of a tree."""
    if node[0] == "coordinate":
        return {node}
    return set().union(*(coordinate_leaves(child) for child in _children(node)))


def _particles(node: tuple) -> set:
    if node[0] == "call" and node[1] in _PARTICLE_FUNCTIONS:
        return set(node[2])
    return set().union(*(_particles(child) for child in _children(node)))


# Symbolic derivatives of expression trees (for analytic forces of the custom forces). ``None`` is
# an exact zero; a derivative reuses its expression's nodes, so shared values are evaluated once.
_ONE = ("number", 1.0)


def _num(value: float) -> tuple:
    return ("number", float(value))


def _plus(a, b):
    if a is None or b is None:
        return b if a is None else a
    return ("+", a, b)


def _times(a, b):
    if a is None or b is None:
        return None
    if a == _ONE or b == _ONE:
        return b if a == _ONE else a
    return ("*", a, b)


def _minus(a):
    return None if a is None else ("negate", a)


def _over(a, b):
    return None if a is None else ("/", a, b)


def _f(name: str, *args) -> tuple:
    return ("call", name, tuple(args))


_DERIVATIVES = {  # name: d f(a) / da as a node, given the call node and its argument
    "sqrt": lambda node, a: ("/", _num(0.5), node),
    "exp": lambda node, a: node,
    "log": lambda node, a: ("/", _ONE, a),
    "sin": lambda node, a: _f("cos", a),
    "cos": lambda node, a: ("negate", _f("sin", a)),
    "tan": lambda node, a: ("+", _ONE, ("*", node, node)),
    "sec": lambda node, a: ("*", node, _f("tan", a)),
    "csc": lambda node, a: ("negate", ("*", node, _f("cot", a))),
    "cot": lambda node, a: ("negate", ("+", _ONE, ("*", node, node))),
    "asin": lambda node, a: ("/", _ONE, _f("sqrt", ("-", _ONE, ("*", a, a)))),
    "acos": lambda node, a: ("negate", ("/", _ONE, _f("sqrt", ("-", _ONE, ("*", a, a))))),
    "atan": lambda node, a: ("/", _ONE, ("+", _ONE, ("*", a, a))),
    "sinh": lambda node, a: _f("cosh", a),
    "cosh": lambda node, a: _f("sinh", a),
    "tanh": lambda node, a: ("-", _ONE, ("*", node, node)),
    "erf": lambda node, a: ("*", _num(2.0 / math.sqrt(math.pi)), _f("exp", ("negate", ("*", a, a)))),
    "erfc": lambda node, a: ("*", _num(-2.0 / math.sqrt(math.pi)), _f("exp", ("negate", ("*", a, a)))),
    "square": lambda node, a: ("*", _num(2.0), a),
    "cube": lambda node, a: ("*", _num(3.0), ("*", a, a)),
    "recip": lambda node, a: ("negate", ("*", node, node)),
    "abs": lambda node, a: ("-", ("*", _num(2.0), _f("step", a)), _ONE),
}
_PIECEWISE_CONSTANT = {"step", "delta", "floor", "ceil"}


def derivative(node: tuple, target: tuple):
    """``d node / d target`` as a tree (``None``: zero); raises ``NotImplementedError`` for functions
    without a derivative."""
    return _derivative(node, target, {})


def _derivative(node: tuple, target: tuple, memo: dict):
    """``d node / d target`` as a node (``None``: zero); ``target`` is a variable or geometry call node."""
    key = id(node)
    if key not in memo:
        memo[key] = _derivative_of(node, target, memo)
    return memo[key]


def _derivative_of(node, target, memo):
    kind = node[0]
    if kind == "number":
        return None
    if kind in ("variable", "coordinate") or (kind == "call" and node[1] in _PARTICLE_FUNCTIONS):
        return _ONE if node == target else None
    d = [_derivative(child, target, memo) for child in _children(node)]
    if all(x is None for x in d):
        return None
    if kind == "negate":
        return _minus(d[0])
    if kind in "+-":
        return _plus(d[0], d[1] if kind == "+" else _minus(d[1]))
    a = node[1] if kind != "call" else None
    b = node[2] if kind != "call" else None
    if kind == "*":
        return _plus(_times(d[0], b), _times(a, d[1]))
    if kind == "/":
        return _plus(_over(d[0], b), _minus(_times(node, _over(d[1], b))))
    if kind == "^":
        if b[0] == "number":
            return _times(("*", b, a) if b[1] == 2.0 else ("*", b, ("^", a, _num(b[1] - 1.0))), d[0])
        return _times(node, _plus(_times(d[1], _f("log", a)), _times(b, _over(d[0], a))))
    name, args = node[1], node[2]
    if name in _PIECEWISE_CONSTANT:
        return None
    if name in _DERIVATIVES:
        return _times(_DERIVATIVES[name](node, args[0]), d[0])
    zero = _num(0.0)
    if name in ("min", "max"):  # min: b where a >= b, else a (Lepton's choice at ties)
        first_wins = _f("step", ("-", args[0], args[1])) if name == "max" else _f("step", ("-", args[1], args[0]))
        return _f("select", first_wins, d[0] or zero, d[1] or zero)
    if name == "select":
        return _f("select", args[0], d[1] or zero, d[2] or zero)
    if name == "atan2":  # atan2(y, x)' = (x y' - y x') / (x^2 + y^2)
        y, x = args
        return _over(_plus(_times(x, d[0]), _minus(_times(y, d[1]))), ("+", ("*", x, x), ("*", y, y)))
    raise NotImplementedError(f"no derivative for {name}()")


def _apply(function, args: list):
    """Apply a torch function to tensors and/or floats (floats alone are computed in float64)."""
    like = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if like is None:
        value = function(*[torch.tensor(a, dtype=torch.float64) for a in args])
        return value if torch.compiler.is_compiling() else value.item()  # .item() would break the graph
    return function(
        *[a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=like.dtype, device=like.device) for a in args]
    )


def evaluate(node: tuple, variables: dict, geometry=None):
    """Value of the tree ``node`` with ``variables`` (name -> tensor or float; a coordinate leaf
    ``("coordinate", axis, slot)`` is looked up as that tuple); ``geometry(name, particles)`` serves
    ``distance``/``angle``/``dihedral`` calls. A tensor, or a float if nothing is a tensor."""
    return _evaluate(node, variables, geometry, {})


def _evaluate(node: tuple, variables: dict, geometry, memo: dict):
    key = node  # equal subtrees share one value (tuples hash by value; torch.compile traces this, not id())
    if key in memo:
        return memo[key]
    kind = node[0]
    if kind == "number":
        value = node[1]
    elif kind == "variable":
        value = variables[node[1]]
    elif kind == "coordinate":
        value = variables[node]
    elif kind == "negate":
        value = -_evaluate(node[1], variables, geometry, memo)
    elif kind == "call" and node[1] in _PARTICLE_FUNCTIONS:
        value = geometry(node[1], node[2])
    elif kind == "call":
        value = _apply(_FUNCTIONS[node[1]][1], [_evaluate(a, variables, geometry, memo) for a in node[2]])
    else:
        lhs, rhs = (_evaluate(a, variables, geometry, memo) for a in node[1:])
        if isinstance(lhs, torch.Tensor) or isinstance(rhs, torch.Tensor):
            value = _BINARY[kind](lhs, rhs)  # a float operand stays a scalar: fast kernels, e.g. x^2
        else:
            value = _apply(_BINARY[kind], [lhs, rhs])
    memo[key] = value
    return value


# ===================================================================================================
# Geometry as expressions of Cartesian coordinates (for the compiled kernels of custom forces)
# ===================================================================================================
def coordinate(axis: int, slot: int) -> tuple:
    """The leaf of component ``axis`` (0, 1, 2: x, y, z) of a term's particle ``slot`` (0-based)."""
    return ("coordinate", axis, slot)


def _vector(i: int, j: int) -> list:
    """``p_j - p_i`` as three nodes."""
    return [("-", coordinate(axis, j), coordinate(axis, i)) for axis in range(3)]


def _dot_nodes(a: list, b: list) -> tuple:
    return ("+", ("+", ("*", a[0], b[0]), ("*", a[1], b[1])), ("*", a[2], b[2]))


def _cross_nodes(a: list, b: list) -> list:
    return [("-", ("*", a[(k + 1) % 3], b[(k + 2) % 3]), ("*", a[(k + 2) % 3], b[(k + 1) % 3])) for k in range(3)]


def _distance_node(i: int, j: int) -> tuple:
    """``|p_j - p_i|`` of slots i, j."""
    delta = _vector(i, j)
    return _f("sqrt", _dot_nodes(delta, delta))


def _angle_node(i: int, j: int, k: int) -> tuple:
    """Angle i-j-k, ``atan2(|a x b|, a . b)`` with ``a = p_i - p_j``, ``b = p_k - p_j`` (as OpenMM)."""
    a, b = _vector(j, i), _vector(j, k)
    normal = _cross_nodes(a, b)
    return _f("atan2", _f("sqrt", _dot_nodes(normal, normal)), _dot_nodes(a, b))


def _dihedral_node(i: int, j: int, k: int, l: int) -> tuple:
    """IUPAC dihedral i-j-k-l in ``(-pi, pi]`` (OpenMM's sign): ``atan2(|b2| b1 . n2, n1 . n2)``."""
    b1, b2, b3 = _vector(i, j), _vector(j, k), _vector(k, l)
    n1, n2 = _cross_nodes(b1, b2), _cross_nodes(b2, b3)
    return _f("atan2", ("*", _f("sqrt", _dot_nodes(b2, b2)), _dot_nodes(b1, n2)), _dot_nodes(n1, n2))


GEOMETRY_NODES = {"distance": _distance_node, "angle": _angle_node, "dihedral": _dihedral_node}


def in_coordinates(root: tuple, substitutions: dict) -> tuple:
    """``root`` with every node that is a key of ``substitutions`` (a variable such as ``r``, a geometry
    call, a coordinate variable) replaced by its value (a tree in coordinate leaves)."""
    memo = {}

    def rewrite(node):
        if node in substitutions:
            return substitutions[node]
        if id(node) not in memo:
            kind = node[0]
            if kind in ("number", "variable", "coordinate"):
                memo[id(node)] = node
            elif kind == "call":
                memo[id(node)] = ("call", node[1], tuple(rewrite(a) for a in node[2]))
            else:
                memo[id(node)] = (kind, *(rewrite(a) for a in node[1:]))
        return memo[id(node)]

    return rewrite(root)
