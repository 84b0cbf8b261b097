"""Value reuse: an elementwise node reads a transcendental value another node already stores,
instead of computing it again.

When an `ew` node's expression contains the whole expression of an earlier `ew` node M over the
same operands, and that expression calls a transcendental function, the subexpression becomes a
read of M: the exp/tanh/sigmoid is computed once, and operands only the subexpression used drop
out of the node. Unary activations already differentiate through their output; this catches the
rest, e.g. the logistic loss's gradient `(Sigmoid(z) - t)/n` next to a stored prediction
`sigmoid(z)`, where fusion has made `z = x@w + b` part of both kernels.
"""
from __future__ import annotations

from collections import defaultdict

from graphc.core.ir import Graph, Tensor
from graphc.core.scalar import symbol
from graphc.transforms.elementwise_fusion import is_transcendental, operation_count
from graphc.transforms.rebuild import Rewrite, rebuild_if_changed


def reuse_values(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    return rebuild_if_changed(graph, outputs, _stored_value_reader)


def _stored_value_reader():
    """A rewrite hook that makes ew nodes read the transcendental values of the ew nodes before them."""
    stored_by_operand: dict[int, list[Tensor]] = defaultdict(list)  # new operand id -> ew nodes reading it

    def read_stored_values(rewrite: Rewrite) -> Tensor | None:
        replacement = _reuse_in(rewrite, stored_by_operand) if rewrite.node.op == "ew" else None
        result = replacement if replacement is not None else rewrite.copy()
        if result.op == "ew" and is_transcendental(result.attrs["expr"]):
            for operand in set(result.inputs):
                if result not in stored_by_operand[operand.id]:
                    stored_by_operand[operand.id].append(result)
        return result

    return read_stored_values


def _reuse_in(rewrite: Rewrite, stored_by_operand) -> Tensor | None:
    expr, operands = rewrite.node.attrs["expr"], rewrite.operands
    candidates = {id(m): m for operand in operands for m in stored_by_operand[operand.id]}.values()
    # Biggest expressions first: reusing tanh(z)**2 beats reusing tanh(z) inside it.
    changed = False
    for stored in sorted(candidates, key=lambda m: operation_count(m.attrs["expr"]), reverse=True):
        if not all(operand in operands for operand in stored.inputs):
            continue
        pattern = stored.attrs["expr"].xreplace(
            {symbol(j): symbol(operands.index(operand)) for j, operand in enumerate(stored.inputs)})
        if expr.has(pattern):
            if stored not in operands:
                operands = operands + [stored]
            expr = expr.xreplace({pattern: symbol(operands.index(stored))})
            changed = True
    return rewrite.ew(expr, operands) if changed else None
