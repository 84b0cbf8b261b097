"""Run under mpiexec by tests/test_distributed.py: ranks that fail, or disagree.

    python -m mpi4py faults.py MODE

raise, kill: every rank trains; at step 20 rank 1 raises, or kills itself (SIGKILL). The
others are then waiting inside a step for rank 1's gradients: the job must end, not hang.
shape, params: rank 1 builds a wider layer, or rank 2 (the last) starts from other params;
every rank prints the ValueError compile_training_step raised, as ERROR {rank} {message}.
"""
import os
import signal
import sys

import numpy as np
from mpi4py import MPI

import graphc as gc
from graphc.tools import models

comm = MPI.COMM_WORLD
rank, ranks = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1]

hidden = 24 if mode == "shape" and rank == 1 else 16
model = models.mlp(8, (32, hidden, 10))
params = gc.init_params(model.graph, seed=1 if mode == "params" and rank == ranks - 1 else 0)
try:
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1), comm=comm)
except ValueError as error:
    print(f"ERROR {rank} {error}", flush=True)
    sys.exit(0)
feeds = models.random_batch(model, np.random.default_rng(rank))
for i in range(10 ** 7):
    if i == 20 and rank == 1:
        if mode == "raise":
            raise RuntimeError("injected failure on rank 1")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    step(**feeds)
