"""Softmax along any axis, softmax cross-entropy, and one-hot encoding of int32 labels.

Both softmax kernels are numerically stable: they exponentiate x - max(x) <= 0, so exp never
overflows, and cross-entropy takes log(sum(exp(x - max))) - (x[label] - max), which stays
exact for logits of magnitude 100 and more. exp is evaluated in registers (`vector_exp`),
not by calling libm per lane. The stated accuracies are those of fused multiply-adds; on a CPU
without FMA instructions `mul_add` rounds twice (no libm `fmaf` call per lane).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import llvmlite.ir as ir

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import F32, I32, I64, PTR, TRANSPOSE_WIDTHS, KernelBuilder, shared_constant
from graphc.backend.kernels.layout import (declare_intrinsic, for_each_vector, load_lanes, only_thread_zero, open_phase,
                                           store_lanes, vector_lanes, vector_suffix, zero_floats)
from graphc.backend.kernels.reduce import (ROW_BLOCK, SPAN_BLOCK, SUM_IDENTITY, VectorAccumulators, blocked_sum,
                                           for_each_column_chunk, horizontal_max, horizontal_sum, span_max, span_sum,
                                           tree_combine, vector_add, vector_max)
from graphc.backend.lowering_rules import Step, alias_root, lowers

__all__ = ["emit_softmax", "emit_softmax_cross_entropy", "emit_one_hot", "vector_exp", "vector_exp_any",
           "vector_log"]

# Columns per work item of a softmax along a non-last axis, in vectors: one cache line of
# each row with AVX2, and few inlined exps.
SOFTMAX_CHUNK_VECTORS = 2
# Below this many logits, cross-entropy runs in one phase on one thread: a second phase and
# its barrier would cost more than the rows take.
PARALLEL_LOSS_MIN = 16384
# Cross-entropy over rows of at most this many logits (a classifier's 10) runs with rows in
# the lanes (`_RowGroup`): W rows at a time, one vector per class, loaded by two W x W
# transposes when rows hold W to 2W elements, else gathered. Along the lanes a row of 10
# fills 10 of 16 lanes and needs a horizontal max and sum and a libm log, slower than rows in
# lanes. Softmax takes rows in lanes for rows shorter than 2W, writing back by transposes or,
# below W, through a permute of each row's max and 1/sum; gathered and scattered instead,
# rows of 10 gained nothing and rows of 16 lost (bench/NOTES.md, "Softmax and reductions").
MAX_ROW_IN_LANES = 16

# exp(x) = 2**n * exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2. ln 2 is split so that
# n * LN2_HI is exact (LN2_HI = 355/512 has 9 significant bits, n needs at most 8), which
# keeps r accurate (Cody and Waite's reduction).
LN2_HI = 0.693359375
LN2_LO = math.log(2.0) - LN2_HI
# Below ln(2**-126) the result would be subnormal; it is flushed to 0 (so is exp(-inf)).
EXP_UNDERFLOW = math.log(2.0 ** -126)
# exp(r) on |r| <= ln(2)/2 by its Taylor polynomial of degree 7: the first omitted term is
# below 6e-9 relative, a tenth of float32's rounding step.
EXP_TAYLOR_DEGREE = 7
FLOAT32_EXPONENT_BIAS = 127
FLOAT32_MANTISSA_BITS = 23
ONE_BITS = 0x3F800000        # the float32 1.0 as an integer
SQRT_HALF_BITS = 0x3F3504F3  # sqrt(1/2) rounded to float32, as an integer


def vector_exp(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    """Lanewise exp(x) of a float vector for x <= 0, within about 1 ulp.

    The domain is what stable softmax needs (x - max(x)); no overflow handling is emitted.
    NaN lanes stay NaN.
    """
    b = kb.b
    floor = declare_intrinsic(kb.module, f"llvm.floor.{vector_suffix(kb)}", kb.vec_type,
                              [kb.vec_type])
    n = b.call(floor, [kb.mul_add(x, kb.splat(1.0 / math.log(2.0)), kb.splat(0.5))])
    r = kb.mul_add(n, kb.splat(-LN2_HI), x)
    r = kb.mul_add(n, kb.splat(-LN2_LO), r)
    poly = kb.splat(1.0 / math.factorial(EXP_TAYLOR_DEGREE))
    for k in reversed(range(EXP_TAYLOR_DEGREE)):
        poly = kb.mul_add(poly, r, kb.splat(1.0 / math.factorial(k)))
    # 2**n for n in [-126, 0]: the biased exponent n + 127 placed in the exponent field.
    int_vec = ir.VectorType(I32, kb.width)
    bias = ir.Constant(int_vec, [FLOAT32_EXPONENT_BIAS] * kb.width)
    shift = ir.Constant(int_vec, [FLOAT32_MANTISSA_BITS] * kb.width)
    power = b.bitcast(b.shl(b.add(b.fptosi(n, int_vec), bias), shift), kb.vec_type)
    # Lanes below the underflow bound computed garbage exponents: replace them by 0.
    underflow = b.fcmp_ordered("<", x, kb.splat(EXP_UNDERFLOW))
    return b.select(underflow, kb.splat(0.0), kb.fmul(poly, power))


def vector_exp_any(kb: KernelBuilder, x: ir.Value) -> ir.Value:
    """Lanewise exp(x) of a float vector for any x, within 3 ulp (relative error < 3e-7).

    exp(-|x|) is computed as exp(-|x| / 2)**2, inverted where x > 0: the half stays in
    `vector_exp`'s normal range, and squaring reaches libm's whole range, subnormal results
    and overflow to inf included. inf, -inf and NaN give inf, 0 and NaN.
    """
    b = kb.b
    fabs = declare_intrinsic(kb.module, f"llvm.fabs.{vector_suffix(kb)}", kb.vec_type, [kb.vec_type])
    half = vector_exp(kb, kb.fmul(b.call(fabs, [x]), kb.splat(-0.5)))
    small = kb.fmul(half, half)
    positive = b.fcmp_ordered(">", x, kb.splat(0.0))
    return b.select(positive, b.fdiv(kb.splat(1.0), small), small)


def vector_log(kb: KernelBuilder, y: ir.Value) -> ir.Value:
    """Lanewise natural log of a float vector, within 3 ulp; log(0) = -inf, log(inf) = inf,
    NaN for negative and NaN lanes.

    y = 2**e * m with m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1),
    by the series 2s (1 + s**2/3 + s**4/5 + ...): |s| <= 0.172, so the omitted terms are below
    1e-9 relative. Subnormal y are scaled by 2**23 first.
    """
    b = kb.b
    int_vec = ir.VectorType(I32, kb.width)

    def ints(value: int) -> ir.Constant:
        return ir.Constant(int_vec, [value] * kb.width)

    subnormal = b.fcmp_ordered("<", y, kb.splat(2.0 ** -126))
    scaled = b.select(subnormal, kb.fmul(y, kb.splat(2.0 ** 23)), y)
    bits = b.bitcast(scaled, int_vec)
    # Adding bits(1) - bits(sqrt(1/2)) carries into the exponent field exactly when the
    # mantissa is at least sqrt(2)'s; the mantissa field, re-based on sqrt(1/2), is then m.
    shifted = b.add(bits, ints(ONE_BITS - SQRT_HALF_BITS))
    exponent = b.sub(b.ashr(shifted, ints(FLOAT32_MANTISSA_BITS)), ints(FLOAT32_EXPONENT_BIAS))
    mantissa_field = b.and_(shifted, ints((1 << FLOAT32_MANTISSA_BITS) - 1))
    mantissa = b.bitcast(b.add(mantissa_field, ints(SQRT_HALF_BITS)), kb.vec_type)
    e = b.fsub(b.sitofp(exponent, kb.vec_type), b.select(subnormal, kb.splat(23.0), kb.splat(0.0)))
    s_value = b.fdiv(b.fsub(mantissa, kb.splat(1.0)), b.fadd(mantissa, kb.splat(1.0)))
    s2 = kb.fmul(s_value, s_value)
    series = kb.splat(1.0 / 11)
    for k in (9, 7, 5, 3, 1):
        series = kb.mul_add(series, s2, kb.splat(1.0 / k))
    log_m = kb.fmul(kb.fmul(s_value, kb.splat(2.0)), series)
    result = kb.mul_add(e, kb.splat(LN2_HI), kb.mul_add(e, kb.splat(LN2_LO), log_m))
    # Special lanes: the bit manipulation above is meaningless for them.
    result = b.select(b.fcmp_ordered("==", y, kb.splat(0.0)), kb.splat(-math.inf), result)
    result = b.select(b.fcmp_ordered("==", y, kb.splat(math.inf)), y, result)
    return b.select(b.fcmp_unordered("<", y, kb.splat(0.0)), kb.splat(math.nan), result)


def _log(kb: KernelBuilder, value: ir.Value) -> ir.Value:
    log = declare_intrinsic(kb.module, "llvm.log.f32", F32, [F32])
    return kb.b.call(log, [value])


# ---------------------------------------------------------------------------- contiguous rows

def _row_max(kb: KernelBuilder, x: ir.Value, start: ir.Value, length: int) -> ir.Value:
    return horizontal_max(kb, span_max(kb, x, start, length))


def _row_exp_sum(kb: KernelBuilder, x: ir.Value, start: ir.Value, length: int,
                 maximum: ir.Value, exps_out: ir.Value | None = None) -> ir.Value:
    """sum(exp(x[start:][:length] - maximum)), also storing the exponentials at the same
    positions of `exps_out` when given."""
    shift = kb.splat(maximum)

    def block_sum(block_start: ir.Value, count: int) -> list[ir.Value]:
        # One accumulator suffices: each add waits on a ~20-instruction exp, not on the
        # previous add, and one exp per iteration keeps the code small.
        sums = VectorAccumulators(kb, 1, SUM_IDENTITY, vector_add)
        sums.reset()

        def exponentiate(index: ir.Value, lanes: int, _slot: int) -> None:
            # Lanes past the row read -inf, whose exponential adds 0.
            value = load_lanes(kb, x, index, lanes, fill=-math.inf)
            exp = vector_exp(kb, kb.b.fsub(value, shift))
            if exps_out is not None:
                store_lanes(kb, exp, exps_out, index, lanes)
            sums.update(0, exp)

        for_each_vector(kb, kb.add(start, block_start), count, exponentiate)
        return sums.values()

    return horizontal_sum(kb, blocked_sum(kb, length, SPAN_BLOCK, 1, block_sum)[0])


def _scale_row(kb: KernelBuilder, ptr: ir.Value, start: ir.Value, length: int,
               factor: ir.Value) -> None:
    """ptr[start:][:length] *= factor (a scalar)."""
    factor = kb.splat(factor)

    def scale(index: ir.Value, lanes: int, _slot: int) -> None:
        store_lanes(kb, kb.fmul(load_lanes(kb, ptr, index, lanes), factor), ptr, index, lanes)

    for_each_vector(kb, start, length, scale)


# ---------------------------------------------------------------------------- softmax

def emit_softmax(module: ir.Module, name: str, shape: Sequence[int], axis: int, *,
                 max_threads: int, width: int | None = None) -> Kernel:
    """out = softmax(in0, axis): exp(x - max) / sum(exp(x - max)) along `axis`.

    The tensor is viewed as (outer, length, inner) around the axis. With inner == 1 (the last
    axis) each row is contiguous and threads split the rows (groups of W rows, one per lane,
    when rows are shorter than two vectors); otherwise threads split
    (outer, chunk of inner columns) items and every pass runs down the axis with vectors of
    adjacent columns. `width` overrides the host's vector width (for tests).
    """
    shape = tuple(shape)
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for shape {shape}")
    axis %= len(shape)
    outer, length = math.prod(shape[:axis]), shape[axis]
    inner = math.prod(shape[axis + 1:])
    fn, kb = open_phase(module, name, 1, width)
    out, (x,), _, tid, nthreads = phase_args(fn)
    if inner == 1:
        _emit_softmax_rows(kb, out, x, tid, nthreads, outer, length)
    else:
        _emit_softmax_columns(kb, out, x, tid, nthreads, outer, length, inner)
    kb.b.ret_void()
    return Kernel([fn])


def _emit_softmax_rows(kb: KernelBuilder, out: ir.Value, x: ir.Value, tid: ir.Value,
                       nthreads: ir.Value, n_rows: int, length: int) -> None:
    if _rows_transposable(kb, length):
        def softmax_transposed_group(rows: _RowGroup) -> None:
            factor = kb.b.fdiv(kb.splat(1.0), rows.total)
            rows.store_transposed([kb.fmul(exp, factor) for exp in rows.exps], out)

        _for_each_row_group(kb, x, tid, nthreads, n_rows, length, softmax_transposed_group)
        return
    if length < kb.width:
        def softmax_group(rows: _RowGroup) -> None:
            # Written in x's own layout, the group's rows * length contiguous floats, with
            # each lane's row maximum and 1 / sum moved in by a permute: storing the exps
            # computed by row would need a scatter, one scalar store per element.
            factor = kb.b.fdiv(kb.splat(1.0), rows.total)
            start = kb.mul(rows.first, length)
            for k, lanes in enumerate(vector_lanes(kb, rows.rows * length)):
                index = kb.add(start, k * kb.width)
                row_of_lane = [min((k * kb.width + lane) // length, kb.width - 1) for lane in range(kb.width)]
                value = load_lanes(kb, x, index, lanes)
                exp = vector_exp(kb, kb.b.fsub(value, rows.spread(rows.maximum, row_of_lane)))
                store_lanes(kb, kb.fmul(exp, rows.spread(factor, row_of_lane)), out, index, lanes)

        _for_each_row_group(kb, x, tid, nthreads, n_rows, length, softmax_group)
        return
    lo, hi = kb.split_range(n_rows, tid, nthreads)
    with kb.for_range(lo, hi, name="row") as row:
        start = kb.mul(row, length)
        maximum = _row_max(kb, x, start, length)
        total = _row_exp_sum(kb, x, start, length, maximum, exps_out=out)
        _scale_row(kb, out, start, length, kb.b.fdiv(kb.f32(1.0), total))


def _for_each_row_group(kb: KernelBuilder, x: ir.Value, tid: ir.Value, nthreads: ir.Value,
                        n_rows: int, length: int, body: Callable[[_RowGroup], None]) -> None:
    """body(group) for thread tid's share of the groups of W rows of x; the whole groups
    and the short last one are emitted apart, so that every group's mask is a constant:
    with a variable one, LLVM turns each gathered lane into a branch (it emits
    no gather instruction on the AMD cores it deems slow at them, the Zen 3 here included)."""
    full_groups, tail_rows = divmod(n_rows, kb.width)
    lo, hi = kb.split_range(full_groups + (tail_rows > 0), tid, nthreads)
    if full_groups:
        with kb.for_range(lo, kb.min(hi, full_groups), name="group") as group:
            body(_RowGroup(kb, x, group, kb.width, length))
    if tail_rows:
        with kb.if_then(kb.b.icmp_signed("==", hi, kb.i64(full_groups + 1))):
            body(_RowGroup(kb, x, kb.i64(full_groups), tail_rows, length))


def _rows_transposable(kb: KernelBuilder, length: int) -> bool:
    """Whether rows of `length` load and store in groups by W x W transposes: W to 2W
    elements (a classifier's 10 logits on AVX2), W one that `kb.transpose` handles."""
    return kb.width <= length <= 2 * kb.width and kb.width in TRANSPOSE_WIDTHS


class _RowGroup:
    """Group `group` of W consecutive rows of `length` floats of x, one row per lane, of
    which the first `rows` are real (the last group may be short: `mask` enables their
    lanes): `columns[j]` holds element j of each row, `maximum` the rows' maxima,
    `exps[j]` = exp(columns[j] - maximum), `total` their sums. Lanes past the rows read
    nothing and compute values never stored."""

    def __init__(self, kb: KernelBuilder, x: ir.Value, group: ir.Value, rows: int, length: int):
        self.kb, self.length, self.rows = kb, length, rows
        self.first = kb.mul(group, kb.width)
        self.mask = kb.lane_mask(rows)
        if _rows_transposable(kb, length):
            # Rows of W to 2W elements: two W x W transposes of whole-vector row loads (the
            # first and the last W elements of each row, which overlap) instead of W scalar
            # loads per column.
            low, high = self.transposed(x, 0), self.transposed(x, length - kb.width)
            self.columns = low + high[2 * kb.width - length:]
        else:
            self.columns = [kb.gather_vec(self.addresses(x, j), self.mask) for j in range(length)]
        self.maximum = tree_combine(kb, self.columns, vector_max)
        self.exps = [vector_exp(kb, kb.b.fsub(column, self.maximum)) for column in self.columns]
        self.total = tree_combine(kb, self.exps, vector_add)

    def row_start(self, r: int, column: int) -> ir.Value:
        return self.kb.add(self.kb.mul(self.kb.add(self.first, r), self.length), column)

    def transposed(self, x: ir.Value, column: int) -> list[ir.Value]:
        """Columns column .. column + W - 1 of the group's rows (rows in lanes), from one vector
        load per real row (the others are zero) and a transpose."""
        kb = self.kb
        row_vectors = [kb.load_vec(x, self.row_start(r, column)) if r < self.rows else kb.splat(0.0)
                       for r in range(kb.width)]
        return kb.transpose(row_vectors)

    def store_transposed(self, columns: list[ir.Value], out: ir.Value) -> None:
        """Store per-column vectors (rows in lanes, laid out as x) back in row layout: the first
        and the last W elements of each real row (their overlap written twice, alike)."""
        kb = self.kb
        for column, block in ((0, columns[:kb.width]), (self.length - kb.width, columns[-kb.width:])):
            for r, row_vector in enumerate(kb.transpose(block)[:self.rows]):
                kb.store_vec(row_vector, out, self.row_start(r, column))

    def pick(self, labels: ir.Value) -> ir.Value:
        """Lane r: element labels[r] (an i32 vector, in [0, length)) of row r."""
        kb = self.kb
        picked = kb.splat(0.0)
        for j, column in enumerate(self.columns):
            j_vector = ir.Constant(labels.type, [j] * kb.width)
            picked = kb.b.select(kb.b.icmp_signed("==", labels, j_vector), column, picked)
        return picked

    def spread(self, per_row: ir.Value, row_of_lane: list[int]) -> ir.Value:
        """A vector whose lane i holds lane row_of_lane[i] of `per_row` (a value per row)."""
        indices = ir.Constant(ir.VectorType(I32, self.kb.width), row_of_lane)
        return self.kb.b.shuffle_vector(per_row, per_row, indices)

    def row_offsets(self, j: int) -> ir.Constant:
        """Offsets of element j of each lane's row from the group's first row."""
        return shared_constant(ir.VectorType(I64, self.kb.width),
                               tuple(lane * self.length + j for lane in range(self.kb.width)))

    def addresses(self, ptr: ir.Value, j: int) -> ir.Value:
        """Addresses of element j of the group's rows in `ptr`, laid out as x."""
        base = self.kb.gep(ptr, self.kb.mul(self.first, self.length))
        return self.kb.lane_addresses(base, self.row_offsets(j))


def _emit_softmax_columns(kb: KernelBuilder, out: ir.Value, x: ir.Value, tid: ir.Value,
                          nthreads: ir.Value, outer: int, length: int, inner: int) -> None:
    """Softmax down the axis for chunks of adjacent columns: element (o, a, i) is at
    (o * length + a) * inner + i in both x and out."""
    def emit_chunk(start: ir.Value, _out_start: ir.Value, chunk_width: int) -> None:
        _emit_column_chunk_softmax(kb, out, x, start, vector_lanes(kb, chunk_width),
                                   length, inner)

    strides = [length * inner]
    for_each_column_chunk(kb, tid, nthreads, [outer], strides, strides, inner, emit_chunk,
                          chunk_vectors=SOFTMAX_CHUNK_VECTORS)


def _emit_column_chunk_softmax(kb: KernelBuilder, out: ir.Value, x: ir.Value,
                               start: ir.Value, lanes: list[int], length: int,
                               inner: int) -> None:
    """Three passes down the axis over the vectors (of `lanes` lanes) of one column chunk:
    running maxima, exponentials (stored) with their sums, then scaling by 1 / sum."""
    def down_the_axis(first: ir.Value, count: int, body) -> None:
        """body(v, index, n_lanes) for vector v of the chunk, rows [first, first + count)."""
        with kb.for_range(first, kb.add(first, count), name="a") as a:
            row_start = kb.add(start, kb.mul(a, inner))
            for v, n_lanes in enumerate(lanes):
                body(v, kb.add(row_start, v * kb.width), n_lanes)

    maxima = VectorAccumulators(kb, len(lanes), -math.inf, vector_max, name="max")
    maxima.reset()
    down_the_axis(kb.i64(0), length, lambda v, index, n_lanes: maxima.update(
        v, load_lanes(kb, x, index, n_lanes, fill=-math.inf)))
    shifts = maxima.values()

    def block_sums(first: ir.Value, count: int) -> list[ir.Value]:
        sums = VectorAccumulators(kb, len(lanes), SUM_IDENTITY, vector_add)
        sums.reset()

        def exponentiate(v: int, index: ir.Value, n_lanes: int) -> None:
            # Lanes past the chunk compute garbage that is never stored.
            exp = vector_exp(kb, kb.b.fsub(load_lanes(kb, x, index, n_lanes), shifts[v]))
            store_lanes(kb, exp, out, index, n_lanes)
            sums.update(v, exp)

        down_the_axis(first, count, exponentiate)
        return sums.values()

    totals = blocked_sum(kb, length, ROW_BLOCK, len(lanes), block_sums)
    factors = [kb.b.fdiv(kb.splat(1.0), total) for total in totals]
    down_the_axis(kb.i64(0), length, lambda v, index, n_lanes: store_lanes(
        kb, kb.fmul(load_lanes(kb, out, index, n_lanes), factors[v]), out, index, n_lanes))


# ---------------------------------------------------------------------------- cross-entropy

def emit_softmax_cross_entropy(module: ir.Module, name: str, logits_shape: Sequence[int], *,
                               max_threads: int, width: int | None = None) -> Kernel:
    """out[0] = mean over rows i of logsumexp(logits[i]) - logits[i, labels[i]].

    in0 is the (N, C) float32 logits, in1 the (N,) int32 labels, already checked to lie in
    [0, C). Row losses go to `scratch` (N floats) and are summed in order by thread 0, so
    the result is the same for every thread count. Large batches take two phases (rows
    split between threads, then the mean); small ones one phase on thread 0.
    """
    n_rows, classes = logits_shape
    if max_threads == 1 or n_rows * classes < PARALLEL_LOSS_MIN:
        fn, kb = open_phase(module, name, 2, width)
        out, (logits, labels), scratch, tid, _ = phase_args(fn)
        only_thread_zero(kb, tid)
        _emit_losses(kb, scratch, logits, labels, kb.i64(0), kb.i64(1), n_rows, classes)
        _emit_mean(kb, out, scratch, n_rows)
        kb.b.ret_void()
        return Kernel([fn], scratch_floats=n_rows)

    rows_fn, kb = open_phase(module, f"{name}_row_losses", 2, width)
    _, (logits, labels), scratch, tid, nthreads = phase_args(rows_fn)
    _emit_losses(kb, scratch, logits, labels, tid, nthreads, n_rows, classes)
    kb.b.ret_void()

    mean_fn, kb = open_phase(module, f"{name}_mean", 2, width)
    out, _, scratch, tid, _ = phase_args(mean_fn)
    only_thread_zero(kb, tid)
    _emit_mean(kb, out, scratch, n_rows)
    kb.b.ret_void()
    return Kernel([rows_fn, mean_fn], scratch_floats=n_rows)


def _load_label(kb: KernelBuilder, labels: ir.Value, row: ir.Value) -> ir.Value:
    """labels[row] (int32) as an i64 index."""
    address = kb.b.gep(labels, [row], inbounds=True, source_etype=I32)
    return kb.b.sext(kb.b.load(address, typ=I32, align=4), I64)


def _emit_losses(kb: KernelBuilder, losses: ir.Value, logits: ir.Value, labels: ir.Value,
                 tid: ir.Value, nthreads: ir.Value, n_rows: int, classes: int) -> None:
    """Thread tid's share of losses[i] (see `_emit_row_losses`), by groups of rows in lanes
    when the rows are short enough."""
    if classes > MAX_ROW_IN_LANES:
        lo, hi = kb.split_range(n_rows, tid, nthreads)
        _emit_row_losses(kb, losses, logits, labels, lo, hi, classes)
        return
    def group_losses(rows: _RowGroup) -> None:
        picked = rows.pick(_load_labels(kb, labels, rows.first, rows.mask))
        loss = kb.b.fsub(vector_log(kb, rows.total), kb.b.fsub(picked, rows.maximum))
        kb.masked_store_vec(loss, losses, rows.first, rows.mask)

    _for_each_row_group(kb, logits, tid, nthreads, n_rows, classes, group_losses)


def _load_labels(kb: KernelBuilder, labels: ir.Value, first: ir.Value, mask: ir.Value) -> ir.Value:
    """labels[first + lane] (int32) for the lanes `mask` enables, 0 in the others."""
    int_vec = ir.VectorType(I32, kb.width)
    fn = declare_intrinsic(kb.module, f"llvm.masked.load.v{kb.width}i32.p0", int_vec,
                           [PTR, I32, kb.mask_type, int_vec])
    address = kb.b.gep(labels, [first], inbounds=True, source_etype=I32)
    return kb.b.call(fn, [address, ir.Constant(I32, 4), mask, ir.Constant(int_vec, [0] * kb.width)])


def _emit_row_losses(kb: KernelBuilder, losses: ir.Value, logits: ir.Value,
                     labels: ir.Value, lo: ir.Value, hi: ir.Value, classes: int) -> None:
    """losses[i] = log(sum(exp(row - max))) - (row[label] - max) for rows [lo, hi)."""
    with kb.for_range(lo, hi, name="row") as row:
        start = kb.mul(row, classes)
        maximum = _row_max(kb, logits, start, classes)
        total = _row_exp_sum(kb, logits, start, classes, maximum)
        picked = kb.load(logits, kb.add(start, _load_label(kb, labels, row)))
        loss = kb.b.fsub(_log(kb, total), kb.b.fsub(picked, maximum))
        kb.store(loss, losses, row)


def _emit_mean(kb: KernelBuilder, out: ir.Value, values: ir.Value, count: int) -> None:
    total = horizontal_sum(kb, span_sum(kb, values, kb.i64(0), count))
    kb.store(kb.b.fdiv(total, kb.f32(count)), out)


# ---------------------------------------------------------------------------- one-hot

def emit_one_hot(module: ir.Module, name: str, n: int, classes: int, *,
                 max_threads: int) -> Kernel:
    """out (n, classes) float32 = 1.0 at [i, labels[i]], else 0; in0 is int32 labels,
    already checked to lie in [0, classes). Threads split the rows: a memset, then the ones."""
    fn, kb = phase_function(module, name, 1)
    out, (labels,), _, tid, nthreads = phase_args(fn)
    lo, hi = kb.split_range(n, tid, nthreads)
    zero_floats(kb, out, kb.mul(lo, classes), kb.mul(kb.sub(hi, lo), classes))
    with kb.for_range(lo, hi, name="row") as row:
        kb.store(kb.f32(1.0), out, kb.add(kb.mul(row, classes), _load_label(kb, labels, row)))
    kb.b.ret_void()
    return Kernel([fn])


# ---- lowering --------------------------------------------------------------------------------

@lowers("softmax")
def lower_softmax(node, _epilogue) -> Step:
    return Step(node, [node.inputs[0]],
                lambda m, name, threads: emit_softmax(m, name, node.shape, node.attrs["axis"], max_threads=threads),
                "softmax", [node],
                flops=costs.softmax_flops(node.size, rows=node.size // node.shape[node.attrs["axis"]]))


# Class ids index the logits' rows: the runtime checks them before native code runs.
@lowers("softmax_cross_entropy",
        label_range=lambda node: (alias_root(node.inputs[1]), node.inputs[0].shape[1]))
def lower_softmax_cross_entropy(node, _epilogue) -> Step:
    logits = node.inputs[0]
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_softmax_cross_entropy(m, name, logits.shape, max_threads=threads),
                "softmax_cross_entropy", [node], flops=costs.softmax_cross_entropy_flops(*logits.shape))


@lowers("one_hot", label_range=lambda node: (alias_root(node.inputs[0]), node.attrs["classes"]))
def lower_one_hot(node, _epilogue) -> Step:
    return Step(node, [node.inputs[0]],
                lambda m, name, threads: emit_one_hot(m, name, node.shape[0], node.attrs["classes"],
                                                      max_threads=threads),
                "one_hot", [node], flops=0)
