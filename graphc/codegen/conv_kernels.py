"""Native float32 kernels for conv2d (NCHW input, OIHW weights) and its two gradients.

All three are implicit GEMMs with the *channels in the vector lanes*; no im2col matrix is
ever built. A register tile holds `rows` x `vecs` accumulator vectors: `rows` output pixels
(or weight taps) by `vecs` vectors of channels. Each step of the reduction broadcasts one
scalar per row and multiplies it into `vecs` contiguous channel vectors
(`_emit_tile_product`): the GEMM micro-kernel of gemm.py, with operands read in place.

    forward      outT[p, o]       = sum over (c, i, j) of  x[c, tap(p, i, j)] * Wt[(c, i, j), o]
                 rows: output pixels, lanes: output channels, broadcast: the input
    weight grad  dWt[(c, i, j), o] += sum over p of       x[c, tap(p, i, j)] * gT[p, o]
                 rows: weight taps, lanes: output channels, broadcast: the input
    input grad   dxT[tap(p, i, j), c] += sum over o of    g[o, p] * W2[(i, j), o, c]
                 for each tap (i, j); rows: output pixels, lanes: input channels,
                 broadcast: g. The tile is added into the shifted pixels of a padded dx
                 grid ("scatter"): unlike a transposed convolution over a zero-padded g,
                 it never multiplies padding (LeNet's valid 5x5 conv2 would do 2x the work).

tap(p, i, j) is the input cell that tap (i, j) of output pixel p reads, in a copy of the
sample with its zero padding materialised (no bounds checks in any loop).

Why channels in lanes: LeNet's and the conv net's images are small and their rows are not
multiples of the vector width (10, 14, 28 columns), while their channel counts (16, 32, 64)
are. Pixel-vector GEMMs over im2col (the previous design) wasted lanes on row tails, and
paid the im2col copy plus the GEMM's B packing for every sample: 40-55 GFLOP/s at LeNet's
shapes. Here the only copies are per-sample transposes between NCHW and the channel-minor
layouts, O(P*C) work against O(P*C*K) multiply-adds, and channel counts are padded to
whole vectors (`Op`, `Cp`; LeNet's 6 channels use 6 of 8 lanes). The input gradient of a
first layer (1 or 3 input channels) uses 1 or 3 of 8 lanes; training never computes it.

Threads split the batch. Each thread owns its layout buffers in scratch; weights packed
for a whole call are written by thread 0 in a first phase. All geometry is compile-time
constant; loops stay IR loops, so the code size does not grow with the image size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from .kernel import Kernel, phase_args, phase_function
from .kernel_builder import I1, I32, KernelBuilder
from .target import vector_register_count, vector_width_f32
from .window import WindowGeometry

__all__ = ["ConvGeometry", "emit_conv2d", "emit_conv2d_input_grad", "emit_conv2d_weight_grad"]

# Scratch regions start on a 64-byte boundary (relative to scratch) so that two threads
# never write the same cache line.
_CACHE_LINE_FLOATS = 16

# Most rows of Wt (channels x taps) per block of the forward's reduction; as gemm.py's
# K blocks (there, 512 measured much worse than 256).
_MAX_K_BLOCK = 256

# Floats of an operand that a loop order may count on staying in L1 (half of Zen 3's 32 KB).
_L1_BUDGET_FLOATS = 4096

# Rows of a register tile: each has a pointer to its broadcast operand, in a register.
_TILE_ROWS = 6


@dataclasses.dataclass(frozen=True)
class ConvGeometry(WindowGeometry):
    """Shapes, stride and padding of one conv2d; pure Python, no IR."""

    batch: int = 1
    channels: int = 1
    out_channels: int = 1

    @classmethod
    def from_shapes(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[Sequence[int]]) -> "ConvGeometry":
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


# --------------------------------------------------------------------------- public kernels

def emit_conv2d(module: ir.Module, name: str, x_shape, w_shape, stride, padding, *,
                bias: bool = False, relu: bool = False, max_threads: int) -> Kernel:
    """out = conv2d(x, w) [+ b[o] on channel o] [then relu]; inputs x, w[, b].

    Phase 1 (thread 0): Wt = W^T, (K, Op). Phase 2: per sample, every tile of outT (P, Op),
    summed over blocks of input channels (`_ChannelBlocks`), with the bias and relu applied
    in registers after the last, then outT transposed into out[n].
    """
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    lanes = _round_up(O, width)
    layout = _ScratchLayout(shared={"wt": K * lanes},
                            private={"x": _padded_sample_floats(g, width), "outT": P * lanes})
    n_inputs = 3 if bias else 2

    def pack_weights(kb, inputs, scratch):
        _emit_transpose(kb, inputs[1], K, layout.shared(kb, scratch, "wt"), lanes,
                        rows=O, cols=K, dst_lanes=lanes)

    fn, kb = phase_function(module, f"{name}.compute", n_inputs)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    wt = layout.shared(kb, scratch, "wt")
    out_t = layout.private(kb, scratch, tid, "outT")
    x_buffer = _zero_padding(kb, g, layout.private(kb, scratch, tid, "x"))
    epilogue = _BiasRelu(inputs[2] if bias else None, O, relu)
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = _padded_sample(kb, g, _sample(kb, inputs[0], n, g.sample_floats), x_buffer)

        def block(c0, channels, first, last):
            # Reduction over (c, i, j) of the block; Wt's row (c, i, j) is (c*kh + i)*kw + j.
            steps = [_Step(channels, g.padded_plane, g.taps * lanes),
                     _Step(g.kernel_h, g.padded_w, g.kernel_w * lanes),
                     _Step(g.kernel_w, 1, lanes)]
            x_block = kb.gep(x_n, kb.mul(c0, g.padded_plane))
            wt_block = kb.gep(wt, kb.mul(c0, g.taps * lanes))

            def tile(ch0, vecs, oh, ow0, rows):
                x_run = kb.gep(x_block, _input_offset(kb, g, oh, ow0))
                a_rows = [kb.gep(x_run, r * g.stride_w) for r in range(rows)]
                c_tile = kb.gep(out_t, kb.add(kb.mul(_output_pixel(kb, g, oh, ow0), lanes), ch0))
                # Later blocks add to the sums of the earlier ones, kept in outT.
                acc = _load_accumulators(kb, [kb.gep(c_tile, r * lanes) for r in range(rows)],
                                         vecs, keep=kb.b.not_(first))
                _emit_tile_product(kb, acc, a_rows, kb.gep(wt_block, ch0), steps)
                epilogue.apply(kb, acc, ch0, last)
                _emit_store_tile(kb, acc, c_tile, lanes)

            _emit_channel_groups(kb, lanes, lambda ch0, vecs: _emit_pixel_tiles(
                kb, g, vecs, lambda oh, ow0, rows: tile(ch0, vecs, oh, ow0, rows)))

        _ChannelBlocks.for_geometry(g).emit_each(kb, block)
        _emit_transpose(kb, out_t, lanes, _sample(kb, out, n, O * P), P,
                        rows=P, cols=O, dst_lanes=P)
    kb.b.ret_void()
    pack = _thread0_phase(module, f"{name}.pack", n_inputs, pack_weights)
    return Kernel([pack, fn], layout.total_floats(max_threads))


@dataclasses.dataclass(frozen=True)
class _ChannelBlocks:
    """The forward's input channels cut into `full` blocks of `size` and a last block of
    `tail` (0 if none), each at most `_MAX_K_BLOCK` rows of Wt, so that a block's rows of
    Wt for a tile's channels (K_block x 16 floats) stay in L1 across all its pixel tiles.
    Measured on the conv net's 64 -> 64 channels, 3x3: 48 GFLOP/s in one block of
    K = 576, 93 in three blocks."""

    size: int
    full: int
    tail: int

    @classmethod
    def for_geometry(cls, g: ConvGeometry) -> "_ChannelBlocks":
        count = -(-g.patch_size // _MAX_K_BLOCK)
        size = -(-g.channels // count)
        return cls(size, g.channels // size, g.channels % size)

    def emit_each(self, kb: KernelBuilder, body: Callable) -> None:
        """body(first_channel, channels, is_first, is_last) for every block (i1 flags)."""
        blocks = self.full + (self.tail > 0)
        with kb.for_range(0, self.full, name="block", unroll="no-runtime") as index:
            body(kb.mul(index, self.size), self.size,
                 kb.b.icmp_signed("==", index, kb.i64(0)),
                 kb.b.icmp_signed("==", index, kb.i64(blocks - 1)))
        if self.tail:
            is_first = ir.Constant(I1, blocks == 1)
            body(kb.i64(self.full * self.size), self.tail, is_first, ir.Constant(I1, 1))


def emit_conv2d_input_grad(module: ir.Module, name: str, g_shape, w_shape, x_shape, stride,
                           padding, *, max_threads: int) -> Kernel:
    """out = dL/dx (shape x_shape) from g = dL/d(conv2d(x, w)); inputs g, w.

    Phase 1 (thread 0): W2[(i, j), o, c] = W[o, c, i, j], channels padded to Cp.
    Phase 2: per sample, zero a padded dx grid (Hp, Wp, Cp), add every tap's tiles into it,
    then transpose its interior into out[n].
    """
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    width = vector_width_f32()
    C, O, P = g.channels, g.out_channels, g.pixels
    lanes = _round_up(C, width)
    grid_floats = g.padded_plane * lanes
    layout = _ScratchLayout(shared={"w2": g.taps * O * lanes}, private={"grid": grid_floats})

    def pack_weights(kb, inputs, scratch):
        # W[o] is (C, taps); its transpose is the o-th (taps, Cp) slice of W2.
        w, w2 = inputs[1], layout.shared(kb, scratch, "w2")
        with kb.for_range(0, O, name="o", unroll="no-runtime") as o:
            _emit_transpose(kb, kb.gep(w, kb.mul(o, C * g.taps)), g.taps,
                            kb.gep(w2, kb.mul(o, lanes)), O * lanes,
                            rows=C, cols=g.taps, dst_lanes=lanes)

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (grad, _), scratch, tid, nthreads = phase_args(fn)
    w2 = layout.shared(kb, scratch, "w2")
    grid = layout.private(kb, scratch, tid, "grid")
    steps = [_Step(O, P, lanes)]  # reduction over o: g[o, p] and W2[tap, o, :]
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        g_n = _sample(kb, grad, n, O * P)
        emit_fill_zero(kb, grid, kb.i64(grid_floats))

        def tile(ch0, vecs, tap, shift, oh, ow0, rows):
            """Add tap (i, j)'s products of a run of output pixels into the grid, `shift`
            floats past the cells that tap (0, 0) of the run reaches."""
            g_run = kb.gep(g_n, _output_pixel(kb, g, oh, ow0))
            a_rows = [kb.gep(g_run, r) for r in range(rows)]
            # Summed from zero, then added: starting from the grid chained each tap's FMAs
            # to the stores of the tap before (neighbouring taps write the same cells) and
            # serialised them (LeNet's conv2: 46 GFLOP/s, 54 from zero).
            acc = _zero_accumulators(kb, rows, vecs)
            _emit_tile_product(kb, acc, a_rows, kb.gep(w2, kb.add(kb.mul(tap, O * lanes), ch0)),
                               steps)
            target = kb.gep(grid, kb.add(kb.add(kb.mul(_input_offset(kb, g, oh, ow0), lanes),
                                                shift), ch0))
            for r, row_acc in enumerate(acc):
                for v, slot in enumerate(row_acc):
                    offset = r * g.stride_w * lanes + v * kb.width
                    kb.store_vec(kb.fadd(kb.get(slot), kb.load_vec(target, offset)), target,
                                 offset)

        def each_tap(body):
            with kb.for_range(0, g.kernel_h, name="i", unroll="no-runtime") as i:
                with kb.for_range(0, g.kernel_w, name="j", unroll="no-runtime") as j:
                    body(kb.add(kb.mul(i, g.kernel_w), j),
                         kb.mul(kb.add(kb.mul(i, g.padded_w), j), lanes))

        def group(ch0, vecs):
            def run(oh, ow0, rows):
                each_tap(lambda tap, shift: tile(ch0, vecs, tap, shift, oh, ow0, rows))

            if g.taps * O * vecs * kb.width <= _L1_BUDGET_FLOATS:
                _emit_pixel_tiles(kb, g, vecs, run)
                return
            # The group's W2 for all taps does not stay in L1 across a run's taps: taps
            # go outermost, so that one tap's W2 stays there across all the runs (conv
            # net, 64 channels: 73 GFLOP/s with taps innermost, 77-80 outermost; LeNet's
            # conv2, whose W2 fits, ran at 54 with taps innermost, 46 outermost).
            each_tap(lambda tap, shift: _emit_pixel_tiles(
                kb, g, vecs, lambda oh, ow0, rows: tile(ch0, vecs, tap, shift, oh, ow0, rows)))

        _emit_channel_groups(kb, lanes, group)
        dx_n = _sample(kb, out, n, g.sample_floats)
        with kb.for_range(0, g.height, name="ih", unroll="no-runtime") as ih:
            interior_row = kb.mul(kb.add(kb.mul(kb.add(ih, g.pad_top), g.padded_w), g.pad_left),
                                  lanes)
            _emit_transpose(kb, kb.gep(grid, interior_row), lanes,
                            kb.gep(dx_n, kb.mul(ih, g.width)), g.height * g.width,
                            rows=g.width, cols=C, dst_lanes=g.width)
    kb.b.ret_void()
    pack = _thread0_phase(module, f"{name}.pack", 2, pack_weights)
    return Kernel([pack, fn], layout.total_floats(max_threads))


def emit_conv2d_weight_grad(module: ir.Module, name: str, x_shape, g_shape, w_shape, stride,
                            padding, *, max_threads: int) -> Kernel:
    """out = dL/dw (shape w_shape) from x and g = dL/d(conv2d(x, w)); inputs x, g.

    Phase 1: each thread sums, over its share of the batch, the tiles of its own partial
    dWt (K, Op) in scratch, from gT = g[n]^T (P, Op). Phase 2 (thread 0): adds the
    partials and transposes the sum into out (O, K).
    """
    g = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, g)
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    lanes = _round_up(O, width)
    layout = _ScratchLayout(shared={}, private={"x": _padded_sample_floats(g, width),
                                                "gT": P * lanes, "dWt": K * lanes})
    # Reduction over output pixels (oh, ow): the input moves by the stride, gT by a row.
    steps = [_Step(g.out_h, g.stride_h * g.padded_w, g.out_w * lanes),
             _Step(g.out_w, g.stride_w, lanes)]

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    g_t = layout.private(kb, scratch, tid, "gT")
    partial = layout.private(kb, scratch, tid, "dWt")
    x_buffer = _zero_padding(kb, g, layout.private(kb, scratch, tid, "x"))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(K * lanes))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = _padded_sample(kb, g, _sample(kb, x, n, g.sample_floats), x_buffer)
        _emit_transpose(kb, _sample(kb, grad, n, O * P), P, g_t, lanes,
                        rows=O, cols=P, dst_lanes=lanes)

        def tile(k0, rows, ch0, vecs):
            a_rows = [kb.gep(x_n, _tap_offset(kb, g, kb.add(k0, r))) for r in range(rows)]
            c_tile = kb.gep(partial, kb.add(kb.mul(k0, lanes), ch0))
            acc = _load_accumulators(kb, [kb.gep(c_tile, r * lanes) for r in range(rows)], vecs)
            _emit_tile_product(kb, acc, a_rows, kb.gep(g_t, ch0), steps)
            _emit_store_tile(kb, acc, c_tile, lanes)

        _emit_channel_groups(kb, lanes, lambda ch0, vecs: _emit_row_tiles(
            kb, K, _TILE_ROWS, lambda k0, rows: tile(k0, rows, ch0, vecs)))
    kb.b.ret_void()

    def sum_partials(kb, out, scratch, nthreads):
        total = layout.private(kb, scratch, kb.i64(0), "dWt")
        with kb.for_range(1, nthreads, name="thread", unroll="no-runtime") as thread:
            _emit_add(kb, total, layout.private(kb, scratch, thread, "dWt"), kb.i64(K * lanes))
        _emit_transpose(kb, total, lanes, out, K, rows=K, cols=O, dst_lanes=K)

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        sum_partials(kb, out, scratch, nthreads)
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))


def _check_grad_shape(g_shape, geometry: ConvGeometry) -> None:
    if tuple(g_shape) != geometry.out_shape:
        raise ValueError(f"output gradient has shape {tuple(g_shape)}, the conv2d output "
                         f"is {geometry.out_shape}")


# ------------------------------------------------------------------------ register tiles

@dataclasses.dataclass(frozen=True)
class _Step:
    """One level of a tile's reduction loop nest: `count` steps, each advancing the
    broadcast operand by `a_stride` floats and the vector operand by `b_stride`."""

    count: int
    a_stride: int
    b_stride: int


def _emit_tile_product(kb: KernelBuilder, acc, a_rows: Sequence[ir.Value], b: ir.Value,
                       steps: Sequence[_Step]) -> None:
    """acc[r][v] += sum over the loop nest `steps` of a_rows[r][a] * b[b + v*W : +W], where
    a and b are the sums over the levels of index * a_stride and index * b_stride.

    Per step: `vecs` vector loads, one broadcast per row, rows*vecs FMAs. Levels stay IR
    loops: unrolling the kernel width measured no faster (LeNet's forward convolutions,
    within 2%), and LLVM then reused row r's broadcast at tap j+1 as row r+1's at tap j,
    keeping them all live and spilling accumulators.

    A tile with fewer accumulators than `_accumulators()` may have too few to hide the FMA
    latency (8 must be in flight: 2 FMAs a cycle, 4 cycles each), and more rows are not
    always possible (weight taps need a row pointer each, and general registers are few:
    LLVM then reloads them every step). So its consecutive steps alternate between several
    sets of accumulators, summed at the end.
    """
    rows, vecs = len(acc), len(acc[0])
    sets = [acc] + [_zero_accumulators(kb, rows, vecs)
                    for _ in range(max(1, _accumulators() // (rows * vecs)) - 1)]

    def step(index, a_offset, b_offset):
        b_vectors = [kb.load_vec(b, kb.add(b_offset, v * kb.width)) for v in range(vecs)]
        for row, row_acc in zip(a_rows, sets[index % len(sets)]):
            a = kb.splat(kb.load(row, a_offset))
            for b_vector, slot in zip(b_vectors, row_acc):
                kb.set(slot, kb.fma(a, b_vector, kb.get(slot)))

    def innermost(s, a_offset, b_offset):
        def steps_from(first, count):
            for t in range(count):
                step(t, kb.add(a_offset, kb.mul(kb.add(first, t), s.a_stride)),
                     kb.add(b_offset, kb.mul(kb.add(first, t), s.b_stride)))
        whole = s.count - s.count % len(sets)
        with kb.for_range(0, whole, step=len(sets), name="step", unroll="never") as t:
            steps_from(t, len(sets))
        steps_from(kb.i64(whole), s.count % len(sets))

    def level(depth, a_offset, b_offset):
        s = steps[depth]
        if depth == len(steps) - 1:
            innermost(s, a_offset, b_offset)
            return
        with kb.for_range(0, s.count, name=f"step{depth}", unroll="never") as t:
            level(depth + 1, kb.add(a_offset, kb.mul(t, s.a_stride)),
                  kb.add(b_offset, kb.mul(t, s.b_stride)))

    level(0, kb.i64(0), kb.i64(0))
    for other in sets[1:]:
        for row_acc, other_row in zip(acc, other):
            for slot, other_slot in zip(row_acc, other_row):
                kb.set(slot, kb.fadd(kb.get(slot), kb.get(other_slot)))


def _zero_accumulators(kb: KernelBuilder, rows: int, vecs: int):
    return [[kb.variable(kb.splat(0.0)) for _ in range(vecs)] for _ in range(rows)]


def _load_accumulators(kb: KernelBuilder, row_pointers: Sequence[ir.Value], vecs: int,
                       keep: ir.Value | None = None):
    """Accumulators starting from the tile in memory, or (if the i1 `keep` is false) from
    zero: the load is then still made, but its value, maybe garbage, is not used."""
    def initial(row, v):
        value = kb.load_vec(row, v * kb.width)
        return value if keep is None else kb.b.select(keep, value, kb.splat(0.0))
    return [[kb.variable(initial(row, v)) for v in range(vecs)] for row in row_pointers]


def _emit_store_tile(kb: KernelBuilder, acc, c: ir.Value, row_stride: int) -> None:
    """Store accumulator row r, vector v at c[r*row_stride + v*W]."""
    for r, row_acc in enumerate(acc):
        for v, slot in enumerate(row_acc):
            kb.store_vec(kb.get(slot), c, r * row_stride + v * kb.width)


@dataclasses.dataclass(frozen=True)
class _BiasRelu:
    """The forward epilogue on a tile of output channels from ch0: + b[o], then relu."""

    bias: ir.Value | None
    channels: int
    relu: bool

    def apply(self, kb: KernelBuilder, acc, ch0: ir.Value, when: ir.Value) -> None:
        """Apply it to the tile's accumulators if the i1 `when` holds."""
        if self.bias is None and not self.relu:
            return
        vecs = len(acc[0])
        biases = []
        if self.bias is not None:
            # Lanes past the last channel read nothing (their outputs are never stored).
            biases = [kb.masked_load_vec(self.bias, first, kb.lane_mask_dynamic(
                kb.sub(self.channels, first))) for first in
                (kb.add(ch0, v * kb.width) for v in range(vecs))]
        for row_acc in acc:
            for v, slot in enumerate(row_acc):
                value = kb.get(slot)
                if biases:
                    value = kb.fadd(value, biases[v])
                if self.relu:
                    value = kb.relu(value)
                kb.set(slot, kb.b.select(when, value, kb.get(slot)))


def _tile_vectors() -> int:
    """Channel vectors per register tile: 2 with 16 vector registers (6 rows x 2 = 12
    accumulators + 2 operand vectors + 1 broadcast, gemm.py's AVX2 tile), 4 with 32."""
    return 4 if vector_register_count() >= 32 else 2


def _accumulators() -> int:
    """Accumulator registers of a full tile."""
    return _TILE_ROWS * _tile_vectors()


def _emit_channel_groups(kb: KernelBuilder, lanes: int,
                         body: Callable[[ir.Value, int], None]) -> None:
    """body(first_channel, vecs) for the channel groups of a tile: `_tile_vectors()`
    vectors each, the last one maybe narrower."""
    vectors = lanes // kb.width
    group = min(_tile_vectors(), vectors)
    with kb.for_range(0, vectors // group, name="group", unroll="no-runtime") as index:
        body(kb.mul(index, group * kb.width), group)
    if vectors % group:
        body(kb.i64((vectors - vectors % group) * kb.width), vectors % group)


def _emit_row_tiles(kb: KernelBuilder, total: int, most: int,
                    tile: Callable[[ir.Value, int], None]) -> None:
    """tile(first, rows) over range(total) in tiles of at most `most` rows, of balanced
    sizes: 25 rows in tiles of <= 6 are 5 x 5, not 4 x 6 + 1."""
    count = -(-total // most)
    size = -(-total // count)
    with kb.for_range(0, total // size, name="tile", unroll="no-runtime") as t:
        tile(kb.mul(t, size), size)
    if total % size:
        tile(kb.i64(total - total % size), total % size)


def _emit_pixel_tiles(kb: KernelBuilder, g: ConvGeometry, vecs: int,
                      tile: Callable[[ir.Value, ir.Value, int], None]) -> None:
    """tile(oh, ow0, rows) over the output pixels in runs of `rows` of one output row, at
    most as many as a tile `vecs` wide has accumulators (12 for one vector).

    A run's pixels read the input at constant distances (stride_w) from the first one: a
    single row pointer, whereas runs crossing output rows need a pointer per row, more
    than there are general registers. Runs are balanced (28 columns by <= 12: 10 + 9 + 9);
    the longer ones come first, each length in its own loop.
    """
    count = -(-g.out_w // (_accumulators() // vecs))
    short, longer = divmod(g.out_w, count)
    with kb.for_range(0, g.out_h, name="oh", unroll="no-runtime") as oh:
        if longer:
            with kb.for_range(0, longer, name="run", unroll="no-runtime") as run:
                tile(oh, kb.mul(run, short + 1), short + 1)
        with kb.for_range(0, count - longer, name="run", unroll="no-runtime") as run:
            tile(oh, kb.add(longer * (short + 1), kb.mul(run, short)), short)


def _input_offset(kb: KernelBuilder, g: ConvGeometry, oh: ir.Value, ow: ir.Value) -> ir.Value:
    """Offset in a padded plane of the cell that tap (0, 0) of output pixel (oh, ow) reads."""
    return kb.add(kb.mul(oh, g.stride_h * g.padded_w), kb.mul(ow, g.stride_w))


def _output_pixel(kb: KernelBuilder, g: ConvGeometry, oh: ir.Value, ow: ir.Value) -> ir.Value:
    return kb.add(kb.mul(oh, g.out_w), ow)


def _tap_offset(kb: KernelBuilder, g: ConvGeometry, k: ir.Value) -> ir.Value:
    """Offset in the padded sample of weight tap k = (c, i, j) for output pixel (0, 0)."""
    c, ij = kb.b.udiv(k, kb.i64(g.taps)), kb.b.urem(k, kb.i64(g.taps))
    i, j = kb.b.udiv(ij, kb.i64(g.kernel_w)), kb.b.urem(ij, kb.i64(g.kernel_w))
    return kb.add(kb.add(kb.mul(c, g.padded_plane), kb.mul(i, g.padded_w)), j)


# ------------------------------------------------------------------------------- samples

def _padded_sample_floats(g: ConvGeometry, width: int) -> int:
    """Scratch for a sample copy with its zero padding; none when there is no padding.
    `width` spare floats take the zeros that the last row's whole-vector copy writes."""
    return g.channels * g.padded_plane + width if g.has_padding else 0


def _zero_padding(kb: KernelBuilder, g: ConvGeometry, buffer: ir.Value) -> ir.Value:
    """Zero the padded sample buffer once per call: sample copies only write its interior
    (and zeros), so its margins stay zero for every sample."""
    if g.has_padding:
        emit_fill_zero(kb, buffer, kb.i64(_padded_sample_floats(g, kb.width)))
    return buffer


def _padded_sample(kb: KernelBuilder, g: ConvGeometry, x_n: ir.Value,
                   buffer: ir.Value) -> ir.Value:
    """Sample x_n with its padding: x_n itself without padding, else copied row by row
    into the interior of `buffer` (prepared by `_zero_padding`).

    Each row is copied in whole vectors, masked loads supplying zeros past its end: the
    zeros land in the right margin, the next row's left margin or the next row itself,
    which is copied later (rows go in memory order), never on copied data.
    """
    if not g.has_padding:
        return x_n
    with kb.for_range(0, g.channels * g.height, name="row", unroll="no-runtime") as row:
        c, ih = kb.b.udiv(row, kb.i64(g.height)), kb.b.urem(row, kb.i64(g.height))
        src = kb.gep(x_n, kb.mul(row, g.width))
        dst = kb.gep(buffer, kb.add(kb.add(kb.mul(c, g.padded_plane),
                                           kb.mul(kb.add(ih, g.pad_top), g.padded_w)),
                                    g.pad_left))
        with kb.for_range(0, g.width, step=kb.width, name="iw", unroll="no-runtime") as iw:
            inside = kb.lane_mask_dynamic(kb.sub(g.width, iw))
            kb.store_vec(kb.masked_load_vec(src, iw, inside), dst, iw)
    return buffer


@contextlib.contextmanager
def _my_samples(kb: KernelBuilder, batch: int, tid, nthreads) -> Iterator[ir.Value]:
    """Loop over this thread's share of the batch; yields the sample index."""
    lo, hi = kb.split_range(batch, tid, nthreads)
    with kb.for_range(lo, hi, name="n", unroll="no-runtime") as n:
        yield n


def _sample(kb: KernelBuilder, base: ir.Value, n: ir.Value, floats_per_sample: int) -> ir.Value:
    return kb.gep(base, kb.mul(n, floats_per_sample))


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
    return -(-value // multiple) * multiple


# ------------------------------------------------------------------------------ transposes

def _emit_transpose(kb: KernelBuilder, src: ir.Value, src_stride: int, dst: ir.Value,
                    dst_stride: int, *, rows: int, cols: int, dst_lanes: int) -> None:
    """dst[c*dst_stride + r] = src[r*src_stride + c] for r < rows, c < cols, a W x W block
    at a time (W loads, `kb.transpose`, W stores).

    `dst_lanes` (>= rows, <= rows rounded up to W) is how many floats of each dst row may be
    written: those past `rows` get zeros, which is how the channel-minor layouts pad their
    channels to whole vectors. Only a last block past `dst_lanes` uses masked stores.
    """
    w = kb.width

    def block(r0, n_rows, c0, n_cols, store_lanes):
        col_mask = None if n_cols == w else kb.lane_mask(n_cols)
        vectors = [_load(kb, kb.gep(src, kb.mul(kb.add(r0, t), src_stride)), c0, col_mask)
                   if t < n_rows else kb.splat(0.0) for t in range(w)]
        store_mask = None if store_lanes == w else kb.lane_mask(store_lanes)
        for t, vector in enumerate(kb.transpose(vectors)[:n_cols]):
            _store(kb, vector, kb.gep(dst, kb.mul(kb.add(c0, t), dst_stride)), r0, store_mask)

    def row_block(r0, n_rows, store_lanes):
        with kb.for_range(0, cols - cols % w, step=w, name="tc", unroll="no-runtime") as c0:
            block(r0, n_rows, c0, w, store_lanes)
        if cols % w:
            block(r0, n_rows, kb.i64(cols - cols % w), cols % w, store_lanes)

    whole_rows = rows - rows % w
    with kb.for_range(0, whole_rows, step=w, name="tr", unroll="no-runtime") as r0:
        row_block(r0, w, w)
    if rows % w:
        row_block(kb.i64(whole_rows), rows % w, min(w, dst_lanes - whole_rows))


# ---------------------------------------------------------------------------------- loops

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
    with kb.for_range(0, whole, step=kb.width, name="v", unroll="no-runtime") as index:
        body(index, None)
    with kb.if_then(kb.b.icmp_signed("<", whole, count)):
        body(whole, kb.lane_mask_dynamic(kb.sub(count, whole)))


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


def _emit_add(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value) -> None:
    """dst[0:count] += src[0:count]."""
    def add_vector(k, mask):
        _store(kb, kb.fadd(_load(kb, dst, k, mask), _load(kb, src, k, mask)), dst, k, mask)
    _emit_vectors(kb, count, add_vector)
