"""Run under `mpiexec -n 1` by tests/test_distributed.py: a data-parallel step on one rank.

    python -m mpi4py single_rank.py DIRECTORY

Compares it with the plain step (the average over one rank is the value itself), profiles it
(the profiling twin runs without a communicator), checks that its communicator slot is not
optimizer state, that its report (DIRECTORY/step.html) is written, that saving it is refused,
and what compile_training_step refuses with comm=. Prints RESULT {json}.
"""
import json
import os
import sys

import numpy as np
from mpi4py import MPI

import graphc as gc
from graphc.tools import models

directory = sys.argv[1]
model = models.small_convnet(8, image=(2, 8, 8), classes=5)
optimizer = gc.SGD(lr=0.1, momentum=0.9)
distributed_params, plain_params = gc.init_params(model.graph, 0), gc.init_params(model.graph, 0)
step = gc.compile_training_step(model.loss, distributed_params, optimizer, comm=MPI.COMM_WORLD)
plain = gc.compile_training_step(model.loss, plain_params, optimizer)
rng = np.random.default_rng(0)
feeds = [models.random_batch(model, rng) for _ in range(4)]
losses = [(step(**f), plain(**f)) for f in feeds]
before = {name: value.copy() for name, value in distributed_params.items()}
report = step.profile(**feeds[0])
result = {
    "losses": losses,
    "param_error": max(float(np.max(np.abs(distributed_params[n] - plain_params[n]))) for n in plain_params),
    "profiled_kernels": [kernel.label for kernel in report.kernels if kernel.label.startswith("allreduce")],
    "profile_kept_params": all(np.array_equal(before[n], distributed_params[n]) for n in before),
    "state": sorted(step.state),
    "state_dict": sorted(step.state_dict()),
}


class HandWritten(gc.Optimizer):
    """An optimizer that is not a dataclass: its step is keyed by its update graph."""
    lr = 0.1

    def updates(self, graph, params, grads, hyper=None):
        lr = self._hyper(hyper)("lr")
        return [(p.name, p - lr * g) for p, g in zip(params, grads)], []


own_params, reference_params = gc.init_params(model.graph, 0), gc.init_params(model.graph, 0)
own = gc.compile_training_step(model.loss, own_params, HandWritten(), comm=MPI.COMM_WORLD)
reference = gc.compile_training_step(model.loss, reference_params, gc.SGD(lr=0.1))
result["hand_written"] = [(own(**f), reference(**f)) for f in feeds]
gc.report(step, os.path.join(directory, "step.html"), feeds=feeds[0])
result["report_bytes"] = os.path.getsize(os.path.join(directory, "step.html"))
refusals = {"check_finite": lambda: gc.compile_training_step(model.loss, plain_params, optimizer, check_finite=True,
                                                             comm=MPI.COMM_WORLD),
            "bucket_bytes": lambda: gc.compile_training_step(model.loss, plain_params, optimizer, bucket_bytes=0,
                                                             comm=MPI.COMM_WORLD),
            "comm": lambda: gc.compile_training_step(model.loss, plain_params, optimizer, comm="world"),
            "allreduce": lambda: gc.compile_training_step(model.loss, plain_params, optimizer, comm=MPI.COMM_WORLD,
                                                          allreduce="ring")}
result["refused"] = {}
for name, attempt in refusals.items():
    try:
        attempt()
    except (TypeError, ValueError) as error:
        result["refused"][name] = f"{type(error).__name__}: {error}"
try:
    step.save(os.path.join(directory, "step.gcx"))
except ValueError as error:
    result["save_refused"] = str(error)
print("RESULT " + json.dumps(result), flush=True)
