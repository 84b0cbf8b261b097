"""A thin, readable layer over `llvmlite.ir.IRBuilder` for float32 kernels.

Every kernel generator (GEMM, elementwise, conv, pooling) builds on this so
that loops, addressing and SIMD look the same everywhere:

    kb = KernelBuilder(ir.IRBuilder(entry_block))
    with kb.for_range(0, n, step=kb.width) as i:      # an IR loop, not unrolled
        x = kb.load_vec(src, i)
        kb.store_vec(kb.mul_add(x, kb.splat(2.0), kb.splat(1.0)), dst, i)

Conventions:
  * Pointers are opaque (`ptr`) and always point at float32 elements;
    `gep` offsets are in elements, never bytes.  Addresses are computed
    with GEP, not integer arithmetic, so LLVM can reason about them.
  * Indices and loop counters are i64.  Python ints are accepted anywhere
    an i64 or f32 value is expected and become constants.
  * Vectors are `<width x float>`; `width` defaults to the host's
    `vector_width_f32()`.  Only generic LLVM vector types and target
    independent intrinsics (llvm.fmuladd, llvm.masked.*) are used, so the same
    IR compiles for x86 and ARM.
  * Vector memory access is unaligned (align 4): callers pass plain numpy
    buffers and offsets inside them.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence, Union

import llvmlite.ir as ir

from graphc.backend.llvm.target import vector_width_f32

__all__ = ["KernelBuilder", "F32", "I64", "I32", "I1", "PTR", "FAST_MATH", "shared_constant", "i32_array",
           "int_constant"]

F32 = ir.FloatType()
# Vector widths (floats) that `KernelBuilder.transpose` handles: those of SSE/NEON, AVX and AVX-512.
TRANSPOSE_WIDTHS = (4, 8, 16)
I64 = ir.IntType(64)
I32 = ir.IntType(32)
I1 = ir.IntType(1)
PTR = ir.PointerType()

# All fast-math flags: lets LLVM reassociate float reductions (needed to
# vectorize them) and contract mul+add into fma.
FAST_MATH = ("fast",)

ValueLike = Union[ir.Value, int, float]


class KernelBuilder:
    """Wraps an IRBuilder with the handful of idioms kernels need."""

    def __init__(self, builder: ir.IRBuilder, width: int | None = None):
        self.b = builder
        self.width = width or vector_width_f32()
        self.vec_type = ir.VectorType(F32, self.width)
        self.mask_type = ir.VectorType(I1, self.width)

    @property
    def module(self) -> ir.Module:
        return self.b.module

    # ----------------------------------------------------------- constants
    @staticmethod
    def f32(value: float) -> ir.Constant:
        return ir.Constant(F32, float(value))

    @staticmethod
    def i64(value: int) -> ir.Constant:
        return ir.Constant(I64, int(value))

    def as_i64(self, value: ValueLike) -> ir.Value:
        return value if isinstance(value, ir.Value) else self.i64(value)

    def as_f32(self, value: ValueLike) -> ir.Value:
        return value if isinstance(value, ir.Value) else self.f32(value)

    # ------------------------------------------------------ i64 arithmetic
    # Index arithmetic never overflows in practice; `nsw` tells LLVM so,
    # which lets scalar evolution compute trip counts and strides.
    # Constant operands are folded here (x*0, x*1, x+0, both constant): kernels
    # compute many offsets like r*ldc for r = 0..5, and every instruction not
    # emitted is Python and LLVM time saved at compile time (LLVM would fold
    # them too, but only after parsing them).
    def add(self, a: ValueLike, b: ValueLike) -> ir.Value:
        x, y = int_constant(a), int_constant(b)
        if x is not None and y is not None:
            return self.i64(x + y)
        if x == 0:
            return self.as_i64(b)
        if y == 0:
            return self.as_i64(a)
        return self.b.add(self.as_i64(a), self.as_i64(b), flags=("nsw",))

    def sub(self, a: ValueLike, b: ValueLike) -> ir.Value:
        x, y = int_constant(a), int_constant(b)
        if x is not None and y is not None:
            return self.i64(x - y)
        if y == 0:
            return self.as_i64(a)
        return self.b.sub(self.as_i64(a), self.as_i64(b), flags=("nsw",))

    def mul(self, a: ValueLike, b: ValueLike) -> ir.Value:
        x, y = int_constant(a), int_constant(b)
        if x is not None and y is not None:
            return self.i64(x * y)
        if x == 0 or y == 0:
            return self.i64(0)
        if x == 1:
            return self.as_i64(b)
        if y == 1:
            return self.as_i64(a)
        return self.b.mul(self.as_i64(a), self.as_i64(b), flags=("nsw",))

    def min(self, a: ValueLike, b: ValueLike) -> ir.Value:
        a, b = self.as_i64(a), self.as_i64(b)
        return self.b.select(self.b.icmp_signed("<", a, b), a, b)

    def max(self, a: ValueLike, b: ValueLike) -> ir.Value:
        a, b = self.as_i64(a), self.as_i64(b)
        return self.b.select(self.b.icmp_signed(">", a, b), a, b)

    # ---------------------------------------------------------------- loops
    @contextlib.contextmanager
    def for_range(self, start: ValueLike, stop: ValueLike, step: int = 1,
                  name: str = "i") -> Iterator[ir.Value]:
        """`for i in range(start, stop, step)` as an IR loop; yields i (i64).

        `step` must be a positive Python int.  The body is whatever the
        caller emits inside the `with`; it may contain nested loops.  After
        the `with`, the builder is positioned after the loop.

        The loop stays a loop: the module pipeline (target.OPTIMIZATION_PASSES)
        runs no unroller, so a kernel that wants a body repeated emits it so.
        """
        if step <= 0:
            raise ValueError("for_range needs a positive step")
        start, stop = self.as_i64(start), self.as_i64(stop)
        preheader = self.b.block
        header = self.b.append_basic_block(f"{name}.header")
        body = self.b.append_basic_block(f"{name}.body")
        exit_ = self.b.append_basic_block(f"{name}.exit")
        self.b.branch(header)

        self.b.position_at_end(header)
        index = self.b.phi(I64, name=name)
        index.add_incoming(start, preheader)
        self.b.cbranch(self.b.icmp_signed("<", index, stop), body, exit_)

        self.b.position_at_end(body)
        yield index
        # The body may have ended in another block (nested loops); the back
        # edge comes from wherever the builder is now.
        index.add_incoming(self.add(index, step), self.b.block)
        self.b.branch(header)

        self.b.position_at_end(exit_)

    @contextlib.contextmanager
    def if_then(self, condition: ir.Value) -> Iterator[None]:
        """Emit the `with` body only when the i1 `condition` holds."""
        with self.b.if_then(condition):
            yield

    def split_range(self, n: ValueLike, tid: ValueLike,
                    nthreads: ValueLike) -> tuple[ir.Value, ir.Value]:
        """Thread `tid`'s share [lo, hi) of range(n), as i64 IR values.

        lo = n*tid // nthreads: shares differ by at most one item, cover
        range(n) exactly and never overlap, for any nthreads >= 1 (threads
        beyond n get empty ranges).
        """
        n, tid, nthreads = self.as_i64(n), self.as_i64(tid), self.as_i64(nthreads)
        lo = self.b.sdiv(self.mul(n, tid), nthreads)
        hi = self.b.sdiv(self.mul(n, self.add(tid, 1)), nthreads)
        return lo, hi

    # ------------------------------------------------------ local variables
    def variable(self, initial: ir.Value) -> ir.AllocaInstr:
        """A mutable local holding `initial`; read with `get`, write with `set`.

        Use it for loop-carried values (accumulators) instead of phis.  The
        alloca is placed in the entry block, where LLVM's mem2reg/SROA turn it
        into SSA registers; an alloca inside a loop would stay in memory.
        """
        with self.b.goto_entry_block():
            slot = self.b.alloca(initial.type)
        self.b.store(initial, slot)
        return slot

    def get(self, variable: ir.AllocaInstr) -> ir.Value:
        return self.b.load(variable, typ=variable.allocated_type)

    def set(self, variable: ir.AllocaInstr, value: ir.Value) -> None:
        self.b.store(value, variable)

    # ------------------------------------------------------ scalar memory
    def gep(self, ptr: ir.Value, index: ValueLike) -> ir.Value:
        """Address of float element `index` past `ptr`."""
        if int_constant(index) == 0:
            return ptr
        return self.b.gep(ptr, [self.as_i64(index)], inbounds=True,
                          source_etype=F32)

    def load(self, ptr: ir.Value, index: ValueLike = 0) -> ir.Value:
        return self.b.load(self.gep(ptr, index), typ=F32, align=4)

    def store(self, value: ir.Value, ptr: ir.Value, index: ValueLike = 0) -> None:
        self.b.store(value, self.gep(ptr, index), align=4)

    # ------------------------------------------------------ vector memory
    def load_vec(self, ptr: ir.Value, index: ValueLike = 0) -> ir.Value:
        """Load `width` consecutive floats starting at element `index`."""
        return self.b.load(self.gep(ptr, index), typ=self.vec_type, align=4)

    def store_vec(self, value: ir.Value, ptr: ir.Value,
                  index: ValueLike = 0) -> None:
        self.b.store(value, self.gep(ptr, index), align=4)

    def lane_mask(self, n_active: int) -> ir.Constant:
        """Constant mask enabling the first `n_active` lanes."""
        return shared_constant(self.mask_type, tuple(i < n_active for i in range(self.width)))

    def lane_mask_dynamic(self, n_active: ir.Value) -> ir.Value:
        """Mask enabling the first `n_active` (an i64 value) lanes."""
        lanes = shared_constant(ir.VectorType(I64, self.width), tuple(range(self.width)))
        return self.b.icmp_signed("<", lanes, self.splat_i64(n_active))

    def masked_load_vec(self, ptr: ir.Value, index: ValueLike, mask: ir.Value,
                        passthru: ir.Value | None = None) -> ir.Value:
        """Load the lanes enabled by `mask`; disabled lanes are `passthru`
        (zero by default) and their memory is never touched."""
        fn = self._intrinsic("llvm.masked.load", self.vec_type,
                             [PTR, I32, self.mask_type, self.vec_type])
        if passthru is None:
            passthru = self.splat(0.0)
        return self.b.call(fn, [self.gep(ptr, index), ir.Constant(I32, 4),
                                mask, passthru])

    def masked_store_vec(self, value: ir.Value, ptr: ir.Value,
                         index: ValueLike, mask: ir.Value) -> None:
        """Store only the lanes of `value` enabled by `mask`."""
        fn = self._intrinsic("llvm.masked.store", ir.VoidType(),
                             [self.vec_type, PTR, I32, self.mask_type])
        self.b.call(fn, [value, self.gep(ptr, index), ir.Constant(I32, 4), mask])

    def lane_addresses(self, ptr: ir.Value, indices: ir.Value) -> ir.Value:
        """The vector of addresses of floats ptr[indices[lane]] (`indices`: a vector of i64)."""
        addresses = self.b.gep(ptr, [indices], inbounds=True, source_etype=F32)
        # llvmlite types a GEP by its base pointer; with a vector index LLVM's result is a
        # vector of pointers, which the text above already is.
        addresses.type = ir.VectorType(PTR, self.width)
        return addresses

    def gather_vec(self, addresses: ir.Value, mask: ir.Value, fill: float = 0.0) -> ir.Value:
        """Load lane i from addresses[i] where `mask` enables it; other lanes hold `fill`
        and their addresses are never read. Give it a constant mask: where LLVM emits no
        gather instruction (AMD cores, SSE, NEON) a variable one costs a branch per lane."""
        fn = self._intrinsic("llvm.masked.gather", self.vec_type,
                             [addresses.type, I32, self.mask_type, self.vec_type])
        return self.b.call(fn, [addresses, ir.Constant(I32, 4), mask, self.splat(fill)])

    def prefetch(self, ptr: ir.Value, index: ValueLike = 0) -> None:
        """Hint that the cache line holding float `index` past `ptr` will soon be read. Only a
        hint: it never faults, whatever the address."""
        fn = self._intrinsic("llvm.prefetch", ir.VoidType(), [PTR, I32, I32, I32])
        # read, keep in all cache levels, data cache
        self.b.call(fn, [self.gep(ptr, index), ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

    # ------------------------------------------------------ vector values
    def splat(self, scalar: ValueLike) -> ir.Value:
        """Broadcast a float (IR value or Python number) to every lane."""
        if not isinstance(scalar, ir.Value):
            return shared_constant(self.vec_type, (float(scalar),) * self.width)
        return self._splat(scalar, self.vec_type)

    def splat_i64(self, scalar: ir.Value) -> ir.Value:
        return self._splat(scalar, ir.VectorType(I64, self.width))

    def _splat(self, scalar: ir.Value, vec_type: ir.VectorType) -> ir.Value:
        # insertelement + zero shufflevector is the canonical broadcast;
        # a broadcast of a load becomes a single vbroadcastss / ld1r.
        undefined = shared_constant(vec_type, ir.Undefined)
        one_lane = self.b.insert_element(undefined, scalar, shared_constant(I32, 0))
        zeros = shared_constant(ir.VectorType(I32, self.width), (0,) * self.width)
        return self.b.shuffle_vector(one_lane, undefined, zeros)

    def transpose(self, rows: Sequence[ir.Value]) -> list[ir.Value]:
        """Transpose a width x width block held in `width` vectors (width 4, 8 or 16).

        Shuffles that x86 does in one instruction each: within every 128-bit lane (4 floats),
        a 4 x 4 transpose of each group of 4 rows, by an unpack round (vunpcklps/vunpckhps)
        and a round of pair selects (vshufps); then the 128-bit blocks are transposed across
        the groups, by log2(width / 4) rounds that interleave blocks (vperm2f128 on AVX2).
        On a 4-wide target (SSE, NEON) the two in-lane rounds are the whole transpose. The
        plain log2(width)-round perfect shuffle it replaces moved elements across 128-bit lanes
        in every round: 2-3 instructions a shuffle on AVX2, and slow for LLVM to lower
        (bench/NOTES.md, "Compile time: IR and its functions").
        """
        w = self.width
        if len(rows) != w or w not in TRANSPOSE_WIDTHS:
            raise ValueError(f"transpose needs `width` vectors, width one of {TRANSPOSE_WIDTHS}")
        lane = 4
        blocks = w // lane

        def shuffle(a: ir.Value, b: ir.Value, mask: Sequence[int]) -> ir.Value:
            return self.b.shuffle_vector(a, b, shared_constant(ir.VectorType(I32, w), tuple(mask)))

        def in_lanes(pattern: Sequence[int]) -> list[int]:
            """`pattern` in every 128-bit lane: 0-3 pick from a's lane, 4-7 from b's."""
            return [(p if p < lane else w + p - lane) + lane * block for block in range(blocks) for p in pattern]

        # Row pairs (a, b): [a0 b0 a1 b1], [a2 b2 a3 b3] in each lane.
        pairs = [out for a, b in zip(rows[0::2], rows[1::2])
                 for out in (shuffle(a, b, in_lanes((0, 4, 1, 5))), shuffle(a, b, in_lanes((2, 6, 3, 7))))]
        # Groups of 4 rows: columns[k][g] holds, in lane l, column lane*l + k of rows 4g..4g+3.
        columns = [[] for _ in range(lane)]
        for g in range(blocks):
            ab_low, ab_high, cd_low, cd_high = pairs[4 * g: 4 * g + 4]
            for k, (x, y) in enumerate(((ab_low, cd_low), (ab_low, cd_low), (ab_high, cd_high), (ab_high, cd_high))):
                columns[k].append(shuffle(x, y, in_lanes((0, 1, 4, 5) if k % 2 == 0 else (2, 3, 6, 7))))
        # Transpose the blocks x blocks matrix of lanes (vector g, lane l) of each columns[k]: as
        # the perfect shuffle on elements, each round rotates the bits of (vector, lane) by one.
        half = blocks // 2
        low = [source * w + lane * b + e for b in range(half) for source in (0, 1) for e in range(lane)]
        high = [index + lane * half for index in low]
        for _ in range(blocks.bit_length() - 1):
            columns = [[out for i in range(half)
                        for out in (shuffle(vectors[i], vectors[i + half], low),
                                    shuffle(vectors[i], vectors[i + half], high))]
                       for vectors in columns]
        return [columns[c % lane][c // lane] for c in range(w)]

    def mul_add(self, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
        """a*b + c on f32 scalars or <width x float>: llvm.fmuladd, one fused instruction where
        the CPU has FMA, else a multiply and an add. (llvm.fma, which promises one rounding,
        is a libm call per lane on an x86 without FMA.)"""
        fn = self._intrinsic("llvm.fmuladd", a.type, [a.type, a.type, a.type])
        return self.b.call(fn, [a, b, c])

    def fadd(self, a: ir.Value, b: ir.Value, fast: bool = False) -> ir.Value:
        return self.b.fadd(a, b, flags=FAST_MATH if fast else ())

    def fmul(self, a: ir.Value, b: ir.Value, fast: bool = False) -> ir.Value:
        return self.b.fmul(a, b, flags=FAST_MATH if fast else ())

    def relu(self, x: ir.Value) -> ir.Value:
        """max(x, 0) for a float or vector; NaN stays NaN like numpy."""
        zero = self.splat(0.0) if isinstance(x.type, ir.VectorType) else self.f32(0.0)
        # `x < 0 ? 0 : x` is false for NaN, so NaN propagates.
        return self.b.select(self.b.fcmp_ordered("<", x, zero), zero, x)

    @staticmethod
    def set_fast_math(instruction: ir.Instruction,
                      flags: Sequence[str] = FAST_MATH) -> ir.Instruction:
        """Add fast-math flags to an already emitted float instruction."""
        if isinstance(instruction, ir.CallInstr):
            for flag in flags:
                instruction.fastmath.add(flag)
        else:
            instruction.flags.extend(f for f in flags if f not in instruction.flags)
        return instruction

    # ------------------------------------------------------------ helpers
    def _intrinsic(self, name: str, return_type: ir.Type,
                   arg_types: Sequence[ir.Type]) -> ir.Function:
        """Declare (once per module) an overloaded intrinsic by its mangled
        name, e.g. llvm.masked.load.v8f32.p0."""
        suffix = {
            "llvm.fmuladd": [return_type],
            "llvm.masked.load": [return_type, PTR],
            "llvm.masked.store": [arg_types[0], PTR],
            "llvm.prefetch": [PTR],
            "llvm.masked.gather": [return_type, arg_types[0]],
        }[name]
        mangled = name + "".join("." + _type_suffix(t) for t in suffix)
        existing = self.module.globals.get(mangled)
        if existing is not None:
            return existing
        return ir.Function(self.module, ir.FunctionType(return_type, arg_types),
                           name=mangled)


def _type_suffix(typ: ir.Type) -> str:
    """LLVM's intrinsic name mangling for the types we use."""
    if isinstance(typ, ir.PointerType):
        return "p0"
    if isinstance(typ, ir.VectorType):
        return f"v{typ.count}{_type_suffix(typ.element)}"
    if isinstance(typ, ir.FloatType):
        return "f32"
    if isinstance(typ, ir.DoubleType):
        return "f64"
    raise TypeError(f"no intrinsic mangling for {typ}")


def shared_constant(typ: ir.Type, value) -> ir.Constant:
    """One `ir.Constant` object per (type, value): llvmlite prints a constant each time it is
    used, unless it is the same object, whose text it keeps. Vector constants (splats, masks,
    shuffle patterns) are used thousands of times in a program: shared, each is printed once,
    and a module's text is ready sooner. `value` must be hashable (a tuple for a
    vector)."""
    # Keyed by the value's repr too: -0.0 == 0.0 (and they hash alike), but a sum's identity
    # must stay -0.0.
    return _shared_constant(typ, value, repr(value))


def i32_array(values) -> ir.Constant:
    """An [n x i32] constant of `values` (a conv kernel's offset tables, thousands long),
    written out as text at once: llvmlite makes and prints one constant object per element
    otherwise, which thousands of entries make a visible part of a cold compile."""
    values = [int(v) for v in values]
    if any(not -2**31 <= v < 2**31 for v in values):
        raise ValueError("i32_array: a value does not fit in 32 bits")
    text = "[" + ", ".join(f"i32 {v}" for v in values) + "]"
    return ir.FormattedConstant(ir.ArrayType(I32, len(values)), text)


@functools.lru_cache(maxsize=4096)
def _shared_constant(typ: ir.Type, value, text: str) -> ir.Constant:
    return ir.Constant(typ, list(value) if isinstance(value, tuple) else value)


def int_constant(value: ValueLike) -> int | None:
    """The value of a Python int or an i64 constant; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, ir.Constant) and value.type == I64 and isinstance(value.constant, int):
        return value.constant
    return None
