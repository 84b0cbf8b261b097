"""The conv2d input-gradient kernels: as a forward conv over the dilated, padded g (on
forward.py's `_LanesForward`), the batch in the lanes (`_BatchLanesInputGrad`), or a GEMM
per input channel then col2im (cols); each can apply an elementwise epilogue (`_DxEpilogue`)."""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir
import sympy

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import I64, KernelBuilder
from graphc.backend.kernels.conv.buffers import _my_samples, _Placement, _sample, _ScratchLayout, _store, _thread0_phase
from graphc.backend.kernels.conv.channel_sums import ChannelSums
from graphc.backend.kernels.conv.forward import _emit_forward_pixel_lanes, _LanesForward
from graphc.backend.kernels.conv.geometry import ConvGeometry, _VectorCover
from graphc.backend.kernels.conv.tiles import (_TILE_ROWS, _balanced, _call_tile, _call_transpose, _equal_runs,
                                               _load_index, _row_indices, _Tables, _tiles_along, _zeros)
from graphc.backend.kernels.elementwise import emit_elementwise_epilogue
from graphc.backend.llvm.target import vector_width_f32

# Largest cols buffer (taps x pixels floats, one input channel's) of the GEMM + col2im
# input gradient: LeNet's conv2 needs 2500 and stays in L1 between the GEMM that writes
# it and the col2im that reads it; past 128 KB it would not even stay in L2.
_MAX_COLS_FLOATS = 1 << 15


@dataclasses.dataclass(frozen=True)
class _DxEpilogue:
    """An elementwise consumer of dx fused into the input gradient (ReLU's backward after a
    conv: dx * Step(y)): dx[n] = expr(dx[n], E1[n], ...) over each sample (or run of samples)
    as soon as its dx is final, while it is still in cache. The E's are the kernel's inputs
    after g and w, each shaped like dx. `expr` None: nothing to apply."""

    expr: sympy.Expr | None = None
    operands: int = 0
    # then dx's per-channel sums (batch norm's backward), whose inputs follow the E's
    sums: ChannelSums | None = None

    @property
    def inputs(self) -> int:
        """The kernel's inputs: g, w, the E's and the sums' (with their outputs)."""
        return self.sums.inputs if self.sums is not None else 2 + self.operands

    def apply(self, kb: KernelBuilder, out: ir.Value, inputs, n: ir.Value, sample_floats: int,
              samples: int = 1) -> None:
        if self.expr is not None:
            extras = [_sample(kb, extra, n, sample_floats) for extra in inputs[2:2 + self.operands]]
            emit_elementwise_epilogue(kb, self.expr, _sample(kb, out, n, sample_floats), extras,
                                      samples * sample_floats)
        if self.sums is not None:
            with kb.for_range(0, samples, name="s") as s:
                self.sums.after_sample(kb, out, inputs, kb.add(n, s))


_NO_EPILOGUE = _DxEpilogue()


# ---------------------------------------------------------------------- input gradient

def _as_forward_geometry(g: ConvGeometry) -> tuple[ConvGeometry, _Placement]:
    """The forward convolution computing dx, and where g goes in its input: dilated by the
    stride, padded by kernel - 1 - padding (see `_emit_input_grad_as_forward`)."""
    forward = ConvGeometry(g.height + g.kernel_h - 1, g.width + g.kernel_w - 1,
                           g.kernel_h, g.kernel_w, 1, 1, 0, 0, 0, 0, batch=g.batch,
                           channels=g.out_channels, out_channels=g.channels)
    placement = _Placement(channels=g.out_channels, src_h=g.out_h, src_w=g.out_w,
                           dst_h=forward.height, dst_w=forward.width,
                           step_y=g.stride_h, step_x=g.stride_w,
                           first_y=g.kernel_h - 1 - g.pad_top,
                           first_x=g.kernel_w - 1 - g.pad_left)
    return forward, placement


def _emit_input_grad_as_forward(module: ir.Module, name: str, g: ConvGeometry, *,
                                max_threads: int, epilogue: _DxEpilogue = _NO_EPILOGUE) -> Kernel:
    """dx as the forward convolution, with input channels in the lanes, of g dilated by
    the stride and padded by kernel - 1 - padding, with W flipped and transposed:

        dx[c, y, x] = sum over (o, i, j) of gd[o, y + i, x + j] * W[o, c, kh-1-i, kw-1-j]

    where gd[o, oh*sh + kh-1-pt, ow*sw + kw-1-pl] = g[o, oh, ow] and gd is 0 elsewhere.
    """
    forward, placement = _as_forward_geometry(g)
    C, O, taps = g.channels, g.out_channels, g.taps

    def pack(kb, w, wt, lanes):
        # Wt[(o, i, j), c] = W[o, c, kh-1-i, kw-1-j]: W[o] is (C, taps); transposed, its
        # tap t is row o*taps + taps-1-t of Wt, hence the negative row stride.
        with kb.for_range(0, O, name="o") as o:
            last_row = kb.mul(kb.add(kb.mul(o, taps), taps - 1), lanes)
            _call_transpose(kb, kb.gep(w, kb.mul(o, C * taps)), taps, kb.gep(wt, last_row),
                            -lanes, rows=C, cols=taps, lanes=lanes)

    def after_sample(kb, out, inputs, n):
        epilogue.apply(kb, out, inputs, n, g.sample_floats)

    return _LanesForward(forward, placement, pack=pack, after_sample=after_sample).emit(
        module, name, n_inputs=epilogue.inputs, max_threads=max_threads)


def _emit_input_grad_pixel_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                 max_threads: int, epilogue: _DxEpilogue = _NO_EPILOGUE) -> Kernel:
    """dx for stride 1 as the forward convolution of `_emit_input_grad_as_forward`, with dx's
    pixels in the lanes (forward.py's pixel-lanes kernel): tiles of 6 input channels x two
    vectors of a dx row, twice the accumulators of the channel-lanes tile when there are few
    channels (16: one vector per tile row there), and no transpose of the result."""
    forward, placement = _as_forward_geometry(g)
    C, O, taps = g.channels, g.out_channels, g.taps

    def pack_group(kb, w, block, c0, rows):
        # block[(o, t), r] = W[o, c0 + r, taps-1-t]: the rows input channels' flipped taps
        with kb.for_range(0, O, name="o") as o:
            for r in range(rows):
                source = kb.gep(w, kb.mul(kb.add(kb.mul(o, C), kb.add(c0, r)), taps))
                with kb.for_range(0, taps, name="t") as t:
                    value = kb.load(source, kb.sub(taps - 1, t))
                    kb.store(value, block, kb.add(kb.mul(kb.add(kb.mul(o, taps), t), rows), r))

    def after_sample(kb, out, inputs, n):
        epilogue.apply(kb, out, inputs, n, g.sample_floats)

    return _emit_forward_pixel_lanes(module, name, forward, bias=False, relu=False, max_threads=max_threads,
                                     placement=placement, pack_group=pack_group, after_sample=after_sample,
                                     n_inputs=epilogue.inputs)


def _emit_input_grad_by_cols(module: ir.Module, name: str, g: ConvGeometry, *,
                             max_threads: int, epilogue: _DxEpilogue = _NO_EPILOGUE) -> Kernel:
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

    fn, kb = phase_function(module, f"{name}.compute", epilogue.inputs)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    grad, w = inputs[:2]
    cols = kb.gep(layout.private(kb, scratch, tid, "cols"), margin)
    row_indices, zeros = _row_indices(module), _zeros(module)
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        g_n = _sample(kb, grad, n, O * P)
        dx_n = _sample(kb, out, n, g.sample_floats)
        with kb.for_range(0, g.channels, name="c") as c:
            w_c = kb.gep(w, kb.mul(c, T))

            for first, rows, count in _equal_runs(T, _TILE_ROWS):
                with kb.for_range(0, count, name="rows") as t:
                    r0 = kb.add(first, kb.mul(t, rows))
                    cover.emit_each(kb, _tiles_along(
                        kb, rows, "a", b=g_n, c=kb.gep(cols, kb.mul(r0, P)),
                        a=kb.gep(w_c, r0), a_rows=row_indices, steps=steps, stride=P,
                        n=kb.i64(O), c_row=P, init=zeros, init_row=0, init_vec=0))
            _emit_col2im(kb, g, cols, kb.gep(dx_n, kb.mul(c, g.height * g.width)))
        epilogue.apply(kb, out, inputs, n, g.sample_floats)
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
    epilogue: _DxEpilogue = _NO_EPILOGUE

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
            with kb.for_range(0, len(rows), name="row") as r:
                source = kb.gep(inputs[1], _load_index(kb, sources, r))
                with kb.for_range(0, C, name="c") as c:
                    kb.store(kb.load(source, kb.mul(c, g.taps)), wp, kb.add(kb.mul(r, C), c))

        fn, kb = phase_function(module, f"{name}.compute", self.epilogue.inputs)
        out, inputs, scratch, tid, nthreads = phase_args(fn)
        wp = layout.shared(kb, scratch, "wp")
        g_t = layout.private(kb, scratch, tid, "gT")
        dx_t = layout.private(kb, scratch, tid, "dxT")
        full, rest = divmod(g.batch, lanes)
        groups = full + (rest > 0)
        lo, hi = kb.split_range(groups, tid, nthreads)
        with kb.for_range(lo, kb.min(hi, full), name="group") as group:
            self._emit_group(kb, inputs, out, wp, g_t, dx_t, steps, pixels,
                             kb.mul(group, lanes), lanes)
        if rest:
            # The last, partial group belongs to the thread whose share ends the range.
            with kb.if_then(kb.b.icmp_signed("==", hi, kb.i64(groups))):
                self._emit_group(kb, inputs, out, wp, g_t, dx_t, steps, pixels,
                                 kb.i64(full * lanes), rest)
        kb.b.ret_void()
        pack_fn = _thread0_phase(module, f"{name}.pack", self.epilogue.inputs, pack)
        return Kernel([pack_fn, fn], layout.total_floats(max_threads))

    def _emit_group(self, kb: KernelBuilder, inputs, out, wp, g_t, dx_t, steps, pixels,
                    n0: ir.Value, samples: int) -> None:
        """dx of samples n0 .. n0 + samples - 1 (samples <= the group's lanes)."""
        g, width, lanes = self.g, kb.width, _batch_group()
        grad = inputs[0]
        C, O, P, plane = g.channels, g.out_channels, g.pixels, g.height * g.width
        halves = [(h * width, min(width, samples - h * width))
                  for h in range(-(-samples // width))]
        for first, count in halves:
            # gT[(o, p), first + s] = g[n0 + first + s, o, p]; missing samples are zeros.
            _call_transpose(kb, _sample(kb, grad, kb.add(n0, first), O * P), O * P,
                            kb.gep(g_t, first), lanes, rows=count, cols=O * P, lanes=width)
        row_indices, zeros = _row_indices(kb.module), _zeros(kb.module)
        with kb.for_range(0, plane, name="pixel") as pixel:
            entry = kb.mul(pixel, 3)
            first_row = _load_index(kb, pixels, entry)
            n = _load_index(kb, pixels, kb.add(entry, 1))
            b = kb.gep(g_t, _load_index(kb, pixels, kb.add(entry, 2)))
            for c0, rows in _balanced(C, _TILE_ROWS):
                _call_tile(kb, rows, len(halves), "b",
                           a=kb.gep(wp, kb.add(kb.mul(first_row, C), c0)), a_rows=row_indices,
                           b=b, steps=kb.gep(steps, first_row), stride=C, n=n,
                           c=kb.gep(dx_t, kb.mul(kb.add(pixel, c0 * plane), lanes)),
                           c_row=plane * lanes, v_step=width, init=zeros, init_row=0,
                           init_vec=0)
        for first, count in halves:
            _call_transpose(kb, kb.gep(dx_t, first), lanes,
                            _sample(kb, out, kb.add(n0, first), C * plane), C * plane,
                            rows=C * plane, cols=count, lanes=C * plane)
        self.epilogue.apply(kb, out, inputs, n0, g.sample_floats, samples)


def _emit_input_grad_batch_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                 max_threads: int, epilogue: _DxEpilogue = _NO_EPILOGUE) -> Kernel:
    return _BatchLanesInputGrad(g, epilogue).emit(module, name, max_threads=max_threads)


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
    with kb.for_range(0, len(starts) - 1, name="x") as index:
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
    with kb.for_range(0, g.height, name="y") as y:
        top = kb.add(y, g.pad_top)   # the dx row in padded coordinates
        first = kb.max(0, kb.sub(top, g.out_h - 1))
        stop = kb.min(g.kernel_h, kb.add(top, 1))
        acc = [[kb.variable(zero) for _ in range(sums)] for _ in starts]
        with kb.for_range(first, stop, name="i") as i:
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
