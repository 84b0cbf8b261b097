"""Every op's gradient against float64 central finite differences (relative error < 1e-6).

`assert_gradients_match` reduces the op's output to a scalar with fixed random weights (so the
incoming gradient is not all ones), differentiates with `gc.grad`, evaluates in float64 and
compares every entry of every operand's gradient with central differences of `gc.evaluate`.
"""
import numpy as np
import pytest
from core_oracles import assert_gradients_match, away_from_zero, distinct_values, evaluate64, max_pool_grad_loop

import graphc as gc

# ---- conv2d ----------------------------------------------------------------------------------

CONV_GRAD_CASES = [
    pytest.param(kernel, padding, stride, id=f"k{kernel}-pad{padding}-s{stride}")
    for kernel in [(3, 3), (2, 4)]
    for padding in [0, 1, (1, 2), "valid", "same", "full"]
    for stride in [1, 2, (2, 1)]
    if not (padding == "same" and stride != 1)
] + [
    # stride larger than the kernel: input cells no window reads get a zero gradient
    pytest.param((1, 1), 0, 2, id="k1x1-s2"), pytest.param((1, 2), 1, (3, 2), id="k1x2-pad1-s3x2"),
    pytest.param((2, 2), "full", 3, id="k2x2-full-s3"),
]


@pytest.mark.parametrize("kernel,padding,stride", CONV_GRAD_CASES)
def test_conv2d_gradients(kernel, padding, stride):
    rng = np.random.default_rng(20)
    values = {"x": rng.standard_normal((2, 2, 5, 6)), "w": rng.standard_normal((2, 2) + kernel),
              "b": rng.standard_normal(2)}
    assert_gradients_match(lambda x, w, b: gc.conv2d(x, w, b, stride=stride, padding=padding), values)


def test_conv2d_gradient_nodes_are_convolutions():
    """The backward of conv shows in the graph as its two convolutions, not as opaque code."""
    g = gc.Graph()
    x, w = g.param("x", (1, 2, 5, 5)), g.param("w", (3, 2, 3, 3))
    dx, dw = gc.grad(gc.sum(gc.conv2d(x, w, padding=1)), [x, w])
    assert dx.op == "conv2d_input_grad" and dx.shape == x.shape
    assert dw.op == "conv2d_weight_grad" and dw.shape == w.shape


# ---- pooling -----------------------------------------------------------------------------------

POOL_GRAD_CASES = [(2, None, 0), (3, 2, 1), (2, 1, 1), ((2, 3), (1, 2), (1, 1)), (3, 1, (1, 0)), (3, 2, 0),
                   (2, 3, 1), ((1, 2), (2, 3), (0, 1))]  # the last two skip cells: stride > kernel


@pytest.mark.parametrize("kernel,stride,padding", POOL_GRAD_CASES, ids=str)
def test_avg_pool2d_gradient(kernel, stride, padding):
    x = np.random.default_rng(21).standard_normal((2, 2, 5, 6))
    assert_gradients_match(lambda x: gc.avg_pool2d(x, kernel, stride, padding), {"x": x})


@pytest.mark.parametrize("kernel,stride,padding", POOL_GRAD_CASES, ids=str)
def test_max_pool2d_gradient(kernel, stride, padding):
    x = distinct_values(np.random.default_rng(22), (2, 2, 5, 6))
    assert_gradients_match(lambda x: gc.max_pool2d(x, kernel, stride, padding), {"x": x})


@pytest.mark.parametrize("kernel,stride,padding", POOL_GRAD_CASES, ids=str)
def test_max_pool2d_gradient_matches_loop_with_ties(kernel, stride, padding):
    """Values drawn from {0, 1, 2}: ties everywhere. Each window's gradient goes to its first maximum."""
    rng = np.random.default_rng(23)
    x = rng.integers(0, 3, (2, 2, 5, 6)).astype(np.float64)
    g = gc.Graph()
    xt = g.param("x", x.shape)
    y = gc.max_pool2d(xt, kernel, stride, padding)
    upstream = rng.uniform(0.5, 1.5, y.shape)
    dx = gc.grad(gc.sum(y * g.input("u", y.shape)), xt)
    got = evaluate64(dx, {"u": upstream}, {"x": x})
    np.testing.assert_allclose(got, max_pool_grad_loop(x, upstream, kernel, stride, padding), rtol=1e-15)


def test_max_pool2d_tie_goes_to_first_element_in_scan_order():
    x = np.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 1, 2, 2)
    g = gc.Graph()
    xt = g.param("x", x.shape)
    dx = evaluate64(gc.grad(gc.sum(gc.max_pool2d(xt, 2)), xt), {}, {"x": x})
    np.testing.assert_array_equal(dx[0, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_max_pool2d_gradient_never_reaches_padding():
    x = -5.0 - distinct_values(np.random.default_rng(24), (1, 1, 4, 4), 0.1)
    g = gc.Graph()
    xt = g.param("x", x.shape)
    y = gc.max_pool2d(xt, 3, stride=1, padding=1)  # 16 windows, every one partly padding
    dx = evaluate64(gc.grad(gc.sum(y), xt), {}, {"x": x})
    assert dx.sum() == 16.0
    np.testing.assert_array_equal(dx, max_pool_grad_loop(x, np.ones((1, 1, 4, 4)), 3, 1, 1))


def test_global_avg_pool2d_gradient():
    x = np.random.default_rng(25).standard_normal((2, 3, 4, 5))
    assert_gradients_match(gc.global_avg_pool2d, {"x": x})


# ---- elementwise, broadcasting, scalars ------------------------------------------------------

UNARY = {
    "relu": gc.relu, "sigmoid": gc.sigmoid, "tanh": gc.tanh, "exp": gc.exp, "log": gc.log, "sqrt": gc.sqrt,
    "softplus": gc.softplus, "neg": lambda t: -t, "cube": lambda t: t ** 3,
    "pow-1.5": lambda t: gc.power(t, -1.5),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_gradients(name):
    x = away_from_zero(np.random.default_rng(26).uniform(-2, 2, (3, 4)))
    if name in ("log", "sqrt", "pow-1.5"):
        x = np.abs(x)
    assert_gradients_match(UNARY[name], {"x": x})


BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), (3, 1)), ((2, 1, 4), (3, 1)), ((3, 4), ()),
                    ((1,), (2, 3)), ((2, 3, 1), (1, 1, 5))]
BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b}


@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize("sa,sb", BROADCAST_SHAPES, ids=str)
def test_broadcast_binary_gradients_sum_back_to_operand_shapes(op, sa, sb):
    rng = np.random.default_rng(27)
    values = {"a": rng.uniform(0.5, 2, sa), "b": rng.uniform(0.5, 2, sb)}
    assert_gradients_match(BINARY[op], values)  # also asserts each gradient has its operand's shape


def test_broadcast_gradient_by_hand():
    a, b = np.random.default_rng(28).standard_normal((3, 4)), np.arange(1.0, 5.0)
    g = gc.Graph()
    at, bt = g.param("a", (3, 4)), g.param("b", (4,))
    da, db = evaluate64(gc.grad(gc.sum(at * bt), [at, bt]), {}, {"a": a, "b": b})
    np.testing.assert_allclose(da, np.broadcast_to(b, (3, 4)), rtol=0)
    np.testing.assert_allclose(db, a.sum(axis=0), rtol=1e-15)


SCALAR_FORMS = {
    "x + 2": lambda t: t + 2, "2 + x": lambda t: 2 + t, "x - 2": lambda t: t - 2, "2 - x": lambda t: 2 - t,
    "3 * x": lambda t: 3 * t, "x * 0.3": lambda t: t * 0.3, "x / 4": lambda t: t / 4, "4 / x": lambda t: 4 / t,
    "-x": lambda t: -t, "x ** 2": lambda t: t ** 2, "x ** 0.5": lambda t: t ** 0.5,
}


@pytest.mark.parametrize("form", sorted(SCALAR_FORMS))
def test_scalar_operand_gradients(form):
    x = np.random.default_rng(29).uniform(0.5, 2, (2, 3))
    assert_gradients_match(SCALAR_FORMS[form], {"x": x})


def test_same_tensor_twice_in_one_op():
    x = np.random.default_rng(30).uniform(0.5, 2, (2, 3))
    assert_gradients_match(lambda x: x * x + x / (x + 1), {"x": x})


# ---- reductions and shape ops ----------------------------------------------------------------


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (1,)], ids=str)
@pytest.mark.parametrize("which", ["sum", "mean"])
def test_reduction_gradients(which, axis, keepdims):
    x = np.random.default_rng(31).standard_normal((2, 3, 4))
    assert_gradients_match(lambda x: getattr(gc, which)(x, axis=axis, keepdims=keepdims), {"x": x})


@pytest.mark.parametrize("build", [
    lambda x: gc.reshape(x, (4, -1)), lambda x: gc.flatten(x), lambda x: gc.transpose(x),
    lambda x: gc.transpose(x, (1, 2, 0)), lambda x: gc.broadcast_to(gc.reshape(x, (1, 2, 3, 4)), (2, 2, 3, 4)),
    lambda x: x.T,
], ids=["reshape", "flatten", "transpose", "transpose-axes", "broadcast_to", "T"])
def test_shape_op_gradients(build):
    x = np.random.default_rng(32).standard_normal((2, 3, 4))
    assert_gradients_match(build, {"x": x})


# ---- matrix products -----------------------------------------------------------------------------


def test_matmul_gradients():
    rng = np.random.default_rng(33)
    assert_gradients_match(lambda a, b: a @ b, {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((4, 5))})


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias):
    rng = np.random.default_rng(34)
    values = {"x": rng.standard_normal((4, 5)), "w": rng.standard_normal((3, 5))}
    if bias:
        values["b"] = rng.standard_normal(3)
        assert_gradients_match(lambda x, w, b: gc.linear(x, w, b), values)
    else:
        assert_gradients_match(lambda x, w: gc.linear(x, w), values)


# ---- softmax and losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax_gradient(axis):
    x = np.random.default_rng(35).standard_normal((3, 4, 2)) * 2
    assert_gradients_match(lambda x: gc.softmax(x, axis=axis), {"x": x})


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(36)
    z, y = rng.standard_normal((4, 5)) * 2, np.array([0, 4, 2, 2], np.int32)
    assert_gradients_match(gc.softmax_cross_entropy, {"logits": z}, {"labels": y})


def test_softmax_cross_entropy_gradient_closed_form():
    rng = np.random.default_rng(37)
    z, y = rng.standard_normal((3, 4)), np.array([1, 0, 3], np.int32)
    g = gc.Graph()
    zt = g.param("z", z.shape)
    dz = evaluate64(gc.grad(gc.softmax_cross_entropy(zt, g.input("y", (3,), dtype="int32")), zt),
                    {"y": y}, {"z": z})
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(dz, (p - np.eye(4)[y]) / 3, rtol=1e-13, atol=1e-16)


def test_sigmoid_binary_cross_entropy_gradient():
    rng = np.random.default_rng(38)
    values = {"z": rng.uniform(-4, 4, (3, 4)), "t": rng.uniform(0, 1, (3, 4))}
    assert_gradients_match(gc.sigmoid_binary_cross_entropy, values)


def test_sigmoid_binary_cross_entropy_gradient_with_fixed_targets():
    rng = np.random.default_rng(39)
    z, t = rng.uniform(-4, 4, (5, 1)), rng.integers(0, 2, (5, 1)).astype(np.float64)
    assert_gradients_match(gc.sigmoid_binary_cross_entropy, {"z": z}, {"t": t})


def test_mse_gradient():
    rng = np.random.default_rng(40)
    assert_gradients_match(gc.mse, {"p": rng.standard_normal((3, 4)), "t": rng.standard_normal((3, 4))})
