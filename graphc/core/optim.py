"""Optimizers as graph builders: the update of every param, written in graph ops.

The compiled training step computes the loss, its gradients and these updates in one native
call; the updates are written in place into the caller's param arrays (and into momentum
buffers the compiled step owns).
"""
from __future__ import annotations

import dataclasses

from graphc.core.errors import at_user_line
from graphc.core.ir import Graph, Tensor, as_bool, as_finite_float


@dataclasses.dataclass(frozen=True)
class SGD:
    """Stochastic gradient descent with the semantics of `torch.optim.SGD` (dampening 0).

        d = grad + weight_decay * p
        v = momentum * v + d           (v starts at 0, so the first step has v = d, as PyTorch)
        d = d + momentum * v if nesterov else v       (when momentum != 0)
        p = p - lr * d
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        # Stored as Python floats: a numpy scalar times a Tensor would make numpy build an array.
        for name in ("lr", "momentum", "weight_decay"):
            object.__setattr__(self, name, non_negative_float(getattr(self, name), f"SGD: {name}"))
        object.__setattr__(self, "nesterov", as_bool(self.nesterov, "SGD: nesterov"))
        if self.nesterov and self.momentum <= 0:
            raise ValueError(at_user_line("SGD: nesterov momentum needs momentum > 0"))

    def updates(self, graph: Graph, params: list[Tensor], grads: list[Tensor]):
        """(writes, state_names): writes is a list of (name of the param or state buffer, its new
        value); state_names the momentum buffers, declared as params of `graph`."""
        writes, state = [], []
        for p, g in zip(params, grads):
            d = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                buffer = graph.param(momentum_name(p.name), p.shape, p.dtype)
                state.append(buffer.name)
                v = self.momentum * buffer + d
                writes.append((buffer.name, v))
                d = d + self.momentum * v if self.nesterov else v
            writes.append((p.name, p - self.lr * d))
        return writes, state


def non_negative_float(value, what: str) -> float:
    """A hyperparameter as torch.optim checks it: finite (NaN would poison every param) and >= 0."""
    value = as_finite_float(value, what)
    if value < 0:
        raise ValueError(at_user_line(f"{what} must be >= 0, got {value!r}"))
    return value


def momentum_name(param_name: str) -> str:
    return f"momentum:{param_name}"
