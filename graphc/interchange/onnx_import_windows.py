"""ONNX's window ops as graphc ops: Conv, MaxPool, AveragePool, GlobalAveragePool.

1-D windows are the 2-D ones on a height of 1. What graphc's conv2d and pools do not take is
composed: dilation as a kernel with zeros between its taps, groups as one convolution per group,
padding beyond half a window, asymmetric padding and `ceil_mode` as an explicit pad (for
AveragePool, then a per-position rescale so only the cells ONNX counts divide).
"""
from __future__ import annotations

import math

import numpy as np

import graphc.core.ops as ops
from graphc.core.ir import Tensor
from graphc.core.ops.shape import slice_

# A stand-in for -inf where max pooling pads: graphc's pad takes finite values only; any real
# element of a window beats it.
MAX_POOL_PAD = float(np.finfo(np.float32).min)


def _window_pads(ctx, sizes, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) padding of each spatial axis from `pads` or `auto_pad`."""
    n = len(sizes)
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto == "NOTSET":
        pads = ctx.ints("pads", (0,) * 2 * n)
        if len(pads) != 2 * n or min(pads) < 0:
            raise ValueError(f"pads {pads} must hold {2 * n} non-negative values")
        return [(pads[i], pads[i + n]) for i in range(n)]
    if auto == "VALID":
        return [(0, 0)] * n
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto!r}")
    result = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        result.append((small, large) if auto == "SAME_UPPER" else (large, small))
    return result


def _positive(ctx, name: str, values, rank: int) -> tuple[int, ...]:
    """An attribute of one int >= 1 per spatial axis (kernel_shape, strides, dilations)."""
    values = tuple(values)
    if len(values) != rank or min(values, default=1) < 1:
        raise ValueError(f"{ctx.node.op_type}: {name} {values} must hold {rank} values >= 1")
    return values


def _spatial_rank(ctx, x: Tensor) -> int:
    rank = x.ndim - 2
    if rank not in (1, 2):
        ctx.unsupported(f"{ctx.node.op_type} over {rank} spatial dimensions (graphc has 1-D and 2-D windows)")
    return rank


def _lift_1d(x: Tensor) -> Tensor:
    """(N, C, L) -> (N, C, 1, L): a 1-D window op is the 2-D one on a height of 1."""
    return ops.reshape(x, x.shape[:2] + (1,) + x.shape[2:])


def conv(ctx):
    x, w = ctx.tensor(0), ctx.tensor(1)
    b = ctx.tensor(2) if ctx.has_input(2) else None
    rank = _spatial_rank(ctx, x)
    if w.ndim != x.ndim:
        raise ValueError(f"Conv: weight shape {w.shape} does not match input shape {x.shape}")
    kernel = tuple(w.shape[2:])
    if ctx.ints("kernel_shape", kernel) != kernel:
        raise ValueError(f"Conv: kernel_shape {ctx.ints('kernel_shape', kernel)} differs from the weight's {kernel}")
    strides = _positive(ctx, "strides", ctx.ints("strides", (1,) * rank), rank)
    dilations = _positive(ctx, "dilations", ctx.ints("dilations", (1,) * rank), rank)
    groups = int(ctx.attr("group", 1))
    if groups < 1:
        raise ValueError(f"Conv: group must be >= 1, got {groups}")
    pads = _window_pads(ctx, x.shape[2:], kernel, strides, dilations)
    if rank == 1:
        x, w = _lift_1d(x), _lift_1d(w)
        strides, dilations, pads = (1,) + strides, (1,) + dilations, [(0, 0)] + pads
    if dilations != (1, 1):
        w = _dilated_kernel(w, dilations)
    padding = tuple(pads)
    if groups == 1:
        y = ops.conv2d(x, w, b, stride=strides, padding=padding)
    else:
        y = _grouped_conv(ctx, x, w, b, groups, strides, padding)
    return ops.reshape(y, y.shape[:2] + y.shape[3:]) if rank == 1 else y


def _dilated_kernel(w: Tensor, dilations) -> Tensor:
    """The kernel with dilation-1 zeros between its taps: a dilated convolution is a plain one
    with it (more multiplications, the same result and gradients)."""
    (o, c, kh, kw), (dh, dw) = w.shape, dilations
    spread = ops.pad(ops.reshape(w, (o, c, kh, 1, kw, 1)), ((0, 0), (0, 0), (0, 0), (0, dh - 1), (0, 0), (0, dw - 1)))
    spread = ops.reshape(spread, (o, c, kh * dh, kw * dw))
    return slice_(spread, (0, 0, 0, 0), (o, c, (kh - 1) * dh + 1, (kw - 1) * dw + 1))


def _grouped_conv(ctx, x, w, b, groups, strides, padding):
    channels, outputs = x.shape[1], w.shape[0]
    if channels % groups or outputs % groups or w.shape[1] * groups != channels:
        raise ValueError(f"Conv: group={groups} does not divide input channels {channels} and weight {w.shape}")
    per_in, per_out = channels // groups, outputs // groups
    parts = []
    for g in range(groups):
        xg = slice_(x, (0, g * per_in, 0, 0), (x.shape[0], (g + 1) * per_in) + x.shape[2:])
        wg = slice_(w, (g * per_out, 0, 0, 0), ((g + 1) * per_out,) + w.shape[1:])
        bg = slice_(b, (g * per_out,), ((g + 1) * per_out,)) if b is not None else None
        parts.append(ops.conv2d(xg, wg, bg, stride=strides, padding=padding))
    return ops.concat(parts, 1)


def _pool_geometry(ctx, x, rank):
    kernel = _positive(ctx, "kernel_shape", ctx.ints("kernel_shape", ()), rank)
    strides = _positive(ctx, "strides", ctx.ints("strides", (1,) * rank), rank)
    dilations = _positive(ctx, "dilations", ctx.ints("dilations", (1,) * rank), rank)
    if any(d != 1 for d in dilations):
        ctx.unsupported(f"{ctx.node.op_type} with dilations {dilations}")
    pads = _window_pads(ctx, x.shape[2:], kernel, strides, dilations)
    ceil_mode = bool(ctx.attr("ceil_mode", 0))
    out_sizes = []
    for i, (size, k, s) in enumerate(zip(x.shape[2:], kernel, strides)):
        span = size + pads[i][0] + pads[i][1] - k
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + pads[i][0]:
            out -= 1   # the last window must start inside the input or its leading padding
        if max(pads[i]) >= k:
            ctx.unsupported(f"{ctx.node.op_type} with padding {pads[i]} as large as its window {k}")
        out_sizes.append(out)
    # ceil_mode's last window may reach past the padding: pad that far too
    padded = [(before, max(after, (out - 1) * s + k - size - before))
              for (before, after), size, k, s, out in zip(pads, x.shape[2:], kernel, strides, out_sizes)]
    if rank == 1:
        kernel, strides, out_sizes = (1,) + kernel, (1,) + strides, [1] + out_sizes
        pads, padded = [(0, 0)] + pads, [(0, 0)] + padded
    return kernel, strides, pads, padded, out_sizes


def _native_padding(kernel, pads):
    """The padding graphc's pools take (symmetric, at most half the window), else None."""
    if all(before == after and before <= k // 2 for (before, after), k in zip(pads, kernel)):
        return tuple(before for before, _ in pads)
    return None


def max_pool(ctx):
    x = ctx.tensor(0)
    if ctx.output_used(1):
        ctx.unsupported("MaxPool's Indices output")
    rank = _spatial_rank(ctx, x)
    kernel, strides, _, padded, _ = _pool_geometry(ctx, x, rank)
    x = _lift_1d(x) if rank == 1 else x
    native = _native_padding(kernel, padded)
    if native is not None:
        y = ops.max_pool2d(x, kernel, strides, native)
    else:
        y = ops.max_pool2d(ops.pad(x, ((0, 0), (0, 0)) + tuple(padded), MAX_POOL_PAD), kernel, strides)
    return ops.reshape(y, y.shape[:2] + y.shape[3:]) if rank == 1 else y


def average_pool(ctx):
    x = ctx.tensor(0)
    rank = _spatial_rank(ctx, x)
    sizes = ((1,) if rank == 1 else ()) + x.shape[2:]
    kernel, strides, pads, padded, out_sizes = _pool_geometry(ctx, x, rank)
    include_pad = bool(ctx.attr("count_include_pad", 0))
    x = _lift_1d(x) if rank == 1 else x
    # cells that count: the declared padding's with count_include_pad, never ceil_mode's overhang
    counts = _window_counts(sizes, kernel, strides, padded, out_sizes, pads if include_pad else [(0, 0)] * 2)
    if not counts.all():
        ctx.unsupported("an AveragePool window wholly in the padding")
    native = _native_padding(kernel, padded)
    full = math.prod(kernel)
    if native is not None and (counts == full).all():
        y = ops.avg_pool2d(x, kernel, strides, native)
    else:
        # pad explicitly, average over the whole window, then rescale each position by
        # window size / cells that count there
        y = ops.avg_pool2d(ops.pad(x, ((0, 0), (0, 0)) + tuple(padded)), kernel, strides)
        if not (counts == full).all():
            scale = (full / counts).astype(x.dtype)[None, None]
            y = y * ctx.graph.constant(scale, dtype=x.dtype)
    return ops.reshape(y, y.shape[:2] + y.shape[3:]) if rank == 1 else y


def _window_counts(sizes, kernel, strides, pads, out_sizes, counted_pads) -> np.ndarray:
    """(OH, OW): how many cells of each window lie in the input widened by `counted_pads`."""
    per_axis = []
    for size, k, s, (before, _), (cb, ca), out in zip(sizes, kernel, strides, pads, counted_pads, out_sizes):
        starts = np.arange(out) * s - before
        low, high = -cb, size + ca
        per_axis.append(np.clip(starts + k, low, high) - np.clip(starts, low, high))
    return np.multiply.outer(per_axis[0], per_axis[1])


def global_average_pool(ctx):
    x = ctx.tensor(0)
    if x.ndim < 3:
        raise ValueError(f"GlobalAveragePool needs an (N, C, ...) input, got shape {x.shape}")
    return ops.mean(x, tuple(range(2, x.ndim)), keepdims=True)


