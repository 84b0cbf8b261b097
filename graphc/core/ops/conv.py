"""2-D convolution (cross-correlation, NCHW / OIHW as torch.nn.functional.conv2d) and its two
backward convolutions, each a primitive so the gradient graph shows them:

- conv2d_input_grad(g, w): the input gradient, a transposed convolution;
- conv2d_weight_grad(x, g): the weight gradient, a correlation of the input with the output gradient.

The three are closed under differentiation, so second derivatives through conv work too.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graphc.core.errors import at_user_line, shape_error
from graphc.core.ir import Tensor, is_int
from graphc.core.ops.registry import Mismatch, OpDef, op, register, require_float


def pair(value, what: str, op_name: str) -> tuple[int, int]:
    """An int or a pair of ints (a stride, kernel or padding) as two Python ints; never truncates a float."""
    if is_int(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return int(value[0]), int(value[1])
    raise TypeError(at_user_line(f"{op_name}: {what} must be an int or a pair of ints, got {value!r}"))


def conv_padding(padding, kernel: tuple[int, int], stride: tuple[int, int], operands, op_name="conv2d"):
    """((top, bottom), (left, right)) from an int, a pair, a pair of pairs, "valid", "same" or "full"."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0), (0, 0)
        if mode == "full":
            return (kernel[0] - 1,) * 2, (kernel[1] - 1,) * 2
        if mode == "same":
            if stride != (1, 1):
                raise shape_error(op_name, f'padding="same" needs stride 1, got stride {stride}', operands)
            # Odd kernels pad (k-1)/2 each side; even ones put the extra cell after, as PyTorch does.
            return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)
        raise shape_error(op_name, f'padding must be an int, a pair, "valid", "same" or "full", got {padding!r}',
                          operands)
    if (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding)):
        if not all(is_int(v) for side in padding for v in side):
            raise TypeError(at_user_line(f"{op_name}: padding must hold ints, got {padding!r}"))
        (t, b), (l, r) = padding
        result = (int(t), int(b)), (int(l), int(r))
    else:
        ph, pw = pair(padding, "padding", op_name)
        result = (ph, ph), (pw, pw)
    if min(result[0] + result[1]) < 0:
        raise shape_error(op_name, f"padding must be >= 0, got {padding!r}", operands)
    return result


def conv_output_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _windows(x, kernel, stride, padding, out_hw):
    """Strided sliding windows of the padded input: (N, C, OH, OW, kh, kw), a view."""
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple(padding))
    win = sliding_window_view(xp, kernel, axis=(2, 3))
    return win[:, :, ::stride[0], ::stride[1]][:, :, :out_hw[0], :out_hw[1]]


@register
class Conv2d(OpDef):
    name = "conv2d"
    vjp_rule = ("dx = conv2d_input_grad(dy, w) (transposed convolution); "
                "dw = conv2d_weight_grad(x, dy) (correlation of x with dy)")

    def infer(self, inputs, attrs):
        x, w = inputs
        require_float(inputs)
        if x.ndim != 4:
            raise Mismatch(f"input must be 4-D (N, C, H, W), got shape {x.shape}")
        if w.ndim != 4:
            raise Mismatch(f"weight must be 4-D (O, C, kh, kw), got shape {w.shape}")
        if x.shape[1] != w.shape[1]:
            raise Mismatch(f"input has {x.shape[1]} channels but the weight expects {w.shape[1]}")
        if x.dtype != w.dtype:
            raise Mismatch(f"dtypes differ ({x.dtype} vs {w.dtype})")
        stride, padding = attrs["stride"], attrs["padding"]
        oh = conv_output_size(x.shape[2], w.shape[2], stride[0], padding[0])
        ow = conv_output_size(x.shape[3], w.shape[3], stride[1], padding[1])
        if oh < 1 or ow < 1:
            raise Mismatch(f"kernel {w.shape[2:]} with padding {padding} does not fit the input {x.shape[2:]}")
        return (x.shape[0], w.shape[0], oh, ow), x.dtype

    def reference(self, args, attrs, node, float_dtype):
        x, w = args
        win = _windows(x, w.shape[2:], attrs["stride"], attrs["padding"], node.shape[2:])
        return np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)

    def vjp(self, node, g, wanted):
        x, w = node.inputs
        geometry = dict(stride=node.attrs["stride"], padding=node.attrs["padding"])
        return [conv2d_input_grad(g, w, x.shape, **geometry) if wanted[0] else None,
                conv2d_weight_grad(x, g, w.shape, **geometry) if wanted[1] else None]


@register
class Conv2dInputGrad(OpDef):
    """dL/dx of conv2d: a transposed convolution of the output gradient with the weights."""

    name = "conv2d_input_grad"
    vjp_rule = "linear in (dy, w): d(dy) = conv2d(c, w); dw = conv2d_weight_grad(c, dy)"

    def infer(self, inputs, attrs):
        g, w = inputs
        return attrs["x_shape"], g.dtype

    def reference(self, args, attrs, node, float_dtype):
        g, w = args
        (sh, sw), ((pt, _), (pl, _)) = attrs["stride"], attrs["padding"]
        n, c, h, wd = attrs["x_shape"]
        oh, ow = g.shape[2:]
        padded = np.zeros((n, c, h + sum(attrs["padding"][0]), wd + sum(attrs["padding"][1])), dtype=g.dtype)
        for i in range(w.shape[2]):
            for j in range(w.shape[3]):
                contribution = np.tensordot(g, w[:, :, i, j], axes=([1], [0])).transpose(0, 3, 1, 2)
                padded[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += contribution
        return padded[:, :, pt:pt + h, pl:pl + wd]

    def vjp(self, node, c, wanted):
        g, w = node.inputs
        geometry = dict(stride=node.attrs["stride"], padding=node.attrs["padding"])
        return [conv2d_raw(c, w, **geometry) if wanted[0] else None,
                conv2d_weight_grad(c, g, w.shape, **geometry) if wanted[1] else None]


@register
class Conv2dWeightGrad(OpDef):
    """dL/dw of conv2d: the correlation of the (padded) input with the output gradient."""

    name = "conv2d_weight_grad"
    vjp_rule = "linear in (x, dy): dx = conv2d_input_grad(dy, c); d(dy) = conv2d(x, c)"

    def infer(self, inputs, attrs):
        x, g = inputs
        return attrs["w_shape"], x.dtype

    def reference(self, args, attrs, node, float_dtype):
        x, g = args
        win = _windows(x, attrs["w_shape"][2:], attrs["stride"], attrs["padding"], g.shape[2:])
        return np.tensordot(g, win, axes=([0, 2, 3], [0, 2, 3]))

    def vjp(self, node, c, wanted):
        x, g = node.inputs
        geometry = dict(stride=node.attrs["stride"], padding=node.attrs["padding"])
        return [conv2d_input_grad(g, c, x.shape, **geometry) if wanted[0] else None,
                conv2d_raw(x, c, **geometry) if wanted[1] else None]


def conv2d_raw(x, w, stride, padding) -> Tensor:
    return op("conv2d").apply([x, w], stride=stride, padding=padding)


def conv2d_input_grad(g, w, x_shape, stride, padding) -> Tensor:
    return op("conv2d_input_grad").apply([g, w], x_shape=tuple(x_shape), stride=stride, padding=padding)


def conv2d_weight_grad(x, g, w_shape, stride, padding) -> Tensor:
    return op("conv2d_weight_grad").apply([x, g], w_shape=tuple(w_shape), stride=stride, padding=padding)


def conv2d(x: Tensor, w: Tensor, b: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """Cross-correlation as torch.nn.functional.conv2d; padding int, pair, "valid", "same" or "full"."""
    from graphc.core.ops.shape import reshape
    operands = [x, w] + ([b] if b is not None else [])
    if not all(isinstance(t, Tensor) for t in operands):
        raise shape_error("conv2d", "operands must be graphc Tensors", operands)
    stride = pair(stride, "stride", "conv2d")
    if min(stride) < 1:
        raise shape_error("conv2d", f"stride must be >= 1, got {stride}", operands)
    if w.ndim != 4:
        raise shape_error("conv2d", f"weight must be 4-D (O, C, kh, kw), got shape {w.shape}", operands)
    padding = conv_padding(padding, w.shape[2:], stride, operands)
    y = conv2d_raw(x, w, stride, padding)
    if b is None:
        return y
    if b.shape != (w.shape[0],):
        raise shape_error("conv2d", f"bias must have shape ({w.shape[0]},)", operands)
    return y + reshape(b, (1, w.shape[0], 1, 1))
