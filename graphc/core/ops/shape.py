"""Shape ops: reshape, flatten, transpose, broadcast_to, pad, slice, concat, sum_to (the adjoint
of broadcasting), and stop_gradient (an identity gradients do not cross)."""
from __future__ import annotations

import numpy as np

from graphc.core.errors import ShapeError, shape_error, user_site
from graphc.core.ir import Tensor, as_finite_float, as_int, as_int_tuple, normalize_shape
from graphc.core.ops.registry import Mismatch, OpDef, op, register


@register
class StopGradient(OpDef):
    """The identity, through which no gradient flows (JAX's stop_gradient, torch's detach).
    The optimizer removes it: it never reaches native code."""

    name = "stop_gradient"
    vjp_rule = "none: the operand is treated as a constant"

    def infer(self, inputs, attrs):
        return inputs[0].shape, inputs[0].dtype

    def reference(self, args, attrs, node, float_dtype):
        return args[0]

    def vjp(self, node, g, wanted):
        return [None]


def stop_gradient(x: Tensor) -> Tensor:
    """`x`, treated by `gc.grad` as a constant."""
    return op("stop_gradient").apply([x])


@register
class Reshape(OpDef):
    name = "reshape"
    vjp_rule = "dx = reshape(dy, x.shape)"

    def infer(self, inputs, attrs):
        (x,) = inputs
        if int(np.prod(attrs["shape"], dtype=np.int64)) != x.size:
            raise Mismatch(f"cannot reshape {x.size} elements into shape {attrs['shape']}")
        return attrs["shape"], x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return args[0].reshape(attrs["shape"])

    def vjp(self, node, g, wanted):
        return [reshape(g, node.inputs[0].shape)]


@register
class Transpose(OpDef):
    name = "transpose"
    vjp_rule = "dx = transpose(dy, inverse permutation)"

    def infer(self, inputs, attrs):
        (x,) = inputs
        if sorted(attrs["axes"]) != list(range(x.ndim)):
            raise Mismatch(f"axes {attrs['axes']} are not a permutation of a {x.ndim}-D tensor's axes")
        return tuple(x.shape[a] for a in attrs["axes"]), x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.transpose(args[0], attrs["axes"])

    def vjp(self, node, g, wanted):
        return [transpose(g, tuple(np.argsort(node.attrs["axes"]).tolist()))]


@register
class BroadcastTo(OpDef):
    name = "broadcast_to"
    vjp_rule = "dx = sum_to(dy, x.shape): summed over the broadcast axes"

    def infer(self, inputs, attrs):
        (x,) = inputs
        try:
            if np.broadcast_shapes(x.shape, attrs["shape"]) != attrs["shape"]:
                raise ValueError
        except ValueError:
            raise Mismatch(f"cannot broadcast {x.shape} to {attrs['shape']}") from None
        return attrs["shape"], x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.broadcast_to(args[0], attrs["shape"])

    def vjp(self, node, g, wanted):
        return [sum_to(g, node.inputs[0].shape)]


@register
class Pad(OpDef):
    """np.pad with a constant: `pad_width` one (before, after) pair per axis."""

    name = "pad"
    vjp_rule = "dx = slice of dy without the padding"

    def infer(self, inputs, attrs):
        (x,) = inputs
        return tuple(d + before + after for d, (before, after) in zip(x.shape, attrs["pad_width"])), x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.pad(args[0], attrs["pad_width"], constant_values=attrs["value"])

    def vjp(self, node, g, wanted):
        x = node.inputs[0]
        starts = tuple(before for before, _ in node.attrs["pad_width"])
        return [slice_(g, starts, tuple(start + d for start, d in zip(starts, x.shape)))]


@register
class Slice(OpDef):
    """x[starts[0]:stops[0], starts[1]:stops[1], ...]: a box of x, steps of 1."""

    name = "slice"
    vjp_rule = "dx = pad(dy) with zeros back to x's shape"

    def infer(self, inputs, attrs):
        (x,) = inputs
        return tuple(stop - start for start, stop in zip(attrs["starts"], attrs["stops"])), x.dtype

    def reference(self, args, attrs, node, float_dtype):
        return args[0][tuple(slice(start, stop) for start, stop in zip(attrs["starts"], attrs["stops"]))]

    def vjp(self, node, g, wanted):
        x = node.inputs[0]
        widths = tuple((start, d - stop) for start, stop, d in zip(node.attrs["starts"], node.attrs["stops"], x.shape))
        return [pad(g, widths)]


@register
class Concat(OpDef):
    """np.concatenate(operands, axis): operands of one rank and dtype, equal sizes off `axis`."""

    name = "concat"
    vjp_rule = "d(operand i) = the slice of dy along the axis that operand i filled"

    def infer(self, inputs, attrs):
        axis, first = attrs["axis"], inputs[0]
        for i, t in enumerate(inputs):
            if t.dtype != first.dtype:
                raise Mismatch(f"operand {i} is {t.dtype} where operand 0 is {first.dtype}")
            if t.ndim != first.ndim:
                raise Mismatch(f"operand {i} is {t.ndim}-D where operand 0 is {first.ndim}-D")
            if any(a != b for k, (a, b) in enumerate(zip(t.shape, first.shape)) if k != axis):
                raise Mismatch(f"operand {i}'s shape {t.shape} differs from operand 0's {first.shape} "
                               f"on an axis other than {axis}")
        size = sum(t.shape[axis] for t in inputs)
        return first.shape[:axis] + (size,) + first.shape[axis + 1:], first.dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.concatenate(args, axis=attrs["axis"])

    def vjp(self, node, g, wanted):
        axis, grads, start = node.attrs["axis"], [], 0
        for operand, needed in zip(node.inputs, wanted):
            stop = start + operand.shape[axis]
            if needed:
                starts = (0,) * axis + (start,) + (0,) * (g.ndim - axis - 1)
                grads.append(slice_(g, starts, g.shape[:axis] + (stop,) + g.shape[axis + 1:]))
            else:
                grads.append(None)
            start = stop
        return grads


def reshape(x: Tensor, shape) -> Tensor:
    """Reshape to `shape`; one dimension may be -1."""
    shape = as_int_tuple(shape, "reshape: shape")
    if shape.count(-1) > 1:
        raise shape_error("reshape", f"only one -1 allowed in {shape}", [x])
    if any(d < 1 and d != -1 for d in shape):
        # -2 * -6 == 12: a product check alone would accept negative dimensions
        raise shape_error("reshape", f"dimensions must be >= 1 (or one -1), got {shape}", [x])
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        if known == 0 or x.size % known:
            raise shape_error("reshape", f"cannot reshape {x.size} elements into {shape}", [x])
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    if shape == x.shape:
        return x
    return op("reshape").apply([x], shape=shape)


def flatten(x: Tensor) -> Tensor:
    """(N, ...) -> (N, prod(...))."""
    if x.ndim < 1:
        raise shape_error("flatten", "needs a tensor with a batch dimension", [x])
    return reshape(x, (x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64))))


def transpose(x: Tensor, axes=None) -> Tensor:
    """Permute axes (default: reverse them), as numpy.transpose."""
    if axes is not None:
        axes = as_int_tuple(axes, "transpose: axes")
    if axes is not None and any(not -x.ndim <= a < x.ndim for a in axes):
        # checked before wrapping negatives: a modulo would turn axis 5 of a 2-D tensor into axis 1
        raise shape_error("transpose", f"axes {axes} out of range for a {x.ndim}-D tensor", [x])
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % max(x.ndim, 1) for a in axes)
    if axes == tuple(range(x.ndim)):
        return x
    return op("transpose").apply([x], axes=axes)


def broadcast_to(x: Tensor, shape) -> Tensor:
    shape = normalize_shape(shape, "broadcast_to")
    if shape == x.shape:
        return x
    return op("broadcast_to").apply([x], shape=shape)


def sum_to(g: Tensor, shape) -> Tensor:
    """Sum `g` over the axes numpy broadcasting added or stretched, giving `shape`: the VJP of broadcasting."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    from graphc.core.ops.reduce import sum as reduce_sum
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    summed = reduce_sum(g, axis=tuple(range(lead)) + stretched, keepdims=True)
    return reshape(summed, shape)


def pad(x: Tensor, pad_width, value=0.0) -> Tensor:
    """`np.pad(x, pad_width, constant_values=value)`: `pad_width` holds one (before, after) pair
    of non-negative ints per axis."""
    if not isinstance(pad_width, (list, tuple)) or len(pad_width) != x.ndim:
        raise shape_error("pad", f"pad_width must hold one (before, after) pair per axis of a {x.ndim}-D tensor, "
                                 f"got {pad_width!r}", [x])
    widths = tuple(as_int_tuple(pair, "pad: each pad_width pair") for pair in pad_width)
    if any(len(pair) != 2 or min(pair) < 0 for pair in widths):
        raise shape_error("pad", f"each pad_width entry must be a (before, after) pair of ints >= 0, got {widths}", [x])
    value = as_finite_float(value, "pad: value")
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise shape_error("pad", f"pads float tensors, got {x.dtype}", [x])
    if not any(before or after for before, after in widths):
        return x
    return op("pad").apply([x], pad_width=widths, value=value)


def slice_(x: Tensor, starts, stops) -> Tensor:
    """x[starts[0]:stops[0], ...] for every axis: 0 <= start < stop <= size (steps of 1)."""
    starts, stops = as_int_tuple(starts, "slice: starts"), as_int_tuple(stops, "slice: stops")
    if len(starts) != x.ndim or len(stops) != x.ndim or any(
            not 0 <= start < stop <= d for start, stop, d in zip(starts, stops, x.shape)):
        raise shape_error("slice", f"needs 0 <= start < stop <= size on every axis, got starts {starts}, "
                                   f"stops {stops}", [x])
    if starts == (0,) * x.ndim and stops == x.shape:
        return x
    return op("slice").apply([x], starts=starts, stops=stops)


def concat(tensors, axis) -> Tensor:
    """`np.concatenate(tensors, axis)`: a list of tensors of one graph, rank and dtype whose sizes
    agree on every axis but `axis` (negative counts from the last)."""
    site = user_site()
    if not isinstance(tensors, (list, tuple)):
        raise shape_error("concat", f"takes a list or tuple of tensors, got {type(tensors).__name__}",
                          [tensors], site)
    tensors = list(tensors)
    if not tensors:
        raise ShapeError(f"concat: needs at least one tensor, got an empty list (at {site})")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise shape_error("concat", f"operands must be graphc Tensors; operand {i} is a {type(t).__name__}",
                              tensors, site)
    if len({id(t.graph) for t in tensors}) > 1:
        raise shape_error("concat", "operands belong to different graphs", tensors, site)
    axis = as_int(axis, "concat: axis")
    ndim = tensors[0].ndim
    if ndim == 0:
        raise shape_error("concat", "cannot concatenate 0-D tensors", tensors, site)
    if not -ndim <= axis < ndim:
        raise shape_error("concat", f"axis {axis} out of range for {ndim}-D tensors", tensors, site)
    if len(tensors) == 1:
        return tensors[0]
    return op("concat").apply(tensors, site=site, axis=axis % ndim)
