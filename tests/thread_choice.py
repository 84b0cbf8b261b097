"""Tests that need a program on several threads whatever this host measures: the thread-count
decision (graphc/backend/thread_costs.py) is given costs under which splitting always pays."""
import pytest

import graphc_runtime as rt
from graphc.backend import compiler, thread_costs

SPLITTING_PAYS = thread_costs.ThreadCosts(flop_s=1e-11, fork_join_s={n: 1e-7 for n in range(2, 65)},
                                          barrier_s={n: 1e-8 for n in range(2, 65)},
                                          efficiency={n: 1.0 for n in range(2, 65)})


@pytest.fixture
def splitting_pays(monkeypatch, tmp_path):
    """Programs compiled in the test take every thread their work can use; they are compiled
    afresh (the disk cache may hold the same program with this host's choice)."""
    monkeypatch.setattr(thread_costs, "measured_thread_costs", lambda requested: SPLITTING_PAYS)
    monkeypatch.setattr(compiler, "_cache", rt.ObjectCache(tmp_path))
    yield
