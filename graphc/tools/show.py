"""`graphc show`: print and draw the graphs a script builds, forward and backward, with the
kernels (fusion groups) the compiler makes of them."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from graphc.backend.lowering import kernel_groups
from graphc.core.autodiff import grad
from graphc.core.display import listing, to_dot
from graphc.core.ir import FLOAT_DTYPES, collect_graphs
from graphc.tools.plots import render_dot
from graphc.transforms import optimize


def run_script(script: str, args: list[str]) -> list:
    """Run `script` as __main__ and return the graphs it created."""
    saved_argv = sys.argv
    sys.argv = [script] + list(args)
    try:
        with collect_graphs() as graphs:
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = saved_argv
    return graphs


def final_loss(graph):
    """The graph's loss: the last scalar float forward node nothing else reads."""
    used = {operand.id for node in graph.nodes for operand in node.inputs}
    for node in reversed(graph.nodes):
        if node.size == 1 and node.dtype in FLOAT_DTYPES and node.id not in used and not node.is_backward:
            return node
    return None


def show(script: str, *, with_grad: bool, out_dir: str, script_args=()) -> int:
    graphs = [g for g in run_script(script, list(script_args)) if g.nodes]
    if not graphs:
        print(f"{script} built no graphc graph")
        return 1
    out = Path(out_dir)
    for index, graph in enumerate(graphs):
        loss = final_loss(graph)
        has_backward = any(node.is_backward for node in graph.nodes)
        if with_grad and loss is not None and not has_backward and graph.params:
            grad(loss, list(graph.params.values()))
        read = {operand.id for node in graph.nodes for operand in node.inputs}
        outputs = [node for node in graph.nodes if node.id not in read and node.op not in ("input", "param")]
        print(listing(graph))
        optimized = optimize(outputs)
        groups = kernel_groups(optimized.graph, optimized.outputs)
        print(f"\noptimized for native code ({len(set(groups.values()))} kernels; [kN] is the kernel computing a node):")
        print(listing(optimized.graph, groups=groups))
        stem = out / f"{index}_{safe_file_name(graph.name)}"
        for suffix, dot in (("", to_dot(graph)), ("_kernels", to_dot(optimized.graph, groups=groups))):
            path, hint = render_dot(dot, f"{stem}{suffix}")
            print(hint or f"wrote {path}")
        print()
    return 0


def safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
