"""The numpy reference executor: runs any graph, forward or backward, node by node.

It is the oracle every later stage (passes, native code) is tested against. `dtype="float64"`
runs every float value in float64 for gradient checks.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from graphc.core.ir import Graph, Tensor, as_int
from graphc.core.ops.registry import OPS


def evaluate(outputs, feeds: Mapping[str, object], params: Mapping[str, np.ndarray] | None = None, dtype=None,
             seed: int = 0):
    """Values of `outputs` (a Tensor or a list of them) for the given inputs and param values.

    `params` holds the params and buffers. Buffers the outputs' ops update (batch norm's running
    statistics in training mode) are updated in place in `params`, as torch does. Random masks
    (dropout) are those of call 0 for `seed`, as a compiled function's first call.
    """
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

    updates = graph.buffer_updates_for(outputs)
    key = random_key(seed, call=0)
    values: dict[int, np.ndarray] = {}
    for node in graph.ancestors(outputs + [update.value for update in updates]):
        float_dtype = forced or (np.dtype(node.dtype) if node.dtype.startswith("float") else np.dtype("float32"))
        if node.op == "input":
            values[node.id] = bind_value(node, feeds, "input", float_dtype)
        elif node is graph.random_key:
            values[node.id] = key
        elif node.op == "param":
            kind = "buffer" if node.name in graph.buffers else "param"
            values[node.id] = bind_value(node, params, kind, float_dtype)
        else:
            args = [values[operand.id] for operand in node.inputs]
            result = np.asarray(OPS[node.op].reference(args, node.attrs, node, float_dtype))
            if result.dtype.kind == "f" and result.dtype != float_dtype:
                result = result.astype(float_dtype)
            values[node.id] = result
    results = [np.array(values[out.id], copy=True) for out in outputs]
    _write_buffers(updates, values, params)
    return results[0] if single else results


def checked_seed(seed, where: str) -> int:
    """A seed of random masks: an int in [0, 2**32), or TypeError/ValueError naming `where`."""
    seed = as_int(seed, f"{where}: seed")
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"{where}: seed must lie in [0, 2**32), got {seed}")
    return seed


def random_key(seed, call: int) -> np.ndarray:
    """The random key a graph's masks are drawn with: int32 [seed, call], each read as uint32."""
    return np.array([checked_seed(seed, "evaluate"), call % 2 ** 32], dtype=np.uint32).view(np.int32)


def _write_buffers(updates, values, params) -> None:
    """Copy each updated buffer's new value into the caller's array, in place."""
    for update in updates:   # all checked before any is written
        target = params[update.buffer.name]
        if not isinstance(target, np.ndarray) or not target.flags.writeable:
            raise ValueError(f"buffer {update.buffer.name!r} is updated by %{update.owner.id} {update.owner.op} "
                             f"(at {update.owner.site}), so it must be a writeable numpy array")
    for update in updates:
        np.copyto(params[update.buffer.name], values[update.value.id], casting="unsafe")


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
