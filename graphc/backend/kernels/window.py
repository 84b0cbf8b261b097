"""The sliding-window arithmetic convolutions and poolings share: output size of a kernel moved
with a stride over a padded plane. Pure Python, no IR."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WindowGeometry:
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int

    @property
    def padded_h(self) -> int:
        return self.height + self.pad_top + self.pad_bottom

    @property
    def padded_w(self) -> int:
        return self.width + self.pad_left + self.pad_right

    @property
    def out_h(self) -> int:
        return (self.padded_h - self.kernel_h) // self.stride_h + 1

    @property
    def out_w(self) -> int:
        return (self.padded_w - self.kernel_w) // self.stride_w + 1

    @property
    def taps(self) -> int:
        """Cells of one window."""
        return self.kernel_h * self.kernel_w
