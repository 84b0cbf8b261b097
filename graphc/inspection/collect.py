"""Everything a report shows of a compiled function or training step, as plain data.

Graphs: the forward graph the user wrote; the graph the compiler differentiated (forward,
backward and update nodes); the optimized graph the kernels compute. Each node carries its
provenance (user's line; for a backward node its forward node and the derivative rule) and the
kernels that compute it, found by following optimized nodes back through every pass
(`Tensor.origin`).
"""
from __future__ import annotations

import dataclasses

from graphc.core.display import node_summary, source_kind, type_string
from graphc.core.ir import Graph, Tensor
from graphc.core.provenance import derivation
from graphc.inspection import code


@dataclasses.dataclass
class GraphView:
    key: str                 # "forward", "backward", "optimized"
    title: str
    graph: Graph
    nodes: list[Tensor]      # the nodes drawn, in topological order
    kernels_of: dict[int, list[int]]    # node id -> indexes of the kernels computing it
    clusters: bool = False   # draw each kernel's nodes in one box

    def __post_init__(self):
        self.kinds = node_kinds(self.nodes)


def graph_views(fn) -> list[GraphView]:
    """The forward, backward (if there is one) and optimized graphs of `fn`."""
    source_outputs = fn.source_outputs
    source = source_outputs[0].graph
    optimized = fn.optimization.graph
    kernel_of_optimized = {node.id: [i] for i, step in enumerate(fn.steps) for node in step.covers}
    kernels_of_source: dict[int, list[int]] = {}
    for node in optimized.nodes:
        origin = _origin_in(node, source)
        for index in kernel_of_optimized.get(node.id, []):
            if origin is not None and index not in kernels_of_source.setdefault(origin.id, []):
                kernels_of_source[origin.id].append(index)
    everything = source.ancestors(list(source_outputs))
    forward_outputs = [out for out in source_outputs if not out.is_backward and not _reads_backward(out)]
    forward = source.ancestors(forward_outputs) if forward_outputs else []
    views = [GraphView("forward", "Forward graph", source, forward, kernels_of_source)]
    if any(node.is_backward for node in everything):
        views.append(GraphView("backward", "Forward, backward and update graph", source, everything, kernels_of_source))
    optimized_nodes = optimized.ancestors(list(fn.optimization.outputs))
    views.append(GraphView("optimized", "Optimized graph (border colour: kernel)", optimized, optimized_nodes,
                           kernel_of_optimized, clusters=True))
    return views


def _reads_backward(node: Tensor) -> bool:
    """Whether `node` (an output) depends on a backward node: an optimizer's update."""
    return any(n.is_backward for n in node.graph.ancestors([node]))


def _origin_in(node: Tensor, graph: Graph) -> Tensor | None:
    while node is not None and node.graph is not graph:
        node = node.origin
    return node


def node_kinds(nodes: list[Tensor]) -> dict[int, str]:
    """input, param, buffer, random key, constant, forward, backward, or update: a node outside
    the backward pass that reads a gradient (an optimizer's)."""
    reads_gradient: dict[int, bool] = {}
    kinds = {}
    for node in nodes:
        reads_gradient[node.id] = node.is_backward or any(reads_gradient.get(o.id, False) for o in node.inputs)
        if node.op in ("input", "param"):
            kinds[node.id] = source_kind(node).replace(" ", "-")
        elif node.is_backward:
            kinds[node.id] = "backward"
        elif node.op in ("constant", "fill"):
            kinds[node.id] = "constant"
        else:
            kinds[node.id] = "update" if reads_gradient[node.id] else "forward"
    return kinds


def node_record(node: Tensor, kind: str, kernels: list[int]) -> dict:
    forward = node.grad_of
    return {
        "id": node.id, "text": node_summary(node), "type": type_string(node), "kind": kind,
        "site": node.site, "name": node.name or "",
        "forward": forward.id if forward is not None else None,
        "forward_text": f"%{forward.id} {node_summary(forward)} at {forward.site}" if forward is not None else "",
        "rule": derivation(node) or "", "kernels": kernels,
    }


def pass_records(fn) -> list[dict]:
    return [{"name": r.name, "before": r.nodes_before, "after": r.nodes_after, "ms": round(r.seconds * 1e3, 2),
             "changes": r.changes} for r in fn.optimization.log]


def kernel_records(fn, times=None) -> tuple[list[dict], dict[str, str], dict[str, str]]:
    """One record per kernel, and the IR and assembly of every function they use, by name."""
    from graphc.backend.llvm.parallel import split_modules
    from graphc.backend.llvm.target import compile_to_assembly
    modules = split_modules(fn.llvm_ir)
    ir = code.ir_functions(modules)
    records = []
    for index, step in enumerate(fn.steps):
        # a repeated layer's step calls the functions generated for the first of its kind
        own = code.kernel_functions(fn.shares_code_with[index], ir)
        helpers = [name for f in own for name in code.callees(ir[f]) if name in ir and name not in own]
        record = {"index": index, "label": step.label, "node": step.node.id, "shape": list(step.node.shape),
                  "covers": [node.id for node in step.covers], "flops": step.flops,
                  "bytes": step.bytes_moved, "code_of": fn.shares_code_with[index], "functions": own,
                  "helpers": list(dict.fromkeys(helpers))}
        if times is not None:
            record.update(times[index])
        records.append(record)
    shown = {name for record in records for name in record["functions"] + record["helpers"]}   # not the entry
    assembly = code.assembly_functions([compile_to_assembly(text) for text in modules], shown)
    return records, {name: text for name, text in ir.items() if name in shown}, assembly


def memory_record(fn) -> dict:
    memory = fn.memory
    steps = fn.steps
    intervals = []
    for interval in memory.intervals:
        kind, ident = interval.key
        if kind == "value":
            label = f"%{ident}"
        else:
            label = f"scratch of k{ident} {steps[ident].label}"
        intervals.append({"label": label, "kind": kind, "size": interval.size, "start": interval.start,
                          "end": interval.end, "offset": interval.offset})
    return {"arena": memory.arena_bytes, "peak": memory.peak_live_bytes,
            "total": sum(iv.size for iv in memory.intervals), "steps": len(steps), "intervals": intervals}
