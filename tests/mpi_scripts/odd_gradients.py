"""Run under mpiexec by tests/test_distributed.py: gradients the shared-memory buckets cannot
have their kernel write in place, trained with allreduce="auto" (shared memory) and "mpi".

    python -m mpi4py odd_gradients.py

The loss ties two biases (CSE makes their gradients one node, in two buckets), has a param
whose gradient is the input itself, a 1-D gradient of a sum, and buckets of 4 bytes (one
value each). Rank 0 prints RESULT {json}: per param, the largest difference between the two
modes' params after 3 steps, and whether every rank holds the same params in each mode.
"""
import json

import numpy as np
from mpi4py import MPI

import graphc as gc

comm = MPI.COMM_WORLD
rank = comm.Get_rank()


def build():
    g = gc.Graph("odd")
    x = g.input("x", (4, 3))
    w, v = g.param("w", (3, 3)), g.param("v", (4, 3))
    b1, b2 = g.param("b1", (3,)), g.param("b2", (3,))
    loss = gc.sum(gc.relu(x @ w + b1 + b2) ** 2.0) + gc.sum(x * v) + gc.mean(x @ w)
    return g, loss


trained = {}
for mode in ("auto", "mpi"):
    graph, loss = build()
    params = gc.init_params(graph, seed=0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.05, momentum=0.9), comm=comm, allreduce=mode,
                                    bucket_bytes=4)
    rng = np.random.default_rng(rank)
    for _ in range(3):
        step(x=rng.standard_normal((4, 3)).astype(np.float32))
    everyone = comm.gather(params, root=0)
    if rank == 0:
        trained[mode] = (params, all(np.array_equal(mine[k], everyone[0][k]) for mine in everyone for k in mine))
if rank == 0:
    (shared, shared_same), (mpi, mpi_same) = trained["auto"], trained["mpi"]
    print("RESULT " + json.dumps({"identical": [shared_same, mpi_same],
                                  "difference": {k: float(np.max(np.abs(shared[k] - mpi[k]))) for k in shared}}),
          flush=True)
