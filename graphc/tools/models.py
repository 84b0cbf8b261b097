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


def mlp(batch: int, sizes=(784, 512, 256, 10)) -> Model:
    """A ReLU multilayer perceptron."""
    g = Graph("mlp")
    x = g.input("x", (batch, sizes[0]))
    y = g.input("y", (batch,), dtype="int32")
    h = x
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        h = ops.linear(h, g.param(f"fc{i + 1}.w", (n_out, n_in)), g.param(f"fc{i + 1}.b", (n_out,)))
        if i < len(sizes) - 2:
            h = ops.relu(h)
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
