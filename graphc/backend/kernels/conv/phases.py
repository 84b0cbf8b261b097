"""The input gradient of a strided conv2d by phases: as input_grad.py's "as forward" kernel,
a forward convolution with dx's channels in the lanes over g dilated by the stride, but
with no multiply-add on the dilation's zeros.

dx's pixels fall into stride_h x stride_w phases by (y mod sh, x mod sw). All pixels of a
phase read g through the same taps: tap (i, j) of the flipped kernel reads a cell of g
(not a zero between two) iff (py + i - first_y) and (px + j - first_x) are multiples of
the stride, first_* being where g's first cell lands in the dilated plane. A 3x3 conv of
stride 2 splits its 9 taps 1 + 2 + 2 + 4 over the 4 phases, so each dx pixel sums over its
phase's taps only: a quarter of the "as forward" work (which sums over all 9 for every
pixel, 3 in 4 of them zeros), and the same FLOPs as the conv itself. A 1x1 conv of stride
2 leaves three phases without taps: zeros, computed by nothing.

Tiles are 6 pixels of one phase along a dx row (sw apart, so they land in outT rows sw
apart); a row's last tile ends on its last pixel, overlapping the one before it when the
row is not a multiple of 6 (its overlapped pixels are computed twice, to the same sums).
The phase's taps, for all of g's channels, are one run of steps, its weights one block of
Wt rows; outT is then transposed into dx[n] as the "as forward" kernel's is.

Nor is g dilated: pixel (a, b) of a phase reads, through its tap (i, j), the cell
(a + m_i, b + n_j) of g, with m_i = (py + i - first_y) / sh exact for the phase's taps (and
n_j likewise). So each sample of g is copied into a plane padded only where some m or n
reaches past g's edges, row by row in whole vectors, instead of a plane sh x sw times larger
filled cell by cell.
"""
from __future__ import annotations

import dataclasses
import functools

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.kernels.conv.buffers import (_my_samples, _Placement, _round_up, _sample, _ScratchLayout,
                                                 _thread0_phase, emit_fill_zero)
from graphc.backend.kernels.conv.forward import _emit_channel_groups
from graphc.backend.kernels.conv.geometry import ConvGeometry, _lanes_efficiency
from graphc.backend.kernels.conv.input_grad import _NO_EPILOGUE, _as_forward_geometry, _DxEpilogue
from graphc.backend.kernels.conv.tiles import _TILE_ROWS, _call_tile, _call_transpose, _Tables
from graphc.backend.llvm.target import vector_width_f32

__all__ = ["Phase", "phases_of", "by_phases_possible", "by_phases_efficiency", "emit_input_grad_by_phases"]


@dataclasses.dataclass(frozen=True)
class Phase:
    """dx's pixels (rows*sh + py, cols*sw + px) and the flipped taps (i, j) they read g by."""

    py: int
    px: int
    rows: int
    cols: int
    taps: tuple[tuple[int, int], ...]

    @property
    def starts(self) -> tuple[int, ...]:
        """The first column (in the phase's own columns) of each tile along a row."""
        whole = tuple(range(0, self.cols - _TILE_ROWS + 1, _TILE_ROWS))
        return whole + ((self.cols - _TILE_ROWS,) if self.cols % _TILE_ROWS else ())


@functools.lru_cache(maxsize=256)
def phases_of(g: ConvGeometry) -> tuple[Phase, ...]:
    _, placement = _as_forward_geometry(g)
    sh, sw = g.stride_h, g.stride_w
    return tuple(Phase(py, px, len(range(py, g.height, sh)), len(range(px, g.width, sw)),
                       tuple((i, j) for i in range(g.kernel_h) for j in range(g.kernel_w)
                             if (py + i - placement.first_y) % sh == 0 and (px + j - placement.first_x) % sw == 0))
                 for py in range(sh) for px in range(sw))


def by_phases_possible(g: ConvGeometry, width: int) -> bool:
    """Strided, some phase has both pixels and taps, and each such phase has rows of a whole
    tile at least."""
    working = [phase for phase in phases_of(g) if phase.taps and phase.rows]
    return (g.stride_h, g.stride_w) != (1, 1) and bool(working) and all(
        phase.cols >= _TILE_ROWS for phase in working)


def by_phases_efficiency(g: ConvGeometry, width: int) -> float:
    """The useful multiply-adds (as "as forward" counts them: one per cell of g and tap)
    among those made, overlapping tiles and short lanes included."""
    made = sum(phase.rows * _TILE_ROWS * len(phase.starts) * len(phase.taps) for phase in phases_of(g))
    return g.pixels * g.taps / made * _lanes_efficiency(g.channels, width)


@dataclasses.dataclass(frozen=True)
class _GPlane:
    """Where a sample of g goes: its planes padded by `top`, `left` (and enough below and to
    the right), and the shift (m, n) by which each flipped tap (i, j) moves a phase's pixel."""

    top: int
    left: int
    height: int
    width: int
    shifts: dict

    @classmethod
    def of(cls, g: ConvGeometry) -> "_GPlane":
        _, dilated = _as_forward_geometry(g)
        shifts = {(phase.py, phase.px, i, j): ((phase.py + i - dilated.first_y) // g.stride_h,
                                               (phase.px + j - dilated.first_x) // g.stride_w)
                  for phase in phases_of(g) for i, j in phase.taps}
        reach = [(phase.rows - 1 + m, phase.cols - 1 + n) for phase in phases_of(g) for i, j in phase.taps
                 for m, n in [shifts[phase.py, phase.px, i, j]]]
        top = max(0, -min(m for m, _ in shifts.values()))
        left = max(0, -min(n for _, n in shifts.values()))
        bottom = max(0, max(m for m, _ in reach) - (g.out_h - 1))
        right = max(0, max(n for _, n in reach) - (g.out_w - 1))
        return cls(top, left, top + g.out_h + bottom, left + g.out_w + right, shifts)

    def placement(self, g: ConvGeometry) -> _Placement:
        return _Placement(channels=g.out_channels, src_h=g.out_h, src_w=g.out_w, dst_h=self.height,
                          dst_w=self.width, step_y=1, step_x=1, first_y=self.top, first_x=self.left)


def emit_input_grad_by_phases(module: ir.Module, name: str, g: ConvGeometry, *, max_threads: int,
                              epilogue: _DxEpilogue = _NO_EPILOGUE) -> Kernel:
    plane_g = _GPlane.of(g)
    placement = plane_g.placement(g)
    width = vector_width_f32()
    C, O, taps, P = g.channels, g.out_channels, g.taps, g.height * g.width
    lanes = _round_up(C, width)
    phases = [phase for phase in phases_of(g) if phase.taps]
    first_rows = [0]                # each phase's first row of Wt
    for phase in phases:
        first_rows.append(first_rows[-1] + O * len(phase.taps))
    layout = _ScratchLayout(shared={"wt": first_rows[-1] * lanes, "zero": lanes},
                            private={"x": placement.buffer_floats(width), "outT": P * lanes})
    tables = _Tables(module, name)
    plane, row = plane_g.height * plane_g.width, plane_g.width
    pixels = [tables.add(f"pixels{phase.py}.{phase.px}",
                         [(a + plane_g.top) * row + b + plane_g.left
                          for a in range(phase.rows) for b in range(phase.cols)]) for phase in phases]
    steps = []
    for phase in phases:
        shifts = [plane_g.shifts[phase.py, phase.px, i, j] for i, j in phase.taps]
        steps.append(tables.add(f"steps{phase.py}.{phase.px}",
                                [o * plane + m * row + n for o in range(O) for m, n in shifts]))

    def pack_weights(kb, inputs, scratch):
        # Wt[first_row + o*len(taps) + t, c] = W[o, c, kh-1-i, kw-1-j] for tap t = (i, j) of
        # the phase: W flipped, its taps grouped by phase; lanes past C stay zero.
        wt, w = layout.shared(kb, scratch, "wt"), inputs[1]
        emit_fill_zero(kb, wt, kb.i64(first_rows[-1] * lanes))
        emit_fill_zero(kb, layout.shared(kb, scratch, "zero"), kb.i64(lanes))
        for phase, first_row in zip(phases, first_rows):
            for t, (i, j) in enumerate(phase.taps):
                flipped = (g.kernel_h - 1 - i) * g.kernel_w + (g.kernel_w - 1 - j)
                with kb.for_range(0, O, name="o") as o:
                    dst = kb.gep(wt, kb.mul(kb.add(kb.mul(o, len(phase.taps)), first_row + t), lanes))
                    src = kb.gep(w, kb.add(kb.mul(o, C * taps), flipped))
                    with kb.for_range(0, C, name="c") as c:
                        kb.store(kb.load(src, kb.mul(c, taps)), dst, c)

    fn, kb = phase_function(module, f"{name}.compute", epilogue.inputs)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    wt, zero = layout.shared(kb, scratch, "wt"), layout.shared(kb, scratch, "zero")
    out_t = layout.private(kb, scratch, tid, "outT")
    if len(phases) < g.stride_h * g.stride_w:     # pixels of phases without taps: zero, written once
        emit_fill_zero(kb, out_t, kb.i64(P * lanes))
    x_buffer = placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = placement.place(kb, _sample(kb, inputs[0], n, placement.source_floats), x_buffer)

        def group(ch0, vecs):
            for phase, first_row, phase_pixels, phase_steps in zip(phases, first_rows, pixels, steps):
                with kb.for_range(0, phase.rows, name="a") as a:
                    y = kb.add(kb.mul(a, g.stride_h), phase.py)
                    for start in phase.starts:
                        pixel = kb.add(kb.mul(y, g.width), start * g.stride_w + phase.px)
                        row_pixels = kb.gep(phase_pixels, kb.add(kb.mul(a, phase.cols), start))
                        _call_tile(kb, _TILE_ROWS, vecs, "a", a=x_n, a_rows=row_pixels,
                                   b=kb.gep(wt, kb.add(ch0, first_row * lanes)), steps=phase_steps, stride=lanes,
                                   n=O * len(phase.taps), c=kb.gep(out_t, kb.add(kb.mul(pixel, lanes), ch0)),
                                   c_row=g.stride_w * lanes, v_step=kb.width, init=kb.gep(zero, ch0),
                                   init_row=0, init_vec=kb.width)

        _emit_channel_groups(kb, lanes, group)
        _call_transpose(kb, out_t, lanes, _sample(kb, out, n, g.sample_floats), P, rows=P, cols=C, lanes=P)
        epilogue.apply(kb, out, inputs, n, g.sample_floats)
    kb.b.ret_void()
    pack = _thread0_phase(module, f"{name}.pack", epilogue.inputs, pack_weights)
    return Kernel([pack, fn], layout.total_floats(max_threads))
