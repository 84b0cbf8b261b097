"""Common-subexpression elimination: nodes with the same op, the same operands and equal attributes
become one node.

Operands are compared after their own merging, so whole duplicated subgraphs (the forward
recomputed by two gradient paths, two equal fills) collapse bottom-up in one pass. Elementwise
nodes are compared in a canonical form (each distinct operand once, in node order), so `a + b`
and `b + a` merge too. Inputs and params are never merged: each is a distinct binding.
"""
from __future__ import annotations

import sympy

from graphc.core.ir import Graph, Tensor
from graphc.core.scalar import renumbered
from graphc.transforms.rebuild import Rewrite, attrs_key, rebuild_if_changed


def cse(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    return rebuild_if_changed(graph, outputs, _duplicate_merger)


def _duplicate_merger():
    """A rewrite hook that stands the first node of each value for every node with its value."""
    first_of_kind: dict[tuple, Tensor] = {}

    def merge_duplicates(rewrite: Rewrite) -> Tensor:
        operands = rewrite.operands
        key = _value_key(rewrite.node, operands)
        if key not in first_of_kind:
            first_of_kind[key] = _build(rewrite, operands)
        return first_of_kind[key]

    return merge_duplicates


def _value_key(node: Tensor, operands: list[Tensor]) -> tuple:
    """Equal keys mean equal values: the same op on the same operands with equal attributes."""
    if node.op == "ew":
        expr, operands = _canonical_ew(node.attrs["expr"], operands)
        attrs = (("expr", expr),)
    else:
        attrs = attrs_key(node.attrs)
    return node.op, tuple(operand.id for operand in operands), attrs, node.shape, node.dtype


def _build(rewrite: Rewrite, operands: list[Tensor]) -> Tensor:
    """The node over its merged operands; an ew two of whose operands merged uses that node once."""
    if rewrite.node.op == "ew" and len(set(operands)) < len(operands):
        return rewrite.ew(*_canonical_ew(rewrite.node.attrs["expr"], operands))
    return rewrite.copy(operands)


def _canonical_ew(expr: sympy.Expr, operands: list[Tensor]) -> tuple[sympy.Expr, list[Tensor]]:
    """The same elementwise function over each distinct operand once, sorted by node id, with its
    symbols renamed to match: equal for `a + b` and `b + a`."""
    distinct = sorted(set(operands), key=lambda operand: operand.id)
    return renumbered(expr, tuple((i, distinct.index(operand)) for i, operand in enumerate(operands))), distinct
