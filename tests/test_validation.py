"""Arguments graphc cannot take are refused when the graph is built, never silently changed.

Wrong types raise TypeError, wrong values ValueError (gc.ShapeError for shapes); each message
names the argument, the offending value and the user's line. numpy scalars are accepted wherever
Python numbers are; a bool is never an int. Every dimension is >= 1 (graphc compiles static,
non-empty shapes), so an empty tensor is refused where it is declared.
"""
import math

import numpy as np
import pytest
from refusals import refused

import graphc as gc


def images():
    g = gc.Graph()
    return g, g.input("x", (2, 3, 8, 8)), g.param("w", (4, 3, 3, 3))


# ---- d. shapes of declarations ------------------------------------------------------------------


@pytest.mark.parametrize("declare", ["input", "param"])
@pytest.mark.parametrize("shape,offender", [((2.7, 3), "2.7"), ("12", "'12'"), ((True, 3), "True"),
                                            ((2, None), "None"), ((np.float64(2), 3), "2.0")], ids=str)
def test_a_shape_must_hold_ints(declare, shape, offender):
    g = gc.Graph()
    refused(TypeError, lambda: getattr(g, declare)("a", shape), "'a'", offender)


@pytest.mark.parametrize("declare", ["input", "param"])
def test_a_shape_must_be_a_sequence(declare):
    g = gc.Graph()
    refused(TypeError, lambda: getattr(g, declare)("a", 5), "'a'", "5")


@pytest.mark.parametrize("declare", ["input", "param"])
def test_numpy_integers_are_dimensions(declare):
    t = getattr(gc.Graph(), declare)("a", (np.int64(2), np.int32(3), np.uint8(4)))
    assert t.shape == (2, 3, 4) and all(type(d) is int for d in t.shape)


# ---- e. empty dimensions ---------------------------------------------------------------------


@pytest.mark.parametrize("declare", ["input", "param"])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0,), (2, -1)], ids=str)
def test_every_dimension_is_at_least_one(declare, shape):
    g = gc.Graph()
    refused(gc.ShapeError, lambda: getattr(g, declare)("x", shape), "'x'", str(shape), ">= 1")


def test_a_scalar_shape_is_fine():
    assert gc.Graph().input("s", ()).shape == ()


def test_linear_with_an_empty_batch_is_refused_at_the_declaration():
    """Was a ZeroDivisionError in gemm.py while compiling the training step."""
    g = gc.Graph()
    refused(gc.ShapeError, lambda: g.input("x", (0, 3)), "input 'x'", "(0, 3)", "every dimension >= 1")


def test_cross_entropy_with_an_empty_batch_is_refused_at_the_declaration():
    """Was a ZeroDivisionError in loss.py's derivative rule."""
    g = gc.Graph()
    refused(gc.ShapeError, lambda: g.input("y", (0,), dtype="int32"), "input 'y'", "(0,)")


def test_zero_features_are_refused_at_the_declaration():
    """Was "GEMM dims must be >= 1" from the code generator."""
    g = gc.Graph()
    refused(gc.ShapeError, lambda: g.param("w", (2, 0)), "param 'w'", "(2, 0)")


def test_an_empty_constant_is_refused():
    g = gc.Graph()
    refused(gc.ShapeError, lambda: g.constant(np.zeros((0, 3))), "constant", "(0, 3)", ">= 1")


def test_broadcasting_to_an_empty_shape_is_refused():
    g = gc.Graph()
    row = g.input("row", (1, 3))
    refused(gc.ShapeError, lambda: gc.broadcast_to(row, (0, 3)), "broadcast_to", "(0, 3)")


# ---- d. constants ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [([2 ** 40], "1099511627776"),
                                         (np.array([3_000_000_000]), "3000000000"),
                                         (np.array([-2 ** 31 - 1]), "-2147483649")], ids=str)
def test_integer_constants_outside_int32_are_refused(value, shown):
    g = gc.Graph()
    refused(ValueError, lambda: g.constant(value), "constant", shown, "int32")


def test_integer_constants_inside_int32_become_int32():
    g = gc.Graph()
    t = g.constant(np.array([5, -2 ** 31, 2 ** 31 - 1], dtype=np.int64))
    assert t.dtype == "int32"
    np.testing.assert_array_equal(t.attrs["value"].array, [5, -2 ** 31, 2 ** 31 - 1])


def test_int64_constants_keep_large_values():
    t = gc.Graph().constant([2 ** 40], dtype="int64")
    assert t.attrs["value"].array.tolist() == [2 ** 40]


def test_float_constants_that_overflow_float32_are_refused():
    g = gc.Graph()
    refused(ValueError, lambda: g.constant([1.0, 1e300]), "constant", "1e+300", "float32")


def test_non_finite_float_constants_are_kept():
    value = gc.Graph().constant([-np.inf, np.nan]).attrs["value"].array
    assert value[0] == -np.inf and np.isnan(value[1])


def test_fractions_are_not_truncated_to_int():
    g = gc.Graph()
    refused(ValueError, lambda: g.constant([1.5], dtype="int32"), "constant", "1.5", "int32")
    assert gc.Graph().constant([2.0], dtype="int32").attrs["value"].array.tolist() == [2]


@pytest.mark.parametrize("value", ["12", ["a", "b"], [None], [1 + 2j], [True, False]], ids=str)
def test_constants_must_be_numbers(value):
    g = gc.Graph()
    refused(TypeError, lambda: g.constant(value), "constant")


def test_a_bool_constant_with_an_explicit_dtype_is_a_mask():
    assert gc.Graph().constant([True, False], dtype="float32").attrs["value"].array.tolist() == [1.0, 0.0]


# ---- d. shape-op arguments ---------------------------------------------------------------------


def matrix():
    g = gc.Graph()
    return g.input("m", (2, 6))


@pytest.mark.parametrize("shape", [(-2, -6), (-3, -4), (2, -1, -6), (-1, -1), (0, -1), (3, 0, 4)], ids=str)
def test_reshape_dimensions_are_positive_or_one_minus_one(shape):
    m = matrix()
    refused(gc.ShapeError, lambda: gc.reshape(m, shape), "reshape", str(shape))


@pytest.mark.parametrize("shape,offender", [((6.5, 2), "6.5"), ((True, 12), "True"), ("12", "'12'"), (12, "12")],
                         ids=str)
def test_reshape_dimensions_are_ints(shape, offender):
    m = matrix()
    refused(TypeError, lambda: gc.reshape(m, shape), "reshape", offender)


def test_reshape_takes_numpy_integers():
    assert gc.reshape(matrix(), (np.int64(3), np.int32(-1))).shape == (3, 4)


@pytest.mark.parametrize("axes,offender", [((1.7, 0), "1.7"), ((True, 0), "True"), ("10", "'10'")], ids=str)
def test_transpose_axes_are_ints(axes, offender):
    m = matrix()
    refused(TypeError, lambda: gc.transpose(m, axes), "transpose", offender)


def test_transpose_takes_numpy_integers():
    assert gc.transpose(matrix(), (np.int64(1), np.int64(0))).shape == (6, 2)


@pytest.mark.parametrize("shape,offender", [((2.0, 6), "2.0"), ((True, 6), "True")], ids=str)
def test_broadcast_to_dimensions_are_ints(shape, offender):
    m = matrix()
    refused(TypeError, lambda: gc.broadcast_to(m, shape), "broadcast_to", offender)


@pytest.mark.parametrize("reduce", [gc.sum, gc.mean], ids=lambda f: f.__name__)
@pytest.mark.parametrize("axis,offender", [(True, "True"), (1.0, "1.0"), ((0, 1.0), "1.0"), ("0", "'0'")], ids=str)
def test_reduction_axes_are_ints(reduce, axis, offender):
    m = matrix()
    refused(TypeError, lambda: reduce(m, axis=axis), reduce.__name__, offender)


@pytest.mark.parametrize("reduce", [gc.sum, gc.mean], ids=lambda f: f.__name__)
def test_reductions_take_numpy_axes_and_bool_keepdims(reduce):
    m = matrix()
    assert reduce(m, axis=np.int64(1), keepdims=np.True_).shape == (2, 1)
    refused(TypeError, lambda: reduce(m, axis=0, keepdims="no"), reduce.__name__, "keepdims", "'no'")


@pytest.mark.parametrize("axis,offender", [(True, "True"), (1.0, "1.0")], ids=str)
def test_softmax_axis_is_an_int(axis, offender):
    m = matrix()
    refused(TypeError, lambda: gc.softmax(m, axis=axis), "softmax", "axis", offender)


def test_softmax_takes_a_numpy_axis():
    assert gc.softmax(matrix(), axis=np.int64(0)).attrs["axis"] == 0


# ---- d. convolution and pooling arguments ---------------------------------------------------------


@pytest.mark.parametrize("padding,offender", [(((1.7, 0), (0, 0)), "1.7"), (((True, 0), (0, 0)), "True"),
                                              ((1.0, 1), "1.0"), ((True, 1), "True"), (1.5, "1.5"),
                                              (((1, 0), (0, "1")), "'1'")], ids=str)
def test_conv_padding_is_ints(padding, offender):
    g, x, w = images()
    refused(TypeError, lambda: gc.conv2d(x, w, padding=padding), "conv2d", "padding", offender)


@pytest.mark.parametrize("stride,offender", [(1.0, "1.0"), ((True, 1), "True"), (True, "True"), ((2, 2.0), "2.0")],
                         ids=str)
def test_conv_stride_is_ints(stride, offender):
    g, x, w = images()
    refused(TypeError, lambda: gc.conv2d(x, w, stride=stride), "conv2d", "stride", offender)


def test_conv_takes_numpy_integers():
    g, x, w = images()
    y = gc.conv2d(x, w, stride=np.int64(2), padding=((np.int32(1), np.int64(0)), (0, np.uint8(1))))
    assert y.shape == (2, 4, 4, 4)
    (top, bottom), (left, right) = y.attrs["padding"]
    assert all(type(v) is int for v in (top, bottom, left, right) + y.attrs["stride"])


@pytest.mark.parametrize("pool", [gc.avg_pool2d, gc.max_pool2d], ids=lambda f: f.__name__)
@pytest.mark.parametrize("argument,value,offender", [
    ("kernel", 2.5, "2.5"), ("kernel", (2, True), "True"), ("kernel", True, "True"),
    ("stride", (1.0, 1), "1.0"), ("stride", (True, 2), "True"), ("padding", (1.0, 0), "1.0"),
    ("padding", True, "True")], ids=str)
def test_pool_arguments_are_ints(pool, argument, value, offender):
    g, x, w = images()
    arguments = {"kernel": 2, argument: value}
    refused(TypeError, lambda: pool(x, **arguments), pool.__name__, argument, offender)


@pytest.mark.parametrize("pool", [gc.avg_pool2d, gc.max_pool2d], ids=lambda f: f.__name__)
def test_pools_take_numpy_integers(pool):
    g, x, w = images()
    assert pool(x, np.int64(2), stride=(np.int32(2), 2), padding=np.int64(1)).shape == (2, 3, 5, 5)


# ---- d. optimizer hyperparameters ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -0.1], ids=str)
def test_sgd_hyperparameters_are_finite_and_non_negative(name, value):
    arguments = {"lr": 0.1, name: value}
    refused(ValueError, lambda: gc.SGD(**arguments), "SGD", name, repr(value).replace("'", ""))


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", ["0.1", True, None, [0.1]], ids=str)
def test_sgd_hyperparameters_are_numbers(name, value):
    arguments = {"lr": 0.1, name: value}
    refused(TypeError, lambda: gc.SGD(**arguments), "SGD", name)


def test_sgd_takes_numpy_scalars_as_python_floats():
    sgd = gc.SGD(lr=np.float32(0.1), momentum=np.float64(0.9), weight_decay=np.int64(0))
    assert (sgd.lr, sgd.momentum, sgd.weight_decay) == (pytest.approx(0.1), 0.9, 0.0)
    assert all(type(v) is float for v in (sgd.lr, sgd.momentum, sgd.weight_decay))
    assert gc.SGD(lr=0).lr == 0.0  # as torch.optim.SGD: lr 0 is allowed


def test_sgd_nesterov_is_a_bool():
    refused(TypeError, lambda: gc.SGD(lr=0.1, momentum=0.9, nesterov="yes"), "SGD", "nesterov", "'yes'")


def test_sgd_with_numpy_hyperparameters_builds_updates():
    g = gc.Graph()
    w = g.param("w", (3,))
    sgd = gc.SGD(lr=np.float32(0.5), momentum=np.float32(0.5))
    writes, state = sgd.updates(g, [w], [gc.sum(w) * w])
    assert [name for name, _ in writes] == ["momentum:w", "w"] and state == ["momentum:w"]
    values = gc.evaluate([value for _, value in writes], {}, {"w": np.ones(3, np.float32),
                                                              "momentum:w": np.zeros(3, np.float32)})
    np.testing.assert_allclose(values[1], 1 - 0.5 * 3, rtol=1e-6)


# ---- native code: int64 labels -----------------------------------------------------------------------


def test_int64_labels_get_advice_about_labels_not_float64():
    g = gc.Graph()
    logits, labels = g.input("logits", (4, 3)), g.input("labels", (4,), dtype="int64")
    loss = gc.softmax_cross_entropy(logits, labels)
    with pytest.raises(NotImplementedError) as info:
        gc.compile([loss], {})
    message = str(info.value)
    assert "int64" in message and "'labels'" in message and 'dtype="int32"' in message, message
    assert "float64" not in message, message


def test_finite_float_helper_names_the_argument():
    from graphc.core.ir import as_finite_float, as_int
    assert as_int(np.int16(3), "k") == 3 and type(as_int(np.int16(3), "k")) is int
    assert as_finite_float(np.float32(0.25), "f") == 0.25 and type(as_finite_float(1, "f")) is float
    with pytest.raises(ValueError, match="'f' must be finite, got nan"):
        as_finite_float(math.nan, "'f'")
    with pytest.raises(TypeError, match="k must be an int, got True"):
        as_int(True, "k")


# ---- declarations: dtypes and names ------------------------------------------------------------------


def test_a_dtype_of_none_is_not_float64():
    g = gc.Graph()
    refused(TypeError, lambda: g.input("x", (2,), dtype=None), "input 'x'", "None")


def test_a_dtype_must_be_one_graphc_has():
    g = gc.Graph()
    refused(TypeError, lambda: g.input("x", (2,), dtype="foo"), "input 'x'", "'foo'")
    refused(ValueError, lambda: g.param("p", (2,), dtype="float16"), "param 'p'", "float16")
    refused(ValueError, lambda: g.constant([1.0], dtype="float16"), "constant", "float16")


def test_a_name_must_be_a_string():
    g = gc.Graph()
    refused(TypeError, lambda: g.input(5, (2,)), "input name", "5")
    refused(ValueError, lambda: g.param("", (2,)), "param name")


def test_shapes_and_axes_are_ordered_sequences():
    g = gc.Graph()
    refused(TypeError, lambda: g.input("x", {2, 3}), "input 'x'", "{2, 3}")
    m = matrix()
    refused(TypeError, lambda: gc.transpose(m, {1, 0}), "transpose", "{0, 1}")
    assert g.input("r", range(1, 3)).shape == (1, 2) and g.input("a", np.array([2, 3])).shape == (2, 3)


@pytest.mark.parametrize("seed, error", [(True, TypeError), (1.5, TypeError), ("3", TypeError), (-1, ValueError)])
def test_init_params_refuses_a_seed_that_is_not_a_non_negative_int(seed, error):
    g = gc.Graph("seed")
    g.param("w", (2, 2))
    with pytest.raises(error, match="seed"):
        gc.init_params(g, seed=seed)
    np.testing.assert_array_equal(gc.init_params(g, seed=np.int64(3))["w"], gc.init_params(g, seed=3)["w"])
