"""How an op is defined: one class holding its type rule, numpy semantics and VJP rule.

Every primitive op of the IR is an `OpDef` subclass registered by name. Composite user-facing
functions (linear, mse, ...) are plain functions building primitives.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.core.errors import ShapeError, shape_error, user_site
from graphc.core.ir import Tensor, as_int, as_int_tuple, check_same_graph

OPS: dict[str, "OpDef"] = {}


class Mismatch(Exception):
    """Raised by a type rule; `OpDef.apply` turns it into a ShapeError naming op, shapes and site."""


def register(cls):
    OPS[cls.name] = cls()
    return cls


class OpDef:
    name: str = ""
    # The derivative rule in words, as reports show it beside the backward nodes it builds.
    vjp_rule: str = ""

    def infer(self, inputs: list[Tensor], attrs: dict[str, Any]) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) of the result, or raise Mismatch(reason)."""
        raise NotImplementedError

    def reference(self, args: list[np.ndarray], attrs: dict[str, Any], node: Tensor, float_dtype) -> np.ndarray:
        """The op's meaning, in numpy. `float_dtype` is the executor's float type (float32 or float64)."""
        raise NotImplementedError

    def vjp(self, node: Tensor, g: Tensor, wanted: tuple[bool, ...]) -> list[Tensor | None]:
        """Gradients w.r.t. each input, as graph nodes, given the output's gradient `g`.

        Only inputs with `wanted[i]` need one (others may be None, and must be when building
        them would add nodes nobody uses); None also for inputs that take no gradient (labels)."""
        raise NotImplementedError(f"{self.name} has no derivative rule")

    def describe(self, attrs: dict[str, Any]) -> str:
        """Attributes as shown in listings."""
        return " ".join(f"{k}={_short(v)}" for k, v in attrs.items())

    def apply(self, inputs: list[Tensor], site: str | None = None, name: str | None = None, **attrs) -> Tensor:
        for operand in inputs:
            if not isinstance(operand, Tensor):
                raise shape_error(self.name, f"operands must be graphc Tensors, got {type(operand).__name__}",
                                  inputs, site)
        graph = check_same_graph(self.name, inputs) if inputs else attrs.pop("graph")
        site = site or user_site()
        try:
            shape, dtype = self.infer(inputs, attrs)
        except Mismatch as why:
            raise shape_error(self.name, str(why), inputs, site) from None
        return graph.add_node(self.name, inputs, attrs, shape, dtype, name=name, site=site)


def op(name: str) -> OpDef:
    return OPS[name]


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def require(condition: bool, reason: str):
    if not condition:
        raise Mismatch(reason)


def require_float(inputs: list[Tensor], *which: int):
    for i in which or range(len(inputs)):
        if inputs[i].dtype not in ("float32", "float64"):
            raise Mismatch(f"operand {i} must be a float tensor, got {inputs[i].dtype}")


def require_ndim(t: Tensor, ndim: int, what: str):
    if t.ndim != ndim:
        raise Mismatch(f"{what} must be {ndim}-D, got shape {t.shape}")


def check_composite(op_name: str, condition: bool, reason: str, operands):
    """Type check of a composite function (built from primitives) that names the composite."""
    if not condition:
        raise shape_error(op_name, reason, operands)


def normalize_axes(axis, ndim: int, op_name: str, operand) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = as_int_tuple(axis, f"{op_name}: axis")
    else:
        axes = (as_int(axis, f"{op_name}: axis"),)
    result = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise shape_error(op_name, f"axis {a} out of range for a {ndim}-D tensor", [operand])
        result.append(a % ndim)
    if len(set(result)) != len(result):
        raise shape_error(op_name, f"repeated axis in {axis}", [operand])
    return tuple(sorted(result))


__all__ = ["OPS", "OpDef", "Mismatch", "register", "op", "require", "require_float", "require_ndim",
           "check_composite", "normalize_axes", "ShapeError"]
