"""Scheduling and static memory planning for a lowered program.

The schedule is a topological order of the steps (networkx) over true dependences (a step reads
what another writes) and anti-dependences (a step that updates a param in place runs after
every other reader of the old value). Memory: every intermediate value and every step's
scratch gets an interval of liveness over the schedule; intervals that never overlap in time
share addresses in one arena (greedy best-fit by decreasing size, as in TVM's and Glow's static
planners). Params, inputs, outputs and in-place updates live in the caller's arrays instead.
"""
from __future__ import annotations

import dataclasses

import networkx as nx

from graphc.backend.lowering import Step, alias_root

ALIGNMENT = 64


def schedule(steps: list[Step], inplace: dict[int, int]) -> list[Step]:
    """Steps in an order that respects dependences; `inplace` maps a step node id to the id of the
    source (param/state) node whose buffer it overwrites. A step overwriting a source (as its
    result or a side write) runs after every other step reading that source."""
    producer = {node.id: i for i, step in enumerate(steps) for node in step.outputs}
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(steps)))
    readers: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        for operand in step.operands:
            root = alias_root(operand)
            readers.setdefault(root.id, []).append(i)
            if root.id in producer and producer[root.id] != i:
                dg.add_edge(producer[root.id], i)
    for i, step in enumerate(steps):
        sources = [inplace.get(step.node.id)] + [source.id for source in step.side_writes]
        for source in sources:
            for reader in readers.get(source, []) if source is not None else []:
                if reader != i:
                    dg.add_edge(reader, i)
    if not nx.is_directed_acyclic_graph(dg):
        raise RuntimeError("internal error: in-place updates make the step graph cyclic")
    return [steps[i] for i in nx.lexicographical_topological_sort(dg)]


@dataclasses.dataclass
class Interval:
    key: object        # ("value", node id) or ("scratch", step index)
    size: int          # bytes
    start: int         # first step index where live
    end: int           # last step index where live
    offset: int = -1


@dataclasses.dataclass
class MemoryPlan:
    offsets: dict[object, int]
    arena_bytes: int
    peak_live_bytes: int           # the largest sum of live intervals at any step (a lower bound)
    intervals: list[Interval] = dataclasses.field(default_factory=list)   # each buffer's lifetime, placed

    def offset_of_value(self, node_id: int) -> int | None:
        return self.offsets.get(("value", node_id))

    def offset_of_scratch(self, step_index: int) -> int | None:
        return self.offsets.get(("scratch", step_index))


def plan_memory(ordered: list[Step], scratch_bytes: list[int], in_arena: list[bool]) -> MemoryPlan:
    """Arena offsets for intermediate values and scratch. `in_arena[i]`: step i's value lives in the
    arena (not in an output, param or state buffer of the caller's)."""
    last_use: dict[int, int] = {}
    for i, step in enumerate(ordered):
        for operand in step.operands:
            last_use[alias_root(operand).id] = i
    intervals = []
    for i, step in enumerate(ordered):
        # a step's extra outputs always live in the arena (lowering.py keeps outputs out of them)
        for node in ([step.node] if in_arena[i] else []) + step.extra_outputs:
            intervals.append(Interval(("value", node.id), _bytes(node), i, max(i, last_use.get(node.id, i))))
        if scratch_bytes[i]:
            intervals.append(Interval(("scratch", i), scratch_bytes[i], i, i))
    arena = _assign_offsets(intervals)
    peak = max((sum(iv.size for iv in intervals if iv.start <= s <= iv.end) for s in range(len(ordered))), default=0)
    return MemoryPlan({iv.key: iv.offset for iv in intervals}, arena, peak, intervals)


def _bytes(node) -> int:
    size = node.size * 4
    return -(-size // ALIGNMENT) * ALIGNMENT


def _assign_offsets(intervals: list[Interval]) -> int:
    """Place each interval at the lowest aligned offset free during its lifetime; returns the arena size."""
    placed: list[Interval] = []
    for iv in sorted(intervals, key=lambda iv: (-iv.size, iv.start)):
        size = -(-iv.size // ALIGNMENT) * ALIGNMENT
        busy = sorted((p.offset, p.offset + -(-p.size // ALIGNMENT) * ALIGNMENT) for p in placed
                      if p.start <= iv.end and iv.start <= p.end)
        offset = 0
        for lo, hi in busy:
            if offset + size <= lo:
                break
            offset = max(offset, hi)
        iv.offset = offset
        placed.append(iv)
    return max((p.offset + p.size for p in placed), default=0)
