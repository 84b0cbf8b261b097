"""Per-channel sums computed by the conv kernels as they write each sample (kernels/conv/channel_sums.py),
on every forward and input-gradient path, and their place in the lowering (batch norm's statistics)."""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import compile_kernels, conv_output_shape, random, reference, relative_error, run_kernel, RTOL

import graphc as gc
from graphc.backend.kernels.conv import FORWARD_PATHS, INPUT_GRAD_PATHS, ConvGeometry
from graphc.backend.kernels.conv.channel_sums import ChannelSums
from graphc.backend.kernels.conv.input_grad import _DxEpilogue
from graphc.backend.kernels.reduce import Prologue
from graphc.backend.llvm import target
from graphc.core.scalar import Step, symbol

x0, x1, x2 = symbol(0), symbol(1), symbol(2)
RELU_BACKWARD = x0 * Step(x1)

# (x_shape, w_shape, stride, padding): between them every forward and input-gradient path
# (pixels and channels in lanes, by phases, cols, batch in lanes, Winograd 2x2 and 4x4).
GRID = [
    ((3, 5, 12, 30), (6, 5, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 3, 9, 13), (24, 3, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((3, 8, 5, 30), (16, 8, 3, 1), (2, 1), ((1, 1), (0, 0))),
    ((2, 3, 12, 14), (5, 3, 3, 3), (2, 2), ((1, 1), (1, 1))),
    ((40, 6, 14, 14), (16, 6, 5, 5), (1, 1), ((0, 0), (0, 0))),
    ((3, 6, 8, 10), (4, 6, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 16, 32), (9, 8, 3, 3), (1, 1), ((1, 1), (1, 1))),
]


def _sums(result_shape, first_input: int) -> ChannelSums:
    """Three members over the result r (input `first_input` on: z, mean, scale): Σr,
    Σz·(r - mean) with a per-channel mean, Σr·scale with one scale; and Σ(r - m)², m = Σr / count."""
    batch, channels, height, width = result_shape
    zi, mi, si = first_input, first_input + 1, first_input + 2
    return ChannelSums(batch, channels, height * width, (
        (Prologue(x0, ("full",)), (None,)),
        (Prologue(x2 * (x0 - x1), ("full", "per_output", "full")), (None, mi, zi)),
        (Prologue(x0 * x1, ("full", "scalar")), (None, si)),
    ), outputs=first_input + 3, centered=((0, x0 / (batch * height * width)),))


def _operands(rng, result_shape):
    z = random(rng, result_shape)
    mean = random(rng, (1, result_shape[1], 1, 1))
    scale = np.array([1.5], np.float32)
    outputs = [np.full((1, result_shape[1], 1, 1), np.nan, np.float32) for _ in range(4)]
    return [z, mean, scale], outputs


def _check_sums(result, operands, outputs, label):
    z, mean, scale = (a.astype(np.float64) for a in operands)
    r = result.astype(np.float64)
    centered = r - r.mean(axis=(0, 2, 3), keepdims=True)
    terms = [r, z * (r - mean), r * scale[0], centered * centered]
    for k, (term, got) in enumerate(zip(terms, outputs)):
        expected = term.sum(axis=(0, 2, 3))
        bound = 1e-5 * np.abs(term).sum(axis=(0, 2, 3)) + 1e-30
        assert np.all(np.abs(got.ravel() - expected) <= bound), (label, k, got.ravel(), expected)


def _run_paths(rng, paths, compiled, conv_inputs, expected):
    """Each path's kernel on 1-3 threads: its result, then its sums (fresh operands each run)."""
    engine, kernels = compiled
    for path, kernel in zip(paths, kernels):
        for nthreads in (1, 2, 3):
            operands, outputs = _operands(rng, expected.shape)
            got = run_kernel(engine, kernel, conv_inputs + operands + outputs, expected.shape, nthreads)
            assert relative_error(got, expected) <= RTOL, (path.name, nthreads)
            _check_sums(got, operands, outputs, (path.name, nthreads))


def _paths(paths, geometry):
    return [path for path in paths if path.possible(geometry, target.vector_width_f32())]


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", GRID)
def test_forward_paths_sum_their_result(x_shape, w_shape, stride, padding, offset):
    """out = conv2d(x, w) + bias, relu, and its sums, on every forward path that applies, 1-3
    threads, output and scratch starting as NaN. With a bias of 1e4 the variance about the
    mean still holds to 1e-5 of itself (Σy² - (Σy)²/n would lose it all in float32)."""
    rng = np.random.default_rng(5)
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    x, w, b = random(rng, x_shape), random(rng, w_shape), random(rng, (w_shape[0],)) + np.float32(offset)
    y_shape = conv_output_shape(x_shape, w_shape, stride, padding)
    attrs = dict(stride=stride, padding=padding)
    expected = np.maximum(reference("conv2d", [x, w], y_shape, **attrs) + b.reshape(1, -1, 1, 1), 0)
    sums = _sums(y_shape, 3)
    paths = _paths(FORWARD_PATHS, geometry)
    emitters = [
        lambda m, n, path=path: sums.wrap(m, n, path.emit(
            m, n, geometry, bias=True, relu=True, max_threads=3, after_sample=sums.after_sample,
            n_inputs=sums.inputs))
        for path in paths]
    _run_paths(rng, paths, compile_kernels(emitters), [x, w, b], expected)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", GRID)
def test_input_gradient_paths_sum_their_result(x_shape, w_shape, stride, padding):
    """dx with ReLU's backward fused, then its sums, on every input-gradient path that
    applies, 1-3 threads."""
    rng = np.random.default_rng(6)
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    g, w = random(rng, conv_output_shape(x_shape, w_shape, stride, padding)), random(rng, w_shape)
    after_relu = np.maximum(random(rng, x_shape), 0)
    attrs = dict(stride=stride, padding=padding)
    expected = reference("conv2d_input_grad", [g, w], x_shape, x_shape=x_shape, **attrs) * (after_relu > 0)
    sums = _sums(x_shape, 3)
    paths = _paths(INPUT_GRAD_PATHS, geometry)
    emitters = [
        lambda m, n, path=path: sums.wrap(m, n, path.emit(
            m, n, geometry, max_threads=3, epilogue=_DxEpilogue(RELU_BACKWARD, 1, sums)))
        for path in paths]
    _run_paths(rng, paths, compile_kernels(emitters), [g, w, after_relu], expected)


def test_batch_norm_statistics_and_backward_sums_ride_on_the_convolutions():
    """In conv -> BN -> ReLU -> conv, the forward's Σx and Σ(x - mean)² and the backward's Σdy,
    Σdy·(x - mean) are computed by the conv kernels; the gradients still match the float64
    reference."""
    rng = np.random.default_rng(7)
    g = gc.Graph()
    x = g.input("x", (4, 3, 8, 8))
    w1, w2 = g.param("w1", (8, 3, 3, 3)), g.param("w2", (8, 8, 3, 3))
    gamma, beta = g.param("gamma", (8,), init=1.0), g.param("beta", (8,), init=0.0)
    mean, var = g.buffer("mean", (8,), init=0.0), g.buffer("var", (8,), init=1.0)
    h = gc.relu(gc.batch_norm(gc.conv2d(x, w1, padding=1), gamma, beta, mean, var, training=True))
    out = gc.conv2d(h, w2, padding=1)
    loss = gc.mean(out * out)
    grads = gc.grad(loss, [w1, gamma, beta])
    params = gc.init_params(g, seed=1)
    params["gamma"][:] = rng.uniform(0.5, 1.5, 8)
    xv = rng.normal(size=(4, 3, 8, 8)).astype(np.float32)
    expected = gc.evaluate(grads, {"x": xv}, {k: v.copy() for k, v in params.items()}, dtype="float64")
    fn = gc.compile(grads, params)
    labels = [line.split()[1] for line in fn.describe().splitlines()[1:]]
    assert "conv2d&sum&sum+ew" in labels, labels   # Σx, then the variance about its mean
    assert any(label.startswith("conv2d_input_grad") and label.endswith("&sum&sum+ew") for label in labels), labels
    assert not any(label.startswith("sum") for label in labels), labels
    for actual, exact in zip(fn(x=xv), expected):
        np.testing.assert_allclose(actual, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
