"""check_finite's native side: the entry scans each kernel's results and stops at the first
NaN or infinity, leaving the memory the call updates in place as it was before the call.

Two helpers, in the entry's module and its parts', each doing thread `tid`'s share of one buffer:

    i1   graphc.finite.scan(ptr data, i64 count, i64 tid, i64 nthreads)   a NaN or inf among the floats?
    void graphc.finite.copy(ptr dst, ptr src, i64 nbytes, i64 tid, i64 nthreads)

`FiniteGuard` calls them from the entry:

- `save`, before the first kernel: every buffer the program overwrites in place (params,
  batch norm's running statistics, optimizer state) is copied into the workspace;
- `check`, after a step: each thread scans its share of the step's results; one that finds a
  NaN or infinity writes the check's code into the Status slot by an atomic min, so the
  earliest check of the step wins whichever thread saw it. After a barrier every thread reads
  the slot, and all of them leave for the stop block together or go on together;
- the stop block copies the saved buffers back and returns without counting the call.

Status codes are `check_index - check_count`: negative, and smaller for earlier checks.
"""
from __future__ import annotations

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import I1, I32, I64, PTR, KernelBuilder, shared_constant

SCAN_NAME = "graphc.finite.scan"
COPY_NAME = "graphc.finite.copy"
I8 = ir.IntType(8)
# float32 bits without the sign at or above this are an infinity (exactly) or a NaN
NON_FINITE_BITS = 0x7F800000
MAGNITUDE_BITS = 0x7FFFFFFF


def status_code(check_index: int, check_count: int) -> int:
    """The Status value of a failed check (what `check_index_of` reads back)."""
    return check_index - check_count


def check_index_of(status: int, check_count: int) -> int:
    return status + check_count


def emit_scan(module: ir.Module) -> ir.Function:
    """`i1 scan(data, count, tid, nthreads)`: whether thread tid's share of the `count` floats
    at `data` holds a NaN or an infinity.

    An exponent-bits test in integer lanes: the largest magnitude (bits without the sign) of
    the share is at least 0x7f800000 exactly when one value is inf or NaN. One vector max per
    vector of floats, a masked load for the partial last one.
    """
    existing = module.globals.get(SCAN_NAME)
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(I1, [PTR, I64, I64, I64]), SCAN_NAME)
    _keep_called(fn)
    data, count, tid, nthreads = fn.args
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))
    b = kb.b
    lanes = ir.VectorType(I32, kb.width)
    magnitude = shared_constant(lanes, (MAGNITUDE_BITS,) * kb.width)
    umax = _intrinsic(module, f"llvm.umax.v{kb.width}i32", lanes, [lanes, lanes])

    def largest_with(acc, floats):
        return b.call(umax, [acc, b.and_(b.bitcast(floats, lanes), magnitude)])

    lo, hi = kb.split_range(count, tid, nthreads)
    full_end = kb.add(lo, kb.mul(b.sdiv(kb.sub(hi, lo), kb.i64(kb.width)), kb.width))
    largest = kb.variable(shared_constant(lanes, (0,) * kb.width))
    with kb.for_range(lo, full_end, step=kb.width, name="scan") as i:
        kb.set(largest, largest_with(kb.get(largest), kb.load_vec(data, i)))
    # the partial last vector: masked-off lanes read as 0.0, which is finite
    tail = kb.masked_load_vec(data, full_end, kb.lane_mask_dynamic(kb.sub(hi, full_end)))
    lanes_max = largest_with(kb.get(largest), tail)
    reduce = _intrinsic(module, f"llvm.vector.reduce.umax.v{kb.width}i32", I32, [lanes])
    b.ret(b.icmp_unsigned(">=", b.call(reduce, [lanes_max]), ir.Constant(I32, NON_FINITE_BITS)))
    return fn


def emit_copy(module: ir.Module) -> ir.Function:
    """`void copy(dst, src, nbytes, tid, nthreads)`: thread tid's share of a memcpy."""
    existing = module.globals.get(COPY_NAME)
    if existing is not None:
        return existing
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, PTR, I64, I64, I64]), COPY_NAME)
    _keep_called(fn)
    dst, src, nbytes, tid, nthreads = fn.args
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))
    b = kb.b
    lo, hi = kb.split_range(nbytes, tid, nthreads)
    memcpy = _intrinsic(module, "llvm.memcpy.p0.p0.i64", ir.VoidType(), [PTR, PTR, I64, I1])
    b.call(memcpy, [b.gep(dst, [lo], source_etype=I8), b.gep(src, [lo], source_etype=I8), kb.sub(hi, lo),
                    ir.Constant(I1, 0)])
    b.ret_void()
    return fn


class FiniteGuard:
    """check_finite's part of an entry (see the module's docstring); `entry` an EntryBuilder,
    `check_count` the number of `check` buffers the whole program scans."""

    def __init__(self, entry, status_slot: int, check_count: int):
        self.entry = entry
        self.status_slot = status_slot
        self.check_count = check_count
        self.checks_emitted = 0
        self.copy = emit_copy(entry.module)       # the saves and the stop block are the entry's
        entry.stop_block = entry.fn.append_basic_block("stopped")
        self.saved: list[tuple[ir.Value, ir.Value, int]] = []

    def save(self, buffers: list[tuple[ir.Value, ir.Value, int]]) -> None:
        """Copy each (buffer, backup, nbytes) into its backup; the first kernel waits for all threads."""
        entry = self.entry
        for buffer, backup, nbytes in buffers:
            entry.b.call(self.copy, [backup, buffer, ir.Constant(I64, nbytes), entry.tid, entry.nthreads])
        self.saved = list(buffers)
        if buffers:
            entry.barrier_before_next_phase()

    def check(self, buffers: list[tuple[ir.Value, int]]) -> None:
        """After a step: scan each (pointer, float count) the step wrote; stop if one holds a
        NaN or infinity. The buffers are the next `len(buffers)` checks, in order."""
        entry, b = self.entry, self.entry.b
        entry.settle()   # every thread's share of the step is written
        status_slot = entry.slot(self.status_slot)
        for pointer, count in buffers:
            bad = b.call(emit_scan(b.module), [pointer, ir.Constant(I64, count), entry.tid, entry.nthreads])
            with b.if_then(bad, likely=False):
                code = status_code(self.checks_emitted, self.check_count)
                b.atomic_rmw("min", status_slot, ir.Constant(I64, code), "monotonic")
            self.checks_emitted += 1
        entry.settle(force=True)   # every thread's verdict is in the Status slot
        status = b.load_atomic(status_slot, "monotonic", 8, typ=I64)
        go_on = b.function.append_basic_block("finite")
        b.cbranch(b.icmp_signed("<", status, ir.Constant(I64, 0)), entry.stop(), go_on)
        b.position_at_end(go_on)

    def finish(self) -> None:
        """The stop block: each thread puts back its share of the saved buffers and returns.
        After `entry.finish()`: the block is the entry's, not a part's."""
        if self.checks_emitted != self.check_count:
            raise RuntimeError(f"internal error: {self.checks_emitted} finite checks emitted, {self.check_count} planned")
        b = ir.IRBuilder(self.entry.stop_block)
        for buffer, backup, nbytes in self.saved:
            b.call(self.copy, [buffer, backup, ir.Constant(I64, nbytes), self.entry.tid, self.entry.nthreads])
        b.ret_void()


def _keep_called(fn: ir.Function) -> None:
    # Called after every step: inlined, each call would grow the entry (see emit_barrier).
    fn.linkage = "internal"
    fn.attributes.add("noinline")


def _intrinsic(module: ir.Module, name: str, return_type: ir.Type, arg_types: list[ir.Type]) -> ir.Function:
    existing = module.globals.get(name)
    return existing if existing is not None else ir.Function(module, ir.FunctionType(return_type, arg_types), name)
