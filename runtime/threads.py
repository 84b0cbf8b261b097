"""How many threads compiled code uses, and the team of threads that runs it.

A compiled program's entry has the signature

    void entry(void **args, int64_t tid, int64_t nthreads)

and is run once per thread, tid = 0 .. nthreads-1, all at the same time. Generated code
splits each kernel's work by tid and synchronizes the threads between kernels with its own
barrier. A barrier completes only if all nthreads threads are running the entry
concurrently: a pool that queued the calls and ran some after others (as a task pool with
fewer free workers than tasks does) would deadlock. `ThreadTeam` therefore hands every job
to nthreads - 1 dedicated workers that are already running, plus the calling thread, and
never accepts a job larger than the workers it has actually started.
"""

from __future__ import annotations

import ctypes
import operator
import os
import threading
import warnings
import weakref

import numpy as np

from .buffers import aligned_zeros, data_pointer
from .team_native import CONTROL_BLOCK_BYTES, MAX_THREADS, TeamFunctions, team_functions

__all__ = [
    "EntryFunction",
    "MAX_THREADS",
    "ThreadTeam",
    "default_team",
    "get_num_threads",
    "set_num_threads",
    "usable_cpu_count",
]

EntryFunction = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
"""ctypes type of a compiled entry point: entry(void **args, int64 tid, int64 nthreads)."""

_WORKER_JOIN_TIMEOUT_SECONDS = 10.0


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        return os.cpu_count() or 1


def _checked_thread_count(count) -> int:
    # operator.index accepts Python and numpy integers and nothing fractional; bool is an
    # int to Python but never a deliberate thread count.
    if type(count) is bool:
        raise TypeError(f"a thread count must be an int, got {count!r}")
    try:
        count = operator.index(count)
    except TypeError:
        raise TypeError(f"a thread count must be an int, got {count!r}") from None
    if not 1 <= count <= MAX_THREADS:
        raise ValueError(f"a thread count must be in [1, {MAX_THREADS}], got {count}")
    return count


def _thread_count_from_environment() -> int:
    default = min(usable_cpu_count(), MAX_THREADS)
    text = os.environ.get("GRAPHC_NUM_THREADS", "").strip()
    if not text:
        return default
    try:
        return _checked_thread_count(int(text))
    except ValueError:
        warnings.warn(
            f"GRAPHC_NUM_THREADS={text!r} is not an integer in [1, {MAX_THREADS}]; "
            f"using {default} threads (the usable CPUs)",
            RuntimeWarning,
            stacklevel=2,
        )
        return default


_num_threads = _thread_count_from_environment()


def get_num_threads() -> int:
    """Threads compiled programs use at most (programs may use fewer)."""
    return _num_threads


def set_num_threads(count: int) -> None:
    """Limit compiled programs to `count` threads, from their next call on."""
    global _num_threads
    _num_threads = _checked_thread_count(count)


class ThreadTeam:
    """Persistent worker threads that run a compiled entry on several threads at once.

    `run` blocks until every thread has returned from the entry. Concurrent `run` calls
    from several Python threads are serialized: a job owns all the team's workers.
    """

    def __init__(self, native: TeamFunctions | None = None):
        # `native`: the fork/join code, if not this process's own (team_functions compiles
        # that); a saved artifact brings it, so that running one needs no LLVM.
        native = native if native is not None else team_functions()
        self._native = native
        self._control = aligned_zeros(CONTROL_BLOCK_BYTES, np.uint8)
        self._control_address = data_pointer(self._control)
        if native.init(self._control_address) != 0:
            raise OSError("could not initialize the thread team's pthread mutex and conditions")
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Shuts the workers down on close(), garbage collection or interpreter exit. It holds
        # what the workers use, never the team itself, so the team can be collected.
        self._finalizer = weakref.finalize(self, _shut_down, native, self._control, self._workers, self._lock)
        _live_teams.add(self)

    @property
    def started_workers(self) -> int:
        """Worker threads running (tid 0 is always the caller's thread)."""
        return len(self._workers)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def run(self, entry_address: int, args_address: int, nthreads: int) -> None:
        """Run entry(args, tid, nthreads) for every tid in [0, nthreads) concurrently."""
        nthreads = _checked_thread_count(nthreads)
        if nthreads == 1:
            EntryFunction(entry_address)(args_address, 0, 1)
            return
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("this ThreadTeam is closed (or was inherited by a forked process)")
            if len(self._workers) < nthreads - 1:
                self._start_workers(nthreads - 1)
            self._native.run(self._control_address, entry_address, args_address, nthreads)

    def close(self) -> None:
        """Stop and join the workers; the team cannot run anything afterwards."""
        self._finalizer()

    def __enter__(self) -> ThreadTeam:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start_workers(self, count: int) -> None:
        while len(self._workers) < count:
            tid = len(self._workers) + 1
            worker = threading.Thread(
                target=_work,
                args=(self._native.worker, self._control, tid),
                name=f"graphc-worker-{tid}",
                daemon=True,  # exit never waits for them: the finalizer stops them first
            )
            try:
                worker.start()
            except RuntimeError as error:  # the OS refused a thread; keep the ones we have
                raise RuntimeError(f"could not start graphc worker thread {tid} of {count}: {error}") from error
            self._workers.append(worker)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.started_workers} workers"
        return f"<ThreadTeam {state}>"


def _work(worker_loop, control: np.ndarray, tid: int) -> None:
    # One ctypes call for the worker's whole life, so it never holds the GIL: it waits for
    # jobs, runs them and returns at shutdown. `control` is passed to keep it alive.
    worker_loop(data_pointer(control), tid)


def _shut_down(native, control: np.ndarray, workers: list[threading.Thread], lock: threading.Lock) -> None:
    with lock:  # lets a running job finish first
        address = data_pointer(control)
        if workers:
            native.shutdown(address, len(workers))
            for worker in workers:
                worker.join(_WORKER_JOIN_TIMEOUT_SECONDS)
            if any(worker.is_alive() for worker in workers):
                # Destroying a mutex a thread still uses is undefined behaviour: leak instead.
                warnings.warn("graphc worker threads did not stop; leaving them running", RuntimeWarning)
                return
        native.destroy(address)


_live_teams: weakref.WeakSet[ThreadTeam] = weakref.WeakSet()
_default_team: ThreadTeam | None = None
_default_team_lock = threading.Lock()
# The fork/join code of a loaded artifact, which the default team is then made with instead of
# compiling its own (the same IR: deployed.py checks its digest).
_default_team_code: TeamFunctions | None = None


def default_team() -> ThreadTeam:
    """The process-wide team compiled programs share, created on first use."""
    global _default_team
    team = _default_team
    if team is None:
        with _default_team_lock:
            if _default_team is None:
                _default_team = ThreadTeam(_default_team_code)
            team = _default_team
    return team


def needs_team_code() -> bool:
    """Whether the default team would have to compile its fork/join code (see `provide_team_code`)."""
    return _default_team is None and _default_team_code is None


def provide_team_code(native: TeamFunctions) -> None:
    """Let the default team use `native` (loaded from an artifact) if it has no code yet."""
    global _default_team_code
    with _default_team_lock:
        if _default_team_code is None:
            _default_team_code = native


def _abandon_teams_in_forked_child() -> None:
    # A forked child inherits the teams' memory but not their worker threads: running a
    # job would wait forever, and shutting down would join threads that do not exist.
    # Disown them, with their locks (held at the fork by a thread the child lacks, a lock
    # would block a run instead of reporting the team closed); the child gets a fresh
    # default team on first use.
    global _default_team, _default_team_lock
    for team in list(_live_teams):
        team._finalizer.detach()
        team._lock = threading.Lock()
        team._workers = []
    _default_team = None
    _default_team_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_teams_in_forked_child)
