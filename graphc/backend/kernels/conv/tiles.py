"""The helpers the conv kernels share: the register tiles (`_tile_function`, one per program;
`_dot_function`, one per module), their compile-time offset tables, and the blocked transpose."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import F32, I1, I32, I64, PTR, KernelBuilder, int_constant, i32_array
from graphc.backend.llvm.program_modules import shared_function
from graphc.backend.llvm.target import vector_register_count

# Rows of a register tile: each has a pointer to its broadcast operand, in a register.
_TILE_ROWS = 6
_ROWS_NAME = "graphc.conv.rows"
_ZEROS_NAME = "graphc.conv.zeros"


# ------------------------------------------------------------------------ register tiles

def _tile_vectors() -> int:
    """Channel vectors per register tile: 2 with 16 vector registers (6 rows x 2 = 12
    accumulators + 2 operand vectors + 1 broadcast, gemm.py's AVX2 tile), 4 with 32."""
    return 4 if vector_register_count() >= 32 else 2


def _accumulators() -> int:
    """Accumulator registers of a full tile."""
    return _TILE_ROWS * _tile_vectors()


@dataclasses.dataclass(frozen=True)
class _TileSpec:
    """A register tile as its callers use it: its shape and the arguments they pass as
    constants, folded into its code. An argument that is None here is a parameter.

    `consecutive_rows`: a_rows is the table 0, 1, 2, ... (row r's offset is r); `zero_init`:
    the accumulators start at zero (init, init_row and init_vec unused). The loop bound n,
    the operands and the step table are always parameters."""

    rows: int
    vecs: int
    table: str
    consecutive_rows: bool
    zero_init: bool
    stride: int | None
    c_row: int | None
    v_step: int | None
    init_row: int | None
    init_vec: int | None
    relu: bool | None

    @property
    def name(self) -> str:
        constants = hashlib.sha256(repr(self).encode()).hexdigest()[:10]
        return f"graphc.conv.tile{self.rows}x{self.vecs}{self.table}.{constants}"

    def parameters(self) -> list[tuple[str, ir.Type]]:
        """(name, type) of the tile function's parameters, in order."""
        optional = [("a_rows", PTR, self.consecutive_rows), ("stride", I64, self.stride is not None),
                    ("c_row", I64, self.c_row is not None), ("v_step", I64, self.v_step is not None),
                    ("init", PTR, self.zero_init), ("init_row", I64, self.zero_init or self.init_row is not None),
                    ("init_vec", I64, self.zero_init or self.init_vec is not None),
                    ("relu", I1, self.relu is not None)]
        return [("a", PTR), ("b", PTR), ("steps", PTR), ("n", I64), ("c", PTR)] + [
            (name, typ) for name, typ, constant in optional if not constant]


def _tile_function(module: ir.Module, spec: _TileSpec) -> ir.Function:
    """The register tile of `spec.rows` x `spec.vecs` vectors whose `spec.table` ("a" or "b")
    operand's steps are offsets in a table, specialized for the constants in `spec`, one
    copy per program (program_modules.shared_function). With every argument a parameter:

        void tile(a, b, steps, n, c, a_rows, stride, c_row, v_step, init, init_row,
                  init_vec, relu)

    acc[r][v] = init[r*init_row + v*init_vec : +W]; then for each of the n steps s,
        acc[r][v] += broadcast(a[a_rows[r] + da]) * b[db + v*v_step : +W]
    where, for table "a", da = steps[s] and db = s*stride (and for "b" the other way
    round); and (if relu) acc = max(acc, 0); stored at c[r*c_row + v*v_step : +W].
    Offsets are in floats, the tables i32. One operand's offsets are always affine (a
    weight or a channel-minor operand), and a second table load per step slowed the conv
    net (10 loads per 12 FMAs; bench/NOTES.md, "Convolutions").

    Two steps per loop iteration (one was slower on LeNet's input gradient, whose
    reductions are 16 steps long). A tile of fewer accumulators than a full one may have
    too few to hide the FMA latency, so it alternates between two sets of them, summed at
    the end (a tile one vector wide; a short last group of rows).
    """
    parameters = spec.parameters()
    function_type = ir.FunctionType(ir.VoidType(), [typ for _, typ in parameters])
    return shared_function(module, spec.name, function_type,
                           lambda fn: _build_tile(fn, spec, [name for name, _ in parameters]))


def _build_tile(fn: ir.Function, spec: _TileSpec, names: list[str]) -> None:
    fn.attributes.add("noinline")   # see _internal_function
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))
    arg = dict(zip(names, fn.args))
    rows, vecs = spec.rows, spec.vecs
    a, b, steps, n, c = arg["a"], arg["b"], arg["steps"], arg["n"], arg["c"]
    stride, c_row, v_step = (arg.get(name, getattr(spec, name)) for name in ("stride", "c_row", "v_step"))
    if spec.consecutive_rows:
        row_ptrs = [kb.gep(a, r) for r in range(rows)]
    else:
        row_ptrs = [kb.gep(a, _load_index(kb, arg["a_rows"], r)) for r in range(rows)]
    b_ptrs = [kb.gep(b, kb.mul(v, v_step)) for v in range(vecs)]
    if spec.zero_init:
        first = [[kb.variable(kb.splat(0.0)) for _ in range(vecs)] for _ in range(rows)]
    else:
        init = arg["init"]
        init_row, init_vec = (arg.get(name, getattr(spec, name)) for name in ("init_row", "init_vec"))
        first = [[kb.variable(kb.load_vec(init, kb.add(kb.mul(r, init_row), kb.mul(v, init_vec))))
                  for v in range(vecs)] for r in range(rows)]
    sets = [first]
    if 2 * rows * vecs <= _accumulators():
        sets.append([[kb.variable(kb.splat(0.0)) for _ in range(vecs)] for _ in range(rows)])

    def step(s, acc):
        looked_up, affine = _load_index(kb, steps, s), kb.mul(s, stride)
        da, db = (looked_up, affine) if spec.table == "a" else (affine, looked_up)
        b_vectors = [kb.load_vec(ptr, db) for ptr in b_ptrs]
        for ptr, row_acc in zip(row_ptrs, acc):
            a_value = kb.splat(kb.load(ptr, da))
            for b_vector, slot in zip(b_vectors, row_acc):
                kb.set(slot, kb.mul_add(a_value, b_vector, kb.get(slot)))

    pairs_end = kb.b.and_(n, kb.i64(-2))
    with kb.for_range(0, pairs_end, step=2, name="s") as s:
        step(s, sets[0])
        step(kb.add(s, 1), sets[-1])
    with kb.if_then(kb.b.icmp_signed("<", pairs_end, n)):
        step(pairs_end, sets[0])

    for r in range(rows):
        for v in range(vecs):
            value = kb.get(first[r][v])
            if len(sets) > 1:
                value = kb.fadd(value, kb.get(sets[1][r][v]))
            if spec.relu is None:
                value = kb.b.select(arg["relu"], kb.relu(value), value)
            elif spec.relu:
                value = kb.relu(value)
            kb.store_vec(value, c, kb.add(kb.mul(r, c_row), kb.mul(v, v_step)))
    kb.b.ret_void()


def _tiles_along(kb: KernelBuilder, rows: int, table: str, *, b: ir.Value, c: ir.Value,
                 **operands) -> Callable[[ir.Value, int, int], None]:
    """tile(start, vecs, step) for `_VectorCover.emit_each`: the tile of `rows` whose
    vectors start `start` floats into the runs at b (its vector operand) and at c."""
    def tile(start, vecs, step):
        _call_tile(kb, rows, vecs, table, b=kb.gep(b, start), c=kb.gep(c, start), v_step=step, **operands)
    return tile


def _call_tile(kb: KernelBuilder, rows: int, vecs: int, table: str, *, a, a_rows, b, steps, stride, n, c,
               c_row, v_step, init, init_row, init_vec, relu: bool | ir.Value = False) -> None:
    """A call of the tile of `rows` x `vecs` vectors (`_tile_function`) with these arguments:
    Python ints and bools, i64 constants, and the module's `_row_indices` and `_zeros` are
    folded into the tile's code."""
    module = kb.module
    zero_init = init is module.globals.get(_ZEROS_NAME)
    spec = _TileSpec(rows, vecs, table, consecutive_rows=a_rows is module.globals.get(_ROWS_NAME),
                     zero_init=zero_init, stride=int_constant(stride), c_row=int_constant(c_row),
                     v_step=int_constant(v_step), init_row=None if zero_init else int_constant(init_row),
                     init_vec=None if zero_init else int_constant(init_vec),
                     relu=relu if isinstance(relu, bool) else None)
    given = {"a": a, "b": b, "steps": steps, "n": kb.as_i64(n), "c": c, "a_rows": a_rows, "stride": stride,
             "c_row": c_row, "v_step": v_step, "init": init, "init_row": init_row, "init_vec": init_vec,
             "relu": relu}
    arguments = [kb.as_i64(given[name]) if typ == I64 else given[name] for name, typ in spec.parameters()]
    kb.b.call(_tile_function(module, spec), arguments)


def _dot_function(module: ir.Module, rows: int, vecs: int) -> ir.Function:
    """The module's tile of dot products, made on first use:

        void dot(a, a_rows, b, b_cols, n, c, c_row, c_vec)

    acc[r][v] = c[r*c_row + v*c_vec : +W], then for q in 0, W, ..., (n-1)*W:
        acc[r][v] += a[a_rows[r] + q : +W] * b[b_cols[v] + q : +W]
    stored back: each lane a partial sum of the dot product of row r and column v.
    """
    name = f"graphc.conv.dot{rows}x{vecs}"
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    fn, kb = _internal_function(module, name, [PTR, PTR, PTR, PTR, I64, PTR, I64, I64])
    a, a_rows, b, b_cols, n, c, c_row, c_vec = fn.args
    row_ptrs = [kb.gep(a, _load_index(kb, a_rows, r)) for r in range(rows)]
    col_ptrs = [kb.gep(b, _load_index(kb, b_cols, v)) for v in range(vecs)]
    offsets = [[kb.add(kb.mul(r, c_row), kb.mul(v, c_vec)) for v in range(vecs)]
               for r in range(rows)]
    acc = [[kb.variable(kb.load_vec(c, offsets[r][v])) for v in range(vecs)]
           for r in range(rows)]
    with kb.for_range(0, kb.mul(n, kb.width), step=kb.width, name="q") as q:
        b_vectors = [kb.load_vec(ptr, q) for ptr in col_ptrs]
        for ptr, row_acc in zip(row_ptrs, acc):
            a_vector = kb.load_vec(ptr, q)
            for b_vector, slot in zip(b_vectors, row_acc):
                kb.set(slot, kb.mul_add(a_vector, b_vector, kb.get(slot)))
    for r in range(rows):
        for v in range(vecs):
            kb.store_vec(kb.get(acc[r][v]), c, offsets[r][v])
    kb.b.ret_void()
    return fn


def _internal_function(module: ir.Module, name: str, arg_types) -> tuple[ir.Function,
                                                                        KernelBuilder]:
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name=name)
    fn.linkage = "internal"
    # Inlined, it would be copied into every caller and optimised again there; a call per
    # tile costs a few percent of its work.
    fn.attributes.add("noinline")
    return fn, KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))


def _load_index(kb: KernelBuilder, table: ir.Value, index) -> ir.Value:
    """Entry `index` of an i32 table, as an i64."""
    value = kb.b.load(kb.gep(table, index), typ=I32, align=4)
    return kb.b.sext(value, I64)


def _balanced(total: int, most: int) -> list[tuple[int, int]]:
    """range(total) cut into consecutive (start, count) pieces of at most `most`, of
    balanced sizes, the larger first: 16 by 6 is 6 + 5 + 5, not 6 + 6 + 4."""
    count = -(-total // most)
    size, larger = divmod(total, count)
    pieces, start = [], 0
    for index in range(count):
        length = size + (index < larger)
        pieces.append((start, length))
        start += length
    return pieces


# ------------------------------------------------------------------------------- tables

class _Tables:
    """A kernel's read-only i32 tables: module globals named after the kernel."""

    def __init__(self, module: ir.Module, kernel_name: str):
        self.module, self.kernel_name = module, kernel_name

    def add(self, name: str, values: Sequence[int]) -> ir.GlobalVariable:
        return _i32_global(self.module, f"{self.kernel_name}.{name}", values)


def _i32_global(module: ir.Module, name: str, values: Sequence[int]) -> ir.GlobalVariable:
    initializer = i32_array(values)
    table = ir.GlobalVariable(module, initializer.type, name)
    table.global_constant = True
    table.linkage = "internal"
    table.align = 64
    table.initializer = initializer
    return table


def _row_indices(module: ir.Module) -> ir.GlobalVariable:
    """0, 1, ..., 15: the row offsets of a tile whose rows are consecutive floats."""
    existing = module.globals.get(_ROWS_NAME)
    return existing if existing is not None else _i32_global(module, _ROWS_NAME, list(range(16)))


def _zeros(module: ir.Module) -> ir.GlobalVariable:
    """A vector of zeros: the initial accumulators of a tile summed from zero."""
    existing = module.globals.get(_ZEROS_NAME)
    if existing is not None:
        return existing
    typ = ir.ArrayType(F32, 16)
    zeros = ir.GlobalVariable(module, typ, _ZEROS_NAME)
    zeros.global_constant = True
    zeros.linkage = "internal"
    zeros.align = 64
    zeros.initializer = ir.Constant(typ, [0.0] * 16)
    return zeros


def _equal_runs(total: int, most: int) -> list[tuple[int, int, int]]:
    """`_balanced` pieces as runs of equal sizes: (first start, size, count) each."""
    runs = []
    for start, size in _balanced(total, most):
        if runs and runs[-1][1] == size:
            runs[-1] = (runs[-1][0], size, runs[-1][2] + 1)
        else:
            runs.append((start, size, 1))
    return runs


def _padded_list(values: Sequence[int], length: int) -> list[int]:
    """`values` repeated to `length` by its last entry: the extra rows of a last tile
    read the same (valid) cells as the last real one; their results are never used."""
    return list(values) + [values[-1]] * (length - len(values))



# ------------------------------------------------------------------------------ transposes

def _call_transpose(kb: KernelBuilder, src: ir.Value, src_stride, dst: ir.Value, dst_stride,
                    *, rows, cols, lanes) -> None:
    """dst[c*dst_stride + r] = src[r*src_stride + c] for r < rows, c < cols; dst lanes
    r in [rows, lanes) get zeros (how the channel-minor layouts pad their channels to
    whole vectors)."""
    kb.b.call(_transpose_function(kb.module), [
        src, kb.as_i64(src_stride), dst, kb.as_i64(dst_stride), kb.as_i64(rows),
        kb.as_i64(cols), kb.as_i64(lanes)])


def _transpose_function(module: ir.Module) -> ir.Function:
    """The transpose (see `_call_transpose`), W x W blocks at a time: W loads,
    `_transpose_block`, W stores. One function shared by all the conv kernels of a program,
    and one copy of the block in it: shuffles are slow to compile.

    A block at the edge (rows past `rows` or `cols`, lanes past `lanes`) is copied one
    float at a time: there are few (LeNet's conv2: 2 of 26 per sample), and vector code for
    them (masked loads into a buffer transposed like the others, then masked stores)
    doubled the function and LLVM's time on it.
    """
    function_type = ir.FunctionType(ir.VoidType(), [PTR, I64, PTR, I64, I64, I64, I64])
    return shared_function(module, "graphc.conv.transpose", function_type, _build_transpose)


def _build_transpose(fn: ir.Function) -> None:
    fn.attributes.add("noinline")   # see _internal_function
    kb = KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))
    src, src_stride, dst, dst_stride, rows, cols, lanes = fn.args
    w = kb.width

    def whole_block(r0, c0):
        block = kb.gep(src, kb.add(kb.mul(r0, src_stride), c0))
        vectors = _transpose_block(kb, [kb.load_vec(block, kb.mul(t, src_stride))
                                        for t in range(w)])
        for t, vector in enumerate(vectors):
            kb.store_vec(vector, dst, kb.add(kb.mul(kb.add(c0, t), dst_stride), r0))

    def edge_block(r0, c0):
        with kb.for_range(c0, kb.min(kb.add(c0, w), cols), name="c") as c:
            with kb.for_range(r0, kb.min(kb.add(r0, w), lanes), name="r") as r:
                inside = kb.b.icmp_signed("<", r, rows)
                # Lanes past `rows` are zeros: read row 0 for them (always there).
                row = kb.b.select(inside, r, kb.i64(0))
                value = kb.load(src, kb.add(kb.mul(row, src_stride), c))
                kb.store(kb.b.select(inside, value, kb.f32(0.0)), dst,
                         kb.add(kb.mul(c, dst_stride), r))

    with kb.for_range(0, lanes, step=w, name="r0") as r0:
        with kb.for_range(0, cols, step=w, name="c0") as c0:
            whole = kb.b.and_(kb.b.icmp_signed("<=", kb.add(r0, w), rows),
                              kb.b.icmp_signed("<=", kb.add(c0, w), cols))
            with kb.b.if_else(whole) as (then, otherwise):
                with then:
                    whole_block(r0, c0)
                with otherwise:
                    edge_block(r0, c0)
    kb.b.ret_void()


def _transpose_block(kb: KernelBuilder, rows: list[ir.Value]) -> list[ir.Value]:
    """The W x W block held in `rows`, transposed. For W = 8, in three rounds of shuffles
    whose masks are each one AVX instruction (unpcklps/unpckhps within 128-bit halves,
    shufps, vperm2f128): `kb.transpose`'s whole-vector interleaves need several each, and
    X86's instruction selection was slow on the one function holding them (bench/NOTES.md)."""
    if kb.width != 8:
        return kb.transpose(rows)

    def shuffle(a, b, *lanes):
        return kb.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 8), list(lanes)))

    pairs = []       # rows 2m, 2m+1 interleaved: (columns 0, 1, 4, 5), (2, 3, 6, 7)
    for m in range(0, 8, 2):
        pairs.append(shuffle(rows[m], rows[m + 1], 0, 8, 1, 9, 4, 12, 5, 13))
        pairs.append(shuffle(rows[m], rows[m + 1], 2, 10, 3, 11, 6, 14, 7, 15))
    quads = []       # rows 4q..4q+3 of columns (c, c + 4), for c = 0, 1, 2, 3
    for q in (0, 4):
        for low, high in ((pairs[q], pairs[q + 2]), (pairs[q + 1], pairs[q + 3])):
            quads.append(shuffle(low, high, 0, 1, 8, 9, 4, 5, 12, 13))
            quads.append(shuffle(low, high, 2, 3, 10, 11, 6, 7, 14, 15))
    columns = [shuffle(quads[c], quads[c + 4], 0, 1, 2, 3, 8, 9, 10, 11) for c in range(4)]
    return columns + [shuffle(quads[c], quads[c + 4], 4, 5, 6, 7, 12, 13, 14, 15)
                      for c in range(4)]
