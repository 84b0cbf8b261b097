"""Sum, softmax, cross-entropy, one-hot, transpose, broadcast and copy kernels
(graphc.backend.kernels: reduce, softmax, layout) against the numpy reference ops.

Each kind of kernel is compiled once, many kernels to a module (module-scoped fixture), and
loaded through MCJIT from an emitted object file, as the runtime does. Every case is run the
way the program runs kernels, all phases in order: on 1 thread, on 2 threads at once with a
barrier between phases, and on 3 threads one after another. Outputs start as NaN (every
element must be written) between sentinels (nothing written outside), scratch likewise, and
the three runs must agree bit for bit: work is split between threads, never re-associated.
"""
from __future__ import annotations

import ctypes
import itertools
import threading
from typing import Callable, NamedTuple

import llvmlite.ir as ir
import numpy as np
import pytest
import sympy
from read_guards import ending_at_guard_page

from graphc.backend.emit.kernel import Kernel
from graphc.backend.kernels.elementwise import emit_elementwise
from graphc.backend.kernels.layout import collapse_dims, emit_broadcast_copy, emit_copy, emit_transpose
from graphc.backend.kernels.reduce import PARALLEL_TOTAL_MIN, emit_sum
from graphc.backend.kernels.softmax import PARALLEL_LOSS_MIN, emit_one_hot, emit_softmax, emit_softmax_cross_entropy
from graphc.backend.llvm import target
from graphc.core.ops.registry import OPS

SENTINEL = np.float32(-12345.0)
GUARD = 16
# (nthreads, concurrent): concurrent runs catch races; 3 threads in turn catch bad splits.
THREAD_RUNS = [(1, False), (2, True), (3, False)]
OTHER_WIDTHS = (4, 16)  # the SSE/NEON and AVX-512 tails, whatever this host has


def all_axes_subsets(ndim: int) -> list[tuple[int, ...]]:
    return [axes for r in range(1, ndim + 1) for axes in itertools.combinations(range(ndim), r)]


def reference(op: str, args, **attrs) -> np.ndarray:
    return np.asarray(OPS[op].reference(args, attrs, None, np.float32))


# ---------------------------------------------------------------------------- running kernels

Emit = Callable[[ir.Module, str], Kernel]


class CompiledKernels:
    """Kernels emitted into one module, compiled, loaded, and callable phase by phase."""

    def __init__(self, emitters: dict[object, Emit]):
        module = target.new_module("test_misc_kernels")
        self.kernels: dict[object, Kernel] = {}
        for number, (key, emit) in enumerate(emitters.items()):
            kernel = emit(module, f"kernel{number}")
            for phase in kernel.phases:
                phase.linkage = "external"  # phases are internal; tests call them directly
            self.kernels[key] = kernel
        self.engine = target.load_object(target.compile_to_object(str(module)))

    def run(self, key, out_shape, inputs, max_threads: int = 3) -> np.ndarray:
        """Run every thread configuration the kernel allows; check guards and that all
        agree; the result."""
        runs = [(n, concurrent) for n, concurrent in THREAD_RUNS if n <= max_threads]
        results = [self._run_once(key, out_shape, inputs, nthreads, concurrent)
                   for nthreads, concurrent in runs]
        for (nthreads, _), result in zip(runs[1:], results[1:]):
            np.testing.assert_array_equal(result, results[0],
                                          err_msg=f"{nthreads} threads differ from 1")
        return results[0]

    def _run_once(self, key, out_shape, inputs, nthreads, concurrent) -> np.ndarray:
        kernel = self.kernels[key]
        inputs = [ending_at_guard_page(a) for a in inputs]
        out_whole, out = _guarded(int(np.prod(out_shape, dtype=np.int64)))
        scratch_whole, scratch = _guarded(kernel.scratch_floats)
        phases = [self._callable(phase) for phase in kernel.phases]
        args = [out.ctypes.data, *(a.ctypes.data for a in inputs), scratch.ctypes.data]

        def thread_body(tid: int, barrier: threading.Barrier | None) -> None:
            for phase in phases:
                phase(*args, tid, nthreads)
                if barrier is not None:
                    barrier.wait()

        if concurrent:
            _run_in_threads(thread_body, nthreads)
        else:
            for phase in phases:
                for tid in range(nthreads):
                    phase(*args, tid, nthreads)
        for whole, what in ((out_whole, "out"), (scratch_whole, "scratch")):
            assert (whole[:GUARD] == SENTINEL).all(), f"{key}: write before {what}"
            assert (whole[-GUARD:] == SENTINEL).all(), f"{key}: write past {what}"
        return out.reshape(out_shape).copy()

    def _callable(self, phase: ir.Function):
        n_pointers = len(phase.args) - 2
        signature = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_pointers,
                                     ctypes.c_int64, ctypes.c_int64)
        return signature(self.engine.get_function_address(phase.name))


def _guarded(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(whole buffer, the `size` NaN floats inside it) with sentinels around."""
    whole = np.full(size + 2 * GUARD, SENTINEL, np.float32)
    whole[GUARD:GUARD + size] = np.nan
    return whole, whole[GUARD:GUARD + size]


def _run_in_threads(body: Callable[[int, threading.Barrier], None], nthreads: int) -> None:
    """body(tid, barrier) on nthreads Python threads at once (ctypes releases the GIL)."""
    barrier = threading.Barrier(nthreads)
    errors = []

    def worker(tid: int) -> None:
        try:
            body(tid, barrier)
        except BaseException as exc:  # reported below
            barrier.abort()
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(tid,)) for tid in range(nthreads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def random_array(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------- sum

class SumCase(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    width: int | None = None
    max_threads: int = 3


SUM_SHAPES = [(1, 1), (1, 7), (7, 1), (13, 17), (64, 10), (256, 512), (3, 5000), (1000, 5),
              (5, 7, 11), (2, 1, 33), (4, 9, 40),
              (3, 5, 7, 11), (2, 3, 1, 9), (8, 6, 12, 12)]
SUM_CASES = (
    [SumCase(shape, axes) for shape in SUM_SHAPES for axes in all_axes_subsets(len(shape))]
    + [SumCase((300, 331), (0, 1)),        # a parallel total with a short last block
       SumCase((64, 6, 28, 28), (0, 2, 3)),  # conv bias gradient
       SumCase((256, 512), (0, 1), max_threads=1),  # large, but one phase
       SumCase((0, 5), (0,)), SumCase((5, 0), (0,))]
    + [SumCase((5, 7, 19), axes, width) for width in OTHER_WIDTHS for axes in all_axes_subsets(3)]
)


@pytest.fixture(scope="module")
def sums():
    return CompiledKernels({
        case: (lambda m, name, c=case: emit_sum(m, name, c.shape, c.axes,
                                                max_threads=c.max_threads, width=c.width))
        for case in SUM_CASES})


@pytest.mark.parametrize("case", SUM_CASES, ids=str)
def test_sum_matches_reference(sums, case):
    x = random_array(case.shape, seed=len(case.axes))
    expected = reference("sum", [x], axes=case.axes, keepdims=True)
    # keepdims changes only the shape
    result = sums.run(case, expected.shape, [x], case.max_threads)
    # float32 summation error grows with the sum of |terms|, not with |result|.
    scale = np.abs(x).sum(axis=case.axes, keepdims=True)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * scale.max(initial=0))


def test_shared_constants_are_one_object_per_value_and_keep_negative_zero():
    """Kernels share constant objects (llvmlite prints each object once); a sum's identity
    -0.0 must not become the 0.0 it compares equal to."""
    from graphc.backend.emit.kernel_builder import F32, shared_constant
    vector = ir.VectorType(F32, 8)
    assert shared_constant(vector, (1.5,) * 8) is shared_constant(vector, (1.5,) * 8)
    negative, positive = shared_constant(vector, (-0.0,) * 8), shared_constant(vector, (0.0,) * 8)
    assert negative is not positive
    assert "0x8000000000000000" in str(negative) and "0x8000000000000000" not in str(positive)
    assert shared_constant(ir.IntType(32), 1) is not shared_constant(F32, 1.0)


def test_sum_is_stable_on_long_reductions(sums):
    """Blocked accumulation: a long sum of equal values stays exact where a running
    float32 sum would drift."""
    case = SumCase((256, 512), (0, 1))
    x = np.full(case.shape, 0.1, np.float32)
    result = sums.run(case, (1, 1), [x])
    assert abs(result.item() - 0.1 * x.size) <= 1e-5 * 0.1 * x.size


def test_collapse_dims_merges_what_every_operand_walks_alike():
    # (N, C, H, W) summed over (0, 2, 3): [N reduced, C kept, H*W reduced]
    sizes, (x_strides, out_strides) = collapse_dims((8, 6, 4, 5), (120, 20, 5, 1), (0, 1, 0, 0))
    assert sizes == [8, 6, 20] and x_strides == [120, 20, 1] and out_strides == [0, 1, 0]
    # size-1 dims vanish; two broadcast dims merge like two contiguous ones
    assert collapse_dims((3, 1, 4, 5), (0, 0, 0, 1)) == ([12, 5], [[0, 1]])


# ---------------------------------------------------------------------------- softmax

class SoftmaxCase(NamedTuple):
    shape: tuple[int, ...]
    axis: int
    width: int | None = None


SOFTMAX_SHAPES = [(1,), (7,), (5, 11), (64, 10), (3, 1000), (256, 512), (130, 9), (2, 2500),
                  (2, 3, 5), (4, 9, 17), (2, 3, 4, 5), (3, 2, 20, 33)]
SOFTMAX_CASES = (
    [SoftmaxCase(shape, axis) for shape in SOFTMAX_SHAPES for axis in range(len(shape))]
    + [SoftmaxCase((3, 21, 37), axis, width) for width in OTHER_WIDTHS for axis in range(3)]
    # rows in lanes (rows shorter than a vector): whole groups of W rows, then a short group
    + [SoftmaxCase((45, 7), 1), SoftmaxCase((37, 13), 1, 16), SoftmaxCase((37, 3), 1, 4)]
    # rows in lanes by transposes (W to 2W elements): 16 and 8 lanes of other hosts
    + [SoftmaxCase((37, 20), 1, 16), SoftmaxCase((37, 6), 1, 4), SoftmaxCase((3, 8), 1, 4)]
)


@pytest.fixture(scope="module")
def softmaxes():
    return CompiledKernels({
        case: (lambda m, name, c=case: emit_softmax(m, name, c.shape, c.axis, max_threads=3,
                                                    width=c.width))
        for case in SOFTMAX_CASES})


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=str)
def test_softmax_matches_reference(softmaxes, case, scale):
    x = random_array(case.shape, seed=case.axis, scale=scale)
    expected = reference("softmax", [x], axis=case.axis)
    result = softmaxes.run(case, x.shape, [x])
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.sum(axis=case.axis), 1.0, rtol=1e-5)


# Rows in lanes, loaded by transposes (11 classes on AVX2), gathered (5 classes; 3 with 4
# lanes), and rows along the lanes (20 classes on AVX2).
EXTREME_CASES = [SoftmaxCase((5, 11), 1), SoftmaxCase((13, 5), 1), SoftmaxCase((13, 5), 1, 16),
                 SoftmaxCase((13, 3), 1, 4), SoftmaxCase((5, 20), 1)]
SOFTMAX_CASES += [case for case in EXTREME_CASES if case not in SOFTMAX_CASES]


@pytest.mark.parametrize("case", EXTREME_CASES, ids=str)
def test_softmax_of_extreme_logits(softmaxes, case):
    n, length = case.shape
    x = np.zeros(case.shape, np.float32)
    x[:, 1] = 100.0
    x[1] = -100.0
    x[2, :] = ([1e4, -1e4] * length)[:length]
    x[3, 0] = -np.inf
    x[4, :] = 3e38
    expected = reference("softmax", [x], axis=1)
    np.testing.assert_allclose(softmaxes.run(case, x.shape, [x]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", EXTREME_CASES, ids=str)
def test_softmax_propagates_nan(softmaxes, case):
    x = random_array(case.shape, seed=3)
    x[2, case.shape[1] - 1] = np.nan
    result = softmaxes.run(case, x.shape, [x])
    assert np.isnan(result[2]).all() and not np.isnan(np.delete(result, 2, axis=0)).any()


# ---------------------------------------------------------------------------- cross-entropy

class LossCase(NamedTuple):
    n: int
    classes: int
    width: int | None = None
    max_threads: int = 3


LOSS_CASES = [LossCase(*shape) for shape in
              [(1, 1), (1, 7), (64, 10), (13, 37), (3, 1000), (256, 100), (512, 1000)]] + [
    LossCase(13, 37, width) for width in OTHER_WIDTHS] + [
    LossCase(45, 10, width) for width in OTHER_WIDTHS] + [      # rows in lanes, a short group
    LossCase(37, 20, 16), LossCase(45, 6, 4), LossCase(3, 4, 4),  # ... loaded by transposes
    LossCase(2001, 10), LossCase(2001, 16),                     # rows in lanes, two phases
    LossCase(256, 100, max_threads=1)]  # large, but one phase


@pytest.fixture(scope="module")
def losses():
    return CompiledKernels({
        case: (lambda m, name, c=case: emit_softmax_cross_entropy(
            m, name, (c.n, c.classes), max_threads=c.max_threads, width=c.width))
        for case in LOSS_CASES})


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("case", LOSS_CASES, ids=str)
def test_softmax_cross_entropy_matches_reference(losses, case, scale):
    rng = np.random.default_rng(case.classes)
    logits = np.clip(random_array((case.n, case.classes), seed=case.n, scale=scale),
                     -scale, scale)
    labels = rng.integers(0, case.classes, case.n, dtype=np.int32)
    expected = reference("softmax_cross_entropy", [logits, labels])
    result = losses.run(case, (), [logits, labels], case.max_threads)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_rows_in_lanes_cover_classifier_rows():
    """The cases above run both row layouts: rows in lanes up to MAX_ROW_IN_LANES elements
    (a classifier's logits), rows along the lanes beyond."""
    from graphc.backend.kernels.softmax import MAX_ROW_IN_LANES
    assert 10 <= MAX_ROW_IN_LANES < 37
    assert {c.classes <= MAX_ROW_IN_LANES for c in LOSS_CASES} == {True, False}
    assert any(c.n * c.classes >= PARALLEL_LOSS_MIN and c.classes <= MAX_ROW_IN_LANES for c in LOSS_CASES)


def test_softmax_cross_entropy_propagates_nan(losses):
    case = LossCase(64, 10)
    logits = random_array((case.n, case.classes), seed=4)
    logits[9, 3] = np.nan
    labels = np.zeros(case.n, np.int32)
    assert np.isnan(losses.run(case, (), [logits, labels]).item())


def test_softmax_cross_entropy_with_saturated_logits(losses):
    """Logits of ±100: a row labelled with its smallest logit loses 200, one labelled with
    its largest about 0."""
    case = LossCase(64, 10)
    logits = np.full((case.n, case.classes), -100.0, np.float32)
    logits[:, 0] = 100.0
    labels = np.full(case.n, 5, np.int32)
    labels[::2] = 0  # half the rows predicted right: loss ~0
    expected = reference("softmax_cross_entropy", [logits, labels])
    result = losses.run(case, (), [logits, labels])
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    assert abs(result.item() - 100.0) < 1e-3


def test_two_phases_only_where_threads_pay(sums, losses):
    """Large totals and losses split rows or blocks between threads in a first phase; small
    ones, or any when the kernel is built for one thread, take one phase."""
    assert len(sums.kernels[SumCase((256, 512), (0, 1))].phases) == 2
    assert len(sums.kernels[SumCase((256, 512), (0, 1), max_threads=1)].phases) == 1
    assert len(sums.kernels[SumCase((13, 17), (0, 1))].phases) == 1
    assert len(losses.kernels[LossCase(256, 100)].phases) == 2
    assert len(losses.kernels[LossCase(256, 100, max_threads=1)].phases) == 1
    assert len(losses.kernels[LossCase(64, 10)].phases) == 1
    assert 13 * 17 < PARALLEL_TOTAL_MIN <= 256 * 512 and 64 * 10 < PARALLEL_LOSS_MIN <= 256 * 100


# ---------------------------------------------------------------------------- one-hot

ONE_HOT_CASES = [(1, 1), (7, 1), (5, 11), (64, 10), (1000, 3), (33, 100)]


@pytest.fixture(scope="module")
def one_hots():
    return CompiledKernels({
        case: (lambda m, name, c=case: emit_one_hot(m, name, *c, max_threads=3))
        for case in ONE_HOT_CASES})


@pytest.mark.parametrize("case", ONE_HOT_CASES, ids=str)
def test_one_hot_matches_reference(one_hots, case):
    n, classes = case
    labels = np.random.default_rng(n).integers(0, classes, n, dtype=np.int32)
    expected = reference("one_hot", [labels], classes=classes, dtype="float32")
    np.testing.assert_array_equal(one_hots.run(case, (n, classes), [labels]), expected)


# ---------------------------------------------------------------------------- layout

class LayoutCase(NamedTuple):
    op: str
    shape: tuple[int, ...]
    target: tuple[int, ...]  # axes for a transpose, the out shape for a broadcast
    width: int | None = None


TRANSPOSE_2D = [(1, 9), (9, 1), (8, 8), (13, 17), (16, 24), (64, 64), (65, 63), (100, 3),
                (256, 512)]
TRANSPOSE_CASES = (
    [LayoutCase("transpose", shape, (1, 0)) for shape in TRANSPOSE_2D]
    + [LayoutCase("transpose", shape, axes)
       for shape in [(2, 3, 5), (7, 1, 13), (9, 17, 33), (2, 3, 5, 7), (3, 4, 9, 17)]
       for axes in itertools.permutations(range(len(shape)))]
    + [LayoutCase("transpose", (64, 6, 14, 14), (0, 2, 3, 1)),  # NCHW -> NHWC
       LayoutCase("transpose", (1, 1), (1, 0))]
    + [LayoutCase("transpose", shape, axes, width) for width in OTHER_WIDTHS
       for shape, axes in [((37, 41), (1, 0)), ((3, 19, 21), (0, 2, 1)), ((5, 6, 7), (2, 0, 1))]]
)
BROADCAST_CASES = [
    LayoutCase("broadcast_to", shape, target) for shape, target in [
        ((), (3, 4)), ((1,), (5,)), ((7,), (3, 7)), ((3, 1), (3, 7)), ((1, 7), (5, 7)),
        ((2, 1, 3), (4, 2, 5, 3)), ((6, 1, 1), (2, 6, 5, 5)), ((1,), (40000,)),
        ((5, 1), (5, 20000)), ((20000,), (3, 20000)), ((4, 5), (4, 5))]
] + [LayoutCase("broadcast_to", (3, 1, 11), (3, 5, 11), width) for width in OTHER_WIDTHS]
COPY_CASES = [LayoutCase("copy", (n,), (n,)) for n in (1, 7, 8, 1000, 40000)]
LAYOUT_CASES = TRANSPOSE_CASES + BROADCAST_CASES + COPY_CASES


def _emit_layout(module: ir.Module, name: str, case: LayoutCase) -> Kernel:
    if case.op == "transpose":
        return emit_transpose(module, name, case.shape, case.target, max_threads=3,
                              width=case.width)
    if case.op == "broadcast_to":
        return emit_broadcast_copy(module, name, case.shape, case.target, max_threads=3,
                                   width=case.width)
    return emit_copy(module, name, case.shape[0], max_threads=3, width=case.width)


@pytest.fixture(scope="module")
def layouts():
    return CompiledKernels({case: (lambda m, name, c=case: _emit_layout(m, name, c))
                            for case in LAYOUT_CASES})


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_layout_matches_reference(layouts, case):
    x = random_array(case.shape, seed=len(case.shape))
    if case.op == "transpose":
        expected = reference("transpose", [x], axes=case.target)
    elif case.op == "broadcast_to":
        expected = reference("broadcast_to", [x], shape=case.target)
    else:
        expected = x
    np.testing.assert_array_equal(layouts.run(case, expected.shape, [x]), expected)


# ---------------------------------------------------------------------------- exp and log in registers

X0 = sympy.Symbol("x0", real=True)
SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 88.5, -88.5, 100.0, -100.0,
                     87.4, -87.4, 1e-38, 1e-45, 3e38, 1 + 2**-23, 1 - 2**-24], np.float32)


def _float_range_samples() -> np.ndarray:
    """Special values and a spread over the whole float32 range, not a multiple of any width."""
    rng = np.random.default_rng(0)
    magnitudes = np.exp(rng.uniform(-103, 88.7, 1000)).astype(np.float32)
    signs = np.where(rng.random(1000) < 0.5, -1, 1).astype(np.float32)
    return np.concatenate([SPECIALS, magnitudes * signs, rng.uniform(-90, 90, 19).astype(np.float32)])


@pytest.fixture(scope="module")
def math_kernels():
    size = _float_range_samples().size
    return CompiledKernels({
        name: (lambda m, kernel_name, e=expr: emit_elementwise(m, kernel_name, (size,), [(size,)], e,
                                                               max_threads=1))
        for name, expr in {"exp": sympy.exp(X0), "log": sympy.log(X0)}.items()})


@pytest.mark.parametrize("name", ["exp", "log"])
def test_elementwise_exp_and_log_match_numpy_over_the_float_range(math_kernels, name):
    x = _float_range_samples()
    with np.errstate(all="ignore"):
        expected = getattr(np, name)(x)
    result = math_kernels.run(name, x.shape, [x], max_threads=1)
    normal = np.isfinite(expected) & (np.abs(expected) >= np.finfo(np.float32).tiny)
    np.testing.assert_array_max_ulp(result[normal], expected[normal], maxulp=3)
    np.testing.assert_array_equal(result[~np.isfinite(expected)], expected[~np.isfinite(expected)])
    np.testing.assert_allclose(result[~normal & np.isfinite(expected)],
                               expected[~normal & np.isfinite(expected)], rtol=0, atol=1e-44)


def test_emitters_reject_inconsistent_arguments():
    module = target.new_module("bad")
    with pytest.raises(ValueError):
        emit_sum(module, "s", (2, 3), (1, 0), max_threads=1)
    with pytest.raises(ValueError):
        emit_transpose(module, "t", (2, 3), (0, 0), max_threads=1)
    with pytest.raises(ValueError):
        emit_broadcast_copy(module, "b", (2, 3), (3, 3), max_threads=1)
    with pytest.raises(ValueError):
        emit_softmax(module, "s", (2, 3), 2, max_threads=1)
