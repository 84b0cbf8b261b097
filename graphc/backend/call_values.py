"""The values a compiled program reads that change between calls without recompiling.

- the random key [seed, call index] that dropout's masks are drawn with;
- the optimizer's hyperparameter slots: the learning rate, and Adam's bias corrections, which
  depend on the step count;
- slots fixed when the program is bound (a data-parallel step's MPI handles and function
  addresses): written then, and again whenever the state is zeroed.

Each lives in a State buffer of the program. The program's entry counts its completed calls
itself (assemble.CALLS_SLOT), so every call path, the fastest included, keeps the count; this
object writes the key and the slots from it. Only programs whose values change at every call
(dropout's key, Adam's corrections) come here before each call.
"""
from __future__ import annotations

import threading

import numpy as np

from graphc.core.optim import non_negative_float


class CallValues:
    """The random key and hyperparameter slots of one program, and the counts behind them.

    `calls` is the number of completed calls (the random key's call index); `optimizer_steps`
    the updates the optimizer has made since its state was last zeroed (Adam's t - 1), as a
    new torch optimizer would start.
    """

    def __init__(self, state, calls_slot: str, *, seed: int, random_key_slot: str | None, optimizer=None,
                 hyper_slots: dict[str, str] | None = None, fixed_state: dict[str, np.ndarray] | None = None):
        self.seed = seed
        self.lock = threading.Lock()
        self._counter = state[calls_slot]
        self._steps_before_reset = 0
        key = state.get(random_key_slot) if random_key_slot else None
        self._key = None if key is None else key.view(np.uint32)
        self._optimizer = optimizer
        self._lr = optimizer.lr if optimizer is not None else None
        self._hyper = {name: state[slot] for name, slot in (hyper_slots or {}).items()}
        self.per_call = self._key is not None or (optimizer is not None and optimizer.changes_every_call
                                                  and bool(self._hyper))
        # slot name -> its words (int64), copied over the slot's memory whatever its dtype
        self._fixed = {name: (state[name].view(np.int64), np.asarray(words, np.int64))
                       for name, words in (fixed_state or {}).items()}
        self.write_fixed()
        self.write_hyper()

    def write_fixed(self) -> None:
        for memory, words in self._fixed.values():
            memory[:] = words

    @property
    def uses_masks(self) -> bool:
        return self._key is not None

    @property
    def random_key(self) -> np.ndarray | None:
        """The key slot's memory (uint32 [seed, call index]), if the program draws masks."""
        return self._key

    @property
    def optimizer(self):
        return self._optimizer

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
        if self._optimizer is None:
            raise AttributeError("lr: this compiled function has no optimizer")
        value = non_negative_float(value, "lr")
        with self.lock:
            self._lr = value
            self.write_hyper()

    def write_hyper(self) -> None:
        """The hyperparameter slots' values for the next call."""
        if self._optimizer is None or not self._hyper:
            return
        values = self._optimizer.hyper_values(self._lr, self.optimizer_steps + 1)
        for name, array in self._hyper.items():
            array[0] = values[name]

    def before_call(self) -> None:
        if self._key is not None:
            self._key[0] = self.seed
            self._key[1] = self.calls & 0xFFFFFFFF
        if self._optimizer is not None and self._optimizer.changes_every_call:
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
        self.write_hyper()
