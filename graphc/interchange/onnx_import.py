"""`gc.import_onnx`: an ONNX model as a graphc Graph whose initializers are trainable params.

Initializers keep their names. Those feeding a BatchNormalization's running statistics become
buffers (state the optimizer never touches); integer initializers (shapes, axes, pads) are read
at import time, as graphc's shapes are static. Each node becomes graphc ops through the table of
`onnx_import_ops.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphc.core.errors import ShapeError
from graphc.core.ir import Graph, Tensor, as_int_tuple
from graphc.interchange.onnx_import_ops import (BUFFER_SLOTS, CONVERTERS, STATIC_SLOTS, NodeContext, node_label,
                                                static_as_tensor)
from graphc.interchange.onnx_load import load_checked_model

# ai.onnx opsets whose semantics of the supported ops the converters follow. From 13 on, every
# supported op reads as it does at 13 or later changes of it that are handled (ReduceMean's axes
# input at 18, Pad's axes at 18, AveragePool's dilations at 19); versions up to 25 added only
# element types, and no supported op changed after 25 up to 28.
MIN_OPSET, MAX_OPSET = 13, 28
PASS_THROUGH_OPS = ("Identity",)   # an initializer seen through these keeps its role


@dataclass
class OnnxModel:
    """What `import_onnx` returns: the graph, its inputs by name, its outputs in the model's order,
    and the values of its params and buffers by name (ready for `gc.compile_training_step`)."""

    graph: Graph
    inputs: dict[str, Tensor]
    outputs: list[Tensor]
    params: dict[str, np.ndarray]
    output_names: list[str] = field(default_factory=list)
    opset: int = 0

    def __repr__(self):
        return (f"<OnnxModel {self.graph.name!r}: inputs {list(self.inputs)}, outputs {self.output_names}, "
                f"{len(self.params)} params and buffers, opset {self.opset}>")


def import_onnx(model, shapes=None, constants=None, training=None, name: str | None = None) -> OnnxModel:
    """Build a graphc Graph from an ONNX model (a path, bytes or an onnx.ModelProto).

    - `shapes`: {input name: shape} for inputs whose dimensions the model leaves symbolic
      (graphc compiles static shapes), e.g. `shapes={"input": (64, 1, 28, 28)}`.
    - `constants`: {input name: array} fixes graph inputs at import time (a Reshape's shape
      given as an input); they are then not inputs of the graph.
    - `training`: None follows the model (BatchNormalization's `training_mode`, Dropout's
      `training_mode` input); False imports both in inference form (running statistics,
      dropout as identity); True trains them: batch statistics that update the running
      statistics as torch does, and `gc.dropout`.

    A damaged or invalid model raises ValueError naming it; an op graphc cannot express raises
    NotImplementedError naming the op type and the node.
    """
    if training is not None and not isinstance(training, bool):
        raise TypeError(f"import_onnx: training must be None, True or False, got {training!r}")
    proto, label = load_checked_model(model)
    return _Importer(proto, label, shapes or {}, constants or {}, training, name).run()


class _Importer:
    def __init__(self, model, label, shapes, constants, training, name):
        self.model, self.label, self.training = model, label, training
        self.shapes, self.constants = dict(shapes), dict(constants)
        self.onnx_graph = model.graph
        self.graph = Graph(name or model.graph.name or "onnx")
        self.values: dict[str, Tensor | np.ndarray] = {}   # ONNX value name -> graphc tensor or static array
        self.params: dict[str, np.ndarray] = {}
        self.opset = self._opset()

    def run(self) -> OnnxModel:
        self._check_overrides()
        self._bind_initializers()
        inputs = self._declare_inputs()
        used = self._used_value_names()
        for index, node in enumerate(self.onnx_graph.node):
            self._convert(node, index, used)
        names = [out.name for out in self.onnx_graph.output]
        outputs = [self._output_tensor(n) for n in names]
        return OnnxModel(self.graph, inputs, outputs, self.params, names, self.opset)

    # ---- the model as a whole --------------------------------------------------------------
    def _opset(self) -> int:
        versions = {entry.domain: entry.version for entry in self.model.opset_import}
        version = versions.get("", versions.get("ai.onnx"))
        if version is None:
            raise ValueError(f"{self.label}: imports no version of the standard ONNX operator set (ai.onnx)")
        if not MIN_OPSET <= version <= MAX_OPSET:
            raise NotImplementedError(f"{self.label}: uses ONNX opset {version}; graphc imports opsets "
                                      f"{MIN_OPSET} to {MAX_OPSET} (onnx.version_converter can convert the model)")
        if self.onnx_graph.sparse_initializer:
            raise NotImplementedError(f"{self.label}: sparse initializers are not supported")
        return version

    def _check_overrides(self):
        declared = {v.name for v in self.onnx_graph.input} - {t.name for t in self.onnx_graph.initializer}
        for what, table in (("shapes", self.shapes), ("constants", self.constants)):
            unknown = sorted(set(table) - declared)
            if unknown:
                raise ValueError(f"import_onnx: {what}= names {unknown}, which are not inputs of {self.label} "
                                 f"(its inputs: {sorted(declared)})")
        both = sorted(set(self.shapes) & set(self.constants))
        if both:
            raise ValueError(f"import_onnx: {both} are given both a shape and a constant value")

    # ---- initializers: params, buffers or static values ------------------------------------
    def _slot_uses(self) -> dict[str, set[str]]:
        """How each value is consumed: "data", "static" or "buffer" (seen through Identity)."""
        uses: dict[str, set[str]] = {}
        alias: dict[str, str] = {}
        for node in self.onnx_graph.node:
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                if node.op_type in STATIC_SLOTS and slot in STATIC_SLOTS[node.op_type]:
                    kind = "static"
                elif node.op_type in BUFFER_SLOTS and slot in BUFFER_SLOTS[node.op_type]:
                    kind = "buffer"
                elif node.op_type in PASS_THROUGH_OPS:
                    alias[node.output[0]] = alias.get(name, name)
                    continue
                else:
                    kind = "data"
                uses.setdefault(alias.get(name, name), set()).add(kind)
        for out in self.onnx_graph.output:
            uses.setdefault(alias.get(out.name, out.name), set()).add("data")
        return uses

    def _bind_initializers(self):
        from onnx import numpy_helper
        uses = self._slot_uses()
        for tensor in self.onnx_graph.initializer:
            try:
                array = np.array(numpy_helper.to_array(tensor), order="C", copy=True)
            except Exception as err:
                raise ValueError(f"{self.label}: initializer {tensor.name!r} cannot be read: {err}") from None
            kinds = uses.get(tensor.name, set())
            if not kinds:
                continue   # unused: no param for it
            if array.dtype.kind != "f" or kinds == {"static"}:
                self.values[tensor.name] = array
                continue
            if array.dtype not in (np.float32, np.float64):
                raise NotImplementedError(f"{self.label}: initializer {tensor.name!r} is {array.dtype}; graphc "
                                          f"computes in float32 and float64")
            if not array.size or any(d < 1 for d in array.shape):
                raise NotImplementedError(f"{self.label}: initializer {tensor.name!r} has shape {array.shape}; "
                                          f"graphc tensors have no empty dimensions")
            if "buffer" in kinds:
                # running statistics: state batch_norm updates, never trained (buffers are float32)
                array = array.astype(np.float32)
                node = self.graph.buffer(tensor.name, array.shape, init=0.0)
            else:
                node = self.graph.param(tensor.name, array.shape, dtype=array.dtype.name)
            self.params[tensor.name] = array
            self.values[tensor.name] = node

    # ---- inputs ----------------------------------------------------------------------------
    def _declare_inputs(self) -> dict[str, Tensor]:
        initialized = {t.name for t in self.onnx_graph.initializer}
        inputs = {}
        for value in self.onnx_graph.input:
            if value.name in initialized:
                continue   # IR < 4 lists initializers among the inputs: they are params
            if value.name in self.constants:
                self.values[value.name] = np.asarray(self.constants[value.name])
                continue
            dtype = _input_dtype(value, self.label)
            shape = self._input_shape(value)
            node = self.graph.input(value.name, shape, dtype=dtype)
            inputs[value.name] = node
            self.values[value.name] = node
        return inputs

    def _input_shape(self, value) -> tuple[int, ...]:
        dims = value.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        has_shape = value.type.tensor_type.HasField("shape")
        if value.name in self.shapes:
            shape = as_int_tuple(self.shapes[value.name], f"import_onnx: shapes[{value.name!r}]")
            if has_shape and (len(shape) != len(declared) or any(
                    d is not None and d != s for d, s in zip(declared, shape))):
                raise ValueError(f"import_onnx: shapes[{value.name!r}] = {shape} contradicts the model's shape "
                                 f"{_shape_text(dims)} for input {value.name!r}")
            return shape
        if not has_shape or None in declared:
            raise ValueError(f"{self.label}: input {value.name!r} has shape {_shape_text(dims) if has_shape else '?'}"
                             f"; graphc compiles static shapes: give import_onnx(..., shapes={{{value.name!r}: "
                             f"(...)}}) with every dimension")
        if any(d < 1 for d in declared):
            raise NotImplementedError(f"{self.label}: input {value.name!r} has shape {tuple(declared)}; graphc "
                                      f"tensors have no empty dimensions")
        return tuple(declared)

    # ---- nodes -----------------------------------------------------------------------------
    def _used_value_names(self) -> set[str]:
        used = {name for node in self.onnx_graph.node for name in node.input if name}
        return used | {out.name for out in self.onnx_graph.output}

    def _convert(self, node, index: int, used: set[str]):
        where = node_label(node, index)
        if node.domain not in ("", "ai.onnx"):
            raise NotImplementedError(f"{self.label}: {where}: op {node.domain}.{node.op_type} is outside the "
                                      f"standard ONNX operator set; graphc does not support it")
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            raise NotImplementedError(f"{self.label}: {where}: ONNX op {node.op_type!r} is not supported by graphc "
                                      f"(supported: {', '.join(sorted(CONVERTERS))})")
        ctx = NodeContext(node, where, self.label, self.graph, self.values, self.opset, self.training, used)
        try:
            results = converter(ctx)
        except NotImplementedError:
            raise
        except (ShapeError, ValueError, TypeError) as err:
            try:
                renamed = type(err)(f"{self.label}: {where}: {err}")
            except Exception:      # an exception type that takes other arguments
                renamed = ValueError(f"{self.label}: {where}: {type(err).__name__}: {err}")
            raise renamed from err
        except Exception as err:   # attributes no checker vets (a stride of 0, ...) must not crash the importer
            raise ValueError(f"{self.label}: {where}: cannot be imported: {type(err).__name__}: {err}") from err
        results = results if isinstance(results, (list, tuple)) else [results]
        for out_name, result in zip(node.output, results):
            if out_name and result is not None:
                self.values[out_name] = result
        missing = [n for n in node.output[len(results):] if n in used]
        if missing:
            raise NotImplementedError(f"{self.label}: {where}: graphc computes only the first {len(results)} "
                                      f"output(s) of {node.op_type}; the model uses {missing}")

    def _output_tensor(self, name: str) -> Tensor:
        value = self.values[name]
        if isinstance(value, np.ndarray):
            return static_as_tensor(self.graph, value, f"{self.label}: output {name!r}")
        return value


def _input_dtype(value, label: str) -> str:
    from onnx import TensorProto
    if not value.type.HasField("tensor_type"):
        raise NotImplementedError(f"{label}: input {value.name!r} is not a tensor (sequences, maps and optionals "
                                  f"are not supported)")
    elem = value.type.tensor_type.elem_type
    # int64 inputs (class labels, as torch exports them) are declared int32, which native code
    # takes; int64 arrays can still be fed to them
    names = {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.INT32: "int32",
             TensorProto.INT64: "int32"}
    if elem not in names:
        raise NotImplementedError(f"{label}: input {value.name!r} is {TensorProto.DataType.Name(elem)}; graphc "
                                  f"inputs are float32, float64, int32 or int64")
    return names[elem]


def _shape_text(dims) -> str:
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                           for d in dims) + ")"
