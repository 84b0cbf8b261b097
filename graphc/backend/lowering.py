"""Lowering an optimized graph to steps: which kernel computes which node, with what fused in.

Each Step produces one IR node's value with one kernel (`Kernel`, emit/kernel.py), and some a
few more (row sums over the same data, in one pass: `Step.extra_outputs`). Some nodes
need no step: inputs and params live in the caller's arrays, constants in the module, reshapes
alias their operand's buffer, and an operand layout a kernel reads in place (a 2-D transpose
read only by matmuls) is folded into that kernel. Some steps cover several nodes: a GEMM or a
convolution absorbs the bias-add and ReLU that follow it (its epilogue), and a GEMM, a pooling
gradient or a conv input gradient its elementwise consumer (an SGD update, ReLU's backward), so
the result is never written to memory and read back.

What each op may absorb, and how it becomes a step, its kernel family declares beside its
emitters (lowering_rules.py, graphc/backend/kernels/); this module applies those rules.
"""
from __future__ import annotations

import graphc.backend.kernels  # noqa: F401 (the kernel families register their lowerings)
from graphc.backend.kernels.elementwise import lower_elementwise_group
from graphc.backend.kernels.reduce import (MAX_SUMS_IN_ONE_PASS, Prologue, joins_row_sums, row_sum_kind, row_sum_member,
                                          row_sums_in_one_pass)
from graphc.backend.lowering_rules import LOWERINGS, Epilogue, Step, UpdateGroup, alias_root, group_expression
from graphc.core.ir import Tensor
from graphc.core.scalar import Relu, symbol

__all__ = ["NO_STEP_OPS", "Step", "alias_root", "plan_steps", "kernel_groups", "MAX_EPILOGUE_OPERANDS"]

NO_STEP_OPS = ("input", "param", "constant", "reshape")


class _Consumers:
    def __init__(self, nodes):
        self.of: dict[int, list[Tensor]] = {node.id: [] for node in nodes}
        for node in nodes:
            for operand in node.inputs:
                self.of[operand.id].append(node)

    def only(self, node: Tensor) -> Tensor | None:
        users = self.of[node.id]
        return users[0] if len(users) == 1 else None


def plan_steps(graph, outputs: list[Tensor], inplace: dict[int, Tensor] | None = None) -> list[Step]:
    """Steps computing every node `outputs` need, in the graph's (topological) order.

    `inplace` maps the id of each output written over a source (a param's or a state buffer's
    new value) to that source: such a value read only by another in-place update (Adam's
    moments, read by the param's update) is computed by that update's kernel, which stores it
    as a side write."""
    nodes = graph.ancestors(outputs)
    consumers = _Consumers(nodes)
    output_ids = {out.id for out in outputs}
    side_writes = _side_writes(nodes, consumers, inplace or {})
    absorbed: set[int] = {value.id for group in side_writes.values() for value, _ in group.writes}
    with_prologue = _prologues(nodes, consumers, output_ids, absorbed)
    absorbed.update(step.covers[0].id for step in with_prologue.values())
    steps = []
    for node in nodes:
        if (node.op in NO_STEP_OPS or node.id in absorbed
                or node.id not in output_ids and _folded_into_consumers(node, consumers)):
            continue
        rule = LOWERINGS.get(node.op)
        if rule is None:
            raise NotImplementedError(f"no kernel computes op {node.op!r} (%{node.id}, at {node.site})")
        if node.id in with_prologue:
            steps.append(with_prologue[node.id])
            continue
        if node.id in side_writes:
            group = side_writes[node.id]
            steps.append(lower_elementwise_group(group.update, group.writes))
            continue
        epilogue = None
        if node.id not in output_ids:
            if rule.bias_epilogue:
                epilogue = _bias_epilogue(node, consumers, rule.bias_epilogue)
            if epilogue is None and rule.elementwise_epilogue:
                epilogue = _elementwise_epilogue(node, consumers, rule.epilogue_allowed,
                                                 rule.scalar_epilogue_operands)
                if epilogue is not None and epilogue.node.id in side_writes:
                    epilogue = None   # that update computes more than this consumer sees
                if epilogue is None and rule.scalar_epilogue_operands:
                    epilogue = _update_group_epilogue(node, consumers, side_writes, rule.epilogue_allowed)
            if epilogue is not None and epilogue.node.id in absorbed:
                epilogue = None  # a sum of two products: the other product already took it
        if epilogue is not None:
            absorbed.add(epilogue.node.id)
            absorbed.update(t.id for t in epilogue.absorbed)
        steps.append(rule.lower(node, epilogue))
    steps = _channel_sums_in_producers(steps, output_ids)
    return _sums_in_one_pass(graph, steps, output_ids, inplace or {})


_SOURCE_OPS = ("input", "param", "constant")


def _channel_sums_in_producers(steps: list[Step], output_ids: set[int]) -> list[Step]:
    """Row sums over (N, H, W) of a step's (N, C, H, W) result (batch norm's statistics and
    backward sums after a convolution) computed by that step's kernel as it writes the result
    (`Step.with_channel_sums`), when every other value they read is ready by then: computed
    by an earlier step, or a source; and the variance Σ(y - mean)², its mean a function of
    the result's plain sum taken so, as a centered sum. At most `MAX_SUMS_IN_ONE_PASS` a step."""
    made_by: dict[int, int] = {}
    for i, step in enumerate(steps):
        for node in step.outputs:
            made_by[node.id] = i
    taken: dict[int, list[Step]] = {}
    centered: dict[int, list[tuple[Step, Tensor]]] = {}
    joined: set[int] = set()
    for i, step in enumerate(steps):
        member = row_sum_member(step)
        if member is None or step.node.id in output_ids or member[1] != (0, 2, 3) or len(member[0]) != 4:
            continue
        for t in step.operands:
            j = made_by.get(t.id)
            if (j is None or steps[j].node.id != t.id or steps[j].with_channel_sums is None
                    or steps[j].node.shape != member[0]
                    or len(taken.get(j, ())) + len(centered.get(j, ())) >= MAX_SUMS_IN_ONE_PASS):
                continue
            if _ready_before(step, j, steps, made_by):
                taken.setdefault(j, []).append(step)
            elif (mean := _centered_mean(step, steps[j], taken.get(j, []))) is not None:
                centered.setdefault(j, []).append((step, mean))
            else:
                continue
            joined.add(i)
            break
    return [step.with_channel_sums(taken[i], centered.get(i, [])) if i in taken else step
            for i, step in enumerate(steps) if i not in joined]


def _ready_before(step: Step, j: int, steps: list[Step], made_by: dict[int, int]) -> bool:
    """Whether every value `step` reads besides step j's result is a source or made before step j."""
    for t in step.operands:
        root = alias_root(t)
        if t.id != steps[j].node.id and not (made_by[root.id] < j if root.id in made_by else root.op in _SOURCE_OPS):
            return False
    return True


def _centered_mean(step: Step, producer: Step, taken: list[Step]) -> Tensor | None:
    """The mean m when `step` sums (y - m)², y the producer's result and m an elementwise
    function of y's plain sum, which the producer already computes (one of `taken`); else None."""
    prologue = row_sum_member(step)[2]
    if len(step.operands) != 2 or prologue.kinds != ("full", "per_output") or step.operands[0].id != producer.node.id:
        return None
    mean = step.operands[1]
    if prologue.expr != (symbol(0) - symbol(1)) ** 2 or mean.op != "ew" or len(mean.inputs) != 1:
        return None
    plain_sum = Prologue(symbol(0), ("full",))
    if not any(s.node.id == mean.inputs[0].id and row_sum_member(s)[2] == plain_sum
               and [t.id for t in s.operands] == [producer.node.id] for s in taken):
        return None
    return mean


def _sums_in_one_pass(graph, steps: list[Step], output_ids: set[int], inplace: dict[int, Tensor]) -> list[Step]:
    """Row sums over the same data, computed by one kernel in one pass (`row_sums_in_one_pass`):
    later sums join the first one's step. A sum joins only if it is not an output (it is
    written where a step's extra outputs go: the arena) and does not come after the group: it
    depends on no member, nor on an in-place update of a source a member reads (which must run
    after that read: the joined step would have to run both before and after it)."""
    of_kind: dict[tuple, list[int]] = {}
    for i, step in enumerate(steps):
        kind = row_sum_kind(step)
        if kind is not None:
            of_kind.setdefault(kind, []).append(i)
    grouped: dict[int, Step] = {}
    joined: set[int] = set()
    for members in of_kind.values():
        for position, i in enumerate(members):
            if i in joined:
                continue
            group = [steps[i]]
            for j in members[position + 1:]:
                other = steps[j]
                if j in joined or other.node.id in output_ids or not joins_row_sums(group, other):
                    continue
                if not _comes_after(graph, other, group, inplace):
                    group.append(other)
                    joined.add(j)
            if len(group) > 1:
                grouped[i] = row_sums_in_one_pass(group)
    return [grouped.get(i, step) for i, step in enumerate(steps) if i not in joined]


def _comes_after(graph, step: Step, group: list[Step], inplace: dict[int, Tensor]) -> bool:
    """Whether `step` must run after some member of `group`."""
    before = {node.id for node in graph.ancestors(step.operands)}
    if any(member.node.id in before for member in group):
        return True
    read = {alias_root(operand).id for member in group for operand in member.operands}
    return any(node_id in before and source.id in read for node_id, source in inplace.items())


def _update_group_epilogue(producer: Tensor, consumers: _Consumers, side_writes, allowed) -> Epilogue | None:
    """An in-place update and the side writes its kernel would store (see `_side_writes`), taken
    whole as the producer's epilogue when they are all the producer's consumers: Adam's moments
    and param update computed from the weight gradient as the GEMM writes it."""
    users = {user.id for user in consumers.of[producer.id]}
    for group in side_writes.values():
        if not users <= group.member_ids or group.update.shape != producer.shape:
            continue
        expr, operands, side_stores = group_expression(group.update, group.writes, first=producer)
        others = operands[1:]
        # one-element operands (learning rate, bias corrections) are loaded once per tile and
        # hold no register per row: only full-shaped ones count against the limit
        full = [t for t in others if t.shape == producer.shape]
        if (len(full) > MAX_EPILOGUE_OPERANDS or any(t.shape != producer.shape and t.size != 1 for t in others)
                or any(t.dtype != "float32" for t in others)
                or allowed is not None and not allowed(producer, others)):
            return None
        return Epilogue(group.update, expr=expr, operands=tuple(others), side_stores=side_stores,
                        absorbed=tuple(value for value, _ in group.writes))
    return None


def _side_writes(nodes, consumers: _Consumers, inplace: dict[int, Tensor]) -> dict[int, UpdateGroup]:
    """update node id -> the in-place values that the update's kernel also stores.

    A value qualifies when it is an elementwise in-place update of the update's shape that
    nothing else reads, and no producer's kernel would rather take it alone as its epilogue
    (SGD's momentum, fused into the weight gradient's GEMM, saves more there)."""
    found: dict[int, UpdateGroup] = {}
    for node in nodes:
        if node.op != "ew" or node.id not in inplace or node.dtype != "float32":
            continue
        writes = []
        for operand in dict.fromkeys(node.inputs):
            source = inplace.get(operand.id)
            if (source is None or operand.op != "ew" or operand.shape != node.shape or source.shape != node.shape
                    or any(user is not node for user in consumers.of[operand.id])
                    or _wanted_as_epilogue(operand, consumers)):
                continue
            writes.append((operand, source))
        if writes:
            found[node.id] = UpdateGroup(node, writes)
    return found


def _prologues(nodes, consumers: _Consumers, output_ids: set[int], taken: set[int]) -> dict[int, Step]:
    """node id -> its step with its operand's elementwise producer fused in (a sum of a
    product), where the producer has no other reader and no kernel would take it as its
    epilogue. The step's `covers` starts with the producer."""
    found: dict[int, Step] = {}
    for node in nodes:
        rule = LOWERINGS.get(node.op)
        if rule is None or rule.prologue is None or len(node.inputs) != 1:
            continue
        producer = node.inputs[0]
        if (producer.op != "ew" or producer.id in output_ids or producer.id in taken
                or consumers.of[producer.id] != [node] or _wanted_as_epilogue(producer, consumers)):
            continue
        step = rule.prologue(node, producer)
        if step is not None:
            found[node.id] = step
    return found


def _wanted_as_epilogue(value: Tensor, consumers: _Consumers) -> bool:
    for operand in value.inputs:
        rule = LOWERINGS.get(operand.op)
        if rule is not None and rule.elementwise_epilogue and consumers.only(operand) is value:
            return True
    return False


# ---- patterns -----------------------------------------------------------------------------

def _folded_into_consumers(node: Tensor, consumers: _Consumers) -> bool:
    """Every consumer's kernel reads `node`'s layout in place: no step computes it."""
    users = consumers.of[node.id]
    return bool(users) and all(
        (rule := LOWERINGS.get(user.op)) is not None and rule.folds_operand is not None and rule.folds_operand(node)
        for user in users)


# A general epilogue reads its operands while the result is being written; more operands than
# this would spill a GEMM micro-kernel's registers.
MAX_EPILOGUE_OPERANDS = 4


def _elementwise_epilogue(producer: Tensor, consumers: _Consumers, allowed, scalars: bool) -> Epilogue | None:
    """An elementwise consumer whose other operands all have the producer's shape (the SGD
    update of a weight from its gradient, ReLU's backward after an input gradient, ...), or
    one element if the family reads `scalars`, if the producer's kernel family `allowed` it."""
    user = consumers.only(producer)
    if user is None or user.op != "ew" or user.shape != producer.shape:
        return None
    others = [t for t in user.inputs if t is not producer]
    if (len(others) > MAX_EPILOGUE_OPERANDS
            or any(not (t.shape == producer.shape or scalars and t.size == 1) or t.dtype != "float32"
                   for t in others)):
        return None
    if allowed is not None and not allowed(producer, others):
        return None
    renames = {symbol(i): symbol(0) if t is producer else symbol(1 + others.index(t))
               for i, t in enumerate(user.inputs)}
    return Epilogue(user, expr=user.attrs["expr"].xreplace(renames), operands=tuple(others))


def _bias_epilogue(producer: Tensor, consumers: _Consumers, kind: str) -> Epilogue | None:
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
        return Epilogue(user, bias, relu=False)
    if expr == Relu(total):
        return Epilogue(user, bias, relu=True)
    return None


def kernel_groups(graph, outputs: list[Tensor]) -> dict[int, str]:
    """node id -> "k<i> <kernel>" for every node a kernel computes: fusion groups, for display."""
    groups = {}
    for i, step in enumerate(plan_steps(graph, outputs)):
        for node in step.covers:
            groups[node.id] = f"k{i} {step.label}"
    return groups
