"""gc.concat (np.concatenate) and gc.leaky_relu (torch's): numpy and PyTorch semantics, gradients
against finite differences in float64, compiled kernels against the reference (concat bit for
bit: it only moves values) on 1-3 threads and in a training step, leaky_relu fused with its
neighbours, and every refusal naming the op and the line that asked for it."""
import numpy as np
import pytest
from core_oracles import assert_gradients_match, away_from_zero
from kernel_cases import compile_kernels, run_kernel

import graphc as gc
from graphc.backend.kernels.layout import emit_concat

CONCAT_CASES = [   # operand shapes, axis
    ([(5,), (3,)], 0),
    ([(2, 3), (2, 5)], -1),
    ([(4, 3), (1, 3), (2, 3)], 0),
    ([(2, 3, 5, 5), (2, 4, 5, 5), (2, 1, 5, 5)], 1),        # DenseNet/Inception: channels of NCHW
    ([(2, 3, 4, 37), (2, 3, 4, 6)], -1),                     # odd rows, several vectors and a tail
    ([(3, 1, 7), (3, 2, 7)], -2),
    ([(1, 2, 3), (1, 2, 3)], 2),
    ([(2, 17000), (2, 5), (2, 16400)], 1),                   # rows over ROW_CHUNK_FLOATS: split in chunks
    ([(1, 40000), (1, 3)], -1),                              # one row: each input's run in chunks
]


def _random(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _concat_graph(shapes, axis):
    g = gc.Graph("concat")
    xs = [g.input(f"x{i}", shape) for i, shape in enumerate(shapes)]
    return g, xs, gc.concat(xs, axis)


def _compiled(outputs, params, feeds, threads):
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        fn = gc.compile(outputs, params)
        return fn, fn(**feeds)
    finally:
        gc.set_num_threads(previous)


# ---- concat ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes, axis", CONCAT_CASES)
def test_concat_is_numpys_concatenate(shapes, axis):
    _, _, y = _concat_graph(shapes, axis)
    values = [_random(shape, seed=i) for i, shape in enumerate(shapes)]
    assert y.shape == np.concatenate(values, axis).shape
    got = gc.evaluate(y, {f"x{i}": v for i, v in enumerate(values)}, {})
    np.testing.assert_array_equal(got, np.concatenate(values, axis))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shapes, axis", CONCAT_CASES)
def test_compiled_concat_and_its_gradient_match_the_reference_exactly(splitting_pays, shapes, axis, threads):
    """The forward kernel and the backward's slices only move values, and the products around
    them (work enough for several threads) round once: equal bit for bit."""
    g, xs, y = _concat_graph(shapes, axis)
    weights = g.input("w", y.shape)
    outputs = [y, y * 3.0] + gc.grad(gc.sum(y * weights * 3.0), xs)
    feeds = {f"x{i}": _random(shape, seed=i) for i, shape in enumerate(shapes)}
    feeds["w"] = _random(y.shape, seed=9)
    expected = gc.evaluate(outputs, feeds, {})
    fn, got = _compiled(outputs, {}, feeds, threads)
    for g_value, e_value in zip(got, expected):
        np.testing.assert_array_equal(g_value, e_value)
    labels = [step.label for step in fn.steps]
    assert labels.count("concat") == 1 and labels.count("slice") == len(shapes), labels


def test_the_concat_kernel_shares_its_rows_among_any_number_of_threads():
    """Each kernel on 1-4 threads (more threads than rows too) writes every element of its
    output, which starts as NaN, with the input's value."""
    cases = [(shapes, axis % len(shapes[0]), [_random(shape, seed=i) for i, shape in enumerate(shapes)])
             for shapes, axis in CONCAT_CASES]
    engine, kernels = compile_kernels([
        lambda module, name, shapes=shapes, axis=axis: emit_concat(module, name, shapes, axis, max_threads=4)
        for shapes, axis, _ in cases])
    for (shapes, axis, inputs), kernel in zip(cases, kernels):
        expected = np.concatenate(inputs, axis)
        for threads in (1, 2, 3, 4):
            np.testing.assert_array_equal(run_kernel(engine, kernel, inputs, expected.shape, threads), expected,
                                          err_msg=f"{shapes} axis {axis} on {threads} threads")


def test_one_tensor_twice_a_concat_of_concats_and_one_operand():
    g = gc.Graph("concat")
    a, b = g.input("a", (2, 3)), g.input("b", (2, 2))
    twice = gc.concat([a, a], 0)
    nested = gc.concat([gc.concat((a, b), 1), b * 2.0], axis=-1)
    assert gc.concat([a], 1) is a
    feeds = {"a": _random((2, 3), 1), "b": _random((2, 2), 2)}
    expected = [np.concatenate([feeds["a"]] * 2), np.concatenate([feeds["a"], feeds["b"], 2 * feeds["b"]], 1)]
    for got in (gc.evaluate([twice, nested], feeds, {}), gc.compile([twice, nested], {})(**feeds)):
        for g_value, e_value in zip(got, expected):
            np.testing.assert_array_equal(g_value, e_value)


def test_int32_tensors_concatenate_too():
    g = gc.Graph("labels")
    a, b = g.input("a", (3,), dtype="int32"), g.input("b", (2,), dtype="int32")
    y = gc.concat([a, b], 0)
    feeds = {"a": np.array([1, 2, 3], np.int32), "b": np.array([-4, 5], np.int32)}
    assert y.dtype == "int32"
    np.testing.assert_array_equal(gc.evaluate(y, feeds, {}), [1, 2, 3, -4, 5])
    np.testing.assert_array_equal(gc.compile(y, {})(**feeds), [1, 2, 3, -4, 5])


@pytest.mark.parametrize("shapes, axis", CONCAT_CASES[:7])
def test_concat_gradients_match_finite_differences(shapes, axis):
    rng = np.random.default_rng(1)
    values = {f"x{i}": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
    assert_gradients_match(lambda *xs: gc.tanh(gc.concat(list(xs), axis)), values)


def test_only_the_wanted_operands_get_a_slice():
    g = gc.Graph("concat")
    a, b = g.input("a", (2, 3)), g.param("b", (2, 4))
    (grad_b,) = gc.grad(gc.sum(gc.concat([a, b], 1) * 3.0), [b])
    assert grad_b.op == "slice" and grad_b.attrs == {"starts": (0, 3), "stops": (2, 7)}
    assert sum(node.op == "slice" for node in g.nodes) == 1


def test_concat_and_its_gradient_are_torch_cat():
    torch = pytest.importorskip("torch")
    shapes, axis = CONCAT_CASES[3]
    _, xs, y = _concat_graph(shapes, axis)
    values = [np.random.default_rng(i).standard_normal(shape) for i, shape in enumerate(shapes)]
    weights = np.random.default_rng(7).standard_normal(y.shape)
    loss = gc.sum(gc.tanh(y) * y.graph.input("w", y.shape))
    feeds = {**{f"x{i}": v for i, v in enumerate(values)}, "w": weights}
    got = gc.evaluate([y] + gc.grad(loss, xs), feeds, {}, dtype="float64")

    leaves = [torch.tensor(v, requires_grad=True) for v in values]
    cat = torch.cat(leaves, dim=axis)
    (torch.tanh(cat) * torch.tensor(weights)).sum().backward()
    np.testing.assert_array_equal(got[0], cat.detach().numpy())
    for ours, leaf in zip(got[1:], leaves):
        np.testing.assert_allclose(ours, leaf.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_a_densenet_block_trains_through_concat():
    """x -> h = relu(conv(x)) -> conv(concat([x, h], channels)): one SGD step, compiled, does what
    the reference's gradients say."""
    g = gc.Graph("dense block")
    x, labels = g.input("x", (4, 3, 6, 6)), g.input("y", (4,), dtype="int32")
    w1, w2 = g.param("w1", (5, 3, 3, 3)), g.param("w2", (3, 8, 1, 1))
    features = gc.concat([x, gc.relu(gc.conv2d(x, w1, padding="same"))], axis=1)
    logits = gc.mean(gc.conv2d(features, w2), axis=(2, 3))
    loss = gc.softmax_cross_entropy(logits, labels)
    params = gc.init_params(g, seed=0)
    feeds = {"x": _random((4, 3, 6, 6), seed=3), "y": np.array([0, 1, 2, 1], np.int32)}
    grads = gc.evaluate(gc.grad(loss, [w1, w2]), feeds, params)
    expected_loss = float(gc.evaluate(loss, feeds, params))
    expected = {name: params[name] - 0.1 * grad for name, grad in zip(("w1", "w2"), grads)}
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    assert step(**feeds) == pytest.approx(expected_loss, rel=1e-5)
    for name, value in expected.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-6)
    assert "concat" in step.describe()


# ---- refusals: each names the op and the line that asked -------------------------------------------


def _line_of_this_file(excinfo) -> int:
    """The innermost line of this file the exception passed through: the user's line."""
    line, tb = None, excinfo.tb
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == __file__:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def assert_refused(build, error, op, reason):
    with pytest.raises(error) as excinfo:
        build()
    message = str(excinfo.value)
    assert message.startswith(f"{op}:") and reason in message, message
    assert f"test_concat_leaky_relu.py:{_line_of_this_file(excinfo)})" in message, message


def _two_graphs():
    g, other = gc.Graph("g"), gc.Graph("other")
    return g.input("a", (2, 3)), g.input("b", (2, 5)), g.input("i", (2, 3), dtype="int32"), other.input("c", (2, 3))


@pytest.mark.parametrize("build, error, reason", [
    (lambda a, b, i, c: gc.concat([a, b], 0), gc.ShapeError,
     "operand 1's shape (2, 5) differs from operand 0's (2, 3) on an axis other than 0"),
    (lambda a, b, i, c: gc.concat([a, gc.reshape(b, (2, 5, 1))], 1), gc.ShapeError,
     "operand 1 is 3-D where operand 0 is 2-D"),
    (lambda a, b, i, c: gc.concat([a, i], 0), gc.ShapeError, "operand 1 is int32 where operand 0 is float32"),
    (lambda a, b, i, c: gc.concat([a, a.graph.input("d", (2, 3), dtype="float64")], 0), gc.ShapeError,
     "operand 1 is float64 where operand 0 is float32"),
    (lambda a, b, i, c: gc.concat([], 0), gc.ShapeError, "needs at least one tensor"),
    (lambda a, b, i, c: gc.concat([a, b], 2), gc.ShapeError, "axis 2 out of range for 2-D tensors"),
    (lambda a, b, i, c: gc.concat([a, b], -3), gc.ShapeError, "axis -3 out of range"),
    (lambda a, b, i, c: gc.concat([a, b], 1.0), TypeError, "axis must be an int"),
    (lambda a, b, i, c: gc.concat([a, b], True), TypeError, "axis must be an int"),
    (lambda a, b, i, c: gc.concat([a, c], 0), gc.ShapeError, "operands belong to different graphs"),
    (lambda a, b, i, c: gc.concat(a, 0), gc.ShapeError, "takes a list or tuple of tensors, got Tensor"),
    (lambda a, b, i, c: gc.concat([a, np.ones((2, 3))], 0), gc.ShapeError, "operand 1 is a ndarray"),
    (lambda a, b, i, c: gc.concat([gc.sum(a), gc.sum(a)], 0), gc.ShapeError, "cannot concatenate 0-D tensors"),
])
def test_bad_concats_are_refused_naming_op_and_line(build, error, reason):
    assert_refused(lambda: build(*_two_graphs()), error, "concat", reason)


@pytest.mark.parametrize("slope, error, reason", [
    ("0.1", TypeError, "negative_slope must be a number, got '0.1'"),
    (True, TypeError, "negative_slope must be a number, got True"),
    (None, TypeError, "negative_slope must be a number"),
    (float("nan"), ValueError, "negative_slope must be finite"),
    (float("inf"), ValueError, "negative_slope must be finite"),
])
def test_bad_slopes_are_refused_naming_op_and_line(slope, error, reason):
    x = gc.Graph("g").input("x", (3,))
    assert_refused(lambda: gc.leaky_relu(x, slope), error, "leaky_relu", reason)


def test_leaky_relu_of_labels_is_refused_naming_op_and_line():
    labels = gc.Graph("g").input("y", (3,), dtype="int32")
    assert_refused(lambda: gc.leaky_relu(labels), gc.ShapeError, "leaky_relu", "needs float operands, got int32")


# ---- leaky_relu --------------------------------------------------------------------------------

SIGNED = np.array([-3.0, -0.5, -1e-30, 0.0, 1e-30, 0.25, 2.0])


@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0, 0.7, 1.5, -0.3])
def test_leaky_relu_values_and_gradient_at_both_signs(slope):
    """x where x > 0, slope·x elsewhere; its gradient 1 where x > 0, slope elsewhere (at 0 too,
    as torch's backward), from the reference in float64 and compiled in float32: exact for a
    slope in [0, 1], within an ulp for others (whose x·(slope + (1 - slope)) may round)."""
    g = gc.Graph("leaky")
    x = g.param("x", SIGNED.shape)
    y = gc.leaky_relu(x, negative_slope=slope)
    (dx,) = gc.grad(gc.sum(y), [x])
    expected_y = np.where(SIGNED > 0, SIGNED, slope * SIGNED)
    expected_dx = np.where(SIGNED > 0, 1.0, slope)
    ulps = 0 if 0 <= slope <= 1 else 1
    got_y, got_dx = gc.evaluate([y, dx], {}, {"x": SIGNED}, dtype="float64")
    np.testing.assert_array_max_ulp(got_y, expected_y, maxulp=ulps)
    np.testing.assert_array_max_ulp(got_dx, expected_dx, maxulp=ulps)
    x32 = SIGNED.astype(np.float32)
    compiled_y, compiled_dx = gc.compile([y, dx], {"x": x32})()
    np.testing.assert_array_max_ulp(compiled_y, np.where(x32 > 0, x32, np.float32(slope) * x32), maxulp=ulps)
    np.testing.assert_array_max_ulp(compiled_dx, expected_dx.astype(np.float32), maxulp=ulps)


def test_leaky_relu_gradients_match_finite_differences():
    x = away_from_zero(np.random.default_rng(2).standard_normal((4, 5)))
    assert_gradients_match(lambda t: gc.leaky_relu(t * 1.5, 0.2), {"x": x})
    assert_gradients_match(lambda t: gc.leaky_relu(t), {"x": x})


def test_slope_zero_is_relu_and_slope_one_the_identity():
    x = gc.Graph("g").input("x", (3, 4))
    assert gc.leaky_relu(x, 0.0).attrs["expr"] == gc.relu(x).attrs["expr"]
    assert gc.leaky_relu(x, 0).attrs["expr"] == gc.relu(x).attrs["expr"]
    assert gc.leaky_relu(x, np.float32(1.0)) is x


def test_leaky_relu_is_torchs():
    """Values and gradients bit for bit, in float64 (reference) and float32 (compiled)."""
    torch = pytest.importorskip("torch")
    values = np.concatenate([SIGNED, np.random.default_rng(4).standard_normal(200) * 10])
    for slope in (0.01, 0.2, 3.0):
        g = gc.Graph("leaky")
        x = g.param("x", values.shape)
        weights = g.input("w", values.shape)
        y = gc.leaky_relu(x, slope)
        (dx,) = gc.grad(gc.sum(y * weights), [x])
        w = np.random.default_rng(5).standard_normal(values.shape)

        leaf = torch.tensor(values, requires_grad=True)
        expected = torch.nn.functional.leaky_relu(leaf, slope)
        (expected * torch.tensor(w)).sum().backward()
        got_y, got_dx = gc.evaluate([y, dx], {"w": w}, {"x": values}, dtype="float64")
        np.testing.assert_array_equal(got_y, expected.detach().numpy())
        np.testing.assert_array_equal(got_dx, leaf.grad.numpy())

        leaf32 = torch.tensor(values.astype(np.float32), requires_grad=True)
        expected32 = torch.nn.functional.leaky_relu(leaf32, slope)
        (expected32 * torch.tensor(w.astype(np.float32))).sum().backward()
        compiled_y, compiled_dx = gc.compile([y, dx], {"x": values.astype(np.float32)})(w=w.astype(np.float32))
        np.testing.assert_array_equal(compiled_y, expected32.detach().numpy())
        np.testing.assert_array_equal(compiled_dx, leaf32.grad.numpy())


def test_leaky_relu_fuses_with_its_neighbours():
    """Like relu: one kernel with the elementwise ops around it, a GEMM's epilogue, and its
    backward (written on its output) a pooling gradient's epilogue."""
    g = gc.Graph("leaky")
    v = g.input("v", (5, 7))
    chain = gc.compile([gc.leaky_relu(v * 2.0 + 1.0) * 3.0], {})
    assert [step.label for step in chain.steps] == ["ew"]
    gemm = gc.compile([gc.leaky_relu(v @ gc.transpose(g.param("m", (3, 7))), 0.2)], {"m": _random((3, 7))})
    assert [step.label for step in gemm.steps] == ["gemm+ew"]

    x, w = g.input("x", (3, 2, 8, 8)), g.param("w", (4, 2, 3, 3))
    h = gc.leaky_relu(gc.conv2d(x, w, padding="same"), 0.1)
    pooled = gc.max_pool2d(h, 2)
    loss = gc.sum(pooled * pooled)
    params = {"w": _random((4, 2, 3, 3), seed=6)}
    feeds = {"x": _random((3, 2, 8, 8), seed=7)}
    fn = gc.compile(gc.grad(loss, w), params)
    assert "max_pool2d_grad+ew" in [step.label for step in fn.steps]
    expected = gc.evaluate(gc.grad(loss, w), feeds, params)
    np.testing.assert_allclose(fn(**feeds), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
