"""Reductions: sum (primitive) and mean (sum times 1/n)."""
from __future__ import annotations

import numpy as np

from graphc.core.ir import Tensor, as_bool
from graphc.core.ops.registry import Mismatch, OpDef, normalize_axes, op, register


@register
class Sum(OpDef):
    name = "sum"
    vjp_rule = "dx = broadcast_to(dy) over the summed axes"

    def infer(self, inputs, attrs):
        (x,) = inputs
        if x.dtype not in ("float32", "float64"):
            raise Mismatch(f"sum needs a float tensor, got {x.dtype}")
        axes, keepdims = attrs["axes"], attrs["keepdims"]
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keepdims or i not in axes)
        return shape, x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.sum(args[0], axis=attrs["axes"], keepdims=attrs["keepdims"])

    def vjp(self, node, g, wanted):
        from graphc.core.ops.shape import broadcast_to, reshape
        x = node.inputs[0]
        kept = tuple(1 if i in node.attrs["axes"] else d for i, d in enumerate(x.shape))
        return [broadcast_to(reshape(g, kept), x.shape)]


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    axes = normalize_axes(axis, x.ndim, "sum", x)
    keepdims = as_bool(keepdims, "sum: keepdims")
    if not axes:
        return x
    return op("sum").apply([x], axes=axes, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    axes = normalize_axes(axis, x.ndim, "mean", x)
    keepdims = as_bool(keepdims, "mean: keepdims")
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))  # >= 1: no dimension is 0
    return sum(x, axes, keepdims) * (1.0 / count)
