"""Whole networks: `gc.grad_check` (autodiff vs central differences in float64) passes on every
param, and the forward loss matches a forward pass written here in plain numpy."""
import numpy as np
import pytest
from core_oracles import conv2d_loop, max_pool_loop, sigmoid_bce_textbook, softmax_cross_entropy_plain

import graphc as gc


def assert_grad_check(loss, params, feeds, graph):
    report = gc.grad_check(loss, params, feeds)
    assert set(report.errors) == set(graph.params)
    assert report.passed(1e-6), str(report)
    assert report.max_error < 1e-6
    return report


def test_logistic_regression():
    rng = np.random.default_rng(50)
    g = gc.Graph("logreg")
    x, t = g.input("x", (4, 5)), g.input("t", (4, 1))
    w, b = g.param("w", (1, 5)), g.param("b", (1,))
    loss = gc.sigmoid_binary_cross_entropy(gc.linear(x, w, b), t)
    feeds = {"x": rng.standard_normal((4, 5)).astype(np.float32), "t": np.array([[1], [0], [0], [1]], np.float32)}
    params = {"w": rng.standard_normal((1, 5)).astype(np.float32), "b": np.array([0.3], np.float32)}
    z = feeds["x"].astype(np.float64) @ params["w"].astype(np.float64).T + params["b"]
    assert abs(gc.evaluate(loss, feeds, params, dtype="float64") - sigmoid_bce_textbook(z, feeds["t"])) < 1e-13
    assert_grad_check(loss, params, feeds, g)


def test_logistic_regression_with_handwritten_loss_agrees():
    """A user writing the textbook loss from gc.sigmoid and gc.log gets the same value and gradient."""
    rng = np.random.default_rng(51)
    g = gc.Graph()
    x, t = g.input("x", (6, 3)), g.input("t", (6, 1))
    w, b = g.param("w", (1, 3)), g.param("b", (1,))
    p = gc.sigmoid(gc.linear(x, w, b))
    textbook = -gc.mean(t * gc.log(p) + (1 - t) * gc.log(1 - p))
    builtin = gc.sigmoid_binary_cross_entropy(gc.linear(x, w, b), t)
    feeds = {"x": rng.standard_normal((6, 3)), "t": rng.integers(0, 2, (6, 1)).astype(np.float64)}
    params = {"w": rng.standard_normal((1, 3)), "b": np.array([-0.2])}
    values = gc.evaluate([textbook, builtin] + gc.grad(textbook, [w, b]) + gc.grad(builtin, [w, b]),
                         feeds, params, dtype="float64")
    np.testing.assert_allclose(values[0], values[1], rtol=1e-13)
    np.testing.assert_allclose(values[2], values[4], rtol=1e-12)
    np.testing.assert_allclose(values[3], values[5], rtol=1e-12)
    assert_grad_check(textbook, params, feeds, g)


def test_mlp_784_512_256_10():
    rng = np.random.default_rng(52)
    g = gc.Graph("mlp")
    x, y = g.input("x", (3, 784)), g.input("y", (3,), dtype="int32")
    sizes = [784, 512, 256, 10]
    h = x
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        h = gc.linear(h, g.param(f"fc{i}.w", (fan_out, fan_in)), g.param(f"fc{i}.b", (fan_out,)))
        if i < 2:
            h = gc.relu(h)
    loss = gc.softmax_cross_entropy(h, y)
    params = gc.init_params(g, seed=1)
    params = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    feeds = {"x": rng.random((3, 784), dtype=np.float32), "y": np.array([7, 0, 3], np.int32)}

    a = feeds["x"].astype(np.float64)
    for i in range(3):
        a = a @ params[f"fc{i}.w"].astype(np.float64).T + params[f"fc{i}.b"]
        if i < 2:
            a = np.maximum(a, 0)
    expected = softmax_cross_entropy_plain(a, feeds["y"])
    assert abs(gc.evaluate(loss, feeds, params, dtype="float64") - expected) < 1e-12 * abs(expected)
    assert abs(gc.evaluate(loss, feeds, params) - expected) < 1e-5 * abs(expected)
    assert_grad_check(loss, params, feeds, g)


def lenet5(batch):
    g = gc.Graph("lenet")
    x, y = g.input("x", (batch, 1, 28, 28)), g.input("y", (batch,), dtype="int32")
    h = gc.avg_pool2d(gc.relu(gc.conv2d(x, g.param("conv1.w", (6, 1, 5, 5)), g.param("conv1.b", (6,)),
                                        padding="same")), 2)
    h = gc.avg_pool2d(gc.relu(gc.conv2d(h, g.param("conv2.w", (16, 6, 5, 5)), g.param("conv2.b", (16,)))), 2)
    assert h.shape == (batch, 16, 5, 5)
    h = gc.relu(gc.linear(gc.flatten(h), g.param("fc1.w", (120, 400)), g.param("fc1.b", (120,))))
    h = gc.relu(gc.linear(h, g.param("fc2.w", (84, 120)), g.param("fc2.b", (84,))))
    logits = gc.linear(h, g.param("fc3.w", (10, 84)), g.param("fc3.b", (10,)))
    return g, gc.softmax_cross_entropy(logits, y)


def test_lenet5_same_padding_average_pooling():
    g, loss = lenet5(2)
    rng = np.random.default_rng(53)
    params = gc.init_params(g, seed=2)
    params = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    feeds = {"x": rng.standard_normal((2, 1, 28, 28)).astype(np.float32), "y": np.array([4, 9], np.int32)}
    assert_grad_check(loss, params, feeds, g)
    # the float32 run of the same gradient graph agrees with the float64 one to float32 rounding
    grads = gc.grad(loss, list(g.params.values()))
    for g32, g64 in zip(gc.evaluate(grads, feeds, params), gc.evaluate(grads, feeds, params, dtype="float64")):
        assert g32.dtype == np.float32
        assert np.max(np.abs(g32 - g64)) <= 1e-4 * np.max(np.abs(g64))


def small_conv_net_numpy(x, p, labels):
    h = np.maximum(conv2d_loop(x, p["c1.w"], p["c1.b"], 1, ((1, 1), (1, 1))), 0)
    h = max_pool_loop(h, 2)
    h = np.maximum(conv2d_loop(h, p["c2.w"], p["c2.b"], 2, ((1, 1), (1, 1))), 0)
    h = h.mean(axis=(2, 3))
    return softmax_cross_entropy_plain(h @ p["fc.w"].T + p["fc.b"], labels)


@pytest.mark.parametrize("batch", [2, 3])
def test_small_conv_net_max_pool_stride2_global_avg_pool(batch):
    g = gc.Graph("convnet")
    x, y = g.input("x", (batch, 3, 10, 10)), g.input("y", (batch,), dtype="int32")
    h = gc.relu(gc.conv2d(x, g.param("c1.w", (4, 3, 3, 3)), g.param("c1.b", (4,)), padding="same"))
    h = gc.max_pool2d(h, 2)
    h = gc.relu(gc.conv2d(h, g.param("c2.w", (8, 4, 3, 3)), g.param("c2.b", (8,)), stride=2, padding=1))
    assert h.shape == (batch, 8, 3, 3)
    logits = gc.linear(gc.global_avg_pool2d(h), g.param("fc.w", (5, 8)), g.param("fc.b", (5,)))
    loss = gc.softmax_cross_entropy(logits, y)
    rng = np.random.default_rng(54 + batch)
    params = {name: (rng.standard_normal(t.shape) * (0.5 if t.ndim > 1 else 0.1)).astype(np.float32)
              for name, t in g.params.items()}
    feeds = {"x": rng.standard_normal((batch, 3, 10, 10)).astype(np.float32),
             "y": rng.integers(0, 5, batch).astype(np.int32)}
    expected = small_conv_net_numpy(feeds["x"].astype(np.float64), {k: v.astype(np.float64) for k, v in params.items()},
                                    feeds["y"])
    assert abs(gc.evaluate(loss, feeds, params, dtype="float64") - expected) < 1e-12 * abs(expected)
    assert_grad_check(loss, params, feeds, g)


def test_grad_check_catches_a_wrong_derivative(monkeypatch):
    """The check is not vacuous: a matmul VJP off by 1% is reported."""
    from graphc.core.ops.registry import OPS
    matmul_def = OPS["matmul"]
    original = type(matmul_def).vjp

    def skewed(self, node, g, wanted):
        return [None if d is None else d * 1.01 for d in original(self, node, g, wanted)]

    monkeypatch.setattr(type(matmul_def), "vjp", skewed)
    g = gc.Graph()
    x, w = g.input("x", (3, 4)), g.param("w", (2, 4))
    loss = gc.mean(gc.tanh(gc.linear(x, w)))
    rng = np.random.default_rng(55)
    report = gc.grad_check(loss, {"w": rng.standard_normal((2, 4))}, {"x": rng.standard_normal((3, 4))})
    assert not report.passed(1e-6)
    assert 5e-3 < report.errors["w"] < 2e-2
