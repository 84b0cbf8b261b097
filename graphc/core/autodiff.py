"""Reverse-mode autodiff as a graph-to-graph transform.

`grad` walks back from the output in reverse topological order over the nodes that lie between
the wanted inputs and the output, asks each op's VJP rule for its operands' gradients (built
from ordinary graph ops), and sums contributions where a value fans out. The result is new
nodes in the same graph: printable, runnable on the reference executor, compilable, and
differentiable again.
"""
from __future__ import annotations

from collections import defaultdict

from graphc.core.errors import user_site
from graphc.core.ir import FLOAT_DTYPES, SOURCE_OPS, Tensor
from graphc.core.ops.elementwise import make_ew
from graphc.core.ops.registry import OPS
from graphc.core.ops.sources import fill
from graphc.core.scalar import symbol


def grad(y: Tensor, xs, seed: Tensor | None = None):
    """Gradients of `y` w.r.t. each tensor of `xs` (a Tensor or a list of them), as graph nodes.

    `y` must be a scalar unless `seed` (the cotangent, shaped like `y`) is given. A tensor `y`
    does not depend on gets a zero gradient of its shape.
    """
    single = isinstance(xs, Tensor)
    xs = [xs] if single else list(xs)
    _validate(y, xs, seed)
    graph = y.graph
    site = user_site()

    reaches_y = {node.id for node in graph.ancestors([y])}
    between = reaches_y & _depending_on(graph, xs)

    contributions: dict[int, list[Tensor]] = defaultdict(list)
    if y.id in between:
        with graph.building_gradient_of(y):
            contributions[y.id].append(seed if seed is not None else fill(graph, y.shape, 1.0, y.dtype, site))

    totals: dict[int, Tensor] = {}
    for node_id in sorted(between, reverse=True):
        node = graph.nodes[node_id]
        if node_id not in contributions:    # reaches y only through stop_gradient: no gradient
            continue
        with graph.building_gradient_of(node):
            totals[node_id] = total = _sum_contributions(contributions.pop(node_id), site)
            wanted = tuple(operand.id in between for operand in node.inputs)
            if node.op in SOURCE_OPS or not any(wanted):
                continue
            for operand, g in zip(node.inputs, OPS[node.op].vjp(node, total, wanted)):
                if g is not None and operand.id in between:
                    contributions[operand.id].append(g)

    results = []
    for x in xs:
        if x.id in totals:
            results.append(totals[x.id])
        else:
            with graph.building_gradient_of(x):
                results.append(fill(graph, x.shape, 0.0, x.dtype, site))
    return results[0] if single else results


def _depending_on(graph, xs: list[Tensor]) -> set[int]:
    """The ids of `xs` and of every node that depends on one: one sweep, as nodes are stored in
    topological order (a search per x made a network's gradient quadratic in its params)."""
    reached = {x.id for x in xs}
    for node in graph.nodes[min(reached, default=len(graph.nodes)):]:
        if any(operand.id in reached for operand in node.inputs):
            reached.add(node.id)
    return reached


def _sum_contributions(parts: list[Tensor], site: str) -> Tensor:
    """Fan-out: one n-ary elementwise sum of every path's gradient."""
    if len(parts) == 1:
        return parts[0]
    return make_ew(sum(symbol(i) for i in range(len(parts))), parts, site=site)


def _validate(y, xs, seed):
    if not isinstance(y, Tensor):
        raise TypeError(f"grad: the output must be a graphc Tensor, got {type(y).__name__}")
    if y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad: the output must be a float tensor, got {y.dtype}")
    if seed is None and y.size != 1:
        raise ValueError(f"grad: the output must be a scalar (got shape {y.shape}); "
                         "pass seed= (a tensor shaped like the output) for a vector-Jacobian product")
    if seed is not None and (not isinstance(seed, Tensor) or seed.shape != y.shape):
        raise ValueError(f"grad: seed must be a Tensor of the output's shape {y.shape}")
    for x in xs:
        if not isinstance(x, Tensor):
            raise TypeError(f"grad: can only differentiate w.r.t. graphc Tensors, got {type(x).__name__}")
        if x.graph is not y.graph:
            raise ValueError(f"grad: {x!r} belongs to another graph than the output")
        if x.op == "param" and x.graph.buffers.get(x.name) is x:
            raise ValueError(f"grad: {x.name!r} is a buffer (non-trainable state updated by its op), "
                             f"not a param; buffers take no gradient")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"grad: {x!r} is {x.dtype}; only float tensors have gradients")
