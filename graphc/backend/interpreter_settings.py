"""`gc.fast_compile()`: process-wide interpreter settings a user may let compiles change.

By default compiling changes no process-wide setting. Inside `with gc.fast_compile():` the
cyclic GC is paused (a compile allocates a few hundred thousand short-lived objects, almost all
freed by reference counting, and collections would examine them again and again) and the GIL's
switch interval is shortened (a compile thread waiting for the GIL gets it sooner), both
restored when the block ends.

Each setting is a `SharedOverride`: a context manager that may be entered by several threads at
once (two user threads compiling), changes the setting when the first enters and restores what
it found when the last leaves. Not a decorator: its wrapper's frame (contextlib.py) would stand
between the user's code and graphc's, and nodes built under it would name that file as the
user's line (errors.user_site).
"""
from __future__ import annotations

import gc
import sys
import threading
from typing import Callable

__all__ = ["SharedOverride", "GIL_SWITCH_INTERVAL_S", "short_gil_switches", "cyclic_gc_paused", "fast_compile"]


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


# Longest wait, in seconds, of a compile thread for the GIL while the caller generates IR.
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
    # allocation would start its collection anyway. Done here, it counts as the compile's time.
    if gc.isenabled():
        gc.collect(0)


cyclic_gc_paused = SharedOverride(_pause_cyclic_gc, _resume_cyclic_gc, after_last=_collect_youngest)


class fast_compile:  # noqa: N801 (used like a function: `with gc.fast_compile():`)
    """Let compiles inside the block pause the cyclic GC and shorten the GIL's switch interval
    for the whole process; both are restored when the block ends (see the module docstring)."""

    def __enter__(self) -> "fast_compile":
        cyclic_gc_paused.__enter__()
        try:
            short_gil_switches.__enter__()
        except BaseException:
            cyclic_gc_paused.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            short_gil_switches.__exit__(*exc_info)
        finally:
            cyclic_gc_paused.__exit__(*exc_info)
