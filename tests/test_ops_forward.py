"""Every op's forward value against an independent formulation written here or in core_oracles."""
import itertools

import numpy as np
import pytest
from core_oracles import (avg_pool_loop, conv2d_loop, evaluate64, explicit_pads, max_pool_loop, rel_err,
                          sigmoid_bce_textbook, softmax_cross_entropy_plain)

import graphc as gc

# ---- conv2d ----------------------------------------------------------------------------------

PADDINGS = [0, 1, 2, (1, 2), (2, 0), "valid", "same", "full"]
KERNELS = [(3, 3), (2, 3), (4, 4), (1, 1)]
SIZES = [(7, 7), (6, 8), (5, 6)]


def _conv_cases():
    for (kh, kw), (h, w), padding, stride in itertools.product(KERNELS, SIZES, PADDINGS, [1, 2, (2, 1)]):
        if padding == "same" and stride != 1:
            continue
        yield pytest.param(kh, kw, h, w, padding, stride, id=f"k{kh}x{kw}-in{h}x{w}-pad{padding}-s{stride}")


@pytest.mark.parametrize("kh,kw,h,w,padding,stride", list(_conv_cases()))
def test_conv2d_matches_direct_loop(kh, kw, h, w, padding, stride):
    rng = np.random.default_rng(kh * 100 + kw * 10 + h)
    n, c, o = 2, 2, 3
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((o, c, kh, kw))
    b = rng.standard_normal(o)
    use_bias = (h + kh) % 2 == 0
    expected = conv2d_loop(x, wt, b if use_bias else None, stride, explicit_pads(padding, kh, kw))

    g = gc.Graph()
    xt, wtt = g.input("x", x.shape), g.param("w", wt.shape)
    bt = g.param("b", (o,)) if use_bias else None
    y = gc.conv2d(xt, wtt, bt, stride=stride, padding=padding)
    assert y.shape == expected.shape
    params = {"w": wt, "b": b} if use_bias else {"w": wt}
    got64 = gc.evaluate(y, {"x": x}, params, dtype="float64")
    assert got64.dtype == np.float64
    assert rel_err(got64, expected) < 1e-12
    got32 = gc.evaluate(y, {"x": x.astype(np.float32)}, {k: v.astype(np.float32) for k, v in params.items()})
    assert got32.dtype == np.float32
    assert rel_err(got32, expected) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_conv2d_same_pads_like_pytorch(k):
    """A one-hot kernel at column j copies input column (x + j - before) with before = (k-1)//2:
    even kernels put the extra padding cell after, as PyTorch does."""
    x = np.arange(1.0, 8.0).reshape(1, 1, 1, 7)
    g = gc.Graph()
    xt, wt = g.input("x", x.shape), g.param("w", (1, 1, 1, k))
    y = gc.conv2d(xt, wt, padding="same")
    assert y.shape == x.shape
    before = (k - 1) // 2
    for j in range(k):
        w = np.zeros((1, 1, 1, k))
        w[0, 0, 0, j] = 1.0
        got = evaluate64(y, {"x": x}, {"w": w})[0, 0, 0]
        expected = [x[0, 0, 0, c + j - before] if 0 <= c + j - before < 7 else 0.0 for c in range(7)]
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("padding,expected_hw", [
    (0, (3, 2)), ("valid", (3, 2)), (1, (5, 4)), ((1, 0), (5, 2)), ("same", (5, 4)), ("full", (7, 6)),
])
def test_conv2d_output_shapes(padding, expected_hw):
    g = gc.Graph()
    y = gc.conv2d(g.input("x", (1, 2, 5, 4)), g.param("w", (3, 2, 3, 3)), padding=padding)
    assert y.shape == (1, 3) + expected_hw


def test_conv2d_same_rejects_stride_2():
    g = gc.Graph()
    with pytest.raises(gc.ShapeError, match="same"):
        gc.conv2d(g.input("x", (1, 1, 6, 6)), g.param("w", (1, 1, 3, 3)), stride=2, padding="same")


# ---- pooling -----------------------------------------------------------------------------------

POOL_CASES = [
    pytest.param(kernel, stride, padding, hw, id=f"k{kernel}-s{stride}-p{padding}-in{hw}")
    for kernel, stride, padding in [
        (2, None, 0), (3, None, 0), (2, 1, 0), (3, 2, 1), (2, 2, 1), ((2, 3), None, 0), ((2, 3), (1, 2), (1, 1)),
        (3, 1, (1, 0)), (3, 2, 0), (2, 3, 0), ((1, 2), (2, 3), (0, 1)),
    ]
    for hw in [(6, 6), (7, 5)]
]


@pytest.mark.parametrize("kernel,stride,padding,hw", POOL_CASES)
def test_avg_pool2d_matches_loop_counting_padding_as_zeros(kernel, stride, padding, hw):
    x = np.random.default_rng(1).standard_normal((2, 3) + hw)
    g = gc.Graph()
    y = gc.avg_pool2d(g.input("x", x.shape), kernel, stride, padding)
    expected = avg_pool_loop(x, kernel, stride, padding)
    assert y.shape == expected.shape
    assert rel_err(evaluate64(y, {"x": x}), expected) < 1e-12
    assert rel_err(gc.evaluate(y, {"x": x.astype(np.float32)}), expected) < 1e-5


@pytest.mark.parametrize("kernel,stride,padding,hw", POOL_CASES)
def test_max_pool2d_matches_loop(kernel, stride, padding, hw):
    x = np.random.default_rng(2).standard_normal((2, 3) + hw)
    g = gc.Graph()
    y = gc.max_pool2d(g.input("x", x.shape), kernel, stride, padding)
    expected = max_pool_loop(x, kernel, stride, padding)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(evaluate64(y, {"x": x}), expected)


def test_avg_pool_padding_divides_by_kernel_area():
    g = gc.Graph()
    y = gc.avg_pool2d(g.input("x", (1, 1, 2, 2)), 2, stride=1, padding=1)
    got = evaluate64(y, {"x": np.ones((1, 1, 2, 2))})[0, 0]
    # corners see one real cell of four, edges two, the centre all four
    np.testing.assert_allclose(got, [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], rtol=0, atol=1e-15)


def test_max_pool_padding_never_wins():
    x = -1.0 - np.random.default_rng(3).random((1, 2, 4, 4))  # every value below the zero padding
    g = gc.Graph()
    y = gc.max_pool2d(g.input("x", x.shape), 3, stride=2, padding=1)
    got = evaluate64(y, {"x": x})
    assert (got < -1.0).all()
    np.testing.assert_array_equal(got, max_pool_loop(x, 3, 2, 1))


def test_global_avg_pool2d():
    x = np.random.default_rng(4).standard_normal((3, 4, 5, 6))
    g = gc.Graph()
    y = gc.global_avg_pool2d(g.input("x", x.shape))
    assert y.shape == (3, 4)
    expected = np.array([[np.sum(x[n, c]) / 30.0 for c in range(4)] for n in range(3)])
    assert rel_err(evaluate64(y, {"x": x}), expected) < 1e-13


# ---- elementwise -------------------------------------------------------------------------------

UNARY = {
    "relu": (gc.relu, lambda v: np.where(v > 0, v, 0.0)),
    "sigmoid": (gc.sigmoid, lambda v: 1.0 / (1.0 + np.exp(-v))),
    "tanh": (gc.tanh, lambda v: (np.exp(v) - np.exp(-v)) / (np.exp(v) + np.exp(-v))),
    "exp": (gc.exp, np.exp),
    "log": (gc.log, np.log),
    "sqrt": (gc.sqrt, np.sqrt),
    "softplus": (gc.softplus, lambda v: np.log(1.0 + np.exp(v))),
    "neg": (lambda t: -t, lambda v: -v),
    "square": (lambda t: t ** 2, lambda v: v * v),
    "pow1.5": (lambda t: gc.power(t, 1.5), lambda v: v * np.sqrt(v)),
}
POSITIVE_ONLY = {"log", "sqrt", "pow1.5"}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_elementwise(name):
    build, oracle = UNARY[name]
    x = np.random.default_rng(5).uniform(-3, 3, size=(3, 4, 2))
    if name in POSITIVE_ONLY:
        x = np.abs(x) + 0.1
    g = gc.Graph()
    y = build(g.input("x", x.shape))
    assert y.shape == x.shape and y.dtype == "float32"
    assert rel_err(evaluate64(y, {"x": x}), oracle(x)) < 1e-13
    got32 = gc.evaluate(y, {"x": x.astype(np.float32)})
    assert got32.dtype == np.float32 and rel_err(got32, oracle(x)) < 1e-6


def test_relu_of_exact_zero_is_zero():
    g = gc.Graph()
    y = gc.relu(g.input("x", (3,)))
    np.testing.assert_array_equal(evaluate64(y, {"x": np.array([-0.0, 0.0, 2.0])}), [0.0, 0.0, 2.0])


BINARY = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}
BROADCAST_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((3, 4), ()), ((1,), (2, 3)),
                    ((2, 3, 1), (1, 1, 5))]


def apply_op(symbol, a, b):
    return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}[symbol]()


@pytest.mark.parametrize("symbol", sorted(BINARY))
@pytest.mark.parametrize("sa,sb", BROADCAST_SHAPES)
def test_binary_operators_broadcast_like_numpy(symbol, sa, sb):
    rng = np.random.default_rng(6)
    a, b = rng.uniform(0.5, 2, sa), rng.uniform(0.5, 2, sb)
    g = gc.Graph()
    y = apply_op(symbol, g.input("a", sa), g.input("b", sb))
    expected = BINARY[symbol](a, b)
    assert y.shape == expected.shape
    assert rel_err(evaluate64(y, {"a": a, "b": b}), expected) < 1e-15


@pytest.mark.parametrize("fn,oracle", [
    (gc.add, np.add), (gc.sub, np.subtract), (gc.mul, np.multiply), (gc.div, np.divide),
])
def test_named_binary_functions(fn, oracle):
    rng = np.random.default_rng(7)
    a, b = rng.uniform(0.5, 2, (2, 3)), rng.uniform(0.5, 2, (3,))
    g = gc.Graph()
    y = fn(g.input("a", a.shape), g.input("b", b.shape))
    assert rel_err(evaluate64(y, {"a": a, "b": b}), oracle(a, b)) < 1e-15


SCALAR_FORMS = [
    ("x + 2", lambda t: t + 2, lambda v: v + 2), ("2 + x", lambda t: 2 + t, lambda v: 2 + v),
    ("x - 2.5", lambda t: t - 2.5, lambda v: v - 2.5), ("2.5 - x", lambda t: 2.5 - t, lambda v: 2.5 - v),
    ("x * 3", lambda t: t * 3, lambda v: v * 3), ("0.1 * x", lambda t: 0.1 * t, lambda v: 0.1 * v),
    ("x / 4", lambda t: t / 4, lambda v: v / 4), ("4 / x", lambda t: 4 / t, lambda v: 4 / v),
    ("x / 3", lambda t: t / 3, lambda v: v / 3), ("x * (1/3)", lambda t: t * (1 / 3), lambda v: v * (1 / 3)),
    ("-x", lambda t: -t, lambda v: -v), ("-(x - 1)", lambda t: -(t - 1), lambda v: -(v - 1)),
    ("x ** 2", lambda t: t ** 2, lambda v: v ** 2), ("x ** 0.5", lambda t: t ** 0.5, lambda v: v ** 0.5),
    ("np.float64 scalar", lambda t: t * np.float64(1.7), lambda v: v * 1.7),
]


@pytest.mark.parametrize("label,build,oracle", SCALAR_FORMS, ids=[s[0] for s in SCALAR_FORMS])
def test_scalar_operands_on_both_sides(label, build, oracle):
    x = np.random.default_rng(8).uniform(0.5, 3, (2, 5))
    g = gc.Graph()
    y = build(g.input("x", x.shape))
    assert y.shape == x.shape and y.dtype == "float32"
    # one numpy operation on the same float64 operands: the result must be the same double
    np.testing.assert_allclose(evaluate64(y, {"x": x}), oracle(x), rtol=2e-16, atol=0)


def test_float64_operand_promotes():
    g = gc.Graph()
    y = g.input("a", (2,)) + g.input("b", (2,), dtype="float64")
    assert y.dtype == "float64"
    a, b = np.array([1.0, 2.0], np.float32), np.array([1e-12, 3.0])
    np.testing.assert_array_equal(gc.evaluate(y, {"a": a, "b": b}), a.astype(np.float64) + b)


# ---- reductions and shape ops ----------------------------------------------------------------

REDUCE_AXES = [None, 0, 1, -1, (0, 2), (2, 0), (0, 1, 2), ()]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", REDUCE_AXES, ids=str)
@pytest.mark.parametrize("which", ["sum", "mean"])
def test_reductions(which, axis, keepdims):
    x = np.random.default_rng(9).standard_normal((2, 3, 4))
    g = gc.Graph()
    y = getattr(gc, which)(g.input("x", x.shape), axis=axis, keepdims=keepdims)
    expected = getattr(np, which)(x, axis=axis, keepdims=keepdims)
    assert y.shape == expected.shape
    assert rel_err(evaluate64(y, {"x": x}), expected) < 1e-14


@pytest.mark.parametrize("shape,new", [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((2, 3, 4), (4, -1, 2)),
                                       ((2, 3, 4), (2, 3, 4)), ((6,), (1, 6, 1)), ((2, 3), (-1, 1))])
def test_reshape(shape, new):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    g = gc.Graph()
    y = gc.reshape(g.input("x", shape), new)
    assert y.shape == x.reshape(new).shape
    np.testing.assert_array_equal(evaluate64(y, {"x": x}), x.reshape(new))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 7), (3,)])
def test_flatten(shape):
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    g = gc.Graph()
    y = gc.flatten(g.input("x", shape))
    expected = x.reshape(shape[0], -1)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(evaluate64(y, {"x": x}), expected)


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (0, 1, 2), (-1, 0, 1)], ids=str)
def test_transpose(axes):
    x = np.arange(24.0).reshape(2, 3, 4)
    g = gc.Graph()
    y = gc.transpose(g.input("x", x.shape), axes)
    expected = np.transpose(x, axes)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(evaluate64(y, {"x": x}), expected)


def test_dot_T_property_is_a_transpose():
    x = np.arange(6.0).reshape(2, 3)
    g = gc.Graph()
    np.testing.assert_array_equal(evaluate64(g.input("x", (2, 3)).T, {"x": x}), x.T)


def test_broadcast_to():
    x = np.arange(3.0).reshape(3, 1)
    g = gc.Graph()
    y = gc.broadcast_to(g.input("x", (3, 1)), (2, 3, 4))
    np.testing.assert_array_equal(evaluate64(y, {"x": x}), np.broadcast_to(x, (2, 3, 4)))


# ---- matrix products ----------------------------------------------------------------------------


def matmul_loop(a, b):
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = sum(a[i, k] * b[k, j] for k in range(a.shape[1]))
    return out


@pytest.mark.parametrize("m,k,n", [(3, 4, 5), (1, 7, 1), (6, 1, 2)])
def test_matmul_and_operator(m, k, n):
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    g = gc.Graph()
    at, bt = g.input("a", a.shape), g.input("b", b.shape)
    y1, y2 = gc.matmul(at, bt), at @ bt
    assert y1.shape == y2.shape == (m, n)
    got1, got2 = evaluate64([y1, y2], {"a": a, "b": b})
    assert rel_err(got1, matmul_loop(a, b)) < 1e-13
    np.testing.assert_array_equal(got1, got2)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_is_x_wT_plus_b(bias):
    rng = np.random.default_rng(11)
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    g = gc.Graph()
    y = gc.linear(g.input("x", x.shape), g.param("w", w.shape), g.param("b", (3,)) if bias else None)
    assert y.shape == (4, 3)
    expected = matmul_loop(x, w.T) + (b if bias else 0)
    assert rel_err(evaluate64(y, {"x": x}, {"w": w, "b": b}), expected) < 1e-13


# ---- softmax and losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
def test_softmax(axis):
    x = np.random.default_rng(12).standard_normal((2, 3, 4)) * 3
    g = gc.Graph()
    y = gc.softmax(g.input("x", x.shape), axis=axis)
    e = np.exp(x)
    expected = e / e.sum(axis=axis, keepdims=True)
    got = evaluate64(y, {"x": x})
    assert rel_err(got, expected) < 1e-14
    np.testing.assert_allclose(got.sum(axis=axis), 1.0, rtol=1e-14)


def test_softmax_default_axis_is_last():
    x = np.random.default_rng(13).standard_normal((3, 4))
    g = gc.Graph()
    got = evaluate64(gc.softmax(g.input("x", x.shape)), {"x": x})
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("n,c", [(1, 2), (4, 10), (5, 3)])
def test_softmax_cross_entropy(n, c):
    rng = np.random.default_rng(14)
    z, labels = rng.standard_normal((n, c)) * 2, rng.integers(0, c, n).astype(np.int32)
    g = gc.Graph()
    loss = gc.softmax_cross_entropy(g.input("z", z.shape), g.input("y", (n,), dtype="int32"))
    assert loss.shape == ()
    plain = np.mean([np.log(np.sum(np.exp(z[i]))) - z[i, labels[i]] for i in range(n)])
    got = evaluate64(loss, {"z": z, "y": labels})
    assert abs(got - plain) < 1e-13 * max(1, abs(plain))
    assert abs(got - softmax_cross_entropy_plain(z, labels)) < 1e-13 * max(1, abs(plain))


def test_softmax_cross_entropy_accepts_int64_labels():
    z, labels = np.array([[1.0, 2.0, 3.0]]), np.array([2], np.int64)
    g = gc.Graph()
    loss = gc.softmax_cross_entropy(g.input("z", (1, 3)), g.input("y", (1,), dtype="int64"))
    assert abs(evaluate64(loss, {"z": z, "y": labels}) - softmax_cross_entropy_plain(z, labels)) < 1e-15


def test_sigmoid_binary_cross_entropy_textbook():
    rng = np.random.default_rng(15)
    z = rng.uniform(-6, 6, (4, 3))
    t = np.array([[0, 1, 0.3], [1, 1, 0], [0.5, 0, 1], [0.9, 0.1, 0]])
    g = gc.Graph()
    loss = gc.sigmoid_binary_cross_entropy(g.input("z", z.shape), g.input("t", t.shape))
    assert loss.shape == ()
    assert abs(evaluate64(loss, {"z": z, "t": t}) - sigmoid_bce_textbook(z, t)) < 1e-13


def test_mse():
    rng = np.random.default_rng(16)
    p, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    g = gc.Graph()
    loss = gc.mse(g.input("p", p.shape), g.input("t", t.shape))
    assert loss.shape == ()
    expected = sum((p[i, j] - t[i, j]) ** 2 for i in range(3) for j in range(4)) / 12
    assert abs(evaluate64(loss, {"p": p, "t": t}) - expected) < 1e-14


@pytest.mark.parametrize("value", [2.5, np.float64(-1.25), [1.5, -2.0], np.arange(6.0).reshape(2, 3)], ids=str)
def test_constants_keep_their_shape_and_value(value):
    g = gc.Graph()
    c = g.constant(value)
    expected = np.asarray(value, np.float64)
    assert c.shape == expected.shape and c.dtype == "float32"
    got = evaluate64(c)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    x = g.param("x", expected.shape)
    y = x * c + c
    np.testing.assert_array_equal(evaluate64(y, {}, {"x": np.ones(expected.shape)}), 2 * expected)


def test_int_constant_and_caller_array_untouched():
    g = gc.Graph()
    source = np.array([1, 2, 3])
    c = g.constant(source)
    assert c.dtype == "int32"
    np.testing.assert_array_equal(evaluate64(c), [1, 2, 3])
    assert source.flags.writeable
    source[0] = 7  # the graph holds its own copy
    np.testing.assert_array_equal(evaluate64(c), [1, 2, 3])


def test_evaluate_default_dtype_follows_the_graph():
    g = gc.Graph()
    x = g.input("x", (2,))
    out = gc.evaluate([x * 2, gc.sum(x)], {"x": np.array([1.5, 2.5])})
    assert [o.dtype for o in out] == [np.float32, np.float32]
    np.testing.assert_array_equal(out[0], [3.0, 5.0])
    assert out[1] == 4.0
