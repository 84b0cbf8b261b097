"""GEMMs with few output columns and B transposed, as dot products along K.

    C[M,N] = (C if accumulate else 0) + A @ B^T  [+ bias]  [then relu]  [then epilogue]

with A stored (M,K) and B stored (N,K), both row-major: row i of A and row j of B are
contiguous runs of K floats, and C[i, j] is their dot product.

Why a second GEMM: the packed GEMM (gemm.py) puts columns of C in vector lanes. With N = 10
(a classifier's logits) or N = 1 (a logistic regression) most of its lanes compute padding,
and it must transpose B into panels on every call. Here the lanes run along K instead, so
every lane does useful work whatever N is, and nothing is packed:

  * A register tile is `rows` rows of A by `cols` rows of B: rows*cols vector accumulators.
    Per K vector it loads `cols` vectors of B and, row by row, one vector of A that feeds
    `cols` fmas. The last K vector is loaded masked (K need not be a multiple of the width).
  * After K, each accumulator is summed across its lanes, and the `cols` sums of a row of
    the tile go into one vector: the tile's row of C, contiguous in memory, to which bias,
    relu and the epilogue apply exactly as in the packed GEMM, then one (masked) store.
  * Threads share the row tiles (or the column groups, when there are more of those).

`choose_dot_plan` says when this beats the packed GEMM; emit_gemm calls it.
"""

from __future__ import annotations

import dataclasses
import math

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import I32, PTR
from graphc.backend.kernels.reduce import horizontal_sum

__all__ = ["DotPlan", "choose_dot_plan"]


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """The blocking of one dot-product GEMM; pure Python, no IR."""

    M: int
    N: int
    K: int
    width: int   # floats per vector register
    rows: int    # rows of A per register tile
    cols: int    # rows of B (columns of C) per register tile; at most `width`
    split: str   # "m": threads share row tiles; "n": column groups

    def __post_init__(self):
        if min(self.M, self.N, self.K) < 1:
            raise ValueError(f"GEMM dims must be >= 1, got {self.M}x{self.N}x{self.K}")
        if not 1 <= self.cols <= self.width or self.rows < 1:
            raise ValueError(f"bad dot tile {self.rows}x{self.cols} for width {self.width}")
        if self.split not in ("n", "m"):
            raise ValueError(f"split must be 'n' or 'm', not {self.split!r}")

    @property
    def row_tiles(self) -> int:
        return math.ceil(self.M / self.rows)

    @property
    def col_groups(self) -> int:
        return math.ceil(self.N / self.cols)

    def workspace_floats(self, nthreads: int = 1) -> int:
        return 1  # nothing is packed

    @property
    def k_blocks(self) -> int:
        return 1  # each tile runs along all of K, then stores C once


def choose_dot_plan(M: int, N: int, K: int, *, width: int, vector_registers: int,
                    packed_strip_width: int) -> DotPlan | None:
    """The dot-product plan for C = A @ B^T, or None when the packed GEMM should run instead.

    The dot kernel wins when the packed GEMM would leave lanes idle: when N is not close to a
    multiple of its strip width (`packed_strip_width` columns per register tile) while K
    fills the lanes along K better. Wide N keeps the packed GEMM, whose panels are reused by
    every row tile.
    """
    if N >= 2 * packed_strip_width:
        return None
    packed_lanes_used = N / (math.ceil(N / width) * width)
    dot_lanes_used = K / (math.ceil(K / width) * width)
    if dot_lanes_used <= packed_lanes_used:
        return None
    rows, cols = _dot_tile(M, N, width, vector_registers)
    split = "m" if math.ceil(M / rows) >= math.ceil(N / cols) else "n"
    return DotPlan(M=M, N=N, K=K, width=width, rows=rows, cols=cols, split=split)


def _dot_tile(M: int, N: int, width: int, vector_registers: int) -> tuple[int, int]:
    """(rows, cols) of the register tile that loads the fewest vectors over the whole GEMM.

    A tile holds rows*cols accumulators, its `cols` B vectors and one A vector; 4 registers
    are left for the compiler. Each K step of a tile loads rows + cols vectors, so the
    whole GEMM loads (tiles of M) * (groups of N) * (rows + cols) vectors per K step.
    """
    best = None
    for cols in range(1, min(N, width) + 1):
        rows = min(M, (vector_registers - 1 - cols) // cols, (vector_registers - 4) // cols)
        if rows < 1:
            continue
        loads = math.ceil(M / rows) * math.ceil(N / cols) * (rows + cols)
        if best is None or loads < best[0]:
            best = (loads, rows, cols)
    return best[1], best[2]


class DotEmitter:
    """Emits one dot-product GEMM: a driver over tiles and one helper per tile shape.

    `apply_epilogue` is the packed GEMM's epilogue (bias,
    relu, elementwise) applied to one row of a tile held in a vector; sharing it keeps the
    two GEMMs' fusion semantics identical.
    """

    def __init__(self, gemm, plan: DotPlan):
        self.gemm = gemm        # the _GemmEmitter: flags, epilogue, helper-function naming
        self.plan = plan

    def emit(self) -> ir.Function:
        g, p = self.gemm, self.plan
        fn, kb, (a, b, c, bias, _workspace, tid, nthreads), extras = g.driver_function()
        if p.split == "m":
            tiles = kb.split_range(p.row_tiles, tid, nthreads)
            groups = (kb.i64(0), kb.i64(p.col_groups))
        else:
            tiles = (kb.i64(0), kb.i64(p.row_tiles))
            groups = kb.split_range(p.col_groups, tid, nthreads)
        full_tiles, tail_rows = divmod(p.M, p.rows)
        full_groups, tail_cols = divmod(p.N, p.cols)

        def tile_calls(i0, rows):
            """Every column group of this thread's share on the rows [i0, i0 + rows)."""
            if full_groups:
                kernel = self._tile_function(rows, p.cols)
                with kb.for_range(groups[0], kb.min(groups[1], full_groups), name="group") as group:
                    self._call_tile(kb, kernel, (a, b, c, bias, extras), i0, kb.mul(group, p.cols))
            if tail_cols:
                kernel = self._tile_function(rows, tail_cols)
                with kb.if_then(kb.b.icmp_signed("==", groups[1], kb.i64(p.col_groups))):
                    self._call_tile(kb, kernel, (a, b, c, bias, extras), i0, kb.i64(full_groups * p.cols))

        if full_tiles:
            with kb.for_range(tiles[0], kb.min(tiles[1], full_tiles), name="tile") as tile:
                tile_calls(kb.mul(tile, p.rows), p.rows)
        if tail_rows:
            with kb.if_then(kb.b.icmp_signed("==", tiles[1], kb.i64(p.row_tiles))):
                tile_calls(kb.i64(full_tiles * p.rows), tail_rows)
        kb.b.ret_void()
        return fn

    def _call_tile(self, kb, kernel, pointers, i0, j0):
        a, b, c, bias, extras = pointers
        p, g = self.plan, self.gemm
        c_offset = kb.add(kb.mul(i0, p.N), j0)
        if g.bias == "col":
            bias_tile = kb.gep(bias, j0)
        elif g.bias == "row":
            bias_tile = kb.gep(bias, i0)
        else:
            bias_tile = bias  # may be null; never read
        kb.b.call(kernel, [kb.gep(a, kb.mul(i0, p.K)), kb.gep(b, kb.mul(j0, p.K)),
                           kb.gep(c, c_offset), bias_tile]
                  + g.offset_extras(kb, extras, c_offset))

    def _tile_function(self, rows: int, cols: int) -> ir.Function:
        """`tile(A_rows, B_rows, C_tile, bias_tile, E_tiles)`: C_tile[rows, cols] from the dot
        products of `rows` rows of A with `cols` rows of B, then the epilogue."""
        g, p = self.gemm, self.plan
        fn, kb = g.internal_function(
            f"dot{rows}x{cols}", ("dot", p.K, p.N, rows, cols) + g.epilogue_key(),
            [PTR, PTR, PTR, PTR] + [PTR] * g.extras)
        if kb is None:
            return fn
        a, b, c, bias = fn.args[:4]
        extras = fn.args[4:]
        w = p.width
        acc = {(r, s): kb.variable(kb.splat(0.0)) for r in range(rows) for s in range(cols)}
        whole_vectors, k_tail = divmod(p.K, w)

        def k_step(k, mask):
            load = (lambda ptr, offset: kb.load_vec(ptr, offset)) if mask is None else \
                (lambda ptr, offset: kb.masked_load_vec(ptr, offset, mask))
            b_vecs = [load(b, kb.add(k, s * p.K)) for s in range(cols)]
            for r in range(rows):
                a_vec = load(a, kb.add(k, r * p.K))
                for s in range(cols):
                    kb.set(acc[r, s], kb.mul_add(a_vec, b_vecs[s], kb.get(acc[r, s])))

        if whole_vectors:
            with kb.for_range(0, whole_vectors * w, step=w, name="k") as k:
                k_step(k, None)
        if k_tail:
            k_step(kb.i64(whole_vectors * w), kb.lane_mask(k_tail))

        mask = None if cols == w else kb.lane_mask(cols)
        for r in range(rows):
            row = _gather_sums(kb, [kb.get(acc[r, s]) for s in range(cols)])
            c_row = kb.gep(c, r * p.N)
            if g.accumulate:
                row = kb.fadd(row, g.load_masked(kb, c_row, 0, mask))
            row = g.apply_epilogue(kb, row, bias, r, 0, mask, g.offset_extras(kb, extras, r * p.N))
            g.store_row(kb, row, c_row, 0, cols)
        kb.b.ret_void()
        return fn


def _gather_sums(kb, vectors) -> ir.Value:
    """A vector whose lane i is the sum of the lanes of vectors[i] (at most `width` vectors;
    the other lanes are zero): a row of a dot tile, ready for the epilogue and one store."""
    result = kb.splat(0.0)
    for lane, vector in enumerate(vectors):
        result = kb.b.insert_element(result, horizontal_sum(kb, vector), ir.Constant(I32, lane))
    return result
