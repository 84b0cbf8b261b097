"""Buffers and batch normalization: torch's semantics, in the reference executor and native code.

Training mode normalizes with the batch's statistics and updates the running statistics in
place at every evaluation; eval mode reads them. The backward pass is derived from primitives
and checked against finite differences in float64.
"""
import numpy as np
import pytest
from refusals import refused

import graphc as gc
from graphc.core.ops.norm import batch_norm


def bn_graph(shape, training=True, affine=True, momentum=0.1):
    g = gc.Graph()
    x = g.input("x", shape)
    c = shape[1]
    w = g.param("bn.weight", (c,), init=1.0) if affine else None
    b = g.param("bn.bias", (c,)) if affine else None
    rm, rv = g.buffer("bn.running_mean", (c,)), g.buffer("bn.running_var", (c,), init=1.0)
    y = batch_norm(x, w, b, rm, rv, training=training, momentum=momentum)
    return g, x, y


def random_params(g, rng):
    params = gc.init_params(g)
    for name in g.params:
        params[name] = rng.normal(size=params[name].shape).astype(np.float32)
    params["bn.running_mean"] = rng.normal(size=params["bn.running_mean"].shape).astype(np.float32)
    params["bn.running_var"] = rng.uniform(0.5, 2, size=params["bn.running_var"].shape).astype(np.float32)
    return params


# ---- buffers ------------------------------------------------------------------------------------


def test_buffers_and_init_values_are_in_init_params():
    g, _, _ = bn_graph((4, 3))
    w = g.param("w", (5, 3))
    params = gc.init_params(g, seed=0)
    assert set(params) == {"bn.weight", "bn.bias", "w", "bn.running_mean", "bn.running_var"}
    assert params["bn.weight"].tolist() == [1.0] * 3 and params["bn.running_var"].tolist() == [1.0] * 3
    assert params["bn.running_mean"].dtype == np.float32 and not params["bn.running_mean"].any()
    # constant-initialized params draw nothing: w is what it would be without them
    plain = gc.Graph()
    plain.param("w", (5, 3))
    np.testing.assert_array_equal(params["w"], gc.init_params(plain, seed=0)["w"])
    assert w.name not in g.buffers and set(g.buffers) == {"bn.running_mean", "bn.running_var"}


def test_buffers_are_marked_as_state_in_the_listing_and_the_drawing():
    g, _, y = bn_graph((4, 3))
    text = str(g)
    assert "buffer bn.running_mean" in text and "2 buffers (state)" in text
    assert 'fillcolor="#e0d0f0"' in g.to_dot([y])


def test_a_buffer_takes_no_gradient():
    g, x, y = bn_graph((4, 3))
    refused_grad = pytest.raises(ValueError, match="bn.running_mean.*buffer")
    with refused_grad:
        gc.grad(gc.sum(y), [g.buffers["bn.running_mean"]])


def test_buffer_names_share_the_graph_namespace():
    g = gc.Graph()
    g.param("a", (2,))
    refused(ValueError, lambda: g.buffer("a", (2,)), "already has", "'a'")
    refused(ValueError, lambda: g.buffer("b", (2,), init=float("nan")), "buffer 'b'", "finite")
    refused(ValueError, lambda: g.param("c", (2,), dtype="int32", init=1.0), "param 'c'", "float tensor")
    g.buffer("b", (2,), init=1.0)       # a refused declaration left the names free
    g.param("c", (2,), init=2.0)
    assert g.initial_values == {"b": 1.0, "c": 2.0}


# ---- batch norm against torch and float64 ------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5), (2, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_and_updates_running_statistics(shape, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    g, x, y = bn_graph(shape, training=training, momentum=0.3)
    params = random_params(g, rng)
    xv = rng.normal(2, 3, size=shape).astype(np.float32)
    t = {name: torch.tensor(value.copy()) for name, value in params.items()}
    expected = torch.nn.functional.batch_norm(torch.tensor(xv), t["bn.running_mean"], t["bn.running_var"],
                                              t["bn.weight"], t["bn.bias"], training=training, momentum=0.3)
    reference_params = {k: v.copy() for k, v in params.items()}
    np.testing.assert_allclose(gc.evaluate(y, {"x": xv}, reference_params), expected.numpy(), rtol=1e-4, atol=1e-5)
    fn = gc.compile(y, params)
    np.testing.assert_allclose(fn(x=xv), expected.numpy(), rtol=1e-4, atol=1e-5)
    for name in ("bn.running_mean", "bn.running_var"):
        np.testing.assert_allclose(params[name], t[name].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reference_params[name], t[name].numpy(), rtol=1e-5, atol=1e-6)


def test_every_call_updates_the_running_statistics_as_torch_does():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    g, x, y = bn_graph((6, 2, 3, 3))
    params = random_params(g, rng)
    t = {name: torch.tensor(value.copy()) for name, value in params.items()}
    fn = gc.compile(gc.sum(y * y), params)
    for _ in range(3):
        xv = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
        fn(x=xv)
        torch.nn.functional.batch_norm(torch.tensor(xv), t["bn.running_mean"], t["bn.running_var"],
                                       t["bn.weight"], t["bn.bias"], training=True)
    np.testing.assert_allclose(params["bn.running_var"], t["bn.running_var"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(params["bn.running_mean"], t["bn.running_mean"].numpy(), rtol=1e-5, atol=1e-6)


def test_large_mean_inputs_keep_float32_precision():
    """Mean 1e4, std 1: a one-pass E[x²] - E[x]² would lose every digit; the centred two-pass
    statistics are off by no more than the inputs' own float32 spacing allows."""
    rng = np.random.default_rng(3)
    shape = (32, 4, 8, 8)
    g, x, y = bn_graph(shape)
    params = gc.init_params(g)
    xv = rng.normal(1e4, 1, size=shape).astype(np.float32)
    exact = gc.evaluate(y, {"x": xv}, {k: v.copy() for k, v in params.items()}, dtype="float64")
    assert abs(exact.std() - 1) < 1e-3
    spacing = np.spacing(np.float32(1e4))   # 0.00098: the resolution of the inputs themselves
    fn = gc.compile(y, params)
    assert np.abs(fn(x=xv) - exact).max() < 4 * spacing
    assert np.abs(gc.evaluate(y, {"x": xv}, params) - exact).max() < 4 * spacing
    # two evaluations updated it, each by momentum 0.1 towards the unbiased batch variance
    unbiased = np.var(xv.astype(np.float64), axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(params["bn.running_var"], unbiased + 0.9 ** 2 * (1 - unbiased), rtol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradients_against_finite_differences(training):
    rng = np.random.default_rng(4)
    g = gc.Graph()
    x = g.param("x", (4, 3, 2, 2))      # a param, so that its gradient is checked too
    w, b = g.param("w", (3,)), g.param("b", (3,))
    rm, rv = g.buffer("rm", (3,)), g.buffer("rv", (3,), init=1.0)
    target = g.constant(rng.normal(size=(4, 3, 2, 2)))
    y = batch_norm(x, w, b, rm, rv, training=training)
    loss = gc.sum(gc.relu(y) * target + y * y)
    params = {"x": rng.normal(size=(4, 3, 2, 2)), "w": rng.normal(size=3), "b": rng.normal(size=3),
              "rm": rng.normal(size=3).astype(np.float32), "rv": rng.uniform(0.5, 2, 3).astype(np.float32)}
    report = gc.grad_check(loss, params, {})
    assert report.passed(1e-5), str(report)


def test_compiled_gradients_match_the_reference():
    rng = np.random.default_rng(5)
    g, x, y = bn_graph((8, 4, 3, 3))
    loss = gc.mean(gc.relu(y) * gc.relu(y))
    params = random_params(g, rng)
    xv = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    grads = gc.grad(loss, [x, g.params["bn.weight"], g.params["bn.bias"]])
    expected = gc.evaluate(grads, {"x": xv}, {k: v.copy() for k, v in params.items()}, dtype="float64")
    got = gc.compile(grads, params)(x=xv)
    for actual, exact in zip(got, expected):
        np.testing.assert_allclose(actual, exact, rtol=1e-4, atol=1e-6 * np.abs(exact).max())


def test_a_training_step_updates_buffers_not_through_the_optimizer():
    rng = np.random.default_rng(6)
    g, x, y = bn_graph((8, 3))
    loss = gc.mean(y * y * g.constant(rng.normal(size=(8, 3))))
    params = random_params(g, rng)
    before = {k: v.copy() for k, v in params.items()}
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1, momentum=0.9))
    xv = rng.normal(size=(8, 3)).astype(np.float32)
    step(x=xv)
    reference = {k: v.copy() for k, v in before.items()}
    gc.evaluate(loss, {"x": xv}, reference)
    for name in ("bn.running_mean", "bn.running_var"):
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-6)
    assert not any("running" in name for name in step.state)


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_batch_norm_input_is_refused_naming_the_op_and_line():
    g = gc.Graph()
    x4, x1 = g.input("x4", (2, 3, 4, 4)), g.input("x1", (5,))
    w, rm, rv = g.param("w", (3,)), g.buffer("rm", (3,)), g.buffer("rv", (3,))
    wrong = g.buffer("wrong", (4,))
    not_a_buffer = g.param("p", (3,))
    refused(gc.ShapeError, lambda: batch_norm(x1, None, None, None, None), "batch_norm", "axis 1")
    refused(gc.ShapeError, lambda: batch_norm(x4, w, None, wrong, rv), "batch_norm", "running_mean", "(3,)")
    refused(gc.ShapeError, lambda: batch_norm(x4, w, None, not_a_buffer, rv), "batch_norm", "must be a buffer")
    refused(gc.ShapeError, lambda: batch_norm(x4, w, None, rm, None), "batch_norm", "both")
    refused(gc.ShapeError, lambda: batch_norm(x4, w, None, None, None, training=False), "batch_norm", "eval mode")
    refused(gc.ShapeError, lambda: batch_norm(g.input("one", (1, 3)), None, None, None, None), "batch_norm",
            "more than one value")
    refused(gc.ShapeError, lambda: batch_norm(x4, w, None, rm, rv, eps=0.0), "batch_norm", "eps")
    refused(TypeError, lambda: batch_norm(x4, w, None, rm, rv, training=1), "batch_norm", "training")


def test_one_buffer_updated_twice_in_one_evaluation_is_refused():
    g = gc.Graph()
    x = g.input("x", (4, 2))
    rm, rv = g.buffer("rm", (2,)), g.buffer("rv", (2,), init=1.0)
    twice = batch_norm(x, None, None, rm, rv) + batch_norm(x * 2.0, None, None, rm, rv)
    params = gc.init_params(g)
    with pytest.raises(ValueError, match="'rm' would be updated twice"):
        gc.compile(twice, params)
    with pytest.raises(ValueError, match="'rm' would be updated twice"):
        gc.evaluate(twice, {"x": np.ones((4, 2), np.float32)}, params)
