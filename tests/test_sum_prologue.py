"""A sum of an elementwise expression is one kernel: the expression is evaluated as the sum reads
it (its prologue), never stored. Batch norm's statistics and its backward are such sums."""
import numpy as np
import pytest

import graphc as gc


def compiled_and_reference(build, shapes, seed=0):
    g = gc.Graph()
    tensors = [g.input(f"a{i}", shape) for i, shape in enumerate(shapes)]
    out = build(*tensors)
    rng = np.random.default_rng(seed)
    feeds = {f"a{i}": rng.normal(size=shape).astype(np.float32) for i, shape in enumerate(shapes)}
    fn = gc.compile(out, {})
    exact = gc.evaluate(out, feeds, {}, dtype="float64")
    return fn, fn(**feeds), exact


CASES = {
    # name: (build, operand shapes)
    "per-channel statistics of NCHW": (lambda x, m: gc.sum((x - m) * (x - m), axis=(0, 2, 3), keepdims=True),
                                       [(4, 5, 7, 3), (1, 5, 1, 1)]),
    "product over rows, odd length": (lambda a, b: gc.sum(a * b, axis=1), [(6, 37), (6, 37)]),
    "nonzero at zero, partial vectors": (lambda a: gc.sum(gc.exp(a * 0.1), axis=-1), [(3, 13)]),
    "a total with a scalar inside": (lambda a, s: gc.sum(gc.tanh(a * s) + 1.0), [(11, 9), (1,)]),
    "backward-style three operands": (lambda g, c, s: gc.sum(g * c * s, axis=(0, 2, 3), keepdims=True),
                                      [(2, 3, 5, 5), (2, 3, 5, 5), (1, 3, 1, 1)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_sum_matches_float64(case):
    build, shapes = CASES[case]
    fn, got, exact = compiled_and_reference(build, shapes)
    assert any(step.label == "sum+ew" for step in fn.steps), [s.label for s in fn.steps]
    scale = np.abs(exact).max() + 1
    np.testing.assert_allclose(got, exact, rtol=2e-5, atol=2e-6 * scale)


def test_a_large_fused_total_split_across_threads(splitting_pays):
    fn, got, exact = compiled_and_reference(lambda a, b: gc.sum(a * b + a), [(300, 257), (300, 257)])
    assert any(step.label == "sum+ew" for step in fn.steps)
    assert fn.num_threads == 2
    np.testing.assert_allclose(got, exact, rtol=1e-4)


def test_a_product_read_elsewhere_is_stored_not_fused():
    g = gc.Graph()
    a = g.input("a", (4, 8))
    product = a * a
    fn = gc.compile([gc.sum(product, axis=1), product], {})
    assert "sum+ew" not in [step.label for step in fn.steps]


def test_column_sums_keep_their_own_kernel():
    # the bias gradient of `linear` sums rows of an (N, C) matrix: a column sum, not fused yet
    fn, got, exact = compiled_and_reference(lambda a, b: gc.sum(a * b, axis=0), [(9, 20), (9, 20)])
    assert "sum+ew" not in [step.label for step in fn.steps]
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_and_backward_use_fused_sums():
    g = gc.Graph()
    x = g.input("x", (8, 4, 6, 6))
    y = gc.batch_norm(x, None, None, g.buffer("rm", (4,)), g.buffer("rv", (4,), init=1.0))
    loss = gc.sum(y * g.constant(np.linspace(-1, 1, 8 * 4 * 36).reshape(8, 4, 6, 6)))
    dx = gc.grad(loss, [x])[0]
    fn = gc.compile(dx, gc.init_params(g))
    members = [label for s in fn.steps for label in s.label.split("&")]
    assert members.count("sum+ew") >= 2, [s.label for s in fn.steps]
    # the backward pass's Σdy and Σdy·(x - mean) read dy once, in one kernel
    assert any("&" in s.label and "sum+ew" in s.label for s in fn.steps), [s.label for s in fn.steps]
    xv = np.random.default_rng(1).normal(3, 2, size=(8, 4, 6, 6)).astype(np.float32)
    exact = gc.evaluate(dx, {"x": xv}, gc.init_params(g), dtype="float64")
    np.testing.assert_allclose(fn(x=xv), exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize("channels", [4, 600])   # per-channel totals on the stack, or one output at a time
def test_row_sums_reading_one_tensor_share_one_pass(channels):
    g = gc.Graph()
    a, b = g.input("a", (3, channels, 2, 5)), g.input("b", (3, channels, 2, 5))
    c = g.input("c", (1, channels, 1, 1))
    axes = (0, 2, 3)
    outputs = [gc.sum(a, axis=axes), gc.sum(a * b, axis=axes), gc.sum((a - c) * (a - c), axis=axes)]
    fn = gc.compile([out * 1.5 for out in outputs], {})
    assert "sum&sum+ew&sum+ew" in [step.label for step in fn.steps]
    rng = np.random.default_rng(3)
    feeds = {name: rng.standard_normal(node.shape).astype(np.float32) for name, node in g.inputs.items()}
    for got, exact in zip(fn(**feeds), gc.evaluate([out * 1.5 for out in outputs], feeds, {}, dtype="float64")):
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)


def test_a_sum_that_reads_another_stays_in_its_own_pass():
    g = gc.Graph()
    a = g.input("a", (3, 4, 2, 5))
    total = gc.sum(a, axis=(0, 2, 3), keepdims=True)
    fn = gc.compile([gc.sum((a - total) * (a - total), axis=(0, 2, 3)) * 1.5], {})
    assert not any("&" in step.label for step in fn.steps)
