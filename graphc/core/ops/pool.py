"""Pooling: average (padded cells count as zeros, divisor kernel area), max (padding never wins;
ties send the gradient to the first maximal element, as PyTorch), and global average.
"""
from __future__ import annotations

import numpy as np

from graphc.core.errors import shape_error
from graphc.core.ir import Tensor
from graphc.core.ops.conv import _windows, pair
from graphc.core.ops.registry import Mismatch, OpDef, op, register, require_float


def _pool_geometry(op_name, x, kernel, stride, padding):
    kernel = pair(kernel, "kernel", op_name)
    stride = kernel if stride is None else pair(stride, "stride", op_name)
    pad = pair(padding, "padding", op_name)
    if min(kernel) < 1 or min(stride) < 1 or min(pad) < 0:
        raise shape_error(op_name, f"kernel and stride must be >= 1 and padding >= 0, "
                                   f"got kernel={kernel} stride={stride} padding={pad}", [x])
    if pad[0] > kernel[0] // 2 or pad[1] > kernel[1] // 2:
        raise shape_error(op_name, f"padding {pad} must be at most half the kernel {kernel}", [x])
    return dict(kernel=kernel, stride=stride, padding=((pad[0],) * 2, (pad[1],) * 2))


def _pooled_shape(x_shape, kernel, stride, padding):
    n, c, h, w = x_shape
    oh = (h + sum(padding[0]) - kernel[0]) // stride[0] + 1
    ow = (w + sum(padding[1]) - kernel[1]) // stride[1] + 1
    return n, c, oh, ow


class _Pool(OpDef):
    def infer(self, inputs, attrs):
        (x,) = inputs[:1]
        require_float(inputs)
        if x.ndim != 4:
            raise Mismatch(f"input must be 4-D (N, C, H, W), got shape {x.shape}")
        shape = _pooled_shape(x.shape, attrs["kernel"], attrs["stride"], attrs["padding"])
        if shape[2] < 1 or shape[3] < 1:
            raise Mismatch(f"kernel {attrs['kernel']} does not fit the input {x.shape[2:]}")
        return shape, x.dtype


def _scatter_windows(values, x_shape, kernel, stride, padding):
    """Adjoint of taking windows: add values[n, c, oh, ow, i, j] into the cell each window read."""
    n, c, h, w = x_shape
    (pt, _), (pl, _) = padding
    oh, ow = values.shape[2:4]
    padded = np.zeros((n, c, h + sum(padding[0]), w + sum(padding[1])), dtype=values.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            padded[:, :, i:i + stride[0] * (oh - 1) + 1:stride[0], j:j + stride[1] * (ow - 1) + 1:stride[1]] += \
                values[:, :, :, :, i, j]
    return padded[:, :, pt:pt + h, pl:pl + w]


@register
class AvgPool2d(_Pool):
    name = "avg_pool2d"
    vjp_rule = "dx = avg_pool2d_grad(dy): each output gradient spread evenly over its window"

    def reference(self, args, attrs, node, float_dtype):
        win = _windows(args[0], attrs["kernel"], attrs["stride"], attrs["padding"], node.shape[2:])
        return win.mean(axis=(4, 5))

    def vjp(self, node, g, wanted):
        return [op("avg_pool2d_grad").apply([g], x_shape=node.inputs[0].shape, **node.attrs)]


@register
class AvgPool2dGrad(OpDef):
    """dL/dx of avg_pool2d: each output gradient spread evenly over its window."""

    name = "avg_pool2d_grad"
    vjp_rule = "linear: d(dy) = avg_pool2d(c)"

    def infer(self, inputs, attrs):
        return attrs["x_shape"], inputs[0].dtype

    def reference(self, args, attrs, node, float_dtype):
        g = args[0]
        kh, kw = attrs["kernel"]
        spread = np.broadcast_to((g / (kh * kw))[:, :, :, :, None, None], g.shape + (kh, kw))
        return _scatter_windows(spread, attrs["x_shape"], attrs["kernel"], attrs["stride"], attrs["padding"])

    def vjp(self, node, c, wanted):
        attrs = {k: v for k, v in node.attrs.items() if k != "x_shape"}
        return [op("avg_pool2d").apply([c], **attrs)]


@register
class MaxPool2d(_Pool):
    name = "max_pool2d"
    vjp_rule = "dx = max_pool2d_grad(x, dy): each output gradient to its window's first maximum"

    def reference(self, args, attrs, node, float_dtype):
        x = args[0]
        padded = np.pad(x, ((0, 0), (0, 0)) + attrs["padding"], constant_values=-np.inf)
        win = _windows(padded, attrs["kernel"], attrs["stride"], ((0, 0), (0, 0)), node.shape[2:])
        return win.max(axis=(4, 5))

    def vjp(self, node, g, wanted):
        return [op("max_pool2d_grad").apply([node.inputs[0], g], **node.attrs)]


@register
class MaxPool2dGrad(OpDef):
    """dL/dx of max_pool2d: each output gradient goes to its window's first maximal element."""

    name = "max_pool2d_grad"

    def infer(self, inputs, attrs):
        return inputs[0].shape, inputs[0].dtype

    def reference(self, args, attrs, node, float_dtype):
        x, g = args
        kernel = attrs["kernel"]
        padded = np.pad(x, ((0, 0), (0, 0)) + attrs["padding"], constant_values=-np.inf)
        win = _windows(padded, kernel, attrs["stride"], ((0, 0), (0, 0)), g.shape[2:])
        flat = win.reshape(win.shape[:4] + (-1,))
        winner = flat.argmax(axis=-1)  # argmax returns the first maximum: PyTorch's tie rule
        routed = (np.arange(flat.shape[-1]) == winner[..., None]) * g[..., None]
        return _scatter_windows(routed.reshape(win.shape).astype(g.dtype), x.shape, kernel,
                                attrs["stride"], attrs["padding"])

    def vjp(self, node, c, wanted):
        raise NotImplementedError("the second derivative of max_pool2d is not supported")


def avg_pool2d(x: Tensor, kernel, stride=None, padding=0) -> Tensor:
    if not isinstance(x, Tensor):
        raise shape_error("avg_pool2d", "the input must be a graphc Tensor", [x])
    return op("avg_pool2d").apply([x], **_pool_geometry("avg_pool2d", x, kernel, stride, padding))


def max_pool2d(x: Tensor, kernel, stride=None, padding=0) -> Tensor:
    if not isinstance(x, Tensor):
        raise shape_error("max_pool2d", "the input must be a graphc Tensor", [x])
    return op("max_pool2d").apply([x], **_pool_geometry("max_pool2d", x, kernel, stride, padding))


def global_avg_pool2d(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C): the mean over each channel's plane."""
    from graphc.core.ops.reduce import mean
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise shape_error("global_avg_pool2d", "the input must be a 4-D (N, C, H, W) Tensor", [x])
    return mean(x, axis=(2, 3))
