"""Layers graphc builds from primitives, recognized so that they are exported as one ONNX op.

- `linear`: matmul(x, transpose(w)) + b  -> Gemm(x, w, b, transB=1)
- `conv2d` with a bias: conv2d(x, w) + reshape(b, (1, O, 1, 1))  -> Conv(x, w, b)
- `mean`: sum(x, axes) * (1 / count)  -> ReduceMean
- `batch_norm(training=False)`: x * reshape(scale) + reshape(shift) where scale and shift are
  the running statistics' expressions  -> BatchNormalization

A pattern only matches when the primitives it swallows have no other consumer; anything else is
exported primitive by primitive, which computes the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import sympy

from graphc.core.ir import Tensor
from graphc.core.scalar import symbol


@dataclass
class Plan:
    operands: list[Tensor]
    write: Callable   # (out, operand names, result name) -> None


def recognize(node: Tensor, consumers: dict[int, int]) -> Plan | None:
    if node.op == "matmul":
        return _gemm(node, None, consumers)
    if node.op != "ew":
        return None
    expr = node.attrs["expr"]
    if expr == symbol(0) + symbol(1):
        for main, other in (node.inputs, reversed(node.inputs)):
            plan = (_gemm(main, other, consumers) if main.op == "matmul" else
                    _conv_bias(main, other, consumers) if main.op == "conv2d" else None)
            if plan is None and main.op == "ew":
                plan = _batch_norm(node, main, other, consumers)
            if plan is not None:
                return plan
    return _reduce_mean(node, consumers)


def _only_consumer(t: Tensor, consumers) -> bool:
    return consumers.get(t.id, 0) == 1


def _gemm(matmul: Tensor, bias: Tensor | None, consumers) -> Plan | None:
    a, b = matmul.inputs
    if bias is not None and (bias.shape != (matmul.shape[1],) or not _only_consumer(matmul, consumers)):
        return None
    transposed = b.op == "transpose" and b.inputs[0].ndim == 2
    if not transposed and bias is None:
        return None   # a plain MatMul
    w = b.inputs[0] if transposed else b
    operands = [a, w] + ([bias] if bias is not None else [])
    return Plan(operands, lambda out, names, result: out.node("Gemm", names, [result], transB=int(transposed)))


def _conv_bias(conv: Tensor, bias: Tensor, consumers) -> Plan | None:
    channels = conv.shape[1]
    if not (_only_consumer(conv, consumers) and bias.op == "reshape" and bias.shape == (1, channels, 1, 1)
            and bias.inputs[0].shape == (channels,)):
        return None
    x, w = conv.inputs
    attrs = conv.attrs
    (top, bottom), (left, right) = attrs["padding"]
    return Plan([x, w, bias.inputs[0]], lambda out, names, result: out.node(
        "Conv", names, [result], kernel_shape=list(w.shape[2:]), strides=list(attrs["stride"]),
        pads=[top, left, bottom, right]))


def _reduce_mean(node: Tensor, consumers) -> Plan | None:
    if len(node.inputs) != 1 or node.inputs[0].op != "sum" or not _only_consumer(node.inputs[0], consumers):
        return None
    total = node.inputs[0]
    coefficient = node.attrs["expr"] / symbol(0)
    count = math.prod(total.inputs[0].shape[a] for a in total.attrs["axes"])
    if not coefficient.is_Number or not math.isclose(float(coefficient) * count, 1.0, rel_tol=1e-12):
        return None
    return Plan([total.inputs[0]], lambda out, names, result: out.node(
        "ReduceMean", names, [result], axes=list(total.attrs["axes"]), keepdims=int(total.attrs["keepdims"])))


# ---- batch norm in eval form ---------------------------------------------------------------------


def _batch_norm(node: Tensor, scaled: Tensor, shifted: Tensor, consumers) -> Plan | None:
    """node = x * reshape(scale) + reshape(shift), as gc.batch_norm(training=False) builds it."""
    if scaled.attrs["expr"] != symbol(0) * symbol(1) or shifted.op != "reshape":
        return None
    x_candidates = [t for t in scaled.inputs if t.op != "reshape"]
    scale_reshapes = [t for t in scaled.inputs if t.op == "reshape"]
    if len(x_candidates) != 1 or len(scale_reshapes) != 1 or x_candidates[0].ndim < 2:
        return None
    x = x_candidates[0]
    channels = x.shape[1]
    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    scale, shift = scale_reshapes[0].inputs[0], shifted.inputs[0]
    if (scale_reshapes[0].shape != per_channel or shifted.shape != per_channel or scale.shape != (channels,)
            or shift.shape != (channels,) or not _only_consumer(scaled, consumers)):
        return None
    roles = _batch_norm_roles(scale, shift)
    if roles is None:
        return None
    weight, bias, mean, var, eps = roles

    def write(out, names, result):
        import numpy as np
        named = dict(zip(operands, names))
        scale_name = named[weight] if weight is not None else out.constant(np.ones(channels, x.dtype), "bn_scale")
        bias_name = named[bias] if bias is not None else out.constant(np.zeros(channels, x.dtype), "bn_bias")
        out.node("BatchNormalization", [named[x], scale_name, bias_name, named[mean], named[var]], [result],
                 epsilon=eps)

    operands = [t for t in (x, weight, bias, mean, var) if t is not None]
    return Plan(operands, write)


def _expression_over_leaves(t: Tensor, leaves: dict, depth: int = 0) -> sympy.Expr:
    """t's value as one sympy expression over the non-elementwise tensors it is computed from.

    batch_norm's scale and shift are a few elementwise nodes deep; below that, a tensor counts as
    a leaf (and the match then fails), so a long elementwise chain costs no deep recursion."""
    if t.op != "ew" or depth > 6:
        return leaves.setdefault(t, sympy.Symbol(f"leaf{len(leaves)}", real=True))
    operands = [_expression_over_leaves(o, leaves, depth + 1) for o in t.inputs]
    return t.attrs["expr"].xreplace({symbol(i): e for i, e in enumerate(operands)})


def _batch_norm_roles(scale: Tensor, shift: Tensor):
    """(weight, bias, running_mean, running_var, eps) if scale = weight·(var + eps)^-½ and
    shift = bias - mean·scale, for 1-D leaves (weight and bias may be absent); else None."""
    leaves: dict[Tensor, sympy.Symbol] = {}
    scale_expr = _expression_over_leaves(scale, leaves)
    shift_expr = _expression_over_leaves(shift, leaves)
    if len(leaves) > 4 or any(t.ndim != 1 for t in leaves):
        return None
    by_symbol = {s: t for t, s in leaves.items()}
    eps = sympy.Wild("eps", properties=[lambda e: e.is_Number and e > 0])
    for var in leaves:
        for weight in [None] + [t for t in leaves if t is not var]:
            w = leaves[weight] if weight is not None else 1
            match = scale_expr.match(w * (leaves[var] + eps) ** sympy.Float(-0.5))
            if not match:
                continue
            rest = [t for t in leaves if t is not var and t is not weight]
            for mean in rest:
                for bias in [None] + [t for t in rest if t is not mean]:
                    b = leaves[bias] if bias is not None else 0
                    if sympy.expand(shift_expr - (b - leaves[mean] * scale_expr)) == 0:
                        used = {var, weight, mean, bias} - {None}
                        if used == set(by_symbol.values()):
                            return weight, bias, mean, var, float(match[eps])
    return None
