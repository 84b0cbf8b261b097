"""A training step's whole state as named float32 arrays, for checkpoints that resume bit for bit.

    <param or buffer name>        the bound arrays
    optimizer:<state name>        momentum, Adam's moments
    counter:calls                 completed calls (dropout's call index)
    counter:optimizer_steps       updates since the optimizer's state was zeroed (Adam's t)
    counter:seed                  dropout's seed

Counts are stored as four float32 16-bit digits, least significant first, so that a checkpoint
stays an archive of float32 arrays (tools/checkpoint.py) and counts up to 2**64 stay exact.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

OPTIMIZER_PREFIX = "optimizer:"
COUNTER_PREFIX = "counter:"
COUNTERS = ("calls", "optimizer_steps", "seed")


def state_dict(params: Mapping[str, np.ndarray], optimizer_state: Mapping[str, np.ndarray], call_values) -> dict:
    values = {name: np.array(array) for name, array in params.items()}
    values.update({f"{OPTIMIZER_PREFIX}{name}": np.array(array) for name, array in optimizer_state.items()})
    counts = {**call_values.counters(), "seed": call_values.seed}
    values.update({f"{COUNTER_PREFIX}{name}": _as_digits(counts[name]) for name in COUNTERS})
    return values


def load_state_dict(values, program, optimizer_state: Mapping[str, np.ndarray], call_values) -> None:
    """Check every entry of `values` against the step, then write them all (params through the
    program's own all-or-nothing `load_params`)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"load_state_dict needs a mapping of names to arrays, got {type(values).__name__}")
    optimizer = {name[len(OPTIMIZER_PREFIX):]: value for name, value in values.items()
                 if name.startswith(OPTIMIZER_PREFIX)}
    counter_names = {f"{COUNTER_PREFIX}{name}" for name in COUNTERS}
    params = {name: value for name, value in values.items()
              if not name.startswith(OPTIMIZER_PREFIX) and name not in counter_names}
    problems = [f"missing optimizer state {name!r}" for name in optimizer_state if name not in optimizer]
    problems += [f"unexpected optimizer state {name!r}" for name in optimizer if name not in optimizer_state]
    problems += [f"missing {name!r}" for name in sorted(counter_names - set(values))]
    arrays = {}
    for name, value in optimizer.items():
        if name not in optimizer_state:
            continue
        array, expected = np.asarray(value), optimizer_state[name]
        if array.shape != expected.shape or array.dtype.kind != "f":
            problems.append(f"optimizer state {name!r} must be a float array of shape {expected.shape}, "
                            f"got {array.dtype} {array.shape}")
        arrays[name] = array
    counts = {}
    for name in COUNTERS:
        key = f"{COUNTER_PREFIX}{name}"
        if key in values:
            counts[name] = _from_digits(key, values[key], problems)
    if len(counts) == len(COUNTERS):
        if not 0 <= counts["optimizer_steps"] <= counts["calls"]:
            problems.append(f"{counts['optimizer_steps']} optimizer steps cannot follow {counts['calls']} calls")
        if call_values.uses_masks and counts["seed"] != call_values.seed:
            problems.append(f"the checkpoint's dropout masks were drawn with seed {counts['seed']}, this step's "
                            f"with seed {call_values.seed}: compile the step with seed={counts['seed']} to resume")
    if problems:
        raise ValueError("load_state_dict: " + "; ".join(problems))
    program.load_params(params, strict=True)
    for name, array in arrays.items():
        np.copyto(optimizer_state[name], array, casting="same_kind")
    call_values.restore(counts["calls"], counts["optimizer_steps"])


def _as_digits(count: int) -> np.ndarray:
    return np.array([(count >> shift) & 0xFFFF for shift in range(0, 64, 16)], dtype=np.float32)


def _from_digits(key: str, value, problems: list) -> int:
    digits = np.asarray(value)
    if (digits.shape != (4,) or digits.dtype.kind not in "fiu"
            or not np.all((digits >= 0) & (digits < 2 ** 16) & (digits == np.floor(digits)))):
        problems.append(f"{key!r} is not a count as state_dict() writes it (four 16-bit digits), got {value!r}")
        return 0
    return sum(int(d) << (16 * i) for i, d in enumerate(digits))
