"""Kernels of the collective ops (graphc/core/ops/collective.py): the gradients of a
data-parallel step summed over the ranks by MPI, called from the step's own native code.

MPI is reached through the communicator slot, int64 words that the step's binder writes
(graphc/distributed/comm.py), never through symbols: the addresses of MPI_Iallreduce,
MPI_Wait, MPI_Test and MPI_Abort, the communicator, datatype and op handles, MPI_IN_PLACE,
1/ranks, then one MPI_Request per bucket. Thread 0 alone calls MPI (the thread that calls the
step); the other threads return from those phases at once and meet it at the next barrier.

- allreduce_start: every thread copies its share of the values into the bucket; then thread 0
  starts MPI_Iallreduce on the bucket, in place. A bucket of one value that nothing else reads
  is that value's own buffer, summed without a copy (`sums_in_place`).
- allreduce_progress: thread 0 calls MPI_Test on the buckets under way, up to the first one
  still unfinished (MPI advances a nonblocking collective only inside its calls), between
  backward kernels.
- allreduce_done: thread 0 waits for the bucket (and tests the later ones); then every thread
  writes its slice times 1/ranks, with the consumer fused in (the optimizer's update).

On one node, with `shared` ranks, each bucket lives in memory the ranks share (a State of its
own, bound to an MPI shared-memory window by distributed/shared_window.py), and MPI only
synchronizes:

- allreduce_start: every thread copies its share of the values into the bucket (nothing for
  a bucket of one value whose kernel the assembler had write it there); then thread 0
  starts MPI_Ibarrier into request `bucket`: this rank's bucket is written.
- allreduce_done: thread 0 waits for that barrier; then every thread writes its slice of the
  ranks' buckets summed (in one order on every rank), times 1/ranks, with the consumer fused
  in. Rank q's bucket is at its base (a slot word) plus the bucket's offset in the window;
  a live slot whose own bucket is not there (a compiler bug) aborts the job. A slot that is
  not live (one process, a profiling twin) reads its own bucket alone.
- allreduce_finish: thread 0 waits at a barrier (MPI_Ibarrier, MPI_Wait): every rank has read
  every bucket, so none's next call overwrites one another still reads.

The slot is this process's only if its first word names this process: a slot of zeros (a
profiling twin of the program) or one written by another process (a step saved and loaded
elsewhere) is no communicator, and the kernels then run as one process would: no MPI call,
and each value is its own average.
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import llvmlite.ir as ir
import sympy

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import F32, I32, I64, PTR, KernelBuilder
from graphc.backend.kernels.elementwise import emit_elementwise
from graphc.backend.kernels.layout import emit_concat, only_thread_zero
from graphc.backend.lowering_rules import ALIASES, Epilogue, Step, lowers
from graphc.core.scalar import symbol

__all__ = ["MpiAbi", "SlotWord", "REQUESTS", "slot_words"]


class SlotWord:
    """Positions of the communicator slot's int64 words."""

    OWNER = 0          # the process whose addresses and handles these are: its id ^ &getpid
    LIVE = 1           # 1 while a call runs in that process (written by every start)
    IALLREDUCE = 2
    WAIT = 3
    TEST = 4
    ABORT = 5
    COMM = 6
    DATATYPE = 7       # MPI_FLOAT
    OP = 8             # MPI_SUM
    IN_PLACE = 9
    SCALE = 10         # float32 1/ranks in the low four bytes
    IBARRIER = 11
    RANK = 12          # this process's rank
    BASES_AT = 13      # where the ranks' bases in shared memory start (0: none)
    FINISHED = 14      # the request of a shared-memory step's last barrier


REQUESTS = 15          # then one word per bucket, holding its MPI_Request; then each rank's base


def slot_words(buckets: int, shared: int = 0) -> int:
    """The slot's length in int64 words for a program of at most `buckets` buckets, summed in
    the shared memory of `shared` ranks (0: by MPI)."""
    return REQUESTS + buckets + shared


@dataclasses.dataclass(frozen=True)
class MpiAbi:
    """What the generated calls assume of the MPI library: the sizes in bytes of its handles
    (4 for MPICH's ints, 8 for Open MPI's pointers), of MPI_Request and of MPI_Status. Part
    of a program's cache key."""

    comm_bytes: int
    datatype_bytes: int
    op_bytes: int
    request_bytes: int
    status_bytes: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "status_bytes" and value not in (4, 8):
                raise ValueError(f"MPI {field.name} of {value} bytes: graphc calls MPI with 4- or 8-byte handles")
        if not 0 < self.status_bytes <= 256:
            raise ValueError(f"MPI_Status of {self.status_bytes} bytes")


class _FunctionPointer:
    """A function's address loaded from memory, callable with `IRBuilder.call` as a function of
    `function_type` (llvmlite's call asks its callee only for these two things)."""

    def __init__(self, pointer: ir.Value, function_type: ir.FunctionType):
        self.pointer, self.function_type, self.type = pointer, function_type, pointer.type

    def get_reference(self) -> str:
        return self.pointer.get_reference()


class _Mpi:
    """Calls into MPI from thread 0 of a phase, through the communicator slot `words`."""

    def __init__(self, kb: KernelBuilder, words: ir.Value, abi: MpiAbi):
        self.kb, self.b, self.words, self.abi = kb, kb.b, words, abi

    def word_address(self, index: int) -> ir.Value:
        return self.b.gep(self.words, [ir.Constant(I64, index)], inbounds=True, source_etype=I64)

    def word(self, index: int) -> ir.Value:
        return self.b.load(self.word_address(index), typ=I64, align=8)

    def handle(self, index: int, nbytes: int) -> ir.Value:
        value = self.word(index)
        return self.b.trunc(value, I32) if nbytes == 4 else value

    def function(self, index: int, return_type, argument_types) -> _FunctionPointer:
        pointer = self.b.inttoptr(self.word(index), PTR)
        return _FunctionPointer(pointer, ir.FunctionType(return_type, argument_types))

    def live(self) -> ir.Value:
        return self.b.icmp_signed("!=", self.word(SlotWord.LIVE), ir.Constant(I64, 0))

    def mark_live(self) -> ir.Value:
        """LIVE := (OWNER == this process's id ^ &getpid); returns it as an i1. The address,
        which differs between processes, tells apart two that had the same id (the first
        process of two containers), the id two that share the address (a fork)."""
        getpid = self.b.module.globals.get("getpid") or ir.Function(self.b.module, ir.FunctionType(I32, []), "getpid")
        pid = self.b.sext(self.b.call(getpid, []), I64)
        owner = self.b.xor(pid, self.b.ptrtoint(getpid, I64))
        live = self.b.icmp_signed("==", self.word(SlotWord.OWNER), owner)
        self.b.store(self.b.zext(live, I64), self.word_address(SlotWord.LIVE), align=8)
        return live

    def _types(self):
        a = self.abi
        return ir.IntType(8 * a.comm_bytes), ir.IntType(8 * a.datatype_bytes), ir.IntType(8 * a.op_bytes)

    def _checked(self, code: ir.Value) -> None:
        """An MPI error inside a step leaves every rank's step half done: abort the job, as
        MPI's default error handler would, rather than let the other ranks wait forever."""
        comm_type, _, _ = self._types()
        with self.b.if_then(self.b.icmp_signed("!=", code, ir.Constant(I32, 0)), likely=False):
            abort = self.function(SlotWord.ABORT, I32, [comm_type, I32])
            self.b.call(abort, [self.handle(SlotWord.COMM, self.abi.comm_bytes), code])

    def request(self, bucket: int) -> ir.Value:
        return self.word_address(REQUESTS + bucket)

    def abort(self) -> None:
        """MPI_Abort: the step cannot go on on this rank, nor the others without it."""
        comm_type, _, _ = self._types()
        self.b.call(self.function(SlotWord.ABORT, I32, [comm_type, I32]),
                    [self.handle(SlotWord.COMM, self.abi.comm_bytes), ir.Constant(I32, 1)])

    def start_barrier(self, request: ir.Value) -> None:
        """MPI_Ibarrier into `request`, after every store of this thread (and of the threads
        that met it at the phase's barrier) is visible to the other ranks."""
        comm_type, _, _ = self._types()
        self.b.fence("seq_cst")
        ibarrier = self.function(SlotWord.IBARRIER, I32, [comm_type, PTR])
        self._checked(self.b.call(ibarrier, [self.handle(SlotWord.COMM, self.abi.comm_bytes), request]))

    def wait_request(self, request: ir.Value) -> None:
        wait = self.function(SlotWord.WAIT, I32, [PTR, PTR])
        self._checked(self.b.call(wait, [request, self._status()]))
        self.b.fence("seq_cst")

    def base(self, rank) -> ir.Value:
        """Rank `rank`'s base in the shared memory, as an i64 (`rank` an i64 value)."""
        at = self.b.add(self.word(SlotWord.BASES_AT), rank)
        return self.b.load(self.b.gep(self.words, [at], inbounds=True, source_etype=I64), typ=I64, align=8)

    def start_sum(self, buffer: ir.Value, count: int, bucket: int) -> None:
        comm_type, datatype_type, op_type = self._types()
        iallreduce = self.function(SlotWord.IALLREDUCE, I32,
                                   [PTR, PTR, I32, datatype_type, op_type, comm_type, PTR])
        in_place = self.b.inttoptr(self.word(SlotWord.IN_PLACE), PTR)
        self._checked(self.b.call(iallreduce, [
            in_place, buffer, ir.Constant(I32, count), self.handle(SlotWord.DATATYPE, self.abi.datatype_bytes),
            self.handle(SlotWord.OP, self.abi.op_bytes), self.handle(SlotWord.COMM, self.abi.comm_bytes),
            self.request(bucket)]))

    def _status(self) -> ir.Value:
        with self.b.goto_entry_block():
            return self.b.alloca(ir.ArrayType(I64, -(-self.abi.status_bytes // 8)))

    def wait(self, bucket: int) -> None:
        self.wait_request(self.request(bucket))

    def test(self, buckets) -> None:
        """MPI_Test the buckets' requests in order, up to the first one still under way: a test
        of it drives MPI's progress engine, which moves every pending operation on (a request
        completed before is MPI_REQUEST_NULL by now, and tests at once)."""
        if not buckets:
            return
        test = self.function(SlotWord.TEST, I32, [PTR, PTR, PTR])
        status = self._status()
        with self.b.goto_entry_block():
            flag = self.b.alloca(I32)
        done = self.b.append_basic_block("tested")
        for bucket in buckets:
            self._checked(self.b.call(test, [self.request(bucket), flag, status]))
            complete = self.b.icmp_signed("!=", self.b.load(flag, typ=I32), ir.Constant(I32, 0))
            following = self.b.append_basic_block(f"test{bucket}")
            self.b.cbranch(complete, following, done)
            self.b.position_at_end(following)
        self.b.branch(done)
        self.b.position_at_end(done)


def _mpi_phase(module: ir.Module, name: str, n_inputs: int, words_index: int, abi: MpiAbi, body,
               mark_live: bool = False, token: bool = False) -> ir.Function:
    """A phase that runs `body(mpi)` on thread 0, when the slot is live (or marks it so first).
    `token`: its out is an int32 token, written 0."""
    fn, kb = phase_function(module, name, n_inputs)
    out, inputs, _, tid, _ = phase_args(fn)
    only_thread_zero(kb, tid)
    if token:
        kb.b.store(ir.Constant(I32, 0), out)
    mpi = _Mpi(kb, inputs[words_index], abi)
    live = mpi.mark_live() if mark_live else mpi.live()
    with kb.b.if_then(live):
        body(mpi)
    kb.b.ret_void()
    return fn


def emit_allreduce_start(module: ir.Module, name: str, shapes, bucket: int, abi: MpiAbi, *,
                         max_threads: int) -> Kernel:
    """(out, value_0..value_{k-1}, words): out = the values flattened one after the other, then
    MPI_Iallreduce(MPI_IN_PLACE, out, SUM) into request `bucket`."""
    sizes = [math.prod(shape) for shape in shapes]
    concat = emit_concat(module, f"{name}.gather", [(size,) for size in sizes], 0, max_threads=max_threads)
    gather, kb = phase_function(module, f"{name}.copy", len(shapes) + 1)
    out, inputs, scratch, tid, nthreads = phase_args(gather)
    kb.b.call(concat.phases[0], [out, *inputs[:-1], scratch, tid, nthreads])
    kb.b.ret_void()

    def start(mpi: _Mpi) -> None:
        mpi.start_sum(mpi.b.function.args[0], sum(sizes), bucket)
    return Kernel([gather, _mpi_phase(module, f"{name}.start", len(shapes) + 1, len(shapes), abi, start,
                                      mark_live=True)])


def emit_allreduce_in_place(module: ir.Module, name: str, size: int, bucket: int, abi: MpiAbi, *,
                            max_threads: int) -> Kernel:
    """(out, value, words): MPI_Iallreduce(MPI_IN_PLACE, value, SUM) into request `bucket`; the
    value's own buffer holds the bucket (out is not written: see `sums_in_place`)."""
    def start(mpi: _Mpi) -> None:
        mpi.start_sum(mpi.b.function.args[1], size, bucket)
    return Kernel([_mpi_phase(module, name, 2, 1, abi, start, mark_live=True)])


def emit_shared_start(module: ir.Module, name: str, shapes, bucket: int, abi: MpiAbi, *,
                      max_threads: int) -> Kernel:
    """(out, value_0..value_{k-1}, words): out (the rank's bucket in shared memory) = the
    values flattened one after the other, a lone value copied only if it is elsewhere; then
    MPI_Ibarrier into request `bucket`."""
    sizes = [math.prod(shape) for shape in shapes]
    concat = emit_concat(module, f"{name}.gather", [(size,) for size in sizes], 0, max_threads=max_threads)
    gather, kb = phase_function(module, f"{name}.copy", len(shapes) + 1)
    out, inputs, scratch, tid, nthreads = phase_args(gather)
    elsewhere = kb.b.icmp_unsigned("!=", kb.b.ptrtoint(inputs[0], I64), kb.b.ptrtoint(out, I64))
    with kb.b.if_then(elsewhere if len(shapes) == 1 else ir.Constant(ir.IntType(1), 1)):
        kb.b.call(concat.phases[0], [out, *inputs[:-1], scratch, tid, nthreads])
    kb.b.ret_void()
    start = _mpi_phase(module, f"{name}.start", len(shapes) + 1, len(shapes), abi,
                       lambda mpi: mpi.start_barrier(mpi.request(bucket)), mark_live=True)
    return Kernel([gather, start])


def emit_allreduce_finish(module: ir.Module, name: str, n_inputs: int, abi: MpiAbi, *, max_threads: int) -> Kernel:
    """(out, words, results...): a barrier of the ranks."""
    def barrier(mpi: _Mpi) -> None:
        request = mpi.word_address(SlotWord.FINISHED)
        mpi.start_barrier(request)
        mpi.wait_request(request)
    return Kernel([_mpi_phase(module, name, n_inputs, 0, abi, barrier, token=True)])


def emit_allreduce_progress(module: ir.Module, name: str, buckets: tuple[int, ...], abi: MpiAbi, *,
                            max_threads: int) -> Kernel:
    """(out, after, words): MPI_Test on `buckets`, up to the first one still under way."""
    return Kernel([_mpi_phase(module, name, 2, 1, abi, lambda mpi: mpi.test(buckets))])


def emit_allreduce_done(module: ir.Module, name: str, shape, offset: int, bucket: int, later: tuple[int, ...],
                        n_after: int, abi: MpiAbi, *, max_threads: int, epilogue=None,
                        epilogue_shapes=(), side_stores=(), shared: int = 0, window_offset: int = 0) -> Kernel:
    """(out, bucket, words, after..., epilogue operands...): wait for request `bucket` (and
    test `later`, the buckets still under way); then out = e(bucket[offset:] * scale, epilogue
    operands...) elementwise, e the fused consumer (x0 alone without one), and each side store
    into its operand. `scale` is 1/ranks, or 1 when the slot is not live. With `shared` ranks,
    bucket[offset:] is the sum of every rank's, in one order on every rank (see the module's doc)."""
    n_inputs = 2 + n_after + len(epilogue_shapes)

    def wait(mpi: _Mpi) -> None:
        mpi.wait(bucket)
        mpi.test(later)
    waiting = _mpi_phase(module, f"{name}.wait", n_inputs, 1, abi, wait)

    consumer = epilogue if epilogue is not None else symbol(0)
    shape, epilogue_shapes = tuple(shape) or (1,), [tuple(s) or (1,) for s in epilogue_shapes]   # a scalar loss: ()
    apply = _averaging(module, f"{name}.apply", shape, epilogue_shapes, consumer, side_stores, 1, max_threads)

    compute, kb = phase_function(module, f"{name}.average", n_inputs)
    out, inputs, scratch, tid, nthreads = phase_args(compute)
    values, words, extras = inputs[0], inputs[1], inputs[2 + n_after:]
    mpi = _Mpi(kb, words, abi)
    live = mpi.live()
    scale_pointer = kb.b.select(live, mpi.word_address(SlotWord.SCALE), _one(module))
    if shared:
        # Every rank's bucket, if this one is where the window says; a live slot whose bucket
        # is elsewhere aborts, a slot that is not live reads its own bucket alone.
        own = kb.b.ptrtoint(values, I64)
        in_window = kb.b.and_(live, kb.b.icmp_signed("==", own, kb.b.add(
            kb.b.select(live, mpi.base(mpi.word(SlotWord.RANK)), ir.Constant(I64, 0)),
            ir.Constant(I64, window_offset))))
        summed = _averaging(module, f"{name}.sum", shape, epilogue_shapes, consumer, side_stores, shared,
                            max_threads)
        with kb.b.if_else(in_window) as (sum_ranks, own_only):
            with sum_ranks:
                peers = [kb.gep(kb.b.inttoptr(kb.b.add(mpi.base(ir.Constant(I64, q)), ir.Constant(I64, window_offset)),
                                              PTR), offset) for q in range(shared)]
                kb.b.call(summed.phases[0], [out, *peers, *extras, scale_pointer, scratch, tid, nthreads])
            with own_only:
                with kb.b.if_then(live, likely=False):
                    mpi.abort()
                kb.b.call(apply.phases[0], [out, kb.gep(values, offset), *extras, scale_pointer, scratch, tid,
                                            nthreads])
    else:
        kb.b.call(apply.phases[0], [out, kb.gep(values, offset), *extras, scale_pointer, scratch, tid, nthreads])
    kb.b.ret_void()
    return Kernel([waiting, compute])


def _averaging(module: ir.Module, name: str, shape, epilogue_shapes, consumer, side_stores, ranks: int,
               max_threads: int) -> Kernel:
    """out = consumer((y_0 + ... + y_{ranks-1}) * scale, epilogue operands...) elementwise, with
    its side stores: operands y_0.., the epilogue's, then the scale. `consumer` and the side
    stores are over x0 (the bucket's values), x1.. (the epilogue's operands)."""
    extra = len(epilogue_shapes)
    summed = sympy.Add(*(symbol(q) for q in range(ranks)))
    renamed = {symbol(0): summed * symbol(ranks + extra)}
    renamed.update({symbol(k): symbol(k + ranks - 1) for k in range(1, extra + 1)})
    expr = consumer.xreplace(renamed)
    stores = tuple((k + ranks - 1, e.xreplace(renamed)) for k, e in side_stores)
    return emit_elementwise(module, name, shape, [shape] * ranks + [*epilogue_shapes, (1,)], expr,
                            max_threads=max_threads, side_stores=stores)


def _one(module: ir.Module) -> ir.GlobalVariable:
    """1.0f: the scale of a program run without a communicator."""
    existing = module.globals.get("graphc.collective.one")
    if existing is not None:
        return existing
    one = ir.GlobalVariable(module, F32, "graphc.collective.one")
    one.initializer, one.global_constant, one.linkage = ir.Constant(F32, 1.0), True, "internal"
    return one


# ---- lowering --------------------------------------------------------------------------------

def _abi(node) -> MpiAbi:
    return MpiAbi(*node.attrs["abi"])


def sums_in_place(start) -> bool:
    """Whether an MPI start sums its bucket in its one value's own buffer rather than a copy:
    when that buffer is a kernel's result (not a source's, nor a constant) that nothing else
    reads. (A shared-memory start's bucket is its State: the assembler may have the value's
    kernel write there instead, `Step.forwards_operand`.)
    Then the bucket is that buffer (lowering_rules.ALIASES), kept until the last done reads it.

    The values of buckets are never a program's outputs (graphc/distributed/buckets.py
    averages them; the averages are the outputs), so their buffers are the arena's."""
    if len(start.inputs) != 2 or start.attrs.get("shared"):
        return False
    chain = [start.inputs[0]]
    while chain[-1].op == "reshape":
        chain.append(chain[-1].inputs[0])
    if chain[-1].op in ("input", "param", "constant"):
        return False
    readers = _readers(start.graph)
    allowed = {node.id for node in chain} | {start.id}
    return all(reader.id in allowed for node in chain for reader in readers.get(node.id, ()))


_readers_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _readers(graph) -> dict[int, list]:
    """node id -> the nodes that read it, made once per graph (and again if nodes were added)."""
    known = _readers_of.get(graph)
    if known is None or known[0] != len(graph.nodes):
        readers: dict[int, list] = {}
        for node in graph.nodes:
            for operand in node.inputs:
                readers.setdefault(operand.id, []).append(node)
        known = _readers_of[graph] = (len(graph.nodes), readers)
    return known[1]


ALIASES["allreduce_start"] = sums_in_place


@lowers("allreduce_start")
def lower_allreduce_start(node, _epilogue) -> Step:
    shapes, bucket, abi = [value.shape for value in node.inputs[:-1]], node.attrs["bucket"], _abi(node)
    if node.attrs.get("shared"):
        return Step(node, list(node.inputs),
                    lambda m, name, threads: emit_shared_start(m, name, shapes, bucket, abi, max_threads=threads),
                    "allreduce_start", [node], flops=0, forwards_operand=0 if len(shapes) == 1 else None)
    if sums_in_place(node):
        return Step(node, list(node.inputs),
                    lambda m, name, threads: emit_allreduce_in_place(m, name, node.size, bucket, abi,
                                                                     max_threads=threads),
                    "allreduce_start", [node], flops=0)
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_allreduce_start(m, name, shapes, bucket, abi, max_threads=threads),
                "allreduce_start", [node], flops=0)


@lowers("allreduce_progress")
def lower_allreduce_progress(node, _epilogue) -> Step:
    buckets, abi = node.attrs["buckets"], _abi(node)
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_allreduce_progress(m, name, buckets, abi, max_threads=threads),
                "allreduce_progress", [node], flops=0)


@lowers("allreduce_finish")
def lower_allreduce_finish(node, _epilogue) -> Step:
    n_inputs, abi = len(node.inputs), _abi(node)
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_allreduce_finish(m, name, n_inputs, abi, max_threads=threads),
                "allreduce_finish", [node], flops=0)


@lowers("allreduce_done", elementwise_epilogue=True, scalar_epilogue_operands=True)
def lower_allreduce_done(node, epilogue: Epilogue | None) -> Step:
    bucket_values, comm, *after = node.inputs
    a, abi = node.attrs, _abi(node)
    epilogue = epilogue or Epilogue(node)
    extras = list(epilogue.operands)
    fused = dict(epilogue=epilogue.expr, epilogue_shapes=[t.shape for t in extras], side_stores=epilogue.side_stores,
                 shared=a.get("shared", 0), window_offset=a.get("window_offset", 0))
    label = "allreduce_done" + ("+ew" if epilogue.expr is not None else "") + (
        f"+{len(epilogue.side_stores)} in place" if epilogue.side_stores else "")
    covers = [node] + list(epilogue.absorbed) + ([epilogue.node] if epilogue.node is not node else [])
    expr = epilogue.expr if epilogue.expr is not None else symbol(0)
    flops = node.size + costs.elementwise_flops(node.size, [expr] + [e for _, e in epilogue.side_stores])
    return Step(epilogue.node, [bucket_values, comm, *after, *extras],
                lambda m, name, threads: emit_allreduce_done(
                    m, name, node.shape, a["offset"], a["bucket"], a["later"], len(after), abi,
                    max_threads=threads, **fused),
                label, covers, flops=flops,
                side_writes=[extras[k - 1] for k, _ in epilogue.side_stores])

