"""Matrix products: matmul (primitive) and linear (x @ w.T + b, as torch.nn.functional.linear)."""
from __future__ import annotations

import numpy as np

from graphc.core.ir import Tensor
from graphc.core.ops.registry import Mismatch, OpDef, check_composite, op, register, require_float


@register
class MatMul(OpDef):
    name = "matmul"
    vjp_rule = "dA = dY · Bᵀ; dB = Aᵀ · dY"

    def infer(self, inputs, attrs):
        a, b = inputs
        require_float(inputs)
        if a.ndim != 2 or b.ndim != 2:
            raise Mismatch(f"matmul takes 2-D operands, got {a.ndim}-D and {b.ndim}-D")
        if a.shape[1] != b.shape[0]:
            raise Mismatch(f"inner dimensions differ ({a.shape[1]} vs {b.shape[0]})")
        if a.dtype != b.dtype:
            raise Mismatch(f"dtypes differ ({a.dtype} vs {b.dtype})")
        return (a.shape[0], b.shape[1]), a.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.matmul(args[0], args[1])

    def vjp(self, node, g, wanted):
        from graphc.core.ops.shape import transpose
        a, b = node.inputs
        return [matmul(g, transpose(b)) if wanted[0] else None,
                matmul(transpose(a), g) if wanted[1] else None]


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return op("matmul").apply([a, b])


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x @ w.T + b with x (N, in), w (out, in), b (out,)."""
    from graphc.core.ops.shape import transpose
    operands = [x, w] + ([b] if b is not None else [])
    check_composite("linear", all(isinstance(t, Tensor) for t in operands), "operands must be Tensors", operands)
    check_composite("linear", x.ndim == 2 and w.ndim == 2,
                    "x must be (N, in) and w (out, in)", operands)
    check_composite("linear", x.shape[1] == w.shape[1],
                    f"x has {x.shape[1]} features but w expects {w.shape[1]}", operands)
    if b is not None:
        check_composite("linear", b.shape == (w.shape[0],), f"b must have shape ({w.shape[0]},)", operands)
    y = matmul(x, transpose(w))
    return y + b if b is not None else y
