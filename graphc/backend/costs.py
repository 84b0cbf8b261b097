"""What each kernel costs: its FLOPs and the bytes it must move, by rules a hand count can check.

Profiles divide these by measured time (GFLOP/s, GB/s, % of the GEMM peak); the thread-count
choice weighs programs by their FLOPs. Every lowering takes its counts from here.

FLOPs count the arithmetic of the op's definition, not of one code path:

- A multiply-add is 2 FLOPs, and a reduction over n terms (a sum, a max, a dot product) costs n,
  accumulating from its identity: a GEMM is 2·M·N·K, a sum of x is x.size.
- Window ops count every tap of every window, padded taps included (the dense count every
  framework reports): a convolution and each of its gradients 2·(output elements)·C·kh·kw;
  pooling kh·kw per window, plus the average's one divide, plus, in a gradient, one op per
  window for spreading dy (the average's scale, the max's add to its winner).
- Elementwise work costs, per element, `sympy.count_ops` of its expressions after `sympy.cse`,
  fractions written as floats: each operation (a subtraction, a multiply by 9/10, a square
  root), comparison and function (exp, relu, sigmoid) is one FLOP, and a common subexpression
  counts once, as the kernel evaluates it once. Fused bias, ReLU, epilogues and prologues count
  the same as unfused, so fusion changes no program's total.
- Softmax: per element its max, subtract, exp, add and scale (5), per row one reciprocal.
  Cross-entropy: per logit max, subtract, exp, add (4); per row log and two subtracts (3) and
  its term of the mean (1); one divide for the mean.
- Moving data (copy, transpose, slice, pad, concat, fill, broadcast, one-hot) costs 0.
- The one count that is not floating point: the dropout mask is integer work (Philox) and
  counts its FLOP equivalents (`PHILOX_FLOPS_PER_ELEMENT`), so that the thread-count choice
  weighs its time.

Bytes (`bytes_moved`) are the least a kernel must move: each distinct buffer it reads, once, plus
each buffer it writes (its node's, its extra outputs' and its side writes'), once, at the dtype's size. Re-reads,
packing and scratch are not counted, so bytes / time is a lower bound of the traffic's rate.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import numpy as np
import sympy

__all__ = ["bytes_moved", "expression_flops", "elementwise_flops", "gemm_flops", "bias_relu_flops",
           "conv2d_flops", "avg_pool2d_flops", "max_pool2d_flops", "avg_pool2d_grad_flops",
           "max_pool2d_grad_flops", "sum_flops", "softmax_flops", "softmax_cross_entropy_flops",
           "dropout_mask_flops", "PHILOX_FLOPS_PER_ELEMENT"]


def bytes_moved(reads: Iterable, writes: Iterable) -> int:
    """Bytes of each distinct buffer in `reads` plus each in `writes` (nodes owning their
    buffers: callers resolve aliases such as reshapes first)."""
    def total(buffers) -> int:
        distinct = {buffer.id: buffer for buffer in buffers}.values()
        return sum(buffer.size * np.dtype(buffer.dtype).itemsize for buffer in distinct)
    return total(reads) + total(writes)


# ---- elementwise --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def expression_flops(exprs: tuple) -> int:
    """FLOPs per element of evaluating every expression of `exprs` together (their common
    subexpressions once)."""
    replacements, reduced = sympy.cse([_as_evaluated(e) for e in exprs],
                                      symbols=sympy.numbered_symbols("c", real=True))
    return int(sum(sympy.count_ops(value) for _, value in replacements) + sympy.count_ops(reduced))


def _as_evaluated(expr: sympy.Expr) -> sympy.Expr:
    """`expr` with its fractions as the floats the kernel multiplies by: count_ops counts 9*x/10
    as a multiply and a divide, and sqrt(x), x**(1/2), as a power and a divide, where the kernel
    does one operation (0.9*x, sqrt)."""
    return expr.xreplace({r: sympy.Float(r) for r in expr.atoms(sympy.Rational) if not r.is_Integer})


def elementwise_flops(elements: int, exprs: Sequence[sympy.Expr]) -> int:
    """`exprs` evaluated at each of `elements` elements (a kernel's output and side stores)."""
    return elements * expression_flops(tuple(exprs))


def bias_relu_flops(elements: int, bias: bool, relu: bool) -> int:
    """A bias add and a ReLU fused into a GEMM's or convolution's output."""
    return elements * (int(bias) + int(relu))


# ---- contractions -------------------------------------------------------------------------

def gemm_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def conv2d_flops(out_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """A conv2d with output `out_shape` (N, K, OH, OW) and weight `w_shape` (K, C, kh, kw); its
    input and weight gradients cost the same, with out_shape the shape of dy."""
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])


# ---- windows and reductions ---------------------------------------------------------------

def avg_pool2d_flops(windows: int, kernel: Sequence[int]) -> int:
    """kh·kw adds and a divide per window (output element)."""
    return windows * (math.prod(kernel) + 1)


def max_pool2d_flops(windows: int, kernel: Sequence[int]) -> int:
    """kh·kw comparisons per window."""
    return windows * math.prod(kernel)


def avg_pool2d_grad_flops(windows: int, kernel: Sequence[int]) -> int:
    """Per window of dy: dy scaled by 1/(kh·kw) once, then added to each of its kh·kw cells."""
    return windows * (1 + math.prod(kernel))


def max_pool2d_grad_flops(windows: int, kernel: Sequence[int]) -> int:
    """Per window of dy: kh·kw comparisons finding its winner, one add of dy to it."""
    return windows * (math.prod(kernel) + 1)


def sum_flops(terms: int) -> int:
    """One add per term summed, whatever the axes."""
    return terms


def softmax_flops(elements: int, rows: int) -> int:
    return 5 * elements + rows


def softmax_cross_entropy_flops(rows: int, classes: int) -> int:
    return 4 * rows * classes + 4 * rows + 1


# ---- integer work -------------------------------------------------------------------------

# One mask element takes as long as ~126 FLOPs of FMA chains (what thread_costs.py calibrates
# its seconds per FLOP on): about 37 integer lane operations (per Philox block and round, two
# 32x32->64-bit products, each two pmuludq on pairs of lanes, with the shifts and ors that split
# and rejoin them, and four xors), the products at half an FMA's throughput. The measurement is
# in bench/NOTES.md ("Dropout masks").
PHILOX_FLOPS_PER_ELEMENT = 128


def dropout_mask_flops(elements: int) -> int:
    """FLOP equivalents of a Philox dropout mask (it has no floating-point arithmetic)."""
    return PHILOX_FLOPS_PER_ELEMENT * elements
