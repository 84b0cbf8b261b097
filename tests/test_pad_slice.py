"""gc.pad (np.pad with a constant) and its adjoint, slice: numpy semantics, gradients against
finite differences in float64, compiled kernels against the reference bit for bit (they only
move values), on 1-3 threads, and in a training step."""
import numpy as np
import pytest
from core_oracles import assert_gradients_match

import graphc as gc
from graphc.core.ops import slice_

CASES = [   # shape, pad_width
    ((7,), ((2, 3),)),
    ((3, 5), ((0, 1), (2, 0))),
    ((2, 3, 4, 5), ((0, 0), (0, 0), (1, 1), (2, 2))),     # a conv's "same" padding
    ((2, 3, 4, 37), ((1, 0), (0, 2), (3, 1), (5, 11))),   # rows over several vectors, odd tails
    ((1, 1, 1), ((0, 0), (4, 0), (0, 0))),
]


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("shape, widths", CASES)
def test_pad_is_numpys_constant_pad_and_slice_takes_it_back(shape, widths):
    g = gc.Graph("pad")
    x = g.input("x", shape)
    padded = gc.pad(x, widths, value=-1.5)
    back = slice_(padded, [b for b, _ in widths], [b + d for (b, _), d in zip(widths, shape)])
    value = _random(shape)
    got_padded, got_back = gc.evaluate([padded, back], {"x": value}, {})
    np.testing.assert_array_equal(got_padded, np.pad(value, widths, constant_values=-1.5))
    np.testing.assert_array_equal(got_back, value)


@pytest.mark.parametrize("shape, widths", CASES[:4])
def test_gradients_match_finite_differences(shape, widths):
    rng = np.random.default_rng(1)
    assert_gradients_match(lambda x: gc.tanh(gc.pad(x, widths, value=0.5)), {"x": rng.standard_normal(shape)})
    starts = [b for b, _ in widths]
    stops = [s + d for s, d in zip(starts, shape)]
    padded_shape = [d + b + a for d, (b, a) in zip(shape, widths)]
    assert_gradients_match(lambda x: gc.tanh(slice_(x, starts, stops)), {"x": rng.standard_normal(padded_shape)})


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape, widths", CASES)
def test_compiled_pad_and_slice_match_the_reference_exactly(splitting_pays, shape, widths, threads):
    g = gc.Graph("pad")
    x = g.input("x", shape)
    padded = gc.pad(x, widths, value=2.0)
    starts = [1 if d > 2 else 0 for d in padded.shape]           # a box inside the padded tensor
    stops = [d - 1 if d > 2 else d for d in padded.shape]
    inner = slice_(padded * 3.0, starts, stops)
    value = _random(shape, seed=2)
    expected = gc.evaluate([padded, inner], {"x": value}, {})
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        fn = gc.compile([padded, inner], {})
        got = fn(x=value)
    finally:
        gc.set_num_threads(previous)
    for g_value, e_value in zip(got, expected):
        np.testing.assert_array_equal(g_value, e_value)
    assert "pad" in fn.describe() and "slice" in fn.describe()


def test_a_step_trains_through_padding():
    """A conv on an explicitly padded image computes what the conv's own padding does."""
    g = gc.Graph("padded conv")
    x, y = g.input("x", (4, 1, 6, 6)), g.input("y", (4,), dtype="int32")
    w = g.param("w", (3, 1, 3, 3))
    logits = gc.mean(gc.conv2d(gc.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), w), axis=(2, 3))
    loss = gc.softmax_cross_entropy(logits, y)
    params = gc.init_params(g, seed=0)
    feeds = {"x": _random((4, 1, 6, 6), seed=3), "y": np.array([0, 1, 2, 1], np.int32)}
    grad_w = gc.evaluate(gc.grad(loss, [w]), feeds, params)[0]
    expected_loss = float(gc.evaluate(loss, feeds, params))
    expected_w = params["w"] - 0.1 * grad_w
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    assert step(**feeds) == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(params["w"], expected_w, rtol=1e-5, atol=1e-6)
    assert "pad" in step.describe()


@pytest.mark.parametrize("widths, error", [
    (((1, 1),), r"one \(before, after\) pair per axis of a 2-D tensor"),
    (((1, 1), (1,)), "pair of ints >= 0"),
    (((1, 1), (-1, 0)), "pair of ints >= 0"),
    (((1, 1), (0.5, 0)), "must be a tuple of ints"),
    ("12", "one .before, after. pair per axis"),
])
def test_bad_pad_widths_are_refused_naming_the_problem(widths, error):
    g = gc.Graph("pad")
    x = g.input("x", (2, 3))
    with pytest.raises((ValueError, TypeError), match=error):
        gc.pad(x, widths)
    with pytest.raises(TypeError, match="pad: value must be a number"):
        gc.pad(x, ((1, 1), (0, 0)), value="zero")
    with pytest.raises(gc.ShapeError, match="slice"):
        slice_(x, (0, 0), (3, 3))
    with pytest.raises(gc.ShapeError, match="pads float tensors, got int32"):
        gc.pad(g.input("labels", (2,), dtype="int32"), ((1, 1),))
