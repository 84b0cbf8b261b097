"""A graph view drawn as inline SVG: one <g class="node"> per node, one <path> per edge."""
from __future__ import annotations

from html import escape

from graphc.core.display import node_summary, type_string
from graphc.inspection.collect import GraphView
from graphc.inspection.layout import Box, layered_layout

CHAR_WIDTH = 6.4      # px per character of the 11px monospace labels
MAX_LABEL = 46        # characters; longer summaries are cut (the side panel shows them whole)
NODE_HEIGHT = 36


def node_lines(node, kernels: list[int]) -> tuple[str, str]:
    first = f"%{node.id} {node_summary(node)}"
    if len(first) > MAX_LABEL:
        first = first[:MAX_LABEL - 1] + "…"
    second = type_string(node)
    if kernels:
        second += "  k" + ",k".join(map(str, kernels[:3])) + ("…" if len(kernels) > 3 else "")
    return first, second


def draw(view: GraphView) -> str:
    ids = [node.id for node in view.nodes]
    shown = set(ids)
    edges = list(dict.fromkeys((operand.id, node.id) for node in view.nodes for operand in node.inputs
                               if operand.id in shown))
    labels = {node.id: node_lines(node, view.kernels_of.get(node.id, [])) for node in view.nodes}
    boxes = {i: Box(max(len(a), len(b)) * CHAR_WIDTH + 16, NODE_HEIGHT) for i, (a, b) in labels.items()}
    sources = {node.id for node in view.nodes if node.op in ("input", "param", "constant", "fill")}
    layout = layered_layout(ids, edges, boxes, sources)
    backward = {node.id for node in view.nodes if node.is_backward}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" data-graph="{view.key}" '
             f'width="{layout.width:.0f}" height="{layout.height:.0f}" '
             f'viewBox="0 0 {layout.width:.0f} {layout.height:.0f}">']
    for a, b in edges:
        points = [_bottom(layout.positions[a], boxes[a])] + layout.routes.get((a, b), []) + \
                 [_top(layout.positions[b], boxes[b])]
        css = "edge backward" if b in backward else "edge"
        parts.append(f'<path class="{css}" data-from="{a}" data-to="{b}" d="{_curve(points)}"/>')
    for node in view.nodes:
        x, y = layout.positions[node.id]
        box = boxes[node.id]
        first, second = labels[node.id]
        kernels = view.kernels_of.get(node.id, [])
        palette = f' style="--kernel-hue:{(kernels[0] * 47) % 360}"' if view.clusters and kernels else ""
        parts.append(
            f'<g class="node {view.kinds[node.id]}{" in-kernel" if view.clusters and kernels else ""}" '
            f'data-id="{node.id}" transform="translate({x - box.width / 2:.1f},{y - box.height / 2:.1f})"{palette}>'
            f'<rect width="{box.width:.1f}" height="{box.height}" rx="6"/>'
            f'<text x="8" y="15">{escape(first)}</text><text x="8" y="29" class="sub">{escape(second)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _bottom(centre, box):
    return centre[0], centre[1] + box.height / 2


def _top(centre, box):
    return centre[0], centre[1] - box.height / 2


def _curve(points) -> str:
    """A smooth path through `points`: vertical tangents at every point, as layered drawings do."""
    (x0, y0), rest = points[0], points[1:]
    path = [f"M{x0:.1f},{y0:.1f}"]
    for x1, y1 in rest:
        middle = (y0 + y1) / 2
        path.append(f"C{x0:.1f},{middle:.1f} {x1:.1f},{middle:.1f} {x1:.1f},{y1:.1f}")
        x0, y0 = x1, y1
    return "".join(path)
