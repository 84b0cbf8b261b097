"""The standard models of the image-recognition path, as graph builders.

Each returns a `Model`: the graph, its input and label tensors, the logits and the loss. Tests,
benchmarks and examples share these so that everyone measures the same networks.
"""
from __future__ import annotations

import dataclasses

from graphc.core import ops
from graphc.core.ir import Graph, Tensor


@dataclasses.dataclass
class Model:
    graph: Graph
    x: Tensor
    y: Tensor
    logits: Tensor
    loss: Tensor


def logistic_regression(batch: int, features: int = 784) -> Model:
    """Binary logistic regression: sigmoid(w·x + b) with the logistic loss; targets in {0, 1}."""
    g = Graph("logistic")
    x = g.input("x", (batch, features))
    y = g.input("y", (batch, 1))
    logits = ops.linear(x, g.param("w", (1, features)), g.param("b", (1,)))
    return Model(g, x, y, logits, ops.sigmoid_binary_cross_entropy(logits, y))


def softmax_regression(batch: int, features: int = 784, classes: int = 10) -> Model:
    """Multinomial logistic regression (a linear softmax classifier): 'logreg 784→10'."""
    g = Graph("softmax_regression")
    x = g.input("x", (batch, features))
    y = g.input("y", (batch,), dtype="int32")
    logits = ops.linear(x, g.param("w", (classes, features)), g.param("b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def mlp(batch: int, sizes=(784, 512, 256, 10), *, p: float = 0.0, training: bool = True,
        name: str = "mlp") -> Model:
    """A ReLU multilayer perceptron; with `p`, dropout after every hidden ReLU (training only)."""
    g = Graph(name)
    x = g.input("x", (batch, sizes[0]))
    y = g.input("y", (batch,), dtype="int32")
    h = x
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        h = ops.linear(h, g.param(f"fc{i + 1}.w", (n_out, n_in)), g.param(f"fc{i + 1}.b", (n_out,)))
        if i < len(sizes) - 2:
            h = ops.dropout(ops.relu(h), p, training)
    return Model(g, x, y, h, ops.softmax_cross_entropy(h, y))


def lenet5(batch: int, image=(1, 28, 28), classes: int = 10) -> Model:
    """LeNet-5 with a same-padded first convolution, ReLU and average pooling."""
    g = Graph("lenet5")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h = ops.conv2d(x, g.param("conv1.w", (6, image[0], 5, 5)), g.param("conv1.b", (6,)), padding="same")
    h = ops.avg_pool2d(ops.relu(h), 2)
    h = ops.conv2d(h, g.param("conv2.w", (16, 6, 5, 5)), g.param("conv2.b", (16,)))
    h = ops.avg_pool2d(ops.relu(h), 2)
    h = ops.flatten(h)
    h = ops.relu(ops.linear(h, g.param("fc1.w", (120, h.shape[1])), g.param("fc1.b", (120,))))
    h = ops.relu(ops.linear(h, g.param("fc2.w", (84, 120)), g.param("fc2.b", (84,))))
    logits = ops.linear(h, g.param("fc3.w", (classes, 84)), g.param("fc3.b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def convnet(batch: int, image=(3, 32, 32), widths=(32, 32, 64, 64), classes: int = 10) -> Model:
    """conv3×3 ×2, max pool, conv3×3 ×2, max pool, global average pool, linear: the '3×32×32 conv net'."""
    g = Graph("convnet")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h, channels = x, image[0]
    for i, width in enumerate(widths):
        h = ops.relu(ops.conv2d(h, g.param(f"conv{i + 1}.w", (width, channels, 3, 3)),
                                g.param(f"conv{i + 1}.b", (width,)), padding="same"))
        channels = width
        if i % 2 == 1:
            h = ops.max_pool2d(h, 2)
    h = ops.global_avg_pool2d(h)
    logits = ops.linear(h, g.param("fc.w", (classes, channels)), g.param("fc.b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def small_convnet(batch: int, image=(3, 12, 12), classes: int = 5) -> Model:
    """A small conv net with max pooling, a stride-2 convolution and global average pooling."""
    g = Graph("small_convnet")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h = ops.relu(ops.conv2d(x, g.param("conv1.w", (4, image[0], 3, 3)), g.param("conv1.b", (4,)), padding=1))
    h = ops.max_pool2d(h, 2)
    h = ops.relu(ops.conv2d(h, g.param("conv2.w", (6, 4, 3, 3)), g.param("conv2.b", (6,)), stride=2, padding=1))
    h = ops.global_avg_pool2d(h)
    logits = ops.linear(h, g.param("fc.w", (classes, 6)), g.param("fc.b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def random_batch(model: Model, rng, classes: int | None = None):
    """Random feeds for a model: standard-normal images, uniform labels (or 0/1 targets)."""
    import numpy as np
    x = rng.standard_normal(model.x.shape, dtype=np.float32)
    if model.y.dtype == "int32":
        classes = classes or model.logits.shape[1]
        y = rng.integers(0, classes, model.y.shape, dtype=np.int32)
    else:
        y = rng.integers(0, 2, model.y.shape).astype(np.float32)
    return {model.x.name: x, model.y.name: y}


# ---- modern models: batch norm, dropout, residual blocks ------------------------------------
#
# Each takes `training`: True builds the training graph (batch norm on the batch's statistics,
# updating its running statistics; dropout on), False the eval graph (batch norm on the running
# statistics; dropout off). Both declare the same params and buffers, so one params dict binds
# both: train on one, predict with the other.

def resnet(batch: int, depth: int, image=(3, 32, 32), classes: int = 10, widths=(16, 32, 64),
           training: bool = True) -> Model:
    """A CIFAR ResNet of He et al. 2016 (section 4.2): 6n+2 layers, e.g. depth 20 for n = 3.

    A 3×3 conv → BN → ReLU stem, then one stage of n basic blocks per width (conv3×3-BN-ReLU-
    conv3×3-BN, plus the shortcut, then ReLU); every stage after the first halves the grid with
    a stride-2 first conv and projects its shortcut with a 1×1 stride-2 conv + BN (option B);
    global average pooling, then a linear classifier. Param and buffer names are torch's
    (`conv1.weight`, `layer1.0.bn1.running_mean`, `layer2.0.downsample.0.weight`, `fc.bias`).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet: depth must be 6n+2 for n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
    widths = tuple(widths)
    if not widths:
        raise ValueError("resnet: widths must name at least one stage")
    blocks = (depth - 2) // 6
    g = Graph(f"resnet{depth}")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h = _conv_bn(g, x, "conv1", "bn1", widths[0], 3, 1, training)
    h, channels = ops.relu(h), widths[0]
    for stage, width in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _basic_block(g, h, f"layer{stage + 1}.{block}", channels, width, stride, training)
            channels = width
    h = ops.global_avg_pool2d(h)
    logits = ops.linear(h, g.param("fc.weight", (classes, channels)), g.param("fc.bias", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def resnet8(batch: int, training: bool = True, **kwargs) -> Model:
    """ResNet-8: one basic block per stage (see `resnet`)."""
    return resnet(batch, 8, training=training, **kwargs)


def resnet20(batch: int, training: bool = True, **kwargs) -> Model:
    """ResNet-20: three basic blocks per stage (see `resnet`)."""
    return resnet(batch, 20, training=training, **kwargs)


def _basic_block(g: Graph, x: Tensor, prefix: str, channels: int, width: int, stride: int, training: bool) -> Tensor:
    h = ops.relu(_conv_bn(g, x, f"{prefix}.conv1", f"{prefix}.bn1", width, 3, stride, training))
    h = _conv_bn(g, h, f"{prefix}.conv2", f"{prefix}.bn2", width, 3, 1, training)
    shortcut = x
    if stride != 1 or channels != width:
        shortcut = _conv_bn(g, x, f"{prefix}.downsample.0", f"{prefix}.downsample.1", width, 1, stride, training)
    return ops.relu(h + shortcut)


def _conv_bn(g: Graph, x: Tensor, conv: str, bn: str, width: int, kernel: int, stride: int, training: bool) -> Tensor:
    """A bias-free conv (padding keeping the grid at stride 1) followed by batch norm."""
    w = g.param(f"{conv}.weight", (width, x.shape[1], kernel, kernel))
    return _batch_norm(g, ops.conv2d(x, w, stride=stride, padding=kernel // 2), bn, training)


def _batch_norm(g: Graph, x: Tensor, name: str, training: bool) -> Tensor:
    """torch.nn.BatchNorm's params (weight 1, bias 0) and buffers (running mean 0, variance 1)."""
    channels = (x.shape[1],)
    return ops.batch_norm(x, g.param(f"{name}.weight", channels, init=1.0), g.param(f"{name}.bias", channels, init=0.0),
                      g.buffer(f"{name}.running_mean", channels, init=0.0),
                      g.buffer(f"{name}.running_var", channels, init=1.0), training=training)


def mlp_dropout(batch: int, sizes=(784, 512, 256, 10), p: float = 0.5, training: bool = True) -> Model:
    """`mlp` with dropout after every hidden ReLU; the same param names, so `mlp`'s params fit."""
    return mlp(batch, sizes, p=p, training=training, name="mlp_dropout")


def digits_cnn(batch: int, training: bool = True, image=(1, 8, 8), widths=(16, 32), p: float = 0.25,
               classes: int = 10) -> Model:
    """A small modern CNN for the 8×8 digits: (conv3×3 → BN → ReLU) per width, 2×2 max pooling,
    dropout, linear on the flattened 4×4 grid. Torch's names (`conv1.weight`, `bn1.running_var`,
    `fc.weight`); the convs have no bias, as batch norm's shift replaces it."""
    g = Graph("digits_cnn_bn")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h = x
    for i, width in enumerate(widths):
        h = ops.relu(_conv_bn(g, h, f"conv{i + 1}", f"bn{i + 1}", width, 3, 1, training))
    h = ops.dropout(ops.flatten(ops.max_pool2d(h, 2)), p, training)
    logits = ops.linear(h, g.param("fc.weight", (classes, h.shape[1])), g.param("fc.bias", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))
