"""Run under mpiexec by tests/test_distributed.py: train(comm=, checkpoint=) stopped and resumed.

    python -m mpi4py resume.py DIRECTORY

Trains 4 epochs straight, and 2 epochs then 2 more from the checkpoint (a new process would
start the same way: from the file alone). Rank 0 prints RESULT {json}: whether the resumed
run ended with the same params, bit for bit, and the two histories' losses.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

from graphc.tools import models
from graphc.tools.data import Dataset
from graphc.tools.train import train

comm = MPI.COMM_WORLD
directory = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.standard_normal((200, 1, 4, 4)).astype(np.float32)
y = (x.reshape(200, -1).sum(axis=1) > 0).astype(np.int32)
data = Dataset(x[:160], y[:160], x[160:], y[160:], classes=2, name="signs")


def run(epochs, checkpoint):
    return train(lambda batch: models.mlp(batch, (16, 8, 2)), data, epochs=epochs, batch_size=8, lr=0.1,
                 sampling="uniform", comm=comm, checkpoint=checkpoint, progress=False)


straight = run(4, os.path.join(directory, "straight.npz"))
run(2, os.path.join(directory, "halves.npz"))
resumed = run(4, os.path.join(directory, "halves.npz"))
if comm.Get_rank() == 0:
    print("RESULT " + json.dumps({
        "same": all(np.array_equal(straight.params[name], resumed.params[name]) for name in straight.params),
        "straight": [record.loss for record in straight.history],
        "resumed": [record.loss for record in resumed.history]}), flush=True)
