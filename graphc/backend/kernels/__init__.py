"""The kernel families, each specialized to static shapes and the target's vectors. Each family
registers, beside its emitters, the lowering of the ops it computes (lowering_rules.py): importing
this package registers them all."""
from graphc.backend.kernels import (collective, conv, elementwise, gemm, layout, pool, random,  # noqa: F401
                                    reduce, softmax)
