"""The per-call hyperparameters of graphc's optimizers, for steps loaded from an artifact.

A compiled training step reads its learning rate (and Adam's bias corrections, which change with
every step) from one-float State slots that Python writes between calls. graphc computes them in
graphc/core/optim.py (`hyper_values`); this is the same arithmetic, in the same order and
precision (float64, rounded once into the float32 slot), driven by the optimizer's description
in the artifact's manifest, so that a loaded step goes on bit for bit. tests/test_artifact.py
checks the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["OPTIMIZER_KINDS", "hyper_values", "changes_every_call", "check_optimizer", "finite_non_negative"]

# kind -> its fields besides lr, with the type of each
OPTIMIZER_KINDS = {
    "SGD": {"momentum": float, "weight_decay": float, "nesterov": bool},
    "Adam": {"betas": list, "eps": float, "weight_decay": float},
    "AdamW": {"betas": list, "eps": float, "weight_decay": float},
}


def hyper_values(optimizer: Mapping, lr: float, step: int) -> dict[str, float]:
    """The hyperparameter slots' values for call number `step` (1 for the first) at `lr`."""
    if optimizer["kind"] == "SGD":
        return {"lr": lr}
    beta1, beta2 = optimizer["betas"]
    values = {"step_size": lr / (1.0 - beta1 ** step), "inv_bias2_sqrt": 1.0 / math.sqrt(1.0 - beta2 ** step)}
    if optimizer["kind"] == "AdamW" and optimizer["weight_decay"]:
        values["decay"] = 1.0 - lr * optimizer["weight_decay"]
    return values


def changes_every_call(optimizer: Mapping) -> bool:
    return optimizer["kind"] != "SGD"


def check_optimizer(optimizer) -> str | None:
    """What is wrong with an optimizer description from a manifest, or None."""
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("kind"), str) \
            or optimizer["kind"] not in OPTIMIZER_KINDS:
        return f"an optimizer of unknown kind (the runtime drives {', '.join(OPTIMIZER_KINDS)})"
    fields = OPTIMIZER_KINDS[optimizer["kind"]]
    if set(optimizer) != {"kind", "lr", *fields}:
        return f"a {optimizer['kind']} optimizer with fields {sorted(optimizer)}"
    if finite_non_negative(optimizer["lr"]) is None:
        return "an optimizer whose lr is not a finite number >= 0"
    for name, kind in fields.items():
        value = optimizer[name]
        if kind is float and finite_non_negative(value) is None:
            return f"an optimizer whose {name} is not a finite number >= 0"
        if kind is bool and type(value) is not bool:
            return f"an optimizer whose {name} is not true or false"
        if kind is list and not (isinstance(value, list) and len(value) == 2
                                 and all(finite_non_negative(b) is not None and b < 1 for b in value)):
            return f"an optimizer whose {name} are not two numbers in [0, 1)"
    return None


def finite_non_negative(value) -> float | None:
    """`value` as a float if it is a finite number >= 0 (not a bool), else None."""
    if type(value) not in (int, float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None
