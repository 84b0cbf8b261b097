"""Checkpoints of a data-parallel run: written by rank 0, loaded by every rank.

The ranks' steps hold the same values (their params stay bitwise identical), so rank 0 alone
writes `step.state_dict()`, atomically (gc.save_params writes a temporary file and renames
it). To load, rank 0 reads the file and broadcasts its arrays: the other ranks need not see
rank 0's disk. An error on rank 0 (a damaged or missing file) is raised on every rank, so
that none waits for a broadcast that will not come. `comm=None` is one process.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphc.tools.checkpoint import load_params, save_params

__all__ = ["save_checkpoint", "load_checkpoint", "EXTRA_PREFIX"]

EXTRA_PREFIX = "train:"     # arrays stored beside the step's state (the epoch, the history)


def save_checkpoint(path, step, comm=None, extra: Mapping[str, np.ndarray] | None = None) -> None:
    """Rank 0 writes the step's state and `extra` (names prefixed with "train:") to `path`; every
    rank returns once the file is complete."""
    extra = {EXTRA_PREFIX + name: value for name, value in (extra or {}).items()}
    _on_rank_zero(lambda: save_params(path, {**step.state_dict(), **extra}), comm)


def load_checkpoint(path, step, comm=None) -> dict[str, np.ndarray]:
    """Load what `save_checkpoint` wrote into `step` on every rank; returns the extras."""
    values = _on_rank_zero(lambda: load_params(path), comm)
    extra = {name[len(EXTRA_PREFIX):]: value for name, value in values.items() if name.startswith(EXTRA_PREFIX)}
    step.load_state_dict({name: value for name, value in values.items() if not name.startswith(EXTRA_PREFIX)})
    return extra


def _on_rank_zero(work, comm):
    """work()'s result on rank 0, broadcast to every rank; its exception raised on every rank
    (the others get its built-in type, or RuntimeError, and its message: the exception itself
    may not survive pickling, and a failed broadcast would leave them waiting)."""
    if comm is None:
        return work()
    outcome, failure = None, None
    if comm.Get_rank() == 0:
        try:
            outcome = (True, work())
        except Exception as error:      # raised below, on every rank
            failure = error
            kind = type(error) if type(error).__module__ == "builtins" else RuntimeError
            outcome = (False, (kind, f"on rank 0: {type(error).__name__}: {error}"))
    ok, value = comm.bcast(outcome, root=0)
    if ok:
        return value
    if failure is not None:
        raise failure
    kind, message = value
    try:
        error = kind(message)
    except Exception:       # a built-in type that takes other arguments
        error = RuntimeError(message)
    raise error
