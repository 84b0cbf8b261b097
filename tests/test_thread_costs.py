"""The thread count of a program: the decision from injected costs, and the measured costs'
per-machine cache (graphc/backend/thread_costs.py)."""
import dataclasses

import pytest

import graphc_runtime as rt
from graphc.backend import thread_costs
from graphc.backend.thread_costs import MIN_SPEEDUP, ThreadCosts, choose_thread_count

# A host where a thread does 100 GFLOP/s, fork/join costs 5 µs and a barrier 0.5 µs.
TYPICAL = ThreadCosts(flop_s=1e-11, fork_join_s={2: 5e-6, 3: 7e-6, 4: 9e-6},
                      barrier_s={2: 5e-7, 3: 7e-7, 4: 9e-7}, efficiency={2: 0.9, 3: 0.85, 4: 0.8})


def test_a_tiny_program_stays_on_one_thread():
    assert choose_thread_count(flops=20_000, kernels=8, requested=4, costs=TYPICAL) == 1


def test_a_large_program_takes_the_fastest_predicted_count():
    assert choose_thread_count(flops=10**9, kernels=30, requested=4, costs=TYPICAL) == 4
    assert choose_thread_count(flops=10**9, kernels=30, requested=2, costs=TYPICAL) == 2


def test_one_thread_requested_is_one_thread():
    assert choose_thread_count(flops=10**12, kernels=1, requested=1, costs=TYPICAL) == 1


def test_many_kernels_make_the_barriers_outweigh_the_split():
    """The same work in 10x more kernels: 2 barriers each at 0.5 µs outweigh what two threads
    save on 30 µs of work."""
    flops = 3_000_000   # 30 µs alone
    assert choose_thread_count(flops, kernels=2, requested=2, costs=TYPICAL) == 2
    assert choose_thread_count(flops, kernels=20, requested=2, costs=TYPICAL) == 1


def test_costly_fork_join_or_poor_scaling_keeps_one_thread():
    flops = 10_000_000   # 100 µs alone
    assert choose_thread_count(flops, 5, 2, TYPICAL) == 2
    slow_wake = dataclasses.replace(TYPICAL, fork_join_s={2: 80e-6})
    assert choose_thread_count(flops, 5, 2, slow_wake) == 1
    no_scaling = dataclasses.replace(TYPICAL, efficiency={2: 0.55})
    assert choose_thread_count(flops, 5, 2, no_scaling) == 1


def test_more_threads_only_for_a_clear_predicted_gain():
    """At the threshold the predicted gain is exactly MIN_SPEEDUP: below it one thread."""
    costs = ThreadCosts(flop_s=1e-9, fork_join_s={2: 1e-6}, barrier_s={2: 1e-12}, efficiency={2: 1.0})
    # alone = f * 1e-9; two = f * 1e-9 / 2 + 1e-6; alone = MIN_SPEEDUP * two at f below
    f = round(MIN_SPEEDUP * 1e-6 / (1e-9 * (1 - MIN_SPEEDUP / 2)))
    assert choose_thread_count(int(f * 1.02), 0, 2, costs) == 2
    assert choose_thread_count(int(f * 0.98), 0, 2, costs) == 1


def test_a_count_the_costs_do_not_cover_is_not_chosen():
    only_two = ThreadCosts(flop_s=1e-11, fork_join_s={2: 5e-6}, barrier_s={2: 5e-7}, efficiency={2: 0.9})
    assert choose_thread_count(10**10, 10, 8, only_two) == 2


def test_costs_round_trip_and_damaged_text_is_refused():
    assert ThreadCosts.from_json(TYPICAL.to_json()) == TYPICAL
    uneven = dataclasses.replace(TYPICAL, barrier_s={2: 5e-7}).to_json()   # no barrier cost for 3, 4
    for damaged in ['{"version": 0}', "not json", TYPICAL.to_json().replace("1e-11", "-1"), uneven]:
        with pytest.raises(ValueError):
            ThreadCosts.from_json(damaged)


@pytest.fixture
def fresh_costs(tmp_path, monkeypatch):
    """Costs measured into an empty cache directory, by a stand-in measurement."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    measured = []
    monkeypatch.setattr(thread_costs, "_measure", lambda n: measured.append(n) or TYPICAL)
    thread_costs._measured.cache_clear()
    yield measured, tmp_path
    thread_costs._measured.cache_clear()


def test_costs_are_measured_once_per_machine_and_cached(fresh_costs):
    measured, _ = fresh_costs
    assert thread_costs.measured_thread_costs(2) == TYPICAL
    thread_costs._measured.cache_clear()   # a new process: the disk cache answers
    assert thread_costs.measured_thread_costs(2) == TYPICAL
    assert measured == [2]


def test_a_damaged_cache_entry_is_measured_again(fresh_costs):
    measured, directory = fresh_costs
    thread_costs.measured_thread_costs(2)
    rt.ObjectCache(directory).put(thread_costs._cache_key(2), b'{"version": 1, "flop_s": "x"}')
    thread_costs._measured.cache_clear()
    assert thread_costs.measured_thread_costs(2) == TYPICAL
    assert measured == [2, 2]


@pytest.mark.skipif(rt.usable_cpu_count() < 2, reason="one usable CPU")
def test_this_hosts_measured_costs_are_sane(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    thread_costs._measured.cache_clear()
    previous = rt.get_num_threads()
    rt.set_num_threads(1)
    try:
        costs = thread_costs.measured_thread_costs(2)
        assert rt.get_num_threads() == 1      # measured on 2 threads without changing the setting
    finally:
        rt.set_num_threads(previous)
        thread_costs._measured.cache_clear()
    assert 1e-13 < costs.flop_s < 1e-8             # 0.1 to 10,000 GFLOP/s a thread
    assert 0 < costs.fork_join_s[2] < 0.01
    assert 0 < costs.barrier_s[2] < 0.01
    assert 0.05 <= costs.efficiency[2] <= 1.0
