"""graphc: a compiler for neural-network training.

Declare a static graph, derive its gradient graph with `grad`, run it on the numpy reference
executor (`evaluate`) or compile it to native code.
"""
__version__ = "0.1.0"

from .autodiff import grad
from .checkpoint import load_params, save_params
from .errors import ShapeError
from .gradcheck import GradCheckReport, grad_check
from .init import init_params
from .ir import Graph, Tensor
from .ops import (add, avg_pool2d, broadcast_to, conv2d, div, exp, flatten, global_avg_pool2d, linear, log,
                  matmul, max_pool2d, mean, mse, mul, neg, power, relu, reshape, sigmoid,
                  sigmoid_binary_cross_entropy, softmax, softmax_cross_entropy, softplus, sqrt, sub, sum, tanh,
                  transpose)
from .reference import evaluate
from .optim import SGD
from .passes import optimize
from .compiler import CompiledFunction, CompiledTrainingStep, compile, compile_training_step
from .interpreter_settings import fast_compile
from graphc_runtime import get_num_threads, set_num_threads


__all__ = [
    "Graph", "Tensor", "ShapeError", "grad", "evaluate", "init_params", "grad_check", "GradCheckReport",
    "compile", "compile_training_step", "optimize", "CompiledFunction", "CompiledTrainingStep", "SGD",
    "get_num_threads", "set_num_threads", "save_params", "load_params", "fast_compile",
    "add", "avg_pool2d", "broadcast_to", "conv2d", "div", "exp", "flatten", "global_avg_pool2d", "linear", "log",
    "matmul", "max_pool2d", "mean", "mse", "mul", "neg", "power", "relu", "reshape", "sigmoid",
    "sigmoid_binary_cross_entropy", "softmax", "softmax_cross_entropy", "softplus", "sqrt", "sub", "sum", "tanh",
    "transpose",
]
