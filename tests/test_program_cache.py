"""The disk cache of compiled programs: misses compile, hits skip code generation, damaged
entries are rebuilt and never loaded."""
import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.backend import compiler
from graphc.tools import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    fresh = rt.ObjectCache(tmp_path)
    monkeypatch.setattr(compiler, "_cache", fresh)
    return fresh


def compile_mlp(batch=4):
    model = models.mlp(batch, sizes=(12, 8, 3))
    params = gc.init_params(model.graph, seed=0)
    return model, params, gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1, momentum=0.9))


def test_miss_then_hit_without_optimizing_or_generating_ir(cache):
    _, _, first = compile_mlp()
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)
    _, _, step = compile_mlp()
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert "optimized" not in vars(step._plan)   # no pass ran for the hit
    assert "_spec" not in vars(step)             # no LLVM IR was generated
    # ... until someone asks: then the plan made is the one the cached program came from
    assert step.llvm_ir == first.llvm_ir
    assert str(step.graph) == str(first.graph) and step.describe() == first.describe()


def test_a_cached_training_step_builds_no_gradient_graph_and_keeps_its_state(cache, monkeypatch):
    """Found by its forward graph, optimizer and params: the gradient graph is built only when
    someone asks to see it. State names, the learning rate and dropout's counter work as after
    a cold compile."""
    from graphc.core import autodiff

    def build():
        g = gc.Graph()
        x, y = g.input("x", (8, 5)), g.input("y", (8,), dtype="int32")
        h = gc.batch_norm(gc.linear(x, g.param("w", (6, 5))), g.param("bn.w", (6,), init=1.0), g.param("bn.b", (6,)),
                          g.buffer("bn.rm", (6,)), g.buffer("bn.rv", (6,), init=1.0))
        loss = gc.softmax_cross_entropy(gc.linear(gc.dropout(gc.relu(h), 0.3), g.param("v", (3, 6))), y)
        params = gc.init_params(g, seed=0)
        return loss, params, gc.compile_training_step(loss, params, gc.Adam(lr=0.01), seed=4)

    feeds = {"x": np.linspace(-1, 1, 40, dtype=np.float32).reshape(8, 5), "y": np.arange(8, dtype=np.int32) % 3}
    _, cold_params, cold = build()
    calls = []
    monkeypatch.setattr(autodiff, "grad", lambda *a, **k: calls.append(1) or pytest.fail("grad was called"))
    _, warm_params, warm = build()
    assert (cache.stats.hits, cache.stats.misses) == (1, 1) and not calls
    assert set(warm.state) == set(cold.state) == {"exp_avg:w", "exp_avg_sq:w", "exp_avg:v", "exp_avg_sq:v",
                                                  "exp_avg:bn.w", "exp_avg_sq:bn.w", "exp_avg:bn.b", "exp_avg_sq:bn.b"}
    for step in (cold, warm):
        step.lr = 0.02
        for _ in range(3):
            step(**feeds)
    for name in cold_params:
        assert warm_params[name].tobytes() == cold_params[name].tobytes(), name
    monkeypatch.undo()
    assert warm.describe() == cold.describe()


def test_thread_count_is_part_of_the_key(cache, monkeypatch):
    from thread_choice import SPLITTING_PAYS

    from graphc.backend import thread_costs
    monkeypatch.setattr(thread_costs, "measured_thread_costs", lambda requested: SPLITTING_PAYS)
    previous = gc.get_num_threads()
    try:
        gc.set_num_threads(1)
        model = models.lenet5(8)
        one = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
        gc.set_num_threads(2)
        two = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    finally:
        gc.set_num_threads(previous)
    assert (cache.stats.hits, cache.stats.misses) == (0, 2)
    assert (one._program.max_threads, two._program.max_threads) == (1, 2)


def test_cached_program_computes_the_same_steps(cache):
    model, params_a, step_a = compile_mlp()
    _, params_b, step_b = compile_mlp()       # loaded from the cache
    feeds = models.random_batch(model, np.random.default_rng(0))
    for _ in range(3):
        assert step_a(**feeds) == step_b(**feeds)
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name])


def test_different_graphs_get_different_entries(cache):
    compile_mlp(batch=4)
    compile_mlp(batch=5)
    assert cache.stats.misses == 2 and cache.stats.hits == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_entry_is_rebuilt_not_loaded(cache, tmp_path, damage):
    compile_mlp()
    (entry,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    blob = bytearray(entry.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    entry.write_bytes(bytes(blob))
    model, params, step = compile_mlp()
    assert cache.stats.corrupt == 1 and cache.stats.hits == 0
    feeds = models.random_batch(model, np.random.default_rng(1))
    reference = gc.evaluate(model.loss, feeds, params)
    assert abs(step(**feeds) - float(reference)) < 1e-4 * max(1.0, abs(float(reference)))


def test_constants_one_float_apart_get_different_entries(cache):
    """Keys hash a constant's bytes: a printed array rounds to a few digits."""
    results = []
    for scale in (np.float32(0.001), np.nextafter(np.float32(0.001), np.float32(1))):
        g = gc.Graph("scaled")
        x = g.input("x", (2,))
        y = gc.sum(x * g.constant(np.array([scale, scale], np.float32)))
        results.append(gc.compile(y, {})(x=np.full(2, 500.0, np.float32)))
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert results[0] != results[1]


def test_expressions_one_float_apart_get_different_entries(cache):
    """Keys print an elementwise expression in full precision (srepr, cached per expression)."""
    results = []
    for scale in (np.float32(0.001), np.nextafter(np.float32(0.001), np.float32(1))):
        g = gc.Graph("scaled")
        x = g.input("x", (2,))
        results.append(gc.compile(gc.sum(x * float(scale)), {})(x=np.full(2, 500.0, np.float32)))
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert results[0] != results[1]
