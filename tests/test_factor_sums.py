"""transforms/factor_sums.py: factors constant along a sum's axes move outside it, so equal sums merge."""
import numpy as np
import pytest

import graphc as gc
from graphc.transforms import cse, dce, factor_sums, fuse_elementwise


def counts(graph, op):
    return sum(node.op == op for node in graph.nodes)


def run(outputs, feeds, params):
    result = gc.optimize(outputs, [dce, fuse_elementwise, factor_sums, cse])
    exact = gc.evaluate(outputs, feeds, params, dtype="float64")
    got = gc.evaluate(result.outputs, feeds, params, dtype="float64")
    for a, b in zip(got, exact):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    return result


@pytest.mark.parametrize("keepdims", [True, False])
def test_per_channel_factors_leave_the_sum_and_equal_sums_merge(keepdims):
    rng = np.random.default_rng(0)
    g = gc.Graph()
    a, b = g.input("a", (4, 3, 5, 5)), g.input("b", (4, 3, 5, 5))
    gamma, inv = g.param("gamma", (1, 3, 1, 1)), g.param("inv", (3, 1, 1))
    axes = (0, 2, 3)
    first = gc.sum(a * b * gamma, axis=axes, keepdims=keepdims)
    second = gc.sum(a * b * inv / 7.0, axis=axes, keepdims=keepdims)
    third = gc.sum(gamma * 2.0 + a * inv, axis=axes, keepdims=keepdims)   # a term constant along the axes
    feeds = {"a": rng.normal(size=(4, 3, 5, 5)), "b": rng.normal(size=(4, 3, 5, 5))}
    params = {"gamma": rng.normal(size=(1, 3, 1, 1)), "inv": rng.normal(size=(3, 1, 1))}
    result = run([first, second, third], feeds, params)
    assert counts(result.graph, "sum") == 2          # sum(a*b), shared; sum(a)
    compiled = gc.compile([first, second, third], {k: v.astype(np.float32) for k, v in params.items()})
    for got, exact in zip(compiled(**{k: v.astype(np.float32) for k, v in feeds.items()}),
                          gc.evaluate([first, second, third], feeds, params, dtype="float64")):
        np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4)


def test_a_total_sum_with_a_scalar_factor():
    g = gc.Graph()
    a, s = g.input("a", (6, 7)), g.param("s", (1,))
    total = gc.sum(gc.tanh(a) * s + 3.0)
    result = run([total], {"a": np.linspace(-1, 1, 42).reshape(6, 7)}, {"s": np.array([0.5])})
    (node,) = [n for n in result.graph.nodes if n.op == "sum"]
    assert node.inputs[0].op == "ew" and "x1" not in str(node.inputs[0].attrs["expr"])   # s is outside


def test_sums_without_a_tensor_factor_are_left_alone():
    g = gc.Graph()
    a = g.input("a", (5, 4))
    plain = gc.sum(a * a * 0.5, axis=1)
    result = gc.optimize([plain], [dce, fuse_elementwise, factor_sums])
    assert [r.changes for r in result.log if r.name == "factor_sums"] == ["no change"]


def test_batch_norm_backward_needs_fewer_sums():
    g = gc.Graph()
    x = g.input("x", (8, 4, 5, 5))
    y = gc.batch_norm(x, g.param("w", (4,), init=1.0), g.param("b", (4,)), g.buffer("rm", (4,)),
                      g.buffer("rv", (4,), init=1.0))
    loss = gc.sum(gc.relu(y) * g.constant(np.linspace(-1, 1, 800).reshape(8, 4, 5, 5)))
    grads = gc.grad(loss, [x, g.params["w"], g.params["b"]])
    without = gc.optimize(grads, [dce, fuse_elementwise, cse])
    with_factoring = gc.optimize(grads, [dce, fuse_elementwise, factor_sums, cse])
    assert counts(with_factoring.graph, "sum") < counts(without.graph, "sum")
