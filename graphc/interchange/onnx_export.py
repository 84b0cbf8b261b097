"""`gc.export_onnx`: the graph computing some outputs, written as an ONNX model (opset 17).

Params and buffers become initializers under their own names, inputs the model's inputs. Each
node maps to its ONNX counterpart; where graphc built a layer from primitives, the layer's
ONNX op is recognized and written instead (`onnx_export_patterns.py`: Gemm, Conv with its bias,
BatchNormalization in eval form, ReduceMean), so the file reads as the model the user wrote.
The model passes `onnx.checker.check_model(full_check=True)` before it is written.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from graphc.core.ir import Tensor
from graphc.interchange.onnx_export_ew import ExprExporter
from graphc.interchange.onnx_export_patterns import recognize
from graphc.interchange.onnx_load import require_onnx

OPSET = 17
IR_VERSION = 8   # the IR of opset 17: runtimes from 2022 on read it

# graphc ops that only a training step or a gradient computes: no inference counterpart
_TRAINING_ONLY = {"dropout_mask": "dropout in training mode (export the graph built with training=False)",
                  "one_hot": "a gradient's one-hot labels"}


def export_onnx(outputs, params, path=None, name: str | None = None):
    """Write the graph computing `outputs` (a Tensor or a list of them) as an ONNX model.

    `params` holds the values of every param and buffer the outputs read (as for `gc.compile`).
    Returns the onnx.ModelProto; writes it to `path` too when one is given. Open the file at
    netron.app or in the Netron desktop app to see it drawn.
    """
    onnx = require_onnx()
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    if not outputs or not all(isinstance(t, Tensor) for t in outputs):
        raise TypeError("export_onnx: outputs must be a graphc Tensor or a non-empty list of them")
    graph = outputs[0].graph
    if any(t.graph is not graph for t in outputs):
        raise ValueError("export_onnx: all outputs must belong to one graph")
    writer = _GraphWriter(onnx, graph, outputs, dict(params or {}))
    model = writer.model(name or graph.name)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise RuntimeError(f"export_onnx: the model written for graph {graph.name!r} fails onnx's checker "
                           f"(a graphc bug): {err}") from err
    if path is not None:
        _write_atomically(model.SerializeToString(), os.fspath(path))
    return model


def _write_atomically(data: bytes, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".graphc-onnx-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


class OnnxWriter:
    """Collects ONNX nodes, initializers and constants under unique value names."""

    def __init__(self, onnx, reserved: set[str]):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.initializers = [], []
        self.used = set(reserved)
        self._scalars: dict[tuple[float, str], str] = {}
        self._counts: dict[str, int] = {}

    def fresh(self, stem: str) -> str:
        count = self._counts.get(stem, 0)
        while True:
            name = f"{stem}_{count}"
            count += 1
            if name not in self.used:
                self._counts[stem] = count
                self.used.add(name)
                return name

    def elem_type(self, dtype: str) -> int:
        return self.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def node(self, op_type: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        """Add a node; returns the name of its (first) output."""
        outputs = outputs or [self.fresh(op_type.lower())]
        self.used.update(outputs)
        self.nodes.append(self.helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type), **attrs))
        return outputs[0]

    def constant(self, array, stem: str = "const") -> str:
        """A Constant node holding `array` (not an initializer: importing the model back must not
        make it a trainable param)."""
        from onnx import numpy_helper
        name = self.fresh(stem)
        return self.node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))

    def ints(self, values) -> str:
        return self.constant(np.asarray(values, dtype=np.int64).reshape(-1), "ints")

    def scalar(self, value: float, dtype: str) -> str:
        key = (value, dtype)
        if key not in self._scalars:
            self._scalars[key] = self.constant(np.asarray(value, dtype=dtype), "scalar")
        return self._scalars[key]

    def initializer(self, name: str, array: np.ndarray) -> None:
        from onnx import numpy_helper
        self.initializers.append(numpy_helper.from_array(array, name))


class _GraphWriter:
    """Plans (patterns first), then writes, the nodes the outputs need."""

    def __init__(self, onnx, graph, outputs, params):
        self.onnx, self.graph, self.outputs, self.params = onnx, graph, outputs, params
        self.needed_nodes = graph.ancestors(outputs)
        self.out = OnnxWriter(onnx, {n.name for n in self.needed_nodes if n.op in ("input", "param") and n.name})
        self.names: dict[int, str] = {}

    def model(self, name: str):
        helper = self.onnx.helper
        consumers = _consumers(self.needed_nodes)
        plans = {node.id: recognize(node, consumers) for node in self.needed_nodes}
        live = _live_nodes(self.needed_nodes, self.outputs, plans)
        output_names = self._name_outputs()
        inputs = []
        for node in self.needed_nodes:
            if node.id not in live:
                continue
            plan = plans[node.id]
            if node.op == "input":
                self.names[node.id] = node.name
                inputs.append(helper.make_tensor_value_info(node.name, self.out.elem_type(node.dtype), node.shape))
            elif node.op == "param":
                self._write_param(node)
            else:
                self._write(node, plan)
        graph_outputs = []
        for i, (tensor, out_name) in enumerate(zip(self.outputs, output_names)):
            if self.names[tensor.id] != out_name:   # a source, or an output listed twice
                self.out.node("Identity", [self.names[tensor.id]], [out_name])
            graph_outputs.append(helper.make_tensor_value_info(out_name, self.out.elem_type(tensor.dtype),
                                                               tensor.shape))
        onnx_graph = helper.make_graph(self.out.nodes, name, inputs, graph_outputs, self.out.initializers)
        from graphc import __version__
        model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="graphc", producer_version=__version__)
        model.ir_version = IR_VERSION
        return model

    def _name_outputs(self) -> list[str]:
        """Output names: the tensor's own name, else output_i; a node writes straight into it."""
        names = []
        for i, tensor in enumerate(self.outputs):
            wanted = tensor.name if tensor.name and tensor.op not in ("input", "param") else f"output_{i}"
            name = wanted if wanted not in self.out.used else self.out.fresh(wanted)
            self.out.used.add(name)
            names.append(name)
            if tensor.op not in ("input", "param") and tensor.id not in self.names:
                self.names[tensor.id] = name
        return names

    def _write_param(self, node: Tensor) -> None:
        if node is self.graph.random_key:
            raise NotImplementedError("export_onnx: dropout in training mode has no ONNX counterpart; export the "
                                      "graph built with training=False")
        kind = "buffer" if node.name in self.graph.buffers else "param"
        if node.name not in self.params:
            raise ValueError(f"export_onnx: no value for {kind} {node.name!r} (shape {node.shape}) in params")
        array = np.asarray(self.params[node.name])
        if array.shape != node.shape:
            raise ValueError(f"export_onnx: {kind} {node.name!r} must have shape {node.shape}, got {array.shape}")
        self.out.initializer(node.name, np.ascontiguousarray(array, dtype=node.dtype))
        self.names[node.id] = node.name

    def _write(self, node: Tensor, plan) -> None:
        result = self.names.get(node.id) or self.out.fresh(f"{node.op}{node.id}")
        self.names[node.id] = result
        if plan is not None:
            plan.write(self.out, [self.names[t.id] for t in plan.operands], result)
            return
        writer = _WRITERS.get(node.op)
        if writer is None:
            why = _TRAINING_ONLY.get(node.op) or (f"the backward op {node.op}" if node.is_backward or
                                                   node.op.endswith("_grad") else f"op {node.op}")
            raise NotImplementedError(f"export_onnx: {why} (%{node.id}, at {node.site}) has no ONNX counterpart; "
                                      f"export the forward outputs")
        writer(self.out, node, [self.names[t.id] for t in node.inputs], result)


def _consumers(nodes) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in nodes:
        for operand in node.inputs:
            counts[operand.id] = counts.get(operand.id, 0) + 1
    return counts


def _live_nodes(nodes, outputs, plans) -> set[int]:
    """Nodes the written model needs: a recognized pattern reads its own operands, not the
    primitives in between."""
    live = {t.id for t in outputs}
    for node in reversed(nodes):
        if node.id in live:
            plan = plans[node.id]
            live.update(t.id for t in (plan.operands if plan is not None else node.inputs))
    return live


# ---- one writer per graphc op: (writer, node, operand names, result name) ----------------------------


def _ew(out, node, names, result):
    ExprExporter(out, names, node.dtype).export(node.attrs["expr"], result)


def _constant(out, node, names, result):
    from onnx import numpy_helper
    out.node("Constant", [], [result], value=numpy_helper.from_array(np.asarray(node.attrs["value"].array), result))


def _fill(out, node, names, result):
    from onnx import numpy_helper
    value = numpy_helper.from_array(np.asarray([node.attrs["value"]], dtype=node.dtype), "value")
    out.node("ConstantOfShape", [out.ints(node.shape)], [result], value=value)


def _window_attrs(kernel, stride, padding) -> dict:
    (top, bottom), (left, right) = padding
    return dict(kernel_shape=list(kernel), strides=list(stride), pads=[top, left, bottom, right])


def _conv(out, node, names, result):
    out.node("Conv", names, [result], **_window_attrs(node.inputs[1].shape[2:], node.attrs["stride"],
                                                        node.attrs["padding"]))


def _avg_pool(out, node, names, result):
    # graphc's padded cells count as zeros, divisor kernel area: count_include_pad=1
    out.node("AveragePool", names, [result], count_include_pad=1,
             **_window_attrs(node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"]))


def _max_pool(out, node, names, result):
    out.node("MaxPool", names, [result], **_window_attrs(node.attrs["kernel"], node.attrs["stride"],
                                                           node.attrs["padding"]))


def _pad(out, node, names, result):
    widths = node.attrs["pad_width"]
    pads = [before for before, _ in widths] + [after for _, after in widths]
    out.node("Pad", [names[0], out.ints(pads), out.scalar(node.attrs["value"], node.dtype)], [result])


def _slice(out, node, names, result):
    starts, stops = node.attrs["starts"], node.attrs["stops"]
    out.node("Slice", [names[0], out.ints(starts), out.ints(stops), out.ints(range(len(starts)))], [result])


def _sum(out, node, names, result):
    out.node("ReduceSum", [names[0], out.ints(node.attrs["axes"])], [result], keepdims=int(node.attrs["keepdims"]))


def _softmax_cross_entropy(out, node, names, result):
    out.node("SoftmaxCrossEntropyLoss", names, [result], reduction="mean")


_WRITERS = {
    "ew": _ew,
    "constant": _constant,
    "fill": _fill,
    "matmul": lambda out, node, names, result: out.node("MatMul", names, [result]),
    "conv2d": _conv,
    "avg_pool2d": _avg_pool,
    "max_pool2d": _max_pool,
    "softmax": lambda out, node, names, result: out.node("Softmax", names, [result], axis=node.attrs["axis"]),
    "softmax_cross_entropy": _softmax_cross_entropy,
    "sum": _sum,
    "reshape": lambda out, node, names, result: out.node("Reshape", [names[0], out.ints(node.shape)], [result]),
    "transpose": lambda out, node, names, result: out.node("Transpose", names, [result],
                                                            perm=list(node.attrs["axes"])),
    "broadcast_to": lambda out, node, names, result: out.node("Expand", [names[0], out.ints(node.shape)], [result]),
    "concat": lambda out, node, names, result: out.node("Concat", names, [result], axis=node.attrs["axis"]),
    "pad": _pad,
    "slice": _slice,
    # a value gradients do not cross; ONNX graphs carry no gradients
    "stop_gradient": lambda out, node, names, result: out.node("Identity", names, [result]),
}
