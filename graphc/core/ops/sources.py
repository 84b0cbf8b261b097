"""Nodes without operands: inputs, params (bound by the executor), constants and fills."""
from __future__ import annotations

import numpy as np

from graphc.core.ops.registry import OpDef, op, register


@register
class Input(OpDef):
    name = "input"

    def describe(self, attrs):
        return ""


@register
class Param(OpDef):
    name = "param"

    def describe(self, attrs):
        return ""


@register
class Constant(OpDef):
    name = "constant"

    def reference(self, args, attrs, node, float_dtype):
        value = attrs["value"].array
        return value.astype(float_dtype) if value.dtype.kind == "f" else value

    def vjp(self, node, g, wanted):
        return []


@register
class Fill(OpDef):
    """A tensor of one repeated value: the seed of a gradient, a symbolic zero."""

    name = "fill"

    def infer(self, inputs, attrs):
        return attrs["shape"], attrs["dtype"]

    def reference(self, args, attrs, node, float_dtype):
        return np.full(attrs["shape"], attrs["value"], dtype=float_dtype)

    def vjp(self, node, g, wanted):
        return []

    def describe(self, attrs):
        return f"value={attrs['value']:g}"


def fill(graph, shape, value: float, dtype="float32", site=None):
    return op("fill").apply([], site=site, graph=graph, shape=tuple(shape), value=float(value), dtype=dtype)
