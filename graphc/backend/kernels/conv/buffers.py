"""Per-sample buffers and scratch of the conv kernels: zero-padded copies of the samples
(`_Placement`), the threads' shares of the batch, scratch layout, and row primitives
(kernels/pool.py uses `emit_fill_zero` and `splat_i32` too)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import llvmlite.ir as ir

from graphc.backend.emit.kernel import phase_args, phase_function
from graphc.backend.emit.kernel_builder import I32, KernelBuilder
from graphc.backend.kernels.conv.geometry import ConvGeometry

# Scratch regions start on a 64-byte boundary (relative to scratch) so that two threads
# never write the same cache line.
_CACHE_LINE_FLOATS = 16


# ------------------------------------------------------------------------------- samples

@dataclasses.dataclass(frozen=True)
class _Placement:
    """Where each sample's planes go in a zero-filled per-thread buffer: source cell
    (r, col) of each of `channels` (src_h, src_w) planes to cell (r*step_y + first_y,
    col*step_x + first_x) of a (dst_h, dst_w) plane, if inside it. A conv's padded copy
    of x, and the input gradient's dilated, padded g."""

    channels: int
    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    step_y: int
    step_x: int
    first_y: int
    first_x: int
    always: bool = False   # copy even when the source could be used in place
    margin: int = 0        # zeros after the last plane, for reads past it

    @classmethod
    def padding_of(cls, g: ConvGeometry, always: bool = False, margin: int = 0) -> _Placement:
        return cls(g.channels, g.height, g.width, g.padded_h, g.padded_w, 1, 1, g.pad_top,
                   g.pad_left, always=always, margin=margin)

    @property
    def source_floats(self) -> int:
        return self.channels * self.src_h * self.src_w

    @property
    def in_place(self) -> bool:
        """The source already is the placed plane."""
        return not self.always and (self.src_h, self.src_w, self.step_y, self.step_x,
                                    self.first_y, self.first_x) == (
            self.dst_h, self.dst_w, 1, 1, 0, 0)

    def buffer_floats(self, width: int) -> int:
        """`width` spare floats take the zeros that a last row's whole vector writes."""
        if self.in_place:
            return 0
        return self.channels * self.dst_h * self.dst_w + width + self.margin

    def prepare_buffer(self, kb: KernelBuilder, buffer: ir.Value) -> ir.Value:
        """Zero the buffer once per call: copies only write the placed cells (and zeros),
        so the other cells stay zero for every sample."""
        if not self.in_place:
            emit_fill_zero(kb, buffer, kb.i64(self.buffer_floats(kb.width)))
        return buffer

    def _range(self, src: int, dst: int, step: int, first: int) -> tuple[int, int]:
        """Source indices whose destination lies in [0, dst)."""
        lo = max(0, _ceil_div(-first, step))
        hi = min(src, (dst - 1 - first) // step + 1) if dst - 1 - first >= 0 else 0
        return lo, max(lo, hi)

    def place(self, kb: KernelBuilder, src: ir.Value, buffer: ir.Value,
              stride: int | None = None) -> ir.Value:
        """Copy sample `src` into `buffer` (planes `stride` floats apart, default
        dst_h*dst_w); returns the placed sample (`src` itself if in place).

        Rows with step_x 1 are copied in whole vectors, the last one's load masked so that
        it supplies zeros past the row's end: the zeros land in the right margin, the next
        rows' left margin or next rows themselves, which are copied later (rows go in
        memory order), never on copied data. Other rows are copied one cell at a time.
        """
        if self.in_place:
            return src
        stride = stride or self.dst_h * self.dst_w
        r_lo, r_hi = self._range(self.src_h, self.dst_h, self.step_y, self.first_y)
        c_lo, c_hi = self._range(self.src_w, self.dst_w, self.step_x, self.first_x)
        if r_lo == r_hi or c_lo == c_hi:
            return buffer
        with kb.for_range(0, self.channels, name="c") as c:
            with kb.for_range(r_lo, r_hi, name="r") as r:
                src_row = kb.gep(src, kb.add(kb.mul(kb.add(kb.mul(c, self.src_h), r),
                                                    self.src_w), c_lo))
                dst_y = kb.add(kb.mul(r, self.step_y), self.first_y)
                dst_row = kb.gep(buffer, kb.add(
                    kb.add(kb.mul(c, stride), kb.mul(dst_y, self.dst_w)),
                    c_lo * self.step_x + self.first_x))
                count = c_hi - c_lo
                if self.step_x == 1:
                    whole = count - count % kb.width
                    with kb.for_range(0, whole, step=kb.width, name="v") as v:
                        kb.store_vec(kb.load_vec(src_row, v), dst_row, v)
                    if count % kb.width:
                        inside = kb.lane_mask(count % kb.width)
                        kb.store_vec(kb.masked_load_vec(src_row, whole, inside), dst_row, whole)
                else:
                    with kb.for_range(0, count, name="col") as col:
                        kb.store(kb.load(src_row, col), dst_row, kb.mul(col, self.step_x))
        return buffer


@contextlib.contextmanager
def _my_samples(kb: KernelBuilder, batch: int, tid, nthreads) -> Iterator[ir.Value]:
    """Loop over this thread's share of the batch; yields the sample index."""
    lo, hi = kb.split_range(batch, tid, nthreads)
    with kb.for_range(lo, hi, name="n") as n:
        yield n


def _sample(kb: KernelBuilder, base: ir.Value, n: ir.Value, floats_per_sample: int) -> ir.Value:
    return kb.gep(base, kb.mul(n, floats_per_sample))


def _emit_copy_zero_tail(kb: KernelBuilder, src: ir.Value, dst: ir.Value, count: int,
                         total: int) -> None:
    """dst[0:count] = src[0:count], dst[count:total] = 0 (whole vectors, masked loads)."""
    with kb.for_range(0, total, step=kb.width, name="v") as v:
        inside = _lanes_below(kb, kb.sub(count, v))
        value = kb.masked_load_vec(src, v, inside)
        _store(kb, value, dst, v, _lanes_below(kb, kb.sub(total, v)))


# ------------------------------------------------------------------------ phases, scratch

def _thread0_phase(module: ir.Module, name: str, n_inputs: int,
                   body: Callable[[KernelBuilder, list, ir.Value], None]) -> ir.Function:
    """A phase whose work (small: packing weights) only thread 0 does."""
    fn, kb = phase_function(module, name, n_inputs)
    _, inputs, scratch, tid, _ = phase_args(fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        body(kb, inputs, scratch)
    kb.b.ret_void()
    return fn


class _ScratchLayout:
    """A kernel's scratch: the `shared` regions, then one slice per thread holding the
    `private` regions. Regions are named, sized in floats, and start on a cache line."""

    def __init__(self, shared: dict[str, int], private: dict[str, int]):
        self._shared, self.shared_floats = self._offsets(shared)
        self._private, self.private_floats = self._offsets(private)

    @staticmethod
    def _offsets(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
        offsets, total = {}, 0
        for name, floats in sizes.items():
            offsets[name] = total
            total += _round_up(floats, _CACHE_LINE_FLOATS)
        return offsets, total

    def total_floats(self, max_threads: int) -> int:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        return self.shared_floats + max_threads * self.private_floats

    def shared(self, kb: KernelBuilder, scratch: ir.Value, name: str) -> ir.Value:
        return kb.gep(scratch, self._shared[name])

    def private(self, kb: KernelBuilder, scratch: ir.Value, thread: ir.Value,
                name: str) -> ir.Value:
        start = kb.add(self.shared_floats + self._private[name],
                       kb.mul(thread, self.private_floats))
        return kb.gep(scratch, start)


def _round_up(value: int, multiple: int) -> int:
    return _ceil_div(value, multiple) * multiple


def _ceil_div(value: int, divisor: int) -> int:
    return -(-value // divisor)



# ---------------------------------------------------------------------------------- loops

def _lanes_below(kb: KernelBuilder, count: ir.Value) -> ir.Value:
    """The mask of lanes < count (an i64; any value): `kb.lane_mask_dynamic` on i32 lanes,
    one AVX2 compare instead of two and a pack."""
    count = kb.b.trunc(kb.max(kb.min(count, kb.width), 0), I32)
    lanes = ir.Constant(ir.VectorType(I32, kb.width), list(range(kb.width)))
    return kb.b.icmp_signed("<", lanes, splat_i32(kb, count))


def splat_i32(kb: KernelBuilder, scalar: ir.Value) -> ir.Value:
    """Broadcast an i32 to <width x i32> (lane indices and offsets: half the registers of
    i64 lanes on AVX2)."""
    vector_type = ir.VectorType(I32, kb.width)
    undefined = ir.Constant(vector_type, ir.Undefined)
    one_lane = kb.b.insert_element(undefined, scalar, ir.Constant(I32, 0))
    return kb.b.shuffle_vector(one_lane, undefined, ir.Constant(vector_type, [0] * kb.width))


# ------------------------------------------------------------------------ row primitives
# Runs of `count` floats (an i64 IR value): whole vectors, then one masked vector.

def _emit_vectors(kb: KernelBuilder, count: ir.Value, body: Callable) -> None:
    """body(index, mask) for each vector of range(count): mask is None for whole vectors
    and the lane mask of the remainder for the last, partial one."""
    whole = kb.b.and_(count, kb.i64(-kb.width))  # width is a power of two
    with kb.for_range(0, whole, step=kb.width, name="v") as index:
        body(index, None)
    with kb.if_then(kb.b.icmp_signed("<", whole, count)):
        body(whole, _lanes_below(kb, kb.sub(count, whole)))


def _load(kb: KernelBuilder, ptr: ir.Value, index: ir.Value, mask) -> ir.Value:
    return kb.load_vec(ptr, index) if mask is None else kb.masked_load_vec(ptr, index, mask)


def _store(kb: KernelBuilder, value: ir.Value, ptr: ir.Value, index: ir.Value, mask) -> None:
    if mask is None:
        kb.store_vec(value, ptr, index)
    else:
        kb.masked_store_vec(value, ptr, index, mask)


def emit_fill_zero(kb: KernelBuilder, dst: ir.Value, count: ir.Value) -> None:
    """dst[0:count] = 0."""
    _emit_vectors(kb, count, lambda k, mask: _store(kb, kb.splat(0.0), dst, k, mask))


def _sum_thread_partials(kb: KernelBuilder, layout, scratch, nthreads, key: str, count: int) -> ir.Value:
    """Add every thread's private `key` array (count floats) into thread 0's; returns it."""
    total = layout.private(kb, scratch, kb.i64(0), key)
    with kb.for_range(1, nthreads, name="thread") as thread:
        _emit_add(kb, total, layout.private(kb, scratch, thread, key), kb.i64(count))
    return total


def _emit_add(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value) -> None:
    """dst[0:count] += src[0:count]."""
    def add_vector(k, mask):
        _store(kb, kb.fadd(_load(kb, dst, k, mask), _load(kb, src, k, mask)), dst, k, mask)
    _emit_vectors(kb, count, add_vector)
