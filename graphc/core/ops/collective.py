"""Collective ops: the gradients of a data-parallel training step averaged over the ranks.

A training step compiled with a communicator (`compile_training_step(..., comm=)`) gathers
values into buckets and averages each bucket over the ranks while the backward pass goes on:

    bucket = allreduce_start(v_1, ..., v_k, comm)     # the values, flattened, one after the other
    token  = allreduce_progress(bucket, comm)        # between later backward kernels
    mean_i = allreduce_done(bucket, comm, token)      # v_i averaged over the ranks

On one node (every rank sharing memory), the buckets live in memory the ranks share instead,
and MPI only synchronizes (`shared` = the number of ranks):

    bucket = allreduce_start(v_1, ..., v_k, comm)     # written into its bucket state, then
                                                      # "mine is written"
    mean_i = allreduce_done(bucket, comm, token)      # the ranks' buckets summed, one order everywhere
    token  = allreduce_finish(comm, results...)        # every rank has read every bucket

`comm` is the int32 State slot holding the MPI handles (backend/kernels/collective.py). In one
process, which is all the reference executor ever runs, the average over the ranks of a value
is the value itself: `allreduce_done` gives back its slice of the bucket, `allreduce_progress`
is a token of no meaning. None of them takes a gradient: the reduction sits between a backward
graph and the optimizer's update, and no one differentiates through it.
"""
from __future__ import annotations

import math

import numpy as np

from graphc.core.ir import Tensor
from graphc.core.ops.registry import Mismatch, OpDef, op, register

__all__ = ["allreduce_start", "allreduce_done", "allreduce_progress", "allreduce_finish"]


def _check_comm(comm: Tensor) -> None:
    if comm.dtype != "int32" or comm.ndim != 1:
        raise Mismatch(f"the communicator slot must be a 1-D int32 tensor, got {comm.dtype}{list(comm.shape)}")


@register
class AllreduceStart(OpDef):
    """values..., comm -> float32 (total size,): bucket number `bucket`, the values flattened
    and concatenated; native code then starts summing it over the ranks, in place."""

    name = "allreduce_start"
    vjp_rule = "no gradient: the reduction runs between the backward graph and the update"

    def infer(self, inputs, attrs):
        *values, comm = inputs
        _check_comm(comm)
        if not values:
            raise Mismatch("a bucket needs at least one value")
        for i, value in enumerate(values):
            if value.dtype != "float32":
                raise Mismatch(f"operand {i} must be float32, got {value.dtype}")
        return (sum(value.size for value in values),), "float32"

    def reference(self, args, attrs, node, float_dtype):
        return np.concatenate([np.asarray(value, dtype=float_dtype).reshape(-1) for value in args[:-1]])


@register
class AllreduceDone(OpDef):
    """bucket, comm, after... -> float32 `shape`: the bucket's elements [offset, offset +
    size) averaged over the ranks, once the bucket's reduction has finished. `after` are
    tokens that must come first (the progress calls)."""

    name = "allreduce_done"
    vjp_rule = "no gradient: the reduction runs between the backward graph and the update"

    def infer(self, inputs, attrs):
        bucket, comm, *_after = inputs
        _check_comm(comm)
        size = math.prod(attrs["shape"])
        if bucket.dtype != "float32" or bucket.ndim != 1:
            raise Mismatch(f"the bucket must be a 1-D float32 tensor, got {bucket.dtype}{list(bucket.shape)}")
        if not 0 <= attrs["offset"] <= bucket.size - size:
            raise Mismatch(f"elements [{attrs['offset']}, {attrs['offset'] + size}) lie outside the bucket of "
                           f"{bucket.size}")
        return tuple(attrs["shape"]), "float32"

    def reference(self, args, attrs, node, float_dtype):
        start = attrs["offset"]
        return np.asarray(args[0][start:start + math.prod(attrs["shape"])]).reshape(attrs["shape"])


@register
class AllreduceProgress(OpDef):
    """after, comm -> int32 (1,): a point of the schedule where the reductions of `buckets`,
    under way, are driven on (MPI progresses a nonblocking collective only inside MPI calls)."""

    name = "allreduce_progress"
    vjp_rule = "no gradient: a token"

    def infer(self, inputs, attrs):
        _after, comm = inputs
        _check_comm(comm)
        return (1,), "int32"

    def reference(self, args, attrs, node, float_dtype):
        return np.zeros(1, np.int32)


@register
class AllreduceFinish(OpDef):
    """comm, results... -> int32 (1,), a token: every rank has read every rank's buckets (the
    results are the step's values computed from them), so the next call may overwrite them."""

    name = "allreduce_finish"
    vjp_rule = "no gradient: a token"

    def infer(self, inputs, attrs):
        _check_comm(inputs[0])
        return (1,), "int32"

    def reference(self, args, attrs, node, float_dtype):
        return np.zeros(1, np.int32)


# Every op carries `abi`, the sizes the MPI library's handles have (backend/kernels/collective.py's
# MpiAbi as a tuple), which its kernel's calls are generated for.

def allreduce_start(values: list[Tensor], comm: Tensor, *, bucket: int, abi: tuple, **shared) -> Tensor:
    """`shared`: shared= the ranks sharing the buckets' memory; none: MPI sums."""
    return op("allreduce_start").apply(list(values) + [comm], bucket=bucket, abi=abi, **shared)


def allreduce_done(bucket_values: Tensor, comm: Tensor, *, offset: int, shape: tuple, bucket: int,
                   later: tuple[int, ...], abi: tuple, after: tuple[Tensor, ...] = (), **shared) -> Tensor:
    """`later`: the buckets still under way when this one is waited for, tested meanwhile.
    `shared`: shared= the ranks sharing the buckets' memory, window_offset= the bucket's bytes
    into each rank's part of it; none: MPI sums."""
    return op("allreduce_done").apply([bucket_values, comm, *after], offset=offset, shape=tuple(shape),
                                      bucket=bucket, later=tuple(later), abi=abi, **shared)


def allreduce_progress(after: Tensor, comm: Tensor, *, buckets: tuple[int, ...], abi: tuple) -> Tensor:
    return op("allreduce_progress").apply([after, comm], buckets=tuple(buckets), abi=abi)


def allreduce_finish(comm: Tensor, results: list[Tensor], *, abi: tuple) -> Tensor:
    return op("allreduce_finish").apply([comm, *results], abi=abi)
