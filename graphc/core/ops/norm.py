"""Batch normalization, built from primitives so that its backward pass is derived like any other.

Training mode normalizes with the batch's statistics, centred first (two passes) so that inputs
far from zero (mean 1e4, std 1) keep their precision in float32; it also records, as buffer
updates of the graph, torch's in-place update of the running statistics. Eval mode is one
per-channel scale and shift computed from the running statistics.
"""
from __future__ import annotations

from graphc.core.errors import shape_error, user_site
from graphc.core.ir import Tensor, as_bool, as_finite_float
from graphc.core.ops.reduce import mean
from graphc.core.ops.shape import reshape, stop_gradient


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
               running_var: Tensor | None, training: bool = True, momentum: float = 0.1,
               eps: float = 1e-5) -> Tensor:
    """`torch.nn.functional.batch_norm` over axis 1 of an (N, C, ...) tensor.

    Training: batch statistics (biased variance) normalize, and evaluating the result updates
    the running statistics in place: running = (1 - momentum) * running + momentum * batch,
    with the unbiased variance. Eval (`training=False`): the running statistics normalize.
    """
    site = user_site()
    operands = [t for t in (x, weight, bias, running_mean, running_var) if t is not None]
    training = as_bool(training, "batch_norm: training")
    momentum = as_finite_float(momentum, "batch_norm: momentum")
    eps = as_finite_float(eps, "batch_norm: eps")
    if not isinstance(x, Tensor):
        raise shape_error("batch_norm", f"x must be a graphc Tensor, got {type(x).__name__}", operands, site)
    if x.ndim < 2 or x.dtype not in ("float32", "float64"):
        raise shape_error("batch_norm", "x must be a float tensor of shape (N, C, ...) with the channels on "
                          f"axis 1, got {x.ndim}-D {x.dtype}", operands, site)
    if eps <= 0:
        raise shape_error("batch_norm", f"eps must be > 0, got {eps!r}", operands, site)
    channels = x.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        # training mode writes the running statistics: they must be state the graph owns
        _check_per_channel(what, t, training and what.startswith("running"), x, channels, operands, site)
    if (running_mean is None) != (running_var is None):
        raise shape_error("batch_norm", "give both running_mean and running_var, or neither", operands, site)
    if not training and running_mean is None:
        raise shape_error("batch_norm", "eval mode (training=False) normalizes with running_mean and running_var; "
                          "none were given", operands, site)

    per_channel = (1, channels) + (1,) * (x.ndim - 2)
    if not training:
        inv_std = (running_var + eps) ** -0.5
        scale = inv_std * weight if weight is not None else inv_std
        shift = -running_mean * scale + bias if bias is not None else -running_mean * scale
        return x * reshape(scale, per_channel) + reshape(shift, per_channel)

    axes = (0,) + tuple(range(2, x.ndim))
    count = x.size // channels
    if count < 2:
        raise shape_error("batch_norm", f"training mode needs more than one value per channel, got "
                          f"{count} (shape {x.shape})", operands, site)
    batch_mean = mean(x, axes, keepdims=True)
    centred = x - batch_mean
    # The variance's own path to the mean contributes -2/n·Σ(x - mean) = 0 to the gradient:
    # cut it, so the backward pass makes no sum for it (torch's formula has none either).
    # After differentiation both centred tensors are one node again.
    centred_for_var = x - stop_gradient(batch_mean)
    batch_var = mean(centred_for_var * centred_for_var, axes, keepdims=True)
    y = centred * (batch_var + eps) ** -0.5
    if weight is not None:
        y = y * reshape(weight, per_channel)
    if bias is not None:
        y = y + reshape(bias, per_channel)
    if running_mean is not None:
        keep, graph = 1.0 - momentum, x.graph
        graph.update_buffer(running_mean, keep * running_mean + momentum * reshape(batch_mean, (channels,)), y)
        unbiased = reshape(batch_var, (channels,)) * (count / (count - 1))
        graph.update_buffer(running_var, keep * running_var + momentum * unbiased, y)
    return y


def _check_per_channel(what, t, is_buffer, x, channels, operands, site):
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise shape_error("batch_norm", f"{what} must be a graphc Tensor or None, got {type(t).__name__}",
                          operands, site)
    if t.graph is not x.graph:
        raise shape_error("batch_norm", f"{what} belongs to another graph than x", operands, site)
    if t.shape != (channels,) or t.dtype != x.dtype:
        raise shape_error("batch_norm", f"{what} must have shape ({channels},) and dtype {x.dtype} for "
                          f"{channels} channels, got {t.dtype}{list(t.shape)}", operands, site)
    if is_buffer and t.graph.buffers.get(t.name) is not t:
        raise shape_error("batch_norm", f"{what} must be a buffer (g.buffer), which batch_norm updates in place; "
                          f"got {t!r}", operands, site)
