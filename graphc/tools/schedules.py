"""Learning-rate schedules driving a compiled training step's `lr`, as torch's schedulers do.

    step = gc.compile_training_step(loss, params, gc.Adam(lr=1e-3))
    schedule = cosine_lr(step, total_steps=1000, warmup_steps=50)
    for xb, yb in batches:
        step(x=xb, y=yb)
        schedule.step()          # after each training step, as torch's scheduler.step()

The base lr is the step's lr when the schedule is made. Making a schedule sets `step.lr` to the
lr of the first training step; each `schedule.step()` sets the next one (`step.lr` is read at
every call, so nothing is recompiled). Every value is a closed form of the number of steps
taken, computed in float64 as torch does, so a resumed run picks up where it stopped:

    step.load_state_dict(gc.load_params("ckpt.npz"))
    schedule = cosine_lr(step, total_steps=1000)    # the step's lr is the base lr again
    schedule.steps = step.optimizer_steps           # sets step.lr for step number optimizer_steps
"""
from __future__ import annotations

import math
import numbers

__all__ = ["LRSchedule", "CosineLR", "StepLR", "WarmupLR", "cosine_lr", "step_lr", "warmup_lr"]


class LRSchedule:
    """A schedule bound to a compiled step: `lr_at(t)` is the lr of training step t (0-based)."""

    def __init__(self, step, where: str):
        if not _is_real(getattr(step, "lr", None)):
            raise TypeError(f"{where}: expected a compiled training step (gc.compile_training_step), whose lr "
                            f"the schedule sets, got {type(step).__name__}")
        self.base_lr = float(step.lr)
        if not math.isfinite(self.base_lr) or self.base_lr < 0:
            raise ValueError(f"{where}: the step's lr must be finite and >= 0, got {self.base_lr!r}")
        self._step = step
        self._steps = 0

    def lr_at(self, t: int) -> float:
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """Training steps taken so far (`schedule.step()` calls): the index of the next one."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        """Jump to a step count (e.g. a resumed run's `step.optimizer_steps`); sets `step.lr`."""
        self._steps = _count(value, f"{type(self).__name__}: steps", minimum=0)
        self._apply()

    @property
    def lr(self) -> float:
        """The lr of the next training step (what `step.lr` was set to)."""
        return self.lr_at(self.steps)

    def step(self) -> None:
        """Call after each training step: sets `step.lr` for the next one."""
        self._steps += 1
        self._apply()

    def _apply(self) -> None:
        self._step.lr = self.lr

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in self._settings().items())
        return (f"{type(self).__name__}(base_lr={self.base_lr!r}, {settings}; "
                f"after {self.steps} steps: lr {self.lr:.6g})")

    def _settings(self) -> dict:
        return {}


class CosineLR(LRSchedule):
    """torch's CosineAnnealingLR(T_max=total_steps - warmup_steps, eta_min=min_lr), after an
    optional linear warm-up (see WarmupLR) from base_lr / warmup_steps up to base_lr.
    After total_steps the lr stays at min_lr (torch's would climb the cosine back up)."""

    def __init__(self, step, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0):
        super().__init__(step, "cosine_lr")
        self.total_steps = _count(total_steps, "cosine_lr: total_steps", minimum=1)
        self.warmup_steps = _count(warmup_steps, "cosine_lr: warmup_steps", minimum=0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"cosine_lr: warmup_steps ({self.warmup_steps}) must be fewer than total_steps "
                             f"({self.total_steps}), leaving steps to anneal")
        self.min_lr = _real(min_lr, "cosine_lr: min_lr")
        if not 0.0 <= self.min_lr <= self.base_lr:
            raise ValueError(f"cosine_lr: min_lr must lie in [0, base lr {self.base_lr!r}] (the step's lr), "
                             f"got {self.min_lr!r}")
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(t - self.warmup_steps, span) / span
        return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0

    def _settings(self) -> dict:
        return {"total_steps": self.total_steps, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps}


class StepLR(LRSchedule):
    """torch's StepLR: base_lr * gamma ** (t // step_size)."""

    def __init__(self, step, step_size: int, gamma: float = 0.1):
        super().__init__(step, "step_lr")
        self.step_size = _count(step_size, "step_lr: step_size", minimum=1)
        self.gamma = _real(gamma, "step_lr: gamma")
        if self.gamma <= 0:
            raise ValueError(f"step_lr: gamma, the factor applied every step_size steps, must be > 0, "
                             f"got {self.gamma!r}")
        self._apply()

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.gamma ** (t // self.step_size)

    def _settings(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma}


class WarmupLR(LRSchedule):
    """Linear warm-up: base_lr * (t + 1) / warmup_steps for the first warmup_steps steps, then
    base_lr. torch's LinearLR(start_factor=1/warmup_steps, total_iters=warmup_steps - 1): no
    step is spent at lr 0, and step warmup_steps - 1 is the first at the full lr."""

    def __init__(self, step, warmup_steps: int):
        super().__init__(step, "warmup_lr")
        self.warmup_steps = _count(warmup_steps, "warmup_lr: warmup_steps", minimum=0)
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        return self.base_lr

    def _settings(self) -> dict:
        return {"warmup_steps": self.warmup_steps}


def cosine_lr(step, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0) -> CosineLR:
    """Cosine annealing from the step's lr to `min_lr` over `total_steps` training steps, the
    first `warmup_steps` of them a linear warm-up (torch's CosineAnnealingLR, LinearLR)."""
    return CosineLR(step, total_steps, min_lr, warmup_steps)


def step_lr(step, step_size: int, gamma: float = 0.1) -> StepLR:
    """The step's lr multiplied by `gamma` every `step_size` training steps (torch's StepLR)."""
    return StepLR(step, step_size, gamma)


def warmup_lr(step, warmup_steps: int) -> WarmupLR:
    """A linear warm-up to the step's lr over `warmup_steps` training steps, then constant."""
    return WarmupLR(step, warmup_steps)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _count(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{what} must be a {kind} int, got {value}")
    return int(value)


def _real(value, what: str) -> float:
    if not _is_real(value):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value
