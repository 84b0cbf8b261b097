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
expressions of its inlined operands for their symbols. A kernel keeps at most `MAX_OPERANDS`
distinct operands and about `MAX_EXPRESSION_OPS` operations, and its exact algebra must not
leave the reals (composing `1/(a - b)` with `b = a` gives sympy's complex infinity, where
floats give inf): where a composition breaks a rule, its biggest inlined operands become
kernels of their own, and the plan is made again until every kernel fits.

Each fused kernel is a single node of an append-only graph, whose nodes only read nodes made
before them: the result is acyclic by construction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from graphc.core.ir import Graph, Tensor
from graphc.core.scalar import Relu, Step, symbol
from graphc.transforms.rebuild import Absorbed, Rewrite, needed_nodes, rebuild
from graphc.transforms.simplify import leaves_the_reals

MAX_OPERANDS = 8
MAX_EXPRESSION_OPS = 64
CHEAP_EXPRESSION_OPS = 4
MAX_RECOMPUTATIONS = 6

_PIECEWISE_LINEAR = (Relu, Step)


@dataclass
class FusionPlan:
    kernel_of: dict[int, Tensor]  # inlined node id -> a fused node (of the old graph) computing it
    expression: dict[int, sympy.Expr]  # fused node id -> its composed expression over leaf symbols


def fuse_elementwise(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    plan = plan_fusion(graph, outputs)

    def fuse(rewrite: Rewrite) -> Tensor | Absorbed | None:
        node = rewrite.node
        if node.id in plan.kernel_of:
            return Absorbed(into=plan.kernel_of[node.id])
        if node.id not in plan.expression:
            return None
        expr = plan.expression[node.id]
        leaves = sorted(expr.free_symbols, key=_leaf_id)
        operands = [rewrite.new(graph.nodes[_leaf_id(leaf)]) for leaf in leaves]
        return rewrite.ew(expr.xreplace({leaf: symbol(i) for i, leaf in enumerate(leaves)}), operands)

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


def _compose(needed, kernels, own_ops, composed: dict) -> tuple[dict[int, sympy.Expr], set[int]]:
    """Each `ew` node's expression over leaf symbols, its inlined operands substituted, and the
    inlined nodes to keep as kernels of their own so that every composition fits.

    Kernels fill up from the producer side: a node whose composition breaks a rule keeps its
    biggest inlined operands (whose compositions fit, as checked before) as kernels until it fits.
    `composed` holds the compositions of earlier calls, reused where the operands' are the same."""
    expressions: dict[int, sympy.Expr] = {}
    ops: dict[int, int] = {}  # operations of the composed expression, as a tree (an upper bound)
    splits: set[int] = set()
    for node in needed:
        if node.op != "ew" or node.id not in kernels and not any(o.id in kernels for o in node.inputs):
            continue   # neither inlined nor inlining: its kernel is itself, nobody composes it
        while True:
            inlined = {i: o for i, o in enumerate(node.inputs) if o.id in kernels and o.id not in splits}
            expr, ops[node.id], fits = _composition(node, inlined, expressions, ops, own_ops, composed)
            if fits or not inlined:
                break
            biggest = max(inlined.values(), key=lambda o: (len(expressions[o.id].free_symbols), ops[o.id]))
            splits.add(biggest.id)
        expressions[node.id] = expr
    return expressions, splits


def _composition(node, inlined: dict, expressions: dict, ops: dict, own_ops: dict, composed: dict
                 ) -> tuple[sympy.Expr, int, bool]:
    """`node`'s expression with the expressions of its `inlined` operands substituted, its
    operation count, and whether it fits a kernel; from `composed` if an earlier call made it
    from the same operand expressions (the same objects)."""
    key = (node.id, tuple(id(expressions[o.id]) if i in inlined else None for i, o in enumerate(node.inputs)))
    known = composed.get(key)
    if known is not None and all(expressions[o.id] is kept for (i, o), kept in zip(inlined.items(), known[1])):
        return known[0]
    expr = node.attrs["expr"].xreplace({
        symbol(i): expressions[o.id] if i in inlined else _leaf_symbol(o) for i, o in enumerate(node.inputs)})
    count = own_ops[node.id] + sum(node.attrs["expr"].count(symbol(i)) * ops[o.id] for i, o in inlined.items())
    fits = len(expr.free_symbols) <= MAX_OPERANDS and count <= MAX_EXPRESSION_OPS and not leaves_the_reals(expr)
    # The operands' expressions are kept with it: their ids in the key stay theirs.
    composed[key] = ((expr, count, fits), [expressions[o.id] for o in inlined.values()])
    return expr, count, fits


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


def _leaf_symbol(node: Tensor) -> sympy.Symbol:
    """The symbol standing for a kernel operand while expressions are composed (real, as x0, x1...)."""
    return sympy.Symbol(f"leaf{node.id}", real=True)


def _leaf_id(leaf: sympy.Symbol) -> int:
    return int(leaf.name[len("leaf"):])
