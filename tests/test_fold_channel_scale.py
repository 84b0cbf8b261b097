"""Eval-mode batch norm folded into the conv or linear layer before it (transforms/fold_channel_scale.py)."""
import numpy as np
import pytest

import graphc as gc


def bn_params(g, channels, rng, params):
    names = [f"bn.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    w, b = g.param(names[0], (channels,)), g.param(names[1], (channels,))
    rm, rv = g.buffer(names[2], (channels,)), g.buffer(names[3], (channels,))
    params.update({names[0]: rng.normal(size=channels), names[1]: rng.normal(size=channels),
                   names[2]: rng.normal(size=channels), names[3]: rng.uniform(0.5, 2, channels)})
    return w, b, rm, rv


def check(out, feeds, params, expected_label):
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    fn = gc.compile(out, params)
    labels = [step.label for step in fn.steps]
    assert expected_label in labels, labels
    got, exact = fn(**feeds), gc.evaluate(out, feeds, params, dtype="float64")
    for actual, expected in zip(got, exact) if isinstance(out, list) else [(got, exact)]:
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    return fn


@pytest.mark.parametrize("relu", [True, False])
def test_eval_batch_norm_after_a_conv_becomes_its_bias_epilogue(relu):
    rng = np.random.default_rng(0)
    g, params = gc.Graph(), {}
    x = g.input("x", (2, 3, 9, 9))
    w = g.param("conv.weight", (5, 3, 3, 3))
    params["conv.weight"] = rng.normal(size=(5, 3, 3, 3))
    y = gc.batch_norm(gc.conv2d(x, w, padding=1, stride=2), *bn_params(g, 5, rng, params), training=False)
    y = gc.relu(y) if relu else y
    check(y, {"x": rng.normal(size=(2, 3, 9, 9)).astype(np.float32)}, params,
          "conv2d+bias+relu" if relu else "conv2d+bias")


def test_eval_batch_norm_after_linear_layers_scales_their_weights():
    rng = np.random.default_rng(1)
    g, params = gc.Graph(), {}
    x = g.input("x", (6, 10))
    w = g.param("fc.w", (7, 10))
    params["fc.w"] = rng.normal(size=(7, 10))
    y = gc.relu(gc.batch_norm(gc.linear(x, w), *bn_params(g, 7, rng, params), training=False))
    check(y, {"x": rng.normal(size=(6, 10)).astype(np.float32)}, params, "gemm+bias+relu")
    # a weight stored (in, out): the product's B operand is not a transpose
    g2, params2 = gc.Graph(), {}
    x2 = g2.input("x", (6, 10))
    params2["w"] = rng.normal(size=(10, 7))
    y2 = gc.batch_norm(x2 @ g2.param("w", (10, 7)), *bn_params(g2, 7, rng, params2), training=False)
    check(y2, {"x": rng.normal(size=(6, 10)).astype(np.float32)}, params2, "gemm+bias")


def test_training_mode_is_not_folded():
    """Its scale depends on the conv's own output: nothing to fold."""
    g = gc.Graph()
    x = g.input("x", (4, 2, 5, 5))
    conv = gc.conv2d(x, g.param("w", (3, 2, 3, 3)))
    y = gc.batch_norm(conv, None, None, g.buffer("rm", (3,)), g.buffer("rv", (3,), init=1.0))
    result = gc.optimize(y)
    assert not any(record.name == "fold_channel_scale" and record.changes != "no change" for record in result.log)


def test_a_conv_read_elsewhere_is_left_alone():
    rng = np.random.default_rng(2)
    g, params = gc.Graph(), {}
    x = g.input("x", (1, 2, 6, 6))
    params["w"] = rng.normal(size=(4, 2, 3, 3))
    conv = gc.conv2d(x, g.param("w", (4, 2, 3, 3)))
    y = gc.batch_norm(conv, *bn_params(g, 4, rng, params), training=False)
    fn = check([y, conv], {"x": rng.normal(size=(1, 2, 6, 6)).astype(np.float32)}, params, "conv2d")
    assert "conv2d+bias" not in [step.label for step in fn.steps]
