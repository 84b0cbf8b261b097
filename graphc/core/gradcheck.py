"""Checking `gc.grad` against central finite differences, in float64."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from graphc.core.autodiff import grad
from graphc.core.ir import Tensor
from graphc.core.reference import evaluate


@dataclass
class GradCheckReport:
    """Worst relative error between autodiff and finite differences, per parameter."""

    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def passed(self, tolerance: float = 1e-6) -> bool:
        return self.max_error < tolerance

    def __str__(self):
        width = max((len(name) for name in self.errors), default=5)
        rows = [f"{'param':<{width}}  worst relative error"]
        rows += [f"{name:<{width}}  {error:.3e}" for name, error in self.errors.items()]
        return "\n".join(rows)


def grad_check(loss: Tensor, params: Mapping[str, np.ndarray], feeds: Mapping[str, object], *,
               eps: float = 1e-6, directions: int = 2, coordinates: int = 6, seed: int = 0) -> GradCheckReport:
    """Compare `gc.grad(loss, params)` with central differences of `loss` in float64.

    Per parameter, checks the derivative along `directions` random ±1 directions (which touch
    every entry at once, as PyTensor's verify_grad does) and along `coordinates` single entries
    (the largest-gradient ones first); buffers in `params` are only read. Relative errors use a
    floor of 1e-3 of the parameter's largest gradient entry, so entries whose gradient is ~0 do
    not report rounding noise.
    """
    graph = loss.graph
    names = [name for name in params if name not in graph.buffers]   # buffers are state: no gradient
    for name in names:
        if name not in graph.params:
            raise ValueError(f"grad_check: {name!r} is not a param of graph {graph.name!r}")
    point = {name: np.array(value, dtype=np.float64) for name, value in params.items()}
    analytic = evaluate(grad(loss, [graph.params[name] for name in names]), feeds, point, dtype="float64")

    def loss_at(name, delta):
        shifted = dict(point)
        shifted[name] = point[name] + delta
        return float(evaluate(loss, feeds, shifted, dtype="float64"))

    rng = np.random.default_rng(seed)
    report = GradCheckReport()
    for name, g in zip(names, analytic):
        floor = 1e-3 * float(np.abs(g).max()) + 1e-12
        worst = 0.0
        for direction in _probe_directions(g, rng, directions, coordinates):
            numeric = (loss_at(name, eps * direction) - loss_at(name, -eps * direction)) / (2 * eps)
            exact = float(np.sum(g * direction))
            worst = max(worst, abs(numeric - exact) / max(abs(numeric), abs(exact), floor))
        report.errors[name] = worst
    return report


def _probe_directions(g, rng, directions, coordinates):
    for _ in range(directions):
        yield rng.choice([-1.0, 1.0], size=g.shape)
    flat = np.abs(g).ravel()
    largest = np.argsort(flat)[::-1][: (coordinates + 1) // 2]
    randoms = rng.choice(flat.size, size=min(coordinates // 2, flat.size), replace=False)
    for index in dict.fromkeys(list(largest) + list(randoms)):
        unit = np.zeros(g.size)
        unit[index] = 1.0
        yield unit.reshape(g.shape)
