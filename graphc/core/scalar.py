"""The scalar functions elementwise ops are made of, as sympy functions.

Elementwise ops are sympy expressions over the symbols x0, x1, ...; their derivatives come
from `sympy.diff`. sympy's own `Max(x, 0)` differentiates to `Heaviside(x)` (1/2 at 0) and
`log(1 + exp(x))` overflows when evaluated, so ReLU, its step, the sigmoid and softplus are
functions of our own: each knows its derivative (so sympy's chain rule can use it) and has a
numerically stable numpy form (`NUMPY_FUNCTIONS`) and a native lowering (in graphc/backend/emit/expr.py).
"""
from __future__ import annotations

import functools

import numpy as np
import sympy


class Relu(sympy.Function):
    """max(x, 0); its derivative is Step(x), which is 0 at 0 as in PyTorch."""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x if x > 0 else sympy.Integer(0)
        return None

    def fdiff(self, argindex=1):
        return Step(self.args[0])


class Step(sympy.Function):
    """1 where x > 0, else 0: the (sub)gradient of Relu. Its derivative is 0 almost everywhere."""

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.Integer(1 if x > 0 else 0)
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class Sigmoid(sympy.Function):
    """1 / (1 + exp(-x)), evaluated without overflow for any x."""

    @classmethod
    def eval(cls, x):
        if x.is_Number and x == 0:
            return sympy.Rational(1, 2)
        return None

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0]) * (1 - Sigmoid(self.args[0]))

    def _eval_evalf(self, prec):
        # A numeric value for a constant argument, so that float() of a folded expression
        # (the simplifier's Sigmoid(1/2)) works; sympy's arbitrary precision cannot overflow.
        if not self.args[0].is_number:
            return None  # stays Sigmoid: generated code evaluates it without overflow
        return (1 / (1 + sympy.exp(-self.args[0])))._eval_evalf(prec)


class Softplus(sympy.Function):
    """log(1 + exp(x)), evaluated without overflow for any x; its derivative is Sigmoid(x)."""

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])

    def _eval_evalf(self, prec):
        if not self.args[0].is_number:
            return None
        return sympy.log(1 + sympy.exp(self.args[0]))._eval_evalf(prec)


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def _step(x):
    return (x > 0).astype(x.dtype) if isinstance(x, np.ndarray) else np.float64(x > 0)


NUMPY_FUNCTIONS = {
    "Relu": lambda x: np.maximum(x, 0),
    "Step": _step,
    "Sigmoid": _sigmoid,
    "Softplus": lambda x: np.logaddexp(0, x),
}


@functools.lru_cache(maxsize=None)
def symbol(i: int) -> sympy.Symbol:
    """x_i: the i-th operand of an elementwise expression."""
    return sympy.Symbol(f"x{i}", real=True)


def symbol_index(sym: sympy.Symbol) -> int:
    return int(sym.name[1:])


@functools.lru_cache(maxsize=4096)     # the passes rebuild every node; layers repeat their expressions
def symbol_indices(expr: sympy.Expr) -> tuple[int, ...]:
    """The indices of `expr`'s operand symbols, in order."""
    return tuple(sorted(symbol_index(sym) for sym in expr.free_symbols))


@functools.lru_cache(maxsize=4096)
def renumbered(expr: sympy.Expr, renames: tuple[tuple[int, int], ...]) -> sympy.Expr:
    """`expr` with symbol(i) renamed symbol(j) for each (i, j) of `renames`."""
    return expr.xreplace({symbol(i): symbol(j) for i, j in renames})


@functools.lru_cache(maxsize=4096)
def numpy_function(expr: sympy.Expr, arity: int):
    """A numpy function of `arity` arrays computing `expr` (cached: graphs repeat expressions)."""
    args = [symbol(i) for i in range(arity)]
    # lambdify prints a Float with 15 significant digits, which rounds a double like 1/3 (mean's
    # scale) by ~1e-15; 17 digits print every double exactly.
    expr = expr.xreplace({f: sympy.Float(f, 17) for f in expr.atoms(sympy.Float)})
    # numpy the module, not "numpy" the name: for a name, lambdify runs `from numpy import *`,
    # which makes numpy import its lazy submodules (f2py, ...) on the first call, a large part
    # of a cold compile. The printer (NumPyPrinter) and the code are the same.
    return sympy.lambdify(args, expr, modules=[NUMPY_FUNCTIONS, np])
