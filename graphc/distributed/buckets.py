"""A data-parallel step's values averaged over the ranks: buckets planned by the backward's own
order, their all-reduces placed in the schedule where their last value is computed.

The values are the loss, the buffers' new values (batch norm's running statistics, so that
every rank keeps the same) and the gradients. Ordered by the graph's node order, which the
passes keep and the schedule follows (memory.schedule is a lexicographic topological sort),
they are cut into buckets of at most `bucket_bytes` (a larger value in one of its own). Then:

- `averaged_values` builds, on the training graph, one `allreduce_start` per bucket and one
  `allreduce_done` per value, all after the backward;
- `_placed` copies the graph moving each start right after the last node its bucket needs,
  and putting an `allreduce_progress` after every later backward node that does real work,
  so that the reductions advance while the backward goes on; the dones stay at the end, each
  where the optimizer's update of its value will be fused into it.

With `shared` ranks on one node, each bucket is a State of its own ("mpi:bucket<b>") in memory
the ranks share (distributed/shared_window.py), which its start writes in place (or, for a
bucket of one value, the kernel computing it: the assembler elides the copy) before telling
the other ranks; the done sums every rank's copy. `shared_writes` gives these writes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from graphc.core.ir import Graph, Tensor
from graphc.core.ops.collective import allreduce_done, allreduce_progress, allreduce_start
from graphc.transforms.rebuild import DECLARED_OPS, rebuild

__all__ = ["DEFAULT_BUCKET_BYTES", "BUCKET_STATE", "FINISHED_STATE", "declare_comm_slot", "averaged_values",
           "shared_writes", "window_layout"]

DEFAULT_BUCKET_BYTES = 64 * 1024
BUCKET_STATE = "mpi:bucket"      # + the bucket's number: its State in shared memory
FINISHED_STATE = "mpi:finished"  # the finish barrier's token
WINDOW_ALIGNMENT = 64

_SOURCE_AND_COLLECTIVE_OPS = frozenset({"input", "param", "allreduce_start", "allreduce_progress", "allreduce_done"})
# Ops whose kernels are cheap next to an MPI_Test (moving data, elementwise work, which fusion
# mostly folds into other kernels): no progress point after them.
_CHEAP_OPS = frozenset({"ew", "fill", "broadcast_to", "reshape", "transpose", "slice", "pad", "concat", "constant",
                        "one_hot"})


def declare_comm_slot(graph: Graph, name: str, values: int, shared: int = 0) -> Tensor:
    """The communicator slot (backend/kernels/collective.py's words, as int32 pairs), with room
    for a request per value (and the bases of `shared` ranks): declared before the backward,
    so that placed starts can read it."""
    from graphc.backend.kernels.collective import slot_words
    return graph.param(name, (2 * slot_words(values, shared),), "int32")


@dataclasses.dataclass
class _Bucket:
    index: int
    members: list[int]      # positions in the values list
    ready: int              # id of the last node computing a member (-1: all are sources)


def plan_buckets(values: list[Tensor], bucket_bytes: int) -> list[_Bucket]:
    """Values by the order they are computed in, cut into buckets of at most `bucket_bytes`
    (a larger value alone in its own)."""
    def ready(value: Tensor) -> int:
        return -1 if value.op in DECLARED_OPS else value.id

    order = sorted(range(len(values)), key=lambda i: ready(values[i]))
    buckets, current, held = [], [], 0
    for i in order:
        size = values[i].size * np.dtype(values[i].dtype).itemsize
        if current and held + size > bucket_bytes:
            buckets.append(current)
            current, held = [], 0
        current.append(i)
        held += size
    if current:
        buckets.append(current)
    return [_Bucket(b, members, max(ready(values[i]) for i in members)) for b, members in enumerate(buckets)]


def window_layout(sizes: list[int]) -> list[int]:
    """Byte offsets of buckets of `sizes` float32 elements in a rank's part of the shared
    memory, each on a cache line of its own."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-4 * size // WINDOW_ALIGNMENT) * WINDOW_ALIGNMENT
    return offsets


def averaged_values(graph: Graph, values: list[Tensor], comm: Tensor, *, abi: tuple, bucket_bytes: int,
                    shared: int = 0) -> tuple[Graph, list[Tensor]]:
    """A copy of `graph` computing, besides its nodes, each of `values` averaged over the ranks
    (in one process, the value itself); returns it and the averages, in the order of `values`.
    `shared`: the number of ranks, if they sum the buckets in memory they share, whose States
    the copy declares (0: MPI sums them)."""
    buckets = plan_buckets(values, bucket_bytes)
    count = len(buckets)
    sizes = [sum(values[i].size for i in bucket.members) for bucket in buckets]
    offsets = window_layout(sizes)
    for b, size in enumerate(sizes if shared else []):
        graph.param(f"{BUCKET_STATE}{b}", (size,))
    starts, averages = {}, [None] * len(values)
    for bucket in buckets:
        members = [values[i] for i in bucket.members]
        start = allreduce_start(members, comm, bucket=bucket.index, abi=abi, **({"shared": shared} if shared else {}))
        starts[start.id] = bucket
        where = dict(shared=shared, window_offset=offsets[bucket.index]) if shared else {}
        offset = 0
        for i, value in zip(bucket.members, members):
            averages[i] = allreduce_done(start, comm, offset=offset, shape=value.shape, bucket=bucket.index,
                                         later=tuple(range(bucket.index + 1, count)), abi=abi, **where)
            offset += value.size
    return _placed(graph, averages, comm, starts, abi)


def shared_writes(graph: Graph) -> list[tuple[str, Tensor]]:
    """(bucket State name, the start writing it) of each shared-memory bucket of `graph`: the
    in-place writes that put each rank's bucket where the others read it."""
    return [(f"{BUCKET_STATE}{node.attrs['bucket']}", node) for node in graph.nodes
            if node.op == "allreduce_start" and node.attrs.get("shared")]


def _placed(graph: Graph, outputs: list[Tensor], comm: Tensor, starts: dict[int, _Bucket], abi: tuple
            ) -> tuple[Graph, list[Tensor]]:
    """`graph` copied with each start moved up to right after its bucket's last value, and a
    progress point after each later backward node with real work (see the module's doc)."""
    # A bucket whose values are all ready before the comm slot exists (the loss, batch norm's
    # statistics) starts at the first node after it: the backward's first.
    first_after_comm = min((node.id for node in graph.ancestors(outputs)
                            if node.id > comm.id and node.op not in _SOURCE_AND_COLLECTIVE_OPS), default=None)
    by_ready: dict[int, list[Tensor]] = {}
    for node_id, bucket in starts.items():
        trigger = bucket.ready if bucket.ready > comm.id else first_after_comm
        if trigger is not None:          # else it stays where it is: nothing follows the comm slot
            by_ready.setdefault(trigger, []).append(graph.nodes[node_id])
    placed: dict[int, Tensor] = {}       # start id in `graph` -> its copy, built early
    started: list[int] = []              # buckets started so far, in order
    token: list[Tensor] = []             # the last progress point's token
    first_start = graph.nodes[min(starts, key=lambda node_id: starts[node_id].index)]
    first_done = next(out for out in outputs if out.inputs[0] is first_start)   # it keeps the tokens alive

    def place(rewrite):
        node = rewrite.node
        if node.id in placed:
            return placed[node.id]
        if node is first_done and token:
            return rewrite.apply("allreduce_done", rewrite.operands + [token[0]], **node.attrs)
        triggered = by_ready.get(node.id, [])
        progress = bool(started) and node.is_backward and node.op not in _CHEAP_OPS
        if not triggered and not progress:
            return None
        copy = rewrite.copy()
        for start in triggered:      # MPI_Iallreduce drives the earlier buckets on, as a test would
            operands = [copy if operand is node else rewrite.new(operand) for operand in start.inputs]
            placed[start.id] = rewrite.apply("allreduce_start", operands, **start.attrs)
            started.append(start.attrs["bucket"])
        if progress and not triggered:
            after = token[0] if token else placed[first_start.id]
            token[:] = [allreduce_progress(after, rewrite.new(comm), buckets=tuple(started), abi=abi)]
        return copy

    new_graph, new_outputs = rebuild(graph, outputs, place)
    _restore_provenance(new_graph, {bucket.index: graph.nodes[node_id] for node_id, bucket in starts.items()})
    return new_graph, new_outputs


def _restore_provenance(graph: Graph, starts: dict[int, Tensor]) -> None:
    """A start built early was stamped with the provenance of the node it follows: give it its
    own back (the line that asked for the step; no forward node: the reduction is not part of
    any one gradient). Assigned on a graph nothing else has seen yet, as rebuild does."""
    for node in graph.nodes:
        if node.op == "allreduce_start":
            original = starts[node.attrs["bucket"]]
            node.site, node.origin, node.grad_of = original.site, original, None
