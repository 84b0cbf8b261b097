"""How compiled programs hold the caller's params, and the names a caller may choose.

- One array (or overlapping views) bound to two params the program updates would make each
  update read the other's half-written values: refused when compiling, naming both.
- Replacing an array in the params dict after compiling rebinds the program to the new array
  at its next call (after the same checks as at compile time); `load_params` copies values into
  the bound arrays, checking every name, shape and dtype before it copies anything.
- Any name the graph accepts works as an input or param name, fed and bound end to end.
"""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc.tools import models
from graphc.tools.checkpoint import load_params as load_checkpoint
from graphc.tools.checkpoint import save_params as save_checkpoint


def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    assert float(np.abs(actual - expected).max(initial=0.0)) <= rtol * scale


def two_param_graph(input_name="x", w_name="w", b_name="b", shape=(3, 2)):
    """loss = sum(tanh(x @ w + b)); the same shapes for w and b (3, 2) so that one array fits both."""
    g = gc.Graph("bindings")
    x = g.input(input_name, (4, shape[0]))
    w = g.param(w_name, shape)
    b = g.param(b_name, shape)
    loss = gc.sum(gc.tanh(x @ w + gc.sum(b, axis=0)))
    return g, loss


def feeds_for(name="x"):
    return {name: np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)}


def sgd_reference(loss, params, feeds_list, lr=0.1, momentum=0.0):
    """The losses and final params of SGD (torch's rule) run on the reference executor."""
    graph = loss.graph
    names = [name for name in params if name in graph.params]
    params = {name: params[name].copy() for name in names}
    grads = gc.grad(loss, [graph.params[name] for name in names])
    buffers = {name: np.zeros_like(params[name]) for name in names}
    losses = []
    for feeds in feeds_list:
        loss_value, *grad_values = gc.evaluate([loss] + grads, feeds, params)
        losses.append(float(loss_value))
        for name, grad_value in zip(names, grad_values):
            buffers[name] = momentum * buffers[name] + grad_value if momentum else grad_value
            params[name] = (params[name] - lr * buffers[name]).astype(np.float32)
    return losses, params


# ---- one array bound to two params ----------------------------------------------------------

def test_one_array_bound_to_two_trained_params_is_refused_naming_both():
    g, loss = two_param_graph()
    shared = np.full((3, 2), 0.1, np.float32)
    with pytest.raises(ValueError, match=r"params 'w' and 'b'.*share memory"):
        gc.compile_training_step(loss, {"w": shared, "b": shared}, gc.SGD(lr=0.1))


def test_overlapping_views_bound_to_two_trained_params_are_refused():
    g, loss = two_param_graph()
    base = np.zeros(10, np.float32)
    w, b = base[:6].reshape(3, 2), base[4:].reshape(3, 2)    # elements 4 and 5 are in both
    with pytest.raises(ValueError, match=r"params 'w' and 'b'.*share memory"):
        gc.compile_training_step(loss, {"w": w, "b": b}, gc.SGD(lr=0.1))


def test_adjacent_views_of_one_buffer_train_like_separate_arrays():
    g, loss = two_param_graph()
    base = np.linspace(-0.5, 0.5, 12, dtype=np.float32)
    params = {"w": base[:6].reshape(3, 2), "b": base[6:].reshape(3, 2)}
    expected_losses, expected = sgd_reference(loss, params, [feeds_for()] * 3)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    assert_close([step(**feeds_for()) for _ in range(3)], expected_losses)
    for name in params:
        assert_close(params[name], expected[name])


def test_a_compiled_function_may_read_one_array_as_two_params():
    g, loss = two_param_graph()
    shared = np.full((3, 2), 0.1, np.float32)
    params = {"w": shared, "b": shared}
    fn = gc.compile([loss], params)
    assert_close(fn(**feeds_for())[0], gc.evaluate(loss, feeds_for(), params))


def test_a_param_the_step_does_not_use_may_share_a_trained_array():
    g, loss = two_param_graph()
    g.param("unused", (3, 2))
    params = {"w": np.full((3, 2), 0.1, np.float32), "b": np.zeros((3, 2), np.float32)}
    params["unused"] = params["w"]
    gc.compile_training_step(loss, params, gc.SGD(lr=0.1))(**feeds_for())


# ---- replacing arrays in the params dict ------------------------------------------------------

def fresh_params(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-0.5, 0.5, (3, 2)).astype(np.float32) for name in ("w", "b")}


def test_a_step_trains_the_arrays_put_into_its_params_dict_after_compiling():
    g, loss = two_param_graph()
    params = fresh_params(0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    step(**feeds_for())
    old = dict(params)
    old_values = {name: array.copy() for name, array in old.items()}
    params.update(fresh_params(1))                       # e.g. params.update(load_params(...))
    expected_losses, expected = sgd_reference(loss, params, [feeds_for()] * 2)
    assert_close([step(**feeds_for()) for _ in range(2)], expected_losses)
    for name in params:
        assert_close(params[name], expected[name])
        assert step.params[name] is params[name]
        np.testing.assert_array_equal(old[name], old_values[name])   # the old arrays are left alone


def test_a_compiled_function_reads_the_arrays_put_into_its_params_dict_after_compiling():
    g, loss = two_param_graph()
    params = fresh_params(0)
    fn = gc.compile(loss, params)
    fn(**feeds_for())
    params["b"] = np.full((3, 2), 2.0, np.float32)
    assert_close(fn(**feeds_for()), gc.evaluate(loss, feeds_for(), params))


@pytest.mark.parametrize("compile_kind", ["step", "function"])
def test_a_replaced_array_that_cannot_be_bound_is_reported_with_the_way_to_load_values(compile_kind):
    g, loss = two_param_graph()
    params = fresh_params(0)
    program = (gc.compile_training_step(loss, params, gc.SGD(lr=0.1)) if compile_kind == "step"
               else gc.compile(loss, params))
    params["w"] = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"param 'w'.*shape \(3, 2\).*got shape \(2, 3\).*load_params"):
        program(**feeds_for())
    params["w"] = np.zeros((3, 2), np.float32)            # fixed: the next call runs
    program(**feeds_for())
    del params["b"]
    with pytest.raises(ValueError, match=r"param 'b'.*no longer in the params.*load_params"):
        program(**feeds_for())


def test_a_replaced_array_that_shares_a_trained_params_memory_is_refused():
    g, loss = two_param_graph()
    params = fresh_params(0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    params["b"] = params["w"]
    with pytest.raises(ValueError, match=r"params 'w' and 'b'.*share memory"):
        step(**feeds_for())


# ---- load_params --------------------------------------------------------------------------------

def test_load_params_copies_into_the_bound_arrays_of_a_step_and_its_functions(tmp_path):
    g, loss = two_param_graph()
    params = fresh_params(0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    fn = gc.compile(loss, params)
    bound = dict(params)
    save_checkpoint(tmp_path / "ckpt.npz", fresh_params(1))
    step.load_params(load_checkpoint(tmp_path / "ckpt.npz", g))
    for name in params:
        assert params[name] is bound[name]
        np.testing.assert_array_equal(params[name], fresh_params(1)[name])
    assert_close(fn(**feeds_for()), gc.evaluate(loss, feeds_for(), fresh_params(1)))
    expected_losses, _ = sgd_reference(loss, fresh_params(1), [feeds_for()])
    assert_close(step(**feeds_for()), expected_losses[0])
    fn.load_params(fresh_params(2))
    np.testing.assert_array_equal(params["w"], fresh_params(2)["w"])


def unchanged_after(call, params):
    before = {name: array.copy() for name, array in params.items()}
    call()
    for name in params:
        np.testing.assert_array_equal(params[name], before[name])


def test_load_params_refuses_unknown_and_missing_names_before_copying_anything():
    g, loss = two_param_graph()
    params = fresh_params(0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    new = fresh_params(1)
    with pytest.raises(ValueError, match=r"unexpected.*'bias'.*strict=False"):
        unchanged_after(lambda: step.load_params({**new, "bias": new["b"]}), params)
    with pytest.raises(ValueError, match=r"missing.*'b'.*strict=False"):
        unchanged_after(lambda: step.load_params({"w": new["w"]}), params)
    step.load_params({"w": new["w"], "bias": new["b"]}, strict=False)
    np.testing.assert_array_equal(params["w"], new["w"])
    assert not np.array_equal(params["b"], new["b"])


def test_load_params_refuses_a_wrong_shape_or_kind_naming_the_param_before_copying_anything():
    g, loss = two_param_graph()
    params = fresh_params(0)
    fn = gc.compile(loss, params)
    new = fresh_params(1)
    with pytest.raises(ValueError, match=r"param 'b'.*shape \(3, 2\).*\(2, 3\)"):
        unchanged_after(lambda: fn.load_params({"w": new["w"], "b": new["b"].T.copy()}), params)
    with pytest.raises(ValueError, match=r"param 'b'.*float32.*int64"):
        unchanged_after(lambda: fn.load_params({"w": new["w"], "b": np.ones((3, 2), np.int64)}), params)
    with pytest.raises(ValueError, match=r"param 'w'.*got shape \(2,\)"):
        unchanged_after(lambda: fn.load_params({"w": [1.0, 2.0], "b": new["b"]}), params)
    with pytest.raises(ValueError, match=r"param 'w'.*not an array"):
        unchanged_after(lambda: fn.load_params({"w": [[1.0], [1.0, 2.0]], "b": new["b"]}), params)


def test_load_params_converts_float64_like_a_feed():
    g, loss = two_param_graph()
    params = fresh_params(0)
    fn = gc.compile(loss, params)
    new = {name: value.astype(np.float64) for name, value in fresh_params(1).items()}
    fn.load_params(new)
    np.testing.assert_array_equal(params["w"], fresh_params(1)["w"])


def test_load_params_may_swap_the_bound_arrays_values():
    g, loss = two_param_graph()
    params = fresh_params(0)
    w, b = params["w"].copy(), params["b"].copy()
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    step.load_params({"w": params["b"], "b": params["w"]})
    np.testing.assert_array_equal(params["w"], b)
    np.testing.assert_array_equal(params["b"], w)


def test_load_params_after_the_dict_was_replaced_copies_into_the_new_arrays():
    g, loss = two_param_graph()
    params = fresh_params(0)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    params.update(fresh_params(1))
    step.load_params(fresh_params(2))
    np.testing.assert_array_equal(params["w"], fresh_params(2)["w"])
    assert step.params["w"] is params["w"]


# ---- names --------------------------------------------------------------------------------------

NAMES = ["self", "momentum:w", "with space", "ünïcødé", "\uff58", "x.y", "lambda", "class", "_private",
         "_lock", "loss", "output0", "workspace", "status", "repeats", "feeds", "profile:ticks"]


@pytest.mark.parametrize("name", NAMES)
def test_any_input_name_is_fed_to_a_function_and_a_step(name):
    g, loss = two_param_graph(input_name=name)
    feeds = feeds_for(name)
    params = fresh_params(0)
    fn = gc.compile([loss, gc.grad(loss, g.params["w"])], params)
    for value, expected in zip(fn(**feeds), gc.evaluate([loss, gc.grad(loss, g.params["w"])], feeds, params)):
        assert_close(value, expected)
    assert_close(gc.compile(loss, params)(**feeds), gc.evaluate(loss, feeds, params))
    expected_losses, expected = sgd_reference(loss, params, [feeds] * 2, momentum=0.9)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1, momentum=0.9))
    assert_close([step(**feeds), step(**feeds)], expected_losses)
    for param in params:
        assert_close(params[param], expected[param])


@pytest.mark.parametrize("name", NAMES)
def test_any_param_name_is_bound_trained_and_loaded(name):
    g, loss = two_param_graph(w_name=name)
    params = {name: fresh_params(0)["w"], "b": fresh_params(0)["b"]}
    assert_close(gc.compile(loss, params)(**feeds_for()), gc.evaluate(loss, feeds_for(), params))
    expected_losses, expected = sgd_reference(loss, params, [feeds_for()] * 2, momentum=0.9)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1, momentum=0.9))
    assert_close([step(**feeds_for()), step(**feeds_for())], expected_losses)
    for param in params:
        assert_close(params[param], expected[param])
    step.load_params({name: np.zeros((3, 2), np.float32), "b": params["b"]})
    assert not params[name].any()


def test_a_param_named_like_another_params_momentum_buffer_trains_both():
    """SGD names the momentum buffer of param 'w' "momentum:w": the step keeps its state apart."""
    g, loss = two_param_graph(w_name="w", b_name="momentum:w")
    params = fresh_params(0)
    params = {"w": params["w"], "momentum:w": params["b"]}
    expected_losses, expected = sgd_reference(loss, params, [feeds_for()] * 3, momentum=0.9)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1, momentum=0.9))
    assert_close([step(**feeds_for()) for _ in range(3)], expected_losses)
    for param in params:
        assert_close(params[param], expected[param])
    assert set(step.state) == {"momentum:w", "momentum:momentum:w"}
    assert set(step.params) == {"w", "momentum:w"}


def test_inputs_named_self_and_repeats_can_be_profiled():
    g = gc.Graph("profiled")
    x = g.input("self", (4, 3))
    r = g.input("repeats", (4, 3))
    w = g.param("w", (3, 2))
    params = {"w": np.full((3, 2), 0.1, np.float32)}
    fn = gc.compile(gc.sum(gc.tanh(x @ w)), params)
    assert fn.profile(repeats=2, self=feeds_for()["x"]).kernels
    both = gc.compile(gc.sum(gc.tanh((x + r) @ w)), params)
    assert both.profile({"self": feeds_for()["x"], "repeats": feeds_for()["x"]}, repeats=2).kernels
    with pytest.raises(TypeError, match="repeats.*dict"):
        both.profile(self=feeds_for()["x"], repeats=feeds_for()["x"])


def test_params_from_a_mapping_that_hands_out_new_arrays_train(tmp_path):
    """np.load's NpzFile makes a new array at every lookup: the step binds them once and trains
    those, as before the caller's dict was watched for replaced arrays."""
    g = gc.Graph("npz")
    x, y = g.input("x", (8, 3)), g.input("y", (8,), dtype="int32")
    w = g.param("w", (2, 3))
    loss = gc.softmax_cross_entropy(gc.linear(x, w), y)
    path = tmp_path / "w.npz"
    np.savez(path, w=np.zeros((2, 3), np.float32))
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32),
             "y": np.array([0, 1] * 4, np.int32)}
    with np.load(path) as values:
        step = gc.compile_training_step(loss, values, gc.SGD(lr=0.5))
        losses = [step(**feeds) for _ in range(4)]
    assert losses[0] > losses[1] > losses[2] > losses[3]
    assert not np.array_equal(step.params["w"], np.zeros((2, 3), np.float32))
