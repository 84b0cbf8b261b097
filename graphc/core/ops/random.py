"""Random ops: `dropout_mask`, a counter-based (Philox) mask of 0s and 1/(1-p)s.

The mask is a pure function of its key operand ([seed, call index], int32), its `stream`
attribute and each element's index (graphc/core/philox.py gives the exact mapping): no state,
so the reference executor and native code agree bit for bit, CSE may merge two masks of equal
key and attributes, and a backward pass may regenerate a mask rather than keep it.
"""
from __future__ import annotations

import numpy as np

from graphc.core import philox
from graphc.core.errors import at_user_line, shape_error
from graphc.core.ir import Tensor, as_bool, as_finite_float, as_int, normalize_shape
from graphc.core.ops.registry import Mismatch, OpDef, op, register

__all__ = ["dropout", "dropout_mask", "key_words"]

KEY_SHAPE = (2,)
MAX_STREAM = 2**32 - 1


@register
class DropoutMask(OpDef):
    """key (2,) int32 = [seed, call index] -> float32 `shape`: float32(1/(1-p)) where an element
    is kept (probability 1 - p), 0 where it is dropped; `stream` separates masks of one call."""

    name = "dropout_mask"
    vjp_rule = "the random key takes no gradient"

    def infer(self, inputs, attrs):
        (key,) = inputs
        if key.dtype != "int32":
            raise Mismatch(f"the key must be an int32 tensor [seed, call index], got {key.dtype}")
        if key.shape != KEY_SHAPE:
            raise Mismatch(f"the key must have shape {KEY_SHAPE} ([seed, call index]), got shape {key.shape}")
        return attrs["shape"], "float32"

    def reference(self, args, attrs, node, float_dtype):
        seed, call = key_words(args[0])
        return philox.dropout_mask_values(attrs["shape"], attrs["p"], seed, call, attrs["stream"])

    def vjp(self, node, g, wanted):
        return [None]   # the key is an index, not a value: it takes no gradient


def key_words(key) -> tuple[int, int]:
    """(seed, call index) of a key value, as the uint32 bits of its two int32 words.

    A folded constant key may arrive as floats holding whole numbers (a `fill`'s reference value)."""
    words = np.asarray(key).reshape(-1)
    if words.shape != KEY_SHAPE:
        raise ValueError(f"dropout_mask: the key must hold 2 words [seed, call index], got shape {np.shape(key)}")
    seed, call = (int(w) & 0xFFFFFFFF for w in words.tolist())
    return seed, call


def drop_probability(p, op_name: str) -> float:
    """`p` as a float in [0, 1), or an error naming `op_name` and the user's line."""
    p = as_finite_float(p, f"{op_name}: p")
    if not 0.0 <= p < 1.0:
        raise ValueError(at_user_line(f"{op_name}: p, the probability of zeroing an element, must be in [0, 1), "
                                      f"got {p!r}"))
    return p


def dropout_mask(key: Tensor, shape, p: float, stream: int = 0) -> Tensor:
    """A float32 tensor of `shape`: each element float32(1/(1-p)) with probability 1 - p, else 0.

    `key` is an int32 tensor of shape (2,): [seed, call index]; `stream` (an int in
    [0, 2**32)) tells apart masks drawn with one key, e.g. one per dropout layer."""
    shape = normalize_shape(shape, "dropout_mask")
    p = drop_probability(p, "dropout_mask")
    stream = as_int(stream, "dropout_mask: stream")
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(at_user_line(f"dropout_mask: stream must be in [0, 2**32), got {stream}"))
    return op("dropout_mask").apply([key], shape=shape, p=p, stream=stream)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`torch.nn.functional.dropout`: each element zeroed with probability `p`, the others scaled
    by 1/(1-p); `x` itself when not `training` (or p is 0).

    The mask is drawn from the graph's random key: whoever runs the graph supplies [seed, call
    index] (`gc.evaluate(..., seed=)`, `gc.compile(..., seed=)`), and each dropout call of the
    graph draws its own stream. The backward pass multiplies by the same mask, kept in memory.
    """
    if not isinstance(x, Tensor):
        raise TypeError(at_user_line(f"dropout: x must be a graphc Tensor, got {type(x).__name__}"))
    p = drop_probability(p, "dropout")
    if as_bool(training, "dropout: training") is False or p == 0.0:
        return x
    if x.dtype != "float32":
        raise shape_error("dropout", f"needs a float32 tensor, got {x.dtype}", [x])
    graph = x.graph
    stream = sum(node.op == "dropout_mask" for node in graph.nodes)
    return x * dropout_mask(graph.random_key_node(), x.shape, p, stream)
