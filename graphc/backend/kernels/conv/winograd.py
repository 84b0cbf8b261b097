"""3x3 stride-1 convolutions by Winograd's minimal filtering F(m x m, 3 x 3), m = 2 or 4
(Lavin & Gray, 2015).

Each m x m block of output pixels (a *tile*) of output channel o is

    Y = A^T [ sum over c of U[o, c] * V[c] ] A      (* elementwise on n x n arrays, n = m + 2)

where V[c] = B^T d B transforms the n x n cells d of input channel c the tile reads, and
U[o, c] = G w[o, c] G^T the 3x3 weights. Per tile, the sum takes n^2 C multiply-adds per
output channel against the direct convolution's 9 m^2 C: 16 for 36 (F2), 36 for 144 (F4).
For each of the n^2 positions xi of the arrays, the sum over c is a GEMM

    M[xi][o, t] = sum over c of U[xi][o, c] * V[xi][c, t]

run on the conv package's register tile with tiles in the lanes (6 output channels x a pair
of vectors of tiles, U broadcast), as the pixels-in-lanes forward runs with pixels.

A kernel works on one sample at a time (threads split the batch) and on it a chunk of whole
rows of tiles at a time, so that V and M (n^2 C and n^2 O floats a tile) stay in cache:
  1. V of the chunk's tiles, vectorised along a row of tiles: each row of the input cells is
     read as two runs of m L floats (L: the transforms' lanes), m apart, whose m phases
     (every m-th cell) are the tiles' columns; stored channel by channel (V[xi][c, t],
     tiles minor).
  2. The n^2 GEMMs.
  3. Y from M, along a row of tiles too: a tile's m columns interleaved into output rows,
     with the bias and the ReLU, stored straight into out.
Phase 1 (threads split the output channels) transforms the weights into U, packed per group
of output channels as the pixels-in-lanes forward packs its weights.

The input gradient of such a conv is one too (of g padded by 2 - padding, with the weights
flipped and transposed): `emit_input_grad_winograd`; the weight gradient is in
winograd_weight_grad.py.

Possible when the kernel is 3x3, the stride 1, the output's height and width multiples of m
(whole tiles), and a sample holds at least a vector of tiles. The transforms' lanes L are
the largest power of two that a row of tiles holds, at most W (F4: at most W / 2 where W > 4);
rows not a whole number of such vectors end on an overlapping one (the same tiles computed
twice). F4's second run ends 2 cells past a row (cells no tile uses): its samples are always
copied, with a margin.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import I32, KernelBuilder
from graphc.backend.kernels.conv.buffers import (_CACHE_LINE_FLOATS, _my_samples, _Placement, _round_up, _sample,
                                                 _ScratchLayout)
from graphc.backend.kernels.conv.geometry import _ONE_VECTOR_EFFICIENCY, ConvGeometry, _VectorCover
from graphc.backend.kernels.conv.input_grad import _NO_EPILOGUE, _as_forward_geometry, _DxEpilogue
from graphc.backend.kernels.conv.tiles import (_TILE_ROWS, _equal_runs, _load_index, _row_indices, _Tables, _tiles_along,
                                               _zeros)
from graphc.backend.llvm.target import vector_width_f32

__all__ = ["F2", "F4", "winograd_possible", "winograd_efficiency", "input_grad_winograd_possible",
           "input_grad_winograd_efficiency", "emit_forward_winograd", "emit_input_grad_winograd"]


@dataclasses.dataclass(frozen=True)
class _Scheme:
    """F(m x m, 3 x 3): m x m output tiles from (m + 2)^2 products; the rows of B^T, G and A^T
    as (coefficient, index) terms."""

    m: int
    bt: tuple
    g: tuple
    at: tuple

    @property
    def n(self) -> int:
        """Cells of a tile's input (and of its transforms) along each axis."""
        return self.m + 2


F2 = _Scheme(2, bt=(((1, 0), (-1, 2)), ((1, 1), (1, 2)), ((-1, 1), (1, 2)), ((1, 1), (-1, 3))),
             g=(((1, 0),), ((.5, 0), (.5, 1), (.5, 2)), ((.5, 0), (-.5, 1), (.5, 2)), ((1, 2),)),
             at=(((1, 0), (1, 1), (1, 2)), ((1, 1), (-1, 2), (-1, 3))))
# The points 0, 1, -1, 2, -2 and infinity (Lavin & Gray's): float32 errors ~1e-5 of the
# largest output where F2's are ~2e-6 (bench/NOTES.md, "Winograd").
F4 = _Scheme(4, bt=(((4, 0), (-5, 2), (1, 4)), ((-4, 1), (-4, 2), (1, 3), (1, 4)),
                    ((4, 1), (-4, 2), (-1, 3), (1, 4)), ((-2, 1), (-1, 2), (2, 3), (1, 4)),
                    ((2, 1), (-1, 2), (-2, 3), (1, 4)), ((4, 1), (-5, 3), (1, 5))),
             g=(((1 / 4, 0),), ((-1 / 6, 0), (-1 / 6, 1), (-1 / 6, 2)), ((-1 / 6, 0), (1 / 6, 1), (-1 / 6, 2)),
                ((1 / 24, 0), (1 / 12, 1), (1 / 6, 2)), ((1 / 24, 0), (-1 / 12, 1), (1 / 6, 2)), ((1, 2),)),
             at=(((1, 0), (1, 1), (1, 2), (1, 3), (1, 4)), ((1, 1), (-1, 2), (2, 3), (-2, 4)),
                 ((1, 1), (1, 2), (4, 3), (4, 4)), ((1, 1), (-1, 2), (8, 3), (-8, 4), (1, 5))))


# F4's transforms amplify what the inputs have in common: on raw images (mean 1000) its error
# was 1.3e-4 of the output where F2 and the direct kernels gave 4e-5. Layers that read images
# have few channels; F4 is kept for the others.
_F4_MIN_CHANNELS = 8

# What the cost model leaves out (V and M going through cache) cost about a fifth.
_UNCOUNTED = 0.8

# Weight(kb, w, o, c, i, j) -> the index in w of tap (i, j) of output channel o, input c.
WeightIndex = Callable[[KernelBuilder, ir.Value, ir.Value, int, int], ir.Value]


# ---------------------------------------------------------------------------- planning

def _tiles(g: ConvGeometry, m: int = 2) -> tuple[int, int]:
    return g.out_h // m, g.out_w // m


def _transform_width(g: ConvGeometry, width: int, m: int = 2) -> int:
    """Lanes of the transforms: the widest power of two <= W that a row of tiles holds, and
    for F4 at most max(4, W / 2): a run of the input's cells is m x lanes floats, and picking
    the tiles' columns out of a run four registers long (F4 at full width) took more shuffles
    than the narrower transform saves (bench/NOTES.md, "F4's transforms on AVX2")."""
    lanes = width if m == 2 else min(width, max(4, width // 2))
    while lanes > _tiles(g, m)[1]:
        lanes //= 2
    return lanes


def _chunk_rows(g: ConvGeometry, width: int, m: int = 2) -> int:
    """Rows of tiles per chunk: the fewest that divide the tile rows and hold two vectors of
    tiles (the register tile's pair), else all of them. More tiles a chunk only made V and
    M spill from L1 (bench/NOTES.md, "Winograd")."""
    rows, cols = _tiles(g, m)
    enough = [d for d in range(1, rows + 1) if rows % d == 0 and d * cols >= 2 * width]
    return min(enough) if enough else rows


def winograd_possible(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> bool:
    rows, cols = _tiles(g, scheme.m)
    return ((g.kernel_h, g.kernel_w, g.stride_h, g.stride_w) == (3, 3, 1, 1) and
            g.out_h % scheme.m == 0 and g.out_w % scheme.m == 0 and rows * cols >= width and
            (scheme.m == 2 or g.channels >= _F4_MIN_CHANNELS))


def winograd_efficiency(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> float:
    """The direct paths' multiply-adds (9 m^2 C O a tile, over W lanes at two FMAs a cycle)
    per cycle this path spends, as the other paths count theirs: the GEMMs' n^2 C O (a
    chunk's vectors of tiles counted as the other paths count lanes), plus the transforms
    per tile, an input channel's about n^2 / 16 (16 / lanes + 1.6) m / 2 cycles (F4's columns
    are a run's fourths, more shuffles) and an output channel's m^2 (measured for F2 at 4
    and 16 lanes, F4 at 4 and 8: bench/NOTES.md, "Winograd"), discounted by `_UNCOUNTED` for
    the memory traffic of V and M."""
    m, n = scheme.m, scheme.n
    chunk = _chunk_rows(g, width, m) * _tiles(g, m)[1]
    cover = _VectorCover.of(chunk, width)
    lanes_efficiency = chunk / cover.lanes * (_ONE_VECTOR_EFFICIENCY if cover.lanes == width else 1.0)
    C, O, lanes = g.channels, g.out_channels, _transform_width(g, width, m)
    made = n * n * C * O / lanes_efficiency + 2 * width * (C * n * n / 16 * (16 / lanes + 1.6) * m / 2 + m * m * O)
    return 9 * m * m * C * O / made * _UNCOUNTED


def input_grad_winograd_possible(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> bool:
    return winograd_possible(_as_forward_geometry(g)[0], width, scheme)


def input_grad_winograd_efficiency(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> float:
    """As the forward's, of the cells of g among those of g dilated by the stride."""
    return winograd_efficiency(_as_forward_geometry(g)[0], width, scheme) * g.pixels / (g.height * g.width)


# ----------------------------------------------------------------------------- kernels

def emit_forward_winograd(module: ir.Module, name: str, g: ConvGeometry, *, bias: bool,
                          relu: bool, max_threads: int, scheme: _Scheme = F2,
                          after_sample: Callable | None = None, n_inputs: int | None = None) -> Kernel:
    C = g.channels

    def weight(kb, o, c, i, j):
        return kb.add(kb.mul(kb.add(kb.mul(o, C), c), 9), 3 * i + j)

    placement = _Placement.padding_of(g, always=scheme.m > 2, margin=scheme.m)
    return _Winograd(g, placement, weight, scheme, bias=bias, relu=relu, after_sample=after_sample).emit(
        module, name, n_inputs=n_inputs or (3 if bias else 2), max_threads=max_threads)


def emit_input_grad_winograd(module: ir.Module, name: str, g: ConvGeometry, *, max_threads: int,
                             epilogue: _DxEpilogue = _NO_EPILOGUE, scheme: _Scheme = F2) -> Kernel:
    """dx = the forward conv of g padded by 2 - padding with W[o, c] flipped, o and c
    swapped (input_grad.py's `_emit_input_grad_as_forward`), by Winograd."""
    forward, placement = _as_forward_geometry(g)
    placement = dataclasses.replace(placement, always=scheme.m > 2, margin=scheme.m)
    C = g.channels

    def weight(kb, c, o, i, j):      # the forward's output channel is dx's channel c
        return kb.add(kb.mul(kb.add(kb.mul(o, C), c), 9), 3 * (2 - i) + (2 - j))

    def after_sample(kb, out, inputs, n):
        epilogue.apply(kb, out, inputs, n, g.sample_floats)

    return _Winograd(forward, placement, weight, scheme, after_sample=after_sample).emit(
        module, name, n_inputs=epilogue.inputs, max_threads=max_threads)


def _combine(kb: KernelBuilder, terms, values):
    """sum of coefficient * values[index] over terms."""
    total = None
    for coefficient, index in terms:
        value = values[index]
        if total is None:
            if abs(coefficient) != 1:
                total = kb.b.fmul(value, _constant_like(kb, value, coefficient))
            else:
                total = value if coefficient > 0 else kb.b.fneg(value)
        elif abs(coefficient) != 1:
            total = kb.mul_add(value, _constant_like(kb, value, coefficient), total)
        else:
            total = kb.b.fadd(total, value) if coefficient > 0 else kb.b.fsub(total, value)
    return total


def _constant_like(kb: KernelBuilder, value: ir.Value, number: float) -> ir.Value:
    if isinstance(value.type, ir.VectorType):
        return KernelBuilder(kb.b, value.type.count).splat(number)
    return kb.f32(number)


def _transform(kb: KernelBuilder, rows, cells):
    """rows(matrix) x cells x rows(matrix)^T for a 2D list of cells (len(matrix[0]) square)."""
    left = [[_combine(kb, terms, [cells[k][j] for k in range(len(cells))])
             for j in range(len(cells[0]))] for terms in rows]
    return [[_combine(kb, terms, line) for terms in rows] for line in left]


def _cache_stride(floats: int) -> int:
    """The distance between the n^2 arrays of a chunk (V[xi], M[xi]): a cache line more than
    their size. The n^2 cells of a tile, read or written together, would otherwise often be
    a multiple of 4 KB apart, all in one set of L1."""
    return _round_up(floats, _CACHE_LINE_FLOATS) + _CACHE_LINE_FLOATS


class _TilePlan:
    """A sample's m x m tiles, the chunks of tile rows they are worked in, and the transform
    of a chunk's input cells (`transform_input`), shared by the forward and the weight
    gradient. `placement` lays out a sample as `g`'s padded planes."""

    def __init__(self, g: ConvGeometry, placement: _Placement, chunk_rows: int | None = None, m: int = 2):
        self.g, self.placement, self.m = g, placement, m
        self.width = vector_width_f32()
        self.lanes = _transform_width(g, self.width, m)
        self.tile_rows, self.tile_cols = _tiles(g, m)
        self.chunk_rows = chunk_rows or _chunk_rows(g, self.width, m)
        self.chunk = self.chunk_rows * self.tile_cols
        self.chunks = self.tile_rows // self.chunk_rows

    @contextlib.contextmanager
    def row_starts(self, kb: KernelBuilder) -> Iterator[ir.Value]:
        """A loop over the first tile of each transform vector along a row of tiles (the last
        one overlapping the one before where lanes do not divide the row). A loop, not one
        copy of the transform per vector: F4's is hundreds of instructions."""
        vectors = -(-self.tile_cols // self.lanes)
        if vectors == 1:
            yield kb.i64(0)
            return
        with kb.for_range(0, vectors, name="vector") as vector:
            yield kb.min(kb.mul(vector, self.lanes), self.tile_cols - self.lanes)

    def transform_input(self, kb: KernelBuilder, x_n, row0, v, v_stride: int, bt) -> None:
        """v[xi*v_stride + c*chunk + t] = (B^T d B)[xi] (bt: B^T's rows, n x n) for the cells
        d of channel c that the chunk's tile t reads, from the placed sample x_n."""
        m, n, lanes, chunk = self.m, len(bt), self.lanes, self.chunk
        wide, narrow = KernelBuilder(kb.b, m * lanes), KernelBuilder(kb.b, lanes)
        plane = self.placement.dst_h * self.placement.dst_w
        row_w = self.placement.dst_w
        phases = [ir.Constant(ir.VectorType(I32, lanes), list(range(phase, m * lanes, m))) for phase in range(m)]
        with kb.for_range(0, self.g.channels, name="c") as c:
            with kb.for_range(0, self.chunk_rows, name="row") as row:
                top = kb.gep(x_n, kb.add(kb.mul(c, plane), kb.mul(kb.add(row0, row), m * row_w)))
                with self.row_starts(kb) as start:
                    # Row k of the tiles as two runs, m cells apart: column l of the tiles is
                    # phase l % m of run l // m.
                    first = kb.gep(top, kb.mul(start, m))
                    runs = [[wide.load_vec(first, k * row_w + shift) for shift in (0, m)]
                            for k in range(n)]
                    # B^T over the rows first (on whole runs), then over the columns.
                    rows = [[_combine(kb, terms, [runs[k][run] for k in range(n)]) for run in (0, 1)]
                            for terms in bt]
                    cells = [[kb.b.shuffle_vector(pair[l // m], pair[l // m], phases[l % m]) for l in range(n)]
                             for pair in rows]
                    tile = kb.add(kb.add(kb.mul(c, chunk), kb.mul(row, self.tile_cols)), start)
                    for i in range(n):
                        for j, terms in enumerate(bt):
                            narrow.store_vec(_combine(narrow, terms, cells[i]), v,
                                             kb.add(tile, (n * i + j) * v_stride))


class _Winograd:
    """The kernel: see the module's docstring. `placement` lays out a sample as `g`'s padded
    planes; `weight` indexes the conv's weights; `after_sample` as `_LanesForward`'s."""

    def __init__(self, g: ConvGeometry, placement: _Placement, weight: WeightIndex, scheme: _Scheme, *,
                 bias: bool = False, relu: bool = False, after_sample: Callable | None = None):
        self.g, self.placement, self.weight, self.scheme = g, placement, weight, scheme
        self.bias, self.relu, self.after_sample = bias, relu, after_sample
        self.width = vector_width_f32()
        self.plan = _TilePlan(g, placement, m=scheme.m)
        self.chunk = self.plan.chunk
        self.positions = scheme.n * scheme.n
        self.v_stride = _cache_stride(g.channels * self.chunk)
        self.m_stride = _cache_stride(g.out_channels * self.chunk)

    def emit(self, module: ir.Module, name: str, *, n_inputs: int, max_threads: int) -> Kernel:
        g, chunk = self.g, self.chunk
        C, O = g.channels, g.out_channels
        layout = self._layout()
        tables = _Tables(module, name)
        steps = tables.add("steps", [c * chunk for c in range(C)])

        fn, kb = phase_function(module, f"{name}.compute", n_inputs)
        out, inputs, scratch, tid, nthreads = phase_args(fn)
        u = layout.shared(kb, scratch, "u")
        v, m = layout.private(kb, scratch, tid, "v"), layout.private(kb, scratch, tid, "m")
        x_buffer = self.placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
        bias = inputs[2] if self.bias else None
        with _my_samples(kb, g.batch, tid, nthreads) as n:
            x_n = self.placement.place(kb, _sample(kb, inputs[0], n, self.placement.source_floats),
                                       x_buffer)
            out_n = _sample(kb, out, n, O * g.pixels)
            with kb.for_range(0, self.plan.chunks, name="chunk") as index:
                row0 = kb.mul(index, self.plan.chunk_rows)
                self.plan.transform_input(kb, x_n, row0, v, self.v_stride, self.scheme.bt)
                self._multiply(kb, u, v, m, steps)
                self._transform_output(kb, m, row0, out_n, bias)
            if self.after_sample is not None:
                self.after_sample(kb, out, inputs, n)
        kb.b.ret_void()
        pack, kb = phase_function(module, f"{name}.pack", n_inputs)
        _, inputs, scratch, tid, nthreads = phase_args(pack)
        self._transform_weights(kb, inputs, scratch, tables, kb.split_range(O, tid, nthreads))
        kb.b.ret_void()
        return Kernel([pack, fn], layout.total_floats(max_threads))

    def _layout(self) -> _ScratchLayout:
        C, O = self.g.channels, self.g.out_channels
        return _ScratchLayout(shared={"u": self.positions * O * C},
                              private={"x": self.placement.buffer_floats(self.width),
                                       "v": self.positions * self.v_stride, "m": self.positions * self.m_stride})

    # -- phase 1 ----------------------------------------------------------------------

    def _transform_weights(self, kb: KernelBuilder, inputs, scratch, tables: _Tables, channels) -> None:
        """U[xi] for each group of output channels from o0: the (C, rows) block at o0*C, for
        the output channels in range(*channels) (threads split them). Channel o's column of
        its group starts at `starts[o]`, `rows[o]` floats apart: one loop over the channels,
        not one per group (LLVM's time)."""
        C, O, n = self.g.channels, self.g.out_channels, self.scheme.n
        w, u = inputs[1], self._layout().shared(kb, scratch, "u")
        groups = [(o0 + r, o0 * C + r, rows) for first, rows, count in _equal_runs(O, _TILE_ROWS)
                  for o0 in range(first, first + rows * count, rows) for r in range(rows)]
        starts = tables.add("ustarts", [start for _, start, _ in sorted(groups)])
        steps = tables.add("urows", [rows for _, _, rows in sorted(groups)])
        with kb.for_range(*channels, name="o") as o:
            start, rows = _load_index(kb, starts, o), _load_index(kb, steps, o)
            with kb.for_range(0, C, name="c") as c:
                taps = [[kb.load(w, self.weight(kb, o, c, i, j)) for j in range(3)] for i in range(3)]
                transformed = _transform(kb, self.scheme.g, taps)
                at = kb.add(start, kb.mul(c, rows))
                for xi in range(self.positions):
                    kb.store(transformed[xi // n][xi % n], u, kb.add(at, xi * O * C))

    # -- phase 2 ----------------------------------------------------------------------

    def _multiply(self, kb: KernelBuilder, u, v, m, steps) -> None:
        """M[xi] = U[xi] V[xi] for the n^2 xi: tiles of up to 6 output channels x vectors
        of the chunk's tiles."""
        C, O, chunk = self.g.channels, self.g.out_channels, self.chunk
        cover = _VectorCover.of(chunk, self.width)
        rows_table, zeros = _row_indices(kb.module), _zeros(kb.module)
        with kb.for_range(0, self.positions, name="xi") as xi:
            u_xi = kb.gep(u, kb.mul(xi, O * C))
            v_xi, m_xi = kb.gep(v, kb.mul(xi, self.v_stride)), kb.gep(m, kb.mul(xi, self.m_stride))
            for first, rows, count in _equal_runs(O, _TILE_ROWS):
                with kb.for_range(0, count, name="group") as group:
                    o0 = kb.add(first, kb.mul(group, rows))
                    cover.emit_each(kb, _tiles_along(
                        kb, rows, "b", b=v_xi, c=kb.gep(m_xi, kb.mul(o0, chunk)),
                        a=kb.gep(u_xi, kb.mul(o0, C)), a_rows=rows_table, steps=steps, stride=rows,
                        n=kb.i64(C), c_row=chunk, init=zeros, init_row=0, init_vec=0, relu=False))

    def _transform_output(self, kb: KernelBuilder, m, row0, out_n, bias) -> None:
        """out[o] rows m*(row0 + row) to the m-1 after from M[xi][o, t] of the chunk's tiles:
        the tiles' m columns of a row interleaved."""
        g, plan, chunk, scheme = self.g, self.plan, self.chunk, self.scheme
        size, n, lanes = scheme.m, scheme.n, plan.lanes
        narrow = KernelBuilder(kb.b, lanes)
        O = g.out_channels
        with kb.for_range(0, O, name="o") as o:
            shift = narrow.splat(kb.load(bias, o)) if bias is not None else None
            with kb.for_range(0, plan.chunk_rows, name="row") as row:
                y = kb.mul(kb.add(row0, row), size)
                with plan.row_starts(kb) as start:
                    tile = kb.add(kb.add(kb.mul(o, chunk), kb.mul(row, plan.tile_cols)), start)
                    cells = [[narrow.load_vec(m, kb.add(tile, (n * i + j) * self.m_stride)) for j in range(n)]
                             for i in range(n)]
                    result = _transform(kb, scheme.at, cells)
                    for dy in range(size):
                        columns = []
                        for value in result[dy]:
                            if shift is not None:
                                value = kb.b.fadd(value, shift)
                            if self.relu:
                                value = narrow.relu(value)
                            columns.append(value)
                        kb.store_vec(_interleave(kb, columns), out_n, kb.add(
                            kb.mul(o, g.pixels), kb.add(kb.mul(kb.add(y, dy), g.out_w), kb.mul(start, size))))


def _interleave(kb: KernelBuilder, columns: list[ir.Value]) -> ir.Value:
    """One vector of len(columns) x lanes floats: lane t of each column in turn (2 or 4)."""
    lanes = columns[0].type.count
    if len(columns) == 2:
        mask = [k // 2 + (k % 2) * lanes for k in range(2 * lanes)]
        return kb.b.shuffle_vector(columns[0], columns[1], ir.Constant(ir.VectorType(I32, 2 * lanes), mask))
    halves = [kb.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 2 * lanes), list(range(2 * lanes))))
              for a, b in (columns[:2], columns[2:])]
    mask = [(k % 4) * lanes + k // 4 for k in range(4 * lanes)]
    return kb.b.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(I32, 4 * lanes), mask))
