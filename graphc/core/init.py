"""Parameter initialization."""
from __future__ import annotations

import numpy as np

from graphc.core.ir import Graph, as_int


def init_params(graph: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh values for every param and buffer of `graph`, by name, from one seeded generator.

    A param or buffer declared with `init=` is filled with that value. Other params: He-normal
    (std = sqrt(2 / fan_in), fan_in = prod(shape[1:])) for params of 2+ dims, as suits ReLU
    networks; zeros for biases and other 1-D params. C-contiguous, of each one's dtype. Params
    draw from the generator in declaration order, so adding buffers or constant-initialized
    params to a model leaves the others' values as they were.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"init_params: expected a gc.Graph, got {type(graph).__name__}")
    seed = as_int(seed, "init_params: seed")   # True or 1.5 would silently become a seed
    if seed < 0:
        raise ValueError(f"init_params: seed must be >= 0, got {seed}")
    rng = np.random.default_rng(seed)
    values = {}
    for name, node in {**graph.params, **graph.buffers}.items():
        if name in graph.initial_values:
            value = np.full(node.shape, graph.initial_values[name])
        elif node.ndim >= 2:
            fan_in = int(np.prod(node.shape[1:]))
            value = rng.standard_normal(node.shape) * np.sqrt(2.0 / max(fan_in, 1))
        else:
            value = np.zeros(node.shape)
        values[name] = np.ascontiguousarray(value, dtype=node.dtype)
    return values
