"""The values a compiled program reads that change between calls, driven by graphc's optimizer
objects (graphc_runtime.call_values holds the mechanism, shared with loaded artifacts)."""
from __future__ import annotations

import numpy as np

from graphc.core.optim import non_negative_float
from graphc_runtime.call_values import CallValues as _RuntimeCallValues


class CallValues(_RuntimeCallValues):
    """The random key and hyperparameter slots of one compiled program (see
    graphc_runtime.call_values), with `optimizer` the graphc optimizer that computes them."""

    def __init__(self, state, calls_slot: str, *, seed: int, random_key_slot: str | None, optimizer=None,
                 hyper_slots: dict[str, str] | None = None, fixed_state: dict[str, np.ndarray] | None = None,
                 hidden_state=()):
        self._optimizer = optimizer
        super().__init__(state, calls_slot, seed=seed, random_key_slot=random_key_slot, hyper_slots=hyper_slots,
                         hyper_values=optimizer.hyper_values if optimizer is not None else None,
                         changes_every_call=optimizer is not None and optimizer.changes_every_call,
                         lr=optimizer.lr if optimizer is not None else None, fixed_state=fixed_state,
                         hidden_state=hidden_state)

    @property
    def optimizer(self):
        return self._optimizer

    def checked_lr(self, value) -> float:
        return non_negative_float(value, "lr")
