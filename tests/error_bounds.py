"""How far a float32 evaluation of a graph may honestly be from its exact (float64) values.

Alongside the float64 reference, a "magnitude" pass walks the graph's nodes (the backward
nodes `gc.grad` made included) in topological order, one rule per op, and gives each node

- `magnitude`, per element: what the computation would give if every operation worked on
  absolute values (sums of |terms|, |a|·|b| for products, matmuls and convolutions, the sums of
  absolute contributions for reductions and softmax). Rounding errors scale with it, not with
  the value: softmax - onehot sums to 0 exactly, yet its rounding is that of the terms summed.
- `depth`, per node: how many float32 roundings can lie on one path from the sources to it.
  An add, multiply or divide counts 1, a sum of L terms L - 1 (recursive summation's worst
  case; blocked, pairwise or vector-lane orders do better), exp/log/tanh LIBRARY_ULPS.

A running error analysis (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1-3.3)
then bounds any float32 evaluation that performs these operations, to first order in the unit
roundoff u = 2^-24 and in whatever order it sums (GEMM blocking, vector lanes, fma):

    |computed - exact| <= depth · u · magnitude            (per element)

The rules keep two invariants, magnitude >= |exact| and that bound, one op at a time:

- a + b: mag(a) + mag(b), depth max + 1 (n-ary: + n - 1); the own rounding is u·|a + b|.
- a · b: |a|·mag(b) + mag(a)·|b| + |a·b|, depth max + 1: the linearized product of two
  values with errors, plus its own rounding. An operand held exactly (depth 0: params, inputs,
  constants) carries no error, so its term drops; a factor ±2^k rounds nothing. matmul and the
  convolutions are sums of such products: the same terms through the op itself, depth + the
  number of terms per output.
- f(a) smooth (exp, log, tanh, sigmoid, softplus, powers): |f'(a)|·mag(a) + |f(a)|: the input's
  error through the slope, plus the function's own rounding (depth + its ulps).
- relu, abs, max, min, max pooling: Lipschitz-1, so mag of the argument(s) (0 where relu's
  argument is certainly negative: the result is exactly 0).
- kinks (Step, relu's derivative; the window a max-pool gradient routes to): where the
  argument's own bound straddles the kink, float32 may take the other branch. Such elements
  are unconstrained: magnitude inf (an unbounded value times an exact 0 stays 0).
- softmax p = e / Σe with x - max(x) rounded: mu = mag(x) + |x - max| + 1 is the relative error
  of each e; mag(p) = p·(mu + Σ p·mu), depth + row length + a few.
- softmax_cross_entropy: Σ (p + onehot)·mu per row (its gradient p - onehot, in absolute
  values) plus the roundings of log-sum-exp, averaged over the batch.

The tolerance used is c · eps32 · magnitude with c = depth and eps32 = 2^-23 = 2u: the factor
2 over the analysis covers what first order leaves out (terms in u², the compiler writing an
expression in an equivalent form, a division done as a reciprocal times). Underflow, which
the relative model ignores, adds depth · (smallest normal float32) to the comparison.
A miscompile (a wrong sign, a dropped term, a transposed operand, a shifted window) moves a
value by about its size or that of the terms it loses; the bound is typically 1e-5 to 1e-3 of
the value. It is loosest after a softmax of large logits: the pass sees each logit's error
move each probability, not that the probabilities still sum to 1.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np
import sympy

from graphc.core.ops.conv import _windows
from graphc.core.ops.pool import _scatter_windows
from graphc.core.ops.registry import OPS
from graphc.core.reference import random_key
from graphc.core.scalar import NUMPY_FUNCTIONS, Relu, Sigmoid, Softplus, Step

EPS32 = float(np.finfo(np.float32).eps)      # 2^-23, twice float32's unit roundoff
TINY32 = float(np.finfo(np.float32).tiny)    # what one flush to zero can lose
# LLVM's exp/log/tanh/pow and graphc's own vector exp/log are within 3 ulp.
LIBRARY_ULPS = 4


@dataclasses.dataclass
class Bounded:
    """A node's exact value, its magnitude (>= |exact|, inf where unconstrained) and depth."""

    exact: np.ndarray
    magnitude: np.ndarray
    depth: int

    @property
    def bound(self) -> np.ndarray:
        """The most a float32 evaluation may differ from `exact`, per element."""
        with np.errstate(invalid="ignore"):
            scaled = self.depth * EPS32 * self.magnitude
        return np.where(np.isinf(self.magnitude), np.inf, scaled)

    @property
    def allowed(self) -> np.ndarray:
        """`bound` plus what underflow may lose: the tolerance of a comparison."""
        return self.bound + self.depth * TINY32

    def unsure_sign(self) -> np.ndarray:
        """Where a float32 evaluation may land on the other side of 0 (an exact 0 computed
        exactly, bound 0, stays sure)."""
        return np.abs(self.exact) < self.bound


# ---- the walk ----------------------------------------------------------------------------------


def bounded_values(outputs, feeds: Mapping[str, object], params: Mapping[str, np.ndarray]) -> list[Bounded]:
    """Exact values, magnitudes and depths of `outputs`, from every node they depend on."""
    graph = outputs[0].graph
    known: dict[int, Bounded] = {}
    for node in graph.ancestors(outputs):
        rule = RULES.get(node.op)
        if rule is None:
            raise NotImplementedError(f"error_bounds: no magnitude rule for op {node.op!r}; add one "
                                      "before comparing graphs that use it")
        known[node.id] = rule(node, [known[operand.id] for operand in node.inputs], feeds, params)
    return [known[out.id] for out in outputs]


def worst_violation(actual, bounded: Bounded) -> tuple[float, str]:
    """(largest error / allowed error, a description of that element); above 1 is a failure."""
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == bounded.exact.shape, (actual.shape, bounded.exact.shape)
    if actual.size == 0:
        return 0.0, "empty"
    error = np.abs(actual - bounded.exact)
    allowed = np.broadcast_to(bounded.allowed, error.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = error / allowed                                     # any error where none is allowed: inf
    ratio = np.where(error == 0, 0.0, ratio)
    ratio = np.where(np.isinf(allowed) & np.isfinite(error), 0.0, ratio)   # unconstrained elements
    ratio = np.where(np.isnan(ratio), np.inf, ratio)                # a NaN computed
    at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    unconstrained = int(np.isinf(bounded.magnitude).sum())
    where = (f"at {tuple(int(i) for i in at)}: compiled {actual[at]:.6g}, exact {bounded.exact[at]:.6g}, "
             f"error {error[at]:.3e}, allowed {allowed[at]:.3e} (magnitude {bounded.magnitude[at]:.3e}, "
             f"depth {bounded.depth}); {unconstrained} of {actual.size} elements unconstrained")
    return float(ratio[at]), where


def assert_within_bounds(actual_values, bounded: list[Bounded], labels) -> None:
    """Every compiled value within its honest float32 error bound of the exact value."""
    failures = []
    for actual, expected, label in zip(actual_values, bounded, labels, strict=True):
        ratio, where = worst_violation(actual, expected)
        if not ratio <= 1.0:
            failures.append(f"{label}: {ratio:.3g}x the bound {where}")
    assert not failures, "\n".join(failures)


def assert_compiled_matches_exact(outputs, feeds, params, actual_values, labels) -> list[Bounded]:
    """Compiled values against the float64 reference, within the magnitude pass's bounds."""
    bounded = bounded_values(outputs, feeds, params)
    assert_within_bounds(actual_values, bounded, labels)
    return bounded


# ---- helpers the rules share -------------------------------------------------------------------


def _apply(node, args) -> np.ndarray:
    """The op's own numpy semantics, in float64."""
    return np.asarray(OPS[node.op].reference(args, node.attrs, node, np.float64), dtype=np.float64)


def _held(value: np.ndarray) -> Bounded:
    """A value the float32 program holds exactly, or with one rounding if float32 cannot."""
    value = np.asarray(value)
    if value.dtype.kind in "iub":
        return Bounded(value, np.abs(value).astype(np.float64), 0)
    value = value.astype(np.float64)
    exact_in_float32 = bool(np.all(value.astype(np.float32).astype(np.float64) == value))
    return Bounded(value, np.abs(value), 0 if exact_in_float32 else 1)


def _finite(magnitude: np.ndarray) -> np.ndarray:
    return np.where(np.isinf(magnitude), 0.0, magnitude)


def _carried(x: Bounded) -> np.ndarray:
    """The magnitude of the error `x` already carries into an op: none if it is held exactly
    (a param, an input, a constant float32 holds), which spares products of exact operands
    the |a|·mag(b) + mag(a)·|b| terms."""
    return x.magnitude if x.depth > 0 else np.zeros_like(x.magnitude)


def _power_of_two(x: Bounded) -> bool:
    """An exact scalar ±2^k: multiplying by it (a negation, halving) rounds nothing."""
    if x.depth > 0 or np.ndim(x.exact) != 0 or x.exact == 0:
        return False
    return bool(np.frexp(np.abs(x.exact))[0] == 0.5)


def _unconstrained(magnitude: np.ndarray) -> np.ndarray:
    return np.isinf(magnitude).astype(np.float64)


def _nan_as_unbounded(magnitude: np.ndarray) -> np.ndarray:
    # nan comes from inf·0 or inf - inf on an unconstrained input: keep it unconstrained
    return np.where(np.isnan(magnitude), np.inf, magnitude)


def _times(magnitude: np.ndarray, other: Bounded) -> np.ndarray:
    """magnitude·|other|, where an unconstrained magnitude times a surely-0 factor is 0."""
    with np.errstate(invalid="ignore"):
        product = magnitude * np.abs(other.exact)
    zero_times_inf = np.isnan(product)
    if zero_times_inf.any():
        factor_moves = np.broadcast_to(other.bound > 0, product.shape)
        product = np.where(zero_times_inf, np.where(factor_moves, np.inf, 0.0), product)
    return product


# ---- sources and data movement -----------------------------------------------------------------


def _source(node, operands, feeds, params) -> Bounded:
    if node is node.graph.random_key:      # a program's first call draws the masks of seed 0, call 0
        return _held(random_key(0, call=0))
    table = feeds if node.op == "input" else params
    return _held(np.asarray(table[node.name]))


def _constant(node, operands, feeds, params) -> Bounded:
    return _held(node.attrs["value"].array)


def _fill(node, operands, feeds, params) -> Bounded:
    return _held(np.full(node.shape, node.attrs["value"], dtype=np.float64))


def _one_hot(node, operands, feeds, params) -> Bounded:
    return _held(_apply(node, [operands[0].exact]))


def _dropout_mask(node, operands, feeds, params) -> Bounded:
    """0 or float32(1/(1-p)), the same bits in numpy and native code: held exactly."""
    return _held(_apply(node, [operands[0].exact]))


def _moves_values(node, operands, feeds, params) -> Bounded:
    """reshape, transpose, broadcast_to, stop_gradient: no arithmetic, magnitudes move with their values."""
    (x,) = operands
    return Bounded(_apply(node, [x.exact]), _apply(node, [x.magnitude]), x.depth)


def _reduction(terms_per_output: Callable) -> Callable:
    """A linear op whose outputs each add up to `terms_per_output(node)` scaled inputs."""
    def rule(node, operands, feeds, params) -> Bounded:
        (x,) = operands
        return Bounded(_apply(node, [x.exact]), _apply(node, [x.magnitude]), x.depth + terms_per_output(node))
    return rule


def _sum_terms(node) -> int:
    shape = node.inputs[0].shape
    return int(np.prod([shape[axis] for axis in node.attrs["axes"]], dtype=np.int64)) - 1


def _window_area(node) -> int:
    kh, kw = node.attrs["kernel"]
    return kh * kw          # adds of one window (or the windows overlapping a cell), then the 1/area


# ---- products ------------------------------------------------------------------------------------


def _bilinear(terms_per_output: Callable) -> Callable:
    """matmul and the convolutions: sums of products a·b, each carrying |a|·mag(b) + mag(a)·|b|
    + |a·b|, all through the op itself (which is linear in each operand)."""
    def rule(node, operands, feeds, params) -> Bounded:
        a, b = operands
        exact = _apply(node, [a.exact, b.exact])
        abs_a, abs_b = np.abs(a.exact), np.abs(b.exact)
        own = _winograd_rounding(node, _apply(node, [abs_a, abs_b]))
        magnitude = (_apply(node, [_finite(_carried(a)), abs_b]) + _apply(node, [abs_a, _finite(_carried(b))])
                     + own)
        loose_a, loose_b = _unconstrained(a.magnitude), _unconstrained(b.magnitude)
        if loose_a.any() or loose_b.any():
            # an unconstrained operand reaches every output it meets a nonzero (or moving) partner in
            reach = (_apply(node, [loose_a, abs_b + _finite(b.magnitude) + loose_b])
                     + _apply(node, [abs_a + _finite(a.magnitude) + loose_a, loose_b]))
            magnitude = np.where(reach > 0, np.inf, magnitude)
        return Bounded(exact, magnitude, max(a.depth, b.depth) + terms_per_output(node) + 1)
    return rule


# ---- Winograd ----------------------------------------------------------------------------------
# A 3x3 stride-1 conv may run as Winograd's F(m x m, 3 x 3) (graphc/backend/kernels/conv/
# winograd.py): its roundings then spread over the m x m tile of outputs through the transforms.
# An output whose window reads only zeros is exactly 0 directly, not by Winograd. The rigorous
# bound (the pipeline on absolute values: |A^T| (sum |G w G^T| |B^T| |d| |B|) |A|) is ~1e4 times
# the direct one for m = 4 and would accept a shifted window; measured, F4's errors stay within
# 1.1e-5 of the tile's largest output (200 random 64-channel tiles against float64; F2: 2.3e-6),
# far inside depth · eps32 times the tile's largest direct magnitude. So each output's own
# rounding is bounded by WINOGRAD_SPREAD times the largest direct magnitude of its tile (4 x 4
# blocks from the origin: they hold F2's 2 x 2 tiles too). The weight gradient sums every tile,
# so no output of it reads only zeros: it keeps the direct bound.
WINOGRAD_SPREAD = 4.0


def _winograd_rounding(node, own: np.ndarray) -> np.ndarray:
    """`own` (the direct own-rounding magnitude of a conv2d or conv2d_input_grad node's output),
    raised to WINOGRAD_SPREAD times its tile's largest where the kernels may run Winograd at
    some vector width."""
    from graphc.backend.kernels.conv import ConvGeometry
    from graphc.backend.kernels.conv.input_grad import _as_forward_geometry
    from graphc.backend.kernels.conv.winograd import F2, F4, winograd_possible

    if node.op not in ("conv2d", "conv2d_input_grad"):
        return own
    attrs = node.attrs
    x_shape = attrs["x_shape"] if node.op == "conv2d_input_grad" else node.inputs[0].shape
    geometry = ConvGeometry.from_shapes(x_shape, node.inputs[1].shape, attrs["stride"], attrs["padding"])
    if node.op == "conv2d_input_grad":
        geometry = _as_forward_geometry(geometry)[0]
    sizes = [scheme.m for scheme in (F2, F4) if winograd_possible(geometry, 4, scheme)]
    if not sizes:
        return own
    m = max(sizes)
    n, c, h, w = own.shape
    tiles = own.reshape(n, c, h // m, m, w // m, m).max(axis=(3, 5), keepdims=True)
    spread = np.broadcast_to(tiles, (n, c, h // m, m, w // m, m)).reshape(own.shape)
    return np.maximum(own, WINOGRAD_SPREAD * spread)


def _matmul_terms(node) -> int:
    return node.inputs[0].shape[1] - 1


def _conv_terms(node) -> int:
    _, channels, kh, kw = node.inputs[1].shape
    return channels * kh * kw - 1


def _conv_input_grad_terms(node) -> int:
    out_channels, _, kh, kw = node.inputs[1].shape     # a cell meets at most kh·kw taps per channel
    return out_channels * kh * kw - 1


def _conv_weight_grad_terms(node) -> int:
    n, _, oh, ow = node.inputs[1].shape
    return n * oh * ow - 1


# ---- pooling ---------------------------------------------------------------------------------------


def _max_pool(node, operands, feeds, params) -> Bounded:
    """max moves by at most its inputs' largest error: the window's largest magnitude."""
    (x,) = operands
    windows = _windows(x.magnitude, node.attrs["kernel"], node.attrs["stride"], node.attrs["padding"],
                       node.shape[2:])
    return Bounded(_apply(node, [x.exact]), windows.max(axis=(4, 5)), x.depth)


def _max_pool_grad(node, operands, feeds, params) -> Bounded:
    """Each output gradient goes to its window's winner; where another cell is within the
    errors of the winner, float32 may route it there instead: those cells are unconstrained."""
    x, g = operands
    attrs = node.attrs
    exact = _apply(node, [x.exact, g.exact])
    magnitude = _apply(node, [x.exact, _finite(g.magnitude)])
    magnitude = np.where(_apply(node, [x.exact, _unconstrained(g.magnitude)]) > 0, np.inf, magnitude)
    contested = _contested_cells(x, g, attrs)
    if contested.any():
        spread = _scatter_windows(contested.astype(np.float64), x.exact.shape, attrs["kernel"],
                                  attrs["stride"], attrs["padding"])
        magnitude = np.where(spread > 0, np.inf, magnitude)
    return Bounded(exact, magnitude, g.depth + _window_area(node))


def _contested_cells(x: Bounded, g: Bounded, attrs) -> np.ndarray:
    """(N, C, OH, OW, kh, kw): the cells of windows whose winner float32 may pick differently,
    in windows whose gradient is not surely 0."""
    out_hw = g.exact.shape[2:]
    padded = np.pad(x.exact, ((0, 0), (0, 0)) + tuple(attrs["padding"]), constant_values=-np.inf)
    values = _windows(padded, attrs["kernel"], attrs["stride"], ((0, 0), (0, 0)), out_hw)
    bounds = _windows(x.bound, attrs["kernel"], attrs["stride"], attrs["padding"], out_hw)
    flat_values = values.reshape(values.shape[:4] + (-1,))
    flat_bounds = bounds.reshape(flat_values.shape)
    winner = flat_values.argmax(axis=-1)[..., None]
    best = np.take_along_axis(flat_values, winner, axis=-1)
    best_bound = np.take_along_axis(flat_bounds, winner, axis=-1)
    reachable = (flat_values + flat_bounds >= best - best_bound) & (flat_bounds + best_bound > 0)
    reachable &= np.isfinite(flat_values)
    is_winner = np.arange(flat_values.shape[-1]) == winner
    contested_window = (reachable & ~is_winner).any(axis=-1, keepdims=True)
    gradient_flows = ((np.abs(g.exact) + g.magnitude) > 0)[..., None]
    return (reachable & contested_window & gradient_flows).reshape(values.shape)


# ---- softmax and its loss ----------------------------------------------------------------------------


def _logit_error(x: Bounded, axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relative error scale of each exp(x - max), where a row is unconstrained, the row max)."""
    row_max = x.exact.max(axis=axis, keepdims=True)
    mu = _finite(_carried(x)) + np.abs(x.exact - row_max) + 1.0
    loose_row = np.isinf(x.magnitude).any(axis=axis, keepdims=True)
    return mu, loose_row, row_max


def _softmax(node, operands, feeds, params) -> Bounded:
    (x,) = operands
    axis = node.attrs["axis"]
    p = _apply(node, [x.exact])
    mu, loose_row, _ = _logit_error(x, axis)
    magnitude = p * (mu + (p * mu).sum(axis=axis, keepdims=True))
    magnitude = np.where(loose_row, np.inf, magnitude)
    row = x.exact.shape[axis]
    return Bounded(p, magnitude, x.depth + row + LIBRARY_ULPS + 3)


def _softmax_cross_entropy(node, operands, feeds, params) -> Bounded:
    z, labels = operands
    exact = _apply(node, [z.exact, labels.exact])
    n, classes = z.exact.shape
    mu, loose_row, row_max = _logit_error(z, 1)
    shifted = z.exact - row_max
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    onehot = labels.exact[:, None] == np.arange(classes)
    picked = np.abs(z.exact[np.arange(n), labels.exact.astype(np.int64)])
    log_sum_exp = row_max[:, 0] + np.log(np.exp(shifted).sum(axis=1))
    per_row = ((p + onehot) * mu).sum(axis=1) + np.abs(log_sum_exp) + np.abs(row_max[:, 0]) + picked + 1.0
    magnitude = np.asarray(np.inf if loose_row.any() else per_row.mean())
    return Bounded(exact, magnitude, z.depth + classes + n + 2 * LIBRARY_ULPS + 4)


# ---- elementwise: one rule per kind of sympy expression ----------------------------------------------


def _elementwise(node, operands, feeds, params) -> Bounded:
    leaves = {sympy.Symbol(f"x{i}", real=True): operand for i, operand in enumerate(operands)}
    result = _expression(node.attrs["expr"], leaves)
    magnitude = np.broadcast_to(result.magnitude, node.shape).copy()
    return Bounded(_apply(node, [operand.exact for operand in operands]), magnitude, result.depth)


def _expression(e: sympy.Expr, leaves: dict) -> Bounded:
    if e.is_Symbol:
        return leaves[e]
    if e.is_Number:
        return _held(np.asarray(float(e)))
    if e.is_Add:
        return _add([_expression(arg, leaves) for arg in e.args])
    if e.is_Mul:
        factors = [_expression(arg, leaves) for arg in e.args]
        result = factors[0]
        for factor in factors[1:]:
            result = _product(result, factor)
        return result
    if e.is_Pow:
        return _power(_expression(e.base, leaves), e.exp)
    if isinstance(e, (sympy.Max, sympy.Min)):
        return _extreme(e, [_expression(arg, leaves) for arg in e.args])
    kind = type(e)
    if kind in _KINKED:
        return _KINKED[kind](_expression(e.args[0], leaves))
    if kind in _SMOOTH:
        return _smooth(_expression(e.args[0], leaves), *_SMOOTH[kind])
    raise NotImplementedError(f"error_bounds: no magnitude rule for {kind.__name__} in {e}")


def _add(terms: list[Bounded]) -> Bounded:
    return Bounded(sum(t.exact for t in terms), _nan_as_unbounded(sum(t.magnitude for t in terms)),
                   max(t.depth for t in terms) + len(terms) - 1)


def _product(a: Bounded, b: Bounded) -> Bounded:
    exact = a.exact * b.exact
    for scale, x in ((a, b), (b, a)):
        if _power_of_two(scale):
            return Bounded(exact, np.abs(scale.exact) * x.magnitude, x.depth)
    magnitude = _times(_carried(a), b) + _times(_carried(b), a) + np.abs(exact)
    return Bounded(exact, magnitude, max(a.depth, b.depth) + 1)


def _power(base: Bounded, exponent: sympy.Expr) -> Bounded:
    if not exponent.is_Number:
        raise NotImplementedError(f"error_bounds: no magnitude rule for a power of {exponent}")
    p = float(exponent)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = base.exact ** p
        slope = np.abs(p * base.exact ** (p - 1))
        magnitude = _nan_as_unbounded(slope * _carried(base) + np.abs(value))
    return Bounded(value, magnitude, base.depth + _power_roundings(exponent))


def _power_roundings(exponent: sympy.Expr) -> int:
    """Roundings of x**n as the code generator computes it (repeated squaring, a division)."""
    if exponent.is_Integer:
        n = abs(int(exponent))
        squarings_and_products = max(n.bit_length() - 1 + bin(n).count("1") - 1, 0)
        return squarings_and_products + (1 if exponent < 0 else 0)
    if abs(exponent) == sympy.Rational(1, 2):
        return 1 if exponent > 0 else 2
    return LIBRARY_ULPS


def _smooth(a: Bounded, function, slope, roundings: int) -> Bounded:
    """f(a): the argument's error through |f'(a)|, plus f's own rounding."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        value = function(a.exact)
        magnitude = _nan_as_unbounded(np.abs(slope(a.exact)) * _carried(a) + np.abs(value))
    return Bounded(value, magnitude, a.depth + roundings)


def _sigmoid(x):
    return NUMPY_FUNCTIONS["Sigmoid"](x)


_SMOOTH = {   # kind: (f, f', roundings)
    sympy.exp: (np.exp, np.exp, LIBRARY_ULPS),
    sympy.log: (np.log, lambda x: 1.0 / x, LIBRARY_ULPS),
    sympy.tanh: (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2, LIBRARY_ULPS),
    Sigmoid: (_sigmoid, lambda x: _sigmoid(x) * _sigmoid(-x), LIBRARY_ULPS + 2),   # 1 / (1 + exp(-x))
    Softplus: (NUMPY_FUNCTIONS["Softplus"], _sigmoid, 2 * LIBRARY_ULPS + 3),       # max + log(1 + exp(-|x|))
}


def _relu(a: Bounded) -> Bounded:
    surely_negative = (a.exact < 0) & ~a.unsure_sign()
    return Bounded(np.maximum(a.exact, 0.0), np.where(surely_negative, 0.0, a.magnitude), a.depth)


def _step(a: Bounded) -> Bounded:
    value = (a.exact > 0).astype(np.float64)
    return Bounded(value, np.where(a.unsure_sign(), np.inf, value), a.depth)


def _abs(a: Bounded) -> Bounded:
    return Bounded(np.abs(a.exact), a.magnitude, a.depth)


_KINKED = {Relu: _relu, Step: _step, sympy.Abs: _abs}


def _extreme(e, args: list[Bounded]) -> Bounded:
    """max/min move by at most their arguments' largest error."""
    pick = np.maximum if isinstance(e, sympy.Max) else np.minimum
    value, magnitude = args[0].exact, args[0].magnitude
    for arg in args[1:]:
        value, magnitude = pick(value, arg.exact), np.maximum(magnitude, arg.magnitude)
    return Bounded(value, magnitude, max(arg.depth for arg in args))


# Ops that only move values: a value's bound travels with it; pad's constant is held exactly,
# or with one rounding.
def _concat(node, operands, feeds, params) -> Bounded:
    axis = node.attrs["axis"]
    return Bounded(np.concatenate([x.exact for x in operands], axis),
                   np.concatenate([x.magnitude for x in operands], axis), max(x.depth for x in operands))


def _pad(node, operands, feeds, params) -> Bounded:
    (x,), value = operands, node.attrs["value"]
    magnitude = np.pad(x.magnitude, node.attrs["pad_width"], constant_values=abs(value))
    return Bounded(np.pad(x.exact, node.attrs["pad_width"], constant_values=value), magnitude,
                   max(x.depth, _held(np.float64(value)).depth))


RULES: dict[str, Callable] = {
    "input": _source,
    "param": _source,
    "constant": _constant,
    "fill": _fill,
    "one_hot": _one_hot,
    "dropout_mask": _dropout_mask,
    "reshape": _moves_values,
    "stop_gradient": _moves_values,
    "transpose": _moves_values,
    "broadcast_to": _moves_values,
    "slice": _moves_values,
    "concat": _concat,
    "pad": _pad,
    "sum": _reduction(_sum_terms),
    "avg_pool2d": _reduction(_window_area),
    "avg_pool2d_grad": _reduction(lambda node: _window_area(node) + 1),
    "max_pool2d": _max_pool,
    "max_pool2d_grad": _max_pool_grad,
    "matmul": _bilinear(_matmul_terms),
    "conv2d": _bilinear(_conv_terms),
    "conv2d_input_grad": _bilinear(_conv_input_grad_terms),
    "conv2d_weight_grad": _bilinear(_conv_weight_grad_terms),
    "ew": _elementwise,
    "softmax": _softmax,
    "softmax_cross_entropy": _softmax_cross_entropy,
}
