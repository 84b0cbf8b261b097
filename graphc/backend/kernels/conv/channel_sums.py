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

The kernel's inputs: the conv's own, then the sums' operands, then one output per member (a
(1, C, 1, 1) buffer, passed where inputs are), then, for the conv's phases only, `partials`:
`with_channel_sums` wraps those phases to pass a pointer into the scratch past the conv's own.
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.conv.buffers import _sample
from graphc.backend.kernels.reduce import Prologue, PrologueSource, horizontal_sum, span_sum

__all__ = ["ChannelSums"]

# Partials start on a cache line of their own, past the conv's scratch.
_ALIGN_FLOATS = 16


@dataclasses.dataclass(frozen=True)
class ChannelSums:
    """Sums over (N, H, W) of each member's prologue, one value per channel.

    `members[k]` = (prologue, operands): operand None is the conv's result, an integer the
    kernel input of that index. `outputs`: the kernel input index of member 0's output (the
    others follow); the partials pointer comes right after the last output."""

    batch: int
    channels: int
    plane: int                    # H * W of the result
    members: tuple[tuple[Prologue, tuple[int | None, ...]], ...]
    outputs: int

    @property
    def partials_input(self) -> int:
        return self.outputs + len(self.members)

    @property
    def inputs(self) -> int:
        """The inputs the conv's own phases take: everything up to and with `partials`."""
        return self.partials_input + 1

    @property
    def partial_floats(self) -> int:
        return len(self.members) * self.channels * self.batch

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
        with kb.for_range(0, C, name="c") as c:
            start = kb.mul(c, P)
            for k, source in enumerate(sources):
                total = horizontal_sum(kb, span_sum(kb, source.loader(c), start, P))
                kb.store(total, partials, kb.add(kb.mul(kb.add(k * C, c), self.batch), n))

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
        for k in range(len(self.members)):
            with kb.for_range(lo, hi, name="c") as c:
                first = kb.mul(kb.add(k * self.channels, c), self.batch)
                kb.store(horizontal_sum(kb, span_sum(kb, partials, first, self.batch)), inputs[self.outputs + k], c)
        kb.b.ret_void()
        return Kernel(phases + [fn], offset + self.partial_floats)
