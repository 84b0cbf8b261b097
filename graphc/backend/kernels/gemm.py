"""Shape-specialised float32 GEMM, cache- and register-blocked, as LLVM IR.

    C[M,N] = (C if accumulate else 0) + op(A) @ op(B)  [+ bias]  [then relu]

op(A) is A stored (M,K) row-major, or with trans_a A stored (K,M); op(B) is
B stored (K,N), or with trans_b B stored (N,K).  C is (M,N) row-major.

How it is fast (see bench/NOTES.md for the measurements):

  * K is cut into blocks (`kc`) whose packed panel holds at most
    MAX_PANEL_FLOATS (256 steps on AVX-512, 1024 on AVX2 with the 6-row
    tile), but never fewer than MIN_K_BLOCK steps.  Within a block, B
    is cut into strips of `strip_width` = vecs*W columns, and each strip is
    packed into a contiguous panel (kc x strip_width floats, row k after row
    k-1) in the caller's workspace, read in order by every row tile of the
    strip.  Each K block after the first reloads every tile of C.
  * A micro-kernel computes a register tile of `rows` x (vecs x W) of C:
    rows*vecs vector accumulators, updated per k by one broadcast load of A
    per row and one fma per accumulator with the packed B vectors.
  * With A stored transposed (K, M), a row tile's k-th values are 24 bytes of
    a different row of A for each k: every k touches a new cache line and,
    past a few KiB of stride, a new page.  Such an A is packed too
    (`pack_a`): each thread copies a block of `mc` rows x kc into tile-major
    panels (row tile after row tile, k after k, `rows` values each), which
    the micro-kernel then reads as one contiguous stream.  The block (at
    most about MAX_A_BLOCK_FLOATS) is reused by every strip of the thread's
    share of N.
  * When only one or two row tiles would read each panel (M <= 12 on AVX2),
    the copy costs what it saves: B stored (K, N) is then read in place
    (`pack_b=False`; the last vector of a narrow strip loads masked).
  * With B transposed and N narrow (a classifier's 10 logits), most lanes
    of a strip would be padding: `plan_gemm` then picks the dot-product
    kernel of gemm_dot.py, whose lanes run along K.
  * All shapes are compile-time constants, so tails are resolved when
    generating: a strip narrower than strip_width uses a micro-kernel with
    fewer vectors and a masked last vector; the last rows < `rows` use a
    micro-kernel with fewer rows.  Any M, N, K >= 1 works.
  * Loops stay IR loops (K blocks, strips, row tiles, k), so the generated
    code and the compile time stay small whatever the shape.
  * The packers and micro-kernels take the leading dimensions of A, B and C
    as arguments: every GEMM of a module with the same tile shape, transposes
    and epilogue calls the one copy (named by that key), which keeps a
    program's IR, and LLVM's time on it, from growing with its GEMM count.

Threads: the function takes (tid, nthreads) and computes only its share of
strips of N (or of row tiles of M when N has too few strips to share; see
`choose_plan`).  Shares never overlap and each thread packs into its own
slice of the workspace, so nthreads concurrent calls with tid = 0..nthreads-1
compute C without races: every element of C is written by one thread only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from typing import NamedTuple

import llvmlite.ir as ir
import sympy

from graphc.backend import costs
from graphc.backend.emit.expr import ExprEmitter
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import I1, I64, PTR, KernelBuilder
from graphc.backend.kernels.gemm_dot import DotEmitter, DotPlan, choose_dot_plan
from graphc.backend.kernels.layout import store_lanes
from graphc.backend.llvm.target import simd as target_simd
from graphc.backend.llvm.target import vector_register_count, vector_width_f32
from graphc.backend.lowering_rules import Epilogue, Step, alias_root, lowers
from graphc_runtime.host import SimdShape

__all__ = ["GemmPlan", "DotPlan", "choose_plan", "plan_gemm", "emit_gemm",
           "gemm_workspace_floats", "GEMM_ARG_NAMES"]

# Signature of every generated GEMM: void(A, B, C, bias, workspace, tid, nthreads)
GEMM_ARG_NAMES = ("A", "B", "C", "bias", "workspace", "tid", "nthreads")

# Floats per cache line (64 bytes on the x86 and Arm cores we target), for prefetches.
_FLOATS_PER_LINE = 16

# A packed B panel holds at most this many floats (64 KiB), which bounds the K block: 256 for
# AVX-512's 64-column strips of 6-row tiles (longer blocks were slower there), 1024 for AVX2's
# 16 columns. A longer K block means fewer passes over C, each of which reloads every tile of
# C from L3 (bench/NOTES.md, "GEMM: K and A blocks"). The panel then outgrows L1, but a
# micro-kernel reads it in order, two vectors per k, which L2 keeps up with.
MAX_PANEL_FLOATS = 16384
# ... but never shorter than this, the block every strip had before: a tile of few rows
# (M < 6) takes wider strips (AVX-512, one row: 240 columns), whose panel bound would
# otherwise cut K into blocks of 64.
MIN_K_BLOCK = 256

# Row tiles of C up to which B (stored (K, N)) is read in place instead of packed.
MAX_TILES_WITHOUT_PACKING = 2

# A transposed A block (M x kc floats) from this size on is packed (`pack_a`): smaller ones sit
# in L1 (32 KiB), where the strided reads cost nothing.
MIN_FLOATS_TO_PACK_A = 8192

# A packed block of A holds at most this many floats (256 KiB, half an L2): 256 rows at
# kc = 256, 64 at kc = 1024. Each block re-packs the thread's B panels once; the blocks'
# size mattered little (bench/NOTES.md).
MAX_A_BLOCK_FLOATS = 65536


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
    split: str        # "n": threads share strips of N; "m": row tiles of M
    pack_b: bool = True  # False: micro-kernels read B where it is stored (B stored (K, N) only)
    pack_a: bool = False  # True: A is copied into tile-major panels, `mc` rows at a time
    mc: int = 0       # rows of A per packed block (a multiple of rows), when pack_a

    def __post_init__(self):
        if min(self.M, self.N, self.K) < 1:
            raise ValueError(f"GEMM dims must be >= 1, got {self.M}x{self.N}x{self.K}")
        if self.split not in ("n", "m"):
            raise ValueError(f"split must be 'n' or 'm', not {self.split!r}")
        if self.pack_a and (self.split != "n" or self.mc < 1 or self.mc % self.rows):
            # Threads sharing row tiles would each need their own blocks' bounds; not needed.
            raise ValueError(f"pack_a needs split 'n' and mc a positive multiple of rows={self.rows}, "
                             f"got split {self.split!r}, mc={self.mc}")

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
    def panel_rows(self) -> int:
        """Rows of a packed panel: kc rounded up to whole vectors, because
        the transposing packer writes W rows at a time."""
        return -(-self.kc // self.width) * self.width

    @property
    def panel_floats(self) -> int:
        return self.panel_rows * self.strip_width

    @property
    def k_blocks(self) -> int:
        """Passes over C: an epilogue operand may be C itself only when this is 1."""
        return math.ceil(self.K / self.kc)

    @property
    def a_block_tiles(self) -> int:
        """Row tiles per packed block of A."""
        return self.mc // self.rows

    @property
    def a_block_floats(self) -> int:
        """Floats of one packed block of A: its tiles' panels of kc x rows, plus one vector
        because the packer stores whole vectors and the last one may reach past the block."""
        if not self.pack_a:
            return 0
        # Rounded up to whole cache lines, so that the next thread's panel starts on one.
        floats = self.a_block_tiles * self.kc * self.rows + self.width
        return -(-floats // _FLOATS_PER_LINE) * _FLOATS_PER_LINE

    @property
    def thread_floats(self) -> int:
        """Scratch floats of one thread: its packed B panel, then its packed block of A."""
        return (self.panel_floats if self.pack_b else 0) + self.a_block_floats

    def workspace_floats(self, nthreads: int = 1) -> int:
        """Scratch floats for `nthreads` threads."""
        return max(1, max(1, nthreads) * self.thread_floats)


def choose_plan(M: int, N: int, K: int, *, width: int | None = None,
                vector_registers: int | None = None) -> GemmPlan:
    """Blocking for the host (or for the given vector width/register count)."""
    width = width or vector_width_f32()
    registers = vector_registers or vector_register_count()
    rows, vecs = _register_tile(registers, M, math.ceil(N / width))
    strips = math.ceil(N / (vecs * width))
    tiles = math.ceil(M / rows)
    # Splitting N is preferred: each thread then packs only its own strips,
    # and it measured as fast or faster whenever N has a few strips.
    # Splitting M makes every thread pack all of B; it wins only when N has
    # too few strips to share (e.g. N = 16 with M = 100: 1 strip, 17 tiles).
    split = "n" if strips >= min(tiles, 8) else "m"
    # Balance the K blocks (K=1300 -> 650+650 on AVX2, not 1024+276): the short
    # block would otherwise pay the same C load/store per tile for little work.
    k_blocks = math.ceil(K / max(MIN_K_BLOCK, MAX_PANEL_FLOATS // (vecs * width)))
    kc = math.ceil(K / k_blocks)
    return GemmPlan(M=M, N=N, K=K, width=width, rows=rows, vecs=vecs, kc=kc,
                    split=split)


def _register_tile(vector_registers: int, M: int = 6, n_vectors: int = 2) -> tuple[int, int]:
    """(rows, vectors per row) of the register tile, for M rows of C of n_vectors vectors.

    rows*vecs accumulators + vecs B vectors + 1 broadcast must fit in the
    register file.  With 32 registers, 6x4 (24 accumulators) is the tile
    that reached numpy speed on AVX-512.  With 16 (AVX2) 6x2 was fastest
    (12 accumulators, B held in 2 registers); see bench/bench_gemm.py.

    Fewer than 6 rows (a GEMV such as a logistic regression's weight gradient,
    M = 1) would leave the FMA units waiting on 2-4 accumulator chains; those
    tiles take as many vectors per row as fit instead (1 row: 7 on AVX2).
    """
    rows, vecs = (6, 4) if vector_registers >= 32 else (6, 2)
    if not 1 <= M < rows:
        return rows, vecs
    wide = (vector_registers - 1) // (M + 1)
    return M, max(vecs, min(wide, n_vectors))


def plan_gemm(M: int, N: int, K: int, *, trans_a: bool = False,
              trans_b: bool = False, simd: SimdShape | None = None) -> GemmPlan | DotPlan:
    """The plan for a GEMM on `simd` (default: the host's vectors): dot products along K
    (gemm_dot.py) when B is transposed and N too narrow to fill the packed GEMM's vectors, else
    the packed GEMM."""
    simd = simd or target_simd()
    packed = choose_plan(M, N, K, width=simd.width, vector_registers=simd.registers)
    if trans_b and not trans_a:
        dot = choose_dot_plan(M, N, K, width=packed.width, vector_registers=simd.registers,
                              packed_strip_width=packed.strip_width)
        if dot is not None:
            return dot
    if not trans_b and packed.tiles <= MAX_TILES_WITHOUT_PACKING:
        # A packed panel pays off by being read once per row tile; with one or two tiles the
        # copy costs as much as it saves (logreg's weight gradient: 10 x 784 from K = 64).
        # With no panel to keep in cache, all of K is one block: C's tiles are stored once.
        return dataclasses.replace(packed, pack_b=False, kc=K)
    if trans_a and packed.split == "n" and M * packed.kc >= MIN_FLOATS_TO_PACK_A:
        return dataclasses.replace(packed, pack_a=True, mc=_m_block_rows(M, packed.rows, packed.kc))
    return packed


def _m_block_rows(M: int, rows: int, kc: int) -> int:
    """Rows per packed block of A: about MAX_A_BLOCK_FLOATS / kc (at least one tile),
    balanced so the last block is not a sliver, rounded up to whole row tiles."""
    blocks = math.ceil(M / max(MAX_A_BLOCK_FLOATS // kc, rows))
    return math.ceil(math.ceil(M / blocks) / rows) * rows


def gemm_workspace_floats(M: int, N: int, K: int, *, trans_a: bool = False,
                          trans_b: bool = False, nthreads: int = 1) -> int:
    """Floats of workspace that `emit_gemm`'s function needs for `nthreads`."""
    return plan_gemm(M, N, K, trans_a=trans_a, trans_b=trans_b).workspace_floats(nthreads)


def emit_gemm(module: ir.Module, name: str, M: int, N: int, K: int, *,
              trans_a: bool = False, trans_b: bool = False,
              accumulate: bool = False, bias: str | None = None,
              relu: bool = False, plan: GemmPlan | DotPlan | None = None,
              epilogue=None, epilogue_operands: int = 0, scalar_operands: tuple[bool, ...] = (),
              side_stores: tuple = ()) -> ir.Function:
    """Add `void name(A, B, C, bias, workspace, tid, nthreads, E_1..E_k)` to `module`.

    `epilogue` (a sympy expression over x0 = the result after bias and relu, and x1..xk = the
    k = `epilogue_operands` matrices E_1..E_k, each (M, N) row-major) replaces every element of
    C by its value before C is stored: an elementwise consumer fused into the GEMM. E_i is one
    float, broadcast, where `scalar_operands[i - 1]` is true (a learning rate). Each (i, e) of
    `side_stores` also stores e(x0, ..., xk) into E_i (an optimizer's moments, updated in place
    beside the param the epilogue moves). E_i may be
    C itself (an in-place update) only when the plan has one K block (`plan.k_blocks == 1`):
    with several, C holds partial sums before the last one.

    All pointers are float*; `bias` may be null when `bias` is None, and
    must hold N floats for bias="col" (added to every row) or M floats for
    bias="row" (added to every column).  `workspace` must hold
    `gemm_workspace_floats(M, N, K, trans_a=..., trans_b=..., nthreads=nthreads)` floats.
    `plan` overrides the host's choice (tests use it to cover other widths and both kernels).
    """
    if bias not in (None, "row", "col"):
        raise ValueError(f"bias must be None, 'row' or 'col', not {bias!r}")
    plan = plan or plan_gemm(M, N, K, trans_a=trans_a, trans_b=trans_b)
    if (plan.M, plan.N, plan.K) != (M, N, K):
        raise ValueError("plan was made for another shape")
    if isinstance(plan, DotPlan) and (trans_a or not trans_b):
        raise ValueError("a dot-product plan needs A stored (M, K) and B stored (N, K)")
    if isinstance(plan, GemmPlan) and plan.pack_a and not trans_a:
        raise ValueError("a plan that packs A needs A stored (K, M)")
    emitter = _GemmEmitter(module, name, plan, trans_a=trans_a, trans_b=trans_b,
                           accumulate=accumulate, bias=bias, relu=relu,
                           epilogue=epilogue, epilogue_operands=epilogue_operands,
                           scalar_operands=scalar_operands, side_stores=side_stores)
    if isinstance(plan, DotPlan):
        return DotEmitter(emitter, plan).emit()
    return emitter.emit()


class _Operands(NamedTuple):
    """The driver's pointers: its arguments and this thread's panel."""
    a: ir.Value
    b: ir.Value
    c: ir.Value
    bias: ir.Value
    panel: ir.Value
    extras: tuple = ()   # the epilogue's (M, N) operands
    a_block: ir.Value | None = None  # this thread's packed block of A (pack_a)
    first_tile: ir.Value | None = None  # the row tile at the start of a_block


class _KBlock(NamedTuple):
    """The K block being computed, as IR values of the driver."""
    k0: ir.Value        # first k of the block
    kc: ir.Value        # its length (the last block may be shorter)
    load_c: ir.Value    # i1: accumulate onto C (else start from zero)
    is_last: ir.Value   # i1: apply bias and relu after this block


class _GemmEmitter:
    """Emits one GEMM: the public driver plus its internal helper functions
    (panel packers and one micro-kernel per tile shape actually needed)."""

    def __init__(self, module, name, plan, *, trans_a, trans_b, accumulate,
                 bias, relu, epilogue=None, epilogue_operands=0, scalar_operands=(), side_stores=()):
        self.module = module
        self.name = name
        self.plan = plan
        self.trans_a = trans_a
        self.trans_b = trans_b
        self.accumulate = accumulate
        self.bias = bias
        self.relu = relu
        self.epilogue = epilogue
        self.extras = epilogue_operands
        self.scalar_extras = tuple(scalar_operands) or (False,) * epilogue_operands
        if len(self.scalar_extras) != epilogue_operands:
            raise ValueError("scalar_operands must have one flag per epilogue operand")
        self.side_stores = tuple(side_stores)
        if any(not 1 <= k <= epilogue_operands or self.scalar_extras[k - 1] for k, _ in self.side_stores):
            raise ValueError("side stores go to epilogue operands of the result's shape")

    # ------------------------------------------------------------ driver
    def driver_function(self):
        """The public function `name(A, B, C, bias, workspace, tid, nthreads, E_1..E_k)`:
        (function, its KernelBuilder, its first seven arguments, the E arguments)."""
        fn = ir.Function(self.module, ir.FunctionType(
            ir.VoidType(), [PTR] * 5 + [I64, I64] + [PTR] * self.extras), name=self.name)
        for arg, arg_name in zip(fn.args, GEMM_ARG_NAMES + tuple(f"E{i + 1}" for i in range(self.extras))):
            arg.name = arg_name
        # An epilogue operand may be C itself (a param updated in place): C is then not noalias.
        for arg in fn.args[:5] if not self.extras else (fn.args[0], fn.args[1], fn.args[3], fn.args[4]):
            arg.add_attribute("noalias")
        kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")), self.plan.width)
        return fn, kb, fn.args[:7], tuple(fn.args[7:])

    def emit(self) -> ir.Function:
        """The driver: K blocks > (blocks of A, when packed) > this thread's strips > row tiles."""
        p = self.plan
        fn, kb, (a, b, c, bias, workspace, tid, nthreads), extras = self.driver_function()

        if p.split == "n":
            strips = kb.split_range(p.strips, tid, nthreads)
            tiles = (kb.i64(0), kb.i64(p.tiles))
        else:
            strips = (kb.i64(0), kb.i64(p.strips))
            tiles = kb.split_range(p.tiles, tid, nthreads)
        scratch = kb.gep(workspace, kb.mul(tid, p.thread_floats))
        panel = scratch if p.pack_b else None
        a_block = kb.gep(scratch, p.thread_floats - p.a_block_floats) if p.pack_a else None
        operands = _Operands(a, b, c, bias, panel=panel, extras=extras, a_block=a_block)

        # A thread beyond the number of work units has an empty share; it
        # must not even pack (its workspace slice may not exist).
        has_work = kb.b.and_(kb.b.icmp_signed("<", *strips),
                             kb.b.icmp_signed("<", *tiles))
        with kb.if_then(has_work):
            with kb.for_range(0, p.K, step=p.kc, name="k0") as k0:
                block = self._k_block(kb, k0)
                if p.pack_a:
                    self._emit_a_blocks(kb, operands, block, strips)
                else:
                    self._emit_k_block(kb, operands, block, strips, tiles)
        kb.b.ret_void()
        return fn

    def _emit_a_blocks(self, kb, ops, block, strips):
        """One K block with A packed: per block of mc rows, pack its tiles, then this thread's
        strips over them (split "n": every thread computes all rows of its strips)."""
        p = self.plan
        with kb.for_range(0, p.tiles, step=p.a_block_tiles, name="a_block") as first_tile:
            last_tile = kb.min(kb.add(first_tile, p.a_block_tiles), p.tiles)
            if p.full_tiles:
                pack = self._pack_a_function(p.rows)
                with kb.for_range(first_tile, kb.min(last_tile, p.full_tiles), name="a_tile") as tile:
                    self._call_pack_a(kb, pack, ops, block, first_tile, tile)
            if p.tail_rows:
                with kb.if_then(kb.b.icmp_signed("==", last_tile, kb.i64(p.tiles))):
                    self._call_pack_a(kb, self._pack_a_function(p.tail_rows), ops, block,
                                      first_tile, kb.i64(p.full_tiles))
            self._emit_k_block(kb, ops._replace(first_tile=first_tile), block, strips,
                               (first_tile, last_tile))

    def _packed_a_tile(self, kb, ops, tile):
        """Where row tile `tile` sits in the packed block of A."""
        return kb.gep(ops.a_block, kb.mul(kb.sub(tile, ops.first_tile), self.plan.kc * self.plan.rows))

    def _call_pack_a(self, kb, pack, ops, block, first_tile, tile):
        # The tile's panel is written at a stride of plan.rows floats per k whatever its row
        # count, so every tile of the block is read with lda = rows.
        kb.b.call(pack, [ops.a, self._packed_a_tile(kb, ops._replace(first_tile=first_tile), tile),
                         block.k0, block.kc, kb.mul(tile, self.plan.rows)])

    def _k_block(self, kb, k0) -> _KBlock:
        p = self.plan
        # C holds a partial sum after the first block; before it, only when
        # the caller asked to accumulate.
        load_c = (ir.Constant(I1, 1) if self.accumulate
                  else kb.b.icmp_signed("!=", k0, kb.i64(0)))
        return _KBlock(k0=k0, kc=kb.min(p.kc, kb.sub(p.K, k0)), load_c=load_c,
                       is_last=kb.b.icmp_signed(">=", kb.add(k0, p.kc), kb.i64(p.K)))

    def _emit_k_block(self, kb, ops, block, strips, tiles):
        """This thread's strips of N for one K block: pack, then row tiles."""
        p = self.plan
        strip_lo, strip_hi = strips
        if p.full_strips:
            with kb.for_range(strip_lo, kb.min(strip_hi, p.full_strips),
                              name="strip") as strip:
                j0 = kb.mul(strip, p.strip_width)
                self._emit_strip(kb, ops, block, tiles, j0, p.vecs, p.strip_width)
        if p.tail_cols:
            # The narrow last strip belongs to the thread whose share ends N.
            vecs = math.ceil(p.tail_cols / p.width)
            with kb.if_then(kb.b.icmp_signed("==", strip_hi, kb.i64(p.strips))):
                j0 = kb.i64(p.full_strips * p.strip_width)
                self._emit_strip(kb, ops, block, tiles, j0, vecs, p.tail_cols)

    def _emit_strip(self, kb, ops, block, tiles, j0, vecs, cols):
        """Pack the strip of columns [j0, j0+cols) (unless B is read in place), then its tiles."""
        if self.plan.pack_b:
            self._call_pack(kb, self._pack_function(vecs), ops, block, j0, cols)
            panel, panel_stride = ops.panel, kb.i64(vecs * self.plan.width)
        else:  # the "panel" is B itself: row k of the strip at (k0 + k) * N + j0
            panel = kb.gep(ops.b, kb.add(kb.mul(block.k0, self.plan.N), j0))
            panel_stride = kb.i64(self.plan.N)
        self._emit_row_tiles(kb, ops._replace(panel=panel), block, tiles, j0, vecs, cols,
                             panel_stride)

    def _emit_row_tiles(self, kb, ops, block, tiles, j0, vecs, cols, panel_stride):
        """This thread's row tiles of the strip of columns [j0, j0+cols), whose row k is at
        ops.panel + k * panel_stride."""
        p = self.plan
        tile_lo, tile_hi = tiles
        if p.full_tiles:
            kernel = self._micro_kernel(p.rows, vecs, cols)
            with kb.for_range(tile_lo, kb.min(tile_hi, p.full_tiles),
                              name="tile") as tile:
                self._call_micro_kernel(kb, kernel, ops, block, tile, j0, panel_stride)
        if p.tail_rows:
            # The short last tile belongs to the thread whose share ends M.
            kernel = self._micro_kernel(p.tail_rows, vecs, cols)
            with kb.if_then(kb.b.icmp_signed("==", tile_hi, kb.i64(p.tiles))):
                self._call_micro_kernel(kb, kernel, ops, block, kb.i64(p.full_tiles), j0,
                                        panel_stride)

    def _call_pack(self, kb, pack, ops, block, j0, cols):
        # B's leading dimension: its row length, N stored (K, N), K stored (N, K).
        ldb = self.plan.K if self.trans_b else self.plan.N
        kb.b.call(pack, [ops.b, ops.panel, block.k0, block.kc, j0, kb.i64(ldb), kb.i64(cols)])

    def _call_micro_kernel(self, kb, kernel, ops, block, tile, j0, panel_stride):
        """Call `kernel` on the tile of C at row tile `tile`, column j0."""
        p = self.plan
        i0 = kb.mul(tile, p.rows)
        if p.pack_a:       # tile-major panels: element (i, k) at k*rows + i
            a_tile = self._packed_a_tile(kb, ops, tile)
            lda = p.rows
        elif self.trans_a:  # A stored (K, M): element (i, k) at k*M + i
            a_tile = kb.gep(ops.a, kb.add(kb.mul(block.k0, p.M), i0))
            lda = p.M
        else:              # A stored (M, K): element (i, k) at i*K + k
            a_tile = kb.gep(ops.a, kb.add(kb.mul(i0, p.K), block.k0))
            lda = p.K
        c_tile = kb.gep(ops.c, kb.add(kb.mul(i0, p.N), j0))
        if self.bias == "col":
            bias_tile = kb.gep(ops.bias, j0)
        elif self.bias == "row":
            bias_tile = kb.gep(ops.bias, i0)
        else:
            bias_tile = ops.bias  # may be null; never read
        c_offset = kb.add(kb.mul(i0, p.N), j0)
        extra_tiles = self.offset_extras(kb, ops.extras, c_offset)
        kb.b.call(kernel, [a_tile, ops.panel, c_tile, bias_tile, block.kc, block.load_c,
                           block.is_last, kb.i64(lda), kb.i64(p.N), panel_stride] + extra_tiles)

    # ------------------------------------------------------------ helpers
    def internal_function(self, kind, variant, arg_types):
        """The module's helper function `kind` for `variant` (everything its
        code depends on): made on first use, shared by every GEMM after."""
        digest = hashlib.sha1(repr((self.plan.width,) + variant).encode()).hexdigest()[:10]
        full_name = f"graphc.gemm.{kind}.{digest}"
        existing = self.module.globals.get(full_name)
        if existing is not None:
            return existing, None
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), arg_types),
                         name=full_name)
        fn.linkage = "internal"
        # Inlined, each helper would be copied into every GEMM that calls it
        # (and optimised again there); a call per tile and K block costs nothing.
        fn.attributes.add("noinline")
        for arg in fn.args:
            if isinstance(arg.type, ir.PointerType):
                arg.add_attribute("noalias")
        kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")),
                           self.plan.width)
        return fn, kb

    def _pack_function(self, vecs: int) -> ir.Function:
        """`pack(B, panel, k0, kc, j0, ldb, cols)`: copy op(B)[k0:k0+kc, j0:j0+cols] (cols <=
        vecs*W) into panel rows of vecs*W floats; columns past `cols` are zero so the
        micro-kernel can use full vectors (padding lanes are never stored). `ldb` is the length
        of B's stored rows.

        `cols` is an argument, not a constant: one packer serves a GEMM's full strips and its
        narrow last one, and every GEMM of the module with the same transposes and vecs, which
        keeps the shuffle-heavy transposing packer, slow for LLVM to compile, to one copy."""
        fn, kb = self.internal_function("pack", (self.trans_b, vecs),
                                         [PTR, PTR, I64, I64, I64, I64, I64])
        if kb is None:
            return fn
        b, panel, k0, kc, j0, ldb, cols = fn.args
        if self.trans_b:
            self._emit_pack_transposed(kb, b, panel, k0, kc, j0, ldb, vecs, cols)
        else:
            self._emit_pack_rows(kb, b, panel, k0, kc, j0, ldb, vecs, cols)
        kb.b.ret_void()
        return fn

    def _emit_pack_rows(self, kb, b, panel, k0, kc, j0, ldb, vecs, cols):
        """B stored (K, N): each panel row is a contiguous slice of a B row. Only the last
        vector can reach past `cols` (a strip of `vecs` vectors has cols > (vecs-1)*W): it loads
        masked (lanes past cols read as zero, their memory untouched), the others plainly,
        which matters where masked loads with a runtime mask become a branch per lane (SSE,
        NEON)."""
        w = self.plan.width
        last_mask = kb.lane_mask_dynamic(kb.sub(cols, (vecs - 1) * w))
        with kb.for_range(0, kc, name="k") as k:
            src = kb.gep(b, kb.add(kb.mul(kb.add(k0, k), ldb), j0))
            dst = kb.gep(panel, kb.mul(k, vecs * w))
            for v in range(vecs - 1):
                kb.store_vec(kb.load_vec(src, v * w), dst, v * w)
            last = (vecs - 1) * w
            kb.store_vec(kb.masked_load_vec(src, last, last_mask), dst, last)

    def _emit_pack_transposed(self, kb, b, panel, k0, kc, j0, ldb, vecs, cols):
        """B stored (N, K): column c of the panel is a contiguous run of B's row j0+c.  Per W
        values of k and W columns: W loads, a transpose in registers, W stores of panel rows;
        no scalar loop, no gather.

        The loads are masked: past kc (the last block of k, whose padding rows go to the
        panel's spare rows, panel_rows >= kc, never read) and past `cols` (zero columns).  One
        code path for all of them, in loops over k and over the W-column groups, keeps the
        function small: LLVM's instruction selection of the transposes' shuffles is slow."""
        w = self.plan.width
        panel_stride = vecs * w
        no_lanes = kb.lane_mask(0)
        with kb.for_range(0, kc, step=w, name="k") as k:
            k_mask = kb.lane_mask_dynamic(kb.sub(kc, k))
            with kb.for_range(0, vecs, name="group") as group:
                first = kb.mul(group, w)
                columns = []
                for c in range(w):
                    column = kb.add(first, c)
                    inside = kb.b.icmp_signed("<", column, cols)
                    # Past `cols`, read nothing from an address clamped into B.
                    row = kb.gep(b, kb.add(kb.mul(kb.add(j0, kb.min(column, kb.sub(cols, 1))), ldb), k0))
                    columns.append(kb.masked_load_vec(row, k, kb.b.select(inside, k_mask, no_lanes)))
                for i, panel_row in enumerate(kb.transpose(columns)):
                    kb.store_vec(panel_row, panel, kb.add(kb.mul(kb.add(k, i), panel_stride), first))

    def _pack_a_function(self, rows: int) -> ir.Function:
        """`pack_a(A, tile_panel, k0, kc, i0)`: copy op(A)[i0:i0+rows, k0:k0+kc], A stored
        (K, M), into a tile panel, k after k at a stride of plan.rows floats.

        Each k's `rows` values are loaded as vectors (the last one masked to the rows, so
        nothing past A is read) and stored whole: the lanes past `rows` land on the next k's
        slots, overwritten when it is packed, or past the last k, on the next tile's panel
        (packed after this one) or the block's spare vector."""
        p = self.plan
        fn, kb = self.internal_function("pack_a", (p.rows, rows, p.M), [PTR, PTR, I64, I64, I64])
        if kb is None:
            return fn
        a, panel, k0, kc, i0 = fn.args
        w = p.width
        with kb.for_range(0, kc, name="k") as k:
            src = kb.gep(a, kb.add(kb.mul(kb.add(k0, k), p.M), i0))
            dst = kb.gep(panel, kb.mul(k, p.rows))
            for v in range(math.ceil(rows / w)):
                lanes = min(w, rows - v * w)
                mask = None if lanes == w else kb.lane_mask(lanes)
                kb.store_vec(self.load_masked(kb, src, v * w, mask), dst, v * w)
        kb.b.ret_void()
        return fn

    def _micro_kernel(self, rows: int, vecs: int, cols: int) -> ir.Function:
        """`micro(A_tile, panel, C_tile, bias_tile, kc, load_c, is_last, lda, ldc, ldp, E_tiles)`:
        C_tile[rows, cols] = (C_tile if load_c else 0) + A_tile @ panel
        over kc, then bias, relu and the epilogue if is_last.  `cols` may be
        less than vecs*W only on the last vector, which is then masked.
        `lda` is the length of A's stored rows, `ldc` that of C's (and E's),
        `ldp` that of the panel's (B's own rows when B is not packed: the last
        vector of a narrow strip is then loaded masked, B has no padding)."""
        direct = not self.plan.pack_b
        # Packed A is laid out as A stored (K, M) with lda = rows.
        a_by_column = self.trans_a or self.plan.pack_a
        variant = (rows, vecs, cols, a_by_column, direct) + self.epilogue_key()
        fn, kb = self.internal_function(
            f"micro{rows}x{cols}", variant,
            [PTR, PTR, PTR, PTR, I64, I1, I1, I64, I64, I64] + [PTR] * self.extras)
        if kb is None:
            return fn
        a, panel, c, bias, kc, load_c, is_last, lda, ldc, panel_stride = fn.args[:10]
        width = self.plan.width
        lanes = [min(width, cols - v * width) for v in range(vecs)]
        masks = [None if count == width else kb.lane_mask(count) for count in lanes]
        # Row r of the C tile, and of each epilogue operand's tile.
        c_rows = [kb.gep(c, kb.mul(r, ldc)) for r in range(rows)]
        extra_rows = [self.offset_extras(kb, fn.args[10:], kb.mul(r, ldc)) for r in range(rows)]

        tile = list(itertools.product(range(rows), range(vecs)))  # (r, v) pairs

        # The epilogue reads its operands' tiles after the k loop. A weight updated in place
        # or a saved activation is often in L3 or memory by then: fetched now, it arrives while
        # the tile computes instead of stalling the tile's end.
        for row in extra_rows:
            for operand_row, scalar in zip(row, self.scalar_extras):
                if not scalar:
                    self.prefetch_row(kb, operand_row, cols)

        # acc[r, v]: the accumulator of row r, vector v, kept in registers.
        acc = {rv: kb.variable(kb.splat(0.0)) for rv in tile}
        with kb.if_then(load_c):
            for r, v in tile:
                kb.set(acc[r, v], self.load_masked(kb, c_rows[r], v * width, masks[v]))

        # The k loop: one broadcast of A per row, one fma per accumulator.
        # A stored (K, M): element (r, k) at k*lda + r; stored (M, K): at r*lda + k.
        a_row_stride, a_k_stride = (1, lda) if a_by_column else (lda, 1)
        a_rows = [kb.mul(r, a_row_stride) for r in range(rows)]
        b_masks = masks if direct else [None] * vecs  # a packed panel is zero-padded
        with kb.for_range(0, kc, name="k") as k:
            b_row = kb.gep(panel, kb.mul(k, panel_stride))
            b_vecs = [self.load_masked(kb, b_row, v * width, b_masks[v]) for v in range(vecs)]
            a_col = kb.gep(a, kb.mul(k, a_k_stride))
            for r in range(rows):
                a_bcast = kb.splat(kb.load(a_col, a_rows[r]))
                for v in range(vecs):
                    kb.set(acc[r, v], kb.mul_add(a_bcast, b_vecs[v], kb.get(acc[r, v])))

        if self.bias or self.relu or self.epilogue is not None:
            with kb.if_then(is_last):
                for r, v in tile:
                    kb.set(acc[r, v], self.apply_epilogue(kb, kb.get(acc[r, v]), bias,
                                                     r, v, masks[v], extra_rows[r]))
        for r, v in tile:
            self.store_row(kb, kb.get(acc[r, v]), c_rows[r], v * width, lanes[v])
        kb.b.ret_void()
        return fn

    def epilogue_key(self) -> tuple:
        """Everything the epilogue's code depends on (part of every helper's name)."""
        return (self.bias, self.relu, None if self.epilogue is None else sympy.srepr(self.epilogue),
                self.extras, self.scalar_extras, tuple((k, sympy.srepr(e)) for k, e in self.side_stores))

    def offset_extras(self, kb, extras, offset):
        """The epilogue operands' pointers moved to element `offset` of C; a scalar stays put."""
        return [e if scalar else kb.gep(e, offset) for e, scalar in zip(extras, self.scalar_extras)]

    def apply_epilogue(self, kb, value, bias, r, v, mask, extra_rows):
        """bias, relu, then the elementwise epilogue on the accumulator of row r, vector v;
        `extra_rows` holds row r of each epilogue operand's tile."""
        if self.bias == "col":
            value = kb.fadd(value, self.load_masked(kb, bias, v * kb.width, mask))
        elif self.bias == "row":
            value = kb.fadd(value, kb.splat(kb.load(bias, r)))
        if self.relu:
            value = kb.relu(value)
        if self.epilogue is not None:
            operands = [value] + [kb.splat(kb.load(e, 0)) if scalar else self.load_masked(kb, e, v * kb.width, mask)
                                  for e, scalar in zip(extra_rows, self.scalar_extras)]
            value, *side_values = ExprEmitter(kb, operands).emit_all([self.epilogue] + [e for _, e in self.side_stores])
            for (k, _), side_value in zip(self.side_stores, side_values):
                if mask is None:
                    kb.store_vec(side_value, extra_rows[k - 1], v * kb.width)
                else:
                    kb.masked_store_vec(side_value, extra_rows[k - 1], v * kb.width, mask)
        return value

    @staticmethod
    def prefetch_row(kb, row, cols):
        """Prefetch the cache lines of floats row[0:cols]."""
        for first in sorted({*range(0, cols, _FLOATS_PER_LINE), cols - 1}):
            kb.prefetch(row, first)

    @staticmethod
    def load_masked(kb, ptr, offset, mask):
        if mask is None:
            return kb.load_vec(ptr, offset)
        return kb.masked_load_vec(ptr, offset, mask)

    @staticmethod
    def store_row(kb, value, ptr, offset, lanes):
        """Store the first `lanes` lanes of `value` at ptr[offset:]: a partial vector (an edge
        tile's last vector, a dot tile's row of a few columns) by plain stores of its pieces,
        not a masked store, microcoded on AMD cores (see layout.store_lanes)."""
        store_lanes(kb, value, ptr, offset, lanes)


# ---- lowering --------------------------------------------------------------------------------

def is_2d_swap(node) -> bool:
    """A 2-D transpose: the GEMM reads its operand in place, transposed (no copy is made)."""
    return node.op == "transpose" and node.attrs["axes"] == (1, 0)


def matmul_plan(node) -> GemmPlan | DotPlan:
    """The plan `lower_matmul` emits for a matmul node."""
    a, b = node.inputs
    return plan_gemm(a.shape[0], b.shape[1], a.shape[1], trans_a=is_2d_swap(a), trans_b=is_2d_swap(b))


def epilogue_allowed(product, others) -> bool:
    """A general epilogue reads its operands while C is written, so C must be final after one K
    block; and the fused step may write its result over an operand (a param updated in place),
    which the GEMM must not be reading as A or B meanwhile."""
    if matmul_plan(product).k_blocks > 1:
        return False
    product_operands = {alias_root(t).id for t in product.inputs} | \
        {alias_root(t.inputs[0]).id for t in product.inputs if is_2d_swap(t)}
    return not any(alias_root(t).id in product_operands for t in others)


@lowers("matmul", bias_epilogue="col", elementwise_epilogue=True, epilogue_allowed=epilogue_allowed,
        scalar_epilogue_operands=True, folds_operand=is_2d_swap)
def lower_matmul(node, epilogue: Epilogue | None) -> Step:
    a, b = node.inputs
    trans_a, trans_b = is_2d_swap(a), is_2d_swap(b)
    a_src = a.inputs[0] if trans_a else a
    b_src = b.inputs[0] if trans_b else b
    M, K = a.shape
    N = b.shape[1]
    epilogue = epilogue or Epilogue(node)
    has_bias = epilogue.bias is not None
    operands = [a_src, b_src] + ([epilogue.bias] if has_bias else []) + list(epilogue.operands)

    def build(module, name, threads):
        gemm = emit_gemm(module, f"{name}.gemm", M, N, K, trans_a=trans_a, trans_b=trans_b,
                         bias="col" if has_bias else None, relu=epilogue.relu,
                         epilogue=epilogue.expr, epilogue_operands=len(epilogue.operands),
                         scalar_operands=tuple(t.size == 1 and t.shape != node.shape for t in epilogue.operands),
                         side_stores=epilogue.side_stores)
        gemm.linkage = "internal"
        fn, kb = phase_function(module, name, len(operands))
        out, ins, scratch, tid, nthreads = phase_args(fn)
        bias_ptr = ins[2] if has_bias else ir.Constant(ins[0].type, None)
        extras = ins[3:] if has_bias else ins[2:]
        kb.b.call(gemm, [ins[0], ins[1], out, bias_ptr, scratch, tid, nthreads] + list(extras))
        kb.b.ret_void()
        return Kernel([fn], gemm_workspace_floats(M, N, K, trans_a=trans_a, trans_b=trans_b, nthreads=threads))

    label = ("gemm" + ("T" if trans_a else "") + ("+bias" if has_bias else "") + ("+relu" if epilogue.relu else "")
             + ("+ew" if epilogue.expr is not None else "")
             + (f"+{len(epilogue.side_stores)} in place" if epilogue.side_stores else ""))
    folded = [t for t, is_folded in ((a, trans_a), (b, trans_b)) if is_folded]
    covers = folded + [node] + list(epilogue.absorbed) + ([epilogue.node] if epilogue.node is not node else [])
    side_writes = [epilogue.operands[k - 1] for k, _ in epilogue.side_stores]
    return Step(epilogue.node, operands, build, label, covers, flops=matmul_flops(M, N, K, epilogue),
                side_writes=side_writes)


def matmul_flops(M: int, N: int, K: int, epilogue: Epilogue) -> int:
    """The GEMM's, its bias and ReLU's, and its elementwise epilogue's with its side stores."""
    flops = costs.gemm_flops(M, N, K) + costs.bias_relu_flops(M * N, epilogue.bias is not None, epilogue.relu)
    if epilogue.expr is not None:
        flops += costs.elementwise_flops(M * N, [epilogue.expr] + [e for _, e in epilogue.side_stores])
    return flops
