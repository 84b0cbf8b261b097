"""Every op of graphc. Importing this package registers all primitives."""
from graphc.core.ops import sources  # noqa: F401  (registers input/param/constant/fill)
from graphc.core.ops import collective  # noqa: F401  (registers the all-reduce ops of data-parallel steps)
from graphc.core.ops.conv import conv2d
from graphc.core.ops.elementwise import (add, div, exp, leaky_relu, log, mul, neg, power, relu, sigmoid, softplus, sqrt,
                                         sub, tanh)
from graphc.core.ops.linalg import linear, matmul
from graphc.core.ops.loss import mse, sigmoid_binary_cross_entropy, softmax, softmax_cross_entropy
from graphc.core.ops.norm import batch_norm
from graphc.core.ops.pool import avg_pool2d, global_avg_pool2d, max_pool2d
from graphc.core.ops.random import dropout
from graphc.core.ops.reduce import mean, sum
from graphc.core.ops.registry import OPS
from graphc.core.ops.shape import broadcast_to, concat, flatten, pad, reshape, slice_, stop_gradient, transpose

__all__ = ["conv2d", "add", "div", "exp", "leaky_relu", "log", "mul", "neg", "power", "relu", "sigmoid", "softplus",
           "sqrt", "sub", "tanh", "linear", "matmul", "mse", "sigmoid_binary_cross_entropy", "softmax",
           "softmax_cross_entropy", "avg_pool2d", "global_avg_pool2d", "max_pool2d", "mean", "sum",
           "broadcast_to", "concat", "flatten", "pad", "reshape", "slice_", "stop_gradient", "transpose", "batch_norm",
           "dropout",
           "OPS"]
