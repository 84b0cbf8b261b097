"""The values a compiled program reads that change between calls without recompiling.

- the random key [seed, call index] that dropout's masks are drawn with;
- the optimizer's hyperparameter slots: the learning rate, and Adam's bias corrections, which
  depend on the step count.

Each lives in a State buffer of the program; this object writes them before a call and counts
the calls after it. Programs that have neither pay nothing: their call path does not come here.
"""
from __future__ import annotations

import threading

import numpy as np

from graphc.core.optim import non_negative_float


class CallValues:
    """The random key and hyperparameter slots of one program, and the counters behind them.

    `calls` counts completed calls (the random key's call index); `optimizer_steps` the updates
    the optimizer has made (Adam's t - 1), which `reset_optimizer` sets back to 0 as a new
    torch optimizer would start. Both are counted only by programs whose values depend on them
    (`per_call`): an SGD step without dropout reads neither.
    """

    def __init__(self, state, *, seed: int, random_key_slot: str | None, optimizer=None,
                 hyper_slots: dict[str, str] | None = None):
        self.seed = seed
        self.calls = 0
        self.optimizer_steps = 0
        self.lock = threading.Lock()
        key = state.get(random_key_slot) if random_key_slot else None
        self._key = None if key is None else key.view(np.uint32)
        if self._key is not None:
            self._key[0] = seed
        self._optimizer = optimizer
        self._lr = optimizer.lr if optimizer is not None else None
        self._hyper = {name: state[slot] for name, slot in (hyper_slots or {}).items() if slot in state}
        # Adam's slots change at every call; SGD's only when the learning rate is set.
        self.per_call = self._key is not None or (optimizer is not None and optimizer.changes_every_call
                                                  and bool(self._hyper))
        self.write_hyper()

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

    def after_call(self) -> None:
        self.calls += 1
        if self._optimizer is not None:
            self.optimizer_steps += 1

    def reset_optimizer(self) -> None:
        """After the optimizer's state was zeroed: count steps from 0 again, and rewrite the
        slots (zeroed with the rest of the state)."""
        self.optimizer_steps = 0
        self.write_hyper()

    def counters(self) -> dict[str, int]:
        return {"calls": self.calls, "optimizer_steps": self.optimizer_steps}

    def restore(self, calls: int, optimizer_steps: int) -> None:
        self.calls, self.optimizer_steps = calls, optimizer_steps
        self.write_hyper()
