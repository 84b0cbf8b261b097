"""`gc.report`: one self-contained HTML file showing everything inside a compiled step.

    gc.report(step, "step.html", feeds={"x": xb, "y": yb})

The page needs no network, no other file and no system program: graphs are laid out in Python
(layout.py) and drawn as inline SVG (svg.py); the page's script and styles are inline (page.py).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from graphc.inspection import collect
from graphc.inspection.memory_chart import memory_chart
from graphc.inspection.page import html_page
from graphc.inspection.svg import draw

__all__ = ["report"]


def report(fn, path, feeds: Mapping | None = None, *, repeats: int = 20) -> Path:
    """Write the report of `fn` (a `gc.compile` function or a `gc.compile_training_step` step)
    to `path`. With `feeds` (the inputs of one call), each kernel is timed over `repeats` calls
    on copies of the params: nothing is trained. Returns the path written."""
    from graphc.backend.compiler import CompiledFunction, CompiledTrainingStep
    if not isinstance(fn, CompiledFunction):
        raise TypeError(f"report: expected a function from gc.compile or a step from gc.compile_training_step, "
                        f"got {type(fn).__name__}")
    if feeds is not None and not isinstance(feeds, Mapping):
        raise TypeError(f"report: feeds must be a dict of input name -> array, got {type(feeds).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"report: path must be a file name, got {type(path).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"report: the folder {str(path.parent)!r} of {str(path)!r} does not exist")
    times, timing = None, None
    if feeds is not None:
        timing = fn.profile(dict(feeds), repeats=repeats).with_gemm_peak()
        times = _kernel_times(timing)

    views = collect.graph_views(fn)
    kernels, ir, assembly = collect.kernel_records(fn, times)
    memory = collect.memory_record(fn)
    graphs = [{"key": v.key, "title": v.title, "svg": draw(v),
               "nodes": {str(n.id): collect.node_record(n, v.kinds[n.id], v.kernels_of.get(n.id, [])) for n in v.nodes}}
              for v in views]
    kind = "training step" if isinstance(fn, CompiledTrainingStep) else "compiled function"
    name = fn.source_outputs[0].graph.name
    title = f"graphc report: {name} ({kind})"
    data = {"graphs": [{"key": g["key"], "title": g["title"], "nodes": g["nodes"]} for g in graphs],
            "kernels": kernels, "ir": ir, "asm": assembly}
    page = html_page(title, _overview(fn, kind, views, kernels, memory, timing), graphs, kernels,
                     collect.pass_records(fn), memory, memory_chart(memory), data)
    path.write_text(page, encoding="utf-8")
    return path


def _kernel_times(timing) -> list[dict]:
    """Each kernel's time and rates, as step.profile() reports them."""
    times = []
    for kernel in timing.kernels:
        fraction = timing.fraction_of_peak(kernel)
        times.append({"us": kernel.seconds * 1e6, "gflops": kernel.gflop_per_s or 0.0, "gbs": kernel.gb_per_s or 0.0,
                      "peak": 100 * fraction if fraction is not None else None})
    return times


def _overview(fn, kind, views, kernels, memory, timing) -> list[tuple[str, str]]:
    rows = [("what", kind), ("threads", str(fn.num_threads)), ("kernels", str(len(kernels))),
            ("FLOP per call", f"{sum(k['flops'] for k in kernels):,}"),
            ("least bytes moved per call", f"{sum(k['bytes'] for k in kernels):,}")]
    for view in views:
        backward = sum(node.is_backward for node in view.nodes)
        rows.append((view.title, f"{len(view.nodes)} nodes" + (f" ({backward} backward)" if backward else "")))
    rows.append(("memory", f"arena {memory['arena']:,} B, peak live {memory['peak']:,} B, "
                           f"all buffers {memory['total']:,} B"))
    if timing is not None:
        rows.append(("time per call", f"{timing.seconds_per_call * 1e6:.1f} µs "
                                      f"(kernels {timing.native_seconds * 1e6:.1f} µs)"))
        rows.append(("GEMM peak", f"{timing.gemm_peak_gflops:.1f} GFLOP/s on {timing.threads} thread(s): "
                                  f"graphc's own 512³ float32 GEMM, measured now"))
    return rows

