"""Graph-to-graph optimization passes, each `(graph, outputs) -> (new_graph, new_outputs)`.

Every pass returns a new Graph (the input is never mutated) that declares the same inputs and
params in the same order, keeps each node's provenance, and computes the same values on the
reference executor; or, where it would change nothing, the input graph itself. `optimize` runs a
list of them and logs what each did.
"""
from graphc.transforms.constant_folding import fold_constants
from graphc.transforms.cse import cse
from graphc.transforms.dce import dce
from graphc.transforms.elementwise_fusion import fuse_elementwise
from graphc.transforms.factor_sums import factor_sums
from graphc.transforms.fold_channel_scale import fold_channel_scale
from graphc.transforms.pipeline import DEFAULT_PASSES, FixedPoint, OptimizeResult, PassRecord, optimize
from graphc.transforms.rebuild import Absorbed, Rewrite, rebuild, rebuild_if_changed
from graphc.transforms.simplify import simplify
from graphc.transforms.value_reuse import reuse_values

__all__ = ["optimize", "OptimizeResult", "PassRecord", "DEFAULT_PASSES", "FixedPoint",
           "dce", "cse", "fold_constants", "simplify", "fuse_elementwise", "factor_sums", "fold_channel_scale", "reuse_values",
           "rebuild", "rebuild_if_changed", "Rewrite", "Absorbed"]
