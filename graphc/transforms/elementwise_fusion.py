"""Elementwise fusion: chains of `ew` nodes become one `ew` node whose expression is their composition.

A fused node is one kernel: one loop reading its leaves and writing one result, where the chain
wrote and re-read a buffer per link. The plan is made on the old graph, walking it backwards so
that each node knows the kernels its consumers ended up in:

- an `ew` node is inlined (computed inside its consumers' kernels, with no buffer of its own)
  when it is not an output and all its consumers are `ew` nodes, and either they all end up in
  one kernel, or it is cheap to recompute (no transcendental function, few operations) and
  recomputing it in each kernel moves no more memory than storing it once and reading it back;
- a transcendental node is never inlined into a kernel larger than itself: a broadcast would
  recompute its exp or log for every copy of each element.

Then, walking forwards, each node's expression is composed by substituting the composed
expressions of its inlined operands for their symbols. A composition is written over the
kernel's own operand symbols, numbered in the order the leaves first appear, so that the
repeated layers of a deep network compose the same expressions, which are made once.

A kernel keeps at most `MAX_OPERANDS` distinct operands and about `MAX_EXPRESSION_OPS`
operations, and its exact algebra must not leave the reals (composing `1/(a - b)` with
`b = a` gives sympy's complex infinity, where floats give inf): where a composition breaks a
rule, its biggest inlined operands become kernels of their own, and the plan is made again
until every kernel fits.

Each fused kernel is a single node of an append-only graph, whose nodes only read nodes made
before them: the result is acyclic by construction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from graphc.core.ir import Graph, Tensor
from graphc.core.scalar import Relu, Step, renumbered, symbol, symbol_indices
from graphc.transforms.rebuild import Absorbed, Rewrite, needed_nodes, rebuild
from graphc.transforms.simplify import leaves_the_reals

MAX_OPERANDS = 8
MAX_EXPRESSION_OPS = 64
CHEAP_EXPRESSION_OPS = 4
MAX_RECOMPUTATIONS = 6

_PIECEWISE_LINEAR = (Relu, Step)


@dataclass(frozen=True)
class Composition:
    """An `ew` node's expression with its inlined operands substituted: over symbol(j) for
    j < len(leaves), where symbol(j) stands for the node of id `leaves[j]`."""

    expr: sympy.Expr
    leaves: tuple[int, ...]


@dataclass
class FusionPlan:
    kernel_of: dict[int, Tensor]  # inlined node id -> a fused node (of the old graph) computing it
    expression: dict[int, Composition]  # fused node id -> its composed expression


def fuse_elementwise(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    plan = plan_fusion(graph, outputs)

    def fuse(rewrite: Rewrite) -> Tensor | Absorbed | None:
        node = rewrite.node
        if node.id in plan.kernel_of:
            return Absorbed(into=plan.kernel_of[node.id])
        if node.id not in plan.expression:
            return None
        composition = plan.expression[node.id]
        return rewrite.ew(composition.expr, [rewrite.new(graph.nodes[leaf]) for leaf in composition.leaves])

    return rebuild(graph, outputs, fuse)


def plan_fusion(graph: Graph, outputs: list[Tensor]) -> FusionPlan:
    """Which `ew` nodes are inlined, and the composed expression of each kernel that inlines some."""
    needed = needed_nodes(graph, outputs)
    consumers = graph.to_networkx().subgraph(node.id for node in needed)
    own_ops = {node.id: operation_count(node.attrs["expr"]) for node in needed if node.op == "ew"}
    kept = {out.id for out in outputs}  # nodes that must keep a buffer of their own
    composed: dict = {}                 # what _compose made in earlier rounds, to reuse
    while True:
        kernels = _assign_kernels(graph, needed, consumers, own_ops, kept)
        expressions, splits = _compose(needed, kernels, own_ops, composed)
        if not splits - kept:
            break
        kept |= splits
    fused = {node.id for node in needed if node.op == "ew" and node.id not in kernels
             and any(operand.id in kernels for operand in node.inputs)}
    return FusionPlan(kernel_of={node_id: graph.nodes[min(into)] for node_id, into in kernels.items()},
                      expression={node_id: expressions[node_id] for node_id in fused})


def _assign_kernels(graph, needed, consumers, own_ops, kept) -> dict[int, frozenset[int]]:
    """For each inlined node, the ids of the fused nodes whose kernels compute it."""
    kernels: dict[int, frozenset[int]] = {}
    for node in reversed(needed):
        if node.op == "ew" and node.id not in kept:
            users = [graph.nodes[i] for i in consumers.successors(node.id)]
            into = _kernels_absorbing(node, users, kernels, own_ops[node.id])
            if into:
                kernels[node.id] = into
    return kernels


def _kernels_absorbing(node: Tensor, users: list[Tensor], kernels, ops: int) -> frozenset[int] | None:
    """The kernels `node` should be computed in, or None if it should keep its own buffer."""
    if not users or any(user.op != "ew" for user in users):
        return None
    into = frozenset().union(*(kernels.get(user.id, frozenset({user.id})) for user in users))
    if len(into) > 1 and not _worth_recomputing(node, len(into), ops):
        return None
    if is_transcendental(node.attrs["expr"]) and any(node.graph.nodes[kernel].size > node.size for kernel in into):
        return None
    return into


def _worth_recomputing(node: Tensor, kernel_count: int, ops: int) -> bool:
    """Recompute a cheap node in each kernel if that reads no more memory than storing it and
    reading it back. Only full-size operands count: broadcast ones (a bias) stay in cache."""
    if is_transcendental(node.attrs["expr"]) or ops > CHEAP_EXPRESSION_OPS or kernel_count > MAX_RECOMPUTATIONS:
        return False
    full_size = sum(operand.size == node.size for operand in node.inputs)
    stored = full_size + 1 + kernel_count
    recomputed = kernel_count * full_size
    return recomputed <= stored


def _compose(needed, kernels, own_ops, composed: dict) -> tuple[dict[int, Composition], set[int]]:
    """Each `ew` node's composition, its inlined operands substituted, and the inlined nodes to
    keep as kernels of their own so that every composition fits.

    Kernels fill up from the producer side: a node whose composition breaks a rule keeps its
    biggest inlined operands (whose compositions fit, as checked before) as kernels until it fits.
    `composed` holds the expressions made so far, by what they were made from (`_composition`)."""
    compositions: dict[int, Composition] = {}
    ops: dict[int, int] = {}  # operations of the composed expression, as a tree (an upper bound)
    splits: set[int] = set()
    for node in needed:
        if node.op != "ew" or node.id not in kernels and not any(o.id in kernels for o in node.inputs):
            continue   # neither inlined nor inlining: its kernel is itself, nobody composes it
        while True:
            inlined = {i: o for i, o in enumerate(node.inputs) if o.id in kernels and o.id not in splits}
            composition, ops[node.id], fits = _composition(node, inlined, compositions, ops, own_ops, composed)
            if fits or not inlined:
                break
            biggest = max(inlined.values(), key=lambda o: (len(compositions[o.id].leaves), ops[o.id]))
            splits.add(biggest.id)
        compositions[node.id] = composition
    return compositions, splits


def _composition(node, inlined: dict, compositions: dict, ops: dict, own_ops: dict, composed: dict
                 ) -> tuple[Composition, int, bool]:
    """`node`'s composition with its `inlined` operands', its operation count, and whether it
    fits a kernel.

    The leaves are numbered as they first appear, operand by operand. The expression depends
    only on `node`'s own and its inlined operands' expressions and on where their leaves fall
    in that numbering, not on which nodes the leaves are: `composed` keeps it by those, with
    the numbers of the leaves it kept (sympy may cancel one) and whether it leaves the reals."""
    numbers: dict[int, int] = {}     # leaf node id -> its number
    parts = []
    for i, operand in enumerate(node.inputs):
        if i in inlined:
            inner = compositions[operand.id]
            parts.append((inner.expr, tuple(numbers.setdefault(leaf, len(numbers)) for leaf in inner.leaves)))
        else:
            parts.append((None, numbers.setdefault(operand.id, len(numbers))))
    key = (node.attrs["expr"], tuple(parts))
    made = composed.get(key)
    if made is None:
        made = composed[key] = _substituted(node.attrs["expr"], parts)
    expr, kept, not_real = made
    leaves = list(numbers)
    composition = Composition(expr, tuple(leaves[j] for j in kept))
    count = own_ops[node.id] + sum(_occurrences(node.attrs["expr"], i) * ops[o.id] for i, o in inlined.items())
    fits = len(composition.leaves) <= MAX_OPERANDS and count <= MAX_EXPRESSION_OPS and not not_real
    return composition, count, fits


def _substituted(expr: sympy.Expr, parts: list) -> tuple[sympy.Expr, tuple[int, ...], bool]:
    """`expr` with symbol(i) replaced by parts[i]: (an inlined operand's expression, the numbers
    of its symbols' leaves) or (None, the number of the leaf the operand is); the numbers of the
    leaves still in it, renumbered 0, 1, ...; and whether it leaves the reals."""
    replacements = {}
    for i, (inner, numbers) in enumerate(parts):
        if inner is None:
            replacements[symbol(i)] = symbol(numbers)
        elif numbers == tuple(range(len(numbers))):
            replacements[symbol(i)] = inner
        else:
            replacements[symbol(i)] = renumbered(inner, tuple(enumerate(numbers)))
    composed = expr.xreplace(replacements)
    kept = symbol_indices(composed)
    if kept != tuple(range(len(kept))):      # a leaf cancelled out
        composed = renumbered(composed, tuple((old, new) for new, old in enumerate(kept)))
    return composed, kept, leaves_the_reals(composed)


@functools.lru_cache(maxsize=4096)
def _occurrences(expr: sympy.Expr, i: int) -> int:
    return expr.count(symbol(i))


@functools.lru_cache(maxsize=4096)     # deep networks repeat a few expressions many times
def is_transcendental(expr: sympy.Expr) -> bool:
    """Whether `expr` calls a function dearer than a few arithmetic operations (exp, log, tanh, sqrt...)."""
    if any(not isinstance(call, _PIECEWISE_LINEAR) for call in expr.atoms(sympy.Function)):
        return True
    return any(not power.exp.is_Integer for power in expr.atoms(sympy.Pow))


@functools.lru_cache(maxsize=4096)
def operation_count(expr: sympy.Expr) -> int:
    """sympy's count of the operations in `expr` (cached: layers repeat their expressions)."""
    return int(sympy.count_ops(expr))
