"""Errors: gc.ShapeError (a ValueError) at op-build time naming the op, every operand's shape and
the user's file:line; ValueError naming the input for bad feeds; out-of-range labels rejected."""
import re

import numpy as np
import pytest

import graphc as gc

HERE = "test_errors.py"


def shape_text_variants(shape):
    return {str(list(shape)), str(tuple(shape)), "x".join(map(str, shape))}


def assert_mentions_shape(message, shape):
    assert any(v in message for v in shape_text_variants(shape)), f"shape {shape} not named in: {message}"


def build_error(fn):
    """Run a one-line lambda that builds a bad op; return the ShapeError after checking that it
    names the lambda's own line (the innermost user frame), not a line inside graphc or this helper."""
    with pytest.raises(gc.ShapeError) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{HERE}:{fn.__code__.co_firstlineno}" in message, message
    assert "could not be broadcast" not in message and "Traceback" not in message
    assert info.value.__cause__ is None  # no numpy error chained from deep inside
    return message


def graph_with(**shapes):
    g = gc.Graph()
    return g, [g.input(name, shape) for name, shape in shapes.items()]


CASES = []


def case(op, *shapes):
    def register(fn):
        CASES.append(pytest.param(fn, op, shapes, id=f"{op}-{fn.__name__}"))
        return fn
    return register


@case("matmul", (3, 4), (5, 2))
def matmul_inner():
    g, (a, b) = graph_with(a=(3, 4), b=(5, 2))
    return lambda: a @ b


@case("matmul", (3,), (3, 4))
def matmul_1d():
    g, (a, b) = graph_with(a=(3,), b=(3, 4))
    return lambda: gc.matmul(a, b)


@case("add", (3, 4), (5,))
def add_broadcast():
    g, (a, b) = graph_with(a=(3, 4), b=(5,))
    return lambda: a + b


@case("mul", (2, 3), (3, 2))
def mul_broadcast():
    g, (a, b) = graph_with(a=(2, 3), b=(3, 2))
    return lambda: a * b


@case("sub", (4,), (3,))
def sub_scalar_left_broadcast():
    g, (a, b) = graph_with(a=(4,), b=(3,))
    return lambda: gc.sub(a, b)


@case("div", (2, 2), (3,))
def div_broadcast():
    g, (a, b) = graph_with(a=(2, 2), b=(3,))
    return lambda: a / b


@case("conv2d", (1, 3, 8, 8), (4, 2, 3, 3))
def conv_channels():
    g, (x, w) = graph_with(x=(1, 3, 8, 8), w=(4, 2, 3, 3))
    return lambda: gc.conv2d(x, w)


@case("conv2d", (1, 1, 2, 2), (1, 1, 3, 3))
def conv_kernel_too_big():
    g, (x, w) = graph_with(x=(1, 1, 2, 2), w=(1, 1, 3, 3))
    return lambda: gc.conv2d(x, w, padding="valid")


@case("conv2d", (1, 2, 5, 5), (4, 2, 3, 3), (3,))
def conv_bias():
    g, (x, w, b) = graph_with(x=(1, 2, 5, 5), w=(4, 2, 3, 3), b=(3,))
    return lambda: gc.conv2d(x, w, b)


@case("conv2d", (2, 5, 5), (4, 2, 3, 3))
def conv_3d_input():
    g, (x, w) = graph_with(x=(2, 5, 5), w=(4, 2, 3, 3))
    return lambda: gc.conv2d(x, w)


@case("linear", (2, 5), (3, 4))
def linear_features():
    g, (x, w) = graph_with(x=(2, 5), w=(3, 4))
    return lambda: gc.linear(x, w)


@case("linear", (2, 4), (3, 4), (4,))
def linear_bias():
    g, (x, w, b) = graph_with(x=(2, 4), w=(3, 4), b=(4,))
    return lambda: gc.linear(x, w, b)


@case("reshape", (3, 4))
def reshape_size():
    g, (x,) = graph_with(x=(3, 4))
    return lambda: gc.reshape(x, (5, -1))


@case("reshape", (3, 4))
def reshape_exact():
    g, (x,) = graph_with(x=(3, 4))
    return lambda: gc.reshape(x, (5, 2))


@case("transpose", (2, 3, 4))
def transpose_axes():
    g, (x,) = graph_with(x=(2, 3, 4))
    return lambda: gc.transpose(x, (0, 1))


@case("transpose", (2, 3))
def transpose_axis_out_of_range():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.transpose(x, (0, 5))


@case("transpose", (2, 3))
def transpose_negative_axis_out_of_range():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.transpose(x, (-3, 0))


@case("sum", (2, 3))
def sum_axis():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.sum(x, axis=2)


@case("mean", (2, 3))
def mean_axis():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.mean(x, axis=(0, -3))


@case("softmax", (2, 3))
def softmax_axis():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.softmax(x, axis=2)


@case("softmax_cross_entropy", (4, 10), (3,))
def cross_entropy_labels_shape():
    g = gc.Graph()
    z, y = g.input("z", (4, 10)), g.input("y", (3,), dtype="int32")
    return lambda: gc.softmax_cross_entropy(z, y)


@case("softmax_cross_entropy", (4, 10), (4,))
def cross_entropy_float_labels():
    g, (z, y) = graph_with(z=(4, 10), y=(4,))
    return lambda: gc.softmax_cross_entropy(z, y)


@case("softmax_cross_entropy", (4, 10, 2), (4,))
def cross_entropy_3d_logits():
    g = gc.Graph()
    z, y = g.input("z", (4, 10, 2)), g.input("y", (4,), dtype="int32")
    return lambda: gc.softmax_cross_entropy(z, y)


@case("sigmoid_binary_cross_entropy", (4, 1), (4,))
def logistic_shapes():
    g, (z, t) = graph_with(z=(4, 1), t=(4,))
    return lambda: gc.sigmoid_binary_cross_entropy(z, t)


@case("mse", (3, 2), (2, 3))
def mse_shapes():
    g, (p, t) = graph_with(p=(3, 2), t=(2, 3))
    return lambda: gc.mse(p, t)


@case("avg_pool2d", (1, 1, 3, 3))
def avg_pool_kernel_too_big():
    g, (x,) = graph_with(x=(1, 1, 3, 3))
    return lambda: gc.avg_pool2d(x, 4)


@case("max_pool2d", (1, 1, 6, 6))
def max_pool_padding_too_big():
    g, (x,) = graph_with(x=(1, 1, 6, 6))
    return lambda: gc.max_pool2d(x, 2, padding=2)


@case("max_pool2d", (6, 6))
def max_pool_2d_input():
    g, (x,) = graph_with(x=(6, 6))
    return lambda: gc.max_pool2d(x, 2)


@case("global_avg_pool2d", (2, 3))
def global_pool_2d_input():
    g, (x,) = graph_with(x=(2, 3))
    return lambda: gc.global_avg_pool2d(x)


@case("relu", (3,))
def relu_int():
    g = gc.Graph()
    x = g.input("x", (3,), dtype="int32")
    return lambda: gc.relu(x)


@case("matmul", (2, 3), (3, 2))
def matmul_dtypes():
    g = gc.Graph()
    a, b = g.input("a", (2, 3)), g.input("b", (3, 2), dtype="float64")
    return lambda: a @ b


@case("add", (2,), (2,))
def add_across_graphs():
    a, b = gc.Graph().input("a", (2,)), gc.Graph().input("b", (2,))
    return lambda: a + b


@pytest.mark.parametrize("setup,op,shapes", CASES)
def test_shape_error_names_op_shapes_and_caller_line(setup, op, shapes):
    message = build_error(setup())
    assert re.search(rf"\b{op}\b", message), f"op {op!r} not named in: {message}"
    for shape in shapes:
        assert_mentions_shape(message, shape)


def test_shape_error_in_a_plain_script_line():
    """Without any helper: the line in the traceback that called graphc is the line the message names."""
    g = gc.Graph()
    h = g.input("h", (8, 100))
    w = g.param("w", (10, 120))
    with pytest.raises(ValueError) as info:
        gc.linear(h, w)
    assert type(info.value) is gc.ShapeError
    line = info.tb.tb_lineno  # this function's frame: the line of the gc.linear call
    assert f"{HERE}:{line}" in str(info.value)
    assert "linear" in str(info.value) and "[8, 100]" in str(info.value) and "[10, 120]" in str(info.value)


def test_shape_error_raised_at_build_time_not_evaluation():
    g = gc.Graph()
    x = g.input("x", (2, 3))
    nodes_before = len(g.nodes)
    with pytest.raises(gc.ShapeError):
        x @ x
    assert len(g.nodes) == nodes_before  # nothing half-built was added


def test_tensor_with_unsupported_operand():
    g = gc.Graph()
    x = g.input("x", (2,))
    with pytest.raises(gc.ShapeError, match="str"):
        x + "1"
    with pytest.raises(gc.ShapeError):
        x * True


@pytest.mark.parametrize("decl", [
    lambda g: g.input("x", (2, -1)), lambda g: g.param("p", (3,), dtype="float16"),
    lambda g: g.input("", (2,)), lambda g: (g.input("x", (2,)), g.param("x", (2,))),
])
def test_bad_declarations(decl):
    with pytest.raises(ValueError):
        decl(gc.Graph())


# ---- feeds ------------------------------------------------------------------------------------


@pytest.fixture
def classifier():
    g = gc.Graph("clf")
    x, y = g.input("images", (4, 3)), g.input("labels", (4,), dtype="int32")
    w = g.param("weights", (5, 3))
    logits = gc.linear(x, w)
    loss = gc.softmax_cross_entropy(logits, y)
    feeds = {"images": np.ones((4, 3), np.float32), "labels": np.array([0, 1, 4, 2], np.int32)}
    params = {"weights": np.ones((5, 3), np.float32)}
    return g, loss, gc.grad(loss, w), feeds, params


def test_good_feeds_evaluate(classifier):
    g, loss, dw, feeds, params = classifier
    assert abs(gc.evaluate(loss, feeds, params) - np.log(5)) < 1e-6


@pytest.mark.parametrize("change,name", [
    (lambda f, p: f.pop("images"), "images"),
    (lambda f, p: f.pop("labels"), "labels"),
    (lambda f, p: p.pop("weights"), "weights"),
    (lambda f, p: f.__setitem__("images", np.ones((4, 4), np.float32)), "images"),
    (lambda f, p: f.__setitem__("images", np.ones((3,), np.float32)), "images"),
    (lambda f, p: f.__setitem__("labels", np.zeros((5,), np.int32)), "labels"),
    (lambda f, p: p.__setitem__("weights", np.ones((3, 5), np.float32)), "weights"),
    (lambda f, p: f.__setitem__("labels", np.zeros(4, np.float32)), "labels"),
    (lambda f, p: f.__setitem__("images", np.ones((4, 3), np.int32)), "images"),
    (lambda f, p: f.__setitem__("images", np.full((4, 3), "a")), "images"),
    (lambda f, p: f.__setitem__("imgs", np.ones((4, 3), np.float32)), "imgs"),
], ids=["missing-input", "missing-labels", "missing-param", "wrong-shape", "wrong-rank", "labels-shape",
        "param-shape", "float-labels", "int-images", "string-images", "unknown-name"])
@pytest.mark.parametrize("dtype", [None, "float64"])
def test_bad_feeds_raise_value_error_naming_the_input(classifier, change, name, dtype):
    g, loss, dw, feeds, params = classifier
    feeds, params = dict(feeds), dict(params)
    change(feeds, params)
    with pytest.raises(ValueError, match=f"'{name}'"):
        gc.evaluate([loss, dw], feeds, params, dtype=dtype)


@pytest.mark.parametrize("labels", [[0, 1, 5, 2], [0, -1, 2, 2], [99, 0, 0, 0]])
def test_out_of_range_labels_raise(classifier, labels):
    g, loss, dw, feeds, params = classifier
    feeds = {**feeds, "labels": np.array(labels, np.int32)}
    with pytest.raises(ValueError, match=r"labels.*\[0, 5\)"):
        gc.evaluate(loss, feeds, params)
    with pytest.raises(ValueError, match=r"labels.*\[0, 5\)"):
        gc.evaluate(dw, feeds, params)  # the gradient alone checks them too


def test_evaluate_rejects_non_float_dtype(classifier):
    g, loss, dw, feeds, params = classifier
    with pytest.raises(ValueError, match="dtype"):
        gc.evaluate(loss, feeds, params, dtype="int32")
