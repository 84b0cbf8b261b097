"""`graphc report SCRIPT.py`: the HTML report (gc.report) of each graph a script builds.

A graph with a scalar loss and params becomes a training step (SGD; the report shows the
gradient graph the compiler derives); any other graph a compiled function of the values
nothing in it reads. The params are made by `gc.init_params`, so the script needs none.
"""
from __future__ import annotations

from pathlib import Path

from graphc.backend.compiler import compile as compile_function
from graphc.backend.compiler import compile_training_step
from graphc.core.init import init_params
from graphc.core.optim import SGD
from graphc.inspection import report
from graphc.tools.show import final_loss, run_script, safe_file_name


def report_script(script: str, *, out_dir: str, script_args=()) -> int:
    graphs = [g for g in run_script(script, list(script_args)) if g.nodes]
    if not graphs:
        print(f"{script} built no graphc graph")
        return 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for index, graph in enumerate(graphs):
        path = out / f"{index}_{safe_file_name(graph.name)}.html"
        try:
            fn = _compiled(graph)
        except (NotImplementedError, ValueError, TypeError) as why:
            print(f"graph {graph.name!r}: not compiled, so no report: {why}")
            failures += 1
            continue
        report(fn, path)
        print(f"wrote {path}")
    return 1 if failures == len(graphs) else 0


def _compiled(graph):
    params = init_params(graph, seed=0)
    loss = final_loss(graph)
    if loss is not None and not any(node.is_backward for node in graph.nodes) and graph.params:
        return compile_training_step(loss, params, SGD(lr=0.01))
    read = {operand.id for node in graph.nodes for operand in node.inputs}
    outputs = [node for node in graph.nodes if node.id not in read and node.op not in ("input", "param")]
    return compile_function(outputs, params)
