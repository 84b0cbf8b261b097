"""Softmax and the losses: softmax cross-entropy, logistic (sigmoid binary cross-entropy), MSE.

Each is stable for logits of any magnitude: softmax subtracts the row maximum, cross-entropy
uses log-sum-exp, and the logistic loss is softplus(z) - t·z.
"""
from __future__ import annotations

import numpy as np

from graphc.core.errors import shape_error
from graphc.core.ir import INT_DTYPES, Tensor, as_int
from graphc.core.ops.elementwise import elementwise
from graphc.core.ops.registry import Mismatch, OpDef, op, register, require_float
from graphc.core.scalar import Softplus


def _log_softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


@register
class Softmax(OpDef):
    name = "softmax"
    vjp_rule = "dx = y · (dy − Σ(dy · y)) along the softmax axis"

    def infer(self, inputs, attrs):
        require_float(inputs)
        return inputs[0].shape, inputs[0].dtype

    def reference(self, args, attrs, node, float_dtype):
        return np.exp(_log_softmax(args[0], attrs["axis"]))

    def vjp(self, node, g, wanted):
        from graphc.core.ops.reduce import sum as reduce_sum
        y = node
        # dx = y * (g - sum(g * y)) along the softmax axis
        return [y * (g - reduce_sum(g * y, axis=node.attrs["axis"], keepdims=True))]


@register
class OneHot(OpDef):
    """labels (N,) int -> (N, C) float with a 1 at each label."""

    name = "one_hot"
    vjp_rule = "labels take no gradient"

    def infer(self, inputs, attrs):
        return inputs[0].shape + (attrs["classes"],), attrs["dtype"]

    def reference(self, args, attrs, node, float_dtype):
        labels = args[0]
        _check_labels(labels, attrs["classes"])
        return (labels[..., None] == np.arange(attrs["classes"])).astype(float_dtype)

    def vjp(self, node, g, wanted):
        return [None]


@register
class SoftmaxCrossEntropy(OpDef):
    name = "softmax_cross_entropy"
    vjp_rule = "d logits = (softmax(logits) − one_hot(labels)) · dL / N; labels take no gradient"

    def infer(self, inputs, attrs):
        logits, labels = inputs
        require_float(inputs, 0)
        if logits.ndim != 2:
            raise Mismatch(f"logits must be 2-D (N, C), got shape {logits.shape}")
        if labels.dtype not in INT_DTYPES:
            raise Mismatch(f"labels must be integer class ids, got {labels.dtype}")
        if labels.shape != logits.shape[:1]:
            raise Mismatch(f"labels must have shape ({logits.shape[0]},) to match the logits")
        return (), logits.dtype

    def reference(self, args, attrs, node, float_dtype):
        logits, labels = args
        _check_labels(labels, logits.shape[1])
        picked = np.take_along_axis(_log_softmax(logits, 1), labels[:, None].astype(np.int64), axis=1)
        return np.asarray(-picked.mean(), dtype=float_dtype)

    def vjp(self, node, g, wanted):
        logits, labels = node.inputs
        probabilities = softmax(logits, axis=1)
        targets = op("one_hot").apply([labels], classes=logits.shape[1], dtype=logits.dtype)
        return [(probabilities - targets) * (g * (1.0 / logits.shape[0])), None]


def _check_labels(labels, classes):
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{labels.min()}, {labels.max()}]")


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise shape_error("softmax", "needs a Tensor with at least one axis", [x])
    axis = as_int(axis, "softmax: axis")
    if not -x.ndim <= axis < x.ndim:
        raise shape_error("softmax", f"axis {axis} out of range", [x])
    return op("softmax").apply([x], axis=axis % x.ndim)


def softmax_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean over the batch of -log softmax(logits)[label]; labels are int class ids (N,)."""
    return op("softmax_cross_entropy").apply([logits, labels])


def _same_shape_loss(name, a, b):
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise shape_error(name, "operands must be graphc Tensors", [a, b])
    if a.shape != b.shape:
        raise shape_error(name, "prediction and target must have the same shape", [a, b])


def sigmoid_binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Logistic regression's loss: mean of -t·log σ(z) - (1-t)·log(1-σ(z)) = softplus(z) - t·z."""
    from graphc.core.ops.reduce import mean
    _same_shape_loss("sigmoid_binary_cross_entropy", logits, targets)
    return mean(elementwise(lambda z, t: Softplus(z) - t * z, logits, targets, name="sigmoid_binary_cross_entropy"))


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of squared differences."""
    from graphc.core.ops.reduce import mean
    _same_shape_loss("mse", pred, target)
    return mean(elementwise(lambda p, t: (p - t) ** 2, pred, target, name="mse"))
