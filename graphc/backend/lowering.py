"""Lowering an optimized graph to steps: which kernel computes which node, with what fused in.

Each Step produces one IR node's value with one kernel (`Kernel`, codegen/kernel.py). Some nodes
need no step: inputs and params live in the caller's arrays, constants in the module, reshapes
alias their operand's buffer, and a 2-D transpose read only by matmuls is folded into the GEMM
as an operand layout. Some steps cover several nodes: a GEMM or a convolution absorbs the
bias-add and ReLU that follow it (its epilogue), and a GEMM any elementwise consumer whose other
operands are matrices of its shape (an SGD update, ReLU's backward), so the product is never
written to memory and read back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import llvmlite.ir as ir
import sympy

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.core.ir import Tensor
from graphc.core.scalar import Relu, symbol

NO_STEP_OPS = ("input", "param", "constant", "reshape")


@dataclasses.dataclass
class Step:
    node: Tensor                       # the node whose value this step writes
    operands: list[Tensor]             # nodes whose buffers the kernel reads, in kernel input order
    build: Callable[[ir.Module, str, int], Kernel]   # (module, function name, max_threads) -> Kernel
    label: str                         # what runs, for listings and profiles: "gemm+bias+relu"
    covers: list[Tensor]               # every IR node this step computes
    flops: int = 0


def alias_root(node: Tensor) -> Tensor:
    """The node whose buffer holds `node`'s value (reshapes share their operand's buffer)."""
    while node.op == "reshape":
        node = node.inputs[0]
    return node


class _Consumers:
    def __init__(self, nodes):
        self.of: dict[int, list[Tensor]] = {node.id: [] for node in nodes}
        for node in nodes:
            for operand in node.inputs:
                self.of[operand.id].append(node)

    def only(self, node: Tensor) -> Tensor | None:
        users = self.of[node.id]
        return users[0] if len(users) == 1 else None


def plan_steps(graph, outputs: list[Tensor]) -> list[Step]:
    """Steps computing every node `outputs` need, in the graph's (topological) order."""
    nodes = graph.ancestors(outputs)
    consumers = _Consumers(nodes)
    output_ids = {out.id for out in outputs}
    absorbed: set[int] = set()
    steps = []
    for node in nodes:
        if node.op in NO_STEP_OPS or node.id in absorbed:
            continue
        if node.op == "transpose" and _folds_into_gemm(node, consumers):
            continue
        epilogue = None
        if node.op in ("matmul", "conv2d") and node.id not in output_ids:
            epilogue = _bias_epilogue(node, consumers, "col" if node.op == "matmul" else "row")
            if epilogue is None and node.op == "matmul":
                epilogue = _elementwise_epilogue(node, consumers)
            if epilogue is not None and epilogue.node.id in absorbed:
                epilogue = None  # a sum of two products: the other product already took it
        elif node.op in EPILOGUE_TAKING_OPS and node.id not in output_ids:
            epilogue = _elementwise_epilogue(node, consumers)
            if epilogue is not None and epilogue.node.id in absorbed:
                epilogue = None
        if epilogue is not None:
            absorbed.add(epilogue.node.id)
        steps.append(_LOWERINGS[node.op](node, epilogue))
    return steps


# ---- patterns -----------------------------------------------------------------------------

def _is_2d_swap(node: Tensor) -> bool:
    return node.op == "transpose" and node.attrs["axes"] == (1, 0)


def _folds_into_gemm(node: Tensor, consumers: _Consumers) -> bool:
    users = consumers.of[node.id]
    return _is_2d_swap(node) and bool(users) and all(user.op == "matmul" for user in users)


@dataclasses.dataclass
class _Epilogue:
    node: Tensor        # the ew node whose value the fused step writes
    bias: Tensor | None = None     # the bias operand
    relu: bool = False
    expr: sympy.Expr | None = None  # a general epilogue: x0 the product, x1.. the `operands`
    operands: tuple = ()            # (M, N) operands of `expr`


# A general epilogue reads its operands while C is being written, so C must be final after one K
# block (see emit_gemm); more operands than this would spill the micro-kernel's registers.
MAX_EPILOGUE_OPERANDS = 4

# Pooling gradients and the conv input gradient take their elementwise consumer (ReLU's
# backward) as an epilogue.
EPILOGUE_TAKING_OPS = ("avg_pool2d_grad", "max_pool2d_grad", "conv2d_input_grad")


def _elementwise_epilogue(producer: Tensor, consumers: _Consumers) -> _Epilogue | None:
    """An elementwise consumer of a GEMM, a pooling gradient or a conv input gradient whose
    other operands all have its shape: the SGD update of a weight from its gradient, ReLU's
    backward after an input gradient, ..."""
    user = consumers.only(producer)
    if user is None or user.op != "ew" or user.shape != producer.shape:
        return None
    others = [t for t in user.inputs if t is not producer]
    if producer.op == "matmul" and _gemm_plan(producer).k_blocks > 1:
        return None
    if (len(others) > MAX_EPILOGUE_OPERANDS
            or any(t.shape != producer.shape or t.dtype != "float32" for t in others)):
        return None
    if producer.op == "matmul":
        product_operands = {alias_root(t).id for t in producer.inputs} | \
            {alias_root(t.inputs[0]).id for t in producer.inputs if _is_2d_swap(t)}
        if any(alias_root(t).id in product_operands for t in others):
            # The fused step may write its result over an operand (a param updated in place);
            # the GEMM must not be reading that same buffer as A or B meanwhile.
            return None
    elif any(alias_root(t).op == "param" for t in others):
        # A param operand may be the buffer the fused step writes in place (an SGD update of
        # an input being trained): these kernels write a whole plane or sample of their
        # result before applying the epilogue to it, which would then read the operand
        # already overwritten. (ReLU's backward, their reason to fuse, reads activations.)
        return None
    renames = {symbol(i): symbol(0) if t is producer else symbol(1 + others.index(t))
               for i, t in enumerate(user.inputs)}
    return _Epilogue(user, expr=user.attrs["expr"].xreplace(renames), operands=tuple(others))


def _bias_epilogue(producer: Tensor, consumers: _Consumers, kind: str) -> _Epilogue | None:
    """`relu(producer + bias)` or `producer + bias` right after a GEMM or conv, if fusable.

    kind "col": a bias of N values added to every row of an (M, N) matmul;
    kind "row": one value per output channel of an (N, O, H, W) convolution.
    """
    user = consumers.only(producer)
    if user is None or user.op != "ew" or user.shape != producer.shape or len(user.inputs) != 2:
        return None
    i = user.inputs.index(producer)
    bias = user.inputs[1 - i]
    if bias.dtype != "float32":
        return None
    channels = producer.shape[1]
    if kind == "col" and bias.shape not in ((channels,), (1, channels)):
        return None
    if kind == "row" and bias.shape not in ((channels,), (1, channels, 1, 1)):
        return None
    total = symbol(i) + symbol(1 - i)
    expr = user.attrs["expr"]
    if expr == total:
        return _Epilogue(user, bias, relu=False)
    if expr == Relu(total):
        return _Epilogue(user, bias, relu=True)
    return None


# ---- one lowering per op ----------------------------------------------------------------------

def _elementwise(node, _epilogue):
    from graphc.backend.kernels.elementwise import emit_elementwise
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
                label, [node], flops=node.size * max(1, sympy.count_ops(expr)))


def _gemm_plan(node):
    """The host's GEMM plan for a matmul node (what `_matmul` will emit)."""
    from graphc.backend.kernels.gemm import plan_gemm
    a, b = node.inputs
    return plan_gemm(a.shape[0], b.shape[1], a.shape[1], trans_a=_is_2d_swap(a), trans_b=_is_2d_swap(b))


def _matmul(node, epilogue):
    from graphc.backend.kernels.gemm import emit_gemm, gemm_workspace_floats
    a, b = node.inputs
    trans_a, trans_b = _is_2d_swap(a), _is_2d_swap(b)
    a_src = a.inputs[0] if trans_a else a
    b_src = b.inputs[0] if trans_b else b
    M, K = a.shape
    N = b.shape[1]
    epilogue = epilogue or _Epilogue(node)
    has_bias = epilogue.bias is not None
    operands = [a_src, b_src] + ([epilogue.bias] if has_bias else []) + list(epilogue.operands)

    def build(module, name, threads):
        gemm = emit_gemm(module, f"{name}.gemm", M, N, K, trans_a=trans_a, trans_b=trans_b,
                         bias="col" if has_bias else None, relu=epilogue.relu,
                         epilogue=epilogue.expr, epilogue_operands=len(epilogue.operands))
        gemm.linkage = "internal"
        fn, kb = phase_function(module, name, len(operands))
        out, ins, scratch, tid, nthreads = phase_args(fn)
        bias_ptr = ins[2] if has_bias else ir.Constant(ins[0].type, None)
        extras = ins[3:] if has_bias else ins[2:]
        kb.b.call(gemm, [ins[0], ins[1], out, bias_ptr, scratch, tid, nthreads] + list(extras))
        kb.b.ret_void()
        return Kernel([fn], gemm_workspace_floats(M, N, K, trans_a=trans_a, trans_b=trans_b, nthreads=threads))

    label = ("gemm" + ("T" if trans_a else "") + ("+bias" if has_bias else "") + ("+relu" if epilogue.relu else "")
             + ("+ew" if epilogue.expr is not None else ""))
    folded = [t for t, is_folded in ((a, trans_a), (b, trans_b)) if is_folded]
    covers = folded + [node] + ([epilogue.node] if epilogue.node is not node else [])
    return Step(epilogue.node, operands, build, label, covers, flops=2 * M * N * K)


def _conv2d(node, epilogue):
    from graphc.backend.kernels.conv import emit_conv2d
    x, w = node.inputs
    operands = [x, w] + ([epilogue.bias] if epilogue else [])
    relu = bool(epilogue and epilogue.relu)
    attrs = node.attrs
    build = lambda m, name, threads: emit_conv2d(m, name, x.shape, w.shape, attrs["stride"], attrs["padding"],  # noqa: E731
                                                 bias=epilogue is not None, relu=relu, max_threads=threads)
    label = "conv2d" + ("+bias" if epilogue else "") + ("+relu" if relu else "")
    covers = [node] + ([epilogue.node] if epilogue else [])
    return Step(epilogue.node if epilogue else node, operands, build, label, covers,
                flops=2 * node.size * math.prod(w.shape[1:]))


def _conv2d_input_grad(node, epilogue):
    from graphc.backend.kernels.conv import emit_conv2d_input_grad
    g, w = node.inputs
    a = node.attrs
    return _with_elementwise_epilogue(
        node, epilogue, lambda m, name, threads, **fused: emit_conv2d_input_grad(
            m, name, g.shape, w.shape, a["x_shape"], a["stride"], a["padding"], max_threads=threads, **fused),
        flops=2 * g.size * math.prod(w.shape[1:]))


def _with_elementwise_epilogue(node, epilogue: _Epilogue | None, emit, flops: int) -> Step:
    """The step of a kernel that may take its elementwise consumer as an epilogue (pooling and
    conv input gradients): its inputs are the node's, then the epilogue's operands; `emit`
    takes `epilogue` and `epilogue_operands` when there is one."""
    if epilogue is None:
        return Step(node, list(node.inputs), emit, node.op, [node], flops=flops)
    fused = dict(epilogue=epilogue.expr, epilogue_operands=len(epilogue.operands))
    return Step(epilogue.node, list(node.inputs) + list(epilogue.operands),
                lambda m, name, threads: emit(m, name, threads, **fused),
                node.op + "+ew", [node, epilogue.node], flops=flops)


def _conv2d_weight_grad(node, _epilogue):
    from graphc.backend.kernels.conv import emit_conv2d_weight_grad
    x, g = node.inputs
    a = node.attrs
    return Step(node, [x, g],
                lambda m, name, threads: emit_conv2d_weight_grad(m, name, x.shape, g.shape, a["w_shape"], a["stride"],
                                                                 a["padding"], max_threads=threads),
                "conv2d_weight_grad", [node], flops=2 * g.size * math.prod(a["w_shape"][1:]))


def _pool(emitter_name, x_shape_of):
    def lower(node, epilogue):
        from graphc.backend.kernels import pool as pool_kernels
        emit = getattr(pool_kernels, emitter_name)
        a = node.attrs
        x_shape = x_shape_of(node)
        return _with_elementwise_epilogue(
            node, epilogue, lambda m, name, threads, **fused: emit(
                m, name, x_shape, a["kernel"], a["stride"], a["padding"], max_threads=threads, **fused),
            flops=node.size * math.prod(a["kernel"]))
    return lower


def _sum(node, _epilogue):
    from graphc.backend.kernels.misc import emit_sum
    x = node.inputs[0]
    return Step(node, [x], lambda m, name, threads: emit_sum(m, name, x.shape, node.attrs["axes"], max_threads=threads),
                "sum", [node], flops=x.size)


def _softmax(node, _epilogue):
    from graphc.backend.kernels.misc import emit_softmax
    return Step(node, [node.inputs[0]],
                lambda m, name, threads: emit_softmax(m, name, node.shape, node.attrs["axis"], max_threads=threads),
                "softmax", [node], flops=4 * node.size)


def _softmax_cross_entropy(node, _epilogue):
    from graphc.backend.kernels.misc import emit_softmax_cross_entropy
    logits = node.inputs[0]
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_softmax_cross_entropy(m, name, logits.shape, max_threads=threads),
                "softmax_cross_entropy", [node], flops=4 * logits.size)


def _one_hot(node, _epilogue):
    from graphc.backend.kernels.misc import emit_one_hot
    return Step(node, [node.inputs[0]],
                lambda m, name, threads: emit_one_hot(m, name, node.shape[0], node.attrs["classes"],
                                                      max_threads=threads),
                "one_hot", [node], flops=0)


def _transpose(node, _epilogue):
    from graphc.backend.kernels.misc import emit_transpose
    x = node.inputs[0]
    return Step(node, [x], lambda m, name, threads: emit_transpose(m, name, x.shape, node.attrs["axes"],
                                                                    max_threads=threads),
                "transpose", [node], flops=0)


def copy_step(node: Tensor, source: Tensor) -> Step:
    """A step copying `source`'s buffer into `node`'s (materializes an output that aliases another value)."""
    from graphc.backend.kernels.misc import emit_copy
    return Step(node, [source], lambda m, name, threads: emit_copy(m, name, node.size, max_threads=threads),
                "copy", [], flops=0)


_LOWERINGS = {
    "ew": _elementwise,
    "fill": _elementwise,
    "broadcast_to": _elementwise,
    "matmul": _matmul,
    "conv2d": _conv2d,
    "conv2d_input_grad": _conv2d_input_grad,
    "conv2d_weight_grad": _conv2d_weight_grad,
    "avg_pool2d": _pool("emit_avg_pool2d", lambda n: n.inputs[0].shape),
    "avg_pool2d_grad": _pool("emit_avg_pool2d_grad", lambda n: n.attrs["x_shape"]),
    "max_pool2d": _pool("emit_max_pool2d", lambda n: n.inputs[0].shape),
    "max_pool2d_grad": _pool("emit_max_pool2d_grad", lambda n: n.inputs[0].shape),
    "sum": _sum,
    "softmax": _softmax,
    "softmax_cross_entropy": _softmax_cross_entropy,
    "one_hot": _one_hot,
    "transpose": _transpose,
}


def kernel_groups(graph, outputs: list[Tensor]) -> dict[int, str]:
    """node id -> "k<i> <kernel>" for every node a kernel computes: fusion groups, for display."""
    groups = {}
    for i, step in enumerate(plan_steps(graph, outputs)):
        for node in step.covers:
            groups[node.id] = f"k{i} {step.label}"
    return groups
