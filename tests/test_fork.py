"""A process forked while another thread runs a compiled program can call that program.

The forking thread is not the one stepping: at the fork the stepping thread may hold the
program's lock (or the thread team's), and the child, which has only the forking thread,
inherits the lock held by a thread it does not have. Every child here calls the program once
and exits; the parent waits a bounded time and kills what hangs, so that a regression fails
the test instead of hanging the suite.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.tools import models

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILDREN = 10
CHILD_DEADLINE_SECONDS = 10.0


@pytest.fixture
def two_threads(splitting_pays):
    before = rt.get_num_threads()
    rt.set_num_threads(2)
    yield
    rt.set_num_threads(before)


@contextlib.contextmanager
def held_by_another_thread(lock):
    """`lock` held by a thread of the test for the block's duration, as a running call holds it."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    held.wait(30)
    try:
        yield
    finally:
        release.set()
        holder.join(30)


def logistic_step():
    """A W5-like step: small enough that the stepping thread holds the lock most of the time."""
    model = models.logistic_regression(64, 64)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.01))
    return step, models.random_batch(model, np.random.default_rng(0))


def threaded_step():
    """A step with enough work for the thread team (2 MFLOP): the child needs a team of its own."""
    model = models.softmax_regression(64)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.01))
    assert step.num_threads == 2
    return step, models.random_batch(model, np.random.default_rng(0))


def predict_function():
    """A compiled function (Program.__call__, not the scalar call)."""
    model = models.logistic_regression(64, 64)
    predict = gc.compile([model.logits], gc.init_params(model.graph, seed=0))
    return predict, {"x": models.random_batch(model, np.random.default_rng(0))["x"]}


def call_succeeds(call, feeds) -> bool:
    result = call(**feeds)
    values = result if isinstance(result, list) else [result]
    return all(np.isfinite(value).all() for value in values)


def fork_and_call(call, feeds) -> int:
    """A child that calls `call` once and exits 0 if it returned finite values; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if call_succeeds(call, feeds) else 1
        finally:
            os._exit(code)
    return pid


def wait_for_children(pids: list[int]) -> dict[int, str]:
    """Each child's outcome ("ok", "exit N", "hung"), killing those still running at the deadline."""
    outcomes = {}
    deadline = time.monotonic() + CHILD_DEADLINE_SECONDS
    while len(outcomes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in outcomes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    outcomes[pid] = "ok" if code == 0 else f"exit {code}"
        time.sleep(0.01)
    for pid in pids:
        if pid not in outcomes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            outcomes[pid] = "hung"
    return outcomes


def fork_while_calling_in_background(call, feeds) -> list[str]:
    """Fork CHILDREN times while a background thread calls `call` in a loop."""
    stop = threading.Event()
    calls = []

    def loop():
        while not stop.is_set():
            call(**feeds)
            calls.append(1)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    pids = []
    try:
        while not calls:            # the loop is running
            time.sleep(0.001)
        for _ in range(CHILDREN):
            pids.append(fork_and_call(call, feeds))
            time.sleep(0.002)
    finally:
        stop.set()
        worker.join(30)
        outcomes = wait_for_children(pids)
    return [outcomes[pid] for pid in pids]


@pytest.mark.parametrize("make", [logistic_step, predict_function])
def test_a_child_forked_while_a_thread_calls_the_program_can_call_it(make):
    call, feeds = make()
    assert fork_while_calling_in_background(call, feeds) == ["ok"] * CHILDREN


def test_a_child_forked_while_a_thread_runs_a_threaded_step_can_call_it(two_threads):
    call, feeds = threaded_step()
    assert fork_while_calling_in_background(call, feeds) == ["ok"] * CHILDREN


def test_a_child_forked_while_a_thread_calls_the_step_by_dict_can_call_it():
    step, feeds = logistic_step()
    call_by_dict = step._program.call_scalar     # the dict call, not the keyword one
    assert fork_while_calling_in_background(lambda **feeds: call_by_dict(feeds), feeds) == ["ok"] * CHILDREN


def _call_in_child(step, feeds):
    os._exit(0 if math.isfinite(step(**feeds)) else 1)


def test_multiprocessing_fork_children_can_call_a_step_a_thread_is_running():
    step, feeds = logistic_step()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            step(**feeds)

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    context = multiprocessing.get_context("fork")
    processes = []
    try:
        time.sleep(0.01)
        for _ in range(4):
            process = context.Process(target=_call_in_child, args=(step, feeds))
            process.start()
            processes.append(process)
    finally:
        stop.set()
        worker.join(30)
        deadline = time.monotonic() + CHILD_DEADLINE_SECONDS
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join()
    assert [process.exitcode for process in processes] == [0] * len(processes)


def test_a_team_whose_lock_a_thread_held_at_the_fork_reports_itself_closed_in_the_child():
    """The child inherits the team without its workers: running a job must fail at once, not wait
    for a lock the parent's thread held at the fork (deterministic: the lock is held on purpose)."""
    team = rt.ThreadTeam()
    with held_by_another_thread(team._lock):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                team.run(0, 0, 2)          # refused before any entry is called
            except RuntimeError as error:
                code = 0 if "closed" in str(error) else 1
            finally:
                os._exit(code)
    assert wait_for_children([pid]) == {pid: "ok"}
    team.close()


def test_a_child_forked_during_a_call_that_outlasts_the_wait_runs_the_program_on_one_thread(
        two_threads, monkeypatch):
    """A fork waits for running calls to finish; one that does not (held here on purpose) is
    left running, and the child's copy of its program runs on one thread, whose barrier never
    reads the counters the fork may have caught mid-phase."""
    from graphc_runtime import program as program_module
    monkeypatch.setattr(program_module._live_programs, "WAIT_SECONDS", 0.05)
    step, feeds = threaded_step()
    with held_by_another_thread(step._program._lock):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if math.isfinite(step(**feeds)) and step.num_threads == 1 else 1
            finally:
                os._exit(code)
    assert wait_for_children([pid]) == {pid: "ok"}
    assert step.num_threads == 2            # the parent's program is as it was
