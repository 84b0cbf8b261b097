"""What a kernel family declares for each op it computes, beside its emitters.

A family registers one `Lowering` per op with `@lowers(...)`: the function that turns a node
(and the consumer it absorbed, if any) into a `Step`, and the fusion rules lowering.py applies
before calling it: which epilogue the kernel can take, which operand layouts it reads in place,
which integer inputs it indexes by. A new primitive with its own kernel is then its op file in
graphc/core/ops/ and its family's file in graphc/backend/kernels/.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import llvmlite.ir as ir
import sympy

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel
from graphc.core.ir import Tensor
from graphc.core.scalar import symbol

__all__ = ["Step", "Epilogue", "Lowering", "LOWERINGS", "ALIASES", "lowers", "alias_root",
           "step_with_elementwise_epilogue", "UpdateGroup", "group_expression"]


@dataclasses.dataclass
class Step:
    node: Tensor                       # the node whose value this step writes
    operands: list[Tensor]             # nodes whose buffers the kernel reads, in kernel input order
    build: Callable[[ir.Module, str, int], Kernel]   # (module, function name, max_threads) -> Kernel
    label: str                         # what runs, for listings and profiles: "gemm+bias+relu"
    covers: list[Tensor]               # every IR node this step computes
    # The FLOPs of everything the step covers, by the rules of costs.py (an FMA is 2, fused
    # epilogues count as if unfused; the dropout mask counts FLOP equivalents)
    flops: int = 0
    # Sources (params, state) whose buffers the step also overwrites, beside its node's own:
    # in-place updates computed with it (an optimizer's moments beside the param they move)
    side_writes: list[Tensor] = dataclasses.field(default_factory=list)
    # Further nodes whose values the step writes, each to a buffer of its own passed after the
    # operands (sums computed in one pass over the data they share)
    extra_outputs: list[Tensor] = dataclasses.field(default_factory=list)
    # The operand whose values the kernel copies into its result, skipping the copy when the
    # two are one buffer: the assembler may have the operand's kernel write there directly
    forwards_operand: int | None = None
    # Given row sums over (N, H, W) of this step's (N, C, H, W) result, and of values computed
    # before it, and variances about the mean of one of them ((sum step, mean node) pairs), the
    # step computing them too, sample by sample as its kernel writes the result (a
    # convolution's: kernels/conv/channel_sums.py); None where the kernel cannot
    with_channel_sums: Callable[[list["Step"], list], "Step"] | None = None

    @property
    def outputs(self) -> list[Tensor]:
        """Every node whose value the step writes to a buffer of its own: its node, then the
        extra outputs (side writes go to their sources' buffers)."""
        return [self.node, *self.extra_outputs]

    @property
    def bytes_moved(self) -> int:
        """The least the kernel must move: each distinct buffer it reads, once, plus its
        outputs' and its side writes' buffers, once each, at the dtype's size (costs.py)."""
        return costs.bytes_moved([alias_root(t) for t in self.operands], [*self.outputs, *self.side_writes])


@dataclasses.dataclass
class Epilogue:
    """A consumer a kernel computes as it writes its result."""

    node: Tensor                    # the ew node whose value the fused step writes
    bias: Tensor | None = None      # the bias operand
    relu: bool = False
    expr: sympy.Expr | None = None  # a general epilogue: x0 the kernel's result, x1.. the `operands`
    operands: tuple = ()            # operands of `expr`, each of the result's shape (or one element)
    # (k, e): also store e(x0, x1, ...) into operand x_k, an in-place update computed beside the
    # result (Adam's moments beside the param); `absorbed` the nodes those values stand for
    side_stores: tuple = ()
    absorbed: tuple = ()


@dataclasses.dataclass
class UpdateGroup:
    """An in-place update (`update`, e.g. a param's new value) and the in-place values only it
    reads (`writes`: (value, the source it overwrites), e.g. Adam's moments): one kernel
    computes them all and stores each."""

    update: Tensor
    writes: list

    @property
    def member_ids(self) -> set[int]:
        return {self.update.id} | {value.id for value, _ in self.writes}


def group_expression(update: Tensor, writes: list, first: Tensor | None = None):
    """(expr, operands, side_stores) computing a group in one kernel: `expr` the update's value
    over x0.. = `operands` (starting with `first`, a producer's result, if given), each value of
    `writes` inlined; side_stores the (k, e) storing each value into its source, operand k."""
    operands: list = [first] if first is not None else []

    def index_of(t) -> int:
        if t not in operands:
            operands.append(t)
        return operands.index(t)

    def over_operands(expr, inputs, inlined):
        return expr.xreplace({symbol(i): inlined[t.id] if t.id in inlined else symbol(index_of(t))
                              for i, t in enumerate(inputs)})

    inner = {value.id: over_operands(value.attrs["expr"], value.inputs, {}) for value, _ in writes}
    expr = over_operands(update.attrs["expr"], update.inputs, inner)
    side_stores = tuple((index_of(source), inner[value.id]) for value, source in writes)
    return expr, operands, side_stores


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How an op becomes a Step, and what the step may absorb.

    bias_epilogue: "col" (a bias of N values on an (M, N) result) or "row" (one value per
        channel of an (N, C, H, W) result): absorbs `result + bias` and `relu(result + bias)`.
    elementwise_epilogue: absorbs an elementwise consumer whose other operands have the
        result's shape, if `epilogue_allowed(node, others)` agrees.
    scalar_epilogue_operands: the elementwise epilogue may also read operands of one element
        (a learning rate set between calls), broadcast to every element.
    folds_operand: an operand layout (a node) the kernel reads in place instead of a copy.
    label_range: (the integer input node, its class count) for inputs the kernel indexes by;
        the runtime checks them before native code runs.
    prologue: absorbs the elementwise producer of its only operand when nothing else reads it.
    """

    lower: Callable[[Tensor, Epilogue | None], Step]
    bias_epilogue: str | None = None
    elementwise_epilogue: bool = False
    epilogue_allowed: Callable[[Tensor, list[Tensor]], bool] | None = None
    scalar_epilogue_operands: bool = False
    folds_operand: Callable[[Tensor], bool] | None = None
    label_range: Callable[[Tensor], tuple[Tensor, int]] | None = None
    # (node, its operand's elementwise producer) -> a Step computing both, or None: the kernel
    # evaluates the producer's expression as it reads the operand (a sum of products)
    prologue: Callable[[Tensor, Tensor], Step | None] | None = None


LOWERINGS: dict[str, Lowering] = {}


def lowers(*ops: str, **rules) -> Callable:
    """Register the decorated function as the lowering of `ops`, with `rules` (see Lowering)."""
    def register(lower):
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"op {op!r} already has a lowering ({LOWERINGS[op].lower.__qualname__})")
            LOWERINGS[op] = Lowering(lower, **rules)
        return lower
    return register


# Ops whose value a node may keep in its first operand's buffer, as every reshape does: op ->
# rule(node) saying whether this node does (an all-reduce of one value, summed in place).
ALIASES: dict[str, Callable[[Tensor], bool]] = {}


def alias_root(node: Tensor) -> Tensor:
    """The node whose buffer holds `node`'s value (reshapes share their operand's buffer)."""
    while node.op == "reshape" or node.op in ALIASES and ALIASES[node.op](node):
        node = node.inputs[0]
    return node


def step_with_elementwise_epilogue(node, epilogue: Epilogue | None, emit, flops: int) -> Step:
    """The step of a kernel that may take its elementwise consumer as an epilogue (pooling and
    conv input gradients): its inputs are the node's, then the epilogue's operands; `emit`
    takes `epilogue` and `epilogue_operands` when there is one (and any further keyword the
    step's `build` is called with). `flops` are the kernel's own;
    the epilogue's are added."""
    if epilogue is None:
        return Step(node, list(node.inputs), emit, node.op, [node], flops=flops)
    fused = dict(epilogue=epilogue.expr, epilogue_operands=len(epilogue.operands))
    return Step(epilogue.node, list(node.inputs) + list(epilogue.operands),
                lambda m, name, threads, **more: emit(m, name, threads, **fused, **more),
                node.op + "+ew", [node, epilogue.node],
                flops=flops + costs.elementwise_flops(node.size, [epilogue.expr]))


def no_param_operands(producer: Tensor, others: list[Tensor]) -> bool:
    """An epilogue rule for kernels that write a whole plane or sample of their result before
    applying the epilogue to it: a param operand may be the very buffer the step updates in
    place, which the epilogue would then read already overwritten."""
    return not any(alias_root(t).op == "param" for t in others)
