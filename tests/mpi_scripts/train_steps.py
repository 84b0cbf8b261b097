"""Run under mpiexec by tests/test_distributed.py: a few data-parallel steps, checked on rank 0.

    python -m mpi4py train_steps.py MODEL OPTIMIZER STEPS [reset] [mpi]

Each rank trains its part of a global batch (rank r: examples [r*b, (r+1)*b)) with a step
compiled with comm=MPI.COMM_WORLD. Rank 0 also trains one process on the whole global batch,
and, for the first step, computes the update from the reference executor's gradients. With
`reset`, both steps zero their optimizer state after the second step (which zeroes the
communicator slot too, to be written again). With `mpi`, MPI_Iallreduce sums the buckets
instead of the ranks' shared memory. Rank 0
prints one line, RESULT {json}: the largest differences, whether every rank holds the same
params and buffers bit for bit, and a digest of them.
"""
import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

import graphc as gc
from graphc.tools import models

comm = MPI.COMM_WORLD
rank, ranks = comm.Get_rank(), comm.Get_size()
model_name, optimizer_name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
reset = "reset" in sys.argv[4:]
allreduce = "mpi" if "mpi" in sys.argv[4:] else "auto"
PER_RANK = 8

BUILDERS = {
    "mlp": lambda batch: models.mlp(batch, (48, 24, 10)),
    "convnet": lambda batch: models.small_convnet(batch, image=(2, 8, 8), classes=5),
    "bn": lambda batch: models.digits_cnn(batch, widths=(4, 8), p=0.0),
}
OPTIMIZERS = {
    "sgd": gc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "plain_sgd": gc.SGD(lr=0.1),
    "adam": gc.Adam(lr=1e-2),
}


def batches(model, count):
    rng = np.random.default_rng(7)
    for _ in range(count):
        feeds = models.random_batch(model, rng)
        yield {name: np.ascontiguousarray(value) for name, value in feeds.items()}


def shard(feeds):
    return {name: value[rank * PER_RANK:(rank + 1) * PER_RANK] for name, value in feeds.items()}


build, optimizer = BUILDERS[model_name], OPTIMIZERS[optimizer_name]
local, whole = build(PER_RANK), build(PER_RANK * ranks)
params = gc.init_params(local.graph, seed=3)
# Small buckets: several of them, some of one value summed in its own buffer, progress points
step = gc.compile_training_step(local.loss, params, optimizer, comm=comm, bucket_bytes=1024, allreduce=allreduce)

result = {"ranks": ranks, "losses": [], "shared": "allreduce_finish" in step.describe(), "state": list(step.state)}
if rank == 0:
    single_params = gc.init_params(whole.graph, seed=3)
    single = gc.compile_training_step(whole.loss, single_params, optimizer)
for i, feeds in enumerate(batches(whole, steps)):
    if i == 0 and rank == 0 and optimizer_name == "plain_sgd":
        # p - lr * (the reference executor's gradient on the global batch)
        trained = [whole.graph.params[name] for name in single_params if name in whole.graph.params]
        grads = gc.evaluate(gc.grad(whole.loss, trained), feeds, {k: v.copy() for k, v in single_params.items()})
        expected = {t.name: single_params[t.name] - optimizer.lr * g for t, g in zip(trained, grads)}
    loss = step(**shard(feeds))
    if rank == 0:
        result["losses"].append([loss, single(**feeds)])
    if reset and i == 1:
        step.reset_state()
        if rank == 0:
            single.reset_state()
    if i == 0 and rank == 0 and optimizer_name == "plain_sgd":
        result["reference_error"] = max(float(np.max(np.abs(params[name] - value) / (np.abs(value).max() + 1e-12)))
                                        for name, value in expected.items())

everyone = comm.gather({name: np.array(value) for name, value in params.items()})
if rank == 0:
    result["identical"] = all(np.array_equal(mine[name], everyone[0][name]) for mine in everyone for name in mine)
    result["param_error"] = max(float(np.max(np.abs(params[name] - single_params[name]))
                                      / (np.abs(single_params[name]).max() + 1e-12))
                                for name in local.graph.params)
    digest = hashlib.sha256()
    for name in sorted(params):
        digest.update(name.encode() + params[name].tobytes())
    result["digest"] = digest.hexdigest()
    print("RESULT " + json.dumps(result), flush=True)
