"""The numpy reference executor: runs any graph, forward or backward, node by node.

It is the oracle every later stage (passes, native code) is tested against. `dtype="float64"`
runs every float value in float64 for gradient checks.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from graphc.core.ir import Graph, Tensor
from graphc.core.ops.registry import OPS


def evaluate(outputs, feeds: Mapping[str, object], params: Mapping[str, np.ndarray] | None = None, dtype=None):
    """Values of `outputs` (a Tensor or a list of them) for the given inputs and param values."""
    single = isinstance(outputs, Tensor)
    outputs = [outputs] if single else list(outputs)
    if not outputs:
        return []
    graph = _common_graph(outputs)
    forced = np.dtype(dtype) if dtype is not None else None
    if forced is not None and forced.kind != "f":
        raise ValueError(f"evaluate: dtype must be a float type, got {forced}")
    feeds = dict(feeds or {})
    params = dict(params or {})
    unknown = sorted(set(feeds) - set(graph.inputs))
    if unknown:
        raise ValueError(f"evaluate: {unknown} are not inputs of graph {graph.name!r} "
                         f"(its inputs: {sorted(graph.inputs)})")

    values: dict[int, np.ndarray] = {}
    for node in graph.ancestors(outputs):
        float_dtype = forced or (np.dtype(node.dtype) if node.dtype.startswith("float") else np.dtype("float32"))
        if node.op == "input":
            values[node.id] = bind_value(node, feeds, "input", float_dtype)
        elif node.op == "param":
            values[node.id] = bind_value(node, params, "param", float_dtype)
        else:
            args = [values[operand.id] for operand in node.inputs]
            result = np.asarray(OPS[node.op].reference(args, node.attrs, node, float_dtype))
            if result.dtype.kind == "f" and result.dtype != float_dtype:
                result = result.astype(float_dtype)
            values[node.id] = result
    results = [np.array(values[out.id], copy=True) for out in outputs]
    return results[0] if single else results


def bind_value(node: Tensor, table: Mapping[str, object], kind: str, float_dtype) -> np.ndarray:
    """The value supplied for an input or param, checked against its declaration."""
    if node.name not in table:
        raise ValueError(f"missing {kind} {node.name!r} (shape {node.shape}, {node.dtype})")
    value = np.asarray(table[node.name])
    if value.shape != node.shape:
        raise ValueError(f"{kind} {node.name!r} must have shape {node.shape}, got {value.shape}")
    declared = np.dtype(node.dtype)
    if declared.kind == "f":
        if value.dtype.kind != "f":
            raise ValueError(f"{kind} {node.name!r} must be a float array ({node.dtype}), got {value.dtype}")
        return value.astype(float_dtype, copy=False)
    if value.dtype.kind not in "iu":
        raise ValueError(f"{kind} {node.name!r} must be an integer array ({node.dtype}), got {value.dtype}")
    return value


def _common_graph(outputs) -> Graph:
    for out in outputs:
        if not isinstance(out, Tensor):
            raise TypeError(f"evaluate: outputs must be graphc Tensors, got {type(out).__name__}")
    graph = outputs[0].graph
    if any(out.graph is not graph for out in outputs):
        raise ValueError("evaluate: all outputs must belong to one graph")
    return graph
