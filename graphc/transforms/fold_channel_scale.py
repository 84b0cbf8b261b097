"""Folding a per-channel scale into the convolution or matmul before it.

Batch norm in eval mode is `y = conv(x, W) * s + t` with s and t per output channel (from
params and buffers). Any such s and t that do not depend on the product fold: scaling the weights instead, `conv(x, W * s) + t`, touches
O·C·kh·kw weights rather than every activation, and leaves `+ t` (and a ReLU after it) in the
form the convolution's bias epilogue absorbs: the normalization costs no pass over memory.
Likewise `(a @ b) * s + t` becomes `a @ (b * s) + t`.

Runs after elementwise fusion, whose nodes show the whole `relu(conv * s + t)`.
"""
from __future__ import annotations

from graphc.core.ir import Graph, Tensor
from graphc.core.ops.elementwise import make_ew
from graphc.core.scalar import Relu, symbol
from graphc.transforms.rebuild import Rewrite, rebuild_if_changed, use_counts

_FOLDABLE = ("conv2d", "matmul")


def fold_channel_scale(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    uses = use_counts(graph)
    output_ids = {out.id for out in outputs}

    def fold(rewrite: Rewrite) -> Tensor | None:
        node = rewrite.node
        if node.op != "ew" or node.dtype != "float32":
            return None
        match = _match(node, uses, output_ids)
        return _folded(rewrite, *match) if match else None

    return rebuild_if_changed(graph, outputs, lambda: fold)


def _match(node: Tensor, uses: dict[int, int], output_ids: set[int]):
    """(product index, scale index, shift index or None, relu) if `node` computes
    [relu](product * scale [+ shift]) of a conv or matmul read by nothing else."""
    expr = node.attrs["expr"]
    relu = isinstance(expr, Relu)
    inner = expr.args[0] if relu else expr
    for i, product in enumerate(node.inputs):
        if product.op not in _FOLDABLE or uses.get(product.id) != 1 or product.id in output_ids:
            continue
        channels = _channel_shape(product)
        for j, scale in enumerate(node.inputs):
            if j == i or not _per_channel(scale, channels):
                continue
            if inner == symbol(i) * symbol(j) and _independent(product, [scale]):
                return i, j, None, relu
            for k, shift in enumerate(node.inputs):
                if k not in (i, j) and _per_channel(shift, channels) and \
                        inner == symbol(i) * symbol(j) + symbol(k) and _independent(product, [scale, shift]):
                    return i, j, k, relu
    return None


def _channel_shape(product: Tensor) -> tuple[int, ...]:
    """The shape of one value per output channel, broadcast against `product`."""
    if product.op == "conv2d":
        return (1, product.shape[1], 1, 1)
    return (1, product.shape[1])


def _per_channel(t: Tensor, channels: tuple[int, ...]) -> bool:
    padded = (1,) * (len(channels) - t.ndim) + tuple(t.shape)
    return t.dtype == "float32" and len(padded) == len(channels) and padded == channels


def _independent(product: Tensor, factors: list[Tensor]) -> bool:
    """None of `factors` is computed from `product` (training-mode batch norm's scale is)."""
    return all(node is not product for node in product.graph.ancestors(factors))


def _folded(rewrite: Rewrite, i: int, j: int, k: int | None, relu: bool) -> Tensor:
    node, operands = rewrite.node, rewrite.operands
    product, scale = operands[i], operands[j]
    site = node.site
    channels = product.shape[1]
    reshape = lambda t, shape: t if t.shape == shape else rewrite.apply("reshape", [t], shape=shape)  # noqa: E731
    x0, x1 = symbol(0), symbol(1)
    if product.op == "conv2d":
        x, w = product.inputs
        scaled = make_ew(x0 * x1, [w, reshape(scale, (channels, 1, 1, 1))], w.shape, site=site)
        new_product = rewrite.apply("conv2d", [x, scaled], **product.attrs)
    else:
        a, b = product.inputs
        if b.op == "transpose" and b.attrs["axes"] == (1, 0):
            w = b.inputs[0]
            scaled = make_ew(x0 * x1, [w, reshape(scale, (channels, 1))], w.shape, site=site)
            b_new = rewrite.apply("transpose", [scaled], axes=(1, 0))
        else:
            b_new = make_ew(x0 * x1, [b, reshape(scale, (1, channels))], b.shape, site=site)
        new_product = rewrite.apply("matmul", [a, b_new])
    if k is None:
        return rewrite.ew(Relu(x0) if relu else x0, [new_product])
    shift = reshape(operands[k], _channel_shape(product))
    total = x0 + x1
    return rewrite.ew(Relu(total) if relu else total, [new_product, shift])


__all__ = ["fold_channel_scale"]
