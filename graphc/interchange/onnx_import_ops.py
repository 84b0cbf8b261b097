"""ONNX ops as graphc ops: one converter per ONNX op type, in the table `CONVERTERS`.

Each converter reads its node through a `NodeContext` and returns the graphc tensors of the
node's outputs. What graphc has no primitive for is composed from its ops: LogSoftmax from a max
(a 1×n max pool), a sum and a log; batched MatMul from 2-D products; the window ops' extras in
`onnx_import_windows.py`.
"""
from __future__ import annotations

import math

import numpy as np

import graphc.core.ops as ops
from graphc.core.ir import Tensor, constant_array
from graphc.core.ops.shape import slice_
from graphc.interchange.onnx_import_windows import average_pool, conv, global_average_pool, max_pool

# Inputs read at import time (graphc's shapes are static), by op type and input index.
STATIC_SLOTS = {"Reshape": {1}, "Pad": {1, 2, 3}, "ReduceSum": {1}, "ReduceMean": {1}, "Dropout": {1, 2}}
# Inputs that are state rather than trained values: BatchNormalization's running mean and variance.
BUFFER_SLOTS = {"BatchNormalization": {3, 4}}
MAX_MATMUL_BATCH = 256   # batched MatMul unrolls one 2-D product per batch element


def node_label(node, index: int) -> str:
    name = f" {node.name!r}" if node.name else ""
    return f"node {index}{name} ({node.op_type} -> {', '.join(repr(o) for o in node.output if o)})"


def static_as_tensor(graph, array: np.ndarray, what: str) -> Tensor:
    """A static value used as data: a graph constant (float32/float64 or int32/int64 kept)."""
    array = np.asarray(array)
    if array.dtype.kind == "f" and array.dtype not in (np.float32, np.float64):
        raise NotImplementedError(f"{what}: {array.dtype} values are not supported (float32, float64)")
    if array.dtype.kind not in "fiu":
        raise NotImplementedError(f"{what}: {array.dtype} values are not supported")
    if array.ndim == 0:
        array = array.reshape(1)   # graph constants have at least one dimension; callers broadcast
    dtype = array.dtype.name if array.dtype.kind == "f" or array.dtype == np.int64 else "int32"
    return graph.constant(constant_array(array, dtype, what), dtype=dtype)


class NodeContext:
    """One ONNX node being converted: its inputs as tensors or static arrays, its attributes."""

    def __init__(self, node, where, label, graph, values, opset, training, used):
        from onnx import helper
        self.node, self.where, self.label, self.graph = node, where, label, graph
        self.values, self.opset, self.training, self.used = values, opset, training, used
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    # ---- errors ----------------------------------------------------------------------------
    def unsupported(self, what: str):
        raise NotImplementedError(f"{self.label}: {self.where}: {what} is not supported by graphc")

    # ---- inputs ----------------------------------------------------------------------------
    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and bool(self.node.input[i])

    def _value(self, i: int):
        name = self.node.input[i]
        if name not in self.values:
            raise ValueError(f"input {i} {name!r} has no value (an output graphc does not compute?)")
        return self.values[name]

    def tensor(self, i: int) -> Tensor:
        """Input i as a float graphc tensor (a static value becomes a graph constant)."""
        value = self._value(i)
        if isinstance(value, np.ndarray):
            value = static_as_tensor(self.graph, value, f"{self.label}: {self.where}: input {i}")
        if value.dtype not in ("float32", "float64"):
            self.unsupported(f"{self.node.op_type} of {value.dtype} data (graphc computes in float32 and float64)")
        return value

    def operand(self, i: int, like: Tensor | None = None):
        """Input i for an elementwise op: a Python float for a static scalar that broadcasting
        would not reshape (it then folds into the expression), else a tensor."""
        value = self._value(i)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size == 1 and (
                like is not None and value.ndim <= like.ndim):
            return float(value.reshape(()))
        return self.tensor(i)

    def static(self, i: int, default=None) -> np.ndarray | None:
        """Input i as an array known at import time (an initializer, a Constant, `constants=`)."""
        if not self.has_input(i):
            return default
        value = self._value(i)
        if not isinstance(value, np.ndarray):
            self.unsupported(f"a computed input {i} ({self.node.input[i]!r}; graphc needs it known when importing: "
                             f"an initializer, a Constant, or import_onnx(..., constants=...))")
        return value

    def output_used(self, i: int) -> bool:
        return i < len(self.node.output) and self.node.output[i] in self.used

    # ---- attributes ------------------------------------------------------------------------
    def attr(self, name: str, default=None):
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def ints(self, name: str, default) -> tuple[int, ...]:
        return tuple(int(v) for v in self.attrs.get(name, default))


# ---- elementwise -----------------------------------------------------------------------------------


def _unary(function):
    return lambda ctx: function(ctx.tensor(0))


def _binary(function):
    def convert(ctx):
        a, b = ctx._value(0), ctx._value(1)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype.kind in "iu" and b.dtype.kind in "iu":
            ctx.unsupported(f"{ctx.node.op_type} of integer values (shape arithmetic)")
        left = ctx.tensor(0) if not isinstance(a, np.ndarray) else None
        right = ctx.tensor(1) if not isinstance(b, np.ndarray) else None
        left = left if left is not None else ctx.operand(0, right)
        right = right if right is not None else ctx.operand(1, left)
        return function(left, right)
    return convert


def leaky_relu(ctx):
    return ops.leaky_relu(ctx.tensor(0), float(ctx.attr("alpha", 0.01)))


def power(ctx):
    exponent = ctx.static(1)
    if exponent.size != 1:
        ctx.unsupported("Pow with a non-scalar exponent")
    return ctx.tensor(0) ** float(exponent.reshape(()))


# ---- matrix products -------------------------------------------------------------------------------


def gemm(ctx):
    a, b = ctx.tensor(0), ctx.tensor(1)
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    c = ctx.tensor(2) if ctx.has_input(2) else None
    if trans_a:
        a = ops.transpose(a)
    if trans_b and alpha == 1.0 and beta == 1.0 and (c is None or c.shape == (b.shape[0],)):
        return ops.linear(a, b, c)   # torch's nn.Linear: the form graphc's GEMM fuses its bias into
    y = ops.matmul(a, ops.transpose(b) if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def matmul(ctx):
    a, b = ctx.tensor(0), ctx.tensor(1)
    vector_a, vector_b = a.ndim == 1, b.ndim == 1
    if vector_a:
        a = ops.reshape(a, (1, a.shape[0]))
    if vector_b:
        b = ops.reshape(b, (b.shape[0], 1))
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"MatMul: inner dimensions differ: {a.shape} @ {b.shape}")
    if a.ndim == 2 and b.ndim == 2:
        y = ops.matmul(a, b)
    elif b.ndim == 2:
        # (..., M, K) @ (K, N): one product of all rows
        rows = ops.reshape(a, (-1, a.shape[-1]))
        y = ops.reshape(ops.matmul(rows, b), a.shape[:-1] + (b.shape[1],))
    else:
        y = _batched_matmul(ctx, a, b)
    shape = y.shape
    if vector_a:
        shape = shape[:-2] + shape[-1:]
    if vector_b:
        shape = shape[:-1]
    return ops.reshape(y, shape) if shape != y.shape else y


def _batched_matmul(ctx, a, b):
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    count = math.prod(batch)
    if count > MAX_MATMUL_BATCH:
        ctx.unsupported(f"a batched MatMul of {count} products (at most {MAX_MATMUL_BATCH})")
    (m, k), n = a.shape[-2:], b.shape[-1]
    a = ops.reshape(ops.broadcast_to(a, batch + (m, k)), (count, m, k))
    b = ops.reshape(ops.broadcast_to(b, batch + (k, n)), (count, k, n))
    products = []
    for i in range(count):
        ai = ops.reshape(slice_(a, (i, 0, 0), (i + 1, m, k)), (m, k))
        bi = ops.reshape(slice_(b, (i, 0, 0), (i + 1, k, n)), (k, n))
        products.append(ops.reshape(ops.matmul(ai, bi), (1, m, n)))
    return ops.reshape(ops.concat(products, 0), batch + (m, n))


# ---- normalization and dropout ---------------------------------------------------------------------


def batch_normalization(ctx):
    x = ctx.tensor(0)
    scale, bias, mean, var = (ctx.tensor(i) for i in range(1, 5))
    eps = float(ctx.attr("epsilon", 1e-5))
    onnx_momentum = float(ctx.attr("momentum", 0.9))
    training = ctx.training if ctx.training is not None else bool(ctx.attr("training_mode", 0))
    if ctx.output_used(1) or ctx.output_used(2):
        ctx.unsupported("BatchNormalization's running_mean and running_var outputs (graphc updates the running "
                        "statistics in place, as torch does)")
    if training:
        for what, t in (("input_mean", mean), ("input_var", var)):
            if t.graph.buffers.get(t.name) is not t:
                ctx.unsupported(f"training mode with {what} {ctx.node.input[3 if what == 'input_mean' else 4]!r} "
                                f"not a float32 initializer (graphc updates the running statistics in place)")
    # ONNX keeps momentum of the running value, torch (and graphc) the weight of the batch's
    return ops.batch_norm(x, scale, bias, mean, var, training=training, momentum=1.0 - onnx_momentum, eps=eps)


def dropout(ctx):
    if ctx.output_used(1):
        ctx.unsupported("Dropout's mask output")
    ratio = ctx.static(1)
    ratio = 0.5 if ratio is None else float(np.asarray(ratio).reshape(()))
    mode = ctx.static(2)
    training = ctx.training if ctx.training is not None else bool(mode is not None and np.asarray(mode).reshape(()))
    value = ctx._value(0)
    if not training or ratio == 0.0:
        return value
    return ops.dropout(ctx.tensor(0), ratio)


# ---- softmax ---------------------------------------------------------------------------------------


def _axis(ctx, x, default):
    axis = int(ctx.attr("axis", default))
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} out of range for shape {x.shape}")
    return axis % x.ndim


def softmax(ctx):
    x = ctx.tensor(0)
    return ops.softmax(x, _axis(ctx, x, -1))


def log_softmax(ctx):
    x = ctx.tensor(0)
    axis = _axis(ctx, x, -1)
    shifted = x - _max_along(x, axis)   # the maximum cancels in value and gradient; it keeps exp finite
    return shifted - ops.log(ops.sum(ops.exp(shifted), axis, keepdims=True))


def _max_along(x: Tensor, axis: int) -> Tensor:
    """The maximum along `axis`, kept as a size-1 axis: a 1×n max pool over rows of the axis."""
    order = tuple(a for a in range(x.ndim) if a != axis) + (axis,)
    moved = ops.transpose(x, order)
    rows = ops.reshape(moved, (-1, 1, 1, x.shape[axis]))
    peaks = ops.max_pool2d(rows, (1, x.shape[axis]))
    peaks = ops.reshape(peaks, moved.shape[:-1] + (1,))
    return ops.transpose(peaks, tuple(np.argsort(order).tolist()))


def softmax_cross_entropy_loss(ctx):
    if ctx.has_input(2) or ctx.attr("ignore_index") is not None:
        ctx.unsupported("SoftmaxCrossEntropyLoss with weights or ignore_index")
    if ctx.attr("reduction", "mean") != "mean":
        ctx.unsupported(f"SoftmaxCrossEntropyLoss with reduction {ctx.attr('reduction')!r} (graphc's is 'mean')")
    if ctx.output_used(1):
        ctx.unsupported("SoftmaxCrossEntropyLoss's log_prob output")
    scores, labels = ctx.tensor(0), ctx._value(1)
    if isinstance(labels, np.ndarray):
        labels = static_as_tensor(ctx.graph, labels, f"{ctx.where}: labels")
    if scores.ndim != 2:
        ctx.unsupported(f"SoftmaxCrossEntropyLoss of {scores.ndim}-D scores (graphc's are (N, C))")
    return ops.softmax_cross_entropy(scores, labels)


# ---- shapes ----------------------------------------------------------------------------------------


def flatten(ctx):
    value = ctx._value(0)
    shape = value.shape
    axis = int(ctx.attr("axis", 1))
    if not -len(shape) <= axis <= len(shape):
        raise ValueError(f"Flatten: axis {axis} out of range for shape {shape}")
    axis = axis + len(shape) if axis < 0 else axis
    new = (math.prod(shape[:axis]), math.prod(shape[axis:]))
    return value.reshape(new) if isinstance(value, np.ndarray) else ops.reshape(value, new)


def reshape(ctx):
    value = ctx._value(0)
    target = [int(d) for d in ctx.static(1).reshape(-1)]
    allow_zero = bool(ctx.attr("allowzero", 0))
    if allow_zero and 0 in target:
        ctx.unsupported("Reshape to an empty dimension")
    shape = tuple(value.shape[i] if d == 0 else d for i, d in enumerate(target))
    return value.reshape(shape) if isinstance(value, np.ndarray) else ops.reshape(value, shape)


def transpose(ctx):
    value = ctx._value(0)
    perm = ctx.ints("perm", tuple(reversed(range(len(value.shape)))))
    return np.transpose(value, perm) if isinstance(value, np.ndarray) else ops.transpose(value, perm)


def concat(ctx):
    tensors = [ctx.tensor(i) for i in range(len(ctx.node.input)) if ctx.has_input(i)]
    axis = int(ctx.attr("axis"))
    return ops.concat(tensors, axis)


def pad(ctx):
    x = ctx.tensor(0)
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        ctx.unsupported(f"Pad mode {mode!r} (graphc pads with a constant)")
    pads = [int(p) for p in ctx.static(1).reshape(-1)]
    value = ctx.static(2)
    value = 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0])
    axes = ctx.static(3)
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes.reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise ValueError(f"Pad: {len(pads)} pads for {len(axes)} axes")
    widths = [(0, 0)] * x.ndim
    for i, axis in enumerate(axes):
        widths[axis] = (pads[i], pads[i + len(axes)])
    if any(before < 0 or after < 0 for before, after in widths):   # negative pads crop
        starts = tuple(max(-before, 0) for before, _ in widths)
        stops = tuple(d - max(-after, 0) for d, (_, after) in zip(x.shape, widths))
        x = slice_(x, starts, stops)
        widths = [(max(before, 0), max(after, 0)) for before, after in widths]
    return ops.pad(x, tuple(widths), value)


# ---- reductions ------------------------------------------------------------------------------------


def _reduce(function):
    def convert(ctx):
        x = ctx.tensor(0)
        takes_axes_input = ctx.node.op_type == "ReduceSum" or ctx.opset >= 18
        axes = ctx.static(1) if takes_axes_input else (
            np.asarray(ctx.attrs["axes"]) if "axes" in ctx.attrs else None)
        keepdims = bool(ctx.attr("keepdims", 1))
        if axes is None or axes.size == 0:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            axes = None
        else:
            axes = tuple(int(a) for a in axes.reshape(-1))
        return function(x, axes, keepdims=keepdims)
    return convert


def identity(ctx):
    return ctx._value(0)


def constant(ctx):
    from onnx import numpy_helper
    attrs = ctx.node.attribute
    if len(attrs) != 1:
        raise ValueError(f"Constant needs exactly one value attribute, got {[a.name for a in attrs]}")
    name = attrs[0].name
    value = ctx.attrs[name]
    if name == "value":
        return np.array(numpy_helper.to_array(value), order="C", copy=True)
    if name in ("value_float", "value_floats"):
        return np.asarray(value, dtype=np.float32)
    if name in ("value_int", "value_ints"):
        return np.asarray(value, dtype=np.int64)
    ctx.unsupported(f"a Constant's {name} attribute")


CONVERTERS = {
    "Gemm": gemm, "MatMul": matmul, "Conv": conv,
    "MaxPool": max_pool, "AveragePool": average_pool, "GlobalAveragePool": global_average_pool,
    "Relu": _unary(ops.relu), "LeakyRelu": leaky_relu, "Sigmoid": _unary(ops.sigmoid), "Tanh": _unary(ops.tanh),
    "Exp": _unary(ops.exp), "Log": _unary(ops.log), "Sqrt": _unary(ops.sqrt), "Neg": _unary(ops.neg),
    "Softplus": _unary(ops.softplus), "Pow": power,
    "Softmax": softmax, "LogSoftmax": log_softmax, "SoftmaxCrossEntropyLoss": softmax_cross_entropy_loss,
    "Flatten": flatten, "Reshape": reshape, "Transpose": transpose, "Concat": concat, "Pad": pad,
    "Add": _binary(ops.add), "Sub": _binary(ops.sub), "Mul": _binary(ops.mul), "Div": _binary(ops.div),
    "BatchNormalization": batch_normalization, "Dropout": dropout,
    "Identity": identity, "Constant": constant,
    "ReduceMean": _reduce(ops.mean), "ReduceSum": _reduce(ops.sum),
}
