"""Every op of the contract, compiled alone, against the exact (float64) reference: its value and
the gradients of a scalar function of it w.r.t. each float operand, each within its honest
float32 error bound (tests/error_bounds.py)."""
import zlib

import numpy as np
import pytest
from error_bounds import assert_compiled_matches_exact

import graphc as gc


def unary(op, shape=(3, 17)):
    return lambda g: op(g.param("a", shape))


OPS = {
    "linear": lambda g: gc.linear(g.param("x", (5, 7)), g.param("w", (4, 7)), g.param("b", (4,))),
    "matmul": lambda g: g.param("a", (5, 9)) @ g.param("b", (9, 3)),
    "matmul_transposed": lambda g: gc.transpose(g.param("a", (9, 5))) @ gc.transpose(g.param("b", (3, 9))),
    "conv2d_same": lambda g: gc.conv2d(g.param("x", (2, 3, 7, 6)), g.param("w", (4, 3, 3, 3)), g.param("b", (4,)),
                                       padding="same"),
    "conv2d_stride2_pair": lambda g: gc.conv2d(g.param("x", (2, 2, 9, 8)), g.param("w", (3, 2, 3, 2)),
                                               stride=2, padding=(1, 0)),
    "conv2d_full": lambda g: gc.conv2d(g.param("x", (1, 2, 5, 5)), g.param("w", (2, 2, 3, 3)), padding="full"),
    "conv2d_even_same": lambda g: gc.conv2d(g.param("x", (2, 1, 6, 6)), g.param("w", (2, 1, 4, 4)), padding="same"),
    "avg_pool2d": lambda g: gc.avg_pool2d(g.param("x", (2, 3, 7, 7)), 3, stride=2, padding=1),
    # Windows tiling the image (the gradient's vector path): whole vectors, a ragged edge,
    # a row narrower than a vector, kernels of 1, 2 and 4 columns.
    "avg_pool2d_tiled": lambda g: gc.avg_pool2d(g.param("x", (2, 3, 28, 28)), 2),
    "avg_pool2d_tiled_ragged": lambda g: gc.avg_pool2d(g.param("x", (1, 2, 11, 13)), 2),
    "avg_pool2d_tiled_narrow": lambda g: gc.avg_pool2d(g.param("x", (3, 1, 6, 5)), (3, 1)),
    "avg_pool2d_tiled_wide": lambda g: gc.avg_pool2d(g.param("x", (1, 2, 8, 36)), (2, 4)),
    "max_pool2d": lambda g: gc.max_pool2d(g.param("x", (2, 3, 8, 7)), 2, padding=1),
    "global_avg_pool2d": lambda g: gc.global_avg_pool2d(g.param("x", (3, 4, 5, 6))),
    "relu": unary(gc.relu),
    "sigmoid": unary(gc.sigmoid),
    "tanh": unary(gc.tanh),
    "exp": unary(lambda a: gc.exp(a * 0.5)),
    "log": unary(lambda a: gc.log(a * a + 1.0)),
    "sum_axis": unary(lambda a: gc.sum(a, axis=0)),
    "sum_keepdims": lambda g: gc.sum(g.param("a", (2, 3, 4, 5)), axis=(0, 2, 3), keepdims=True),
    "mean": unary(lambda a: gc.mean(a, axis=1)),
    "reshape": unary(lambda a: gc.reshape(a, (17, -1)) * 2.0),
    "flatten": lambda g: gc.flatten(g.param("a", (2, 3, 4))) * 3.0,
    "transpose": lambda g: gc.transpose(g.param("a", (2, 3, 4)), (2, 0, 1)) * 1.5,
    "softmax": unary(lambda a: gc.softmax(a, axis=0)),
    "broadcast_ops": lambda g: (g.param("a", (3, 1, 5)) - g.param("b", (4, 1))) / (g.param("c", (5,)) ** 2 + 1.0),
    "scalar_ops": unary(lambda a: 2.0 - a * 3.0 + 1.0 / (a * a + 1.0) - (-a)),
    "softmax_cross_entropy": lambda g: gc.softmax_cross_entropy(g.param("z", (6, 4)) * 10.0,
                                                                g.input("labels", (6,), dtype="int32")),
    "sigmoid_binary_cross_entropy": lambda g: gc.sigmoid_binary_cross_entropy(g.param("z", (6, 2)) * 50.0,
                                                                              g.input("t", (6, 2))),
    "mse": lambda g: gc.mse(g.param("p", (4, 3)), g.input("t", (4, 3))),
}


@pytest.mark.parametrize("name", list(OPS))
def test_op_compiled_matches_reference(name):
    g = gc.Graph(name)
    out = OPS[name](g)
    rng = np.random.default_rng(zlib.crc32(name.encode()))   # hash() is salted per process
    params = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in g.params.items()}
    feeds = {}
    for n, t in g.inputs.items():
        feeds[n] = (rng.integers(0, 4, t.shape).astype(np.int32) if t.dtype == "int32"
                    else rng.uniform(0, 1, t.shape).astype(np.float32))
    weights = g.constant(rng.standard_normal(out.shape).astype(np.float32))
    objective = gc.sum(out * weights)
    outputs = [out] + gc.grad(objective, list(g.params.values()))
    actual = gc.compile(outputs, params)(**feeds)
    labels = [f"{name} {label}" for label in ["value", *g.params]]
    assert_compiled_matches_exact(outputs, feeds, params, actual, labels)
