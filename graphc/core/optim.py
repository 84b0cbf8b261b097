"""Optimizers as graph builders: the update of every param, written in graph ops.

The compiled training step computes the loss, its gradients and these updates in one native
call; the updates are written in place into the caller's param arrays (and into state buffers
the compiled step owns: momentum, Adam's moments).

Values that change between calls without recompiling (the learning rate, Adam's bias
corrections) are "hyperparameter slots": scalar nodes the optimizer asks for by name through
`hyper`, whose values `hyper_values(lr, step)` gives for each call. Outside a compiled step
they default to constants of the optimizer's current values.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from graphc.core.errors import at_user_line
from graphc.core.ir import Graph, Tensor, as_bool, as_finite_float
from graphc.core.ops.elementwise import elementwise

Hyper = Callable[[str], object]   # name -> a (1,)-shaped Tensor, or a Python float


class Optimizer:
    """What every optimizer has: a learning rate settable between calls (`step.lr = ...`)."""

    lr: float
    # True if some hyperparameter slot changes on every call (Adam's bias corrections)
    changes_every_call = False

    def hyper_values(self, lr: float, step: int) -> dict[str, float]:
        """The hyperparameter slots' values for call number `step` (1 for the first) at `lr`."""
        return {"lr": lr}

    def _hyper(self, hyper: Hyper | None) -> Hyper:
        if hyper is not None:
            return hyper
        values = self.hyper_values(self.lr, 1)
        return values.__getitem__


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
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

    def updates(self, graph: Graph, params: list[Tensor], grads: list[Tensor], hyper: Hyper | None = None):
        """(writes, state_names): writes is a list of (name of the param or state buffer, its new
        value); state_names the momentum buffers, declared as params of `graph`."""
        lr = self._hyper(hyper)("lr")
        writes, state = [], []
        for p, g in zip(params, grads):
            d = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum:
                buffer = graph.param(momentum_name(p.name), p.shape, p.dtype)
                state.append(buffer.name)
                v = self.momentum * buffer + d
                writes.append((buffer.name, v))
                d = d + self.momentum * v if self.nesterov else v
            writes.append((p.name, p - lr * d))
        return writes, state


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with the semantics of `torch.optim.Adam` (amsgrad off): bias-corrected moments, and
    weight decay as an L2 term added to the gradient.

        g = grad + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    changes_every_call = True
    _kind = "Adam"

    def __post_init__(self):
        kind = self._kind
        object.__setattr__(self, "lr", non_negative_float(self.lr, f"{kind}: lr"))
        object.__setattr__(self, "eps", non_negative_float(self.eps, f"{kind}: eps"))
        object.__setattr__(self, "weight_decay", non_negative_float(self.weight_decay, f"{kind}: weight_decay"))
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(at_user_line(f"{kind}: betas must be a pair (beta1, beta2), got {betas!r}"))
        betas = tuple(as_finite_float(b, f"{kind}: betas[{i}]") for i, b in enumerate(betas))
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(at_user_line(f"{kind}: betas[{i}] must lie in [0, 1), got {beta!r}"))
        object.__setattr__(self, "betas", betas)

    def hyper_values(self, lr: float, step: int) -> dict[str, float]:
        beta1, beta2 = self.betas
        # Computed in float64 as torch does, then rounded once into the float32 slots.
        values = {"step_size": lr / (1.0 - beta1 ** step), "inv_bias2_sqrt": 1.0 / math.sqrt(1.0 - beta2 ** step)}
        if self._decoupled and self.weight_decay:
            values["decay"] = 1.0 - lr * self.weight_decay
        return values

    _decoupled = False

    def updates(self, graph: Graph, params: list[Tensor], grads: list[Tensor], hyper: Hyper | None = None):
        hyper = self._hyper(hyper)
        step_size, inv_bias2_sqrt = hyper("step_size"), hyper("inv_bias2_sqrt")
        decay = hyper("decay") if self._decoupled and self.weight_decay else None
        beta1, beta2 = self.betas
        eps = self.eps
        writes, state = [], []
        for p, g in zip(params, grads):
            if self.weight_decay and not self._decoupled:
                g = g + self.weight_decay * p
            m = graph.param(f"exp_avg:{p.name}", p.shape, p.dtype)
            v = graph.param(f"exp_avg_sq:{p.name}", p.shape, p.dtype)
            state += [m.name, v.name]
            # One node per written value, its expression composed in sympy: a node per operation
            # made the updates a large part of a ResNet's training graph, which every pass copies.
            m_new = elementwise(lambda m, g: beta1 * m + (1.0 - beta1) * g, m, g, name="Adam")
            v_new = elementwise(lambda v, g: beta2 * v + (1.0 - beta2) * g * g, v, g, name="Adam")
            decayed = p * decay if decay is not None else p
            p_new = elementwise(lambda p, m, v, step, inv: p - step * m / (v ** 0.5 * inv + eps),
                                decayed, m_new, v_new, step_size, inv_bias2_sqrt, name="Adam")
            writes += [(m.name, m_new), (v.name, v_new), (p.name, p_new)]
        return writes, state


@dataclasses.dataclass(frozen=True)
class AdamW(Adam):
    """AdamW with the semantics of `torch.optim.AdamW`: Adam whose weight decay is decoupled,
    p = p * (1 - lr * weight_decay) before the Adam step."""

    weight_decay: float = 1e-2

    _kind = "AdamW"
    _decoupled = True


def non_negative_float(value, what: str) -> float:
    """A hyperparameter as torch.optim checks it: finite (NaN would poison every param) and >= 0."""
    value = as_finite_float(value, what)
    if value < 0:
        raise ValueError(at_user_line(f"{what} must be >= 0, got {value!r}"))
    return value


def momentum_name(param_name: str) -> str:
    return f"momentum:{param_name}"
