"""Shape-specialised float32 GEMM, cache- and register-blocked, as LLVM IR.

    C[M,N] = (C if accumulate else 0) + op(A) @ op(B)  [+ bias]  [then relu]

op(A) is A stored (M,K) row-major, or with trans_a A stored (K,M); op(B) is
B stored (K,N), or with trans_b B stored (N,K).  C is (M,N) row-major.

How it is fast (see shared/NOTES-llvm.md for the measurements):

  * K is cut into blocks of at most 256 (`kc`).  Within a block, B is cut
    into strips of `strip_width` = vecs*W columns, and each strip is packed
    into a contiguous panel (kc x strip_width floats, row k after row k-1)
    in the caller's workspace.  The panel fits in L1 and is reused by every
    row tile of the strip; the A block (M x kc) stays in L2 across strips.
  * A micro-kernel computes a register tile of `rows` x (vecs x W) of C:
    rows*vecs vector accumulators, updated per k by one broadcast load of A
    per row and one fma per accumulator with the packed B vectors.
  * All shapes are compile-time constants, so tails are resolved when
    generating: a strip narrower than strip_width uses a micro-kernel with
    fewer vectors and a masked last vector; the last rows < `rows` use a
    micro-kernel with fewer rows.  Any M, N, K >= 1 works.
  * Loops stay IR loops (K blocks, strips, row tiles, k), so the generated
    code and the compile time stay small whatever the shape.

Threads: the function takes (tid, nthreads) and computes only its share of
strips of N (or of row tiles of M when N has fewer strips than M has tiles).
Shares never overlap, each thread packs into its own slice of the
workspace, so nthreads concurrent calls with tid = 0..nthreads-1 compute C
without races.  C is written only by the thread owning the tile.
"""

from __future__ import annotations

import dataclasses
import math

import llvmlite.ir as ir

from graphc.codegen.kernel_builder import I1, I64, PTR, KernelBuilder
from graphc.codegen.target import vector_register_count, vector_width_f32

__all__ = ["GemmPlan", "choose_plan", "emit_gemm", "gemm_workspace_floats",
           "GEMM_ARG_NAMES"]

# Signature of every generated GEMM: void(A, B, C, bias, workspace, tid, nthreads)
GEMM_ARG_NAMES = ("A", "B", "C", "bias", "workspace", "tid", "nthreads")

# Larger K blocks spill the packed panel out of L1 (512 measured much worse).
MAX_K_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """Every blocking decision for one GEMM shape; pure Python, no IR."""

    M: int
    N: int
    K: int
    width: int        # floats per vector register
    rows: int         # rows of C per register tile
    vecs: int         # vectors per row of a register tile
    kc: int           # K block length

    def __post_init__(self):
        if min(self.M, self.N, self.K) < 1:
            raise ValueError(f"GEMM dims must be >= 1, got {self.M}x{self.N}x{self.K}")

    @property
    def strip_width(self) -> int:
        return self.vecs * self.width

    @property
    def full_strips(self) -> int:
        return self.N // self.strip_width

    @property
    def tail_cols(self) -> int:
        return self.N % self.strip_width

    @property
    def strips(self) -> int:
        return self.full_strips + (self.tail_cols > 0)

    @property
    def full_tiles(self) -> int:
        return self.M // self.rows

    @property
    def tail_rows(self) -> int:
        return self.M % self.rows

    @property
    def tiles(self) -> int:
        return self.full_tiles + (self.tail_rows > 0)

    @property
    def split_n(self) -> bool:
        """Threads share strips of N (True) or row tiles of M (False).

        Splitting N is preferred: each thread then packs only its own
        strips.  Splitting M makes every thread pack all of B, so it is only
        used when M offers more units of work to share.
        """
        return self.strips >= self.tiles

    def workspace_floats(self, nthreads: int = 1) -> int:
        """Scratch floats for `nthreads` threads: one packed panel each."""
        return max(1, nthreads) * self.kc * self.strip_width


def choose_plan(M: int, N: int, K: int, *, width: int | None = None,
                vector_registers: int | None = None) -> GemmPlan:
    """Blocking for the host (or for the given vector width/register count)."""
    width = width or vector_width_f32()
    registers = vector_registers or vector_register_count()
    rows, vecs = _register_tile(registers)
    # Balance the K blocks (K=300 -> 150+150, not 256+44): the short block
    # would otherwise pay the same C load/store per tile for little work.
    k_blocks = math.ceil(K / MAX_K_BLOCK)
    kc = math.ceil(K / k_blocks)
    return GemmPlan(M=M, N=N, K=K, width=width, rows=rows, vecs=vecs, kc=kc)


def _register_tile(vector_registers: int) -> tuple[int, int]:
    """(rows, vectors per row) of the register tile.

    rows*vecs accumulators + vecs B vectors + 1 broadcast must fit in the
    register file.  With 32 registers, 6x4 (24 accumulators) is the tile
    that reached numpy speed on AVX-512.  With 16 (AVX2) 6x2 was fastest
    (12 accumulators, B held in 2 registers); see bench/bench_gemm.py.
    """
    if vector_registers >= 32:
        return 6, 4
    return 6, 2


def gemm_workspace_floats(M: int, N: int, K: int, *, trans_a: bool = False,
                          trans_b: bool = False, nthreads: int = 1) -> int:
    """Floats of workspace that `emit_gemm`'s function needs for `nthreads`.

    The transpose flags do not change the size today; they are accepted so
    callers need not know that.
    """
    return choose_plan(M, N, K).workspace_floats(nthreads)


def emit_gemm(module: ir.Module, name: str, M: int, N: int, K: int, *,
              trans_a: bool = False, trans_b: bool = False,
              accumulate: bool = False, bias: str | None = None,
              relu: bool = False, plan: GemmPlan | None = None) -> ir.Function:
    """Add `void name(A, B, C, bias, workspace, tid, nthreads)` to `module`.

    All pointers are float*; `bias` may be null when `bias` is None, and
    must hold N floats for bias="col" (added to every row) or M floats for
    bias="row" (added to every column).  `workspace` must hold
    `gemm_workspace_floats(M, N, K, nthreads=nthreads)` floats.  `plan`
    overrides the host's blocking (tests use it to cover other widths).
    """
    if bias not in (None, "row", "col"):
        raise ValueError(f"bias must be None, 'row' or 'col', not {bias!r}")
    plan = plan or choose_plan(M, N, K)
    if (plan.M, plan.N, plan.K) != (M, N, K):
        raise ValueError("plan was made for another shape")
    emitter = _GemmEmitter(module, name, plan, trans_a=trans_a, trans_b=trans_b,
                           accumulate=accumulate, bias=bias, relu=relu)
    return emitter.emit()


class _GemmEmitter:
    """Emits one GEMM: the public driver plus its internal helper functions
    (panel packers and one micro-kernel per tile shape actually needed)."""

    def __init__(self, module, name, plan, *, trans_a, trans_b, accumulate,
                 bias, relu):
        self.module = module
        self.name = name
        self.plan = plan
        self.trans_a = trans_a
        self.trans_b = trans_b
        self.accumulate = accumulate
        self.bias = bias
        self.relu = relu

    # ------------------------------------------------------------ driver
    def emit(self) -> ir.Function:
        p = self.plan
        fn = ir.Function(self.module, ir.FunctionType(
            ir.VoidType(), [PTR] * 5 + [I64, I64]), name=self.name)
        for arg, arg_name in zip(fn.args, GEMM_ARG_NAMES):
            arg.name = arg_name
        for arg in fn.args[:5]:
            arg.add_attribute("noalias")
        a, b, c, bias, workspace, tid, nthreads = fn.args
        kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")), p.width)

        if p.split_n:
            strip_lo, strip_hi = kb.split_range(p.strips, tid, nthreads)
            tile_lo, tile_hi = kb.i64(0), kb.i64(p.tiles)
        else:
            strip_lo, strip_hi = kb.i64(0), kb.i64(p.strips)
            tile_lo, tile_hi = kb.split_range(p.tiles, tid, nthreads)
        panel = kb.gep(workspace, kb.mul(tid, p.kc * p.strip_width))

        # Only threads with work touch memory: a thread beyond the number of
        # work units must not even pack (its share is empty anyway).
        has_work = kb.b.and_(kb.b.icmp_signed("<", strip_lo, strip_hi),
                             kb.b.icmp_signed("<", tile_lo, tile_hi))
        with kb.if_then(has_work):
            with kb.for_range(0, p.K, step=p.kc, name="k0") as k0:
                self._emit_k_block(kb, k0, a, b, c, bias, panel,
                                   (strip_lo, strip_hi), (tile_lo, tile_hi))
        kb.b.ret_void()
        return fn

    def _emit_k_block(self, kb, k0, a, b, c, bias, panel, strip_range, tile_range):
        """All of this thread's strips for K block [k0, k0 + kc)."""
        p = self.plan
        kc = kb.min(p.kc, kb.sub(p.K, k0))
        # C holds a partial sum after the first block; before it, only when
        # the caller asked to accumulate.
        load_c = (ir.Constant(I1, 1) if self.accumulate
                  else kb.b.icmp_signed("!=", k0, kb.i64(0)))
        is_last = kb.b.icmp_signed(">=", kb.add(k0, p.kc), kb.i64(p.K))
        block = (k0, kc, load_c, is_last)
        strip_lo, strip_hi = strip_range

        if p.full_strips:
            pack = self._pack_function(p.vecs, p.strip_width)
            with kb.for_range(strip_lo, kb.min(strip_hi, p.full_strips),
                              name="strip") as strip:
                j0 = kb.mul(strip, p.strip_width)
                kb.b.call(pack, [b, panel, k0, kc, j0])
                self._emit_row_tiles(kb, p.vecs, p.strip_width, j0,
                                     a, c, bias, panel, block, tile_range)
        if p.tail_cols:
            vecs = math.ceil(p.tail_cols / p.width)
            pack = self._pack_function(vecs, p.tail_cols)
            with kb.if_then(kb.b.icmp_signed("==", strip_hi, kb.i64(p.strips))):
                j0 = kb.i64(p.full_strips * p.strip_width)
                kb.b.call(pack, [b, panel, k0, kc, j0])
                self._emit_row_tiles(kb, vecs, p.tail_cols, j0,
                                     a, c, bias, panel, block, tile_range)

    def _emit_row_tiles(self, kb, vecs, cols, j0, a, c, bias, panel, block,
                        tile_range):
        """This thread's row tiles of one packed strip (columns j0..j0+cols)."""
        p = self.plan
        k0, kc, load_c, is_last = block
        tile_lo, tile_hi = tile_range

        def call_micro_kernel(kernel, i0):
            if self.trans_a:
                a_tile = kb.gep(a, kb.add(kb.mul(k0, p.M), i0))
            else:
                a_tile = kb.gep(a, kb.add(kb.mul(i0, p.K), k0))
            c_tile = kb.gep(c, kb.add(kb.mul(i0, p.N), j0))
            if self.bias == "col":
                bias_tile = kb.gep(bias, j0)
            elif self.bias == "row":
                bias_tile = kb.gep(bias, i0)
            else:
                bias_tile = bias  # may be null; never read
            kb.b.call(kernel, [a_tile, panel, c_tile, bias_tile, kc, load_c, is_last])

        if p.full_tiles:
            kernel = self._micro_kernel(p.rows, vecs, cols)
            with kb.for_range(tile_lo, kb.min(tile_hi, p.full_tiles),
                              name="tile") as tile:
                call_micro_kernel(kernel, kb.mul(tile, p.rows))
        if p.tail_rows:
            kernel = self._micro_kernel(p.tail_rows, vecs, cols)
            with kb.if_then(kb.b.icmp_signed("==", tile_hi, kb.i64(p.tiles))):
                call_micro_kernel(kernel, kb.i64(p.full_tiles * p.rows))

    # ------------------------------------------------------------ helpers
    def _internal_function(self, suffix, arg_types):
        """An internal helper function, or the existing one of that name."""
        full_name = f"{self.name}.{suffix}"
        existing = self.module.globals.get(full_name)
        if existing is not None:
            return existing, None
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), arg_types),
                         name=full_name)
        fn.linkage = "internal"
        for arg in fn.args:
            if isinstance(arg.type, ir.PointerType):
                arg.add_attribute("noalias")
        kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")),
                           self.plan.width)
        return fn, kb

    def _pack_function(self, vecs: int, cols: int) -> ir.Function:
        """`pack(B, panel, k0, kc, j0)`: copy op(B)[k0:k0+kc, j0:j0+cols] into
        panel rows of vecs*W floats; columns past `cols` are zero so the
        micro-kernel can use full vectors (padding lanes are never stored)."""
        fn, kb = self._internal_function(f"pack{cols}", [PTR, PTR, I64, I64, I64])
        if kb is None:
            return fn
        b, panel, k0, kc, j0 = fn.args
        if self.trans_b:
            self._emit_pack_transposed(kb, b, panel, k0, kc, j0, vecs, cols)
        else:
            self._emit_pack_rows(kb, b, panel, k0, kc, j0, vecs, cols)
        kb.b.ret_void()
        return fn

    def _emit_pack_rows(self, kb, b, panel, k0, kc, j0, vecs, cols):
        """B stored (K, N): each panel row is a contiguous slice of a B row."""
        p = self.plan
        panel_stride = vecs * p.width
        with kb.for_range(0, kc, name="k") as k:
            src = kb.gep(b, kb.add(kb.mul(kb.add(k0, k), p.N), j0))
            dst = kb.gep(panel, kb.mul(k, panel_stride))
            for v in range(vecs):
                lanes = min(p.width, cols - v * p.width)
                if lanes == p.width:
                    value = kb.load_vec(src, v * p.width)
                else:  # last vector of a tail strip; masked lanes read as 0
                    value = kb.masked_load_vec(src, v * p.width, kb.lane_mask(lanes))
                kb.store_vec(value, dst, v * p.width)

    def _emit_pack_transposed(self, kb, b, panel, k0, kc, j0, vecs, cols):
        """B stored (N, K): panel column c is a contiguous slice of B row
        j0+c, so read along K and write with the panel's row stride."""
        p = self.plan
        panel_stride = vecs * p.width
        with kb.for_range(0, cols, name="col") as col:
            src = kb.gep(b, kb.add(kb.mul(kb.add(j0, col), p.K), k0))
            dst = kb.gep(panel, col)
            with kb.for_range(0, kc, name="k") as k:
                kb.store(kb.load(src, k), dst, kb.mul(k, panel_stride))
        if cols < panel_stride:
            with kb.for_range(0, kc, name="kz") as k:
                row = kb.gep(panel, kb.mul(k, panel_stride))
                for col in range(cols, panel_stride):
                    kb.store(kb.f32(0.0), row, col)

    def _micro_kernel(self, rows: int, vecs: int, cols: int) -> ir.Function:
        """`micro(A_tile, panel, C_tile, bias_tile, kc, load_c, is_last)`:
        C_tile[rows, cols] = (C_tile if load_c else 0) + A_tile @ panel
        over kc, then bias and relu if is_last.  `cols` may be less than
        vecs*W only on the last vector, which is then masked."""
        fn, kb = self._internal_function(
            f"micro{rows}x{cols}", [PTR, PTR, PTR, PTR, I64, I1, I1])
        if kb is None:
            return fn
        a, panel, c, bias, kc, load_c, is_last = fn.args
        p = self.plan
        masks = [None if lanes == p.width else kb.lane_mask(lanes)
                 for lanes in (min(p.width, cols - v * p.width) for v in range(vecs))]

        # Accumulators live in allocas that LLVM promotes to registers; this
        # keeps the loop free of hand-written phis.
        acc = [[kb.b.alloca(kb.vec_type) for _ in range(vecs)] for _ in range(rows)]
        self._emit_init_accumulators(kb, acc, c, masks, load_c)

        # The k loop: one broadcast of A per row, one fma per accumulator.
        a_row_stride, a_k_stride = (1, p.M) if self.trans_a else (p.K, 1)
        panel_stride = vecs * p.width
        with kb.for_range(0, kc, name="k") as k:
            b_row = kb.gep(panel, kb.mul(k, panel_stride))
            b_vecs = [kb.load_vec(b_row, v * p.width) for v in range(vecs)]
            a_col = kb.gep(a, kb.mul(k, a_k_stride))
            for r in range(rows):
                a_bcast = kb.splat(kb.load(a_col, r * a_row_stride))
                for v in range(vecs):
                    total = kb.fma(a_bcast, b_vecs[v], kb.b.load(acc[r][v], typ=kb.vec_type))
                    kb.b.store(total, acc[r][v])

        self._emit_store_tile(kb, acc, c, bias, masks, is_last)
        kb.b.ret_void()
        return fn

    def _emit_init_accumulators(self, kb, acc, c, masks, load_c):
        """acc = C_tile if load_c else 0."""
        n = self.plan.N
        for row in acc:
            for slot in row:
                kb.b.store(kb.splat(0.0), slot)
        with kb.if_then(load_c):
            for r, row in enumerate(acc):
                for v, slot in enumerate(row):
                    kb.b.store(self._load_c(kb, c, r * n + v * kb.width, masks[v]), slot)

    def _emit_store_tile(self, kb, acc, c, bias, masks, is_last):
        """C_tile = acc, after bias and relu when this is the last K block."""
        n = self.plan.N
        if self.bias or self.relu:
            with kb.if_then(is_last):
                for r, row in enumerate(acc):
                    for v, slot in enumerate(row):
                        kb.b.store(self._epilogue(kb, kb.b.load(slot, typ=kb.vec_type),
                                                  bias, r, v, masks[v]), slot)
        for r, row in enumerate(acc):
            for v, slot in enumerate(row):
                value = kb.b.load(slot, typ=kb.vec_type)
                offset = r * n + v * kb.width
                if masks[v] is None:
                    kb.store_vec(value, c, offset)
                else:
                    kb.masked_store_vec(value, c, offset, masks[v])

    def _epilogue(self, kb, value, bias, r, v, mask):
        """bias then relu on the accumulator of row r, vector v of a tile."""
        if self.bias == "col":
            value = kb.fadd(value, self._load_c(kb, bias, v * kb.width, mask))
        elif self.bias == "row":
            value = kb.fadd(value, kb.splat(kb.load(bias, r)))
        if self.relu:
            value = kb.relu(value)
        return value

    @staticmethod
    def _load_c(kb, ptr, offset, mask):
        if mask is None:
            return kb.load_vec(ptr, offset)
        return kb.masked_load_vec(ptr, offset, mask)
