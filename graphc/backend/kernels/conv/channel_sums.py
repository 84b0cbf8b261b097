"""Per-channel sums of a convolution's result, computed by the conv kernel itself.

Batch norm after a convolution needs, per channel, Σy over (N, H, W) in the forward and Σdy,
Σdy·(x - mean) in the backward, where y and dy are conv results (a forward conv's output, an
input gradient's dx after ReLU's backward). Summed by separate kernels, each is one more pass
over a tensor that has left the cache (ResNet-20: 8 MB a tensor at B = 128). Here the conv
kernel sums each sample's planes right after writing them, while they are in L2 (64 KB a
sample in ResNet's stages), and only the sums' other operands come from memory.

Each sample's sums go to `partials` (scratch): [member][channel][sample]. A last phase adds
each channel's partials over the samples in order, so the results do not depend on how the
threads split the batch. A member is a row-sum prologue (reduce.py's `Prologue`) over the
conv's result and the kernel's further inputs.

A centered member is batch norm's variance sum, Σ(y - mean)², whose mean comes from a member's
Σy, known only once every sample is summed. Each sample keeps Σ(y - c)² and Σ(y - c) about its
own mean c (its planes are still in cache); the last phase adds them up about the batch mean m:
Σ(y - m)² = Σ(y - c)² + 2(c - m)Σ(y - c) + P(c - m)² for each sample's P values, exact in
reals for any c. c - m is exact in float32 when the two are close (the large-mean case), so
the statistics stay sound at any mean: no Σy² - (Σy)²/n cancellation.

The kernel's inputs: the conv's own, then the sums' operands, then one output per member and
per centered member (a (1, C, 1, 1) buffer, passed where inputs are), then, for the conv's
phases only, `partials`: `wrap` wraps those phases to pass a pointer into the scratch past the
conv's own.
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir
import sympy

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.conv.buffers import _sample
from graphc.backend.kernels.elementwise import emit_expr
from graphc.backend.kernels.layout import for_each_vector, load_lanes
from graphc.backend.kernels.reduce import (SPAN_BLOCK, SUM_IDENTITY, Prologue, PrologueSource, VectorAccumulators,
                                          blocked_sum, horizontal_sum, span_sum, vector_add)
from graphc.core.scalar import symbol

__all__ = ["ChannelSums"]

# Partials start on a cache line of their own, past the conv's scratch.
_ALIGN_FLOATS = 16


@dataclasses.dataclass(frozen=True)
class ChannelSums:
    """Sums over (N, H, W) of each member's prologue, one value per channel.

    `members[k]` = (prologue, operands): operand None is the conv's result, an integer the
    kernel input of that index. `centered[j]` = (k, mean): Σ(y - m)² of the result y about
    m = mean(x0 = member k's total), member k being Σy. `outputs`: the kernel input index of
    member 0's output (the other members' follow, then the centered ones'); the partials
    pointer comes right after the last output."""

    batch: int
    channels: int
    plane: int                    # H * W of the result
    members: tuple[tuple[Prologue, tuple[int | None, ...]], ...]
    outputs: int
    centered: tuple[tuple[int, sympy.Expr], ...] = ()

    def __post_init__(self):
        for k, _ in self.centered:
            if self.members[k] != (Prologue(symbol(0), ("full",)), (None,)):
                raise ValueError(f"a centered sum's mean needs member {k} to be the plain sum of the result")

    @property
    def partials_input(self) -> int:
        return self.outputs + len(self.members) + len(self.centered)

    @property
    def inputs(self) -> int:
        """The inputs the conv's own phases take: everything up to and with `partials`."""
        return self.partials_input + 1

    @property
    def slots(self) -> int:
        """Partials per channel and sample: one per member, two (Σ(y - c)², Σ(y - c)) per centered."""
        return len(self.members) + 2 * len(self.centered)

    @property
    def partial_floats(self) -> int:
        return self.slots * self.channels * self.batch

    def _slot(self, kb: KernelBuilder, slot: int, c: ir.Value, n: ir.Value | int) -> ir.Value:
        return kb.add(kb.mul(kb.add(slot * self.channels, c), self.batch), n)

    def after_sample(self, kb: KernelBuilder, out: ir.Value, inputs, n: ir.Value) -> None:
        """The partial sums of sample n, whose result out[n] the conv has just written."""
        C, P = self.channels, self.plane
        sample_floats = C * P
        partials = inputs[self.partials_input]
        sources = []
        for prologue, operands in self.members:
            pointers = []
            for operand, kind in zip(operands, prologue.kinds):
                pointer = out if operand is None else inputs[operand]
                pointers.append(_sample(kb, pointer, n, sample_floats) if kind == "full" else pointer)
            sources.append(PrologueSource(kb, pointers, prologue))
        out_n = _sample(kb, out, n, sample_floats)
        with kb.for_range(0, C, name="c") as c:
            start = kb.mul(c, P)
            totals = []
            for k, source in enumerate(sources):
                totals.append(horizontal_sum(kb, span_sum(kb, source.loader(c), start, P)))
                kb.store(totals[-1], partials, self._slot(kb, k, c, n))
            for j, (k, _) in enumerate(self.centered):
                shift = kb.splat(kb.fmul(totals[k], kb.f32(1 / P)))
                squares, deviations = _centered_sums(kb, out_n, shift, start, P)
                kb.store(horizontal_sum(kb, squares), partials, self._slot(kb, len(self.members) + 2 * j, c, n))
                kb.store(horizontal_sum(kb, deviations), partials, self._slot(kb, len(self.members) + 2 * j + 1, c, n))

    def wrap(self, module: ir.Module, name: str, conv: Kernel) -> Kernel:
        """The conv's phases called with `partials` in the scratch past their own, then the
        phase adding up the partials. The wrapped kernel takes `inputs - 1` inputs."""
        n_inputs = self.inputs - 1
        offset = -(-conv.scratch_floats // _ALIGN_FLOATS) * _ALIGN_FLOATS
        phases = []
        for index, phase in enumerate(conv.phases):
            fn, kb = phase_function(module, f"{name}.with_sums{index}", n_inputs)
            out, inputs, scratch, tid, nthreads = phase_args(fn)
            kb.b.call(phase, [out, *inputs, kb.gep(scratch, offset), scratch, tid, nthreads])
            kb.b.ret_void()
            phases.append(fn)
        fn, kb = phase_function(module, f"{name}.channel_sums", n_inputs)
        _, inputs, scratch, tid, nthreads = phase_args(fn)
        partials = kb.gep(scratch, offset)
        lo, hi = kb.split_range(self.channels, tid, nthreads)
        with kb.for_range(lo, hi, name="c") as c:
            totals = [self._total(kb, partials, k, c) for k in range(len(self.members))]
            for k, total in enumerate(totals):
                kb.store(total, inputs[self.outputs + k], c)
            for j, (k, mean) in enumerate(self.centered):
                m = _lane0(kb, emit_expr(kb, mean, [kb.splat(totals[k])]))
                squares, deviations = len(self.members) + 2 * j, len(self.members) + 2 * j + 1
                total = kb.variable(kb.f32(0.0))
                with kb.for_range(0, self.batch, name="n") as n:
                    # the sample's Σ(y - c)² + 2(c - m)Σ(y - c) + P(c - m)², c its own mean
                    delta = kb.b.fsub(kb.fmul(kb.load(partials, self._slot(kb, k, c, n)), kb.f32(1 / self.plane)), m)
                    term = kb.fadd(kb.load(partials, self._slot(kb, squares, c, n)),
                                   kb.fmul(kb.fmul(kb.f32(2.0), delta), kb.load(partials, self._slot(kb, deviations, c, n))))
                    term = kb.fadd(term, kb.fmul(kb.fmul(kb.f32(float(self.plane)), delta), delta))
                    kb.set(total, kb.fadd(kb.get(total), term))
                kb.store(kb.get(total), inputs[self.outputs + len(self.members) + j], c)
        kb.b.ret_void()
        return Kernel(phases + [fn], offset + self.partial_floats)

    def _total(self, kb: KernelBuilder, partials, slot: int, c: ir.Value) -> ir.Value:
        """Channel c's partials of `slot` added up over the samples, in order."""
        return horizontal_sum(kb, span_sum(kb, partials, self._slot(kb, slot, c, 0), self.batch))


def _lane0(kb: KernelBuilder, vector: ir.Value) -> ir.Value:
    return kb.b.extract_element(vector, ir.Constant(ir.IntType(32), 0))


def _centered_sums(kb: KernelBuilder, sample: ir.Value, shift: ir.Value, start: ir.Value,
                   count: int) -> list[ir.Value]:
    """[Σ(y - shift)², Σ(y - shift)] over sample[start:][:count], as two vectors, in one pass."""
    def block_sums(block_start: ir.Value, block_count: int) -> list[ir.Value]:
        # two accumulators of each, for the add's latency
        sums = VectorAccumulators(kb, 4, SUM_IDENTITY, vector_add, name="centered")
        sums.reset()

        def accumulate(index: ir.Value, lanes: int, slot: int) -> None:
            deviation = kb.b.fsub(load_lanes(kb, sample, index, lanes), shift)
            if lanes < kb.width:
                deviation = kb.b.select(kb.lane_mask(lanes), deviation, kb.splat(SUM_IDENTITY))
            sums.update(2 * slot, kb.fmul(deviation, deviation))
            sums.update(2 * slot + 1, deviation)

        for_each_vector(kb, kb.add(start, block_start), block_count, accumulate, unroll=2)
        values = sums.values()
        return [vector_add(kb, values[0], values[2]), vector_add(kb, values[1], values[3])]
    return blocked_sum(kb, count, SPAN_BLOCK, 2, block_sums)
