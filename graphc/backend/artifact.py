"""`fn.save(path)`: a compiled function or training step as an artifact `graphc_runtime.load`
runs without the compiler (the format is the runtime's: runtime/artifact.py, manifest.py).

What the artifact needs that only the compiler knows is gathered here: the graph's hash, which
bound arrays are buffers, the optimizer's description, which State slots hold dropout's key and
the hyperparameters, the CPU features the code may use, and the thread team's object code.
The program's own object code, slots, params and state come from the running program as they
are: a loaded step goes on exactly as this one would.
"""
from __future__ import annotations

import hashlib

import graphc_runtime as rt
from graphc.backend.assemble import CALLS_SLOT
from graphc.backend.program_cache import graph_lines
from graphc.core.optim import SGD, Adam, AdamW
from graphc_runtime.buffers import data_pointer
from graphc_runtime.cpu_features import required_features
from graphc_runtime.deployed import save_program, team_ir_digest
from graphc_runtime.manifest import Manifest
from graphc_runtime.optimizers import hyper_values
from graphc_runtime.team_native import team_functions

__all__ = ["save", "graph_hash"]


def save(path, *, program, values, kind: str, single_output: bool, source_outputs, check_finite: bool) -> None:
    """Write a compiled function or training step (`kind`), running `program` with per-call
    `values` (call_values.py), with its params, buffers and state as they are now, to `path`.
    `source_outputs`: the outputs before optimization, whose graph the manifest's hash names."""
    from graphc import __version__

    if values.bound_to_this_process:     # MPI handles, function addresses
        raise ValueError("save: a data-parallel step (compiled with comm=) holds this process's MPI handles and "
                         "cannot be saved; save a step compiled without comm= from the same params")
    buffers = source_outputs[0].graph.buffers
    host = rt.host_target()
    with values.lock:                   # between calls: the counts and slots belong together
        state_slot = _state_slot_of(program.state)
        manifest = Manifest(
            kind=kind, graph_hash=graph_hash(source_outputs), graphc_version=__version__,
            target={"triple": host.triple, "cpu": host.cpu, "level": host.level,
                    "cpu_features": required_features(host.triple, host.features)},
            entry=program.entry, objects=(), team_section="team", team_ir_sha256=team_ir_digest(host.triple),
            max_threads=program.max_threads, single_output=single_output,
            ignored_inputs=tuple(sorted(program.ignored_inputs)), slots=program.slots,
            param_roles={name: "buffer" if name in buffers else "param" for name in program.params},
            calls_slot=CALLS_SLOT, seed=values.seed,
            random_key_slot=state_slot(values.random_key) if values.random_key is not None else None,
            optimizer_steps=values.optimizer_steps, optimizer=_optimizer(values.optimizer, values.lr),
            hyper_slots={name: state_slot(array) for name, array in values.hyper_slots.items()},
            check_finite=check_finite)
        save_program(path, program, manifest, team_functions().library.objects[0])


def graph_hash(outputs) -> str:
    """sha256 of the graph computing `outputs`, as the program cache keys it."""
    return hashlib.sha256("\n".join(graph_lines(outputs[0].graph, outputs)).encode()).hexdigest()


def _state_slot_of(state):
    """`slot(array)`: the name of the State slot whose memory `array` is (or views)."""
    names = {data_pointer(memory): name for name, memory in state.items()}
    return lambda array: names[data_pointer(array)]


def _optimizer(optimizer, lr) -> dict | None:
    """The optimizer as the manifest describes it, for the runtime's optimizers.py."""
    if optimizer is None:
        return None
    if type(optimizer) is SGD:
        described = {"kind": "SGD", "lr": lr, "momentum": optimizer.momentum,
                     "weight_decay": optimizer.weight_decay, "nesterov": optimizer.nesterov}
    elif type(optimizer) in (Adam, AdamW):
        described = {"kind": type(optimizer).__name__, "lr": lr, "betas": list(optimizer.betas),
                     "eps": optimizer.eps, "weight_decay": optimizer.weight_decay}
    else:
        raise ValueError(f"save: the step's optimizer {type(optimizer).__name__} is not one graphc_runtime can "
                         f"drive (SGD, Adam, AdamW)")
    for step in (1, 2, 10 ** 6):   # the runtime's arithmetic must be the optimizer's, exactly
        if hyper_values(described, lr, step) != optimizer.hyper_values(lr, step):
            raise ValueError(f"save: graphc_runtime computes {type(optimizer).__name__}'s hyperparameters "
                             f"otherwise than graphc (at step {step})")
    return described

