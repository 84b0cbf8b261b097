"""Where a node comes from: the user's line, and for a backward node the forward node it serves
and the derivative rule that built it (what reports and `check_finite` errors show)."""
from __future__ import annotations

import sympy

from graphc.core.ir import Tensor
from graphc.core.ops.registry import OPS
from graphc.core.scalar import symbol


def derivation(node: Tensor) -> str | None:
    """The rule that made backward node `node`, from its forward node: the sympy derivatives of
    an elementwise expression, or the op's VJP rule. None for a forward node."""
    forward = node.grad_of
    if forward is None:
        return None
    if forward.op == "ew":
        expr = forward.attrs["expr"]
        parts = [f"∂/∂x{i} {sympy.sstr(expr)} = {sympy.sstr(sympy.diff(expr, symbol(i)))}"
                 for i in range(len(forward.inputs))]
        return "sympy: " + "; ".join(parts)
    if forward.op in ("input", "param", "constant", "fill"):
        return "the seed or sum of the gradient's contributions"
    rule = OPS[forward.op].vjp_rule
    return f"VJP of {forward.op}: {rule}" if rule else f"VJP of {forward.op}"


def origin(node: Tensor) -> str:
    """One line: the node, its user's line, and for a backward node its forward node and rule."""
    from graphc.core.display import node_summary
    text = f"%{node.id} {node_summary(node)} at {node.site}"
    if node.grad_of is not None:
        forward = node.grad_of
        text += f"; gradient of %{forward.id} {node_summary(forward)} (at {forward.site}) by {derivation(node)}"
    return text
