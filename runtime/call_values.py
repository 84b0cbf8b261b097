"""The values a program reads that change between calls without recompiling, and the calls of
a training step that write them: shared by graphc's compiled programs and programs loaded
from an artifact (deployed.py), which must behave bit for bit alike.

- the random key [seed, call index] that dropout's masks are drawn with;
- the optimizer's hyperparameter slots: the learning rate, and Adam's bias corrections, which
  depend on the step count;
- slots fixed when the program is bound (a data-parallel step's MPI handles and function
  addresses): written then, and again whenever the state is zeroed.

Each lives in a State buffer of the program. The program's entry counts its completed calls
itself, so every call path, the fastest included, keeps the count; this object writes the key
and the slots from it. Only programs whose values change at every call (dropout's key, Adam's
corrections) come here before each call.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import numpy as np

from .optimizers import finite_non_negative

__all__ = ["CallValues", "FunctionCalls", "TrainingStepCalls"]

HyperValues = Callable[[float, int], Mapping[str, float]]   # (lr, step from 1) -> slot name -> value


class CallValues:
    """The random key, hyperparameter and fixed slots of one program, and the counts behind them.

    `calls` is the number of completed calls (the random key's call index); `optimizer_steps`
    the updates the optimizer has made since its state was last zeroed (Adam's t - 1), as a
    new torch optimizer would start. `hyper_values(lr, step)` gives the hyperparameter slots'
    values for update number `step` (None: no optimizer).
    """

    def __init__(self, state: Mapping[str, np.ndarray], calls_slot: str, *, seed: int, random_key_slot: str | None,
                 hyper_slots: Mapping[str, str] | None = None, hyper_values: HyperValues | None = None,
                 changes_every_call: bool = False, lr: float | None = None, optimizer_steps: int | None = None,
                 fixed_state: Mapping[str, np.ndarray] | None = None, hidden_state: Iterable[str] = ()):
        self.seed = seed
        self.lock = threading.Lock()
        self._counter = state[calls_slot]
        self._steps_before_reset = 0 if optimizer_steps is None else self.calls - optimizer_steps
        key = state.get(random_key_slot) if random_key_slot else None
        self._key = None if key is None else key.view(np.uint32)
        self._hyper_values = hyper_values
        self._lr = lr
        self._hyper = {name: state[slot] for name, slot in (hyper_slots or {}).items()}
        self._changes_every_call = hyper_values is not None and changes_every_call
        self.per_call = self._key is not None or (self._changes_every_call and bool(self._hyper))
        # slot name -> its words (int64), copied over the slot's memory whatever its dtype
        self._fixed = {name: (state[name].view(np.int64), np.asarray(words, np.int64))
                       for name, words in (fixed_state or {}).items()}
        # State slots that hold none of the optimizer's state (what step.state leaves out)
        self.hidden_slots = frozenset(set((hyper_slots or {}).values()) | {calls_slot} | set(self._fixed)
                                      | set(hidden_state)
                                      | ({random_key_slot} if random_key_slot else set()))
        self.write_fixed()
        self.write_hyper()

    @property
    def uses_masks(self) -> bool:
        return self._key is not None

    @property
    def random_key(self) -> np.ndarray | None:
        """The key slot's memory (uint32 [seed, call index]), if the program draws masks."""
        return self._key

    @property
    def hyper_slots(self) -> dict[str, np.ndarray]:
        """Hyperparameter name -> its slot's memory."""
        return dict(self._hyper)

    @property
    def bound_to_this_process(self) -> bool:
        """Whether some slot holds values only this process can use (MPI handles, addresses)."""
        return bool(self._fixed)

    @property
    def calls(self) -> int:
        return int(self._counter[0])

    @property
    def optimizer_steps(self) -> int:
        return self.calls - self._steps_before_reset

    @property
    def lr(self) -> float | None:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        if self._hyper_values is None:
            raise AttributeError("lr: this program has no optimizer")
        value = self.checked_lr(value)
        with self.lock:
            self._lr = value
            self.write_hyper()

    def checked_lr(self, value) -> float:
        """`value` as the new learning rate, or an error saying why not."""
        checked = finite_non_negative(value.item() if isinstance(value, np.generic) else value)
        if checked is None:
            raise ValueError(f"lr must be a finite number >= 0, got {value!r}")
        return checked

    def write_fixed(self) -> None:
        for memory, words in self._fixed.values():
            memory[:] = words

    def write_hyper(self) -> None:
        """The hyperparameter slots' values for the next call."""
        if self._hyper_values is None or not self._hyper:
            return
        values = self._hyper_values(self._lr, self.optimizer_steps + 1)
        for name, array in self._hyper.items():
            array[0] = values[name]

    def before_call(self) -> None:
        if self._key is not None:
            self._key[0] = self.seed
            self._key[1] = self.calls & 0xFFFFFFFF
        if self._changes_every_call:
            self.write_hyper()

    def reset_optimizer(self, calls: int) -> None:
        """After the program's state was zeroed: the call count back at `calls`, optimizer steps
        counted from 0 again, the slots rewritten."""
        self._counter[0] = calls
        self._steps_before_reset = calls
        self.write_fixed()
        self.write_hyper()

    def counters(self) -> dict[str, int]:
        return {"calls": self.calls, "optimizer_steps": self.optimizer_steps}

    def restore(self, calls: int, optimizer_steps: int) -> None:
        self._counter[0] = calls
        self._steps_before_reset = calls - optimizer_steps
        self.write_fixed()
        self.write_hyper()


class FunctionCalls:
    """A compiled function's calls, over `self._program` (a Program), `self._call_values` (a
    CallValues) and `self._single` (whether it returns one array rather than a list)."""

    def __call__(self, /, **feeds):
        values = self._call_values
        if values.per_call:
            with values.lock:
                values.before_call()
                results = self._program(**feeds)
        else:
            results = self._program(**feeds)
        return results[0] if self._single else results

    @property
    def seed(self) -> int:
        """The seed of the random masks (dropout); `calls` says how many calls drew them so far."""
        return self._call_values.seed

    @property
    def calls(self) -> int:
        return self._call_values.calls

    @property
    def num_threads(self) -> int:
        return self._program.num_threads

    @property
    def params(self) -> Mapping[str, np.ndarray]:
        """The arrays bound as params and buffers, by name."""
        return self._program.params

    def load_params(self, values: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Copy `values` (e.g. `gc.load_params(path, graph)`) into the arrays bound as params.

        As torch's `load_state_dict`: with `strict`, missing and unexpected names are errors;
        `strict=False` loads the names both have. Names, shapes and dtypes are all checked
        before anything is copied.
        """
        self._program.load_params(values, strict=strict)


class TrainingStepCalls(FunctionCalls):
    """A training step's calls and optimizer controls (see FunctionCalls); the program's only
    output is the loss."""

    def __call__(self, /, **feeds) -> float:
        # The loss is the program's only output: read straight from a reused buffer.
        values = self._call_values
        if not values.per_call:
            return self._program.call_scalar(feeds)
        with values.lock:
            values.before_call()
            return self._program.call_scalar(feeds)

    @property
    def lr(self) -> float:
        """The learning rate; setting it takes effect at the next call, without recompiling."""
        return self._call_values.lr

    @lr.setter
    def lr(self, value) -> None:
        self._call_values.lr = value

    @property
    def optimizer_steps(self) -> int:
        """Updates made since the optimizer's state was last zeroed (Adam's step count)."""
        return self._call_values.optimizer_steps

    @property
    def state(self) -> Mapping[str, np.ndarray]:
        """The optimizer's state buffers (momentum, Adam's moments), by name."""
        hidden = self._call_values.hidden_slots
        return MappingProxyType({name: array for name, array in self._program.state.items() if name not in hidden})

    def reset_state(self) -> None:
        """Zero the optimizer's state (momentum buffers, Adam's moments and step count); dropout's
        masks go on from where they were."""
        values = self._call_values
        with values.lock:
            calls = values.calls
            self._program.reset_state(then=lambda: values.reset_optimizer(calls))
