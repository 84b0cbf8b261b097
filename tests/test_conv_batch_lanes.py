"""The batch-in-lanes input gradient of conv_kernels on batches that fill, half fill and
overfill its groups of 2W samples (W = 8: 16), with 1 and 2 threads, against numpy.

test_conv_pool_kernels runs every path on batches of 1 to 3 only: here the batch is what
varies (a group's second vector partial or missing, whole groups plus a partial one, a
thread with no group), with the geometries at the edges of the pixel table: valid taps
empty for some dx pixels (more padding than "full"), padding that differs per side, and
channels in several row tiles (7 = 4 + 3, 13 = 5 + 4 + 4).
"""
from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import Case, check_cases, conv_output_shape, random, reference

from graphc.backend.kernels.conv import INPUT_GRAD_PATHS, ConvGeometry, chosen_paths
from graphc.backend.llvm import target

PATH = next(path for path in INPUT_GRAD_PATHS if path.name == "batch in lanes")

GEOMETRIES = [   # (C, H, W), (O, kh, kw), padding
    ((6, 14, 14), (16, 5, 5), ((0, 0), (0, 0))),     # LeNet's conv2
    ((3, 5, 7), (4, 3, 3), ((1, 1), (1, 1))),
    ((7, 6, 5), (5, 2, 3), ((0, 1), (2, 0))),
    ((13, 4, 4), (3, 3, 3), ((3, 3), (3, 3))),        # dx's corners read no g at all
    ((1, 9, 11), (2, 4, 4), ((3, 2), (1, 3))),
]


def batches() -> list[int]:
    group = 2 * target.vector_width_f32()
    return [1, group // 2 - 1, group // 2, group // 2 + 3, group, group + 1,
            2 * group + group // 2 + 5]


def cases(batch: int, rng) -> list[Case]:
    result = []
    for (c, h, w), (o, kh, kw), padding in GEOMETRIES:
        x_shape, w_shape, stride = (batch, c, h, w), (o, c, kh, kw), (1, 1)
        y_shape = conv_output_shape(x_shape, w_shape, stride, padding)
        g, weights = random(rng, y_shape), random(rng, w_shape)
        expected = reference("conv2d_input_grad", [g, weights], x_shape, x_shape=x_shape,
                             stride=stride, padding=padding)
        geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
        assert PATH.possible(geometry, target.vector_width_f32())
        result.append(Case(f"batch in lanes x={x_shape} w={w_shape} padding={padding}",
                           lambda m, n, geometry=geometry: PATH.emit(m, n, geometry,
                                                                     max_threads=2),
                           [g, weights], expected))
    return result


@pytest.mark.parametrize("batch", batches())
def test_batch_lanes_input_grad_matches_reference(batch):
    check_cases(cases(batch, np.random.default_rng(batch)))


@pytest.mark.parametrize("width", [4, 8, 16])
def test_lenet_conv2_takes_batch_lanes_with_two_full_groups(width):
    """Its cost model: whole groups beat the cols GEMM's 4 idle lanes of 104 on 8 and 16
    lanes; a batch of one vector or less would waste lanes, a single group a second thread:
    cols. On 4 lanes the cols GEMM's rows of 104 pixels fill every vector: always cols."""
    group = 2 * width
    lanes = "cols" if width == 4 else "batch in lanes"
    for batch, path in ((2 * group, lanes), (4 * group, lanes),
                        (1, "cols"), (group // 2, "cols"), (group, "cols")):
        chosen = chosen_paths((batch, 6, 14, 14), (16, 6, 5, 5), (1, 1), ((0, 0), (0, 0)), width=width)
        assert chosen["input_grad"] == path, batch