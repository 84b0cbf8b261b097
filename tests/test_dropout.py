"""gc.dropout: torch's semantics, masks a function of (seed, call index, element index), the same
bit for bit in the reference executor and in native code."""
import numpy as np
import pytest

import graphc as gc

HERE = "test_dropout.py"


def net(p=0.5, batch=16, features=40):
    g = gc.Graph()
    x = g.input("x", (batch, features))
    y = g.input("y", (batch,), dtype="int32")
    h = gc.dropout(gc.relu(gc.linear(x, g.param("fc1.w", (32, features)), g.param("fc1.b", (32,)))), p)
    h = gc.dropout(h, p / 2)
    logits = gc.linear(h, g.param("fc2.w", (4, 32)), g.param("fc2.b", (4,)))
    return g, x, h, gc.softmax_cross_entropy(logits, y)


def feeds(seed=0, batch=16, features=40):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(batch, features)).astype(np.float32),
            "y": rng.integers(0, 4, batch).astype(np.int32)}


def test_zeroes_a_fraction_p_and_scales_the_rest():
    g = gc.Graph()
    x = g.input("x", (200, 500))
    y = gc.dropout(x, 0.3)
    ones = np.ones((200, 500), np.float32)
    out = gc.evaluate(y, {"x": ones}, {})
    kept = out != 0
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.7)}
    # 100,000 Bernoulli(0.7) draws: the kept fraction within 5 standard deviations
    assert abs(kept.mean() - 0.7) < 5 * np.sqrt(0.7 * 0.3 / kept.size)
    assert out.mean() == pytest.approx(1.0, abs=0.01)     # unbiased, as torch's


def test_the_first_compiled_call_uses_the_reference_masks_then_new_ones():
    g, x, h, loss = net()
    params = gc.init_params(g, seed=0)
    f = feeds()
    fn = gc.compile([h, loss], params, seed=7)
    first_h, first_loss = fn(**f)
    expected_h, expected_loss = gc.evaluate([h, loss], f, params, seed=7)
    np.testing.assert_array_equal(first_h == 0, expected_h == 0)
    np.testing.assert_allclose(first_h, expected_h, rtol=1e-5, atol=1e-6)
    assert first_loss == pytest.approx(float(expected_loss), rel=1e-5)
    second_h, _ = fn(**f)
    assert not np.array_equal(second_h == 0, first_h == 0)
    assert fn.calls == 2 and fn.seed == 7
    # another program with the same seed draws the same sequence
    again = gc.compile([h, loss], params, seed=7)
    np.testing.assert_array_equal(again(**f)[0], first_h)
    np.testing.assert_array_equal(again(**f)[0], second_h)
    other_seed = gc.compile([h, loss], params, seed=8)
    assert not np.array_equal(other_seed(**f)[0] == 0, first_h == 0)


def test_each_dropout_call_of_a_graph_draws_its_own_mask():
    g = gc.Graph()
    x = g.input("x", (64, 64))
    a, b = gc.dropout(x, 0.5), gc.dropout(x, 0.5)
    ones = {"x": np.ones((64, 64), np.float32)}
    va, vb = gc.evaluate([a, b], ones, {})
    assert not np.array_equal(va, vb)
    np.testing.assert_array_equal(gc.compile([a, b], {})(**ones)[1], vb)


def test_a_training_step_matches_the_reference_on_its_first_call_and_is_reproducible():
    g, x, h, loss = net()
    f = feeds(1)
    params = gc.init_params(g, seed=1)
    expected = float(gc.evaluate(loss, f, params, seed=3))
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1), seed=3)
    assert step(**f) == pytest.approx(expected, rel=1e-5)
    later = [step(**f) for _ in range(3)]
    replay = gc.init_params(g, seed=1)
    again = gc.compile_training_step(loss, replay, gc.SGD(lr=0.1), seed=3)
    assert [again(**f) for _ in range(4)][1:] == later
    for name in params:
        assert params[name].tobytes() == replay[name].tobytes()


def test_the_backward_pass_uses_the_forward_mask():
    g, x, h, loss = net()
    params = gc.init_params(g, seed=2)
    f = feeds(2)
    w1 = g.params["fc1.w"]
    dw1, dh = gc.grad(loss, [w1, h])
    native = gc.compile([dw1, h], params, seed=5)(**f)
    reference = gc.evaluate([dw1, h], f, params, seed=5)
    np.testing.assert_allclose(native[0], reference[0], rtol=1e-4, atol=1e-6)
    # the first layer's units dropped in this call get no gradient through them
    hidden = gc.evaluate(gc.relu(gc.linear(x, w1, g.params["fc1.b"])), f, params)
    assert np.all(native[0][(native[1] == 0).all(axis=0) & (hidden != 0).any(axis=0)] == 0)


def test_gradients_against_finite_differences():
    g = gc.Graph()
    x = g.param("x", (6, 5))
    w = g.param("w", (5, 5))
    loss = gc.sum(gc.tanh(gc.dropout(x @ w, 0.4)) * g.constant(np.arange(30.0).reshape(6, 5) / 30))
    rng = np.random.default_rng(3)
    report = gc.grad_check(loss, {"x": rng.normal(size=(6, 5)), "w": rng.normal(size=(5, 5))}, {})
    assert report.passed(1e-6), str(report)


def test_no_dropout_in_eval_mode_or_at_p_zero():
    g = gc.Graph()
    x = g.input("x", (3, 4))
    assert gc.dropout(x, 0.5, training=False) is x
    assert gc.dropout(x, 0.0) is x
    assert g.random_key is None


def test_bad_arguments_are_refused_naming_dropout_and_the_line():
    g = gc.Graph()
    x = g.input("x", (3, 4))
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError) as info:
            gc.dropout(x, p)
        assert "dropout" in str(info.value) and "[0, 1)" in str(info.value) and HERE in str(info.value)
    with pytest.raises(TypeError, match="dropout: training"):
        gc.dropout(x, 0.5, training="yes")
    with pytest.raises(ValueError, match="seed"):
        gc.compile(gc.dropout(x, 0.5), {}, seed=-1)
