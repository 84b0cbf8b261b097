"""Factoring out of sums: sum(c·v + d·w) = c·sum(v) + d·sum(w), for factors c and d constant
along the summed axes.

Batch norm's backward sums products of full-size tensors with per-channel factors (γ, 1/σ,
1/n): sum(g·γ·x̂c) and sum(g·x̂c/σ) are one sum, sum(g·x̂c), times different factors. Factored,
equal sums merge (CSE, which the pipeline runs after this pass) and every sum reads fewer
tensors. Runs after elementwise fusion, whose nodes hold the whole product.
"""
from __future__ import annotations

import numpy as np
import sympy

from graphc.core.ir import Graph, Tensor
from graphc.core.ops.elementwise import make_ew
from graphc.core.scalar import symbol
from graphc.transforms.rebuild import Rewrite, rebuild, use_counts


def factor_sums(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    uses = use_counts(graph)
    output_ids = {out.id for out in outputs}

    def factor(rewrite: Rewrite) -> Tensor | None:
        node = rewrite.node
        if node.op != "sum":
            return None
        (x,) = node.inputs
        if x.op != "ew" or uses.get(x.id) != 1 or x.id in output_ids:
            return None
        return _factored(rewrite, rewrite.operands[0])

    return rebuild(graph, outputs, factor)


def _factored(rewrite: Rewrite, x: Tensor) -> Tensor | None:
    """The sum of `x` with its constant factors outside, or None if no term has a tensor one."""
    node = rewrite.node
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    constant = {symbol(i) for i, t in enumerate(x.inputs) if _constant_along(t, x.ndim, axes)}
    if not constant:
        return None
    parts: dict[sympy.Expr, sympy.Expr] = {}      # varying part -> the sum of its constant factors
    for term in sympy.Add.make_args(x.attrs["expr"]):
        factors = sympy.Mul.make_args(term)
        fixed = sympy.Mul(*(f for f in factors if f.free_symbols <= constant))
        varying = sympy.Mul(*(f for f in factors if not f.free_symbols <= constant))
        parts[varying] = parts.get(varying, 0) + fixed
    if not any(fixed.free_symbols for fixed in parts.values()):
        return None
    operands: list[Tensor] = []

    def operand(t: Tensor) -> sympy.Symbol:
        if t not in operands:
            operands.append(t)
        return symbol(operands.index(t))

    expr = sympy.Integer(0)
    for varying, fixed in parts.items():
        fixed = fixed.xreplace({symbol(i): operand(_per_output(rewrite, t, x.ndim, axes, keepdims))
                                for i, t in enumerate(x.inputs) if symbol(i) in fixed.free_symbols})
        if varying == 1:        # a term constant along the axes: summed, it is count times itself
            expr += fixed * count
            continue
        summed = make_ew(varying, list(x.inputs), x.shape, site=node.site)
        expr += fixed * operand(rewrite.apply("sum", [summed], axes=axes, keepdims=keepdims))
    if not operands:
        return rewrite.fill(float(expr))
    return make_ew(expr, operands, node.shape, site=node.site)


def _constant_along(t: Tensor, ndim: int, axes) -> bool:
    padded = (1,) * (ndim - t.ndim) + tuple(t.shape)
    return all(padded[a] == 1 for a in axes)


def _per_output(rewrite: Rewrite, t: Tensor, ndim: int, axes, keepdims: bool) -> Tensor:
    """`t` (constant along `axes`) shaped to broadcast against the sum's result."""
    padded = (1,) * (ndim - t.ndim) + tuple(t.shape)
    shape = padded if keepdims else tuple(d for i, d in enumerate(padded) if i not in axes)
    return t if shape == t.shape else rewrite.apply("reshape", [t], shape=shape)
