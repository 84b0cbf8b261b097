"""Copying the part of a graph its outputs need into a fresh Graph, substituting nodes on the way.

Every pass is a `rebuild` with a rewrite hook. The hook sees each needed node in topological
order, with its operands already rewritten, and returns what stands for the node in the new
graph: an existing new node, a node it builds through the `Rewrite` helpers, `Absorbed` (the
node is computed inside a consumer and gets no node of its own), or None to copy it unchanged.
Nodes that substitutions leave without consumers are dropped by a final compaction.

A rebuilt graph keeps, from the original:
- every declared input and param, in declaration order, so feeds and params bind identically;
- provenance: the nodes built while rewriting node `n` get `n.site`, and `grad_of` pointing at
  the new-graph stand-in of `n.grad_of`: what that forward node became; if it was absorbed into
  a consumer, that consumer's stand-in; if it disappeared, its nearest surviving ancestor's;
  and `origin`, the node `n` itself, so an optimized node leads back to the one the user wrote.

The IR gives a new node the caller's site and the `building_gradient_of` block's forward node,
and has no call that copies another node's provenance; so provenance is copied by assigning
`site` and `grad_of` on nodes of the graph being built, which nothing else has seen yet
(`_declare`, `_stamp_provenance`, `_link_gradients`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import numpy as np
import sympy

from graphc.core.errors import building_for
from graphc.core.ir import ConstArray, Graph, Tensor
from graphc.core.ops.elementwise import make_ew
from graphc.core.ops.registry import OPS
from graphc.core.ops.sources import fill

DECLARED_OPS = ("input", "param")


@dataclass(frozen=True)
class Absorbed:
    """A rewrite's answer for a node computed inside a consumer: it gets no node of its own.

    `into` is the old-graph node whose replacement computes it, which stands for it in
    provenance (the `grad_of` of the node's backward nodes)."""

    into: Tensor


Replacement = Union[Tensor, Absorbed, None]
RewriteHook = Callable[["Rewrite"], Replacement]


class Rewrite:
    """What a rewrite hook sees of the node being copied, and how it builds new nodes."""

    def __init__(self, copy: "_Copy", node: Tensor):
        self._copy = copy
        self.node = node

    @property
    def operands(self) -> list[Tensor]:
        """The new-graph tensors standing for the node's operands."""
        return [self.new(operand) for operand in self.node.inputs]

    def new(self, old: Tensor) -> Tensor:
        """The new-graph tensor standing for `old`, a node of the old graph visited before this one."""
        return self._copy.value_of(old)

    def copy(self, operands: list[Tensor] | None = None) -> Tensor:
        """The node itself, built on `operands` (default: its rewritten operands)."""
        return self._copy.copy_node(self.node, self.operands if operands is None else operands)

    def apply(self, op_name: str, operands: list[Tensor], **attrs) -> Tensor:
        """A new `op_name` node; its type rule runs again."""
        return OPS[op_name].apply(list(operands), site=self.node.site, **attrs)

    def ew(self, expr: sympy.Expr, operands: list[Tensor]) -> Tensor:
        """An elementwise node computing `expr` over `operands`, shaped like the node being rewritten."""
        if not operands:
            return self.fill(float(expr))
        return make_ew(expr, list(operands), self.node.shape, site=self.node.site)

    def fill(self, value: float) -> Tensor:
        """A fill of `value`, shaped and typed like the node being rewritten."""
        return fill(self._copy.new, self.node.shape, value, self.node.dtype, site=self.node.site)

    def constant(self, array: np.ndarray) -> Tensor:
        """A constant holding `array` (cast to the node's dtype), standing for the node being rewritten."""
        array = np.asarray(array, dtype=self.node.dtype)
        return self._copy.new.add_node("constant", [], {"value": ConstArray(array)}, array.shape, self.node.dtype,
                                       site=self.node.site)


def rebuild(graph: Graph, outputs: Iterable[Tensor], rewrite: RewriteHook | None = None
            ) -> tuple[Graph, list[Tensor]]:
    """A new Graph computing `outputs`, each needed node replaced by what `rewrite` returns for it.

    Without a hook this is a copy of what the outputs need: dead-code elimination."""
    outputs = _checked_outputs(graph, outputs)
    copy = _Copy(graph, rewrite)
    new_outputs = copy.run(outputs)
    # Substitutions orphan some of the nodes copied before them.
    _drop_dead_nodes(copy.new, new_outputs)
    return copy.new, new_outputs


def rebuild_if_changed(graph: Graph, outputs: Iterable[Tensor], make_rewrite: Callable[[], RewriteHook]
                       ) -> tuple[Graph, list[Tensor]]:
    """`rebuild(graph, outputs, make_rewrite())`, or `graph` itself where that would copy every
    node as it is: a fixed point's last round, and late passes, mostly change nothing.

    A fresh hook is asked about each node first, in a probe that builds nothing (stateful hooks
    such as cse's need a fresh one for the rebuild that may follow); the probe stops at the
    first node the hook would change."""
    outputs = _checked_outputs(graph, outputs)
    if _rewrite_changes(graph, outputs, make_rewrite()):
        return rebuild(graph, outputs, make_rewrite())
    return graph, outputs


def _checked_outputs(graph: Graph, outputs: Iterable[Tensor]) -> list[Tensor]:
    outputs = list(outputs)
    for out in outputs:
        if not isinstance(out, Tensor) or out.graph is not graph:
            raise ValueError(f"rebuild: every output must be a Tensor of graph {graph.name!r}, got {out!r}")
    return outputs


class _WouldChange(Exception):
    """Raised by a probe where the hook starts building a replacement."""


class _Probe(Rewrite):
    """A Rewrite over the graph itself: every node stands for itself, and building anything
    means the node would change."""

    def __init__(self, node: Tensor):
        self.node = node

    @property
    def operands(self) -> list[Tensor]:
        return list(self.node.inputs)

    def new(self, old: Tensor) -> Tensor:
        return old

    def copy(self, operands: list[Tensor] | None = None) -> Tensor:
        if operands is None or list(operands) == list(self.node.inputs):
            return self.node
        raise _WouldChange

    def apply(self, op_name: str, operands: list[Tensor], **attrs) -> Tensor:
        raise _WouldChange

    def ew(self, expr: sympy.Expr, operands: list[Tensor]) -> Tensor:
        raise _WouldChange

    def fill(self, value: float) -> Tensor:
        raise _WouldChange

    def constant(self, array: np.ndarray) -> Tensor:
        raise _WouldChange


def _rewrite_changes(graph: Graph, outputs: list[Tensor], rewrite: RewriteHook) -> bool:
    """Whether `rebuild(graph, outputs, rewrite)` would differ from `graph`."""
    if len(_live_ids(graph, outputs)) < len(graph.nodes):
        return True
    try:
        for node in graph.nodes:
            if node.op not in DECLARED_OPS:
                replacement = rewrite(_Probe(node))
                if replacement is not None and replacement is not node:
                    return True
    except _WouldChange:
        return True
    return False


def attrs_key(attrs: dict) -> tuple:
    """A node's attributes as a hashable, order-independent value (sympy compares structurally)."""
    return tuple(sorted(attrs.items(), key=lambda item: item[0]))


class _Copy:
    """One copy of `old` into a fresh graph, node by node in topological order."""

    def __init__(self, old: Graph, rewrite: RewriteHook | None):
        self.old = old
        self.new = Graph(old.name)
        self.rewrite = rewrite
        self.values: dict[int, Tensor | Absorbed] = {}
        self.built_for: dict[int, Tensor] = {}  # new node id -> the old node it was built for

    def run(self, outputs: list[Tensor]) -> list[Tensor]:
        # Declarations keep their places among the other nodes, so copying a clean graph changes nothing.
        needed = {node.id for node in needed_nodes(self.old, outputs)}
        for node in self.old.nodes:
            if node.op in DECLARED_OPS:
                self._declare(node)
            elif node.id in needed:
                self._visit(node)
        self._link_gradients()
        self._carry_buffer_updates()
        return [self.value_of(out) for out in outputs]

    def value_of(self, old: Tensor) -> Tensor:
        value = self.values.get(old.id)
        if isinstance(value, Tensor):
            return value
        if isinstance(value, Absorbed):
            raise RuntimeError(f"%{old.id} ({old.op}) was absorbed into %{value.into.id}, "
                               f"yet a node of the rebuilt graph uses it")
        raise RuntimeError(f"%{old.id} ({old.op}) is used before it was rebuilt")

    def copy_node(self, node: Tensor, operands: list[Tensor]) -> Tensor:
        if len(operands) == len(node.inputs) and all(new.shape == old.shape and new.dtype == old.dtype
                                                     for new, old in zip(operands, node.inputs)):
            # Every stand-in has its original's type (_check_replacement), so the type rule
            # would give the node's own: skip it (it is most of a pass's time on deep networks).
            return self.new.add_node(node.op, operands, node.attrs, node.shape, node.dtype, name=node.name,
                                     site=node.site)
        return OPS[node.op].apply(operands, site=node.site, name=node.name, **node.attrs)

    def _declare(self, node: Tensor):
        with building_for(node.site):      # the node's line, without walking the stack for it
            self._declare_like(node)

    def _declare_like(self, node: Tensor):
        old, name = self.old, node.name
        if node.op == "input":
            new = self.new.input(name, node.shape, node.dtype)
        elif node is old.random_key:
            new = self.new.random_key_node()
        elif name in old.buffers:
            new = self.new.buffer(name, node.shape, init=old.initial_values.get(name, 0.0))
        else:
            new = self.new.param(name, node.shape, node.dtype, init=old.initial_values.get(name))
        self.values[node.id] = new
        new.site = node.site
        new.origin = node

    def _carry_buffer_updates(self):
        """The old graph's buffer updates whose owner and value both have a stand-in here."""
        for update in self.old.buffer_updates:
            owner, value = self.values.get(update.owner.id), self.values.get(update.value.id)
            if isinstance(owner, Tensor) and isinstance(value, Tensor):
                self.new.update_buffer(self.values[update.buffer.id], value, owner)

    def _visit(self, node: Tensor):
        first_new_id = len(self.new.nodes)
        # Nodes a rewrite builds belong to the node's line (errors name it too); set here, it
        # spares every op built a walk up the stack to find it.
        with building_for(node.site):
            replacement = self.rewrite(Rewrite(self, node)) if self.rewrite else None
            if replacement is None:
                replacement = self.copy_node(node, [self.value_of(operand) for operand in node.inputs])
        if isinstance(replacement, Tensor):
            _check_replacement(node, replacement, self.new)
        self.values[node.id] = replacement
        self._stamp_provenance(node, self.new.nodes[first_new_id:])

    def _stamp_provenance(self, node: Tensor, built: list[Tensor]):
        # Helpers such as make_ew create nodes (a trailing broadcast_to) without a site of ours.
        for new in built:
            new.site = node.site
            new.origin = node
            self.built_for[new.id] = node

    def _link_gradients(self):
        # Deferred to the end: a forward node absorbed into a consumer has its stand-in only
        # once that consumer is built, which may be after the backward nodes that refer to it.
        for new_id, node in self.built_for.items():
            if node.grad_of is not None:
                self.new.nodes[new_id].grad_of = self._stand_in(node.grad_of)

    def _stand_in(self, forward: Tensor) -> Tensor | None:
        """The new node that best stands for `forward`: its replacement, else its nearest ancestor's."""
        def replacement(node: Tensor) -> Tensor | None:
            value = self.values.get(node.id)
            while isinstance(value, Absorbed):
                value = self.values.get(value.into.id)
            return value

        return _nearest(forward, replacement)


def _check_replacement(node: Tensor, replacement: Tensor, graph: Graph):
    if replacement.graph is not graph:
        raise RuntimeError(f"the rewrite of %{node.id} ({node.op}) returned a node of another graph")
    if replacement.shape != node.shape or replacement.dtype != node.dtype:
        raise RuntimeError(f"the rewrite of %{node.id} ({node.op}, {node.dtype}{list(node.shape)}) returned "
                           f"{replacement.op} {replacement.dtype}{list(replacement.shape)}")


def _drop_dead_nodes(graph: Graph, outputs: list[Tensor]) -> None:
    """Remove, in place, the nodes of `graph` (made by this rebuild, seen by no one yet) that
    `outputs` do not need, as a plain copy would (a second copy took as long as many passes):
    the survivors are numbered again, a `grad_of` that pointed to a removed node points to its
    nearest surviving ancestor, and buffer updates of removed nodes go with them."""
    live = _live_ids(graph, outputs)
    if len(live) == len(graph.nodes):
        return
    for node in graph.nodes:
        if node.id in live and node.grad_of is not None and node.grad_of.id not in live:
            node.grad_of = _nearest(node.grad_of, lambda ancestor: ancestor if ancestor.id in live else None)
    graph.buffer_updates = [update for update in graph.buffer_updates
                            if update.owner.id in live and update.value.id in live]
    graph.nodes[:] = [node for node in graph.nodes if node.id in live]
    for index, node in enumerate(graph.nodes):
        node.id = index


def _nearest(node: Tensor, found: Callable[[Tensor], Tensor | None]) -> Tensor | None:
    """The first `found(n)` that is not None, for n = `node` and then its ancestors, nearest first."""
    queue, seen = deque([node]), {node.id}
    while queue:
        node = queue.popleft()
        result = found(node)
        if result is not None:
            return result
        for operand in node.inputs:
            if operand.id not in seen:
                seen.add(operand.id)
                queue.append(operand)
    return None


def use_counts(graph: Graph) -> dict[int, int]:
    """node id -> how many operand slots of the graph's nodes read it (nodes nothing reads: absent)."""
    uses: dict[int, int] = {}
    for node in graph.nodes:
        for operand in node.inputs:
            uses[operand.id] = uses.get(operand.id, 0) + 1
    return uses


def needed_nodes(graph: Graph, outputs: list[Tensor]) -> list[Tensor]:
    """Every node `outputs` depend on, outputs included, in topological order."""
    return graph.ancestors(outputs)


def _live_ids(graph: Graph, outputs: list[Tensor]) -> set[int]:
    """The ids of the nodes a copy of `graph` for `outputs` keeps: what they need, and declarations."""
    live = {node.id for node in needed_nodes(graph, outputs)}
    live.update(node.id for node in graph.nodes if node.op in DECLARED_OPS)
    return live
