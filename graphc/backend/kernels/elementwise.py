"""The elementwise kernel: one loop nest evaluating a sympy expression over broadcast operands.

Operands broadcast into the output as in numpy. Dimensions are first collapsed wherever every
operand is contiguous across them (or broadcast across both), so most kernels become one flat
loop; the innermost loop runs on whole vectors with a masked tail, loading each operand as a
vector (stride 1) or a splat (stride 0, hoisted out of the loop).
"""
from __future__ import annotations

import math

import sympy
from llvmlite import ir

from graphc.backend import costs
from graphc.backend.emit.expr import ExprEmitter
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.kernels.layout import only_thread_zero
from graphc.backend.kernels.softmax import vector_exp_any, vector_log
from graphc.backend.lowering_rules import Step, group_expression, lowers
from graphc.core.scalar import symbol

# Below this many elements a kernel runs on one thread: splitting costs more than it saves.
PARALLEL_MIN_ELEMENTS = 1 << 15


def broadcast_strides(operand_shape, out_shape) -> list[int]:
    """Element strides of a contiguous operand indexed by the output's coordinates (0 = broadcast)."""
    lead = len(out_shape) - len(operand_shape)
    strides, step = [0] * len(out_shape), 1
    for axis in range(len(out_shape) - 1, lead - 1, -1):
        size = operand_shape[axis - lead]
        strides[axis] = step if size != 1 else 0
        step *= size
    return strides


def collapse_dims(out_shape, operand_strides):
    """Merge adjacent dims that every operand walks contiguously; drop size-1 dims.

    Returns (sizes, strides per operand) with at least one dim."""
    dims = [(size, [s[axis] for s in operand_strides]) for axis, size in enumerate(out_shape) if size != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, strides in dims:
        if merged:
            prev_size, prev_strides = merged[-1]
            if all(p == s * size for p, s in zip(prev_strides, strides)):
                merged[-1] = (prev_size * size, strides)
                continue
        merged.append((size, strides))
    if not merged:
        merged = [(1, [0] * len(operand_strides))]
    sizes = [size for size, _ in merged]
    return sizes, [[strides[k] for _, strides in merged] for k in range(len(operand_strides))]


def emit_elementwise(module, name: str, out_shape, operand_shapes, expr: sympy.Expr, *, max_threads: int,
                     side_stores: tuple = ()) -> Kernel:
    """out = expr(x0, x1, ...) with numpy broadcasting of the operands into `out_shape`.

    Each (k, e) of `side_stores` also stores e(x0, x1, ...) into operand k, which must have the
    output's shape: an in-place update computed beside the output (written after it was read)."""
    fn, kb = phase_function(module, name, len(operand_shapes))
    out, inputs, _scratch, tid, nthreads = phase_args(fn)
    out_strides = broadcast_strides(out_shape, out_shape)
    sizes, strides = collapse_dims(out_shape, [out_strides] + [broadcast_strides(s, out_shape) for s in operand_shapes])
    out_strides, operand_strides = strides[0], strides[1:]

    inner = sizes[-1]
    outer_sizes = sizes[:-1]
    outer_count = math.prod(outer_sizes)
    parallel = max_threads > 1 and math.prod(sizes) >= PARALLEL_MIN_ELEMENTS
    emitter_inputs = (inputs, operand_strides)

    if outer_count > 1 or not parallel:
        # Split the outer iterations across threads; each runs whole inner rows.
        lo, hi = (kb.split_range(outer_count, tid, nthreads) if parallel else (kb.i64(0), kb.i64(outer_count)))
        if not parallel:
            only_thread_zero(kb, tid)
        with kb.for_range(lo, hi, name="outer") as flat:
            bases = _outer_bases(kb, flat, outer_sizes, [out_strides] + operand_strides)
            _inner_loop(kb, expr, out, bases[0], emitter_inputs, bases[1:], kb.i64(0), kb.i64(inner),
                        side_stores=side_stores)
    else:
        # One long row: split it into vector-aligned chunks.
        chunks = -(-inner // kb.width)
        lo, hi = kb.split_range(chunks, tid, nthreads)
        start = kb.mul(lo, kb.width)
        stop = kb.min(kb.mul(hi, kb.width), inner)
        zero = kb.i64(0)
        _inner_loop(kb, expr, out, zero, emitter_inputs, [zero] * len(inputs), start, stop, side_stores=side_stores)
    kb.b.ret_void()
    return Kernel([fn])


def emit_elementwise_epilogue(kb, expr: sympy.Expr, target, operands, count) -> None:
    """target[i] = expr(target[i], operands[0][i], ...) for i < count, in place: an elementwise
    consumer fused into the kernel that just wrote `target` (while it is still in cache). Every
    operand is contiguous and indexed like `target`."""
    pointers = [target] + list(operands)
    zero = kb.i64(0)
    _inner_loop(kb, expr, target, zero, (pointers, [[1]] * len(pointers)), [zero] * len(pointers),
                zero, kb.as_i64(count))


def emit_expr(kb, expr: sympy.Expr, vectors) -> ir.Value:
    """expr(x0, x1, ...) on vectors, with exp and log computed in registers (as the
    elementwise kernels do): for kernels that apply a fused elementwise consumer themselves."""
    return _RegisterMathEmitter(kb, list(vectors)).emit_all([expr])[0]


class _RegisterMathEmitter(ExprEmitter):
    """An ExprEmitter computing exp and log in registers: llvm.exp and llvm.log on a vector
    become one libm call per lane, which took most of a small step's sigmoid and softplus
    kernels."""

    def call(self, name: str, *args: ir.Value) -> ir.Value:
        if name == "exp":
            return vector_exp_any(self.kb, *args)
        if name == "log":
            return vector_log(self.kb, *args)
        return super().call(name, *args)


def _outer_bases(kb, flat, outer_sizes, stride_sets):
    """Offset of each buffer at the start of the row numbered `flat` in the outer dims."""
    bases = [kb.i64(0) for _ in stride_sets]
    remainder = flat
    for axis in range(len(outer_sizes) - 1, -1, -1):
        if axis > 0:
            coordinate = kb.b.urem(remainder, kb.i64(outer_sizes[axis]))
            remainder = kb.b.udiv(remainder, kb.i64(outer_sizes[axis]))
        else:
            coordinate = remainder
        bases = [kb.add(base, kb.mul(coordinate, strides[axis])) if strides[axis] else base
                 for base, strides in zip(bases, stride_sets)]
    return bases


def _inner_loop(kb, expr, out, out_base, emitter_inputs, operand_bases, start, stop, side_stores=()):
    """out[out_base + i] = expr(...) for i in [start, stop), on vectors with a masked tail; and
    the side stores: operand k [base + i] = e(...) for each (k, e)."""
    inputs, operand_strides = emitter_inputs
    inner_strides = [s[-1] for s in operand_strides]
    # Broadcast operands (stride 0 along the row) are loaded once per row.
    splats = {k: kb.splat(kb.load(inputs[k], operand_bases[k]))
              for k, stride in enumerate(inner_strides) if stride == 0}

    def operand_vectors(index, mask=None):
        values = []
        for k, ptr in enumerate(inputs):
            if k in splats:
                values.append(splats[k])
            elif mask is None:
                values.append(kb.load_vec(ptr, kb.add(operand_bases[k], index)))
            else:
                values.append(kb.masked_load_vec(ptr, kb.add(operand_bases[k], index), mask))
        return values

    width = kb.width
    length = kb.sub(stop, start)
    full_stop = kb.add(start, kb.mul(kb.b.sdiv(length, kb.i64(width)), width))
    exprs = [expr] + [side_expr for _, side_expr in side_stores]
    targets = [(out, out_base)] + [(inputs[k], operand_bases[k]) for k, _ in side_stores]
    with kb.for_range(start, full_stop, step=width, name="vec") as i:
        values = _RegisterMathEmitter(kb, operand_vectors(i)).emit_all(exprs)
        for value, (target, base) in zip(values, targets):
            kb.store_vec(value, target, kb.add(base, i))
    remaining = kb.sub(stop, full_stop)
    with kb.if_then(kb.b.icmp_signed(">", remaining, kb.i64(0))):
        mask = kb.lane_mask_dynamic(remaining)
        values = _RegisterMathEmitter(kb, operand_vectors(full_stop, mask)).emit_all(exprs)
        for value, (target, base) in zip(values, targets):
            kb.masked_store_vec(value, target, kb.add(base, full_stop), mask)


# ---- lowering --------------------------------------------------------------------------------

@lowers("ew", "fill", "broadcast_to")
def lower_elementwise(node, _epilogue) -> Step:
    if node.op == "fill":
        expr, operands = sympy.Float(node.attrs["value"]), []
    elif node.op == "broadcast_to":
        expr, operands = symbol(0), list(node.inputs)
    else:
        expr, operands = node.attrs["expr"], list(node.inputs)
    shapes = [o.shape for o in operands]
    label = "fill" if node.op == "fill" else "ew"
    return Step(node, operands,
                lambda m, name, threads: emit_elementwise(m, name, node.shape, shapes, expr, max_threads=threads),
                label, [node], flops=costs.elementwise_flops(node.size, [expr]))


def lower_elementwise_group(node, writes) -> Step:
    """One kernel computing the elementwise `node` and, as side stores, each in-place value of
    `writes` ((value node, the source it overwrites), each an `ew` operand of `node` of its
    shape): Adam's moments, stored beside the param they move, in one pass over memory."""
    expr, operands, side_stores = group_expression(node, writes)
    shapes = [o.shape for o in operands]
    return Step(node, operands,
                lambda m, name, threads: emit_elementwise(m, name, node.shape, shapes, expr, max_threads=threads,
                                                          side_stores=side_stores),
                f"ew+{len(writes)} in place", [value for value, _ in writes] + [node],
                flops=costs.elementwise_flops(node.size, [expr] + [e for _, e in side_stores]),
                side_writes=[source for _, source in writes])
