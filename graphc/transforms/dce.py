"""Dead-code elimination: nodes the outputs do not need disappear (declared inputs and params stay)."""
from __future__ import annotations

from graphc.core.ir import Graph, Tensor
from graphc.transforms.rebuild import rebuild


def dce(graph: Graph, outputs: list[Tensor]) -> tuple[Graph, list[Tensor]]:
    """Keep only the ancestors of `outputs`: a rebuild copies nothing else."""
    return rebuild(graph, outputs)
