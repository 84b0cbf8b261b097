"""The program's entry function: runs every step's kernel phases in order, on all threads.

    void graphc_entry(void **args, i64 tid, i64 nthreads)

All threads run the same sequence of calls; a barrier after each phase keeps every thread from
starting a phase before all have finished the one before (phases read what earlier ones wrote).

The calls are made in parts, `i1 graphc.entry.part<k>(args, tid, nthreads)`, of about
`CALLS_PER_PART` kernel calls each, which the entry calls in turn; a part returns true when
check_finite stopped the call. One function of a large program's thousands of calls was one
basic block whose register allocation and instruction selection took most of the LLVM time of
the module compiled last; in parts, the parts of a program split into modules go into modules
of their own, compiled while the rest of the entry is generated (bench/NOTES.md, "compile
time, second pass").
"""
from __future__ import annotations

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import I1, I64, PTR, KernelBuilder, i32_array

ENTRY_NAME = "graphc_entry"
PART_NAME = "graphc.entry.part{}"
# Kernel calls per part of the entry: enough that calling a part costs nothing next to its
# kernels, few enough that LLVM's time on a part stays small.
CALLS_PER_PART = 64
TICKS_NAME = "graphc_ticks"      # i64 graphc_ticks(void): the profiler's clock, for calibration
SPINS_BEFORE_YIELD = 2000
I8 = ir.IntType(8)


def emit_barrier(module: ir.Module) -> ir.Function:
    """`void barrier(i64 nthreads)`: a sense-by-generation spin barrier on two module globals.

    The last thread to arrive resets the count, then bumps the generation (release); the others
    spin until they see the generation change (acquire), so everything written before the
    barrier by any thread is visible after it to all.
    """
    existing = module.globals.get("graphc.barrier")
    if existing is not None:
        return existing
    count = ir.GlobalVariable(module, I64, "graphc.barrier.count")
    generation = ir.GlobalVariable(module, I64, "graphc.barrier.generation")
    for g in (count, generation):
        g.initializer = ir.Constant(I64, 0)
        g.linkage = "internal"
        g.align = 64
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64]), "graphc.barrier")
    fn.linkage = "internal"
    # Inlined after every phase, its spin loop made the entry one large function, slow to
    # compile in the last module, on the critical path; called, it compiles quickly
    # (one call per phase costs nanoseconds; a barrier among threads costs far more).
    fn.attributes.add("noinline")
    (nthreads,) = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    alone, together = fn.append_basic_block("alone"), fn.append_basic_block("together")
    b.cbranch(b.icmp_signed("<=", nthreads, ir.Constant(I64, 1)), alone, together)
    b.position_at_end(alone)
    b.ret_void()

    b.position_at_end(together)
    seen = b.load_atomic(generation, "acquire", 8, typ=I64)
    arrived = b.atomic_rmw("add", count, ir.Constant(I64, 1), "acq_rel")
    last, wait = fn.append_basic_block("last"), fn.append_basic_block("wait")
    b.cbranch(b.icmp_signed("==", arrived, b.sub(nthreads, ir.Constant(I64, 1))), last, wait)

    b.position_at_end(last)
    b.store_atomic(ir.Constant(I64, 0), count, "monotonic", 8)
    b.atomic_rmw("add", generation, ir.Constant(I64, 1), "release")
    b.ret_void()

    # Spin briefly (phases are short), then yield the core: on a loaded machine a pure spin
    # would starve the very thread it waits for.
    b.position_at_end(wait)
    spins = b.phi(I64, "spins")
    spins.add_incoming(ir.Constant(I64, 0), together)
    now = b.load_atomic(generation, "acquire", 8, typ=I64)
    done, again = fn.append_basic_block("done"), fn.append_basic_block("again")
    b.cbranch(b.icmp_signed("!=", now, seen), done, again)
    b.position_at_end(again)
    with b.if_then(b.icmp_unsigned(">=", spins, ir.Constant(I64, SPINS_BEFORE_YIELD))):
        b.call(_sched_yield(module), [])
    spins.add_incoming(b.add(spins, ir.Constant(I64, 1)), b.block)
    b.branch(wait)
    b.position_at_end(done)
    b.ret_void()
    return fn


def _sched_yield(module: ir.Module) -> ir.Function:
    existing = module.globals.get("sched_yield")
    return existing or ir.Function(module, ir.FunctionType(ir.IntType(32), []), "sched_yield")


class EntryBuilder:
    """Builds the entry: pointers to slots, arena offsets and constants, then the kernel calls.

    `begin_step()` before each step's pointers and calls: the calls go into the current part,
    or a new one. Before the first step, code goes into the entry itself (`refuse_out_of_range`,
    check_finite's saves); `b`, `tid` and `nthreads` are those of the function being built.
    """

    def __init__(self, module: ir.Module, slot_count: int, workspace_slot: int | None,
                 profile_slot: int | None = None, calls_slot: int | None = None, modules=None):
        """`module` receives the entry; `modules` (a ProgramModules), if given, places the
        parts (`part_module()`) and makes functions callable from other modules (`callee`)."""
        self.module = module
        self.modules = modules
        self.calls_slot = calls_slot
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]), ENTRY_NAME)
        self.fn = fn
        args, tid, nthreads = fn.args
        args.name, tid.name, nthreads.name = "args", "tid", "nthreads"
        self._entry = ir.IRBuilder(fn.append_basic_block("entry"))
        self._enter(self._entry, fn)
        self.slot_count = slot_count
        self.workspace_slot = workspace_slot
        self._pending_barrier = False
        self._loaded: dict[tuple, ir.Value] = {}   # this step's pointers, by location
        self._loaded_in: ir.Block | None = None
        self.parts: list[ir.Function] = []
        self._part_calls = 0
        # check_finite: the entry's block that undoes the call, where a part that stopped leads
        self.stop_block: ir.Block | None = None
        self._stop_of_part: ir.Block | None = None
        # Profiling: after each phase all threads meet, and thread 0 adds the ticks since the
        # previous phase ended to that phase's counter (an i64 per phase in the profile slot).
        self.profile_slot = profile_slot
        self.phase_count = 0
        self._last_tick = None

    def _enter(self, builder: ir.IRBuilder, fn: ir.Function) -> None:
        self.b = builder
        self._args, self.tid, self.nthreads = fn.args

    def begin_step(self) -> None:
        """Before a step's pointers: start a new part if there is none or the current is full."""
        if self.parts and self._part_calls < CALLS_PER_PART:
            return
        self._end_part()
        module = self.modules.part_module() if self.modules is not None else self.module
        part = ir.Function(module, ir.FunctionType(I1, [PTR, I64, I64]), PART_NAME.format(len(self.parts)))
        part.linkage = "internal" if module is self.module else "external"
        part.attributes.add("noinline")
        for value, name in zip(part.args, ("args", "tid", "nthreads")):
            value.name = name
        callee = part if module is self.module else self.modules.callee(part, self.module)
        stopped = self._entry.call(callee, list(self.fn.args))
        if self.stop_block is not None:
            go_on = self.fn.append_basic_block(f"after.part{len(self.parts)}")
            self._entry.cbranch(stopped, self.stop_block, go_on)
            self._entry.position_at_end(go_on)
        self.parts.append(part)
        self._part_calls = 0
        self._enter(ir.IRBuilder(part.append_basic_block("entry")), part)
        if self.profile_slot is not None:
            self._last_tick = _timestamp(self.b, self.b.module)

    def stop(self) -> ir.Block:
        """The block of the current part that returns "stopped" (check_finite)."""
        part = self.b.function
        if self._stop_of_part is None or self._stop_of_part.function is not part:
            self._stop_of_part = part.append_basic_block("stopped")
            ir.IRBuilder(self._stop_of_part).ret(ir.Constant(I1, 1))
        return self._stop_of_part

    def _end_part(self) -> None:
        if self.parts:
            self.b.ret(ir.Constant(I1, 0))
            self._enter(self._entry, self.fn)

    def slot(self, position: int) -> ir.Value:
        """The pointer in slot `position`, loaded here, where it is used. Loaded once at the
        start, every slot's pointer, and every arena offset made from the workspace's, stayed
        live across all the calls, and allocating registers for them was most of LLVM's work
        on a large program's entry, in the module compiled last (bench/NOTES.md, "compile
        time, where ResNet-20's cold compile goes")."""
        if not 0 <= position < self.slot_count:
            raise IndexError(f"slot {position} of {self.slot_count}")
        return self._reused(("slot", position), lambda: self.b.load(
            self.b.gep(self._args, [ir.Constant(I64, position)], source_etype=PTR), typ=PTR, name=f"slot{position}"))

    def pointer(self, location) -> ir.Value:
        kind, where = location
        if kind == "slot":
            return self.slot(where)
        if kind == "arena":
            return self._reused(location, lambda: self.b.gep(self.slot(self.workspace_slot), [ir.Constant(I64, where)],
                                                             source_etype=I8))
        if kind == "constant":     # (name, array): a read-only global of the module calling
            name, array = where
            existing = self.b.module.globals.get(name)
            return existing if existing is not None else emit_constant(self.b.module, name, array)
        raise ValueError(f"unknown location {location!r}")

    def _reused(self, location: tuple, make) -> ir.Value:
        """A pointer made once per kernel call: the operands of one call often share slots
        (the workspace above all), and each load and offset is IR that LLVM compiles."""
        if self._loaded_in is not self.b.block:
            self._loaded, self._loaded_in = {}, self.b.block
        value = self._loaded.get(location)
        if value is None:
            value = self._loaded[location] = make()
        return value

    def refuse_out_of_range(self, status_slot: int, checks) -> None:
        """Before any kernel: if an integer input holds a value outside its [lo, hi), write that
        input's slot position + 1 into the Status slot and return (every thread does the same,
        before any barrier). `checks`: (slot position, element count, integer bits, lo, hi).

        Class labels index arrays in the kernels that read them; checked here, a wrong label
        costs one pass over the labels instead of a numpy reduction per call in Python.
        """
        for position, count, bits, lo, hi in checks:
            int_type = ir.IntType(bits)
            labels = self.slot(position)
            bad = self.b.alloca(ir.IntType(1))
            self.b.store(ir.Constant(ir.IntType(1), 0), bad)
            loop = KernelBuilder(self.b)
            with loop.for_range(0, count, name=f"check{position}") as i:
                value = self.b.load(self.b.gep(labels, [i], source_etype=int_type), typ=int_type)
                # lo <= v < hi  <=>  (v - lo) < (hi - lo) as unsigned: one compare per label.
                outside = self.b.icmp_unsigned(">=", self.b.sub(value, ir.Constant(int_type, lo)),
                                               ir.Constant(int_type, hi - lo))
                self.b.store(self.b.or_(self.b.load(bad, typ=ir.IntType(1)), outside), bad)
            with self.b.if_then(self.b.load(bad, typ=ir.IntType(1)), likely=False):
                self.b.store(ir.Constant(I64, position + 1), self.slot(status_slot))
                self.b.ret_void()

    def call_phases(self, phases, out, inputs, scratch):
        null = ir.Constant(PTR, None)
        for phase in phases:
            if self._pending_barrier:
                self.b.call(emit_barrier(self.b.module), [self.nthreads])
            self.b.call(phase, [out, *inputs, scratch if scratch is not None else null, self.tid, self.nthreads])
            self._pending_barrier = True
            self._part_calls += 1
            if self.profile_slot is not None:
                self._count_phase_ticks()
            self.phase_count += 1
        self._loaded = {}

    def barrier_before_next_phase(self) -> None:
        """Make the next phase (or `settle`) wait for every thread to finish what came before."""
        self._pending_barrier = True

    def settle(self, force: bool = False) -> None:
        """A barrier now if one is due (or, with `force`, anyway): what every thread wrote
        before it is visible to all after it."""
        if self._pending_barrier or force:
            self.b.call(emit_barrier(self.b.module), [self.nthreads])
        self._pending_barrier = False

    def _count_phase_ticks(self):
        self.b.call(emit_barrier(self.b.module), [self.nthreads])
        self._pending_barrier = False
        now = _timestamp(self.b, self.b.module)
        with self.b.if_then(self.b.icmp_signed("==", self.tid, ir.Constant(I64, 0))):
            counter = self.b.gep(self.slot(self.profile_slot), [ir.Constant(I64, self.phase_count)], source_etype=I64)
            elapsed = self.b.sub(now, self._last_tick)
            self.b.store(self.b.add(self.b.load(counter, typ=I64), elapsed), counter)
        self._last_tick = now

    def finish(self) -> ir.Function:
        self._end_part()
        if self.calls_slot is not None:
            # Thread 0 counts the call once all its kernels ran; a call refused before any
            # kernel (refuse_out_of_range) returns earlier and is not counted.
            with self.b.if_then(self.b.icmp_signed("==", self.tid, ir.Constant(I64, 0))):
                counter = self.slot(self.calls_slot)
                self.b.store(self.b.add(self.b.load(counter, typ=I64), ir.Constant(I64, 1)), counter)
        self.b.ret_void()
        return self.fn


def emit_ticks_function(module: ir.Module) -> ir.Function:
    fn = ir.Function(module, ir.FunctionType(I64, []), TICKS_NAME)
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    b.ret(_timestamp(b, module))
    return fn


def _timestamp(b: ir.IRBuilder, module: ir.Module) -> ir.Value:
    """A monotonic tick count: the time-stamp counter on x86, clock_gettime(CLOCK_MONOTONIC) in ns
    elsewhere (reading the cycle counter from user space traps on some ARM systems)."""
    if module.triple.startswith(("x86_64", "i686", "i386")):
        fn = module.globals.get("llvm.readcyclecounter") or ir.Function(
            module, ir.FunctionType(I64, []), "llvm.readcyclecounter")
        return b.call(fn, [])
    fn = module.globals.get("clock_gettime") or ir.Function(
        module, ir.FunctionType(ir.IntType(32), [ir.IntType(32), PTR]), "clock_gettime")
    timespec = b.alloca(ir.ArrayType(I64, 2))
    b.call(fn, [ir.Constant(ir.IntType(32), 1), timespec])
    seconds = b.load(b.gep(timespec, [ir.Constant(I64, 0), ir.Constant(I64, 0)]), typ=I64)
    nanoseconds = b.load(b.gep(timespec, [ir.Constant(I64, 0), ir.Constant(I64, 1)]), typ=I64)
    return b.add(b.mul(seconds, ir.Constant(I64, 1_000_000_000)), nanoseconds)


def emit_constant(module: ir.Module, name: str, array) -> ir.GlobalVariable:
    """A read-only global holding `array` (float32 or int32), 64-byte aligned."""
    flat = array.reshape(-1)
    if array.dtype.kind == "f":
        initializer = ir.Constant(ir.ArrayType(ir.FloatType(), flat.size), [float(v) for v in flat])
    else:
        initializer = i32_array(flat)
    gv = ir.GlobalVariable(module, initializer.type, name)
    gv.global_constant = True
    gv.linkage = "internal"
    gv.align = 64
    gv.initializer = initializer
    return gv
