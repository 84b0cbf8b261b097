"""Algebraic simplification: local rewrites that make nodes disappear, one rule per op.

Rules see operands that are already simplified, so chains collapse bottom-up in one pass:
the gradient seed of a loss is a `fill`, the VJPs of `sum`/`mean` reshape, broadcast and scale
it, and every step of that chain folds into a bigger fill until an elementwise node takes the
fill's value into its expression, where sympy's automatic evaluation removes `x*1`, `x + 0`
and turns `x*0` into a fill.

- ew: float literals become exact numbers (1.0 -> 1, 0.25 -> 1/4) and fill operands are
  substituted into the expression, so they cancel; `broadcast_to` operands are read
  unbroadcast when the result's shape does not change (ew broadcasts by itself); repeated
  operands are merged.
- transpose: of a transpose, one transpose (or none); of a fill, a fill; of a matmul read only
  by it whose operands are transposes, (a @ b)ᵀ = bᵀ @ aᵀ, so the transposes cancel (weight
  gradients: (hᵀ g)ᵀ = gᵀ h, one GEMM with a transposed operand, no transpose kernel).
- reshape, broadcast_to: of the same op, one; to the operand's own shape, none; of a fill, a fill.
- sum: of a fill, a fill of the value times the number of elements summed.
- constant: a uniform float constant becomes a fill, so the rules above apply to it.
"""
from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import sympy

from graphc.core.ir import FLOAT_DTYPES, Graph, Tensor
from graphc.core.scalar import symbol
from graphc.transforms.rebuild import Rewrite, rebuild_if_changed

_NOT_FINITE_REAL = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo, sympy.I)


def simplify(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    return rebuild_if_changed(graph, outputs, lambda: _simplify_node)


def _simplify_node(rewrite: Rewrite) -> Tensor | None:
    rule = _RULES.get(rewrite.node.op)
    return rule(rewrite) if rule else None


def _elementwise(rewrite: Rewrite) -> Tensor | None:
    node = rewrite.node
    expr, operands = _substitute_fills(node, _with_exact_numbers(node.attrs["expr"]), rewrite.operands)
    operands = _unbroadcast(node, operands)
    if expr == node.attrs["expr"] and operands == rewrite.operands and len(set(operands)) == len(operands):
        return None
    return rewrite.ew(expr, operands)  # make_ew merges repeated operands and drops unused ones


@functools.lru_cache(maxsize=4096)     # repeated layers repeat their expressions
def _with_exact_numbers(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with its float literals (Python scalars, 1/n of a mean) as exact numbers, so they cancel."""
    return expr.xreplace({literal: exact_number(float(literal)) for literal in expr.atoms(sympy.Float)})


def _substitute_fills(node: Tensor, expr: sympy.Expr, operands: list[Tensor]):
    """`expr` with the values of its fill operands written in and those operands dropped, unless
    that changes the node's type (a float64 fill was what made it float64) or leaves the reals."""
    fills = {i for i, operand in enumerate(operands) if operand.op == "fill" and np.isfinite(operand.attrs["value"])}
    kept = [i for i in range(len(operands)) if i not in fills]
    if not fills or (kept and _promoted_dtype([operands[i] for i in kept]) != node.dtype):
        return expr, operands
    replacements = {symbol(i): exact_number(operands[i].attrs["value"]) for i in fills}
    replacements.update({symbol(old): symbol(new) for new, old in enumerate(kept)})
    substituted = expr.xreplace(replacements)
    if leaves_the_reals(substituted):
        return expr, operands
    return substituted, [operands[i] for i in kept]


def _unbroadcast(node: Tensor, operands: list[Tensor]) -> list[Tensor]:
    """Operands with each `broadcast_to` replaced by its input where the ew's shape stays the same."""
    operands = list(operands)
    for i, operand in enumerate(operands):
        if operand.op != "broadcast_to":
            continue
        narrower = operands[:i] + [operand.inputs[0]] + operands[i + 1:]
        if np.broadcast_shapes(*(t.shape for t in narrower)) == node.shape:
            operands = narrower
    return operands


def _transpose(rewrite: Rewrite) -> Tensor | None:
    (x,) = rewrite.operands
    if x.op == "fill":
        return rewrite.fill(x.attrs["value"])
    if x.op == "matmul" and _swaps_2d(rewrite.node) and _single_use(rewrite, rewrite.node.inputs[0]) \
            and any(_swaps_2d(operand) for operand in x.inputs):
        a, b = x.inputs
        return rewrite.apply("matmul", [_transposed(rewrite, b), _transposed(rewrite, a)])
    if x.op != "transpose":
        return None
    inner, outer = x.attrs["axes"], rewrite.node.attrs["axes"]
    axes = tuple(inner[a] for a in outer)
    source = x.inputs[0]
    if axes == tuple(range(len(axes))):
        return source
    return rewrite.apply("transpose", [source], axes=axes)


def _swaps_2d(node: Tensor) -> bool:
    return node.op == "transpose" and node.attrs["axes"] == (1, 0)


def _single_use(rewrite: Rewrite, old: Tensor) -> bool:
    """`old` (a node of the graph being simplified) has exactly one consumer there."""
    return sum(operand is old for node in old.graph.nodes for operand in node.inputs) == 1


def _transposed(rewrite: Rewrite, t: Tensor) -> Tensor:
    return t.inputs[0] if _swaps_2d(t) else rewrite.apply("transpose", [t], axes=(1, 0))


def _reshape(rewrite: Rewrite) -> Tensor | None:
    return _collapse_shape_op(rewrite, "reshape")


def _broadcast_to(rewrite: Rewrite) -> Tensor | None:
    return _collapse_shape_op(rewrite, "broadcast_to")


def _collapse_shape_op(rewrite: Rewrite, op_name: str) -> Tensor | None:
    """reshape∘reshape and broadcast_to∘broadcast_to are one op: both depend only on the final shape."""
    (x,) = rewrite.operands
    shape = rewrite.node.shape
    if x.op == "fill":
        return rewrite.fill(x.attrs["value"])
    source = x.inputs[0] if x.op == op_name else x
    if source.shape == shape:
        return source
    if source is x:
        return None
    return rewrite.apply(op_name, [source], shape=shape)


def _sum(rewrite: Rewrite) -> Tensor | None:
    (x,) = rewrite.operands
    if x.op != "fill":
        return None
    count = int(np.prod([x.shape[a] for a in rewrite.node.attrs["axes"]], dtype=np.int64))
    return rewrite.fill(x.attrs["value"] * count)


def _constant(rewrite: Rewrite) -> Tensor | None:
    node = rewrite.node
    array = node.attrs["value"].array
    if node.dtype not in FLOAT_DTYPES or array.size == 0 or not np.all(array == array.flat[0]):
        return None
    return rewrite.fill(float(array.flat[0]))


def _stop_gradient(rewrite: Rewrite) -> Tensor:
    return rewrite.operands[0]      # gradients are built by now: only the identity is left


_RULES = {
    "stop_gradient": _stop_gradient,
    "ew": _elementwise,
    "transpose": _transpose,
    "reshape": _reshape,
    "broadcast_to": _broadcast_to,
    "sum": _sum,
    "constant": _constant,
}


def exact_number(value: float) -> sympy.Number:
    """`value` as a sympy number sympy can cancel exactly: 1.0 must become 1 for `x*1` to vanish,
    and 0.25 must become 1/4 for `4*(x/4)` to. Floats that are no short fraction stay floats."""
    if value.is_integer():
        return sympy.Integer(int(value))
    fraction = Fraction(value).limit_denominator(1 << 16)
    if float(fraction) == value:
        return sympy.Rational(fraction.numerator, fraction.denominator)
    return sympy.Float(value)


@functools.lru_cache(maxsize=4096)     # layers repeat their expressions
def leaves_the_reals(expr: sympy.Expr) -> bool:
    """Whether sympy's exact algebra made `expr` infinite, undefined or complex: where it did
    (log(0), 1/0, sqrt(-1)), IEEE floats give inf or nan instead, so the rewrite must not happen."""
    return expr.has(*_NOT_FINITE_REAL)


def _promoted_dtype(operands: list[Tensor]) -> str:
    return "float64" if any(operand.dtype == "float64" for operand in operands) else "float32"
