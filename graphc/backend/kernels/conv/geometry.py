"""A conv2d's shapes and the layout arithmetic of its kernels: pure Python, no IR."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.window import WindowGeometry

# A tile one vector wide is load-bound (a broadcast per FMA); lane counts are discounted
# by this when choosing a layout.
_ONE_VECTOR_EFFICIENCY = 0.8


@dataclasses.dataclass(frozen=True)
class ConvGeometry(WindowGeometry):
    """Shapes, stride and padding of one conv2d; pure Python, no IR."""

    batch: int = 1
    channels: int = 1
    out_channels: int = 1

    @classmethod
    def from_shapes(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[Sequence[int]]) -> ConvGeometry:
        """From the op's attributes: stride (sh, sw), padding ((top, bottom), (left, right))."""
        (n, c, h, w), (o, wc, kh, kw) = x_shape, w_shape
        (sh, sw), ((pt, pb), (pl, pr)) = stride, padding
        if c != wc:
            raise ValueError(f"input has {c} channels but the weight {tuple(w_shape)} expects {wc}")
        if min(n, c, h, w, o, kh, kw, sh, sw) < 1 or min(pt, pb, pl, pr) < 0:
            raise ValueError(f"invalid conv2d geometry: x {tuple(x_shape)}, w {tuple(w_shape)}, "
                             f"stride {tuple(stride)}, padding {tuple(padding)}")
        geometry = cls(h, w, kh, kw, sh, sw, pt, pb, pl, pr, batch=n, channels=c, out_channels=o)
        if geometry.out_h < 1 or geometry.out_w < 1:
            raise ValueError(f"kernel {(kh, kw)} with padding {tuple(padding)} does not fit "
                             f"the input {(h, w)}")
        return geometry

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.out_channels, self.out_h, self.out_w

    @property
    def padded_plane(self) -> int:
        return self.padded_h * self.padded_w

    @property
    def has_padding(self) -> bool:
        return self.padded_plane != self.height * self.width

    @property
    def sample_floats(self) -> int:
        """Floats of one sample of the input."""
        return self.channels * self.height * self.width

    @property
    def patch_size(self) -> int:
        """K of the forward GEMM: weights per output channel."""
        return self.channels * self.taps

    @property
    def pixels(self) -> int:
        """P: output pixels per channel."""
        return self.out_h * self.out_w

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (each gradient costs the same)."""
        return 2 * self.batch * self.out_channels * self.pixels * self.patch_size

    def tap_offsets(self) -> list[int]:
        """For k = (c, i, j): the offset in a padded sample of the cell tap k of output
        pixel (0, 0) reads."""
        return [c * self.padded_plane + i * self.padded_w + j for c in range(self.channels)
                for i in range(self.kernel_h) for j in range(self.kernel_w)]

    def pixel_offsets(self) -> list[int]:
        """For output pixel p = (oh, ow): the offset in a padded plane of the cell its tap
        (0, 0) reads."""
        return [oh * self.stride_h * self.padded_w + ow * self.stride_w
                for oh in range(self.out_h) for ow in range(self.out_w)]


# ------------------------------------------------------------------------ layout choices

@dataclasses.dataclass(frozen=True)
class _VectorCover:
    """How the vectors of a pixels-in-lanes tile cover a run of `length` >= W pixels (an
    output row; all of g's pixels): `pairs` pairs of vectors at 0, 2W, 4W, ..., then, if
    they leave a rest, a last tile of `last_vecs` vectors (`step` apart) that ends on the
    run: it starts at `last`, overlapping the tile before it when the run is not a whole
    number of vectors. Every store is thus a whole vector of real results (28 columns:
    0-15 and 12-27). A rest of one vector or less gets a one-vector tile (LeNet's 100
    pixels: 6 pairs + 1 vector, not 7 pairs)."""

    width: int
    pairs: int
    last: int | None = None
    last_vecs: int = 0
    step: int = 0

    @classmethod
    def of(cls, length: int, width: int) -> _VectorCover:
        pairs = length // (2 * width)
        rest = length - pairs * 2 * width
        if rest == 0:
            return cls(width, pairs)
        if rest <= width:
            return cls(width, pairs, length - width, 1, width)
        return cls(width, pairs, max(0, length - 2 * width), 2, min(width, length - width))

    @property
    def lanes(self) -> int:
        return self.width * (2 * self.pairs + self.last_vecs)

    def emit_each(self, kb: KernelBuilder, tile: Callable[[ir.Value, int, int], None]) -> None:
        """tile(start, vecs, step) for each tile, in order."""
        with kb.for_range(0, self.pairs, name="pair") as pair:
            tile(kb.mul(pair, 2 * self.width), 2, self.width)
        if self.last is not None:
            tile(kb.i64(self.last), self.last_vecs, self.step)


def _lanes_efficiency(channels: int, width: int) -> float:
    """Useful fraction of the lanes with `channels` in the lanes."""
    vectors = -(-channels // width)
    return channels / (vectors * width) * (_ONE_VECTOR_EFFICIENCY if vectors == 1 else 1.0)
