"""gc.import_onnx: the contract's usage, what each kind of initializer becomes, the options
(shapes=, constants=, training=), ops composed from graphc's (grouped and dilated convolutions,
ceil-mode pools, LogSoftmax) against onnxruntime, and refusals: unsupported ops, symbolic
shapes, and damaged or hostile files, each a clear error naming the problem.
"""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import graphc as gc  # noqa: E402

F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=(), opset=17, name="m"):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor_info(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def lenet_like(batch=8):
    """conv 3x3 -> relu -> max pool -> flatten -> linear, as torch exports it."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")]
    initializers = [init("conv.weight", rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)),
                    init("conv.bias", np.zeros(4, np.float32)),
                    init("fc.weight", rng.normal(0, 0.1, (10, 64)).astype(np.float32)),
                    init("fc.bias", np.zeros(10, np.float32))]
    return make_model(nodes, [tensor_info("x", [batch, 1, 8, 8])], [tensor_info("logits", [batch, 10])],
                      initializers, name="lenet")


def run_onnxruntime(model, feeds):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ---- the contract's usage --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["path", "proto", "bytes"])
def test_the_contract_usage_trains_an_imported_model(tmp_path, source):
    model = lenet_like()
    path = tmp_path / "lenet.onnx"
    onnx.save(model, path)
    m = gc.import_onnx({"path": str(path), "proto": model, "bytes": model.SerializeToString()}[source])
    assert set(m.inputs) == {"x"} and m.inputs["x"].shape == (8, 1, 8, 8)
    assert [t.shape for t in m.outputs] == [(8, 10)] and m.output_names == ["logits"]
    assert set(m.params) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"} == set(m.graph.params)
    np.testing.assert_array_equal(m.params["fc.weight"], numpy_helper.to_array(model.graph.initializer[2]))
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 8).astype(np.int32)
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), run_onnxruntime(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)
    loss = gc.softmax_cross_entropy(m.outputs[0], m.graph.input("y", (8,), dtype="int32"))
    step = gc.compile_training_step(loss, m.params, gc.SGD(lr=0.1))
    losses = [step(x=x, y=y) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_integer_and_statistics_initializers_are_not_trained():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Identity", ["bn.mean"], ["mean"]),   # torch's eval export reads them through Identity
             helper.make_node("BatchNormalization", ["r", "bn.weight", "bn.bias", "mean", "bn.var"], ["y"])]
    initializers = [init("shape", np.array([2, 3, 2], np.int64)), init("bn.weight", np.ones(3, np.float32)),
                    init("bn.bias", np.zeros(3, np.float32)), init("bn.mean", np.full(3, 0.5, np.float32)),
                    init("bn.var", np.full(3, 4.0, np.float32)), init("unused", np.zeros(2, np.float32))]
    m = gc.import_onnx(make_model(nodes, [tensor_info("x", [2, 6])], [tensor_info("y", [2, 3, 2])], initializers))
    assert set(m.graph.params) == {"bn.weight", "bn.bias"} and set(m.graph.buffers) == {"bn.mean", "bn.var"}
    assert set(m.params) == {"bn.weight", "bn.bias", "bn.mean", "bn.var"}
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    want = (x.reshape(2, 3, 2) - 0.5) / np.sqrt(4.0 + 1e-5)
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), want, rtol=1e-6)


# ---- batch norm and dropout: inference or training --------------------------------------------------


def bn_model(training_mode=None, dropout=False):
    attrs = {"momentum": 0.8} | ({"training_mode": training_mode} if training_mode is not None else {})
    outputs = ["h", "rm_out", "rv_out"] if training_mode else ["h"]   # training form declares all three
    nodes = [helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"], outputs, **attrs)]
    nodes.append(helper.make_node("Dropout", ["h", "ratio"], ["y"]) if dropout else
                 helper.make_node("Identity", ["h"], ["y"]))
    initializers = [init("w", np.ones(3, np.float32)), init("b", np.zeros(3, np.float32)),
                    init("rm", np.zeros(3, np.float32)), init("rv", np.ones(3, np.float32)),
                    init("ratio", np.array(0.5, np.float32))]
    return make_model(nodes, [tensor_info("x", [16, 3])], [tensor_info("y", [16, 3])], initializers)


def test_inference_form_batch_norm_reads_the_running_statistics_and_updates_nothing():
    m = gc.import_onnx(bn_model())
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 3)).astype(np.float32)
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    assert not m.params["rm"].any() and (m.params["rv"] == 1).all()


@pytest.mark.parametrize("model_mode, option", [(1, None), (None, True)])
def test_training_form_batch_norm_updates_its_buffers_as_torch(model_mode, option):
    m = gc.import_onnx(bn_model(training_mode=model_mode), training=option)
    x = np.random.default_rng(0).normal(3.0, 2.0, (16, 3)).astype(np.float32)
    y = gc.evaluate(m.outputs[0], {"x": x}, m.params)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
    # ONNX's momentum 0.8 keeps 80% of the running value: torch's momentum 0.2
    np.testing.assert_allclose(m.params["rm"], 0.2 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m.params["rv"], 0.8 + 0.2 * x.var(0, ddof=1), rtol=1e-5)


def test_training_false_imports_a_training_mode_batch_norm_in_inference_form():
    m = gc.import_onnx(bn_model(training_mode=1), training=False)
    x = np.ones((16, 3), np.float32)
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_dropout_is_the_identity_unless_training():
    x = np.ones((16, 3), np.float32)
    inference = gc.import_onnx(bn_model(dropout=True))
    assert not any(n.op == "dropout_mask" for n in inference.graph.nodes)
    trained = gc.import_onnx(bn_model(dropout=True), training=True)
    y = gc.evaluate(trained.outputs[0], {"x": x}, trained.params, seed=3)
    assert any(n.op == "dropout_mask" for n in trained.graph.nodes)
    assert set(np.unique(np.round(y, 4))) <= {0.0, 2.0}   # batch statistics of ones: 0, so scaled zeros and 2·0


# ---- shapes and constants ----------------------------------------------------------------------------


def symbolic_model():
    nodes = [helper.make_node("Relu", ["input"], ["y"])]
    return make_model(nodes, [tensor_info("input", ["batch", 4])], [tensor_info("y", ["batch", 4])])


def test_a_symbolic_dimension_needs_a_shape():
    with pytest.raises(ValueError, match=r"input 'input' has shape \(batch, 4\).*shapes=\{'input'"):
        gc.import_onnx(symbolic_model())
    m = gc.import_onnx(symbolic_model(), shapes={"input": (64, 4)})
    assert m.inputs["input"].shape == (64, 4) and m.outputs[0].shape == (64, 4)


def test_shape_overrides_are_checked():
    with pytest.raises(ValueError, match=r"contradicts the model's shape \(batch, 4\)"):
        gc.import_onnx(symbolic_model(), shapes={"input": (64, 5)})
    with pytest.raises(ValueError, match=r"\['nope'\], which are not inputs"):
        gc.import_onnx(symbolic_model(), shapes={"input": (2, 4), "nope": (1,)})


def test_constants_fix_an_input_read_at_import_time():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [2, 6]), tensor_info("shape", [2], TensorProto.INT64)],
                       [tensor_info("y", [3, 4])])
    with pytest.raises(NotImplementedError, match="Reshape.*computed input 1 \\('shape'"):
        gc.import_onnx(model)
    m = gc.import_onnx(model, constants={"shape": np.array([3, 4])})
    assert set(m.inputs) == {"x"} and m.outputs[0].shape == (3, 4)


# ---- ops composed from graphc's, against onnxruntime ------------------------------------------------


def window_case(op, x_shape, w_shape=None, **attrs):
    inputs, initializers = ["x"], []
    rng = np.random.default_rng(2)
    if w_shape is not None:
        initializers = [init("w", rng.normal(size=w_shape).astype(np.float32)),
                        init("b", rng.normal(size=w_shape[0]).astype(np.float32))]
        inputs = ["x", "w", "b"]
    node = helper.make_node(op, inputs, ["y"], **attrs)
    model = make_model([node], [tensor_info("x", list(x_shape))], [helper.make_empty_tensor_value_info("y")],
                       initializers)
    model = onnx.shape_inference.infer_shapes(model)
    return model, rng.normal(size=x_shape).astype(np.float32)


@pytest.mark.parametrize("op, x_shape, w_shape, attrs", [
    ("Conv", (2, 4, 9, 9), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    ("Conv", (2, 4, 9, 9), (4, 1, 3, 3), dict(group=4, strides=[2, 2])),                 # depthwise
    ("Conv", (2, 3, 11, 10), (5, 3, 3, 2), dict(dilations=[2, 3], pads=[2, 1, 0, 3])),
    ("Conv", (2, 3, 12), (4, 3, 3), dict(strides=[2], auto_pad="SAME_UPPER")),            # 1-D
    ("MaxPool", (2, 3, 9, 9), None, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("MaxPool", (2, 3, 8, 8), None, dict(kernel_shape=[2, 2], pads=[1, 0, 1, 1])),
    ("AveragePool", (2, 3, 9, 9), None, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", (2, 3, 9, 9), None, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                             count_include_pad=1, ceil_mode=1)),
    ("AveragePool", (2, 3, 10, 7), None, dict(kernel_shape=[2, 3], auto_pad="SAME_LOWER")),
    ("LogSoftmax", (3, 4, 5), None, dict(axis=1)),
], ids=["grouped", "depthwise", "dilated", "conv1d", "maxpool-ceil", "maxpool-asym", "avgpool-exclude-pad",
        "avgpool-include-pad-ceil", "avgpool-same-lower", "logsoftmax"])
def test_composed_ops_match_onnxruntime(op, x_shape, w_shape, attrs):
    model, x = window_case(op, x_shape, w_shape, **attrs)
    want = run_onnxruntime(model, {"x": x})[0]
    m = gc.import_onnx(model)
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gc.compile(m.outputs, m.params)(x=x)[0], want, rtol=1e-4, atol=1e-5)


def test_a_dilated_grouped_conv_has_the_right_gradients():
    model, x = window_case("Conv", (2, 4, 7, 7), (4, 2, 3, 3), group=2, dilations=[2, 2], pads=[2, 2, 2, 2])
    m = gc.import_onnx(model)
    loss = gc.mean(m.outputs[0] * m.outputs[0])
    params = {k: v.astype(np.float32) for k, v in m.params.items()}
    report = gc.grad_check(loss, params, {"x": x})
    assert report.passed(), str(report)


# ---- refusals ---------------------------------------------------------------------------------------


def test_an_unsupported_op_names_the_op_and_the_node():
    model = make_model([helper.make_node("Relu", ["x"], ["h"], name="first"),
                        helper.make_node("Erf", ["h"], ["y"], name="the_erf")],
                       [tensor_info("x", [2, 3])], [tensor_info("y", [2, 3])])
    with pytest.raises(NotImplementedError, match=r"node 1 'the_erf' \(Erf -> 'y'\): ONNX op 'Erf' is not supported"):
        gc.import_onnx(model)


def test_an_unsupported_attribute_names_the_node():
    model, _ = window_case("MaxPool", (1, 1, 8, 8), None, kernel_shape=[2, 2], dilations=[2, 2])
    with pytest.raises(NotImplementedError, match=r"MaxPool -> 'y'\): MaxPool with dilations \(2, 2\)"):
        gc.import_onnx(model)


def test_an_opset_outside_the_range_is_refused():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", [2])], [tensor_info("y", [2])],
                       opset=11)
    with pytest.raises(NotImplementedError, match="opset 11; graphc imports opsets 13 to"):
        gc.import_onnx(model)


def damaged_files(tmp_path):
    good = lenet_like().SerializeToString()
    broken_graph = make_model([helper.make_node("Relu", ["nowhere"], ["y"])], [tensor_info("x", [2])],
                              [tensor_info("y", [2])])
    return {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "random bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text": b"this is not a model\n" * 20,
        "a tensor, not a model": init("t", np.zeros(3, np.float32)).SerializeToString(),
        "an undefined input": broken_graph.SerializeToString(),
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "random bytes", "text", "a tensor, not a model",
                                  "an undefined input"])
def test_a_damaged_file_is_a_value_error_naming_it(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '_')}.onnx"
    path.write_bytes(damaged_files(tmp_path)[kind])
    with pytest.raises(ValueError, match=f"ONNX file '{path}'"):
        gc.import_onnx(str(path))


def test_every_truncation_of_a_model_is_refused_cleanly(tmp_path):
    good = lenet_like().SerializeToString()
    for cut in range(0, len(good), max(len(good) // 60, 1)):
        with pytest.raises((ValueError, NotImplementedError)):
            gc.import_onnx(good[:cut])


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    model = lenet_like()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    path = tmp_path / "sub" / "evil.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match=r"refers to external data '\.\./\.\./\.\./\.\./etc/passwd', which is not"):
        gc.import_onnx(str(path))
    with pytest.raises(ValueError, match="stored in external files; give the model's path"):
        gc.import_onnx(model)


def test_external_data_beside_the_model_loads(tmp_path):
    model = lenet_like()
    path = tmp_path / "big.onnx"
    onnx.save(model, path, save_as_external_data=True, location="big.data", size_threshold=0)
    m = gc.import_onnx(str(path))
    np.testing.assert_array_equal(m.params["fc.weight"], numpy_helper.to_array(lenet_like().graph.initializer[2]))


def test_a_missing_file_and_a_wrong_type():
    with pytest.raises(FileNotFoundError, match="no_such.onnx"):
        gc.import_onnx("/nonexistent/no_such.onnx")
    with pytest.raises(TypeError, match="expected a path, bytes or an onnx.ModelProto, got int"):
        gc.import_onnx(3)


def test_a_shape_mismatch_inside_the_model_names_the_node():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [tensor_info("x", [2, 3])], [tensor_info("y", [2, 4])],
                       [init("w", np.zeros((5, 4), np.float32))])
    with pytest.raises(ValueError, match="mm"):
        gc.import_onnx(model)


@pytest.mark.parametrize("op, attrs", [("MaxPool", dict(kernel_shape=[2, 2], strides=[0, 1])),
                                       ("AveragePool", dict(kernel_shape=[0, 2])),
                                       ("Conv", dict(group=0))])
def test_impossible_attribute_values_are_value_errors_naming_the_node(op, attrs):
    # onnx's checker refuses some (strides of 0), graphc the rest (group=0): never a crash
    node = helper.make_node(op, ["x"] + (["w"] if op == "Conv" else []), ["y"], name="bad", **attrs)
    initializers = [init("w", np.zeros((2, 2, 3, 3), np.float32))] if op == "Conv" else []
    model = make_model([node], [tensor_info("x", [1, 2, 6, 6])], [tensor_info("y", ["n", "c", "h", "w"])],
                       initializers)
    with pytest.raises(ValueError, match=rf"^ONNX model 'm': .*\bbad\b.*{op}|^ONNX model 'm': .*{op}.*\bbad\b"):
        gc.import_onnx(model)
