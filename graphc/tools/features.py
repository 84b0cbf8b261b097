"""SIFT-like features: edge-orientation histograms computed by a fixed graph.

A linear classifier on raw pixels compares intensities at fixed positions, so a stroke shifted
by one pixel looks like a different digit. SIFT-like features instead describe the *pattern of
edges*, pooled over cells, which small deformations barely change:

1. image gradients (gx, gy) by a fixed central-difference convolution;
2. projection of each gradient vector onto `orientations` unit vectors spread around the circle
   (a 1×1 convolution): how strongly the local edge points each way;
3. half-wave rectification (ReLU): an edge counts only for the orientations it points towards,
   so dark-to-light and light-to-dark edges stay distinct;
4. average pooling over `cell`×`cell` cells: a soft histogram of orientations per cell, which
   tolerates small shifts inside the cell;
5. normalization of each cell's histogram by its L2 norm (+ eps): invariance to contrast.

Every array in the graph is a constant, so it has no params and nothing to train.
"""
from __future__ import annotations

import functools

import numpy as np

from graphc.backend.compiler import compile as compile_graph
from graphc.core import ops
from graphc.core.ir import Graph, Tensor

DEFAULT_ORIENTATIONS = 8
# 8×8 digits are already 4× downsampled; 2×2 cells keep 4×4 histograms (128 features on digits).
DEFAULT_CELL = 2
# Keeps empty cells (all-zero histograms) at zero instead of 0/0.
DEFAULT_EPS = 1e-3


def gradient_filters() -> np.ndarray:
    """(2, 1, 3, 3) conv weights: channel 0 is d/dx (along W), channel 1 is d/dy (along H, downwards),
    both central differences (f(+1) - f(-1)) / 2."""
    filters = np.zeros((2, 1, 3, 3), dtype=np.float32)
    filters[0, 0, 1, 0], filters[0, 0, 1, 2] = -0.5, 0.5
    filters[1, 0, 0, 1], filters[1, 0, 2, 1] = -0.5, 0.5
    return filters


def orientation_vectors(orientations: int) -> np.ndarray:
    """(orientations, 2) unit vectors (cos θ, sin θ) at θ = 2πk / orientations."""
    angles = 2 * np.pi * np.arange(orientations) / orientations
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def feature_count(image_shape, orientations: int = DEFAULT_ORIENTATIONS, cell: int = DEFAULT_CELL) -> int:
    """Length of the feature vector of one (1, H, W) image."""
    _, height, width = _check_geometry(tuple(image_shape), orientations, cell)
    return orientations * (height // cell) * (width // cell)


def orientation_histogram_features(x: Tensor, orientations: int = DEFAULT_ORIENTATIONS, cell: int = DEFAULT_CELL,
                                   eps: float = DEFAULT_EPS) -> Tensor:
    """(N, features) edge-orientation histograms of the grayscale images x (N, 1, H, W).

    Feature order is (orientation, cell row, cell column), the flattening of (N, K, H/cell, W/cell).
    Gradients at the border see zero padding, as if the image sat on a black background.
    """
    _check_geometry(x.shape[1:], orientations, cell)
    graph = x.graph
    gradients = ops.conv2d(x, graph.constant(gradient_filters(), name="gradient_filters"), padding="same")
    projection = graph.constant(orientation_vectors(orientations)[:, :, None, None], name="orientations")
    responses = ops.relu(ops.conv2d(gradients, projection))
    histograms = ops.avg_pool2d(responses, cell)
    norms = ops.sqrt(ops.sum(histograms * histograms, axis=1, keepdims=True))
    return ops.flatten(histograms / (norms + eps))


def feature_graph(batch: int, image_shape=(1, 8, 8), **options) -> tuple[Graph, Tensor, Tensor]:
    """A graph of its own computing the features of a batch of images: (graph, x, features).

    `options` are those of `orientation_histogram_features`.
    """
    graph = Graph("orientation_histograms")
    x = graph.input("x", (batch,) + tuple(image_shape))
    return graph, x, orientation_histogram_features(x, **options)


def extract_features(images: np.ndarray, batch: int = 256, **options) -> np.ndarray:
    """The features of every image of `images` (N, 1, H, W), computed by the compiled feature graph."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"extract_features: images must be (N, 1, H, W), got shape {images.shape}")
    extractor = _compiled_extractor(batch, images.shape[1:], tuple(sorted(options.items())))
    return map_batches(extractor, images, batch)


@functools.lru_cache(maxsize=16)
def _compiled_extractor(batch: int, image_shape: tuple, options: tuple):
    # Cached: callers extract train and test features with the same geometry.
    _, _, features = feature_graph(batch, image_shape, **dict(options))
    return compile_graph(features, {})


def map_batches(function, array: np.ndarray, batch: int, input_name: str = "x", transform=None) -> np.ndarray:
    """Concatenated outputs of a compiled `function` of one (batch, ...) input, over all rows of
    `array`; the last batch is padded with zeros and the padding rows' outputs dropped.

    `transform`, when given, maps each batch's output first (e.g. to reduce it), so only the
    transformed results of all batches are held at once.
    """
    outputs = []
    for start in range(0, len(array), batch):
        chunk = array[start:start + batch]
        rows = len(chunk)
        if rows < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - rows,) + chunk.shape[1:], dtype=chunk.dtype)])
        output = function(**{input_name: chunk})[:rows]
        outputs.append(output if transform is None else transform(output))
    if not outputs:
        raise ValueError("map_batches: the array has no rows")
    return np.concatenate(outputs)


def _check_geometry(image_shape: tuple, orientations: int, cell: int) -> tuple:
    if len(image_shape) != 3 or image_shape[0] != 1:
        raise ValueError(f"orientation histograms need grayscale images (1, H, W), got {image_shape}")
    if orientations < 1 or cell < 1:
        raise ValueError(f"orientations and cell must be >= 1, got {orientations} and {cell}")
    if image_shape[1] % cell or image_shape[2] % cell:
        raise ValueError(f"the image size {image_shape[1:]} must be a multiple of the cell size {cell}")
    return image_shape
