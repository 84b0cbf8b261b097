"""Lowering sympy expressions (the bodies of elementwise ops) to LLVM IR on float vectors.

`sympy.printing.llvmjitcode` does not work with llvmlite 0.50 (see NOTES-llvm.md), so this is
our own small printer. It covers what elementwise ops and their sympy derivatives produce: +, *,
powers, exp/log/tanh/sqrt/Abs/Max/Min, and graphc's Relu, Step, Sigmoid and Softplus (each in
its numerically stable form). Shared subexpressions are computed once via `sympy.cse`.
"""
from __future__ import annotations

import functools

import llvmlite.ir as ir
import sympy

from graphc.backend.emit.kernel_builder import F32, KernelBuilder
from graphc.core.scalar import Relu, Sigmoid, Softplus, Step, symbol_index

# Elementwise kernels evaluate in float32; IEEE semantics except contraction of a*b+c into fma.
_FLAGS = ("contract",)


class ExprEmitter:
    """Emits sympy expressions over x0..xn as vector IR, given each operand's vector value."""

    def __init__(self, kb: KernelBuilder, operands: list[ir.Value]):
        self.kb = kb
        self.b = kb.b
        self.values: dict[sympy.Expr, ir.Value] = {sympy.Symbol(f"x{i}", real=True): v
                                                   for i, v in enumerate(operands)}
        self.type = kb.vec_type

    def emit_all(self, exprs: list[sympy.Expr]) -> list[ir.Value]:
        """Values of several expressions, sharing common subexpressions."""
        replacements, reduced = _common_subexpressions(tuple(exprs))
        for temp, subexpr in replacements:
            self.values[temp] = self.emit(subexpr)
        return [self.emit(e) for e in reduced]

    def emit(self, expr: sympy.Expr) -> ir.Value:
        cached = self.values.get(expr)
        if cached is not None:
            return cached
        value = self._emit(expr)
        self.values[expr] = value
        return value

    # ---- one case per kind of expression ------------------------------------------------
    def _emit(self, e: sympy.Expr) -> ir.Value:
        if e.is_Number:
            return self.const(float(e))
        if e.is_Symbol:
            raise KeyError(f"no value for symbol {e} (operand x{symbol_index(e)} missing)")
        if e.is_Add:
            return self._fold(self.b.fadd, e.args)
        if e.is_Mul:
            return self._mul(e)
        if e.is_Pow:
            return self._pow(*e.args)
        (arg, *rest) = e.args
        if isinstance(e, Relu):
            x = self.emit(arg)
            return self.b.select(self.b.fcmp_ordered("<", x, self.const(0.0)), self.const(0.0), x)
        if isinstance(e, Step):
            return self.b.select(self.b.fcmp_ordered(">", self.emit(arg), self.const(0.0)),
                                 self.const(1.0), self.const(0.0))
        if isinstance(e, Sigmoid):
            # 1 / (1 + exp(-x)): exp overflows to inf for x << 0, giving exactly 0, never NaN.
            return self._div(self.const(1.0), self.b.fadd(self.const(1.0), self.call("exp", self.neg(self.emit(arg)))))
        if isinstance(e, Softplus):
            # max(x, 0) + log(1 + exp(-|x|)): no overflow for any x.
            x = self.emit(arg)
            tail = self.call("log", self.b.fadd(self.const(1.0), self.call("exp", self.neg(self.call("fabs", x)))))
            return self.b.fadd(self.call("maxnum", x, self.const(0.0)), tail, flags=_FLAGS)
        if isinstance(e, sympy.exp):
            return self.call("exp", self.emit(arg))
        if isinstance(e, sympy.log):
            return self.call("log", self.emit(arg))
        if isinstance(e, sympy.tanh):
            return self.call("tanh", self.emit(arg))
        if isinstance(e, sympy.Abs):
            return self.call("fabs", self.emit(arg))
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._fold(lambda a, b, flags=(): self.call("maxnum" if isinstance(e, sympy.Max) else "minnum", a, b),
                              e.args)
        raise NotImplementedError(f"no native lowering for {type(e).__name__} in {e}")

    def _mul(self, e):
        coefficient, factors = e.as_coeff_mul()
        if coefficient == -1:
            return self.neg(self.emit(sympy.Mul(*factors)))
        numerators = [f for f in e.args if not (f.is_Pow and f.exp.is_Number and f.exp < 0)]
        denominators = [f.base ** -f.exp for f in e.args if f.is_Pow and f.exp.is_Number and f.exp < 0]
        value = self._fold(self.b.fmul, numerators) if numerators else self.const(1.0)
        if denominators:
            value = self._div(value, self._fold(self.b.fmul, denominators))
        return value

    def _pow(self, base, exponent):
        if exponent.is_Integer:
            n = int(exponent)
            if n < 0:
                return self._div(self.const(1.0), self._pow(base, sympy.Integer(-n)))
            return self._integer_power(self.emit(base), n)
        if exponent == sympy.Rational(1, 2):
            return self.call("sqrt", self.emit(base))
        if exponent == sympy.Rational(-1, 2):
            return self._div(self.const(1.0), self.call("sqrt", self.emit(base)))
        return self.call("pow", self.emit(base), self.emit(exponent))

    def _integer_power(self, x, n):
        """x**n by repeated squaring."""
        result = None
        while n:
            if n & 1:
                result = x if result is None else self.b.fmul(result, x)
            n >>= 1
            if n:
                x = self.b.fmul(x, x)
        return result if result is not None else self.const(1.0)

    # ---- helpers ---------------------------------------------------------------------------
    def _fold(self, op, args):
        values = [self.emit(a) for a in args]
        result = values[0]
        for v in values[1:]:
            result = op(result, v, flags=_FLAGS)
        return result

    def _div(self, a, b):
        return self.b.fdiv(a, b)

    def neg(self, x):
        return self.b.fneg(x)

    def const(self, value: float) -> ir.Value:
        return self.kb.splat(value)

    def call(self, name: str, *args: ir.Value) -> ir.Value:
        """A call of the overloaded LLVM math intrinsic llvm.<name> on this emitter's vector type."""
        mangled = f"llvm.{name}.v{self.type.count}f32"
        fn = self.kb.module.globals.get(mangled)
        if fn is None:
            fn = ir.Function(self.kb.module, ir.FunctionType(self.type, [self.type] * len(args)), name=mangled)
        return self.b.call(fn, list(args))


def operand_count(expr: sympy.Expr) -> int:
    return 1 + max((symbol_index(s) for s in expr.free_symbols), default=-1)


__all__ = ["ExprEmitter", "operand_count", "F32"]


@functools.lru_cache(maxsize=1024)
def _common_subexpressions(exprs: tuple) -> tuple[tuple, tuple]:
    """`sympy.cse` of `exprs`, remembered: a GEMM's epilogue is emitted once per accumulator of
    every micro-kernel, and cse, not the IR it leads to, was most of that time."""
    replacements, reduced = sympy.cse(list(exprs), symbols=sympy.numbered_symbols("c", real=True))
    return tuple(replacements), tuple(reduced)
