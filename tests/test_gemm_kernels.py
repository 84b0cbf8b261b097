"""Generated GEMM (graphc.backend.kernels.gemm) against numpy, plus its foundations
(target.py, kernel_builder.py).

Every GEMM is compiled once, all in one module (module-scoped fixture), and
loaded through MCJIT from an emitted object file, the way the runtime loads
kernels.  Buffers are surrounded by sentinel floats so that any write past
C, or past a thread's slice of the workspace, fails the test.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import threading
import time

import llvmlite.binding as llvm
import llvmlite.ir as ir
import numpy as np
import pytest
from read_guards import ending_at_guard_page

from graphc.backend.emit.kernel_builder import I32, I64, PTR, KernelBuilder, i32_array
from graphc.backend.kernels.gemm import (MAX_A_BLOCK_FLOATS, MAX_PANEL_FLOATS, MIN_K_BLOCK, DotPlan, GemmPlan,
                                         choose_plan, emit_gemm, gemm_workspace_floats, plan_gemm)
from graphc.backend.kernels.gemm_dot import choose_dot_plan
from graphc.backend.llvm import target
from graphc_runtime.host import SIMD_SHAPES

_P = ctypes.c_void_p
GEMM_CFUNC = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64)
SENTINEL = np.float32(-12345.0)
GUARD = 64  # sentinel floats on each side of an output buffer


@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    N: int
    K: int
    trans_a: bool = False
    trans_b: bool = False
    accumulate: bool = False
    bias: str | None = None
    relu: bool = False
    # Blocking overrides: vector width (another host's), split axis, B read in place
    # (pack_b=False), or the dot-product kernel with a (rows, cols) tile (dot=...).
    width: int | None = None
    split: str | None = None
    pack_b: bool = True
    dot: tuple[int, int] | None = None
    mc: int | None = None   # A packed in blocks of mc rows (split "n")
    kc: int | None = None   # K blocks of kc (the host's plan may take all of K in one)
    simd: str | None = None  # exactly the plan plan_gemm makes for these vectors (no overrides)

    @property
    def name(self) -> str:
        flags = "".join(f"_{k}{int(v) if isinstance(v, bool) else v}"
                        for k, v in dataclasses.asdict(self).items()
                        if k not in ("M", "N", "K") and v not in (None, False))
        return f"gemm_{self.M}x{self.N}x{self.K}{flags}"

    def plan(self) -> GemmPlan | DotPlan:
        if self.simd:
            return plan_gemm(self.M, self.N, self.K, trans_a=self.trans_a, trans_b=self.trans_b,
                             simd=SIMD_SHAPES[self.simd])
        if self.dot is not None:
            rows, cols = self.dot
            return DotPlan(self.M, self.N, self.K, width=self.width or target.vector_width_f32(),
                           rows=rows, cols=cols, split=self.split or "m")
        if self.width is None:
            plan = choose_plan(self.M, self.N, self.K)
        else:  # 32 registers: the AVX-512 / NEON tile, whatever the width
            plan = choose_plan(self.M, self.N, self.K, width=self.width,
                               vector_registers=32)
        plan = dataclasses.replace(plan, pack_b=self.pack_b)
        if self.kc is not None:
            plan = dataclasses.replace(plan, kc=self.kc)
        if self.mc is not None:
            plan = dataclasses.replace(plan, pack_a=True, mc=self.mc, split="n")
        return dataclasses.replace(plan, split=self.split) if self.split else plan


def _all_transposes(M, N, K, **kw):
    return [Case(M, N, K, trans_a=ta, trans_b=tb, **kw)
            for ta in (False, True) for tb in (False, True)]


SHAPE_CASES = [
    case
    for shape in [
        (1, 1, 1), (1, 1, 300), (1, 19, 1), (5, 1, 7), (2, 9, 3),
        (6, 16, 8),            # exactly one register tile on AVX2
        (12, 32, 256),         # whole tiles, whole strips, one full K block
        (7, 13, 300),          # K > 256 (one block on AVX2, two on AVX-512)
        (13, 37, 513),         # tails everywhere
        (31, 47, 29),          # primes
        (6, 784, 25),          # conv-like
        (100, 16, 150),        # one strip: threads split M
        (1, 100, 64),          # a GEMV: one row, wide tiles of 7 vectors, a narrow last strip
        (4, 50, 33),           # 4 rows: tiles of 3 vectors
    ]
    for case in _all_transposes(*shape)
] + _all_transposes(13, 37, 513, kc=171) + _all_transposes(7, 13, 300, kc=150)  # 3 and 2 K blocks

EPILOGUE_CASES = [
    Case(7, 13, 300, bias="col"),
    Case(7, 13, 300, bias="row", relu=True),
    Case(19, 45, 70, trans_a=True, bias="col", relu=True),
    Case(19, 45, 70, trans_b=True, bias="row"),
    Case(9, 20, 530, relu=True),
    Case(9, 20, 530, accumulate=True),
    Case(9, 20, 530, accumulate=True, kc=265),
    Case(9, 20, 530, trans_a=True, trans_b=True, accumulate=True, bias="col", relu=True),
    Case(9, 20, 530, trans_a=True, trans_b=True, accumulate=True, bias="col", relu=True, kc=200),
    Case(9, 20, 530, bias="col", relu=True, kc=100),
    Case(1, 1, 1, accumulate=True, bias="row", relu=True),
]

# Blocking of other hosts, compiled here: 4 wide (SSE / NEON) and 16 wide
# (AVX-512) with the 32-register tile.
OTHER_WIDTH_CASES = [
    Case(13, 37, 300, width=w, trans_a=ta, trans_b=tb, bias=bias, relu=True)
    for w in (4, 16)
    for ta, tb, bias in [(False, False, "col"), (True, True, "row")]
] + [Case(3, 5, 2, width=w, trans_b=True) for w in (4, 16)]

THREAD_CASES = [
    Case(37, 150, 300, split="n"),
    Case(37, 150, 300, split="m", trans_a=True, trans_b=True, bias="col", relu=True),
    Case(64, 100, 70, trans_b=True, accumulate=True, bias="row"),
    Case(100, 16, 150),
    Case(3, 4, 5),   # less work than threads: some shares are empty
]

# The dot-product kernel (B stored (N, K)): whole and edge tiles in rows and columns, K below,
# at and off a multiple of the width, every epilogue, other widths, both split axes.
DOT_CASES = [
    Case(64, 10, 784, trans_b=True, bias="col", dot=(6, 2)),     # softmax regression's logits
    Case(64, 1, 64, trans_b=True, dot=(12, 1)),                  # a logistic regression's
    Case(1, 1, 1, trans_b=True, dot=(1, 1)),
    Case(13, 9, 17, trans_b=True, accumulate=True, bias="row", relu=True, dot=(4, 3)),
    Case(7, 5, 3, trans_b=True, bias="col", relu=True, dot=(2, 5), width=8),   # 5 columns: 8 lanes
    Case(29, 7, 100, trans_b=True, dot=(6, 2), split="n"),
    Case(11, 8, 40, trans_b=True, bias="col", dot=(3, 8), width=8),
] + [Case(9, 6, 37, trans_b=True, bias="col", relu=True, width=w, dot=(3, 3)) for w in (4, 16)]

# B read in place (few row tiles): whole strips, a masked narrow strip, several K blocks.
DIRECT_B_CASES = [
    Case(10, 784, 64, trans_a=True, pack_b=False),                # softmax regression's weight grad
    Case(10, 784, 64, trans_a=True, accumulate=True, bias="col", relu=True, pack_b=False),
    Case(5, 37, 300, bias="row", pack_b=False),
    Case(12, 19, 513, trans_a=True, pack_b=False, split="m"),
    Case(12, 19, 513, trans_a=True, pack_b=False, split="m", kc=171),
    Case(1, 3, 2, pack_b=False),
]

# A (stored transposed) packed into tile-major blocks: several blocks of A and of K, a block
# ending in a short row tile, a single one-row tile, epilogues, other widths (a tile's rows then
# span two 4-lane vectors, or part of one 16-lane vector), and the host's own choice.
PACKED_A_CASES = [
    Case(37, 150, 300, trans_a=True, mc=12),
    Case(37, 150, 300, trans_a=True, mc=12, kc=150),   # two K blocks: A packed again for each
    Case(37, 150, 300, trans_a=True, trans_b=True, accumulate=True, bias="row", relu=True, mc=18),
    Case(40, 33, 70, trans_a=True, bias="col", mc=6),
    Case(1, 50, 20, trans_a=True, mc=6),
] + [Case(29, 70, 300, width=w, trans_a=True, bias="col", relu=True, mc=12) for w in (4, 16)]

# Plans exactly as plan_gemm makes them for each instruction set's vectors, packed A included
# (M x kc past MIN_FLOATS_TO_PACK_A): blocks of A balanced by _m_block_rows, K in one block or
# several. All run here: wider vectors than the host's are legal LLVM, only slower.
PLAN_SHAPES = [
    dict(M=300, N=130, K=300, trans_a=True),
    dict(M=301, N=130, K=2000, trans_a=True, bias="col"),
    dict(M=100, N=200, K=3000, trans_a=True, trans_b=True),
    dict(M=600, N=512, K=300, trans_a=True),
    dict(M=10, N=784, K=300, trans_a=True),     # B read in place, all of K in one block
]
PLANNED_CASES = [Case(**shape, simd=name) for name in SIMD_SHAPES for shape in PLAN_SHAPES]

ALL_CASES = list(dict.fromkeys(SHAPE_CASES + EPILOGUE_CASES + OTHER_WIDTH_CASES
                               + THREAD_CASES + DOT_CASES + DIRECT_B_CASES + PACKED_A_CASES
                               + PLANNED_CASES))


def _compile_cases(cases) -> bytes:
    module = target.new_module("test_gemm")
    for case in cases:
        emit_gemm(module, case.name, case.M, case.N, case.K, trans_a=case.trans_a,
                  trans_b=case.trans_b, accumulate=case.accumulate,
                  bias=case.bias, relu=case.relu, plan=case.plan())
    return target.compile_to_object(str(module))


@pytest.fixture(scope="module")
def compiled():
    """{case: callable} for every case, from one module and one engine."""
    engine = target.load_object(_compile_cases(ALL_CASES))
    functions = {case: GEMM_CFUNC(engine.get_function_address(case.name))
                 for case in ALL_CASES}
    yield functions
    del functions, engine


# ---------------------------------------------------------------- helpers
def _guarded(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(whole buffer, view of `size` floats inside it) with sentinels around."""
    whole = np.full(size + 2 * GUARD, SENTINEL, np.float32)
    return whole, whole[GUARD:GUARD + size]


def _assert_guards_intact(whole: np.ndarray, what: str) -> None:
    assert (whole[:GUARD] == SENTINEL).all(), f"{what}: write before the buffer"
    assert (whole[-GUARD:] == SENTINEL).all(), f"{what}: write past the buffer"


class Problem:
    """Random operands for a case, the numpy reference and an error bound."""

    def __init__(self, case: Case, seed: int = 0):
        rng = np.random.default_rng(seed)
        M, N, K = case.M, case.N, case.K
        self.case = case
        # Inputs end at an inaccessible page: a read past A or B faults (see read_guards).
        self.A = ending_at_guard_page(rng.standard_normal((K, M) if case.trans_a else (M, K), dtype=np.float32))
        self.B = ending_at_guard_page(rng.standard_normal((N, K) if case.trans_b else (K, N), dtype=np.float32))
        self.bias = (rng.standard_normal(N if case.bias == "col" else M, dtype=np.float32)
                     if case.bias else None)
        self.C0 = rng.standard_normal((M, N), dtype=np.float32)

        a = (self.A.T if case.trans_a else self.A).astype(np.float64)
        b = (self.B.T if case.trans_b else self.B).astype(np.float64)
        ref, scale = a @ b, np.abs(a) @ np.abs(b)
        if case.accumulate:
            ref, scale = ref + self.C0, scale + np.abs(self.C0)
        if case.bias == "col":
            ref, scale = ref + self.bias, scale + np.abs(self.bias)
        elif case.bias == "row":
            ref, scale = ref + self.bias[:, None], scale + np.abs(self.bias)[:, None]
        self.expected = np.maximum(ref, 0) if case.relu else ref
        # float32 summation error grows with the sum of |terms|, not |result|.
        self.tolerance = 1e-4 * scale + 1e-6

    def run(self, fn, nthreads: int = 1, concurrent: bool = True) -> np.ndarray:
        case = self.case
        c_whole, c = _guarded(case.M * case.N)
        c[:] = self.C0.ravel()
        ws_floats = case.plan().workspace_floats(nthreads)
        ws_whole, ws = _guarded(ws_floats)
        args = (self.A.ctypes.data, self.B.ctypes.data, c.ctypes.data,
                None if self.bias is None else self.bias.ctypes.data, ws.ctypes.data)
        if nthreads == 1:
            fn(*args, 0, 1)
        elif concurrent:
            _run_concurrently(fn, args, nthreads)
        else:
            for tid in range(nthreads):
                fn(*args, tid, nthreads)
        _assert_guards_intact(c_whole, "C")
        _assert_guards_intact(ws_whole, "workspace")
        return c.reshape(case.M, case.N).copy()

    def check(self, result: np.ndarray) -> None:
        error = np.abs(result - self.expected)
        worst = np.unravel_index(np.argmax(error - self.tolerance), error.shape)
        assert (error <= self.tolerance).all(), (
            f"{self.case}: C{list(worst)} = {result[worst]}, "
            f"expected {self.expected[worst]}")


def _run_concurrently(fn, args, nthreads):
    """Call fn(*args, tid, nthreads) from nthreads Python threads at once.
    ctypes releases the GIL during the call, so they really overlap."""
    start = threading.Barrier(nthreads)
    errors = []

    def worker(tid):
        try:
            start.wait()
            fn(*args, tid, nthreads)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(tid,)) for tid in range(nthreads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# ------------------------------------------------------------------ GEMM
@pytest.mark.parametrize("case", SHAPE_CASES + EPILOGUE_CASES + DOT_CASES + DIRECT_B_CASES
                         + PACKED_A_CASES + PLANNED_CASES, ids=lambda c: c.name)
def test_gemm_matches_numpy(compiled, case):
    problem = Problem(case)
    problem.check(problem.run(compiled[case]))


@pytest.mark.parametrize("case", OTHER_WIDTH_CASES, ids=lambda c: c.name)
def test_gemm_blocking_of_other_vector_widths(compiled, case):
    problem = Problem(case)
    problem.check(problem.run(compiled[case]))


@pytest.mark.parametrize("case", THREAD_CASES + DOT_CASES[:6] + DIRECT_B_CASES + PACKED_A_CASES
                         + PLANNED_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("nthreads", [2, 3, 8])
def test_gemm_threads_match_single_thread(compiled, case, nthreads):
    problem = Problem(case)
    single = problem.run(compiled[case])
    problem.check(single)
    # Each tile is computed the same way whichever thread owns it, so the
    # split result is bitwise identical; concurrent runs must not race.
    together = problem.run(compiled[case], nthreads, concurrent=True)
    np.testing.assert_array_equal(together, single)
    one_by_one = problem.run(compiled[case], nthreads, concurrent=False)
    np.testing.assert_array_equal(one_by_one, single)


def test_thread_cases_cover_both_split_axes():
    assert {case.plan().split for case in THREAD_CASES} == {"n", "m"}


def test_gemm_is_repeatable_and_accumulates(compiled):
    case = Case(9, 20, 530, accumulate=True)
    problem = Problem(case)
    c = problem.C0.copy()
    args = (problem.A.ctypes.data, problem.B.ctypes.data, c.ctypes.data, None)
    ws = np.empty(case.plan().workspace_floats(1), np.float32)
    for _ in range(2):
        compiled[case](*args, ws.ctypes.data, 0, 1)
    product = problem.expected - problem.C0
    np.testing.assert_allclose(c, problem.C0 + 2 * product, atol=1e-3)


def test_workspace_size_covers_every_thread():
    for nthreads in (1, 2, 5):
        plan = plan_gemm(37, 150, 300, trans_a=True)
        assert gemm_workspace_floats(37, 150, 300, trans_a=True,
                                     nthreads=nthreads) == plan.workspace_floats(nthreads)
        assert plan.workspace_floats(nthreads) >= nthreads * plan.kc * plan.strip_width
    for M, N, K, ta, tb in [(64, 10, 784, False, True), (10, 784, 64, True, False)]:
        plan = plan_gemm(M, N, K, trans_a=ta, trans_b=tb)
        assert gemm_workspace_floats(M, N, K, trans_a=ta, trans_b=tb, nthreads=2) == plan.workspace_floats(2)


@pytest.mark.parametrize("simd", SIMD_SHAPES)
def test_plan_picks_the_kernel_that_fills_the_vectors(simd):
    """Narrow N with B transposed: dot products along K; few row tiles: B read in place;
    anything wide: the packed GEMM."""
    vectors = SIMD_SHAPES[simd]
    width = vectors.width
    assert isinstance(plan_gemm(64, 10, 784, trans_b=True, simd=vectors), DotPlan)
    assert isinstance(plan_gemm(64, 1, 64, trans_b=True, simd=vectors), DotPlan)
    assert isinstance(plan_gemm(64, 10, 784, trans_a=True, trans_b=True, simd=vectors), GemmPlan)
    assert isinstance(plan_gemm(256, 8 * width, 784, trans_b=True, simd=vectors), GemmPlan)
    assert not plan_gemm(10, 784, 64, trans_a=True, simd=vectors).pack_b
    assert plan_gemm(64, 784, 64, simd=vectors).pack_b


@pytest.mark.parametrize("simd", SIMD_SHAPES)
def test_plan_packs_a_transposed_a_that_outgrows_l1(simd):
    """A stored (K, M) is packed when its K block does not fit L1 (the MLP's dW1 = dH1^T X),
    in blocks of at most MAX_A_BLOCK_FLOATS, whole tiles, balanced; small or upright A is not."""
    vectors = SIMD_SHAPES[simd]
    plan = plan_gemm(512, 784, 256, trans_a=True, simd=vectors)
    assert plan.pack_a and plan.mc % plan.rows == 0
    assert (plan.mc - plan.rows) * plan.kc < MAX_A_BLOCK_FLOATS   # rounded up to whole tiles
    blocks = -(-512 // plan.mc)
    assert 512 - (blocks - 1) * plan.mc > plan.mc // 2       # the last block is not a sliver
    assert plan.workspace_floats(2) == 2 * (plan.panel_floats + plan.a_block_floats)
    assert plan.a_block_floats >= plan.mc * plan.kc
    assert not plan_gemm(512, 784, 256, simd=vectors).pack_a              # A upright: rows stream in order
    assert not plan_gemm(10, 784, 64, trans_a=True, simd=vectors).pack_a  # fits L1
    with pytest.raises(ValueError, match="pack_a"):
        dataclasses.replace(plan, split="m")
    with pytest.raises(ValueError, match="A stored"):
        emit_gemm(target.new_module("t"), "g", 512, 784, 256, plan=plan)


@pytest.mark.parametrize("simd", SIMD_SHAPES)
def test_planned_cases_cover_packed_a_and_k_blocks_for_every_instruction_set(simd):
    """Whatever the vectors, the executed plans include packed A in several blocks, packed A
    over several K blocks, and B read in place with all of K in one block."""
    plans = [case.plan() for case in PLANNED_CASES if case.simd == simd]
    assert all(plan.width == SIMD_SHAPES[simd].width for plan in plans)
    packed = [plan for plan in plans if plan.pack_a]
    assert any(-(-plan.M // plan.mc) > 1 for plan in packed)      # several blocks of A
    assert any(plan.k_blocks > 1 for plan in packed)              # several K blocks
    assert any(not plan.pack_b and plan.k_blocks == 1 for plan in plans)


def test_k_takes_no_more_blocks_than_of_256_steps():
    """Whatever the tile (a few rows take wide strips) and the host, K takes no more blocks
    (passes over C) than blocks of 256 steps (MIN_K_BLOCK) would need."""
    assert MIN_K_BLOCK == 256
    for width, registers in [(4, 16), (8, 16), (4, 32), (16, 32)]:
        for M in range(1, 9):
            for K in (100, 256, 300, 700, 5000):
                plan = choose_plan(M, 60 * width, K, width=width, vector_registers=registers)
                assert plan.k_blocks <= -(-K // 256), plan   # 256: every plan's block before
                assert plan.panel_floats <= max(MAX_PANEL_FLOATS, plan.panel_rows * plan.strip_width)
    # B read in place has no panel to fit: all of K is one block
    assert plan_gemm(1, 784, 5000, trans_a=True).k_blocks == 1


def test_packed_a_blocks_keep_every_thread_on_a_cache_line():
    plan = plan_gemm(512, 784, 256, trans_a=True)
    assert plan.thread_floats % 16 == 0


def test_few_rows_take_wider_register_tiles():
    """Fewer rows than the tile's: more vectors per row, within the register file."""
    for registers, width in [(16, 8), (32, 16)]:
        for M in range(1, 6):
            plan = choose_plan(M, 50 * width, 64, width=width, vector_registers=registers)
            assert plan.rows == M
            assert plan.rows * plan.vecs + plan.vecs + 1 <= registers      # fits
            assert (plan.rows + 1) * (plan.vecs + 1) + 1 > registers       # one more vector would not
    assert choose_plan(1, 10, 64, width=8, vector_registers=16).vecs == 2  # N has only 2 vectors


def test_dot_plan_tiles_fit_the_registers():
    """Accumulators, the tile's B vectors and one A vector fit the register file."""
    chosen = 0
    for M, N in [(64, 10), (64, 1), (3, 7), (100, 12), (5, 30)]:
        for registers, width in [(16, 4), (16, 8), (32, 16)]:
            plan = choose_dot_plan(M, N, 300, width=width, vector_registers=registers,
                                   packed_strip_width=2 * width)
            if plan is not None:
                chosen += 1
                assert plan.rows * plan.cols + plan.cols + 1 <= registers
                assert plan.cols <= min(N, width) and plan.rows <= M
    assert chosen >= 10


def test_plan_blocks_k_evenly():
    """K blocks as long as a panel of MAX_PANEL_FLOATS allows, of equal length."""
    avx2 = dict(width=8, vector_registers=16)      # 16-column strips: kc <= 1024
    assert choose_plan(4, 4, 256, **avx2).kc == 256
    assert choose_plan(4, 4, 1024, **avx2).kc == 1024
    assert choose_plan(4, 4, 3000, **avx2).kc == 1000
    avx512 = dict(width=16, vector_registers=32)   # 64-column strips: kc <= 256
    assert choose_plan(12, 640, 256, **avx512).kc == 256
    assert choose_plan(12, 640, 300, **avx512).kc == 150
    assert choose_plan(12, 640, 513, **avx512).kc == 171
    with pytest.raises(ValueError):
        choose_plan(0, 4, 4)


def test_emit_gemm_rejects_bad_arguments():
    module = target.new_module("bad")
    with pytest.raises(ValueError):
        emit_gemm(module, "g", 2, 2, 2, bias="diag")
    with pytest.raises(ValueError):
        emit_gemm(module, "g", 2, 2, 2, plan=choose_plan(3, 2, 2))
    with pytest.raises(ValueError, match="dot-product plan"):
        emit_gemm(module, "g", 2, 2, 2, plan=DotPlan(2, 2, 2, width=8, rows=1, cols=1, split="m"))


def test_gemm_compiles_quickly():
    """Loops stay IR loops: a large GEMM compiles in well under a second
    (typically ~100 ms; the bound is loose for slow CI machines)."""
    module = target.new_module("timing")
    emit_gemm(module, "g", 256, 784, 512, trans_b=True, bias="col", relu=True)
    start = time.perf_counter()
    target.compile_to_object(str(module))
    assert time.perf_counter() - start < 2.0


def _defined_helpers(module) -> list[str]:
    return sorted(fn.name for fn in module.functions
                  if fn.name.startswith("graphc.gemm.") and fn.blocks)


def test_gemms_of_one_module_share_packers_and_micro_kernels():
    """Helpers are keyed by tile shape, transposes and epilogue, not by the
    GEMM's M, N, K: a second GEMM of another size adds none."""
    def emit(name, M, N, K, **flags):  # the AVX2 blocking, whatever the host
        plan = choose_plan(M, N, K, width=8, vector_registers=16)
        emit_gemm(module, name, M, N, K, trans_b=True, bias="col", plan=plan, **flags)

    module = target.new_module("shared")
    emit("g1", 12, 32, 40, relu=True)   # whole 6x16 tiles only
    helpers = _defined_helpers(module)
    assert len(helpers) == 2            # one packer, one micro-kernel
    emit("g2", 30, 64, 300, relu=True)  # other M, N, K, two K blocks
    assert _defined_helpers(module) == helpers
    emit("g3", 30, 64, 300)             # another epilogue: another micro-kernel
    assert len(_defined_helpers(module)) == 3


@pytest.mark.parametrize("trans_b", [False, True])
def test_full_and_narrow_strips_share_one_packer(trans_b):
    """N = 30 in strips of 16: a full strip and one of 14 columns, both of two vectors,
    packed by one function told the strip's width."""
    module = target.new_module("strips")
    plan = choose_plan(12, 30, 40, width=8, vector_registers=16)
    assert plan.vecs == 2 and plan.N % (plan.vecs * plan.width) == 14
    emit_gemm(module, "g", 12, 30, 40, trans_b=trans_b, plan=plan)
    helpers = _defined_helpers(module)
    assert len([name for name in helpers if name.startswith("graphc.gemm.pack.")]) == 1
    assert len([name for name in helpers if name.startswith("graphc.gemm.micro")]) == 2


def test_shared_helpers_compute_each_gemm_with_its_own_strides():
    """Two GEMMs sharing every helper (whole 6x32 tiles), called from one engine."""
    cases = [Case(12, 32, 40, width=8, trans_a=True, trans_b=True, bias="col", relu=True),
             Case(30, 64, 300, width=8, trans_a=True, trans_b=True, bias="col", relu=True)]
    engine = target.load_object(_compile_cases(cases))
    for case in cases:
        problem = Problem(case)
        problem.check(problem.run(GEMM_CFUNC(engine.get_function_address(case.name))))


# ---------------------------------------------------------------- target
def test_vector_width_follows_host_features():
    features = set(target.host_features().split(","))
    expected = 16 if "+avx512f" in features else 8 if "+avx" in features else 4
    assert target.vector_width_f32() == expected


def test_new_module_carries_host_triple_and_layout():
    module = target.new_module("m")
    assert module.triple == target.host_target_machine().triple
    assert module.data_layout == str(target.host_target_machine().target_data)


def test_optimization_passes_do_what_the_kernels_need():
    """The pipeline (target.OPTIMIZATION_PASSES) promotes the builders' loop variables to
    registers (SROA) and gives an internal helper the constant argument every caller passes
    (IPSCCP): no alloca and no multiplication by the stride are left."""
    module = target.new_module("passes")
    helper = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64]), name="helper")
    helper.linkage = "internal"
    helper.attributes.add("noinline")
    kb = KernelBuilder(ir.IRBuilder(helper.append_basic_block("entry")), 8)
    data, stride = helper.args
    total = kb.variable(kb.f32(0.0))
    with kb.for_range(0, 16, name="i") as i:
        kb.set(total, kb.fadd(kb.get(total), kb.load(data, kb.b.mul(i, stride))))
    kb.store(kb.get(total), data, 0)
    kb.b.ret_void()
    caller = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR]), name="caller")
    call_site = ir.IRBuilder(caller.append_basic_block("entry"))
    call_site.call(helper, [caller.args[0], ir.Constant(I64, 4)])
    call_site.ret_void()
    optimized = target.optimize(target.parse_and_verify(str(module)))
    body = str(optimized.get_function("helper"))
    assert "alloca" not in body
    assert "mul" not in body.replace("fmul", "")


def test_fingerprint_names_cpu_and_llvmlite():
    import llvmlite
    fingerprint = target.target_fingerprint()
    assert llvm.get_host_cpu_name() in fingerprint
    assert llvmlite.__version__ in fingerprint


def test_gemm_assembly_uses_host_fma():
    module = target.new_module("asm")
    emit_gemm(module, "g", 12, 32, 64)
    asm = target.compile_to_assembly(str(module))
    if "+fma" in target.host_features().split(","):
        assert "vfmadd" in asm


def _add_one_module(name: str) -> str:
    module = target.new_module(name)
    fn = ir.Function(module, ir.FunctionType(I64, [I64]), name=name)
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(builder.add(fn.args[0], ir.Constant(I64, 1)))
    return str(module)


def test_objects_load_after_engines_are_destroyed():
    """An engine owns its target machine; destroying engines must not break
    later compiles (the shared target machine is never handed to one)."""
    for round_ in range(3):
        engine = target.load_object(target.compile_to_object(_add_one_module(f"f{round_}")))
        fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(
            engine.get_function_address(f"f{round_}"))
        assert fn(41) == 42
        del fn, engine
        gc.collect()


def test_object_calling_libm_loads_through_mcjit():
    """Relocations to libc/libm symbols resolve when MCJIT loads the object."""
    module = target.new_module("libm")
    f32 = ir.FloatType()
    expf = ir.Function(module, ir.FunctionType(f32, [f32]), name="expf")
    fn = ir.Function(module, ir.FunctionType(f32, [f32]), name="exp_plus_half")
    builder = ir.IRBuilder(fn.append_basic_block())
    builder.ret(builder.fadd(builder.call(expf, [fn.args[0]]), ir.Constant(f32, 0.5)))
    engine = target.load_object(target.compile_to_object(str(module)))
    call = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_float)(
        engine.get_function_address("exp_plus_half"))
    assert call(1.0) == pytest.approx(np.exp(1.0) + 0.5, rel=1e-6)


# -------------------------------------------------------- kernel builder
def _compile_one(build, arg_types, width=None):
    """Build `void kernel(args...)` with build(kb, args) and load it."""
    module = target.new_module("kb")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name="kernel")
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")), width)
    build(kb, fn.args)
    kb.b.ret_void()
    engine = target.load_object(target.compile_to_object(str(module)))
    ctypes_args = [ctypes.c_void_p if t == PTR else ctypes.c_int64 for t in arg_types]
    return engine, ctypes.CFUNCTYPE(None, *ctypes_args)(engine.get_function_address("kernel"))


def test_split_range_partitions_exactly():
    def build(kb, args):
        out, n, nthreads = args
        with kb.for_range(0, nthreads, name="t") as tid:
            lo, hi = kb.split_range(n, tid, nthreads)
            # Store as floats: exact for these small numbers.
            kb.store(kb.b.sitofp(lo, ir.FloatType()), out, kb.mul(tid, 2))
            kb.store(kb.b.sitofp(hi, ir.FloatType()), out, kb.add(kb.mul(tid, 2), 1))

    engine, fn = _compile_one(build, [PTR, I64, I64])
    for n in (0, 1, 5, 16, 17):
        for nthreads in (1, 2, 3, 8):
            out = np.empty((nthreads, 2), np.float32)
            fn(out.ctypes.data, n, nthreads)
            assert out[0, 0] == 0 and out[-1, 1] == n
            assert (out[1:, 0] == out[:-1, 1]).all()          # contiguous, disjoint
            sizes = out[:, 1] - out[:, 0]
            assert sizes.max() - sizes.min() <= 1              # balanced


@pytest.mark.parametrize("width", [4, 8, 16])
def test_vector_loop_with_masked_tail_and_transpose(width):
    """y[i] = relu(2 x[i] - 1) over n (masked tail), and one transposed block."""
    def build(kb, args):
        src, dst, block, n = args
        w = kb.width
        whole = kb.mul(kb.b.sdiv(n, kb.i64(w)), w)
        body = lambda x: kb.relu(kb.mul_add(x, kb.splat(2.0), kb.splat(-1.0)))  # noqa: E731
        with kb.for_range(0, whole, step=w) as i:
            kb.store_vec(body(kb.load_vec(src, i)), dst, i)
        mask = kb.lane_mask_dynamic(kb.sub(n, whole))
        kb.masked_store_vec(body(kb.masked_load_vec(src, whole, mask)), dst, whole, mask)
        rows = kb.transpose([kb.load_vec(block, r * w) for r in range(w)])
        for r, row in enumerate(rows):
            kb.store_vec(row, block, r * w)

    engine, fn = _compile_one(build, [PTR, PTR, PTR, I64], width)
    rng = np.random.default_rng(1)
    for n in (0, 1, width - 1, width, 3 * width + 2):
        x = rng.standard_normal(n, dtype=np.float32)
        y_whole, y = _guarded(n)
        block = np.arange(width * width, dtype=np.float32).reshape(width, width)
        expected_block = block.T.copy()
        fn(x.ctypes.data, y.ctypes.data, block.ctypes.data, n)
        np.testing.assert_allclose(y, np.maximum(2 * x - 1, 0), rtol=1e-6)
        _assert_guards_intact(y_whole, "y")
        np.testing.assert_array_equal(block, expected_block)


def test_i32_array_prints_as_llvmlite_would():
    """The tables' text, written at once, is what llvmlite prints for the same constant (a
    global's initializer is printed by reference)."""
    for values in ([0, 1, -7, 2**31 - 1, -2**31, 1600], []):
        table, reference = i32_array(values), ir.Constant(ir.ArrayType(I32, len(values)), values)
        assert table.type == reference.type
        assert table.get_reference() == reference.get_reference()
    with pytest.raises(ValueError, match="32 bits"):
        i32_array([2**31])


def test_for_range_loops_run_in_sequence():
    """Two loops over a runtime trip count, one after the other, each add one."""
    module = target.new_module("loops")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64]), name="kernel")
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))
    dst, n = fn.args
    for _ in range(2):
        with kb.for_range(0, n) as i:
            kb.store(kb.fadd(kb.load(dst, i), kb.f32(1.0)), dst, i)
    kb.b.ret_void()

    engine = target.load_object(target.compile_to_object(str(module)))
    kernel = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(
        engine.get_function_address("kernel"))
    y = np.zeros(37, np.float32)
    kernel(y.ctypes.data, 37)
    np.testing.assert_array_equal(y, 2.0)
