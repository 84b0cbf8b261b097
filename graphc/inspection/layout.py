"""A layered drawing of a DAG, computed in Python so that no system program is needed.

The Sugiyama scheme in its simplest useful form:
1. layers: each node one below its deepest operand; a source (input, param) sits just above its
   first consumer, not at the top of the page;
2. order within layers: barycentre sweeps, down and up, over edges cut into unit steps by
   waypoints (edges spanning more than `MAX_WAYPOINT_SPAN` layers get none: deep networks'
   forward-to-backward edges would otherwise add more waypoints than nodes);
3. x: each node pulled to the mean of its neighbours, overlaps then pushed apart in order.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

LAYER_GAP = 70          # vertical distance between layers, px
NODE_GAP = 18           # horizontal gap between neighbours, px
WAYPOINT_WIDTH = 8
MAX_WAYPOINT_SPAN = 6
SWEEPS = 6


@dataclasses.dataclass
class Box:
    """A node's size, set by the caller (from its label)."""

    width: float
    height: float


@dataclasses.dataclass
class Layout:
    positions: dict[int, tuple[float, float]]     # node -> centre (x, y)
    routes: dict[tuple[int, int], list[tuple[float, float]]]   # edge -> waypoints between its ends
    width: float
    height: float


def layered_layout(nodes: list[int], edges: list[tuple[int, int]], boxes: dict[int, Box],
                   sources: set[int] = frozenset()) -> Layout:
    """Positions for `nodes` (in a topological order) joined by `edges` (operand -> consumer)."""
    operands, consumers = defaultdict(list), defaultdict(list)
    for a, b in edges:
        operands[b].append(a)
        consumers[a].append(b)
    layer = _layers(nodes, operands, consumers, sources)
    rows, waypoints = _rows_with_waypoints(nodes, edges, layer)
    _order_rows(rows, edges, waypoints)
    sizes = {**{n: boxes[n].width for n in nodes}, **{w: WAYPOINT_WIDTH for chain in waypoints.values() for w in chain}}
    xs = _x_positions(rows, _neighbours(edges, waypoints), sizes)
    row_heights = [max((boxes[n].height for n in row if n in boxes), default=0) for row in rows]
    ys, y = [], 20.0
    for height in row_heights:
        ys.append(y + height / 2)
        y += height + LAYER_GAP
    row_of = {n: r for r, row in enumerate(rows) for n in row}
    positions = {n: (xs[n], ys[row_of[n]]) for n in nodes}
    routes = {edge: [(xs[w], ys[row_of[w]]) for w in chain] for edge, chain in waypoints.items()}
    left = min((xs[n] - sizes[n] / 2 for n in xs), default=0.0)
    shift = 20 - left
    positions = {n: (x + shift, y) for n, (x, y) in positions.items()}
    routes = {edge: [(x + shift, y) for x, y in points] for edge, points in routes.items()}
    width = max((x + sizes[n] / 2 for n, (x, _) in positions.items()), default=0.0) + 20
    return Layout(positions, routes, width, y)


def _layers(nodes, operands, consumers, sources) -> dict[int, int]:
    layer: dict[int, int] = {}
    for n in nodes:
        if n not in sources:
            layer[n] = 1 + max((layer[a] for a in operands[n] if a in layer), default=0)
    for n in nodes:
        if n in sources:
            placed = [layer[c] for c in consumers[n] if c in layer]
            layer[n] = max(min(placed) - 1, 0) if placed else 0
    # a source placed above a consumer whose other operands are deeper can still be on a
    # consumer's layer only if that consumer is at layer 0, which the -1 above excludes
    return layer


def _rows_with_waypoints(nodes, edges, layer):
    depth = max(layer.values(), default=0) + 1
    rows: list[list[int]] = [[] for _ in range(depth)]
    for n in nodes:
        rows[layer[n]].append(n)
    waypoints: dict[tuple[int, int], list[int]] = {}
    next_id = -1
    for a, b in edges:
        span = layer[b] - layer[a]
        if 1 < span <= MAX_WAYPOINT_SPAN and (a, b) not in waypoints:
            chain = []
            for r in range(layer[a] + 1, layer[b]):
                rows[r].append(next_id)
                chain.append(next_id)
                next_id -= 1
            waypoints[(a, b)] = chain
    return rows, waypoints


def _unit_edges(edges, waypoints):
    """Every edge as its one-layer pieces, through its waypoints."""
    for a, b in edges:
        path = [a] + waypoints.get((a, b), []) + [b]
        yield from zip(path, path[1:])


def _neighbours(edges, waypoints) -> dict[int, list[int]]:
    """Each node's neighbours one layer away (waypoints included), both directions."""
    adjacent: dict[int, list[int]] = defaultdict(list)
    for u, v in _unit_edges(edges, waypoints):
        adjacent[u].append(v)
        adjacent[v].append(u)
    return adjacent


def _order_rows(rows, edges, waypoints):
    up: dict[int, list[int]] = defaultdict(list)
    down: dict[int, list[int]] = defaultdict(list)
    for u, v in _unit_edges(edges, waypoints):
        down[u].append(v)
        up[v].append(u)
    for sweep in range(SWEEPS):
        downward = sweep % 2 == 0
        sequence = range(1, len(rows)) if downward else range(len(rows) - 2, -1, -1)
        for r in sequence:
            reference = rows[r - 1] if downward else rows[r + 1]
            index = {n: i for i, n in enumerate(reference)}
            linked = up if downward else down
            rows[r] = _sorted_by_barycentre(rows[r], linked, index)


def _sorted_by_barycentre(row, linked, index):
    keyed = []
    for position, n in enumerate(row):
        seen = [index[m] for m in linked[n] if m in index]
        keyed.append((sum(seen) / len(seen) if seen else position, position, n))
    return [n for _, _, n in sorted(keyed)]


def _x_positions(rows, adjacent, sizes) -> dict[int, float]:
    xs: dict[int, float] = {}
    for row in rows:
        x = 0.0
        for n in row:
            xs[n] = x + sizes[n] / 2
            x += sizes[n] + NODE_GAP
    for _ in range(8):
        for row in rows:
            wanted = [sum(xs[m] for m in adjacent[n]) / len(adjacent[n]) if adjacent[n] else xs[n] for n in row]
            _place_in_order(row, wanted, sizes, xs)
    return xs


def _place_in_order(row, wanted, sizes, xs):
    """Put the row's nodes as near `wanted` as their order and widths allow (least squares):
    nodes that would overlap merge into a block centred on its members' wishes, and blocks
    merge again while they overlap (pool-adjacent-violators)."""
    blocks: list[list] = []     # [first index, last index, sum of wishes relative to the block start, count]
    offsets, offset = [], 0.0   # each node's centre relative to its block's first node
    for i, n in enumerate(row):
        if i:
            offset += (sizes[row[i - 1]] + sizes[n]) / 2 + NODE_GAP
        offsets.append(offset)
    for i in range(len(row)):
        blocks.append([i, i, wanted[i] - offsets[i], 1])
        while len(blocks) > 1:
            (a0, a1, a_sum, a_n), (b0, b1, b_sum, b_n) = blocks[-2], blocks[-1]
            if b_sum / b_n > a_sum / a_n:   # block starts (relative to node 0's frame) stay in order
                break
            blocks[-2:] = [[a0, b1, a_sum + b_sum, a_n + b_n]]
    for first, last, total, count in blocks:
        start = total / count
        for i in range(first, last + 1):
            xs[row[i]] = start + offsets[i]
