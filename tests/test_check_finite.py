"""check_finite: a program that scans every kernel's results and raises FloatingPointError at the
first NaN or infinity, naming the node, its kernel and line, and undoing the call's updates."""
import inspect
import os
import re

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.backend import compiler
from graphc.backend.emit import entry
from graphc.tools import models

HERE = os.path.basename(__file__)


def line_before() -> str:
    """`file:line` of the caller's previous line (where the node it checks was built)."""
    return f"{HERE}:{inspect.currentframe().f_back.f_lineno - 1}"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, splitting_pays):
    """Programs compiled for, and run on, 1 or 2 threads (2: whatever this host measures)."""
    previous = gc.get_num_threads()
    gc.set_num_threads(request.param)
    yield request.param
    gc.set_num_threads(previous)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(compiler, "_cache", rt.ObjectCache(tmp_path))


def snapshot(step) -> dict:
    """Every value a refused call must leave as it was: params, buffers, optimizer state, counts."""
    return {name: np.array(value) for name, value in step.state_dict().items()}


def assert_unchanged(step, before: dict) -> None:
    after = snapshot(step)
    assert after.keys() == before.keys()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


# ---- forward: log(0) --------------------------------------------------------------------------

@pytest.mark.parametrize("where", [0, 45000, -1])
def test_log_of_zero_names_the_log_node_its_line_kernel_and_operand_range(threads, where):
    g = gc.Graph("logs")
    x = g.input("x", (301, 299))    # an odd size: each thread's share ends in a partial vector
    y = gc.log(x)
    site = line_before()
    fn = gc.compile(y, {}, check_finite=True)
    assert fn.check_finite and fn.num_threads == threads
    values = np.linspace(0.5, 3.0, x.size, dtype=np.float32).reshape(x.shape)
    np.testing.assert_array_equal(fn(x=values), gc.compile(y, {})(x=values))   # finite: as without checks
    values.reshape(-1)[where] = 0.0
    with pytest.raises(FloatingPointError) as caught:
        fn(x=values)
    message = str(caught.value)
    assert f"1 -inf (of {x.size} values) in %{fn.outputs[0].id} ew f32[301,299] made at {site}" in message
    assert "log(x0)" in message and "kernel k0 ew" in message
    assert f"%0 input x f32[301,299]: min 0, max {values.max():.6g}; no NaN or inf" in message
    assert np.isfinite(fn(x=values + 1.0)).all()   # the next call runs


def test_a_nan_fed_in_is_reported_at_the_first_kernel_reading_it_with_the_operands_nan_count():
    g = gc.Graph("nan_in")
    x = g.input("x", (4, 5))
    y = gc.relu(x * 2.0) + 1.0
    fn = gc.compile(y, {}, check_finite=True)
    values = np.ones((4, 5), np.float32)
    values[2, 3] = np.nan
    with pytest.raises(FloatingPointError, match=r"1 NaN \(of 20 values\)") as caught:
        fn(x=values)
    assert "%0 input x f32[4,5]: min 1, max 1; 1 NaN (of 20 values)" in str(caught.value)


def test_an_overflowing_gemm_names_the_fused_kernels_node_and_the_nodes_it_covers():
    g = gc.Graph("overflow")
    x = g.input("x", (8, 16))
    h = gc.relu(gc.linear(x, g.param("w", (4, 16)), g.param("b", (4,))))
    out = gc.sum(h)
    params = {"w": np.full((4, 16), 1e30, np.float32), "b": np.zeros(4, np.float32)}
    fn = gc.compile(out, params, check_finite=True)
    gemm = next(step for step in fn.steps if step.label.startswith("gemm"))
    assert len(gemm.covers) > 1
    with pytest.raises(FloatingPointError) as caught:
        fn(x=np.full((8, 16), 1e10, np.float32))
    message = str(caught.value)
    assert f"+inf (of 32 values) in %{gemm.node.id} {gemm.node.op}" in message
    assert f"kernel k{fn.steps.index(gemm)} {gemm.label}" in message
    assert f"{gemm.label} also computes (fused): " in message and "matmul" in message
    assert "param w f32[4,16]: min 1e+30, max 1e+30; no NaN or inf" in message


# ---- backward only: sqrt at 0 -----------------------------------------------------------------

def sqrt_model():
    """loss = mean(sqrt(w + x)): where x = -w the forward value is sqrt(0) = 0, finite, and the
    backward 1 / (2 sqrt(0)) infinite."""
    g = gc.Graph("sqrt_at_zero")
    x = g.input("x", (256, 128))
    w = g.param("w", (128,), init=1.0)
    root = gc.sqrt(w + x)
    site = line_before()
    loss = gc.mean(root)
    return g, x, loss, site


@pytest.mark.parametrize("optimizer", [gc.SGD(lr=0.1, momentum=0.9), gc.Adam(lr=0.01)], ids=["sgd", "adam"])
def test_a_backward_only_infinity_names_the_backward_node_its_forward_sqrt_and_derivative(threads, optimizer):
    g, x, loss, site = sqrt_model()
    params = gc.init_params(g, seed=0)
    step = gc.compile_training_step(loss, params, optimizer, check_finite=True)
    assert step.num_threads == threads
    feeds = np.random.default_rng(0).uniform(0.0, 1.0, x.shape).astype(np.float32)
    for _ in range(2):
        assert np.isfinite(step(x=feeds))
    before = snapshot(step)
    assert step.optimizer_steps == 2 and step.calls == 2
    bad = feeds.copy()
    bad[11, 5] = -params["w"][5]            # sqrt(w + x) = sqrt(0)
    with pytest.raises(FloatingPointError) as caught:
        step(x=bad)
    message = str(caught.value)
    assert "a backward node; its forward node: " in message
    forward_line = next(line for line in message.splitlines() if "its forward node" in line)
    assert "sqrt(" in forward_line and f"at {site}" in forward_line
    derivative = next(line for line in message.splitlines() if line.startswith("  derivative: "))
    assert "sympy: ∂/∂x0 sqrt(" in derivative and "/(2*sqrt(" in derivative
    assert f"1 +inf (of {x.size} values)" in message.splitlines()[0]    # the one element at sqrt(0)
    assert "nothing was updated: params and buffers 'w'" in message
    assert_unchanged(step, before)
    assert step.optimizer_steps == 2 and step.calls == 2
    # the next good call continues as if the refused one never happened: as a step without
    # checks resumed from the values before it
    twin = {"w": before["w"].copy()}
    unchecked = gc.compile_training_step(loss, twin, optimizer)
    unchecked.load_state_dict(before)
    assert step(x=feeds) == unchecked(x=feeds)
    assert_unchanged(step, snapshot(unchecked))
    assert step.optimizer_steps == 3


def test_an_infinity_found_in_a_late_part_of_the_entry_stops_the_whole_call(threads, monkeypatch, fresh_cache):
    """The entry calls the kernels in parts (emit/entry.py); with one call per part, the
    backward's infinity is found in a part far from the first, and the call still stops there
    and is undone."""
    monkeypatch.setattr(entry, "CALLS_PER_PART", 1)
    g, x, loss, site = sqrt_model()
    params = gc.init_params(g, seed=0)
    step = gc.compile_training_step(loss, params, gc.Adam(lr=0.01), check_finite=True)
    parts = re.findall(r'^define (?:internal |external )?i1 @"graphc\.entry\.part\d+"', step.llvm_ir, re.MULTILINE)
    assert len(parts) == len(step.steps) > 3
    feeds = np.random.default_rng(0).uniform(0.0, 1.0, x.shape).astype(np.float32)
    for _ in range(2):
        assert np.isfinite(step(x=feeds))
    before = snapshot(step)
    bad = feeds.copy()
    bad[3, 7] = -params["w"][7]             # sqrt(w + x) = sqrt(0)
    with pytest.raises(FloatingPointError) as caught:
        step(x=bad)
    assert "a backward node; its forward node: " in str(caught.value) and f"at {site}" in str(caught.value)
    assert_unchanged(step, before)
    assert np.isfinite(step(x=feeds)) and step.optimizer_steps == 3


def test_a_step_found_in_the_cache_reports_as_one_compiled_afresh(fresh_cache):
    g, x, loss, site = sqrt_model()
    w = g.params["w"]
    bad = np.full(x.shape, 0.5, np.float32)
    bad[0, 0] = -1.0
    messages = []
    for _ in range(2):      # the second compile loads the step; its plan is made when it fails
        params = gc.init_params(g, seed=0)
        step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1), check_finite=True)
        with pytest.raises(FloatingPointError) as caught:
            step(x=bad)
        messages.append(str(caught.value))
        np.testing.assert_array_equal(params["w"], np.ones(w.shape, np.float32))
    assert compiler.object_cache().stats.hits >= 1
    assert messages[0] == messages[1] and f"at {site}" in messages[1]


# ---- a diverging run ------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", [gc.SGD(lr=1e3), gc.SGD(lr=1e3, momentum=0.9)], ids=["sgd", "momentum"])
def test_the_step_that_makes_the_first_nan_raises_and_leaves_the_last_good_values(threads, optimizer):
    model = models.mlp(64, sizes=(64, 128, 10))
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, optimizer, check_finite=True)
    assert step.num_threads == threads
    feeds = models.random_batch(model, np.random.default_rng(0))
    good_steps = 0
    with pytest.raises(FloatingPointError) as caught:
        for _ in range(200):
            last_good = snapshot(step)
            step(**feeds)
            good_steps += 1
    assert good_steps >= 2, "diverges only after some good steps"
    assert_unchanged(step, last_good)
    assert step.calls == good_steps
    assert "check_finite: the first NaN or infinity of this call" in str(caught.value)


# ---- without checks: the program of old ----------------------------------------------------------

def test_without_check_finite_the_program_is_the_default_one_bit_for_bit():
    model = models.mlp(16, sizes=(20, 32, 10))
    params = gc.init_params(model.graph, seed=0)
    default = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1))
    off = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1), check_finite=False)
    on = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1), check_finite=True)
    assert not default.check_finite and not off.check_finite and on.check_finite
    assert off.llvm_ir == default.llvm_ir
    assert "graphc.finite.scan" not in default.llvm_ir and "graphc.finite.scan" in on.llvm_ir
    assert [type(slot) for slot in off._program.slots] == [type(slot) for slot in default._program.slots]
    log = gc.log(model.x)
    fn = gc.compile(log, params, check_finite=False)
    assert fn.llvm_ir == gc.compile(log, params).llvm_ir and "graphc.finite" not in fn.llvm_ir
    assert np.isneginf(fn(x=np.zeros(model.x.shape, np.float32))).all()


def test_the_environment_variable_turns_the_default_on_but_not_an_explicit_false(monkeypatch):
    g = gc.Graph("env")
    x = g.input("x", (3,))
    y = gc.log(x)
    zeros = np.zeros(3, np.float32)
    monkeypatch.setenv("GRAPHC_CHECK_FINITE", "1")
    fn = gc.compile(y, {})
    assert fn.check_finite
    with pytest.raises(FloatingPointError, match="log"):
        fn(x=zeros)
    assert not gc.compile(y, {}, check_finite=False).check_finite
    monkeypatch.setenv("GRAPHC_CHECK_FINITE", "0")
    assert np.isneginf(gc.compile(y, {})(x=zeros)).all()
    monkeypatch.setenv("GRAPHC_CHECK_FINITE", "maybe")
    with pytest.warns(RuntimeWarning, match="GRAPHC_CHECK_FINITE"):
        assert not gc.compile(y, {}).check_finite
    with pytest.raises(TypeError, match="check_finite must be True, False or None"):
        gc.compile(y, {}, check_finite="yes")


# ---- with checks, on finite data: the same results bit for bit ------------------------------------

def run_both(build, feeds_of, steps: int = 3):
    """Each of (unchecked, checked), compiled by `build(params, check_finite)` on its own copy of
    the params, run `steps` times: the results and the params, buffers and state after."""
    results = []
    for check in (False, True):
        fn, params = build(check)
        assert fn.check_finite == check
        outputs = [fn(**feeds_of(i)) for i in range(steps)]
        state = snapshot(fn) if isinstance(fn, gc.CompiledTrainingStep) else {}
        results.append((outputs, {**{k: v.copy() for k, v in params.items()}, **state}))
    return results


def assert_bitwise_equal(results) -> None:
    (outputs_off, state_off), (outputs_on, state_on) = results
    for off, on in zip(outputs_off, outputs_on):
        for a, b in zip(off if isinstance(off, list) else [off], on if isinstance(on, list) else [on]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert state_off.keys() == state_on.keys()
    for name in state_off:
        np.testing.assert_array_equal(state_off[name], state_on[name], err_msg=name)


def test_a_checked_function_gives_the_same_results_bit_for_bit(threads):
    model = models.digits_cnn(16, training=True)   # batch norm updates its buffers at every call
    feeds = models.random_batch(model, np.random.default_rng(1))

    def build(check):
        params = gc.init_params(model.graph, seed=0)
        fn = gc.compile([model.logits, model.loss], params, seed=3, check_finite=check)
        assert fn.num_threads == threads
        return fn, params

    assert_bitwise_equal(run_both(build, lambda i: feeds))


@pytest.mark.parametrize("workload", ["mlp-sgd", "mlp-adam", "digits-bn-adamw"])
def test_a_checked_training_step_gives_the_same_results_bit_for_bit(threads, workload):
    model = models.digits_cnn(16) if workload.startswith("digits") else models.mlp_dropout(16, sizes=(20, 32, 10))
    optimizer = {"mlp-sgd": gc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4), "mlp-adam": gc.Adam(lr=1e-2),
                 "digits-bn-adamw": gc.AdamW(lr=1e-2)}[workload]
    rng = np.random.default_rng(2)
    batches = [models.random_batch(model, rng) for _ in range(3)]

    def build(check):
        params = gc.init_params(model.graph, seed=0)
        step = gc.compile_training_step(model.loss, params, optimizer, seed=5, check_finite=check)
        assert step.num_threads == threads
        return step, params

    assert_bitwise_equal(run_both(build, lambda i: batches[i]))


def test_labels_out_of_range_are_still_refused_before_any_kernel_with_checks_on():
    model = models.mlp(8, sizes=(6, 5, 4))
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1), check_finite=True)
    feeds = models.random_batch(model, np.random.default_rng(0))
    feeds["y"][3] = 4
    before = snapshot(step)
    with pytest.raises(ValueError, match=r"input 'y': values must lie in the valid range \[0, 4\)"):
        step(**feeds)
    assert_unchanged(step, before)


def test_the_runtime_alone_raises_floating_point_error_giving_the_status():
    """A program run by graphc_runtime without the compiler's on_stop (a deployed one) still
    refuses the call, with what the runtime knows: the entry's status."""
    g = gc.Graph("bare")
    x = g.input("x", (5,))
    fn = gc.compile(gc.log(x), {}, check_finite=True)
    bare = rt.Program(fn._program.library, "graphc_entry", fn._program.slots, {})
    np.testing.assert_array_equal(bare(x=np.ones(5, np.float32))[0], np.zeros(5, np.float32))
    with pytest.raises(FloatingPointError, match=r"stopped at its own check \(status -1\)"):
        bare(x=np.zeros(5, np.float32))
