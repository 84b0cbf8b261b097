"""gc.stop_gradient: the identity forward, a constant to gc.grad, gone before native code."""
import numpy as np

import graphc as gc


def graph_with_stopped_path():
    g = gc.Graph("stop")
    x = g.param("x", (3, 4), dtype="float64")
    loss = gc.sum(x * gc.stop_gradient(gc.exp(x)))
    return g, x, loss


def test_forward_is_the_identity():
    g, x, loss = graph_with_stopped_path()
    value = np.linspace(-1, 1, 12).reshape(3, 4)
    assert gc.evaluate(loss, {}, {"x": value}) == np.sum(value * np.exp(value))


def test_no_gradient_flows_through_it():
    g, x, loss = graph_with_stopped_path()
    value = np.linspace(-1, 1, 12).reshape(3, 4)
    (dx,) = gc.evaluate([gc.grad(loss, x)], {}, {"x": value})
    np.testing.assert_array_equal(dx, np.exp(value))        # d/dx of x·c with c = exp(x) held fixed


def test_a_param_reached_only_through_it_gets_a_zero_gradient():
    g = gc.Graph("only")
    w = g.param("w", (2,), dtype="float64")
    loss = gc.sum(gc.stop_gradient(w) * 3.0)
    (dw,) = gc.evaluate([gc.grad(loss, w)], {}, {"w": np.ones(2)})
    np.testing.assert_array_equal(dw, np.zeros(2))


def test_the_optimizer_removes_it_and_native_code_agrees():
    g = gc.Graph("native")
    x = g.input("x", (4, 5))
    w = g.param("w", (4, 5))
    loss = gc.sum(w * gc.stop_gradient(gc.sigmoid(w * x)))
    dw = gc.grad(loss, w)
    assert all(node.op != "stop_gradient" for node in gc.optimize([loss, dw]).graph.nodes)
    params = {"w": np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)}
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)}
    compiled = gc.compile([loss, dw], params)(**feeds)
    for got, expected in zip(compiled, gc.evaluate([loss, dw], feeds, params)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_batch_norm_makes_no_sum_for_the_variances_path_to_the_mean():
    g = gc.Graph("bn")
    x = g.input("x", (4, 3, 5, 5))
    y = gc.batch_norm(x, g.param("w", (3,), init=1.0), g.param("b", (3,)), None, None)
    loss = gc.sum(y * y)
    dx = gc.grad(loss, x)
    optimized = gc.optimize([loss, dx]).graph
    sums = [node for node in optimized.nodes if node.op == "sum"]
    assert len(sums) == 5      # forward: mean, variance, loss; backward: Σdy, Σdy·x̂
