"""graphc's elementwise ops (`ew`: a sympy expression over x0, x1, ...) as ONNX nodes.

The expression tree is walked top-down: sums become Add and Sub, products Mul and Div (factors
with negative exponents divide), powers Sqrt, Reciprocal or Pow, and graphc's own functions
their ONNX namesakes (Relu, Sigmoid, Softplus; Step as Cast(Greater(x, 0))). Whole expressions
that are one ONNX op (LeakyRelu) become that op, so Netron shows what the user wrote.
"""
from __future__ import annotations

import sympy

from graphc.core.scalar import Relu, Sigmoid, Softplus, Step, symbol

_UNARY = {sympy.exp: "Exp", sympy.log: "Log", sympy.tanh: "Tanh", sympy.Abs: "Abs", Relu: "Relu",
          Sigmoid: "Sigmoid", Softplus: "Softplus"}


def leaky_relu_slope(expr: sympy.Expr) -> float | None:
    """The slope a of x0·(a + (1 - a)·Step(x0)), graphc's leaky_relu, else None."""
    x, step = symbol(0), sympy.Dummy("step")
    if expr.free_symbols != {x} or not expr.has(Step(x)):
        return None
    gain = sympy.expand(expr.xreplace({Step(x): step}) / x)
    a, b = gain.coeff(step, 0), gain.coeff(step, 1)
    if a.is_Number and b.is_Number and gain == a + b * step and abs(float(a + b) - 1.0) < 1e-12:
        return float(a)
    return None


class ExprExporter:
    """Emits one expression through `out`, an OnnxWriter, given the ONNX names of x0, x1, ..."""

    def __init__(self, out, operand_names: list[str], dtype: str):
        self.out, self.dtype = out, dtype
        self.names: dict[sympy.Expr, str] = {symbol(i): name for i, name in enumerate(operand_names)}

    def export(self, expr: sympy.Expr, result_name: str) -> None:
        if expr in self.names:   # the identity
            self.out.node("Identity", [self.names[expr]], [result_name])
            return
        slope = leaky_relu_slope(expr)
        if slope is not None:
            self.out.node("LeakyRelu", [self.names[symbol(0)]], [result_name], alpha=slope)
            return
        self.names[expr] = self._emit(expr, result_name)

    def emit(self, expr: sympy.Expr) -> str:
        name = self.names.get(expr)
        if name is None:
            name = self._emit(expr, None)
            self.names[expr] = name
        return name

    def _emit(self, e: sympy.Expr, result: str | None) -> str:
        if e.is_Number:
            return self._renamed(self.out.scalar(float(e), self.dtype), result)
        if e.is_Symbol:
            raise ValueError(f"export_onnx: the expression uses {e}, which is not one of its operands")
        if e.is_Add:
            return self._sum(e, result)
        if e.is_Mul:
            return self._product(e, result)
        if e.is_Pow:
            return self._power(e.base, e.exp, result)
        if isinstance(e, Step):
            positive = self.out.node("Greater", [self.emit(e.args[0]), self.out.scalar(0.0, self.dtype)])
            return self.out.node("Cast", [positive], [result] if result else None, to=self.out.elem_type(self.dtype))
        for function, op_type in _UNARY.items():
            if isinstance(e, function):
                return self.out.node(op_type, [self.emit(e.args[0])], [result] if result else None)
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self.out.node("Max" if isinstance(e, sympy.Max) else "Min", [self.emit(a) for a in e.args],
                                 [result] if result else None)
        raise NotImplementedError(f"export_onnx: the elementwise function {type(e).__name__} in {e} has no ONNX "
                                  f"counterpart here")

    def _renamed(self, name: str, result: str | None) -> str:
        return self.out.node("Identity", [name], [result]) if result else name

    def _sum(self, e, result):
        positive, negative = [], []
        for term in e.as_ordered_terms():
            coefficient, rest = term.as_coeff_Mul()
            if coefficient.is_Number and coefficient < 0:
                negative.append(-term)
            else:
                positive.append(term)
        if not positive:   # -(a + b + ...)
            return self.out.node("Neg", [self._chain("Add", negative)], [result] if result else None)
        total = self._chain("Add", positive, None if negative else result)
        for i, term in enumerate(negative):
            last = i == len(negative) - 1
            total = self.out.node("Sub", [total, self.emit(term)], [result] if result and last else None)
        return total

    def _chain(self, op_type, terms, result=None) -> str:
        value = self.emit(terms[0])
        for i, term in enumerate(terms[1:]):
            last = i == len(terms) - 2
            value = self.out.node(op_type, [value, self.emit(term)], [result] if result and last else None)
        if len(terms) == 1 and result:
            return self._renamed(value, result)
        return value

    def _product(self, e, result):
        coefficient, factors = e.as_coeff_mul()
        if coefficient == -1:
            return self.out.node("Neg", [self.emit(sympy.Mul(*factors))], [result] if result else None)
        numerators = [f for f in e.args if not (f.is_Pow and f.exp.is_Number and f.exp < 0)]
        denominators = [f.base ** -f.exp for f in e.args if f.is_Pow and f.exp.is_Number and f.exp < 0]
        if not denominators:
            return self._chain("Mul", numerators, result)
        top = self._chain("Mul", numerators) if numerators else self.out.scalar(1.0, self.dtype)
        return self.out.node("Div", [top, self._chain("Mul", denominators)], [result] if result else None)

    def _power(self, base, exponent, result):
        outputs = [result] if result else None
        if exponent == sympy.Rational(1, 2) or exponent == sympy.Float(0.5):
            return self.out.node("Sqrt", [self.emit(base)], outputs)
        if exponent == 2:
            b = self.emit(base)
            return self.out.node("Mul", [b, b], outputs)
        if exponent.is_Number and exponent < 0:
            return self.out.node("Reciprocal", [self.emit(base ** -exponent)], outputs)
        if not exponent.is_Number:
            return self.out.node("Pow", [self.emit(base), self.emit(exponent)], outputs)
        return self.out.node("Pow", [self.emit(base), self.out.scalar(float(exponent), self.dtype)], outputs)
