"""Every op of graphc. Importing this package registers all primitives."""
from . import sources  # noqa: F401  (registers input/param/constant/fill)
from .conv import conv2d
from .elementwise import add, div, exp, log, mul, neg, power, relu, sigmoid, softplus, sqrt, sub, tanh
from .linalg import linear, matmul
from .loss import mse, sigmoid_binary_cross_entropy, softmax, softmax_cross_entropy
from .pool import avg_pool2d, global_avg_pool2d, max_pool2d
from .reduce import mean, sum
from .registry import OPS
from .shape import broadcast_to, flatten, reshape, transpose

__all__ = ["conv2d", "add", "div", "exp", "log", "mul", "neg", "power", "relu", "sigmoid", "softplus", "sqrt",
           "sub", "tanh", "linear", "matmul", "mse", "sigmoid_binary_cross_entropy", "softmax",
           "softmax_cross_entropy", "avg_pool2d", "global_avg_pool2d", "max_pool2d", "mean", "sum",
           "broadcast_to", "flatten", "reshape", "transpose", "OPS"]
