"""graphc: a compiler for neural-network training.

Declare a static graph, derive its gradient graph with `grad`, run it on the numpy reference
executor (`evaluate`) or compile it to native code.
"""
__version__ = "0.1.0"

from graphc.backend.compiler import CompiledFunction, CompiledTrainingStep, compile, compile_training_step
from graphc.backend.interpreter_settings import fast_compile
from graphc.core.autodiff import grad
from graphc.core.errors import ShapeError
from graphc.core.gradcheck import GradCheckReport, grad_check
from graphc.core.init import init_params
from graphc.core.ir import Graph, Tensor
from graphc.core.ops import (add, avg_pool2d, batch_norm, broadcast_to, concat, conv2d, div, dropout, exp, flatten,
                             global_avg_pool2d, leaky_relu, linear, log, matmul, max_pool2d, mean, mse, mul, neg, pad,
                             power, relu, reshape, sigmoid, sigmoid_binary_cross_entropy, softmax,
                             softmax_cross_entropy, softplus, sqrt, stop_gradient, sub, sum, tanh, transpose)
from graphc.core.optim import SGD, Adam, AdamW, Optimizer
from graphc.core.reference import evaluate
from graphc.inspection import report
from graphc.interchange import export_onnx, import_onnx
from graphc.tools.checkpoint import load_params, save_params
from graphc.tools.schedules import cosine_lr, step_lr, warmup_lr
from graphc.transforms import optimize
from graphc_runtime import get_num_threads, set_num_threads

__all__ = [
    "Graph", "Tensor", "ShapeError", "grad", "evaluate", "init_params", "grad_check", "GradCheckReport",
    "compile", "compile_training_step", "optimize", "CompiledFunction", "CompiledTrainingStep", "SGD",
    "Adam", "AdamW", "Optimizer", "cosine_lr", "step_lr", "warmup_lr", "batch_norm", "dropout",
    "get_num_threads", "set_num_threads", "save_params", "load_params", "fast_compile", "report",
    "import_onnx", "export_onnx",
    "add", "avg_pool2d", "broadcast_to", "concat", "conv2d", "div", "exp", "flatten", "global_avg_pool2d",
    "leaky_relu", "linear", "log", "matmul", "max_pool2d", "mean", "mse", "mul", "neg", "pad", "power", "relu",
    "reshape", "sigmoid", "sigmoid_binary_cross_entropy", "softmax", "softmax_cross_entropy", "softplus", "sqrt",
    "stop_gradient", "sub", "sum", "tanh", "transpose",
]
