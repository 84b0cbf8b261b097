"""The dropout mask kernel: Philox-4x32-10 on integer vectors, bit for bit graphc/core/philox.py.

Each vector lane runs one Philox block (4 consecutive mask elements), so a group of `width`
blocks yields 4 * width elements as four word vectors w0..w3. The lanes take their blocks in
the order that makes one 4 x 4 transpose inside every 128-bit lane (in-lane shuffles, one
instruction each on x86) turn w0..w3 into four consecutive vectors of the mask: lane 4g + k
computes block k * width/4 + g of the group. The 32x32->64-bit products are i64 multiplies of
words zero-extended in place, within pairs of lanes (pmuludq on x86): no word moves across
lanes before those final shuffles.

Threads split the mask in chunks of `CHUNK_ELEMENTS`, like the layout kernels' rows; the thread
holding the mask's end also writes its last partial group (fewer than 4 * width elements),
computed whole and stored piecewise.
"""
from __future__ import annotations

import math

import llvmlite.ir as ir

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel, phase_args
from graphc.backend.emit.kernel_builder import I32, I64, KernelBuilder, shared_constant
from graphc.backend.kernels.layout import ROW_CHUNK_FLOATS, open_phase, store_lanes
from graphc.backend.lowering_rules import Step, lowers
from graphc.core import philox

__all__ = ["emit_dropout_mask"]

# A thread's unit of work: one of the layout kernels' row chunks of mask. A multiple of every
# group (4 * width elements), so only the mask's last chunk has a partial group.
CHUNK_ELEMENTS = ROW_CHUNK_FLOATS

WORD = 0xFFFFFFFF


def emit_dropout_mask(module: ir.Module, name: str, size: int, p: float, stream: int, *,
                      max_threads: int, width: int | None = None) -> Kernel:
    """out[:size] (float32) = philox.dropout_mask_values((size,), p, seed, call, stream) with
    (seed, call) = in0[0], in0[1] (int32, read as uint32 bits).

    `width` overrides the host's vector width (4, 8 or 16 lanes; tests cover other hosts')."""
    fn, kb = open_phase(module, name, 1, width)
    out, (key,), _, tid, nthreads = phase_args(fn)
    w = kb.width
    if w % 4 or CHUNK_ELEMENTS % (4 * w):
        raise ValueError(f"dropout_mask: a vector width of {w} lanes is not a multiple of 4 dividing "
                         f"{CHUNK_ELEMENTS // 4}")
    philox_lanes = _PhiloxLanes(kb, key, p, stream)
    group = 4 * w
    whole = size - size % group        # elements in whole groups
    chunks = math.ceil(size / CHUNK_ELEMENTS)
    lo, hi = kb.split_range(chunks, tid, nthreads)
    start = kb.mul(lo, CHUNK_ELEMENTS)
    stop = kb.min(kb.mul(hi, CHUNK_ELEMENTS), whole)
    with kb.for_range(start, stop, step=group, name="group") as first:
        for j, values in enumerate(philox_lanes.mask_vectors(first)):
            kb.store_vec(values, out, kb.add(first, j * w))
    if size % group:
        with kb.if_then(kb.b.icmp_signed("==", hi, kb.i64(chunks))):   # the last thread's chunk
            for j, values in enumerate(philox_lanes.mask_vectors(kb.i64(whole))):
                lanes = min(w, size - whole - j * w)
                if lanes > 0:
                    store_lanes(kb, values, out, kb.i64(whole + j * w), lanes)
    kb.b.ret_void()
    return Kernel([fn])


class _PhiloxLanes:
    """Philox-4x32-10 of `width` blocks at once, and the mask values of their elements."""

    def __init__(self, kb: KernelBuilder, key: ir.Value, p: float, stream: int):
        self.kb = kb
        w = kb.width
        self.words = ir.VectorType(I32, w)
        self.wide = ir.VectorType(I64, w)
        # Read once: the key words, and each round's key (k0 + r*W0, k1 + r*W1 with k1 = 0).
        seed = kb.b.load(kb.b.gep(key, [kb.i64(0)], inbounds=True, source_etype=I32), typ=I32, align=4)
        call = kb.b.load(kb.b.gep(key, [kb.i64(1)], inbounds=True, source_etype=I32), typ=I32, align=4)
        self.call = self._splat(call)
        self.stream = self._word_constant(stream)
        self.round_keys = [(self._splat(kb.b.add(seed, ir.Constant(I32, _signed(r * philox.PHILOX_W0 & WORD)))),
                            self._word_constant(r * philox.PHILOX_W1 & WORD))
                           for r in range(philox.ROUNDS)]
        # Lane 4g + k computes block k * w/4 + g of its group (see the module docstring).
        self.lane_blocks = shared_constant(self.wide, tuple(k * (w // 4) + g for g in range(w // 4)
                                                            for k in range(4)))
        self.block_shift = shared_constant(self.wide, (32,) * w)
        # The 32x32->64-bit products work on pairs of words, i64 lanes (see `_mul_hi_lo`).
        self.pairs = ir.VectorType(I64, w // 2)
        self.multipliers = (shared_constant(self.pairs, (philox.PHILOX_M0,) * (w // 2)),
                            shared_constant(self.pairs, (philox.PHILOX_M1,) * (w // 2)))
        self.shift32 = shared_constant(self.pairs, (32,) * (w // 2))
        self.low_halves = shared_constant(self.pairs, (WORD,) * (w // 2))
        self.high_halves = shared_constant(self.pairs, (-(1 << 32),) * (w // 2))
        self.shift_uniform = self._word_constant(32 - philox.UNIFORM_BITS)
        self.threshold = self._word_constant(philox.keep_threshold(p))
        self.kept = kb.splat(float(philox.mask_scale(p)))
        self.dropped = kb.splat(0.0)

    def mask_vectors(self, first: ir.Value) -> list[ir.Value]:
        """The mask values of elements first .. first + 4*width - 1 (first a multiple of 4), as
        four consecutive float vectors."""
        b = self.kb.b
        block = b.add(self.kb.splat_i64(b.lshr(first, self.kb.i64(2))), self.lane_blocks)
        counter = [b.trunc(block, self.words), b.trunc(b.lshr(block, self.block_shift), self.words),
                   self.call, self.stream]
        for k0, k1 in self.round_keys:
            counter = self._round(counter, k0, k1)
        values = [b.select(b.icmp_unsigned(">=", b.lshr(word, self.shift_uniform), self.threshold),
                           self.kept, self.dropped) for word in counter]
        return self._transpose_in_lanes(values)

    def _round(self, c: list[ir.Value], k0: ir.Value, k1: ir.Value) -> list[ir.Value]:
        b = self.kb.b
        hi0, lo0 = self._mul_hi_lo(c[0], self.multipliers[0])
        hi1, lo1 = self._mul_hi_lo(c[2], self.multipliers[1])
        return [b.xor(b.xor(hi1, c[1]), k0), lo1, b.xor(b.xor(hi0, c[3]), k1), lo0]

    def _mul_hi_lo(self, word: ir.Value, multiplier: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The high and low words of the 64-bit products word * multiplier, lane by lane.

        The words are seen as pairs, i64 lanes of half as many: the even word of each pair
        zero-extended in place (masked) and the odd one shifted down, each multiplied as an
        i64 whose high half is zero (pmuludq on x86), the four halves put back in their
        lanes (which word of a pair is even depends on the byte order; both bitcasts agree,
        so each lane gets its own product either way). Widening the vector instead (zext to
        <width x i64>, then trunc) moves words across lanes at every step: 1.7x slower on
        AVX-512 and 2x on AVX2, measured."""
        b = self.kb.b
        pairs = b.bitcast(word, self.pairs)
        even = b.mul(b.and_(pairs, self.low_halves), multiplier)
        odd = b.mul(b.lshr(pairs, self.shift32), multiplier)
        low = b.or_(b.and_(even, self.low_halves), b.shl(odd, self.shift32))
        high = b.or_(b.lshr(even, self.shift32), b.and_(odd, self.high_halves))
        return b.bitcast(high, self.words), b.bitcast(low, self.words)

    def _transpose_in_lanes(self, rows: list[ir.Value]) -> list[ir.Value]:
        """Four vectors whose every 128-bit lane g holds the 4 x 4 block rows[i][4g + j],
        transposed: out[j][4g + i] = rows[i][4g + j]."""
        w = self.kb.width

        def shuffle(x: ir.Value, y: ir.Value, pattern: tuple[int, ...]) -> ir.Value:
            """In every 128-bit lane: picks 0-3 from x's lane, 4-7 from y's."""
            mask = tuple((p if p < 4 else w + p - 4) + 4 * g for g in range(w // 4) for p in pattern)
            return self.kb.b.shuffle_vector(x, y, shared_constant(ir.VectorType(I32, w), mask))

        ab_low, ab_high = shuffle(rows[0], rows[1], (0, 4, 1, 5)), shuffle(rows[0], rows[1], (2, 6, 3, 7))
        cd_low, cd_high = shuffle(rows[2], rows[3], (0, 4, 1, 5)), shuffle(rows[2], rows[3], (2, 6, 3, 7))
        return [shuffle(ab_low, cd_low, (0, 1, 4, 5)), shuffle(ab_low, cd_low, (2, 3, 6, 7)),
                shuffle(ab_high, cd_high, (0, 1, 4, 5)), shuffle(ab_high, cd_high, (2, 3, 6, 7))]

    def _splat(self, scalar: ir.Value) -> ir.Value:
        undefined = shared_constant(self.words, ir.Undefined)
        one_lane = self.kb.b.insert_element(undefined, scalar, shared_constant(I32, 0))
        return self.kb.b.shuffle_vector(one_lane, undefined,
                                        shared_constant(ir.VectorType(I32, self.kb.width), (0,) * self.kb.width))

    def _word_constant(self, value: int) -> ir.Constant:
        return shared_constant(self.words, (_signed(value),) * self.kb.width)


def _signed(word: int) -> int:
    """A uint32 word as the i32 whose bits it is: llvmlite prints integer constants as given,
    and LLVM reads an i32 literal as a signed value."""
    return word - (1 << 32) if word >= 1 << 31 else word


# ---- lowering --------------------------------------------------------------------------------

@lowers("dropout_mask")
def lower_dropout_mask(node, _epilogue) -> Step:
    attrs = node.attrs
    return Step(node, [node.inputs[0]],
                lambda m, name, threads: emit_dropout_mask(m, name, node.size, attrs["p"], attrs["stream"],
                                                           max_threads=threads),
                "dropout_mask", [node], flops=costs.dropout_mask_flops(node.size))
