"""gc.export_onnx: every op of the contract with an ONNX counterpart, checked by
onnx.checker.check_model(full_check=True) (inside export_onnx) and run in onnxruntime within
1e-5 of graphc's reference executor; layers written as their ONNX ops; round trips through
gc.import_onnx; and refusals of what has no ONNX counterpart.
"""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import graphc as gc  # noqa: E402
from graphc.core.ops.shape import slice_  # noqa: E402
from graphc.tools import models  # noqa: E402


def randomized(params, seed=0):
    """Params with values away from init's zeros and ones, so every term shows in the outputs."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, value in params.items():
        low = 0.5 if "var" in name else -1.0   # variances stay positive
        out[name] = (value + rng.uniform(low, 1.0, value.shape)).astype(value.dtype)
    return out


def run_both(outputs, params, feeds, path):
    model = gc.export_onnx(outputs, params, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    theirs = session.run(None, feeds)
    ours = gc.evaluate(outputs, feeds, params)
    for a, b in zip(theirs, ours):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    return model


def op_types(model):
    return [n.op_type for n in model.graph.node]


def contract_cases():
    """(name, builder) pairs; a builder returns (outputs, graph) for inputs x (4, 3, 8, 8), v (4, 6), y (4,)."""
    def conv_net(g, x, v, y):
        h = gc.conv2d(x, g.param("c1.w", (5, 3, 3, 3)), g.param("c1.b", (5,)), stride=2, padding=1)
        h2 = gc.conv2d(x, g.param("c2.w", (5, 3, 3, 3)), padding="same")
        h3 = gc.conv2d(x, g.param("c3.w", (2, 3, 2, 3)), stride=(1, 2), padding=((1, 0), (2, 1)))
        pools = [gc.max_pool2d(h2, 3, 2, 1), gc.avg_pool2d(h2, 2), gc.avg_pool2d(h2, 3, 1, 1), h3]
        return [h] + pools + [gc.global_avg_pool2d(h)]

    def elementwise(g, x, v, y):
        a = v * 0.5 - 1.0
        return [gc.relu(a), gc.sigmoid(a), gc.tanh(a), gc.exp(a), gc.log(gc.exp(a) + 1.0), gc.sqrt(gc.exp(a)),
                a ** 3, a ** -2, -a, a / (v * v + 1.0), gc.leaky_relu(a, 0.2), gc.softplus(a), 2.0 - a,
                gc.sigmoid(a) * gc.tanh(a) / (1.5 + gc.exp(-a))]

    def linear_algebra(g, x, v, y):
        w, b = g.param("fc.w", (7, 6)), g.param("fc.b", (7,))
        logits = gc.linear(v, w, b)
        return [logits, gc.matmul(v, g.param("m", (6, 3))), v @ gc.transpose(g.param("n", (2, 6))),
                gc.softmax(logits), gc.softmax(logits, axis=0)]

    def shapes_and_reductions(g, x, v, y):
        return [gc.reshape(x, (4, -1, 8)), gc.flatten(x), gc.transpose(x, (0, 2, 3, 1)), gc.concat([v, v * 2.0], 1),
                gc.pad(v, ((1, 0), (2, 3)), 1.5), slice_(x, (1, 0, 2, 3), (3, 2, 8, 5)), gc.sum(x),
                gc.sum(x, (1, 3), keepdims=True), gc.mean(v, 0), gc.broadcast_to(gc.reshape(v, (4, 1, 6)), (4, 3, 6))]

    def losses(g, x, v, y):
        logits = gc.linear(v, g.param("fc.w", (5, 6)))
        targets = gc.sigmoid(v)
        return [gc.softmax_cross_entropy(logits, y), gc.sigmoid_binary_cross_entropy(v, targets), gc.mse(v, targets)]

    def norms(g, x, v, y):
        bn = [g.param("bn.w", (3,), init=1.0), g.param("bn.b", (3,)), g.buffer("bn.rm", (3,)),
              g.buffer("bn.rv", (3,), init=1.0)]
        eval_form = gc.batch_norm(x, *bn, training=False, eps=1e-3)
        bare = gc.batch_norm(x, None, None, *bn[2:], training=False)
        return [gc.dropout(eval_form, 0.5, training=False), bare]

    return [conv_net, elementwise, linear_algebra, shapes_and_reductions, losses, norms]


@pytest.mark.parametrize("build", contract_cases(), ids=lambda f: f.__name__)
def test_contract_ops_run_in_onnxruntime_as_in_graphc(build, tmp_path):
    g = gc.Graph(build.__name__)
    x, v, y = g.input("x", (4, 3, 8, 8)), g.input("v", (4, 6)), g.input("y", (4,), dtype="int32")
    outputs = build(g, x, v, y)
    params = randomized(gc.init_params(g, seed=0))
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32), "v": rng.normal(size=(4, 6)).astype(np.float32),
             "y": rng.integers(0, 5, 4).astype(np.int32)}
    used = {t.name for t in g.ancestors(outputs) if t.op == "input"}
    model = run_both(outputs, params, {k: f for k, f in feeds.items() if k in used}, tmp_path / "m.onnx")
    assert model.opset_import[0].version >= 17


def test_layers_are_written_as_their_onnx_ops(tmp_path):
    m = models.resnet8(4, training=False, image=(3, 16, 16))
    params = randomized(gc.init_params(m.graph, seed=0))
    x = np.random.default_rng(2).normal(size=(4, 3, 16, 16)).astype(np.float32)
    model = run_both([m.logits], params, {"x": x}, tmp_path / "resnet8.onnx")
    types = op_types(model)
    assert types.count("Conv") == 9 and types.count("BatchNormalization") == 9 and types.count("Gemm") == 1
    assert types.count("Add") == 3 and "ReduceMean" in types   # the residuals; global average pooling
    assert not {"Mul", "Reshape", "Transpose"} & set(types)     # no primitive of a recognized layer is left
    assert {i.name for i in model.graph.initializer} == set(params)   # names kept, buffers included
    assert model.graph.output[0].name == "output_0" and model.graph.input[0].name == "x"


def test_a_round_trip_through_import_keeps_values_and_names(tmp_path):
    m = models.lenet5(8)
    params = randomized(gc.init_params(m.graph, seed=0))
    path = tmp_path / "lenet.onnx"
    gc.export_onnx([m.logits], params, path)
    back = gc.import_onnx(path)
    assert set(back.params) == set(params)
    x = np.random.default_rng(3).normal(size=m.x.shape).astype(np.float32)
    np.testing.assert_allclose(gc.evaluate(back.outputs, {"x": x}, back.params)[0],
                               gc.evaluate(m.logits, {"x": x}, params), rtol=1e-5, atol=1e-6)


def test_a_training_mode_batch_norm_is_written_as_primitives(tmp_path):
    m = models.digits_cnn(8, training=True, p=0.0)
    params = randomized(gc.init_params(m.graph, seed=0))
    x = np.random.default_rng(4).normal(size=m.x.shape).astype(np.float32)
    model = run_both([m.logits], {k: v.copy() for k, v in params.items()}, {"x": x}, tmp_path / "train.onnx")
    # batch statistics: mean and variance as ReduceMean, the normalization elementwise
    assert "BatchNormalization" not in op_types(model) and op_types(model).count("ReduceMean") == 4


def test_what_has_no_onnx_counterpart_is_refused():
    g = gc.Graph()
    x = g.input("x", (4, 6))
    w = g.param("w", (3, 6))
    params = gc.init_params(g)
    with pytest.raises(NotImplementedError, match="dropout in training mode"):
        gc.export_onnx(gc.dropout(x, 0.5), params)
    image = g.input("image", (1, 2, 5, 5))
    (d_image,) = gc.grad(gc.sum(gc.conv2d(image, g.param("k", (3, 2, 3, 3)))), [image])
    with pytest.raises(NotImplementedError, match="conv2d_input_grad .* has no ONNX counterpart; export the forward"):
        gc.export_onnx(d_image, gc.init_params(g))
    with pytest.raises(ValueError, match="no value for param 'w'"):
        gc.export_onnx(gc.linear(x, w), {})
    with pytest.raises(TypeError, match="outputs must be a graphc Tensor"):
        gc.export_onnx([], params)


def test_outputs_that_are_sources_or_repeated_get_their_own_names(tmp_path):
    g = gc.Graph()
    x = g.input("x", (2, 3))
    h = gc.relu(x)
    model = run_both([x, h, h], {}, {"x": np.arange(6, dtype=np.float32).reshape(2, 3) - 2}, tmp_path / "m.onnx")
    assert [o.name for o in model.graph.output] == ["output_0", "output_1", "output_2"]
