"""The report as one HTML file: styles, script, data and drawings inline.

A Content-Security-Policy forbids every fetch, so the page cannot reach the network even if a
name in the data looked like a URL; all text from the program is inserted as text, never as
markup.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

_HERE = Path(__file__).parent
POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


def html_page(title: str, overview: list[tuple[str, str]], graphs: list[dict], kernels: list[dict],
              passes: list[dict], memory: dict, memory_svg: str, data: dict) -> str:
    tabs = [("overview", "Overview")] + [(g["key"], g["title"]) for g in graphs] + [
        ("kernels", f"Kernels ({len(kernels)})"), ("passes", "Passes"), ("memory", "Memory")]
    buttons = "".join(f'<button data-tab="{key}">{escape(label)}</button>' for key, label in tabs)
    sections = [_section("overview", _overview(overview))]
    sections += [_section(g["key"], _legend() + g["svg"]) for g in graphs]
    sections += [_section("kernels", _kernel_table(kernels)), _section("passes", _pass_table(passes)),
                 _section("memory", _memory(memory, memory_svg))]
    # No "<" in the script block at all: "</script" would end it, "<!--" can keep the real end
    # tag from ending it; both as user names could. \u003c is the same JSON string.
    payload = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f'<title>{escape(title)}</title><style>{(_HERE / "page.css").read_text()}</style></head><body>'
            f'<header><h1>{escape(title)}</h1><input id="search" type="search" '
            f'placeholder="find a node: name, op or %number, then Enter"><span id="search-status"></span></header>'
            f'<nav>{buttons}</nav><main><div id="content">{"".join(sections)}</div>'
            f'<aside id="panel"><p>Click a node to see where it comes from and the kernel computing it.</p></aside>'
            f'</main><script type="application/json" id="graphc-data">{payload}</script>'
            f'<script>{(_HERE / "page.js").read_text()}</script></body></html>\n')


def _section(key: str, body: str) -> str:
    return f'<section class="tab" id="tab-{key}" hidden>{body}</section>'


def _overview(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f'<tr><th class="text">{escape(k)}</th><td class="text">{escape(v)}</td></tr>' for k, v in rows)
    return f'<table class="data">{cells}</table>'


def _legend() -> str:
    return ('<p class="legend"><span style="background:#fff3b0">input</span><span style="background:#c8f0c8">param'
            '</span><span style="background:#e0d0f0">state</span><span>forward</span>'
            '<span style="background:#cfe2ff">backward</span><span style="background:#ffe2c4">update</span>'
            ' k<i>N</i>: the kernel computing the node</p>')


def _kernel_table(kernels: list[dict]) -> str:
    timed = kernels and "us" in kernels[0]
    timing = ["µs", "GFLOP/s", "GB/s", "% GEMM peak"] if timed else []
    head = ["k", "what", "node", "shape", "FLOP", "bytes"] + timing
    rows = ["<tr>" + "".join(f'<th{_text_class(h)}>{h}</th>' for h in head) + "</tr>"]
    for k in kernels:
        cells = [f"k{k['index']}", k["label"], f"%{k['node']}", str(tuple(k["shape"])), f"{k['flops']:,}",
                 f"{k['bytes']:,}"]
        if timed:
            peak = k.get("peak")
            cells += [f"{k['us']:.1f}", f"{k['gflops']:.1f}", f"{k['gbs']:.1f}", "" if peak is None else f"{peak:.1f}"]
        rows.append(f'<tr data-kernel="{k["index"]}">' + "".join(
            f'<td{_text_class(h)}>{escape(c)}</td>' for h, c in zip(head, cells)) + "</tr>")
    return f'<p>Click a kernel for its LLVM IR and assembly.</p><table class="data">{"".join(rows)}</table>'


def _text_class(header: str) -> str:
    return ' class="text"' if header in ("what", "shape") else ""


def _pass_table(passes: list[dict]) -> str:
    rows = ['<tr><th class="text">pass</th><th>nodes before</th><th>after</th><th>ms</th>'
            '<th class="text">changes</th></tr>']
    for p in passes:
        rows.append(f'<tr><td class="text">{escape(p["name"])}</td><td>{p["before"]}</td><td>{p["after"]}</td>'
                    f'<td>{p["ms"]:.2f}</td><td class="text">{escape(p["changes"])}</td></tr>')
    return f'<table class="data">{"".join(rows)}</table>'


def _memory(memory: dict, chart: str) -> str:
    facts = (f"<p>Arena {memory['arena']:,} bytes; peak live set {memory['peak']:,} bytes; all buffers together "
             f"{memory['total']:,} bytes (the arena is {memory['arena'] / max(memory['total'], 1):.0%} of that). "
             f"Each bar is one buffer: from the kernel that writes it to its last reader (x), at its arena "
             f"offset (y). Blue: values, orange: kernels' scratch.</p>")
    return facts + chart
