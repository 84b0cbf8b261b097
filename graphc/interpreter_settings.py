"""Process-wide interpreter settings that compiling changes while it runs, and restores.

Each is a `SharedOverride`: a context manager that may be entered by several threads at once
(two user threads compiling), changes the setting when the first enters and restores what it
found when the last leaves. Not a decorator: its wrapper's frame (contextlib.py) would stand
between the user's code and graphc's, and nodes built under it would name that file as the
user's line (errors.user_site).
"""
from __future__ import annotations

import gc
import sys
import threading
from typing import Callable

__all__ = ["SharedOverride", "GIL_SWITCH_INTERVAL_S", "short_gil_switches", "cyclic_gc_paused"]


class SharedOverride:
    """`change()` returns the old state, `restore(old)` puts it back; applied once for all
    overlapping users.

    `after_last()`, if given, runs when the last user has left, outside the lock: it may run
    arbitrary code (a garbage collection runs finalizers, which may compile again)."""

    def __init__(self, change: Callable[[], object], restore: Callable[[object], None],
                 after_last: Callable[[], None] | None = None):
        self._change, self._restore, self._after_last = change, restore, after_last
        # Reentrant: the cyclic GC may run finalizers at any allocation, also one made while
        # the lock is held right after the GC is resumed, and a finalizer may compile (enter
        # again) on this thread. A plain lock deadlocked there, depending on where the
        # allocation count happened to cross the GC's threshold.
        self._lock = threading.RLock()
        self._users = 0
        self._saved = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = self._change()
            self._users += 1

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
            if last:
                self._restore(self._saved)
        if last and self._after_last is not None:
            self._after_last()


# Longest wait, in seconds, of a compile thread for the GIL while background threads compile.
# A compile thread drops the GIL during the three heavy LLVM calls but needs it back after
# each of its ~20 ctypes calls (creating and verifying the module, target machine, pass
# builder, copying the object), while the caller's thread holds it generating the next
# module's IR; a waiting thread gets the GIL only after the switch interval (5 ms by default).
# Measured on LeNet's step (cold compiles after the first in one process): its first module
# took 0.26-0.28 s to compile instead of 0.11-0.13 s, the whole compile 0.61-0.65 s instead
# of 0.46-0.47 s. The interval matters only while a thread waits, so the caller's own work
# is not slowed.
GIL_SWITCH_INTERVAL_S = 0.0002


def _shorten_switch_interval() -> float:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(min(saved, GIL_SWITCH_INTERVAL_S))
    return saved


short_gil_switches = SharedOverride(_shorten_switch_interval, sys.setswitchinterval)


def _pause_cyclic_gc() -> bool:
    was_enabled = gc.isenabled()
    gc.disable()
    return was_enabled


def _resume_cyclic_gc(was_enabled: bool) -> None:
    if was_enabled:
        gc.enable()


def _collect_youngest() -> None:
    # The youngest generation now holds everything the compile allocated and kept; the next
    # allocation would start its collection anyway. Done here, it is counted as the compile's
    # time, where it belongs (20-35 ms after LeNet's step). Nothing to do if the GC is off.
    if gc.isenabled():
        gc.collect(0)


# A compile allocates a few hundred thousand short-lived Python objects (graphs, sympy
# expressions, llvmlite IR), which set off ~120 cyclic collections, one of them of the oldest
# generation: 60-105 ms of LeNet's 0.5-0.6 s cold compile. Almost all of it is freed by
# reference counting; what the compile kept is examined once, at the end.
cyclic_gc_paused = SharedOverride(_pause_cyclic_gc, _resume_cyclic_gc, after_last=_collect_youngest)
