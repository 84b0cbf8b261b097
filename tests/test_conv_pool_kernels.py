"""Native conv2d / pooling kernels against the numpy reference ops.

Every kernel of a test goes into one LLVM module, compiled once. Each kernel then runs with
one thread and with two threads called concurrently from Python (ctypes releases the GIL),
with a barrier between phases as the program entry has. Output and scratch start as NaN so
a kernel that reads either before writing it fails.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from kernel_cases import (MAX_THREADS, RTOL, Case, check_cases, compile_kernels, conv_output_shape, random, reference,
                          relative_error, run_kernel)

from graphc.backend.kernels import conv as conv_kernels
from graphc.backend.kernels.conv import (FORWARD_PATHS, INPUT_GRAD_PATHS, WEIGHT_GRAD_PATHS, ConvGeometry, emit_conv2d,
                                         emit_conv2d_input_grad, emit_conv2d_weight_grad)
from graphc.backend.kernels.pool import emit_avg_pool2d, emit_avg_pool2d_grad, emit_max_pool2d, emit_max_pool2d_grad
from graphc.backend.llvm import target
from graphc.core.scalar import Step, symbol

# A fused epilogue like ReLU's backward, but not idempotent: applied twice, it would show.
EPILOGUE = 2 * symbol(0) * Step(symbol(1)) + symbol(1)


# ---------------------------------------------------------------------------- conv cases

def same_padding(kernel):
    """PyTorch's "same" padding: the odd cell of an even kernel goes after."""
    return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)


PADDINGS = {
    "0": lambda k: ((0, 0), (0, 0)),
    "1": lambda k: ((1, 1), (1, 1)),
    "(1,2)": lambda k: ((1, 1), (2, 2)),
    "same": same_padding,
    "full": lambda k: ((k[0] - 1,) * 2, (k[1] - 1,) * 2),
}
KERNELS = [(1, 1), (3, 3), (5, 5), (2, 3)]
STRIDES = [(1, 1), (2, 2), (2, 1)]
IMAGES = [(7, 8), (8, 7), (9, 9), (6, 10)]     # odd and even H and W


def conv_grid():
    """(x_shape, w_shape, stride, padding): every kernel with every padding mode, the other
    dimensions cycling so that each stride, image shape, batch 1/3 and C 1/3 all occur."""
    grid = []
    for index, (kernel, (mode, padding_of)) in enumerate(
            (k, p) for k in KERNELS for p in PADDINGS.items()):
        stride = (1, 1) if mode == "same" else STRIDES[index % 3]
        h, w = IMAGES[index % 4]
        batch, channels, out_channels = (1, 3, 4) if index % 2 else (3, 1, 5)
        grid.append(((batch, channels, h, w), (out_channels, channels) + kernel, stride,
                     padding_of(kernel)))
    grid += [
        ((2, 3, 6, 6), (4, 3, 3, 3), (1, 1), ((3, 3), (3, 3))),      # more padding than "full"
        ((2, 2, 7, 9), (3, 2, 3, 3), (3, 3), ((0, 0), (0, 0))),      # unused rows and columns
        ((2, 3, 8, 8), (5, 3, 1, 1), (2, 2), ((0, 0), (0, 0))),      # 1x1 strided
        ((3, 4, 5, 6), (1, 4, 1, 1), (1, 1), ((0, 0), (0, 0))),      # pointwise, one channel out
        ((2, 2, 5, 4), (3, 2, 2, 3), (1, 2), ((0, 1), (2, 0))),      # asymmetric everything
        ((1, 2, 5, 19), (3, 2, 3, 3), (1, 1), ((1, 1), (1, 1))),     # rows of several vectors
        ((1, 2, 1, 8), (2, 2, 1, 1), (2, 1), ((1, 0), (0, 0))),      # a strided phase with taps, no pixels
    ]
    return grid


@dataclasses.dataclass
class ConvArrays:
    """A conv2d's inputs, expected outputs and epilogue (bias and relu alternate with the
    index, so that both epilogues and the plain product are covered)."""

    label: str
    bias: bool
    relu: bool
    forward_inputs: list
    y: np.ndarray
    input_grad_inputs: list
    dx: np.ndarray
    weight_grad_inputs: list
    dw: np.ndarray

    @classmethod
    def make(cls, x_shape, w_shape, stride, padding, rng, index):
        x, w = random(rng, x_shape), random(rng, w_shape)
        attrs = dict(stride=stride, padding=padding)
        y_shape = conv_output_shape(x_shape, w_shape, stride, padding)
        bias, relu = index % 2 == 0, index % 3 != 1
        b = random(rng, w_shape[:1])
        y = reference("conv2d", [x, w], y_shape, **attrs)
        if bias:
            y = y + b[None, :, None, None]
        if relu:
            y = np.maximum(y, 0)
        g = random(rng, y_shape)
        return cls(f"x={x_shape} w={w_shape} stride={stride} padding={padding}", bias, relu,
                   [x, w, b] if bias else [x, w], y, [g, w],
                   reference("conv2d_input_grad", [g, w], x_shape, x_shape=x_shape, **attrs),
                   [x, g], reference("conv2d_weight_grad", [x, g], w_shape, w_shape=w_shape,
                                     **attrs))


def conv_cases(x_shape, w_shape, stride, padding, rng, index):
    """The three kernels, each the way the public emitters choose."""
    a = ConvArrays.make(x_shape, w_shape, stride, padding, rng, index)
    y_shape = a.y.shape
    return [
        Case(f"conv2d bias={a.bias} relu={a.relu} {a.label}",
             lambda m, n: emit_conv2d(m, n, x_shape, w_shape, stride, padding, bias=a.bias,
                                      relu=a.relu, max_threads=MAX_THREADS),
             a.forward_inputs, a.y),
        Case(f"conv2d_input_grad {a.label}",
             lambda m, n: emit_conv2d_input_grad(m, n, y_shape, w_shape, x_shape, stride, padding,
                                                 max_threads=MAX_THREADS),
             a.input_grad_inputs, a.dx),
        Case(f"conv2d_weight_grad {a.label}",
             lambda m, n: emit_conv2d_weight_grad(m, n, x_shape, y_shape, w_shape, stride, padding,
                                                  max_threads=MAX_THREADS),
             a.weight_grad_inputs, a.dw),
    ]


def path_cases(kind, x_shape, w_shape, stride, padding, rng, index):
    """One kernel (`kind`: "forward", "input_grad" or "weight_grad") once per path of
    conv_kernels that applies to the geometry, whichever the cost model would choose."""
    a = ConvArrays.make(x_shape, w_shape, stride, padding, rng, index)
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    paths = {"forward": FORWARD_PATHS, "input_grad": INPUT_GRAD_PATHS,
             "weight_grad": WEIGHT_GRAD_PATHS}[kind]
    options = dict(bias=a.bias, relu=a.relu) if kind == "forward" else {}
    inputs, expected = {"forward": (a.forward_inputs, a.y),
                        "input_grad": (a.input_grad_inputs, a.dx),
                        "weight_grad": (a.weight_grad_inputs, a.dw)}[kind]
    return [Case(f"{kind} [{path.name}] {options} {a.label}",
                 lambda m, n, path=path: path.emit(m, n, geometry, max_threads=MAX_THREADS,
                                                   **options),
                 inputs, expected)
            for path in paths if path.possible(geometry, target.vector_width_f32())]


def test_conv_kernels_match_reference():
    rng = np.random.default_rng(0)
    cases = [case for index, geometry in enumerate(conv_grid())
             for case in conv_cases(*geometry, rng, index)]
    check_cases(cases)


# Shapes aimed at the edges of each path (vector width 8; 16 with AVX-512 shifts some).
PATH_GRID = [
    # Pixels in lanes: output rows of one vector (8), a pair with its vectors 6 apart (14),
    # a pair + one vector (20), a pair + an overlapping pair (28), several pairs (30);
    # 1, 6, 7 (4 + 3) and 13 (5 + 4 + 4) channels; stride 2 along the height only.
    ((3, 3, 5, 8), (13, 3, 3, 1), (2, 1), ((1, 1), (0, 0))),
    ((2, 2, 4, 14), (1, 2, 2, 3), (1, 1), ((0, 0), (1, 1))),
    ((1, 2, 6, 20), (7, 2, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 1, 9, 28), (6, 1, 5, 5), (1, 1), ((2, 2), (2, 2))),            # LeNet's conv1
    ((2, 5, 12, 30), (6, 5, 3, 3), (1, 1), ((1, 1), (1, 1))),
    # GEMM + col2im: LeNet's conv2 (100 pixels: 6 pairs + 1 vector, 25 taps in 5 tiles of
    # 5); 9 input channels; a padded, even, asymmetric kernel; 8 pixels exactly.
    ((2, 6, 14, 14), (16, 6, 5, 5), (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 7, 7), (3, 9, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 4, 9, 11), (5, 4, 4, 4), (1, 1), ((3, 2), (1, 3))),
    ((2, 3, 4, 5), (2, 3, 3, 2), (1, 1), ((1, 1), (0, 1))),
    # Channels in lanes: 9, 17 and 24 channels (a group of 2 vectors + 1), taps and pixels
    # in tiles with a shorter last one, strides in h and w.
    ((2, 3, 9, 13), (24, 3, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 17, 6, 7), (9, 17, 2, 2), (1, 1), ((0, 0), (0, 0))),
    ((3, 8, 5, 30), (16, 8, 3, 1), (2, 1), ((1, 1), (0, 0))),
    ((1, 2, 4, 25), (8, 2, 1, 5), (1, 3), ((0, 0), (2, 2))),
    # By phases (strided input gradients): rows of 6 and 7 (a last tile overlapping the one
    # before it); a 1x1 kernel, whose other phases have no taps; 17 channels, stride 2 x 3,
    # an asymmetric kernel and padding; stride 2 along the height only.
    ((2, 3, 12, 14), (5, 3, 3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 4, 13, 24), (3, 4, 1, 1), (2, 2), ((0, 0), (0, 0))),
    ((1, 17, 7, 20), (9, 17, 3, 2), (2, 3), ((1, 0), (2, 1))),
    ((2, 2, 9, 8), (4, 2, 3, 3), (2, 1), ((1, 1), (1, 1))),
    # Winograd (3x3, stride 1, even outputs): rows of 6 tiles (vectors of 4, the last one
    # overlapping with 8 or 16 lanes); 20 tiles (16 + an overlapping 16); a chunk of
    # several rows of 2 tiles; no padding; padding only below and on the left; 17 and 13
    # channels (groups of 6 rows: 6 + 6 + 5 and 5 + 4 + 4).
    ((2, 5, 8, 12), (7, 5, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 17, 6, 40), (13, 17, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((3, 4, 16, 4), (6, 4, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 3, 10, 14), (17, 3, 3, 3), (1, 1), ((0, 0), (0, 0))),
    ((2, 6, 9, 11), (5, 6, 3, 3), (1, 1), ((0, 1), (1, 0))),
    # Several chunks of tile rows a sample (4 of 2 rows with 16 lanes, 8 of 1 row for the
    # weight gradient); 4x4 tiles too (8 a row).
    ((2, 8, 16, 32), (4, 8, 3, 3), (1, 1), ((1, 1), (1, 1))),
    # 4x4 tiles (8 input channels at least): 16 a row (vectors of 8 with 16 lanes, of 4
    # otherwise); 12 a row (vectors of 4); 6 a row (vectors of 4, the last overlapping); no
    # padding (x copied anyway: F4 reads past a row's end).
    ((1, 8, 8, 64), (5, 8, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 8, 48), (8, 9, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 8, 8, 24), (4, 8, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 18, 34), (3, 8, 3, 3), (1, 1), ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("kind", ["forward", "input_grad", "weight_grad"])
def test_every_conv_path_matches_reference(kind):
    """Each path of each kernel on the whole grid and PATH_GRID, where it applies."""
    rng = np.random.default_rng(3)
    cases = [case for index, geometry in enumerate(conv_grid() + PATH_GRID)
             for case in path_cases(kind, *geometry, rng, index)]
    check_cases(cases)


def test_conv_kernels_in_blocks_match_reference(monkeypatch):
    """The channels-in-lanes forward sums large reductions a block of steps at a time, and
    the weight gradient a block of pixels at a time; small blocks make these small cases
    do so too: several blocks and a shorter last one, whose first and last apply
    differently (start from zero; bias and relu)."""
    monkeypatch.setattr(conv_kernels.forward, "_MAX_K_UNSPLIT", 20)
    monkeypatch.setattr(conv_kernels.forward, "_MAX_K_BLOCK", 20)
    monkeypatch.setattr(conv_kernels.weight_grad, "_MAX_P_BLOCK", 7)
    rng = np.random.default_rng(4)
    grid = [   # the first and the third get bias and relu (see ConvArrays)
        ((2, 6, 5, 5), (4, 6, 3, 3), (2, 1), ((1, 1), (1, 1))),     # K = 54: 3 blocks of 18
        ((1, 5, 6, 6), (17, 5, 2, 3), (1, 1), ((1, 0), (1, 1))),    # K = 30: blocks of 15
        ((2, 5, 6, 6), (7, 5, 2, 3), (1, 1), ((1, 0), (1, 1))),
    ]
    cases = [case for index, geometry in enumerate(grid)
             for kind in ("forward", "input_grad", "weight_grad")
             for case in path_cases(kind, *geometry, rng, index)]
    check_cases(cases)


# ResNet-20's convolutions (B = 128): the first, the three stages' 3x3 stride-1 convs, and a
# stride-2 conv between stages.
RESNET_CONVS = {
    "first": ((128, 3, 32, 32), (16, 3, 3, 3), (1, 1)),
    "stage 1": ((128, 16, 32, 32), (16, 16, 3, 3), (1, 1)),
    "stage 2": ((128, 32, 16, 16), (32, 32, 3, 3), (1, 1)),
    "stage 3": ((128, 64, 8, 8), (64, 64, 3, 3), (1, 1)),
    "stride 2": ((128, 16, 32, 32), (32, 16, 3, 3), (2, 2)),
}


@pytest.mark.parametrize("width", [4, 8, 16])
def test_winograd_planning_at_every_width(width):
    """Which ResNet convs the cost model gives Winograd, on SSE/NEON, AVX2 and AVX-512 (planning
    only: any host; bench/NOTES.md, "Winograd", has the timings at all three on one machine).
    Stages 1-3 take it in every kernel; 4x4 tiles where a row holds enough of them (not stage 3
    but on 4 lanes); strided convs never; the 3-channel first conv's forward never (4x4 tiles
    not at all with so few channels: their error on raw images)."""
    from graphc.backend.kernels.conv import chosen_paths
    from graphc.backend.kernels.conv.winograd import F4, winograd_possible

    chosen = {name: chosen_paths(x, w, stride, ((1, 1), (1, 1)), width=width)
              for name, (x, w, stride) in RESNET_CONVS.items()}
    for name in ("stage 1", "stage 2", "stage 3"):
        assert all(path.startswith("winograd") for path in chosen[name].values()), (name, chosen[name])
    assert chosen["stage 1"]["forward"] == chosen["stage 2"]["input_grad"] == "winograd 4x4"
    assert chosen["stage 3"]["forward"] == ("winograd 4x4" if width == 4 else "winograd")
    assert not chosen["first"]["forward"].startswith("winograd")
    assert not any(path.startswith("winograd") for path in chosen["stride 2"].values())
    odd = ConvGeometry.from_shapes((2, 8, 7, 8), (8, 8, 3, 3), (1, 1), ((1, 1), (1, 1)))
    assert not winograd_possible(odd, width)     # 7 output rows: no whole tiles
    six = ConvGeometry.from_shapes((2, 8, 6, 16), (8, 8, 3, 3), (1, 1), ((1, 1), (1, 1)))
    assert winograd_possible(six, 4) and not winograd_possible(six, 4, F4)
    few = ConvGeometry.from_shapes((2, 7, 16, 16), (8, 7, 3, 3), (1, 1), ((1, 1), (1, 1)))
    assert winograd_possible(few, 4) and not winograd_possible(few, 4, F4)   # 7 input channels


@pytest.mark.parametrize("width", [4, 8, 16])
def test_winograd_transform_lanes_at_every_width(width):
    """The transforms' lanes: the largest power of two that a row of tiles holds, at most a
    register for F2 and for F4 at most half a register on targets of more than 4 lanes
    (bench/NOTES.md, "F4's transforms on AVX2"); planning only, any host."""
    from graphc.backend.kernels.conv.winograd import _transform_width

    wide = ConvGeometry.from_shapes((2, 16, 64, 64), (16, 16, 3, 3), (1, 1), ((1, 1), (1, 1)))
    narrow = ConvGeometry.from_shapes((2, 16, 16, 16), (16, 16, 3, 3), (1, 1), ((1, 1), (1, 1)))
    assert _transform_width(wide, width, 2) == width
    assert _transform_width(wide, width, 4) == {4: 4, 8: 4, 16: 8}[width]
    assert _transform_width(narrow, width, 4) == 4        # 4 tiles a row
    assert _transform_width(narrow, width, 2) == min(width, 8)


INPUT_GRAD_EPILOGUE_GRID = [
    # LeNet's conv2 at batch 40 (batch in lanes: two whole groups and a partial one; cols),
    # the conv net's "same" 3x3 (as forward), a stride-2 conv (as forward only), batch 1.
    ((40, 6, 14, 14), (16, 6, 5, 5), (1, 1), ((0, 0), (0, 0))),
    ((3, 8, 9, 10), (5, 8, 3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 3, 9, 8), (4, 3, 3, 3), (2, 2), ((1, 1), (1, 1))),
    ((1, 2, 6, 11), (3, 2, 3, 2), (1, 1), ((1, 0), (0, 1))),
    ((3, 6, 8, 10), (4, 6, 3, 3), (1, 1), ((1, 1), (1, 1))),     # Winograd
    ((2, 4, 16, 16), (8, 4, 3, 3), (1, 1), ((1, 1), (1, 1))),    # Winograd with 4x4 tiles
]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", INPUT_GRAD_EPILOGUE_GRID)
def test_input_gradient_paths_apply_their_epilogue(x_shape, w_shape, stride, padding):
    """ReLU's backward fused into the input gradient (dx * Step(y)), on every path that
    applies, 1-3 threads, output and scratch starting as NaN: the epilogue reaches every
    sample exactly once."""
    from graphc.backend.kernels.conv import _DxEpilogue

    rng = np.random.default_rng(11)
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    g, w = random(rng, conv_output_shape(x_shape, w_shape, stride, padding)), random(rng, w_shape)
    after_relu = np.maximum(random(rng, x_shape), 0)
    attrs = dict(stride=stride, padding=padding)
    dx = reference("conv2d_input_grad", [g, w], x_shape, x_shape=x_shape, **attrs)
    expected = 2 * dx * (after_relu > 0) + after_relu
    paths = [path for path in INPUT_GRAD_PATHS if path.possible(geometry, target.vector_width_f32())]
    engine, kernels = compile_kernels([
        lambda m, n, path=path: path.emit(m, n, geometry, max_threads=3, epilogue=_DxEpilogue(EPILOGUE, 1))
        for path in paths])
    for path, kernel in zip(paths, kernels):
        for nthreads in (1, 2, 3):
            got = run_kernel(engine, kernel, [g, w, after_relu], x_shape, nthreads)
            assert relative_error(got, expected) <= RTOL, (path.name, nthreads)


# ---------------------------------------------------------------------------- pool cases

POOL_GRID = [
    # (x_shape, kernel, stride, padding): kernels 2 and 3, strides 1 and 2, padding 0 and 1,
    # alternating between two inputs that cover batch 1/3, C 1/3, and odd and even H and W.
    ([(1, 3, 7, 8), (3, 1, 6, 5)][index % 2], (k, k), (s, s), ((p, p), (p, p)))
    for index, (k, s, p) in enumerate((k, s, p) for k in (2, 3) for s in (1, 2) for p in (0, 1))
] + [
    ((2, 2, 7, 6), (2, 3), (2, 1), ((1, 1), (1, 1))),
    ((1, 2, 5, 9), (3, 2), (1, 3), ((0, 0), (1, 1))),
    ((2, 1, 4, 4), (4, 4), (1, 1), ((0, 0), (0, 0))),    # one window covers the plane
    # Wide enough for whole vectors of windows plus a partial one, at strides 1 and 2.
    ((2, 3, 9, 21), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ((1, 2, 8, 37), (3, 3), (2, 2), ((1, 1), (1, 1))),
    # 2x2 windows, stride 2, rows of whole vectors (the max-pool gradient's pair path; 8 and
    # 16 columns are one and two vectors of 8, 32 four of 8 or two of 16), batch 1 too.
    ((2, 3, 4, 16), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 1, 2, 8), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((3, 2, 6, 32), (2, 2), (2, 2), ((0, 0), (0, 0))),
]


def pool_cases(x_shape, kernel, stride, padding, rng):
    # Few distinct values: windows often hold several maxima, testing the tie rule.
    x = rng.integers(-2, 3, size=x_shape).astype(np.float32)
    attrs = dict(kernel=kernel, stride=stride, padding=padding)
    y_shape = conv_output_shape(x_shape, (x_shape[1], 1) + kernel, stride, padding)
    g = random(rng, y_shape)
    label = f"x={x_shape} kernel={kernel} stride={stride} padding={padding}"
    emit_args = (x_shape, kernel, stride, padding)
    options = dict(max_threads=MAX_THREADS)
    return [
        Case(f"avg_pool2d {label}", lambda m, n: emit_avg_pool2d(m, n, *emit_args, **options),
             [x], reference("avg_pool2d", [x], y_shape, **attrs)),
        Case(f"avg_pool2d_grad {label}",
             lambda m, n: emit_avg_pool2d_grad(m, n, *emit_args, **options),
             [g], reference("avg_pool2d_grad", [g], x_shape, x_shape=x_shape, **attrs)),
        Case(f"max_pool2d {label}", lambda m, n: emit_max_pool2d(m, n, *emit_args, **options),
             [x], reference("max_pool2d", [x], y_shape, **attrs)),
        Case(f"max_pool2d_grad {label}",
             lambda m, n: emit_max_pool2d_grad(m, n, *emit_args, **options),
             [x, g], reference("max_pool2d_grad", [x, g], x_shape, **attrs)),
    ]


def test_pool_kernels_match_reference():
    rng = np.random.default_rng(1)
    check_cases([case for geometry in POOL_GRID for case in pool_cases(*geometry, rng)])


def test_max_pool_propagates_nan_like_numpy():
    rng = np.random.default_rng(2)
    x_shape, kernel, stride, padding = (1, 2, 6, 6), (3, 3), (2, 2), ((1, 1), (1, 1))
    cases = pool_cases(x_shape, kernel, stride, padding, rng)[2:]
    x = cases[0].inputs[0]
    x[0, 0, 1, 1] = x[0, 0, 2, 3] = x[0, 1, 5, 5] = np.nan
    g = cases[1].inputs[1]
    attrs = dict(kernel=kernel, stride=stride, padding=padding)
    cases[0].expected = reference("max_pool2d", [x], cases[0].expected.shape, **attrs)
    cases[1].expected = reference("max_pool2d_grad", [x, g], x_shape, **attrs)
    assert np.isnan(cases[0].expected).any()
    check_cases(cases)


def test_max_pool_gradient_of_2x2_windows_with_nan_ties_and_epilogue():
    """The pair path (kernels/pool.py: _emit_max_grad_2x2): NaNs win over numbers (the first NaN
    of a window), ties go to the first maximum in window order, and ReLU's backward fused as
    the epilogue gives what it gives applied after; 1-3 threads."""
    from graphc.backend.kernels.pool import PoolGeometry, _pairs_of_whole_vectors

    x_shape, kernel, padding = (2, 3, 6, 16), (2, 2), ((0, 0), (0, 0))
    assert _pairs_of_whole_vectors(PoolGeometry.from_attrs(x_shape, kernel, kernel, padding),
                                   target.vector_width_f32())
    rng = np.random.default_rng(9)
    x = rng.integers(-1, 2, size=x_shape).astype(np.float32)      # many ties
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan                          # two NaNs in one window
    x[1, 2, 5, 15] = np.nan                                         # the last cell of a window
    g, after_relu = random(rng, (2, 3, 3, 8)), np.maximum(random(rng, x_shape), 0)
    expected = reference("max_pool2d_grad", [x, g], x_shape, kernel=kernel, stride=kernel,
                         padding=padding)
    engine, (plain, fused) = compile_kernels([
        lambda m, n: emit_max_pool2d_grad(m, n, x_shape, kernel, kernel, padding, max_threads=3),
        lambda m, n: emit_max_pool2d_grad(m, n, x_shape, kernel, kernel, padding, max_threads=3,
                                          epilogue=EPILOGUE, epilogue_operands=1)])
    for nthreads in (1, 2, 3):
        assert relative_error(run_kernel(engine, plain, [x, g], x_shape, nthreads), expected) <= RTOL
        got = run_kernel(engine, fused, [x, g, after_relu], x_shape, nthreads)
        assert relative_error(got, 2 * expected * (after_relu > 0) + after_relu) <= RTOL


# ------------------------------------------------------------------------ invalid geometry

@pytest.mark.parametrize("emit, args", [
    (emit_conv2d, ((1, 3, 5, 5), (2, 4, 3, 3), (1, 1), ((0, 0), (0, 0)))),   # channel mismatch
    (emit_conv2d, ((1, 3, 2, 5), (2, 3, 3, 3), (1, 1), ((0, 0), (0, 0)))),   # kernel too tall
    (emit_conv2d_input_grad, ((1, 2, 4, 4), (2, 3, 3, 3), (1, 3, 5, 5), (1, 1),
                              ((0, 0), (0, 0)))),                            # wrong g shape
    (emit_max_pool2d, ((1, 1, 4, 4), (2, 2), (1, 1), ((2, 2), (0, 0)))),     # window of padding
])
def test_invalid_geometry_is_rejected(emit, args):
    with pytest.raises(ValueError):
        emit(target.new_module("invalid"), "k", *args, max_threads=1)


# ------------------------------------------------- average-pool gradient over flat vectors

FLAT_SPREAD_GRID = [
    # (x_shape, kernel): LeNet's two pools; a tail after the last whole period (4 lanes);
    # batch 1 with one 2x2 plane (a tail of half a vector); windows of 3x1 (a period of 15
    # vectors) and of 2x4.
    ((2, 6, 28, 28), (2, 2)),
    ((3, 16, 10, 10), (2, 2)),
    ((1, 3, 10, 10), (2, 2)),
    ((1, 1, 2, 2), (2, 2)),
    ((2, 2, 6, 5), (3, 1)),
    ((1, 2, 8, 36), (2, 4)),
]


@pytest.mark.parametrize("width", [4, 8, 16])
def test_flat_average_pool_gradient_plans_the_grid_at_every_width(width):
    """The flat path (kernels/pool.py: _FlatSpread) takes the grid's shapes, but for the 2x4
    windows on 4 lanes: their row of windows (144 floats) repeats only every 36 vectors."""
    from graphc.backend.kernels.pool import PoolGeometry, _FlatSpread

    flat = [(x_shape, kernel) for x_shape, kernel in FLAT_SPREAD_GRID
            if _FlatSpread.plan(PoolGeometry.from_attrs(x_shape, kernel, kernel, ((0, 0), (0, 0))), width)]
    expected = FLAT_SPREAD_GRID[:-1] if width == 4 else FLAT_SPREAD_GRID
    assert flat == expected


@pytest.mark.parametrize("x_shape, kernel", FLAT_SPREAD_GRID)
def test_flat_average_pool_gradient_with_and_without_epilogue(x_shape, kernel):
    """With ReLU's backward as epilogue and without, on 1-3 threads, the last of which also does
    the tail; by the flat path wherever the host's width takes it (see the test above)."""
    padding = ((0, 0), (0, 0))
    rng = np.random.default_rng(7)
    y_shape = (x_shape[0], x_shape[1], x_shape[2] // kernel[0], x_shape[3] // kernel[1])
    g, after_relu = random(rng, y_shape), np.maximum(random(rng, x_shape), 0)
    spread = reference("avg_pool2d_grad", [g], x_shape, x_shape=x_shape, kernel=kernel,
                       stride=kernel, padding=padding)
    engine, (plain, fused) = compile_kernels([
        lambda m, n: emit_avg_pool2d_grad(m, n, x_shape, kernel, kernel, padding, max_threads=3),
        lambda m, n: emit_avg_pool2d_grad(m, n, x_shape, kernel, kernel, padding, max_threads=3,
                                          epilogue=EPILOGUE, epilogue_operands=1)])
    for nthreads in (1, 2, 3):
        got = run_kernel(engine, plain, [g], x_shape, nthreads)
        assert relative_error(got, spread) <= RTOL, nthreads
        got = run_kernel(engine, fused, [g, after_relu], x_shape, nthreads)
        assert relative_error(got, 2 * spread * (after_relu > 0) + after_relu) <= RTOL, nthreads


def test_flat_average_pool_gradient_declines_long_periods():
    """A row of windows 68 floats long repeats only every 17 vectors: too much unrolled code,
    so the row-by-row path takes it (and still matches the reference)."""
    from graphc.backend.kernels.pool import PoolGeometry, _FlatSpread

    x_shape, kernel, padding = (1, 2, 4, 34), (2, 2), ((0, 0), (0, 0))
    assert _FlatSpread.plan(PoolGeometry.from_attrs(x_shape, kernel, kernel, padding), 8) is None
    rng = np.random.default_rng(8)
    g = random(rng, (1, 2, 2, 17))
    check_cases([Case("avg_pool2d_grad long period",
                      lambda m, n: emit_avg_pool2d_grad(m, n, x_shape, kernel, kernel, padding,
                                                        max_threads=MAX_THREADS),
                      [g], reference("avg_pool2d_grad", [g], x_shape, x_shape=x_shape,
                                     kernel=kernel, stride=kernel, padding=padding))])
