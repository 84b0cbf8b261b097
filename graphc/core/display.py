"""Reading a graph: a text listing and Graphviz DOT, forward and backward nodes told apart."""
from __future__ import annotations

from graphc.core.ir import Graph, Tensor
from graphc.core.ops.registry import OPS

_SHORT_DTYPES = {"float32": "f32", "float64": "f64", "int32": "i32", "int64": "i64"}


def type_string(t: Tensor) -> str:
    return f"{_SHORT_DTYPES.get(t.dtype, t.dtype)}[{','.join(map(str, t.shape))}]"


def node_summary(node: Tensor) -> str:
    """`conv2d(%0, %1) stride=(1, 1) ...`, or `param conv1.w` for sources."""
    if node.op in ("input", "param"):
        return f"{source_kind(node)} {node.name}"
    operands = ", ".join(f"%{operand.id}" for operand in node.inputs)
    attrs = OPS[node.op].describe(node.attrs)
    named = f" '{node.name}'" if node.name else ""
    return f"{node.op}({operands}){named}" + (f" {attrs}" if attrs else "")


def source_kind(node: Tensor) -> str:
    """"input", "param", or for state the program keeps: "buffer" or "random key"."""
    graph = node.graph
    if node.op == "param" and graph.buffers.get(node.name) is node:
        return "buffer"
    if node is graph.random_key:
        return "random key"
    return node.op


def listing(graph: Graph, nodes=None, groups: dict[int, str] | None = None) -> str:
    """One line per node. `groups` (node id -> kernel label) adds the kernel computing each node."""
    nodes = graph.nodes if nodes is None else list(nodes)
    backward = sum(node.is_backward for node in nodes)
    state = f"{len(graph.buffers)} buffers (state), " if graph.buffers else ""
    lines = [f"graph {graph.name!r}: {len(graph.inputs)} inputs, {len(graph.params)} params, {state}"
             f"{len(nodes)} nodes ({len(nodes) - backward} forward, {backward} backward; "
             f"* marks a backward node, 'grad of %k' the forward node it serves)"]
    summaries = [node_summary(node) for node in nodes]
    width = min(max((len(s) for s in summaries), default=0), 72)
    id_width = len(str(len(graph.nodes)))
    group_width = max((len(label) for label in (groups or {}).values()), default=1)
    for node, summary in zip(nodes, summaries):
        mark = "*" if node.is_backward else " "
        origin = f"grad of %{node.grad_of.id}  {node.site}" if node.is_backward else node.site
        group = f"[{groups.get(node.id, '-')}]".ljust(group_width + 3) if groups is not None else ""
        lines.append(f"{mark} {group}%{node.id:<{id_width}} = {summary:<{width}}  {type_string(node):<18} {origin}")
    return "\n".join(lines)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(graph: Graph, outputs=None, groups: dict[int, str] | None = None) -> str:
    """Graphviz DOT. Forward ops: white boxes; inputs yellow, params green, buffers (state)
    lilac and dashed; backward ops blue
    and dashed, each labelled with the forward node whose gradient it computes. `groups`
    (node id -> kernel label) draws the nodes one kernel computes inside one box (a cluster)."""
    if outputs is None:
        nodes, updates = graph.nodes, graph.buffer_updates
    else:
        outputs = list(outputs)
        updates = graph.buffer_updates_for(outputs)
        nodes = graph.ancestors(outputs + [update.value for update in updates])
    lines = [f'digraph "{_dot_escape(graph.name)}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];']
    for node in nodes:
        label = [f"%{node.id} {node_summary(node)}", type_string(node)]
        if node.op == "input":
            style = 'shape=ellipse, fillcolor="#fff3b0"'
        elif source_kind(node) in ("buffer", "random key"):
            style = 'shape=ellipse, fillcolor="#e0d0f0", style="filled,dashed"'   # state, not trained
        elif node.op == "param":
            style = 'shape=ellipse, fillcolor="#c8f0c8"'
        elif node.is_backward:
            label.append(f"grad of %{node.grad_of.id}")
            style = 'fillcolor="#cfe2ff", color="#1f4e9c", style="rounded,filled,dashed"'
        else:
            style = ""
        # escape each line, then join with DOT's line break (escaping the joined text would turn
        # the break into a literal backslash-n)
        text = "\\n".join(_dot_escape(part) for part in label)
        lines.append(f'  n{node.id} [label="{text}"{", " + style if style else ""}];')
    lines += _kernel_clusters(nodes, groups or {})
    shown = {node.id for node in nodes}
    for node in nodes:
        for operand in node.inputs:
            if operand.id in shown:
                edge_style = ' [color="#1f4e9c"]' if node.is_backward else ""
                lines.append(f"  n{operand.id} -> n{node.id}{edge_style};")
    for update in updates:   # the in-place write of a buffer, closing a loop across calls
        lines.append(f'  n{update.value.id} -> n{update.buffer.id} [style=dashed, color="#7040a0", '
                     f'label="updates", constraint=false];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _kernel_clusters(nodes, groups: dict[int, str]) -> list[str]:
    """One DOT cluster per kernel, around the nodes it computes."""
    members: dict[str, list[int]] = {}
    for node in nodes:
        if node.id in groups:
            members.setdefault(groups[node.id], []).append(node.id)
    return [f'  subgraph cluster_{index} {{ label="{_dot_escape(group)}"; style="rounded"; color="#c05000"; '
            + " ".join(f"n{i};" for i in ids) + " }"
            for index, (group, ids) in enumerate(members.items())]
