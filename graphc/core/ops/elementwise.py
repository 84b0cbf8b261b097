"""Elementwise ops: one primitive, `ew`, whose attribute is a sympy expression over x0, x1, ...

relu, sigmoid, +, *, ... are all `ew` nodes; their derivatives come from `sympy.diff`, and a
chain of them can later fuse into one expression. Operands broadcast as in numpy; Python scalars
become constants inside the expression.
"""
from __future__ import annotations

import functools
import numbers

import numpy as np
import sympy

from graphc.core.errors import shape_error, user_site
from graphc.core.ir import Tensor, as_finite_float
from graphc.core.ops.registry import Mismatch, OpDef, op, register
from graphc.core.scalar import Relu, Sigmoid, Softplus, Step, numpy_function, renumbered, symbol, symbol_indices


@register
class Elementwise(OpDef):
    name = "ew"

    def infer(self, inputs, attrs):
        for i, t in enumerate(inputs):
            if t.dtype not in ("float32", "float64"):
                raise Mismatch(f"elementwise {attrs['expr']} needs float operands; operand {i} is {t.dtype}")
        try:
            shape = np.broadcast_shapes(*(t.shape for t in inputs))
        except ValueError:
            raise Mismatch(f"operands do not broadcast together for {attrs['expr']}") from None
        dtype = "float64" if any(t.dtype == "float64" for t in inputs) else "float32"
        return shape, dtype

    def reference(self, args, attrs, node, float_dtype):
        result = numpy_function(attrs["expr"], len(args))(*args)
        return np.broadcast_to(np.asarray(result, dtype=float_dtype), node.shape)

    def vjp(self, node, g, wanted):
        from graphc.core.ops.shape import sum_to
        expr = node.attrs["expr"]
        g_symbol = symbol(len(node.inputs))
        grads = []
        for i, operand in enumerate(node.inputs):
            if not wanted[i]:
                grads.append(None)
                continue
            derivative, operands = _derivative_via_output(expr, i, node)
            local = make_ew(derivative * g_symbol, operands + [g], node.shape)
            grads.append(sum_to(local, operand.shape))
        return grads

    def describe(self, attrs):
        return str(attrs["expr"])


def _derivative_via_output(expr: sympy.Expr, i: int, node: Tensor):
    """d expr / d x_i, written in terms of the op's own output y where that removes every operand.

    relu' = Step(y), sigmoid' = y(1-y), exp' = y, tanh' = 1-y²: as in PyTorch, the backward
    pass then reads the activation rather than its input, so the input has a single consumer
    and can be fused away (e.g. a GEMM's bias + ReLU epilogue).
    Returns (derivative over x0..xk, the operands those symbols stand for)."""
    derivative, over_output = _derivative(expr, i, len(node.inputs) == 1)
    return derivative, [node] if over_output else list(node.inputs)


@functools.lru_cache(maxsize=4096)     # layers repeat their expressions
def _derivative(expr: sympy.Expr, i: int, unary: bool) -> tuple[sympy.Expr, bool]:
    """d expr / d x_i, and whether it is written over the output (as x0) instead of the operands."""
    derivative = sympy.diff(expr, symbol(i))
    if unary:
        y = symbol(0)
        via_output = derivative.xreplace({Step(symbol(0)): Step(expr)} if _positive_where_x0_is(expr) else {})
        via_output = via_output.xreplace({expr: sympy.Dummy("y")})
        if symbol(0) not in via_output.free_symbols:
            return via_output.xreplace({d: y for d in via_output.atoms(sympy.Dummy)}), True
    return derivative, False


def _positive_where_x0_is(expr: sympy.Expr) -> bool:
    """Whether expr > 0 exactly where x0 > 0, so that Step(x0) == Step(expr): true of relu and of
    x0·(a + b·Step(x0)) with a >= 0 < a + b (leaky_relu with a slope >= 0), whose derivatives
    can then read the output."""
    if isinstance(expr, Relu):
        return True
    x, step = symbol(0), sympy.Dummy("step")
    gain = sympy.expand(expr.xreplace({Step(x): step}) / x)
    a, b = gain.coeff(step, 0), gain.coeff(step, 1)
    numbers = all(c.is_Number and c.is_finite for c in (a, b))
    return bool(numbers and a >= 0 and a + b > 0 and gain == a + b * step)


def make_ew(expr: sympy.Expr, inputs: list[Tensor], shape=None, site: str | None = None) -> Tensor:
    """An `ew` node for `expr`, in canonical form: each distinct operand once, unused operands dropped.

    An identity expression returns its operand; a constant one a `fill`. `shape` (default: the
    broadcast of all `inputs`) is kept even when operands drop out.
    """
    site = site or user_site()
    if shape is None:
        try:
            shape = np.broadcast_shapes(*(t.shape for t in inputs))
        except ValueError:
            raise shape_error("ew", f"operands do not broadcast together for {expr}", inputs, site) from None
    distinct: list[Tensor] = []
    renames = []
    for index in symbol_indices(expr):
        operand = inputs[index]
        if operand not in distinct:
            distinct.append(operand)
        renames.append((index, distinct.index(operand)))
    expr = renumbered(expr, tuple(renames))
    graph = inputs[0].graph
    if not distinct:
        from graphc.core.ops.sources import fill
        return fill(graph, shape, float(expr), dtype=_float_dtype(inputs), site=site)
    if expr == symbol(0):
        result = distinct[0]
    else:
        result = op("ew").apply(distinct, site=site, expr=expr)
    if result.shape != tuple(shape):
        from graphc.core.ops.shape import broadcast_to
        result = broadcast_to(result, shape)
    return result


def _float_dtype(inputs):
    return "float64" if any(t.dtype == "float64" for t in inputs) else "float32"


def elementwise(build, *operands, name: str) -> Tensor:
    """Apply a scalar function `build(*sympy_args)` to tensors and Python numbers."""
    site = user_site()
    distinct: list[Tensor] = []
    args = []
    for o in operands:
        if isinstance(o, Tensor):
            if o not in distinct:
                distinct.append(o)
            args.append(symbol(distinct.index(o)))
        elif isinstance(o, numbers.Real) and not isinstance(o, bool):
            args.append(sympy.Integer(o) if isinstance(o, numbers.Integral) else sympy.Float(float(o)))
        else:
            raise shape_error(name, f"cannot combine a Tensor with {type(o).__name__}", operands, site)
    if not distinct:
        raise shape_error(name, "needs at least one graphc Tensor operand", operands, site)
    for t in distinct:
        if t.dtype not in ("float32", "float64"):
            raise shape_error(name, f"needs float operands, got {t.dtype}", operands, site)
    try:
        np.broadcast_shapes(*(t.shape for t in distinct))
    except ValueError:
        raise shape_error(name, "operand shapes do not broadcast together", operands, site) from None
    if len({id(t.graph) for t in distinct}) > 1:
        raise shape_error(name, "operands belong to different graphs", operands, site)
    return make_ew(build(*args), distinct, site=site)


def relu(x): return elementwise(Relu, x, name="relu")
def sigmoid(x): return elementwise(Sigmoid, x, name="sigmoid")
def softplus(x): return elementwise(Softplus, x, name="softplus")
def tanh(x): return elementwise(sympy.tanh, x, name="tanh")
def exp(x): return elementwise(sympy.exp, x, name="exp")
def log(x): return elementwise(sympy.log, x, name="log")
def sqrt(x): return elementwise(sympy.sqrt, x, name="sqrt")
def add(a, b): return elementwise(lambda x, y: x + y, a, b, name="add")
def sub(a, b): return elementwise(lambda x, y: x - y, a, b, name="sub")
def mul(a, b): return elementwise(lambda x, y: x * y, a, b, name="mul")
def div(a, b): return elementwise(lambda x, y: x / y, a, b, name="div")
def neg(x): return elementwise(lambda v: -v, x, name="neg")


def leaky_relu(x, negative_slope=0.01):
    """torch.nn.functional.leaky_relu: x where x > 0, negative_slope·x elsewhere.

    Written x·(slope + (1 - slope)·Step(x)): sympy derives slope + (1 - slope)·Step(x), which is
    negative_slope at 0 as torch's backward gives, and the op fuses with its elementwise
    neighbours as relu does. For a slope in [0, 1] the two constants sum to exactly 1 in float32
    and float64, so x > 0 comes out as x itself and x <= 0 as slope·x, bit for bit torch's
    values (the form slope·x + (1 - slope)·relu(x) rounds both products: up to 2 ulp off).
    Slope 0 is relu's very expression, slope 1 the identity.
    """
    slope = as_finite_float(negative_slope, "leaky_relu: negative_slope")
    if slope == 0:
        return elementwise(Relu, x, name="leaky_relu")
    coefficient = sympy.Integer(int(slope)) if slope.is_integer() else sympy.Float(slope)
    return elementwise(lambda v: v * (coefficient + (1 - coefficient) * Step(v)), x, name="leaky_relu")


def power(x, exponent):
    if not isinstance(exponent, numbers.Real) or isinstance(exponent, bool):
        raise shape_error("pow", "the exponent must be a Python number", [x, exponent])
    return elementwise(lambda v: v ** exponent, x, name="pow")
