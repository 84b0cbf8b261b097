"""The optimization pipeline: passes run in order, each logged with what it changed.

A pass is any function `(graph, outputs) -> (new_graph, new_outputs)`; its log name is its
`__name__`. `FixedPoint` groups passes that feed each other (simplification exposes duplicates,
merging them exposes simplifications) and reruns them until a round changes nothing.
"""
from __future__ import annotations

import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from graphc.core.ir import Graph, Tensor
from graphc.transforms.constant_folding import fold_constants
from graphc.transforms.cse import cse
from graphc.transforms.dce import dce
from graphc.transforms.elementwise_fusion import fuse_elementwise
from graphc.transforms.factor_sums import factor_sums
from graphc.transforms.fold_channel_scale import fold_channel_scale
from graphc.transforms.rebuild import attrs_key
from graphc.transforms.simplify import simplify
from graphc.transforms.value_reuse import reuse_values

Pass = Callable[[Graph, list[Tensor]], tuple[Graph, list[Tensor]]]


@dataclass(frozen=True)
class FixedPoint:
    """Run `passes` in order, again and again, until a round leaves the graph as it was
    (or `max_rounds` rounds have run)."""

    passes: tuple[Pass, ...]
    max_rounds: int = 4


@dataclass(frozen=True)
class PassRecord:
    """One run of one pass: node counts around it and which ops' counts it changed."""

    name: str
    nodes_before: int
    nodes_after: int
    changes: str
    seconds: float


@dataclass
class OptimizeResult:
    graph: Graph
    outputs: list[Tensor]
    log: list[PassRecord] = field(default_factory=list)
    source: Graph = field(init=False, repr=False)   # the graph optimized

    def __post_init__(self):
        self.source = self.graph

    def summary(self) -> str:
        """The log as a table: one row per pass run."""
        width = max((len(record.name) for record in self.log), default=4)
        rows = [f"{'pass':<{width}}  {'nodes':>11}  {'ms':>6}  changes"]
        for record in self.log:
            counts = f"{record.nodes_before:>4} -> {record.nodes_after:<4}"
            rows.append(f"{record.name:<{width}}  {counts}  {record.seconds * 1e3:>6.1f}  {record.changes}")
        return "\n".join(rows)


DEFAULT_PASSES: list[Union[Pass, FixedPoint]] = [
    dce,
    FixedPoint((fold_constants, simplify, cse)),
    fuse_elementwise,
    factor_sums,
    cse,
    fold_channel_scale,
    reuse_values,
]


def optimize(outputs, passes: Sequence[Union[Pass, FixedPoint]] | None = None) -> OptimizeResult:
    """Run `passes` (default `DEFAULT_PASSES`) on the graph of `outputs` (a Tensor or a list of them).

    The input graph is left untouched; the result holds the new graph, the new tensors standing
    for `outputs` (in the same order), and a log of every pass run."""
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    if not outputs:
        raise ValueError("optimize: needs at least one output")
    result = OptimizeResult(outputs[0].graph, outputs)
    for entry in DEFAULT_PASSES if passes is None else passes:
        if isinstance(entry, FixedPoint):
            _run_to_fixed_point(entry, result)
        else:
            _run_logged(entry, entry.__name__, result)
    return result


def _point_origins_into(graph: Graph, source: Graph) -> None:
    """Make the origin of each node of `graph`, the latest pass's, the node of `source` (the
    graph optimized) it stands for, not a node of a graph in between: followed back, every node
    still reaches the same node of `source` (inspection/collect.py), and the graphs in between
    are freed once the next pass has run instead of living as long as the result, walked by
    every garbage collection of the compile (bench/NOTES.md, "compile time, where ResNet-20's
    cold compile goes")."""
    for node in graph.nodes:
        origin = node.origin
        while origin is not None and origin.graph is not source:
            origin = origin.origin
        node.origin = origin


def _run_to_fixed_point(group: FixedPoint, result: OptimizeResult):
    for round_number in range(1, group.max_rounds + 1):
        before = graph_signature(result.graph, result.outputs)
        for each in group.passes:
            _run_logged(each, f"{each.__name__} #{round_number}", result)
        if graph_signature(result.graph, result.outputs) == before:
            return


def _run_logged(run: Pass, name: str, result: OptimizeResult):
    before = result.graph
    start = time.perf_counter()
    result.graph, result.outputs = run(result.graph, result.outputs)
    seconds = time.perf_counter() - start
    if result.graph is not before:
        _point_origins_into(result.graph, result.source)
    result.log.append(PassRecord(name, len(before.nodes), len(result.graph.nodes),
                                 _op_count_changes(before, result.graph), seconds))


def graph_signature(graph: Graph, outputs: list[Tensor]) -> tuple:
    """Equal for two graphs computing the same nodes in the same order (provenance aside)."""
    return _nodes_signature(graph), tuple(out.id for out in outputs)


# Graph -> (node count, signature of its nodes). Every graph is compared with the one before
# and after it (a fixed point's rounds, the log's changes): made once, not twice.
_signatures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _nodes_signature(graph: Graph) -> tuple:
    known = _signatures.get(graph)
    if known is not None and known[0] == len(graph.nodes):
        return known[1]
    nodes = tuple((node.op, tuple(operand.id for operand in node.inputs), attrs_key(node.attrs),
                   node.shape, node.dtype) for node in graph.nodes)
    _signatures[graph] = (len(graph.nodes), nodes)
    return nodes


def _op_count_changes(before: Graph, after: Graph) -> str:
    """e.g. "ew 20->6, transpose 9->6": the ops whose node counts changed."""
    old = Counter(node.op for node in before.nodes)
    new = Counter(node.op for node in after.nodes)
    changed = [f"{op} {old[op]}->{new[op]}" for op in sorted(old.keys() | new.keys()) if old[op] != new[op]]
    if changed:
        return ", ".join(changed)
    same = before is after or _nodes_signature(before) == _nodes_signature(after)
    return "no change" if same else "same op counts, nodes rewritten"
