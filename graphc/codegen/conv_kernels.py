"""Native float32 kernels for conv2d (NCHW input, OIHW weights) and its two gradients.

Every kernel is an implicit GEMM: no im2col matrix is built, operands are read where they
lie (in a per-sample copy with the zero padding materialised, so no loop checks bounds).
All of them run on one register tile (`_tile_function`): `rows` broadcast scalars times
`vecs` vectors, rows*vecs accumulators (6 x 2 = 12 with AVX2's 16 registers: 2 FMA ports x
4 cycles of latency need 8 in flight, and 6 broadcasts + 2 vector loads feed 12 FMAs). One
operand's offset per reduction step comes from a table computed here at compile time, the
other's is affine: the conv's index arithmetic (channel, tap row, tap column; or output
row and column) becomes one flat loop whatever the geometry, with no div/mod and no nest
of short loops. Row pointers come from a table too, so a tile's rows need not be evenly
spaced (6 output pixels that cross an output row). The tile is one internal function per
(rows, vecs, table side), shared by every conv kernel of a module as gemm.py shares its
micro-kernels, as is the one transpose: a program's IR, and LLVM's time on it, hardly grow
with its number of conv kernels.

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
the conv net, no multiply-add is wasted), or, with stride 1 and few input channels
(LeNet's conv2: 6, where the former would waste half its work on g's zero border and a
quarter of its lanes), one of:

  batch in lanes     dxT[c, y, x, n] = sum over o and the taps (i, j) that read g inside
                     g of W[o, c, i, j] gT[o, y+pt-i, x+pl-j, n] (`_BatchLanesInputGrad`):
                     rows: 6 input channels, broadcast from weights packed per range of
                     valid taps; lanes: 2W samples (two vectors), g and dx transposed per
                     group. No wasted multiply-add, reductions of O x taps steps. LeNet's
                     conv2 at batch 64: 94 GFLOP/s in its tiles, ~10% more in transposes
                     (450-530 -> 360-400 us against the cols path). A batch of one vector
                     or less leaves lanes idle and goes to
  cols               a GEMM cols[(i,j), p] = sum over o W[o, c, i, j] g[o, p] per input
                     channel with pixels in lanes (reductions of only O = 16 steps for
                     LeNet), then col2im summed per dx row in registers (`_emit_col2im`).

Threads split the batch. Each thread owns its per-sample buffers in scratch; weights packed
for a whole call are written by thread 0 in a first phase. All geometry is compile-time
constant; loops stay IR loops (none unrolled: LLVM fully unrolled the small constant-trip
ones, copying the row copies and the calls of a sample's tiles many times for no speed),
so the code size does not grow with the image size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from .kernel import Kernel, phase_args, phase_function
from .kernel_builder import F32, I1, I32, I64, PTR, KernelBuilder
from .reduce_kernels import horizontal_sum
from .target import vector_register_count, vector_width_f32
from .window import WindowGeometry

__all__ = ["ConvGeometry", "chosen_paths", "emit_conv2d", "emit_conv2d_input_grad",
           "emit_conv2d_weight_grad"]

# Scratch regions start on a 64-byte boundary (relative to scratch) so that two threads
# never write the same cache line.
_CACHE_LINE_FLOATS = 16

# Reduction steps of a channels-in-lanes forward tile per call: a K of at most
# `_MAX_K_UNSPLIT` in one block, a longer one in blocks of at most `_MAX_K_BLOCK`. A
# block's rows of Wt for a tile's channels (K_block x 16 floats) stay in L1 across all its
# pixel tiles, along with the cells of x its 6 pixels broadcast (K_block / 9 channels x 3-4
# rows of x for 3x3 taps): 192 steps are 12 KB of Wt plus ~10-14 KB of x, near the 32 KB
# of L1 (the conv net's 64 -> 64 channels, 3x3: 48 GFLOP/s in one block of K = 576; its
# input gradient 77-80 in 3 blocks of 192, 82-89 in 5 of 116). Each extra block reloads
# and stores outT, so a K that fits stays whole (LeNet's conv2, K = 150).
_MAX_K_UNSPLIT = 256
_MAX_K_BLOCK = 128

# Most pixels per weight-gradient block: the block's rows of gT for a tile's channels
# (256 x 16 floats, 16 KB) stay in L1 across all the tiles of taps.
_MAX_P_BLOCK = 256

# Rows of a register tile: each has a pointer to its broadcast operand, in a register.
_TILE_ROWS = 6

# Largest cols buffer (taps x pixels floats, one input channel's) of the GEMM + col2im
# input gradient: LeNet's conv2 needs 2500 and stays in L1 between the GEMM that writes
# it and the col2im that reads it; past 128 KB it would not even stay in L2.
_MAX_COLS_FLOATS = 1 << 15

# A tile one vector wide is load-bound (a broadcast per FMA); lane counts are discounted
# by this when choosing a layout.
_ONE_VECTOR_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class ConvGeometry(WindowGeometry):
    """Shapes, stride and padding of one conv2d; pure Python, no IR."""

    batch: int = 1
    channels: int = 1
    out_channels: int = 1

    @classmethod
    def from_shapes(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[Sequence[int]]) -> ConvGeometry:
        """From the op's attributes: stride (sh, sw), padding ((top, bottom), (left, right))."""
        (n, c, h, w), (o, wc, kh, kw) = x_shape, w_shape
        (sh, sw), ((pt, pb), (pl, pr)) = stride, padding
        if c != wc:
            raise ValueError(f"input has {c} channels but the weight {tuple(w_shape)} expects {wc}")
        if min(n, c, h, w, o, kh, kw, sh, sw) < 1 or min(pt, pb, pl, pr) < 0:
            raise ValueError(f"invalid conv2d geometry: x {tuple(x_shape)}, w {tuple(w_shape)}, "
                             f"stride {tuple(stride)}, padding {tuple(padding)}")
        geometry = cls(h, w, kh, kw, sh, sw, pt, pb, pl, pr, batch=n, channels=c, out_channels=o)
        if geometry.out_h < 1 or geometry.out_w < 1:
            raise ValueError(f"kernel {(kh, kw)} with padding {tuple(padding)} does not fit "
                             f"the input {(h, w)}")
        return geometry

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.out_channels, self.out_h, self.out_w

    @property
    def padded_plane(self) -> int:
        return self.padded_h * self.padded_w

    @property
    def has_padding(self) -> bool:
        return self.padded_plane != self.height * self.width

    @property
    def sample_floats(self) -> int:
        """Floats of one sample of the input."""
        return self.channels * self.height * self.width

    @property
    def patch_size(self) -> int:
        """K of the forward GEMM: weights per output channel."""
        return self.channels * self.taps

    @property
    def pixels(self) -> int:
        """P: output pixels per channel."""
        return self.out_h * self.out_w

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (each gradient costs the same)."""
        return 2 * self.batch * self.out_channels * self.pixels * self.patch_size

    def tap_offsets(self) -> list[int]:
        """For k = (c, i, j): the offset in a padded sample of the cell tap k of output
        pixel (0, 0) reads."""
        return [c * self.padded_plane + i * self.padded_w + j for c in range(self.channels)
                for i in range(self.kernel_h) for j in range(self.kernel_w)]

    def pixel_offsets(self) -> list[int]:
        """For output pixel p = (oh, ow): the offset in a padded plane of the cell its tap
        (0, 0) reads."""
        return [oh * self.stride_h * self.padded_w + ow * self.stride_w
                for oh in range(self.out_h) for ow in range(self.out_w)]


# ------------------------------------------------------------------------ layout choices

@dataclasses.dataclass(frozen=True)
class _VectorCover:
    """How the vectors of a pixels-in-lanes tile cover a run of `length` >= W pixels (an
    output row; all of g's pixels): `pairs` pairs of vectors at 0, 2W, 4W, ..., then, if
    they leave a rest, a last tile of `last_vecs` vectors (`step` apart) that ends on the
    run: it starts at `last`, overlapping the tile before it when the run is not a whole
    number of vectors. Every store is thus a whole vector of real results (28 columns:
    0-15 and 12-27). A rest of one vector or less gets a one-vector tile (LeNet's 100
    pixels: 6 pairs + 1 vector, not 7 pairs)."""

    width: int
    pairs: int
    last: int | None = None
    last_vecs: int = 0
    step: int = 0

    @classmethod
    def of(cls, length: int, width: int) -> _VectorCover:
        pairs = length // (2 * width)
        rest = length - pairs * 2 * width
        if rest == 0:
            return cls(width, pairs)
        if rest <= width:
            return cls(width, pairs, length - width, 1, width)
        return cls(width, pairs, max(0, length - 2 * width), 2, min(width, length - width))

    @property
    def lanes(self) -> int:
        return self.width * (2 * self.pairs + self.last_vecs)

    def emit_each(self, kb: KernelBuilder, tile: Callable[[ir.Value, int, int], None]) -> None:
        """tile(start, vecs, step) for each tile, in order."""
        with kb.for_range(0, self.pairs, name="pair", unroll="never") as pair:
            tile(kb.mul(pair, 2 * self.width), 2, self.width)
        if self.last is not None:
            tile(kb.i64(self.last), self.last_vecs, self.step)


def _lanes_efficiency(channels: int, width: int) -> float:
    """Useful fraction of the lanes with `channels` in the lanes."""
    vectors = -(-channels // width)
    return channels / (vectors * width) * (_ONE_VECTOR_EFFICIENCY if vectors == 1 else 1.0)


@dataclasses.dataclass(frozen=True)
class _Path:
    """One way to compute a kernel: whether it applies to a geometry, the fraction of its
    multiply-adds that are useful (`_choose` takes the highest; ties go to the path listed
    first), and its emitter."""

    name: str
    possible: Callable[[ConvGeometry, int], bool]
    efficiency: Callable[[ConvGeometry, int], float]
    emit: Callable[..., Kernel]


def _choose(paths: Sequence[_Path], g: ConvGeometry) -> _Path:
    width = vector_width_f32()
    possible = [path for path in paths if path.possible(g, width)]
    return max(possible, key=lambda path: path.efficiency(g, width))


def _always(g: ConvGeometry, width: int) -> bool:
    return True


def _stride_one(g: ConvGeometry, width: int) -> bool:
    return (g.stride_h, g.stride_w) == (1, 1)


# --------------------------------------------------------------------------- public kernels

def emit_conv2d(module: ir.Module, name: str, x_shape, w_shape, stride, padding, *,
                bias: bool = False, relu: bool = False, max_threads: int) -> Kernel:
    """out = conv2d(x, w) [+ b[o] on channel o] [then relu]; inputs x, w[, b]."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    return _choose(FORWARD_PATHS, g).emit(module, name, g, bias=bias, relu=relu,
                                          max_threads=max_threads)


def emit_conv2d_input_grad(module: ir.Module, name: str, g_shape, w_shape, x_shape, stride,
                           padding, *, max_threads: int) -> Kernel:
    """out = dL/dx (shape x_shape) from g = dL/d(conv2d(x, w)); inputs g, w."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    return _choose(INPUT_GRAD_PATHS, g).emit(module, name, g, max_threads=max_threads)


def emit_conv2d_weight_grad(module: ir.Module, name: str, x_shape, g_shape, w_shape, stride,
                            padding, *, max_threads: int) -> Kernel:
    """out = dL/dw (shape w_shape) from x and g = dL/d(conv2d(x, w)); inputs x, g."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    return _choose(WEIGHT_GRAD_PATHS, g).emit(module, name, g, max_threads=max_threads)


def chosen_paths(x_shape, w_shape, stride, padding) -> dict[str, str]:
    """The path each kernel of this conv2d takes on this host: {"forward": ...,
    "input_grad": ..., "weight_grad": ...} (benchmarks and diagnostics)."""
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    return {kind: _choose(paths, g).name for kind, paths in (
        ("forward", FORWARD_PATHS), ("input_grad", INPUT_GRAD_PATHS),
        ("weight_grad", WEIGHT_GRAD_PATHS))}


def _check_grad_shape(g_shape, geometry: ConvGeometry) -> None:
    if tuple(g_shape) != geometry.out_shape:
        raise ValueError(f"output gradient has shape {tuple(g_shape)}, the conv2d output "
                         f"is {geometry.out_shape}")


# ------------------------------------------------------------ forward, channels in lanes

@dataclasses.dataclass(frozen=True)
class _LanesForward:
    """A forward convolution with output channels in the lanes, over samples that
    `placement` lays out as `g`'s padded planes: outT (P, Op) by tiles of 6 pixels x a
    group of channel vectors, summed over blocks of steps (one block up to
    `_MAX_K_UNSPLIT` steps, else blocks of at most `_MAX_K_BLOCK`; the first block
    starting from the bias, relu applied to the last one's sums), then
    transposed into out[n]. Phase 1 (thread 0) packs the weights with `pack` (default: W
    (O, K) transposed into Wt (K, Op)) and the bias (zero-padded to Op)."""

    g: ConvGeometry
    placement: _Placement
    bias: bool = False
    relu: bool = False
    weight_input: int = 1
    pack: Callable | None = None

    def emit(self, module: ir.Module, name: str, *, n_inputs: int, max_threads: int) -> Kernel:
        g, width = self.g, vector_width_f32()
        O, K, P = g.out_channels, g.patch_size, g.pixels
        lanes = _round_up(O, width)
        tiles = -(-P // _TILE_ROWS)
        layout = _ScratchLayout(shared={"wt": K * lanes, "bias": lanes},
                                private={"x": self.placement.buffer_floats(width),
                                         "outT": tiles * _TILE_ROWS * lanes})
        tables = _Tables(module, name)
        pixels = tables.add("pixels", _padded_list(g.pixel_offsets(), tiles * _TILE_ROWS))
        steps = tables.add("steps", g.tap_offsets())
        blocks = 1 if K <= _MAX_K_UNSPLIT else _ceil_div(K, _MAX_K_BLOCK)
        block = _ceil_div(K, blocks)

        def pack_weights(kb, inputs, scratch):
            wt = layout.shared(kb, scratch, "wt")
            if self.pack is not None:
                self.pack(kb, inputs[self.weight_input], wt, lanes)
            else:
                _call_transpose(kb, inputs[self.weight_input], K, wt, lanes,
                                rows=O, cols=K, lanes=lanes)
            biases = layout.shared(kb, scratch, "bias")
            if self.bias:
                _emit_copy_zero_tail(kb, inputs[2], biases, O, lanes)
            else:
                emit_fill_zero(kb, biases, kb.i64(lanes))

        fn, kb = phase_function(module, f"{name}.compute", n_inputs)
        out, inputs, scratch, tid, nthreads = phase_args(fn)
        wt, biases = layout.shared(kb, scratch, "wt"), layout.shared(kb, scratch, "bias")
        out_t = layout.private(kb, scratch, tid, "outT")
        x_buffer = self.placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
        with _my_samples(kb, g.batch, tid, nthreads) as n:
            x_n = self.placement.place(kb, _sample(kb, inputs[0], n,
                                                   self.placement.source_floats), x_buffer)
            with kb.for_range(0, blocks, name="block", unroll="never") as index:
                k0 = kb.mul(index, block)
                first = kb.b.icmp_signed("==", index, kb.i64(0))
                last = kb.b.icmp_signed("==", index, kb.i64(blocks - 1))

                def group(ch0, vecs):
                    tile_fn = _tile_function(module, _TILE_ROWS, vecs, "a")
                    with kb.for_range(0, tiles, name="tile", unroll="never") as t:
                        p0 = kb.mul(t, _TILE_ROWS)
                        c = kb.gep(out_t, kb.add(kb.mul(p0, lanes), ch0))
                        # Later blocks add to the sums of the earlier ones, kept in outT.
                        select = kb.b.select
                        _call_tile(kb, tile_fn, a=x_n, a_rows=kb.gep(pixels, p0),
                                   b=kb.gep(wt, kb.add(kb.mul(k0, lanes), ch0)),
                                   steps=kb.gep(steps, k0), stride=lanes,
                                   n=kb.min(block, kb.sub(K, k0)), c=c, c_row=lanes,
                                   v_step=kb.width, init=select(first, kb.gep(biases, ch0), c),
                                   init_row=select(first, kb.i64(0), kb.i64(lanes)),
                                   init_vec=kb.i64(kb.width),
                                   relu=kb.b.and_(last, ir.Constant(I1, int(self.relu))))

                _emit_channel_groups(kb, lanes, group)
            _call_transpose(kb, out_t, lanes, _sample(kb, out, n, O * P), P,
                            rows=P, cols=O, lanes=P)
        kb.b.ret_void()
        pack = _thread0_phase(module, f"{name}.pack", n_inputs, pack_weights)
        return Kernel([pack, fn], layout.total_floats(max_threads))


def _emit_forward_channel_lanes(module: ir.Module, name: str, g: ConvGeometry, *, bias: bool,
                                relu: bool, max_threads: int) -> Kernel:
    return _LanesForward(g, _Placement.padding_of(g), bias=bias, relu=relu).emit(
        module, name, n_inputs=3 if bias else 2, max_threads=max_threads)


def _emit_channel_groups(kb: KernelBuilder, lanes: int,
                         body: Callable[[ir.Value, int], None]) -> None:
    """body(first_channel, vecs) for the channel groups of a tile: `_tile_vectors()`
    vectors each, the last one maybe narrower."""
    vectors = lanes // kb.width
    group = min(_tile_vectors(), vectors)
    with kb.for_range(0, vectors // group, name="group", unroll="never") as index:
        body(kb.mul(index, group * kb.width), group)
    if vectors % group:
        body(kb.i64((vectors - vectors % group) * kb.width), vectors % group)


# -------------------------------------------------------------- forward, pixels in lanes

def _emit_forward_pixel_lanes(module: ir.Module, name: str, g: ConvGeometry, *, bias: bool,
                              relu: bool, max_threads: int) -> Kernel:
    """out[o, oh, ow..] by tiles of (up to) 6 output channels x a pair of vectors of one
    output row, broadcasting packed weights Wp[k, r] and reading x at one offset per tap.

    Phase 1 (thread 0): Wp, for the group of `rows` channels from o0, the (K, rows) block
    at o0*K; the bias of channel o splatted into a vector (the initial accumulators).
    Phase 2: per sample, every tile, stored straight into out[n]. Groups come in runs of
    equal sizes (`_equal_runs`: 64 channels are 9 x 6 + 2 x 5), each run an IR loop.
    """
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    runs = _equal_runs(O, _TILE_ROWS)
    layout = _ScratchLayout(shared={"wp": O * K, "bias": O * width},
                            private={"x": _Placement.padding_of(g).buffer_floats(width)})
    tables = _Tables(module, name)
    steps = tables.add("steps", g.tap_offsets())
    placement = _Placement.padding_of(g)
    n_inputs = 3 if bias else 2

    def pack(kb, inputs, scratch):
        wp, biases = layout.shared(kb, scratch, "wp"), layout.shared(kb, scratch, "bias")
        for first, rows, count in runs:
            with kb.for_range(0, count, name="group", unroll="never") as group:
                o0 = kb.add(first, kb.mul(group, rows))
                _call_transpose(kb, kb.gep(inputs[1], kb.mul(o0, K)), K,
                                kb.gep(wp, kb.mul(o0, K)), rows, rows=rows, cols=K, lanes=rows)
        if bias:
            with kb.for_range(0, O, name="o", unroll="never") as o:
                kb.store_vec(kb.splat(kb.load(inputs[2], o)), biases, kb.mul(o, width))

    fn, kb = phase_function(module, f"{name}.compute", n_inputs)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    wp, biases = layout.shared(kb, scratch, "wp"), layout.shared(kb, scratch, "bias")
    x_buffer = placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    row_indices = _row_indices(module)
    zeros = _zeros(module)
    cover = _VectorCover.of(g.out_w, width)
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = placement.place(kb, _sample(kb, inputs[0], n, g.sample_floats), x_buffer)
        out_n = _sample(kb, out, n, O * P)
        for first, rows, count in runs:
            with kb.for_range(0, count, name="group", unroll="never") as group:
                o0 = kb.add(first, kb.mul(group, rows))
                init, init_row = ((kb.gep(biases, kb.mul(o0, width)), width) if bias
                                  else (zeros, 0))
                with kb.for_range(0, g.out_h, name="oh", unroll="never") as oh:
                    cover.emit_each(kb, _tiles_along(
                        kb, rows, "b", b=kb.gep(x_n, kb.mul(oh, g.stride_h * g.padded_w)),
                        c=kb.gep(out_n, kb.add(kb.mul(o0, P), kb.mul(oh, g.out_w))),
                        a=kb.gep(wp, kb.mul(o0, K)), a_rows=row_indices, steps=steps,
                        stride=rows, n=kb.i64(K), c_row=P, init=init, init_row=init_row,
                        init_vec=0, relu=relu))
    kb.b.ret_void()
    pack_fn = _thread0_phase(module, f"{name}.pack", n_inputs, pack)
    return Kernel([pack_fn, fn], layout.total_floats(max_threads))


# ---------------------------------------------------------------------- input gradient

def _emit_input_grad_as_forward(module: ir.Module, name: str, g: ConvGeometry, *,
                                max_threads: int) -> Kernel:
    """dx as the forward convolution, with input channels in the lanes, of g dilated by
    the stride and padded by kernel - 1 - padding, with W flipped and transposed:

        dx[c, y, x] = sum over (o, i, j) of gd[o, y + i, x + j] * W[o, c, kh-1-i, kw-1-j]

    where gd[o, oh*sh + kh-1-pt, ow*sw + kw-1-pl] = g[o, oh, ow] and gd is 0 elsewhere.
    """
    forward = ConvGeometry(g.height + g.kernel_h - 1, g.width + g.kernel_w - 1,
                           g.kernel_h, g.kernel_w, 1, 1, 0, 0, 0, 0, batch=g.batch,
                           channels=g.out_channels, out_channels=g.channels)
    placement = _Placement(channels=g.out_channels, src_h=g.out_h, src_w=g.out_w,
                           dst_h=forward.height, dst_w=forward.width,
                           step_y=g.stride_h, step_x=g.stride_w,
                           first_y=g.kernel_h - 1 - g.pad_top,
                           first_x=g.kernel_w - 1 - g.pad_left)
    C, O, taps = g.channels, g.out_channels, g.taps

    def pack(kb, w, wt, lanes):
        # Wt[(o, i, j), c] = W[o, c, kh-1-i, kw-1-j]: W[o] is (C, taps); transposed, its
        # tap t is row o*taps + taps-1-t of Wt, hence the negative row stride.
        with kb.for_range(0, O, name="o", unroll="never") as o:
            last_row = kb.mul(kb.add(kb.mul(o, taps), taps - 1), lanes)
            _call_transpose(kb, kb.gep(w, kb.mul(o, C * taps)), taps, kb.gep(wt, last_row),
                            -lanes, rows=C, cols=taps, lanes=lanes)

    return _LanesForward(forward, placement, pack=pack).emit(
        module, name, n_inputs=2, max_threads=max_threads)


def _emit_input_grad_by_cols(module: ir.Module, name: str, g: ConvGeometry, *,
                             max_threads: int) -> Kernel:
    """dx for stride 1 and few input channels: per sample and input channel c, the GEMM

        cols[(i, j), p] = sum over o of W[o, c, i, j] * g[o, p]

    by tiles of (up to) 6 taps x a pair of pixel vectors (pixels in lanes, W broadcast,
    read in place), then `_emit_col2im` while cols (taps x P floats, 10 KB for LeNet's
    conv2) is still in L1.
    """
    width = vector_width_f32()
    O, P, T = g.out_channels, g.pixels, g.taps
    margin = g.kernel_w + g.pad_left + width
    layout = _ScratchLayout(shared={}, private={"cols": T * P + 2 * margin})
    tables = _Tables(module, name)
    steps = tables.add("steps", [o * g.patch_size for o in range(O)])
    cover = _VectorCover.of(P, width)

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (grad, w), scratch, tid, nthreads = phase_args(fn)
    cols = kb.gep(layout.private(kb, scratch, tid, "cols"), margin)
    row_indices, zeros = _row_indices(module), _zeros(module)
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        g_n = _sample(kb, grad, n, O * P)
        dx_n = _sample(kb, out, n, g.sample_floats)
        with kb.for_range(0, g.channels, name="c", unroll="never") as c:
            w_c = kb.gep(w, kb.mul(c, T))

            for first, rows, count in _equal_runs(T, _TILE_ROWS):
                with kb.for_range(0, count, name="rows", unroll="never") as t:
                    r0 = kb.add(first, kb.mul(t, rows))
                    cover.emit_each(kb, _tiles_along(
                        kb, rows, "a", b=g_n, c=kb.gep(cols, kb.mul(r0, P)),
                        a=kb.gep(w_c, r0), a_rows=row_indices, steps=steps, stride=P,
                        n=kb.i64(O), c_row=P, init=zeros, init_row=0, init_vec=0))
            _emit_col2im(kb, g, cols, kb.gep(dx_n, kb.mul(c, g.height * g.width)))
    kb.b.ret_void()
    return Kernel([fn], layout.total_floats(max_threads))


# Samples per group of the batch-in-lanes input gradient: two vectors' worth, the two
# vectors of its register tile, interleaved so that a step loads one whole cache line.
def _batch_group() -> int:
    return 2 * vector_width_f32()


# Most floats of the batch-in-lanes input gradient's transposed g (a group's): read from
# L2 by every tile, it must stay there.
_MAX_BATCH_G_FLOATS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _BatchLanesInputGrad:
    """dx with the samples in the lanes (stride 1): for each group of 2W samples, gT =
    g transposed to (O, OH, OW, 2W), then for every dx pixel (y, x) and group of (up to) 6
    input channels one register tile

        dxT[c, y, x, :] = sum over the taps (i, j) that read g inside g, and o, of
                          W[o, c, i, j] * gT[o, y+pt-i, x+pl-j, :]

    rows: channels, broadcast from packed weights; vectors: the two halves of the group.
    Only useful multiply-adds, no col2im, and reductions of O x (valid taps) steps (LeNet's
    conv2: up to 400) instead of the cols GEMM's O (16). dxT is transposed into dx.

    The valid taps of a pixel are a rectangle i in [i0, i1], j in [j0, j1]. The packed
    weights Wp hold, for each distinct j range (at most 2 kw - 1 of them), the rows
    (i, o, j) for every i, each row the C channels: a pixel's steps are then one run of
    rows from i0's to i1's, so its weight offsets are affine and only g's come from a
    table (`steps`, one entry per row of Wp). A table per pixel gives its first row, its
    number of steps and where gT's cell for its tap (0, 0) lies.
    """

    g: ConvGeometry

    def j_ranges(self) -> dict[tuple[int, int], int]:
        """Each distinct valid range (j0, j1) of the dx columns, in order: its first row of Wp."""
        g, starts, row = self.g, {}, 0
        for x in range(g.width):
            j0, j1 = self._valid(x + g.pad_left, g.out_w, g.kernel_w)
            if j1 >= j0 and (j0, j1) not in starts:
                starts[(j0, j1)] = row
                row += g.kernel_h * g.out_channels * (j1 - j0 + 1)
        return starts

    @staticmethod
    def _valid(padded: int, out: int, kernel: int) -> tuple[int, int]:
        """Taps t whose output cell padded - t lies in [0, out)."""
        return max(0, padded - out + 1), min(kernel - 1, padded)

    def rows(self) -> list[tuple[int, int, int]]:
        """(i, o, j) of each row of Wp."""
        g = self.g
        return [(i, o, j) for (j0, j1) in self.j_ranges() for i in range(g.kernel_h)
                for o in range(g.out_channels) for j in range(j0, j1 + 1)]

    def pixel_table(self, lanes: int) -> list[int]:
        """(first row, steps, gT offset of tap (0, 0)) per dx pixel, row-major."""
        g, starts, table = self.g, self.j_ranges(), []
        for y in range(g.height):
            i0, i1 = self._valid(y + g.pad_top, g.out_h, g.kernel_h)
            for x in range(g.width):
                j0, j1 = self._valid(x + g.pad_left, g.out_w, g.kernel_w)
                if i1 < i0 or j1 < j0:
                    table += [0, 0, 0]
                    continue
                per_i = g.out_channels * (j1 - j0 + 1)
                table += [starts[(j0, j1)] + i0 * per_i, (i1 - i0 + 1) * per_i,
                          ((y + g.pad_top) * g.out_w + x + g.pad_left) * lanes]
        return table

    def emit(self, module: ir.Module, name: str, *, max_threads: int) -> Kernel:
        g, lanes = self.g, _batch_group()
        C, O, P, plane = g.channels, g.out_channels, g.pixels, g.height * g.width
        rows = self.rows()
        # A pixel's gT pointer (its tap (0, 0)'s cell) may lie past g when that tap is not
        # valid: the margin keeps it inside the region.
        margin = ((g.height + g.pad_top) * g.out_w + g.width + g.pad_left) * lanes
        layout = _ScratchLayout(shared={"wp": len(rows) * C},
                                private={"gT": max(O * P * lanes, margin) + lanes,
                                         "dxT": C * plane * lanes})
        tables = _Tables(module, name)
        sources = tables.add("sources", [o * g.patch_size + i * g.kernel_w + j
                                         for i, o, j in rows])
        steps = tables.add("steps", [(o * P - i * g.out_w - j) * lanes for i, o, j in rows])
        pixels = tables.add("pixels", self.pixel_table(lanes))

        def pack(kb, inputs, scratch):
            # Wp[r, c] = W[o, c, i, j] for row r = (i, o, j).
            wp = layout.shared(kb, scratch, "wp")
            with kb.for_range(0, len(rows), name="row", unroll="never") as r:
                source = kb.gep(inputs[1], _load_index(kb, sources, r))
                with kb.for_range(0, C, name="c", unroll="never") as c:
                    kb.store(kb.load(source, kb.mul(c, g.taps)), wp, kb.add(kb.mul(r, C), c))

        fn, kb = phase_function(module, f"{name}.compute", 2)
        out, (grad, _), scratch, tid, nthreads = phase_args(fn)
        wp = layout.shared(kb, scratch, "wp")
        g_t = layout.private(kb, scratch, tid, "gT")
        dx_t = layout.private(kb, scratch, tid, "dxT")
        full, rest = divmod(g.batch, lanes)
        groups = full + (rest > 0)
        lo, hi = kb.split_range(groups, tid, nthreads)
        with kb.for_range(lo, kb.min(hi, full), name="group", unroll="never") as group:
            self._emit_group(kb, grad, out, wp, g_t, dx_t, steps, pixels,
                             kb.mul(group, lanes), lanes)
        if rest:
            # The last, partial group belongs to the thread whose share ends the range.
            with kb.if_then(kb.b.icmp_signed("==", hi, kb.i64(groups))):
                self._emit_group(kb, grad, out, wp, g_t, dx_t, steps, pixels,
                                 kb.i64(full * lanes), rest)
        kb.b.ret_void()
        pack_fn = _thread0_phase(module, f"{name}.pack", 2, pack)
        return Kernel([pack_fn, fn], layout.total_floats(max_threads))

    def _emit_group(self, kb: KernelBuilder, grad, out, wp, g_t, dx_t, steps, pixels,
                    n0: ir.Value, samples: int) -> None:
        """dx of samples n0 .. n0 + samples - 1 (samples <= the group's lanes)."""
        g, width, lanes = self.g, kb.width, _batch_group()
        C, O, P, plane = g.channels, g.out_channels, g.pixels, g.height * g.width
        halves = [(h * width, min(width, samples - h * width))
                  for h in range(-(-samples // width))]
        for first, count in halves:
            # gT[(o, p), first + s] = g[n0 + first + s, o, p]; missing samples are zeros.
            _call_transpose(kb, _sample(kb, grad, kb.add(n0, first), O * P), O * P,
                            kb.gep(g_t, first), lanes, rows=count, cols=O * P, lanes=width)
        row_indices, zeros = _row_indices(kb.module), _zeros(kb.module)
        with kb.for_range(0, plane, name="pixel", unroll="never") as pixel:
            entry = kb.mul(pixel, 3)
            first_row = _load_index(kb, pixels, entry)
            n = _load_index(kb, pixels, kb.add(entry, 1))
            b = kb.gep(g_t, _load_index(kb, pixels, kb.add(entry, 2)))
            for c0, rows in _balanced(C, _TILE_ROWS):
                _call_tile(kb, _tile_function(kb.module, rows, len(halves), "b"),
                           a=kb.gep(wp, kb.add(kb.mul(first_row, C), c0)), a_rows=row_indices,
                           b=b, steps=kb.gep(steps, first_row), stride=C, n=n,
                           c=kb.gep(dx_t, kb.mul(kb.add(pixel, c0 * plane), lanes)),
                           c_row=plane * lanes, v_step=width, init=zeros, init_row=0,
                           init_vec=0)
        for first, count in halves:
            _call_transpose(kb, kb.gep(dx_t, first), lanes,
                            _sample(kb, out, kb.add(n0, first), C * plane), C * plane,
                            rows=C * plane, cols=count, lanes=C * plane)


def _emit_input_grad_batch_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                 max_threads: int) -> Kernel:
    return _BatchLanesInputGrad(g).emit(module, name, max_threads=max_threads)


def _emit_col2im(kb: KernelBuilder, g: ConvGeometry, cols: ir.Value, dx: ir.Value) -> None:
    """dx[y, x] = sum over taps (i, j) of cols[(i, j), (y+pt-i, x+pl-j)] where that output
    pixel exists (stride 1), for one input channel, a vector of x at a time, summed in
    registers.

    The tap rows i that exist for dx row y form a range (runtime bounds); a tap column j
    moves the vector's pixels by j, some of them out of the output row: those lanes are
    masked to zero (the loads themselves may read the neighbouring row, or the margins
    around cols, and are never out of bounds). A row of dx is covered by whole vectors,
    the last one shifted left to end on the row; a row narrower than a vector is stored
    masked. With few vectors per row (LeNet: 2), all of a row's are summed together and
    their masks are constants.
    """
    width = kb.width
    starts = ([0] if g.width < width else
              list(range(0, g.width - width + 1, width)) +
              ([g.width - width] if g.width % width else []))
    store_mask = kb.lane_mask(g.width) if g.width < width else None
    if len(starts) <= 4:
        _emit_col2im_rows(kb, g, cols, dx, [kb.i64(x0) for x0 in starts], store_mask)
        return
    with kb.for_range(0, len(starts) - 1, name="x", unroll="never") as index:
        _emit_col2im_rows(kb, g, cols, dx, [kb.mul(index, width)], None)
    _emit_col2im_rows(kb, g, cols, dx, [kb.i64(starts[-1])], None)


def _emit_col2im_rows(kb: KernelBuilder, g: ConvGeometry, cols: ir.Value, dx: ir.Value,
                      starts: list[ir.Value], store_mask) -> None:
    """`_emit_col2im` for the vectors of dx rows starting at columns `starts`."""
    lane_index = ir.Constant(ir.VectorType(I64, kb.width), list(range(kb.width)))
    zero = kb.splat(0.0)

    def column_mask(x0, j):
        """Lanes whose output column x0 + pl - j + lane lies in the output row."""
        column = kb.b.add(kb.splat_i64(kb.add(x0, g.pad_left - j)), lane_index)
        return kb.b.and_(kb.b.icmp_signed(">=", column, kb.splat_i64(kb.i64(0))),
                         kb.b.icmp_signed("<", column, kb.splat_i64(kb.i64(g.out_w))))

    masks = [[column_mask(x0, j) for j in range(g.kernel_w)] for x0 in starts]
    # Several sums per vector: a single one would chain every add to the one before (25
    # adds of 3 cycles' latency for 5 x 5 taps).
    sums = max(1, min(g.kernel_w, 8 // len(starts)))
    with kb.for_range(0, g.height, name="y", unroll="never") as y:
        top = kb.add(y, g.pad_top)   # the dx row in padded coordinates
        first = kb.max(0, kb.sub(top, g.out_h - 1))
        stop = kb.min(g.kernel_h, kb.add(top, 1))
        acc = [[kb.variable(zero) for _ in range(sums)] for _ in starts]
        with kb.for_range(first, stop, name="i", unroll="never") as i:
            pixel = kb.add(kb.mul(kb.sub(top, i), g.out_w), g.pad_left)
            for j in range(g.kernel_w):
                tap_start = kb.add(kb.mul(kb.add(kb.mul(i, g.kernel_w), j), g.pixels),
                                   kb.sub(pixel, j))
                for x0, x_masks, x_acc in zip(starts, masks, acc):
                    value = kb.b.select(x_masks[j], kb.load_vec(cols, kb.add(tap_start, x0)),
                                        zero)
                    slot = x_acc[j % sums]
                    kb.set(slot, kb.fadd(kb.get(slot), value))
        for x0, x_acc in zip(starts, acc):
            total = kb.get(x_acc[0])
            for partial in x_acc[1:]:
                total = kb.fadd(total, kb.get(partial))
            _store(kb, total, dx, kb.add(kb.mul(y, g.width), x0), store_mask)


# ---------------------------------------------------------------------- weight gradient

def _emit_weight_grad_channel_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                    max_threads: int) -> Kernel:
    """dW with output channels in the lanes.

    Phase 1: each thread sums, over its share of the batch, its own partial dWt (K, Op):
    per sample, gT = g[n]^T (P, Op), then tiles of (up to) 6 taps x a group of channel
    vectors, summed over blocks of at most `_MAX_P_BLOCK` pixels. Taps are cut into tiles
    of balanced sizes (27 = 6 + 6 + 5 + 5 + 5): the conv net's first layer lost 6% to 5
    tiles of 6 with 3 padding rows. Phase 2 (thread 0): adds the partials and transposes
    the sum into out (O, K).
    """
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    lanes = _round_up(O, width)
    layout = _ScratchLayout(shared={}, private={
        "x": _Placement.padding_of(g).buffer_floats(width), "gT": P * lanes,
        "dWt": K * lanes})
    tables = _Tables(module, name)
    taps = tables.add("taps", g.tap_offsets())
    steps = tables.add("steps", g.pixel_offsets())
    placement = _Placement.padding_of(g)
    blocks = -(-P // _MAX_P_BLOCK)
    block = -(-P // blocks)

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    g_t = layout.private(kb, scratch, tid, "gT")
    partial = layout.private(kb, scratch, tid, "dWt")
    x_buffer = placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(K * lanes))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = placement.place(kb, _sample(kb, x, n, g.sample_floats), x_buffer)
        _call_transpose(kb, _sample(kb, grad, n, O * P), P, g_t, lanes,
                        rows=O, cols=P, lanes=lanes)
        with kb.for_range(0, blocks, name="block", unroll="never") as index:
            p0 = kb.mul(index, block)

            def group(ch0, vecs):
                for first, rows, count in _equal_runs(K, _TILE_ROWS):
                    tile_fn = _tile_function(module, rows, vecs, "a")
                    with kb.for_range(0, count, name="tile", unroll="never") as t:
                        k0 = kb.add(first, kb.mul(t, rows))
                        c = kb.gep(partial, kb.add(kb.mul(k0, lanes), ch0))
                        _call_tile(kb, tile_fn, a=x_n, a_rows=kb.gep(taps, k0),
                                   b=kb.gep(g_t, kb.add(kb.mul(p0, lanes), ch0)),
                                   steps=kb.gep(steps, p0), stride=lanes,
                                   n=kb.min(block, kb.sub(P, p0)), c=c, c_row=lanes,
                                   v_step=kb.width, init=c, init_row=lanes,
                                   init_vec=kb.width)

            _emit_channel_groups(kb, lanes, group)
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        total = _sum_thread_partials(kb, layout, scratch, nthreads, "dWt", K * lanes)
        _call_transpose(kb, total, lanes, out, K, rows=K, cols=O, lanes=K)
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))


def _emit_weight_grad_pixel_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                  max_threads: int) -> Kernel:
    """dW by dot products over wide rows (stride 1): per sample, gw = g[n] with its rows
    padded to x's padded width Wp by zeros, then for every group of (up to) 6 channels and
    pair of taps, acc[o][t] += gw[o, q:q+W] * x[q + tap(t) : +W] over all q: the zeros of
    gw cancel the products of its extra columns. The lanes of acc are partial sums.

    Phase 1: each thread keeps its own partial vectors (Kp, rows, W). Phase 2 (thread 0):
    sums them over threads and lanes into out.
    """
    width = vector_width_f32()
    O, K = g.out_channels, g.patch_size
    groups = _balanced(O, _TILE_ROWS)
    rows = _round_up(O, groups[0][1])
    taps_rows = _round_up(K, 2)
    wide = g.out_h * g.padded_w
    vectors = -(-wide // width)
    # x is read up to a vector and a tap row past its last padded row.
    x_placement = _Placement.padding_of(g, always=True, margin=g.kernel_w + width)
    g_placement = _Placement(channels=O, src_h=g.out_h, src_w=g.out_w, dst_h=g.out_h,
                             dst_w=g.padded_w, step_y=1, step_x=1, first_y=0, first_x=0,
                             always=True)
    g_plane = g.out_h * g.padded_w + width
    layout = _ScratchLayout(shared={}, private={
        "x": x_placement.buffer_floats(width),
        "gw": O * g_plane + width, "dWv": taps_rows * rows * width})
    tables = _Tables(module, name)
    taps = tables.add("taps", _padded_list(g.tap_offsets(), taps_rows))
    g_rows = tables.add("grows", [o * g_plane for o in range(rows)])

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    partial = layout.private(kb, scratch, tid, "dWv")
    x_buffer = x_placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    g_buffer = layout.private(kb, scratch, tid, "gw")
    # The copies of g[n] only write its rows; the extra columns stay zero.
    emit_fill_zero(kb, g_buffer, kb.i64(O * g_plane + width))
    emit_fill_zero(kb, partial, kb.i64(taps_rows * rows * width))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = x_placement.place(kb, _sample(kb, x, n, g.sample_floats), x_buffer)
        g_placement.place(kb, _sample(kb, grad, n, O * g.pixels), g_buffer, stride=g_plane)
        for o0, group_rows in groups:
            dot_fn = _dot_function(module, group_rows, 2)
            with kb.for_range(0, taps_rows // 2, name="taps", unroll="never") as t:
                k0 = kb.mul(t, 2)
                c = kb.gep(partial, kb.mul(kb.add(kb.mul(k0, rows), o0), width))
                kb.b.call(dot_fn, [g_buffer, kb.gep(g_rows, o0), x_n, kb.gep(taps, k0),
                                   kb.i64(vectors), c, kb.i64(width), kb.i64(rows * width)])
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        total = _sum_thread_partials(kb, layout, scratch, nthreads, "dWv", taps_rows * rows * width)
        with kb.for_range(0, O, name="o", unroll="never") as o:
            with kb.for_range(0, K, name="k", unroll="never") as k:
                vector = kb.load_vec(total, kb.mul(kb.add(kb.mul(k, rows), o), width))
                # A vector reduction: it also keeps the loop vectorizer off this scalar loop,
                # which made a large gather of it.
                kb.store(horizontal_sum(kb, vector), out, kb.add(kb.mul(o, K), k))
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))


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
# K (the conv net: 83-95 GFLOP/s against 47-87 with channels in lanes, the short K = 27
# of its first layer the worst).
FORWARD_PATHS = (
    _Path("pixels in lanes", _forward_pixels_possible,
          lambda g, width: g.out_w / _VectorCover.of(g.out_w, width).lanes,
          _emit_forward_pixel_lanes),
    _Path("channels in lanes", _always,
          lambda g, width: _lanes_efficiency(g.out_channels, width),
          _emit_forward_channel_lanes),
)

INPUT_GRAD_PATHS = (
    _Path("as forward", _always, _input_grad_as_forward_efficiency,
          _emit_input_grad_as_forward),
    _Path("cols", _input_grad_by_cols_possible,
          lambda g, width: g.pixels / _VectorCover.of(g.pixels, width).lanes,
          _emit_input_grad_by_cols),
    _Path("batch in lanes", _input_grad_batch_lanes_possible,
          _input_grad_batch_lanes_efficiency, _emit_input_grad_batch_lanes),
)

# Channels in lanes win ties: the dot products' partial sums in every lane are added up
# after every call, and their g is copied per sample (the conv net, 32-64 channels:
# 69-82 GFLOP/s against 86-88).
WEIGHT_GRAD_PATHS = (
    _Path("channels in lanes", _always,
          lambda g, width: _lanes_efficiency(g.out_channels, width),
          _emit_weight_grad_channel_lanes),
    _Path("pixels in lanes", _stride_one, lambda g, width: g.out_w / g.padded_w,
          _emit_weight_grad_pixel_lanes),
)


# ------------------------------------------------------------------------ register tiles

def _tile_vectors() -> int:
    """Channel vectors per register tile: 2 with 16 vector registers (6 rows x 2 = 12
    accumulators + 2 operand vectors + 1 broadcast, gemm.py's AVX2 tile), 4 with 32."""
    return 4 if vector_register_count() >= 32 else 2


def _accumulators() -> int:
    """Accumulator registers of a full tile."""
    return _TILE_ROWS * _tile_vectors()


def _tile_function(module: ir.Module, rows: int, vecs: int, table: str) -> ir.Function:
    """The module's register tile of `rows` x `vecs` vectors whose `table` ("a" or "b")
    operand's steps are offsets in a table, made on first use:

        void tile(a, a_rows, b, steps, stride, n, c, c_row, v_step, init, init_row,
                  init_vec, relu)

    acc[r][v] = init[r*init_row + v*init_vec : +W]; then for each of the n steps s,
        acc[r][v] += broadcast(a[a_rows[r] + da]) * b[db + v*v_step : +W]
    where, for table "a", da = steps[s] and db = s*stride (and for "b" the other way
    round); and (if relu) acc = max(acc, 0); stored at c[r*c_row + v*v_step : +W].
    Offsets are in floats, the tables i32. One operand's offsets are always affine (a
    weight or a channel-minor operand), and a second table load per step cost up to 15%
    on the conv net (10 loads per 12 FMAs).

    Two steps per loop iteration (one: 6% slower on LeNet's input gradient, whose
    reductions are 16 steps long). A tile of fewer accumulators than a full one may have
    too few to hide the FMA latency, so it alternates between two sets of them, summed at
    the end (a tile one vector wide; a short last group of rows).
    """
    name = f"graphc.conv.tile{rows}x{vecs}{table}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn, kb = _internal_function(module, name, [PTR, PTR, PTR, PTR, I64, I64, PTR, I64, I64,
                                               PTR, I64, I64, I1])
    a, a_rows, b, steps, stride, n, c, c_row, v_step, init, init_row, init_vec, relu = fn.args
    row_ptrs = [kb.gep(a, _load_index(kb, a_rows, r)) for r in range(rows)]
    b_ptrs = [kb.gep(b, kb.mul(v, v_step)) for v in range(vecs)]
    first = [[kb.variable(kb.load_vec(init, kb.add(kb.mul(r, init_row), kb.mul(v, init_vec))))
              for v in range(vecs)] for r in range(rows)]
    sets = [first]
    if 2 * rows * vecs <= _accumulators():
        sets.append([[kb.variable(kb.splat(0.0)) for _ in range(vecs)] for _ in range(rows)])

    def step(s, acc):
        looked_up, affine = _load_index(kb, steps, s), kb.mul(s, stride)
        da, db = (looked_up, affine) if table == "a" else (affine, looked_up)
        b_vectors = [kb.load_vec(ptr, db) for ptr in b_ptrs]
        for ptr, row_acc in zip(row_ptrs, acc):
            a_value = kb.splat(kb.load(ptr, da))
            for b_vector, slot in zip(b_vectors, row_acc):
                kb.set(slot, kb.fma(a_value, b_vector, kb.get(slot)))

    pairs_end = kb.b.and_(n, kb.i64(-2))
    with kb.for_range(0, pairs_end, step=2, name="s", unroll="never") as s:
        step(s, sets[0])
        step(kb.add(s, 1), sets[-1])
    with kb.if_then(kb.b.icmp_signed("<", pairs_end, n)):
        step(pairs_end, sets[0])

    for r in range(rows):
        for v in range(vecs):
            value = kb.get(first[r][v])
            if len(sets) > 1:
                value = kb.fadd(value, kb.get(sets[1][r][v]))
            value = kb.b.select(relu, kb.relu(value), value)
            kb.store_vec(value, c, kb.add(kb.mul(r, c_row), kb.mul(v, v_step)))
    kb.b.ret_void()
    return fn


def _tiles_along(kb: KernelBuilder, rows: int, table: str, *, b: ir.Value, c: ir.Value,
                 **operands) -> Callable[[ir.Value, int, int], None]:
    """tile(start, vecs, step) for `_VectorCover.emit_each`: the tile of `rows` whose
    vectors start `start` floats into the runs at b (its vector operand) and at c."""
    def tile(start, vecs, step):
        _call_tile(kb, _tile_function(kb.module, rows, vecs, table), b=kb.gep(b, start),
                   c=kb.gep(c, start), v_step=step, **operands)
    return tile


def _call_tile(kb: KernelBuilder, fn: ir.Function, *, a, a_rows, b, steps, stride, n, c,
               c_row, v_step, init, init_row, init_vec, relu: bool | ir.Value = False) -> None:
    if not isinstance(relu, ir.Value):
        relu = ir.Constant(I1, int(relu))
    kb.b.call(fn, [a, a_rows, b, steps, kb.as_i64(stride), kb.as_i64(n), c,
                   kb.as_i64(c_row), kb.as_i64(v_step), init, kb.as_i64(init_row),
                   kb.as_i64(init_vec), relu])


def _dot_function(module: ir.Module, rows: int, vecs: int) -> ir.Function:
    """The module's tile of dot products, made on first use:

        void dot(a, a_rows, b, b_cols, n, c, c_row, c_vec)

    acc[r][v] = c[r*c_row + v*c_vec : +W], then for q in 0, W, ..., (n-1)*W:
        acc[r][v] += a[a_rows[r] + q : +W] * b[b_cols[v] + q : +W]
    stored back: each lane a partial sum of the dot product of row r and column v.
    """
    name = f"graphc.conv.dot{rows}x{vecs}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn, kb = _internal_function(module, name, [PTR, PTR, PTR, PTR, I64, PTR, I64, I64])
    a, a_rows, b, b_cols, n, c, c_row, c_vec = fn.args
    row_ptrs = [kb.gep(a, _load_index(kb, a_rows, r)) for r in range(rows)]
    col_ptrs = [kb.gep(b, _load_index(kb, b_cols, v)) for v in range(vecs)]
    offsets = [[kb.add(kb.mul(r, c_row), kb.mul(v, c_vec)) for v in range(vecs)]
               for r in range(rows)]
    acc = [[kb.variable(kb.load_vec(c, offsets[r][v])) for v in range(vecs)]
           for r in range(rows)]
    with kb.for_range(0, kb.mul(n, kb.width), step=kb.width, name="q", unroll="never") as q:
        b_vectors = [kb.load_vec(ptr, q) for ptr in col_ptrs]
        for ptr, row_acc in zip(row_ptrs, acc):
            a_vector = kb.load_vec(ptr, q)
            for b_vector, slot in zip(b_vectors, row_acc):
                kb.set(slot, kb.fma(a_vector, b_vector, kb.get(slot)))
    for r in range(rows):
        for v in range(vecs):
            kb.store_vec(kb.get(acc[r][v]), c, offsets[r][v])
    kb.b.ret_void()
    return fn


def _internal_function(module: ir.Module, name: str, arg_types) -> tuple[ir.Function,
                                                                        KernelBuilder]:
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name=name)
    fn.linkage = "internal"
    # Inlined, it would be copied into every caller and optimised again there; a call per
    # tile costs a few percent of its work.
    fn.attributes.add("noinline")
    return fn, KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))


def _load_index(kb: KernelBuilder, table: ir.Value, index) -> ir.Value:
    """Entry `index` of an i32 table, as an i64."""
    value = kb.b.load(kb.gep(table, index), typ=I32, align=4)
    return kb.b.sext(value, I64)


def _balanced(total: int, most: int) -> list[tuple[int, int]]:
    """range(total) cut into consecutive (start, count) pieces of at most `most`, of
    balanced sizes, the larger first: 16 by 6 is 6 + 5 + 5, not 6 + 6 + 4."""
    count = -(-total // most)
    size, larger = divmod(total, count)
    pieces, start = [], 0
    for index in range(count):
        length = size + (index < larger)
        pieces.append((start, length))
        start += length
    return pieces


# ------------------------------------------------------------------------------- tables

class _Tables:
    """A kernel's read-only i32 tables: module globals named after the kernel."""

    def __init__(self, module: ir.Module, kernel_name: str):
        self.module, self.kernel_name = module, kernel_name

    def add(self, name: str, values: Sequence[int]) -> ir.GlobalVariable:
        return _i32_global(self.module, f"{self.kernel_name}.{name}", values)


def _i32_global(module: ir.Module, name: str, values: Sequence[int]) -> ir.GlobalVariable:
    typ = ir.ArrayType(I32, len(values))
    table = ir.GlobalVariable(module, typ, name)
    table.global_constant = True
    table.linkage = "internal"
    table.align = 64
    table.initializer = ir.Constant(typ, [int(v) for v in values])
    return table


def _row_indices(module: ir.Module) -> ir.GlobalVariable:
    """0, 1, ..., 15: the row offsets of a tile whose rows are consecutive floats."""
    existing = module.globals.get("graphc.conv.rows")
    return existing if existing is not None else _i32_global(module, "graphc.conv.rows",
                                                               list(range(16)))


def _zeros(module: ir.Module) -> ir.GlobalVariable:
    """A vector of zeros: the initial accumulators of a tile summed from zero."""
    existing = module.globals.get("graphc.conv.zeros")
    if existing is not None:
        return existing
    typ = ir.ArrayType(F32, 16)
    zeros = ir.GlobalVariable(module, typ, "graphc.conv.zeros")
    zeros.global_constant = True
    zeros.linkage = "internal"
    zeros.align = 64
    zeros.initializer = ir.Constant(typ, [0.0] * 16)
    return zeros


def _equal_runs(total: int, most: int) -> list[tuple[int, int, int]]:
    """`_balanced` pieces as runs of equal sizes: (first start, size, count) each."""
    runs = []
    for start, size in _balanced(total, most):
        if runs and runs[-1][1] == size:
            runs[-1] = (runs[-1][0], size, runs[-1][2] + 1)
        else:
            runs.append((start, size, 1))
    return runs


def _padded_list(values: Sequence[int], length: int) -> list[int]:
    """`values` repeated to `length` by its last entry: the extra rows of a last tile
    read the same (valid) cells as the last real one; their results are never used."""
    return list(values) + [values[-1]] * (length - len(values))


# ------------------------------------------------------------------------------- samples

@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where each sample's planes go in a zero-filled per-thread buffer: source cell
    (r, col) of each of `channels` (src_h, src_w) planes to cell (r*step_y + first_y,
    col*step_x + first_x) of a (dst_h, dst_w) plane, if inside it. A conv's padded copy
    of x, and the input gradient's dilated, padded g."""

    channels: int
    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    step_y: int
    step_x: int
    first_y: int
    first_x: int
    always: bool = False   # copy even when the source could be used in place
    margin: int = 0        # zeros after the last plane, for reads past it

    @classmethod
    def padding_of(cls, g: ConvGeometry, always: bool = False, margin: int = 0) -> _Placement:
        return cls(g.channels, g.height, g.width, g.padded_h, g.padded_w, 1, 1, g.pad_top,
                   g.pad_left, always=always, margin=margin)

    @property
    def source_floats(self) -> int:
        return self.channels * self.src_h * self.src_w

    @property
    def in_place(self) -> bool:
        """The source already is the placed plane."""
        return not self.always and (self.src_h, self.src_w, self.step_y, self.step_x,
                                    self.first_y, self.first_x) == (
            self.dst_h, self.dst_w, 1, 1, 0, 0)

    def buffer_floats(self, width: int) -> int:
        """`width` spare floats take the zeros that a last row's whole vector writes."""
        if self.in_place:
            return 0
        return self.channels * self.dst_h * self.dst_w + width + self.margin

    def prepare_buffer(self, kb: KernelBuilder, buffer: ir.Value) -> ir.Value:
        """Zero the buffer once per call: copies only write the placed cells (and zeros),
        so the other cells stay zero for every sample."""
        if not self.in_place:
            emit_fill_zero(kb, buffer, kb.i64(self.buffer_floats(kb.width)))
        return buffer

    def _range(self, src: int, dst: int, step: int, first: int) -> tuple[int, int]:
        """Source indices whose destination lies in [0, dst)."""
        lo = max(0, _ceil_div(-first, step))
        hi = min(src, (dst - 1 - first) // step + 1) if dst - 1 - first >= 0 else 0
        return lo, max(lo, hi)

    def place(self, kb: KernelBuilder, src: ir.Value, buffer: ir.Value,
              stride: int | None = None) -> ir.Value:
        """Copy sample `src` into `buffer` (planes `stride` floats apart, default
        dst_h*dst_w); returns the placed sample (`src` itself if in place).

        Rows with step_x 1 are copied in whole vectors, the last one's load masked so that
        it supplies zeros past the row's end: the zeros land in the right margin, the next
        rows' left margin or next rows themselves, which are copied later (rows go in
        memory order), never on copied data. Other rows are copied one cell at a time.
        """
        if self.in_place:
            return src
        stride = stride or self.dst_h * self.dst_w
        r_lo, r_hi = self._range(self.src_h, self.dst_h, self.step_y, self.first_y)
        c_lo, c_hi = self._range(self.src_w, self.dst_w, self.step_x, self.first_x)
        if r_lo == r_hi or c_lo == c_hi:
            return buffer
        with kb.for_range(0, self.channels, name="c", unroll="never") as c:
            with kb.for_range(r_lo, r_hi, name="r", unroll="never") as r:
                src_row = kb.gep(src, kb.add(kb.mul(kb.add(kb.mul(c, self.src_h), r),
                                                    self.src_w), c_lo))
                dst_y = kb.add(kb.mul(r, self.step_y), self.first_y)
                dst_row = kb.gep(buffer, kb.add(
                    kb.add(kb.mul(c, stride), kb.mul(dst_y, self.dst_w)),
                    c_lo * self.step_x + self.first_x))
                count = c_hi - c_lo
                if self.step_x == 1:
                    whole = count - count % kb.width
                    with kb.for_range(0, whole, step=kb.width, name="v", unroll="never") as v:
                        kb.store_vec(kb.load_vec(src_row, v), dst_row, v)
                    if count % kb.width:
                        inside = kb.lane_mask(count % kb.width)
                        kb.store_vec(kb.masked_load_vec(src_row, whole, inside), dst_row, whole)
                else:
                    with kb.for_range(0, count, name="col", unroll="never") as col:
                        kb.store(kb.load(src_row, col), dst_row, kb.mul(col, self.step_x))
        return buffer


@contextlib.contextmanager
def _my_samples(kb: KernelBuilder, batch: int, tid, nthreads) -> Iterator[ir.Value]:
    """Loop over this thread's share of the batch; yields the sample index."""
    lo, hi = kb.split_range(batch, tid, nthreads)
    with kb.for_range(lo, hi, name="n", unroll="never") as n:
        yield n


def _sample(kb: KernelBuilder, base: ir.Value, n: ir.Value, floats_per_sample: int) -> ir.Value:
    return kb.gep(base, kb.mul(n, floats_per_sample))


def _emit_copy_zero_tail(kb: KernelBuilder, src: ir.Value, dst: ir.Value, count: int,
                         total: int) -> None:
    """dst[0:count] = src[0:count], dst[count:total] = 0 (whole vectors, masked loads)."""
    with kb.for_range(0, total, step=kb.width, name="v", unroll="never") as v:
        inside = _lanes_below(kb, kb.sub(count, v))
        value = kb.masked_load_vec(src, v, inside)
        _store(kb, value, dst, v, _lanes_below(kb, kb.sub(total, v)))


# ------------------------------------------------------------------------ phases, scratch

def _thread0_phase(module: ir.Module, name: str, n_inputs: int,
                   body: Callable[[KernelBuilder, list, ir.Value], None]) -> ir.Function:
    """A phase whose work (small: packing weights) only thread 0 does."""
    fn, kb = phase_function(module, name, n_inputs)
    _, inputs, scratch, tid, _ = phase_args(fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        body(kb, inputs, scratch)
    kb.b.ret_void()
    return fn


class _ScratchLayout:
    """A kernel's scratch: the `shared` regions, then one slice per thread holding the
    `private` regions. Regions are named, sized in floats, and start on a cache line."""

    def __init__(self, shared: dict[str, int], private: dict[str, int]):
        self._shared, self.shared_floats = self._offsets(shared)
        self._private, self.private_floats = self._offsets(private)

    @staticmethod
    def _offsets(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
        offsets, total = {}, 0
        for name, floats in sizes.items():
            offsets[name] = total
            total += _round_up(floats, _CACHE_LINE_FLOATS)
        return offsets, total

    def total_floats(self, max_threads: int) -> int:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        return self.shared_floats + max_threads * self.private_floats

    def shared(self, kb: KernelBuilder, scratch: ir.Value, name: str) -> ir.Value:
        return kb.gep(scratch, self._shared[name])

    def private(self, kb: KernelBuilder, scratch: ir.Value, thread: ir.Value,
                name: str) -> ir.Value:
        start = kb.add(self.shared_floats + self._private[name],
                       kb.mul(thread, self.private_floats))
        return kb.gep(scratch, start)


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)


# ------------------------------------------------------------------------------ transposes

def _call_transpose(kb: KernelBuilder, src: ir.Value, src_stride, dst: ir.Value, dst_stride,
                    *, rows, cols, lanes) -> None:
    """dst[c*dst_stride + r] = src[r*src_stride + c] for r < rows, c < cols; dst lanes
    r in [rows, lanes) get zeros (how the channel-minor layouts pad their channels to
    whole vectors)."""
    kb.b.call(_transpose_function(kb.module), [
        src, kb.as_i64(src_stride), dst, kb.as_i64(dst_stride), kb.as_i64(rows),
        kb.as_i64(cols), kb.as_i64(lanes)])


def _transpose_function(module: ir.Module) -> ir.Function:
    """The module's transpose (see `_call_transpose`), W x W blocks at a time: W loads,
    `_transpose_block`, W stores. One function shared by all the conv kernels of a module,
    and one copy of the block in it: shuffles are slow to compile.

    A block at the edge (rows past `rows` or `cols`, lanes past `lanes`) is copied one
    float at a time: there are few (LeNet's conv2: 2 of 26 per sample), and vector code for
    them (masked loads into a buffer transposed like the others, then masked stores)
    doubled the function and LLVM's time on it.
    """
    name = "graphc.conv.transpose"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn, kb = _internal_function(module, name, [PTR, I64, PTR, I64, I64, I64, I64])
    src, src_stride, dst, dst_stride, rows, cols, lanes = fn.args
    w = kb.width

    def whole_block(r0, c0):
        block = kb.gep(src, kb.add(kb.mul(r0, src_stride), c0))
        vectors = _transpose_block(kb, [kb.load_vec(block, kb.mul(t, src_stride))
                                        for t in range(w)])
        for t, vector in enumerate(vectors):
            kb.store_vec(vector, dst, kb.add(kb.mul(kb.add(c0, t), dst_stride), r0))

    def edge_block(r0, c0):
        with kb.for_range(c0, kb.min(kb.add(c0, w), cols), name="c", unroll="never") as c:
            with kb.for_range(r0, kb.min(kb.add(r0, w), lanes), name="r", unroll="never") as r:
                inside = kb.b.icmp_signed("<", r, rows)
                # Lanes past `rows` are zeros: read row 0 for them (always there).
                row = kb.b.select(inside, r, kb.i64(0))
                value = kb.load(src, kb.add(kb.mul(row, src_stride), c))
                kb.store(kb.b.select(inside, value, kb.f32(0.0)), dst,
                         kb.add(kb.mul(c, dst_stride), r))

    with kb.for_range(0, lanes, step=w, name="r0", unroll="never") as r0:
        with kb.for_range(0, cols, step=w, name="c0", unroll="never") as c0:
            whole = kb.b.and_(kb.b.icmp_signed("<=", kb.add(r0, w), rows),
                              kb.b.icmp_signed("<=", kb.add(c0, w), cols))
            with kb.b.if_else(whole) as (then, otherwise):
                with then:
                    whole_block(r0, c0)
                with otherwise:
                    edge_block(r0, c0)
    kb.b.ret_void()
    return fn


def _transpose_block(kb: KernelBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The W x W block held in `rows`, transposed. For W = 8, in three rounds of shuffles
    whose masks are each one AVX instruction (unpcklps/unpckhps within 128-bit halves,
    shufps, vperm2f128): `kb.transpose`'s whole-vector interleaves need several each, and
    X86's instruction selection took 66 ms on the one function holding them."""
    if kb.width != 8:
        return kb.transpose(rows)

    def shuffle(a, b, *lanes):
        return kb.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 8), list(lanes)))

    pairs = []       # rows 2m, 2m+1 interleaved: (columns 0, 1, 4, 5), (2, 3, 6, 7)
    for m in range(0, 8, 2):
        pairs.append(shuffle(rows[m], rows[m + 1], 0, 8, 1, 9, 4, 12, 5, 13))
        pairs.append(shuffle(rows[m], rows[m + 1], 2, 10, 3, 11, 6, 14, 7, 15))
    quads = []       # rows 4q..4q+3 of columns (c, c + 4), for c = 0, 1, 2, 3
    for q in (0, 4):
        for low, high in ((pairs[q], pairs[q + 2]), (pairs[q + 1], pairs[q + 3])):
            quads.append(shuffle(low, high, 0, 1, 8, 9, 4, 5, 12, 13))
            quads.append(shuffle(low, high, 2, 3, 10, 11, 6, 7, 14, 15))
    columns = [shuffle(quads[c], quads[c + 4], 0, 1, 2, 3, 8, 9, 10, 11) for c in range(4)]
    return columns + [shuffle(quads[c], quads[c + 4], 4, 5, 6, 7, 12, 13, 14, 15)
                      for c in range(4)]


# ---------------------------------------------------------------------------------- loops

def _lanes_below(kb: KernelBuilder, count: ir.Value) -> ir.Value:
    """The mask of lanes < count (an i64; any value): `kb.lane_mask_dynamic` on i32 lanes,
    one AVX2 compare instead of two and a pack."""
    count = kb.b.trunc(kb.max(kb.min(count, kb.width), 0), I32)
    lanes = ir.Constant(ir.VectorType(I32, kb.width), list(range(kb.width)))
    return kb.b.icmp_signed("<", lanes, splat_i32(kb, count))


def splat_i32(kb: KernelBuilder, scalar: ir.Value) -> ir.Value:
    """Broadcast an i32 to <width x i32> (lane indices and offsets: half the registers of
    i64 lanes on AVX2)."""
    vector_type = ir.VectorType(I32, kb.width)
    undefined = ir.Constant(vector_type, ir.Undefined)
    one_lane = kb.b.insert_element(undefined, scalar, ir.Constant(I32, 0))
    return kb.b.shuffle_vector(one_lane, undefined, ir.Constant(vector_type, [0] * kb.width))


# ------------------------------------------------------------------------ row primitives
# Runs of `count` floats (an i64 IR value): whole vectors, then one masked vector.

def _emit_vectors(kb: KernelBuilder, count: ir.Value, body: Callable) -> None:
    """body(index, mask) for each vector of range(count): mask is None for whole vectors
    and the lane mask of the remainder for the last, partial one."""
    whole = kb.b.and_(count, kb.i64(-kb.width))  # width is a power of two
    with kb.for_range(0, whole, step=kb.width, name="v", unroll="never") as index:
        body(index, None)
    with kb.if_then(kb.b.icmp_signed("<", whole, count)):
        body(whole, _lanes_below(kb, kb.sub(count, whole)))


def _load(kb: KernelBuilder, ptr: ir.Value, index: ir.Value, mask) -> ir.Value:
    return kb.load_vec(ptr, index) if mask is None else kb.masked_load_vec(ptr, index, mask)


def _store(kb: KernelBuilder, value: ir.Value, ptr: ir.Value, index: ir.Value, mask) -> None:
    if mask is None:
        kb.store_vec(value, ptr, index)
    else:
        kb.masked_store_vec(value, ptr, index, mask)


def emit_fill_zero(kb: KernelBuilder, dst: ir.Value, count: ir.Value) -> None:
    """dst[0:count] = 0."""
    _emit_vectors(kb, count, lambda k, mask: _store(kb, kb.splat(0.0), dst, k, mask))


def _sum_thread_partials(kb: KernelBuilder, layout, scratch, nthreads, key: str, count: int) -> ir.Value:
    """Add every thread's private `key` array (count floats) into thread 0's; returns it."""
    total = layout.private(kb, scratch, kb.i64(0), key)
    with kb.for_range(1, nthreads, name="thread", unroll="never") as thread:
        _emit_add(kb, total, layout.private(kb, scratch, thread, key), kb.i64(count))
    return total


def _emit_add(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value) -> None:
    """dst[0:count] += src[0:count]."""
    def add_vector(k, mask):
        _store(kb, kb.fadd(_load(kb, dst, k, mask), _load(kb, src, k, mask)), dst, k, mask)
    _emit_vectors(kb, count, add_vector)
