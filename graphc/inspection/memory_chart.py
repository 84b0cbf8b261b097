"""The memory plan as a chart: each buffer a bar from the kernel writing it to its last reader
(x), at its offset in the arena (y), as static planners (TVM's, Glow's) are usually shown."""
from __future__ import annotations

from html import escape

WIDTH, HEIGHT, MARGIN = 900, 360, 40


def memory_chart(memory: dict) -> str:
    steps, arena = max(memory["steps"], 1), max(memory["arena"], 1)
    column = (WIDTH - 2 * MARGIN) / steps
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="memory" width="{WIDTH}" height="{HEIGHT + 2 * MARGIN}">',
             f'<text x="{MARGIN}" y="{MARGIN - 12}" font-size="11">arena offset ↓ ({arena:,} B in all); '
             f'kernel index →</text>']
    for interval in memory["intervals"]:
        x = MARGIN + interval["start"] * column
        width = (interval["end"] - interval["start"] + 1) * column
        y = MARGIN + interval["offset"] / arena * HEIGHT
        height = max(interval["size"] / arena * HEIGHT, 0.5)
        tip = (f'{interval["label"]}: {interval["size"]:,} B at offset {interval["offset"]:,}, '
               f'live k{interval["start"]}..k{interval["end"]}')
        parts.append(f'<rect class="{interval["kind"]}" x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                     f'height="{height:.1f}"><title>{escape(tip)}</title></rect>')
    for k in range(0, steps, max(1, steps // 20)):
        parts.append(f'<text x="{MARGIN + (k + 0.5) * column:.1f}" y="{HEIGHT + MARGIN + 14}" font-size="10" '
                     f'text-anchor="middle">k{k}</text>')
    parts.append("</svg>")
    return "".join(parts)
