"""Native float32 kernels for conv2d (NCHW input, OIHW weights) and its two gradients.

Every kernel is an implicit GEMM: no im2col matrix is built, operands are read where they
lie (in a per-sample copy with the zero padding materialised, so no loop checks bounds).
All of them run on one register tile (`_tile_function`): `rows` broadcast scalars times
`vecs` vectors, rows*vecs accumulators (6 x 2 = 12 with AVX2's 16 registers: 2 FMA ports x
4 cycles of latency need 8 in flight, and 6 broadcasts + 2 vector loads feed 12 FMAs). One
operand's offset per reduction step comes from a table computed at compile time, the
other's is affine: the conv's index arithmetic (channel, tap row, tap column; or output
row and column) becomes one flat loop whatever the geometry, with no div/mod and no nest
of short loops. Row pointers come from a table too, so a tile's rows need not be evenly
spaced (6 output pixels that cross an output row). The tile is one function per (rows, vecs,
table side) and the constants its callers pass, defined once per program and shared by every
conv kernel, as is the one transpose: a program's IR, and LLVM's time on it, hardly grow with
its number of conv kernels.

Each kernel has two or three paths (`FORWARD_PATHS`, `INPUT_GRAD_PATHS`,
`WEIGHT_GRAD_PATHS`); `_choose` takes the one that wastes fewer multiply-adds on the geometry:

  channels in lanes  forward       outT[p, o]     = sum over k=(c,i,j) x[c, tap(p, k)] Wt[k, o]
                     weight grad   dWt[k, o]     += sum over p  x[c, tap(p, k)] gT[p, o]
                     rows: 6 pixels (forward) or 6 taps (weight grad), broadcast from x;
                     lanes: output channels, padded to whole vectors. The channel-minor
                     results and operands (outT, gT, dWt) cost a transpose per sample,
                     O(P*C) against O(P*C*K) multiply-adds. Any stride. LeNet's conv2
                     (16 channels, rows of 10 pixels), the conv net's weight gradients.

  pixels in lanes    forward       out[o, oh, ow:ow+W] = sum over k  W[o, k] x[tap(oh, ow, k) : +W]
                     rows: 6 output channels, broadcast from W; lanes: output columns,
                     covered by pairs of vectors (`_VectorCover`), so every store is a
                     whole vector of real results and nothing is transposed. Stride 1
                     along rows. LeNet's conv1 (6 channels would use 6 of 8 lanes, here 28
                     of 32 columns), the conv net's forwards.
                     weight grad (`_dot_function`) dW[o, k] = sum over q of g[o, q] x[q + tap(k)]
                     over "wide" rows: g copied with its rows as long as x's padded rows
                     (zeros in the extra columns), so that a run of q reads x at one
                     constant offset per tap; rows: 6 channels, vecs: 2 taps, lanes hold
                     partial sums, added up once per call. Stride 1. LeNet's conv1.

The input gradient is either a forward convolution with channels in lanes, of g dilated by
the stride and padded by the kernel size less the conv's padding, with the weights
flipped and transposed (`_emit_input_grad_as_forward`: any stride; with "same" padding,
the conv net, no multiply-add is wasted), or the same split by phases of the stride
(phases.py: strided, skipping the dilation's zeros, 3 multiply-adds in 4 of a stride-2
conv's), or, with stride 1 and few input channels
(LeNet's conv2: 6, where the former would waste half its work on g's zero border and a
quarter of its lanes), one of:

  batch in lanes     dxT[c, y, x, n] = sum over o and the taps (i, j) that read g inside
                     g of W[o, c, i, j] gT[o, y+pt-i, x+pl-j, n] (`_BatchLanesInputGrad`):
                     rows: 6 input channels, broadcast from weights packed per range of
                     valid taps; lanes: 2W samples (two vectors), g and dx transposed per
                     group. No wasted multiply-add, reductions of O x taps steps: faster
                     than cols on LeNet's conv2 at batch 64, transposes included
                     (bench/NOTES.md). A batch of at most
                     one group (threads split the groups) goes to
  cols               a GEMM cols[(i,j), p] = sum over o W[o, c, i, j] g[o, p] per input
                     channel with pixels in lanes (reductions of only O = 16 steps for
                     LeNet), then col2im summed per dx row in registers (`_emit_col2im`).

3x3 stride-1 convolutions with whole 2x2 output tiles have a further path for each kernel,
"winograd" (winograd.py, winograd_weight_grad.py): Winograd's minimal filtering, 16
multiply-adds per tile and channel pair instead of 36, plus transforms the cost model counts;
with whole 4x4 tiles also "winograd 4x4": 36 instead of 144.

Threads split the batch. Each thread owns its per-sample buffers in scratch; weights packed
for a whole call are written by thread 0 in a first phase. All geometry is compile-time
constant; loops stay IR loops (the module pipeline runs no unroller: LLVM's, when it ran,
fully unrolled the small constant-trip ones, copying the row copies and the calls of a
sample's tiles many times for no speed), so the code size does not grow with the image size.

The package: `geometry` (shapes, vector covers), `tiles` (the shared register tiles, their
offset tables, the transpose), `buffers` (padded sample copies, scratch, row primitives),
`forward`, `input_grad`, `phases`, `weight_grad`, `winograd` and `winograd_weight_grad` (the paths'
emitters); here, the paths, the cost model that chooses among them, and the public `emit_*` functions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import llvmlite.ir as ir

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel
from graphc.backend.kernels.conv.buffers import _round_up
from graphc.backend.kernels.conv.channel_sums import ChannelSums
from graphc.backend.kernels.conv.forward import _emit_forward_channel_lanes, _emit_forward_pixel_lanes
from graphc.backend.kernels.conv.geometry import _ONE_VECTOR_EFFICIENCY, ConvGeometry, _lanes_efficiency, _VectorCover
from graphc.backend.kernels.conv.input_grad import (_MAX_BATCH_G_FLOATS, _MAX_COLS_FLOATS, _DxEpilogue,
                                                    _emit_input_grad_as_forward, _emit_input_grad_batch_lanes,
                                                    _emit_input_grad_by_cols, _emit_input_grad_pixel_lanes)
from graphc.backend.kernels.conv.phases import by_phases_efficiency, by_phases_possible, emit_input_grad_by_phases
from graphc.backend.kernels.conv.tiles import _TILE_ROWS
from graphc.backend.kernels.conv.weight_grad import _emit_weight_grad_channel_lanes, _emit_weight_grad_pixel_lanes
from graphc.backend.kernels.conv.winograd import (F2, F4, emit_forward_winograd, emit_input_grad_winograd,
                                                  input_grad_winograd_efficiency, input_grad_winograd_possible,
                                                  winograd_efficiency, winograd_possible)
from graphc.backend.kernels.conv.winograd_weight_grad import (emit_weight_grad_winograd,
                                                              weight_grad_winograd_efficiency,
                                                              weight_grad_winograd_possible)
from graphc.backend.kernels.reduce import row_sum_member
from graphc.backend.llvm.target import vector_width_f32
from graphc.backend.lowering_rules import Step, lowers, no_param_operands, step_with_elementwise_epilogue

__all__ = ["ConvGeometry", "chosen_paths", "emit_conv2d", "emit_conv2d_input_grad",
           "emit_conv2d_weight_grad", "FORWARD_PATHS", "INPUT_GRAD_PATHS", "WEIGHT_GRAD_PATHS"]


@dataclasses.dataclass(frozen=True)
class _Path:
    """One way to compute a kernel: whether it applies to a geometry, the fraction of its
    multiply-adds that are useful (`_choose` takes the highest; ties go to the path listed
    first), and its emitter."""

    name: str
    possible: Callable[[ConvGeometry, int], bool]
    efficiency: Callable[[ConvGeometry, int], float]
    emit: Callable[..., Kernel]


def _choose(paths: Sequence[_Path], g: ConvGeometry, width: int | None = None) -> _Path:
    width = width or vector_width_f32()
    possible = [path for path in paths if path.possible(g, width)]
    return max(possible, key=lambda path: path.efficiency(g, width))


def _always(g: ConvGeometry, width: int) -> bool:
    return True


def _stride_one(g: ConvGeometry, width: int) -> bool:
    return (g.stride_h, g.stride_w) == (1, 1)


# --------------------------------------------------------------------------- public kernels

def emit_conv2d(module: ir.Module, name: str, x_shape, w_shape, stride, padding, *,
                bias: bool = False, relu: bool = False, max_threads: int,
                sums: ChannelSums | None = None) -> Kernel:
    """out = conv2d(x, w) [+ b[o] on channel o] [then relu]; inputs x, w[, b], then those of
    `sums`, out's per-channel sums (channel_sums.py)."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    tail = {} if sums is None else dict(after_sample=sums.after_sample, n_inputs=sums.inputs)
    kernel = _choose(FORWARD_PATHS, g).emit(module, name, g, bias=bias, relu=relu, max_threads=max_threads, **tail)
    return kernel if sums is None else sums.wrap(module, name, kernel)


def emit_conv2d_input_grad(module: ir.Module, name: str, g_shape, w_shape, x_shape, stride,
                           padding, *, max_threads: int, epilogue=None,
                           epilogue_operands: int = 0, sums: ChannelSums | None = None) -> Kernel:
    """out = dL/dx (shape x_shape) from g = dL/d(conv2d(x, w)); inputs g, w, then the
    `epilogue_operands` operands of `epilogue`, a sympy expression over x0 = dx and x1.. =
    those operands (each of dx's shape), applied to dx before it leaves the kernel (ReLU's
    backward: x0*Step(x1)), then those of `sums`, the final dx's per-channel sums."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    kernel = _choose(INPUT_GRAD_PATHS, g).emit(module, name, g, max_threads=max_threads,
                                               epilogue=_DxEpilogue(epilogue, epilogue_operands, sums))
    return kernel if sums is None else sums.wrap(module, name, kernel)


def emit_conv2d_weight_grad(module: ir.Module, name: str, x_shape, g_shape, w_shape, stride,
                            padding, *, max_threads: int) -> Kernel:
    """out = dL/dw (shape w_shape) from x and g = dL/d(conv2d(x, w)); inputs x, g."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    return _choose(WEIGHT_GRAD_PATHS, g).emit(module, name, g, max_threads=max_threads)


def chosen_paths(x_shape, w_shape, stride, padding, *, width: int | None = None) -> dict[str, str]:
    """The path each kernel of this conv2d takes with vectors of `width` floats (default: the
    host's): {"forward": ..., "input_grad": ..., "weight_grad": ...} (benchmarks, diagnostics)."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    return {kind: _choose(paths, g, width).name for kind, paths in (
        ("forward", FORWARD_PATHS), ("input_grad", INPUT_GRAD_PATHS),
        ("weight_grad", WEIGHT_GRAD_PATHS))}


def _check_grad_shape(g_shape, geometry: ConvGeometry) -> None:
    if tuple(g_shape) != geometry.out_shape:
        raise ValueError(f"output gradient has shape {tuple(g_shape)}, the conv2d output "
                         f"is {geometry.out_shape}")



# --------------------------------------------------------------------------------- paths

def _forward_pixels_possible(g: ConvGeometry, width: int) -> bool:
    return g.stride_w == 1 and g.out_w >= width


def _input_grad_by_cols_possible(g: ConvGeometry, width: int) -> bool:
    return (_stride_one(g, width) and g.pixels >= width and
            g.taps * g.pixels <= _MAX_COLS_FLOATS)


def _input_grad_batch_lanes_possible(g: ConvGeometry, width: int) -> bool:
    return _stride_one(g, width) and g.out_channels * g.pixels * 2 * width <= _MAX_BATCH_G_FLOATS


def _input_grad_batch_lanes_efficiency(g: ConvGeometry, width: int) -> float:
    """Every multiply-add is useful but for the lanes of missing samples in the last group
    (a group of one vector is a one-vector tile) and the rows of a last channel tile short
    of 6. Threads split the groups: with a single group, a second thread would idle."""
    full, rest = divmod(g.batch, 2 * width)
    lanes = full * 2 * width + (0 if rest == 0 else width if rest <= width else 2 * width)
    efficiency = g.batch / lanes
    if lanes == width:
        efficiency *= _ONE_VECTOR_EFFICIENCY
    if lanes <= 2 * width:
        efficiency /= 2
    return efficiency * g.channels / _round_up(g.channels, _TILE_ROWS)


def _input_grad_as_forward_efficiency(g: ConvGeometry, width: int) -> float:
    """As a forward conv, each dx pixel sums over all taps, of which only those reading
    g inside g (not its padding) are useful."""
    return g.pixels / (g.height * g.width) * _lanes_efficiency(g.channels, width)


# Pixels in lanes win ties: nothing to transpose, and no outT to reload between blocks of
# K (faster on the conv net, above all on the short K = 27 of its first layer;
# bench/NOTES.md, "Convolutions").
FORWARD_PATHS = (
    _Path("pixels in lanes", _forward_pixels_possible,
          lambda g, width: g.out_w / _VectorCover.of(g.out_w, width).lanes,
          _emit_forward_pixel_lanes),
    _Path("channels in lanes", _always,
          lambda g, width: _lanes_efficiency(g.out_channels, width),
          _emit_forward_channel_lanes),
    *(_Path(name, functools.partial(winograd_possible, scheme=scheme),
            functools.partial(winograd_efficiency, scheme=scheme),
            functools.partial(emit_forward_winograd, scheme=scheme))
      for name, scheme in (("winograd", F2), ("winograd 4x4", F4))),
)

def _input_grad_pixels_possible(g: ConvGeometry, width: int) -> bool:
    return _stride_one(g, width) and g.width >= width


def _input_grad_pixels_efficiency(g: ConvGeometry, width: int) -> float:
    """As "as forward", with dx's columns in the lanes instead of its channels. A tile is up
    to 6 input channels x 2 vectors of a row: fewer channels, or rows of one vector, leave
    accumulators (and FMA slots) unused."""
    cover = _VectorCover.of(g.width, width)
    used = min(g.channels, _TILE_ROWS) / _TILE_ROWS * min(cover.lanes // width, 2) / 2
    return g.pixels / (g.height * g.width) * g.width / cover.lanes * used


INPUT_GRAD_PATHS = (
    _Path("as forward, pixels in lanes", _input_grad_pixels_possible, _input_grad_pixels_efficiency,
          _emit_input_grad_pixel_lanes),
    _Path("as forward", _always, _input_grad_as_forward_efficiency,
          _emit_input_grad_as_forward),
    _Path("by phases", by_phases_possible, by_phases_efficiency, emit_input_grad_by_phases),
    _Path("cols", _input_grad_by_cols_possible,
          lambda g, width: g.pixels / _VectorCover.of(g.pixels, width).lanes,
          _emit_input_grad_by_cols),
    _Path("batch in lanes", _input_grad_batch_lanes_possible,
          _input_grad_batch_lanes_efficiency, _emit_input_grad_batch_lanes),
    *(_Path(name, functools.partial(input_grad_winograd_possible, scheme=scheme),
            functools.partial(input_grad_winograd_efficiency, scheme=scheme),
            functools.partial(emit_input_grad_winograd, scheme=scheme))
      for name, scheme in (("winograd", F2), ("winograd 4x4", F4))),
)

# Channels in lanes win ties: the dot products' partial sums in every lane are added up
# after every call, and their g is copied per sample (slower on the conv net's 32-64
# channels; bench/NOTES.md, "Convolutions").
WEIGHT_GRAD_PATHS = (
    _Path("channels in lanes", _always,
          lambda g, width: _lanes_efficiency(g.out_channels, width),
          _emit_weight_grad_channel_lanes),
    _Path("pixels in lanes", _stride_one, lambda g, width: g.out_w / g.padded_w,
          _emit_weight_grad_pixel_lanes),
    *(_Path(name, functools.partial(weight_grad_winograd_possible, scheme=scheme),
            functools.partial(weight_grad_winograd_efficiency, scheme=scheme),
            functools.partial(emit_weight_grad_winograd, scheme=scheme))
      for name, scheme in (("winograd", F2), ("winograd 4x4", F4))),
)


# ---- lowering --------------------------------------------------------------------------------

@lowers("conv2d", bias_epilogue="row")
def lower_conv2d(node, epilogue) -> Step:
    x, w = node.inputs
    operands = [x, w] + ([epilogue.bias] if epilogue else [])
    relu = bool(epilogue and epilogue.relu)
    attrs = node.attrs

    def build(m, name, threads, sums=None):
        return emit_conv2d(m, name, x.shape, w.shape, attrs["stride"], attrs["padding"],
                           bias=epilogue is not None, relu=relu, max_threads=threads, sums=sums)

    label = "conv2d" + ("+bias" if epilogue else "") + ("+relu" if relu else "")
    covers = [node] + ([epilogue.node] if epilogue else [])
    flops = costs.conv2d_flops(node.shape, w.shape) + costs.bias_relu_flops(node.size, epilogue is not None, relu)
    return _summing(Step(epilogue.node if epilogue else node, operands, build, label, covers, flops=flops))


@lowers("conv2d_input_grad", elementwise_epilogue=True, epilogue_allowed=no_param_operands)
def lower_conv2d_input_grad(node, epilogue) -> Step:
    g, w = node.inputs
    a = node.attrs
    return _summing(step_with_elementwise_epilogue(
        node, epilogue, lambda m, name, threads, **fused: emit_conv2d_input_grad(
            m, name, g.shape, w.shape, a["x_shape"], a["stride"], a["padding"], max_threads=threads, **fused),
        flops=costs.conv2d_flops(g.shape, w.shape)))


def _summing(step: Step) -> Step:
    """`step` (a conv's, whose `build` takes `sums`), able to take row sums of its result."""
    step.with_channel_sums = lambda sum_steps, centered: _with_channel_sums(step, sum_steps, centered)
    return step


def _with_channel_sums(step: Step, sum_steps: list[Step], centered: list) -> Step:
    """`step` also computing `sum_steps`, row sums over (N, H, W) (reduce.py's
    `row_sum_member`) of its result and of values it does not compute, and `centered`: (a
    sum of (y - m)², m) with m an elementwise function of y's plain sum, one of `sum_steps`."""
    inputs = list(step.operands)
    further = list(dict.fromkeys(t for s in sum_steps for t in s.operands if t.id != step.node.id))
    position = {t.id: len(inputs) + i for i, t in enumerate(further)}
    members = tuple((row_sum_member(s)[2], tuple(None if t.id == step.node.id else position[t.id] for t in s.operands))
                    for s in sum_steps)
    sum_of = {s.node.id: k for k, s in enumerate(sum_steps)}
    centers = tuple((sum_of[mean.inputs[0].id], mean.attrs["expr"]) for _, mean in centered)
    batch, channels, height, width = step.node.shape
    sums = ChannelSums(batch, channels, height * width, members, outputs=len(inputs) + len(further), centered=centers)
    joined = sum_steps + [s for s, _ in centered]
    return Step(step.node, inputs + further, lambda m, name, threads: step.build(m, name, threads, sums=sums),
                "&".join([step.label] + [s.label for s in joined]),
                step.covers + [node for s in joined for node in s.covers],
                flops=step.flops + sum(s.flops for s in joined), extra_outputs=[s.node for s in joined])


@lowers("conv2d_weight_grad")
def lower_conv2d_weight_grad(node, _epilogue) -> Step:
    x, g = node.inputs
    a = node.attrs
    return Step(node, [x, g],
                lambda m, name, threads: emit_conv2d_weight_grad(m, name, x.shape, g.shape, a["w_shape"], a["stride"],
                                                                 a["padding"], max_threads=threads),
                "conv2d_weight_grad", [node], flops=costs.conv2d_flops(g.shape, a["w_shape"]))
