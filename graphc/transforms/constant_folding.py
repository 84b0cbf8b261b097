"""Constant folding: a node whose operands are all constants or fills is evaluated at compile time
with the op's reference semantics, and replaced by a `fill` when every element is equal, else by
a `constant`.

Values are computed in float64 and rounded once to the node's dtype. Big values stay computed
at run time: a non-uniform result over `CONSTANT_SIZE_LIMIT` elements would bloat the program,
and nothing over `EVALUATION_SIZE_LIMIT` elements is evaluated at all (simplification folds the
common big uniform cases, such as a broadcast fill, symbolically).
"""
from __future__ import annotations

import numpy as np

from graphc.core.ir import FLOAT_DTYPES, Graph, Tensor
from graphc.core.ops.registry import OPS
from graphc.transforms.rebuild import Rewrite, rebuild_if_changed

CONSTANT_SIZE_LIMIT = 1 << 20
EVALUATION_SIZE_LIMIT = 1 << 24
FOLDABLE_OPERAND_OPS = ("constant", "fill")


def fold_constants(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    return rebuild_if_changed(graph, outputs, lambda: _fold)


def _fold(rewrite: Rewrite) -> Tensor | None:
    node, operands = rewrite.node, rewrite.operands
    if not operands or any(operand.op not in FOLDABLE_OPERAND_OPS for operand in operands):
        return None
    if max(t.size for t in [node, *operands]) > EVALUATION_SIZE_LIMIT:
        return None
    value = _evaluate(node, operands)
    if node.dtype in FLOAT_DTYPES and _is_uniform(value):
        return rewrite.fill(float(value.flat[0]))
    if value.size <= CONSTANT_SIZE_LIMIT:
        return rewrite.constant(value)
    return None


def _evaluate(node: Tensor, operands: list[Tensor]) -> np.ndarray:
    args = [_float64_value(operand) for operand in operands]
    return np.asarray(OPS[node.op].reference(args, node.attrs, node, np.float64))


def _float64_value(source: Tensor) -> np.ndarray:
    """The value of a constant or fill, floats widened to float64 (integers, e.g. labels, kept)."""
    return np.asarray(OPS[source.op].reference([], source.attrs, source, np.float64))


def _is_uniform(value: np.ndarray) -> bool:
    return value.size > 0 and bool(np.all(value == value.flat[0]))
