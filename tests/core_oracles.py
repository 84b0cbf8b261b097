"""Independent formulations the symbolic-core tests compare graphc against.

Nothing here calls graphc's numpy semantics: convolution and pooling are direct loops over
output positions with explicit bounds checks (no np.pad, no sliding windows), the losses are
the textbook formulas, and gradients are (extrapolated) central finite differences of
`gc.evaluate` in float64.
"""
from __future__ import annotations

import math

import numpy as np

import graphc as gc

# ---- geometry, as PyTorch defines it ----------------------------------------------------------


def torch_same_pads(k: int) -> tuple[int, int]:
    """PyTorch's padding="same" (stride 1): total k-1, the smaller half before, the rest after."""
    total = k - 1
    before = total // 2
    return before, total - before


def explicit_pads(padding, kh: int, kw: int):
    """((top, bottom), (left, right)) for every padding spelling of the contract."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        return torch_same_pads(kh), torch_same_pads(kw)
    if padding == "full":
        return (kh - 1, kh - 1), (kw - 1, kw - 1)
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    ph, pw = padding
    return (ph, ph), (pw, pw)


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# ---- convolution and pooling by explicit loops -----------------------------------------------


def conv2d_loop(x, w, b=None, stride=1, pads=((0, 0), (0, 0))):
    """Cross-correlation, one output cell at a time; out-of-range input cells read as zero."""
    n_, c_, h, wd = x.shape
    o_, c2, kh, kw = w.shape
    assert c_ == c2
    sh, sw = as_pair(stride)
    (pt, pb), (pl, pr) = pads
    oh = (h + pt + pb - kh) // sh + 1
    ow = (wd + pl + pr - kw) // sw + 1
    out = np.zeros((n_, o_, oh, ow), dtype=np.float64)
    for n in range(n_):
        for o in range(o_):
            for oy in range(oh):
                for ox in range(ow):
                    acc = 0.0 if b is None else float(b[o])
                    for c in range(c_):
                        for i in range(kh):
                            iy = oy * sh + i - pt
                            if not 0 <= iy < h:
                                continue
                            for j in range(kw):
                                ix = ox * sw + j - pl
                                if 0 <= ix < wd:
                                    acc += float(x[n, c, iy, ix]) * float(w[o, c, i, j])
                    out[n, o, oy, ox] = acc
    return out


def _pool_windows(x_shape, kernel, stride, padding):
    """Yield (n, c, oy, ox, [(iy, ix) of the real cells in the window, in scan order])."""
    n_, c_, h, wd = x_shape
    kh, kw = as_pair(kernel)
    sh, sw = as_pair(kernel if stride is None else stride)
    ph, pw = as_pair(padding)
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (wd + 2 * pw - kw) // sw + 1
    for n in range(n_):
        for c in range(c_):
            for oy in range(oh):
                for ox in range(ow):
                    cells = [(oy * sh + i - ph, ox * sw + j - pw) for i in range(kh) for j in range(kw)]
                    yield n, c, oy, ox, [(iy, ix) for iy, ix in cells if 0 <= iy < h and 0 <= ix < wd]
    return oh, ow


def pooled_hw(x_shape, kernel, stride, padding):
    kh, kw = as_pair(kernel)
    sh, sw = as_pair(kernel if stride is None else stride)
    ph, pw = as_pair(padding)
    return (x_shape[2] + 2 * ph - kh) // sh + 1, (x_shape[3] + 2 * pw - kw) // sw + 1


def avg_pool_loop(x, kernel, stride=None, padding=0):
    """Sum of the real cells divided by the full kernel area (padding counts as zeros)."""
    kh, kw = as_pair(kernel)
    out = np.zeros(x.shape[:2] + pooled_hw(x.shape, kernel, stride, padding))
    for n, c, oy, ox, cells in _pool_windows(x.shape, kernel, stride, padding):
        out[n, c, oy, ox] = math.fsum(float(x[n, c, iy, ix]) for iy, ix in cells) / (kh * kw)
    return out


def max_pool_loop(x, kernel, stride=None, padding=0):
    """Max over the real cells only: padding never wins."""
    out = np.zeros(x.shape[:2] + pooled_hw(x.shape, kernel, stride, padding))
    for n, c, oy, ox, cells in _pool_windows(x.shape, kernel, stride, padding):
        out[n, c, oy, ox] = max(float(x[n, c, iy, ix]) for iy, ix in cells)
    return out


def max_pool_grad_loop(x, g, kernel, stride=None, padding=0):
    """Each output gradient goes to the first maximal real cell in scan order (PyTorch's rule)."""
    dx = np.zeros(x.shape)
    for n, c, oy, ox, cells in _pool_windows(x.shape, kernel, stride, padding):
        best = None
        for iy, ix in cells:
            if best is None or x[n, c, iy, ix] > x[n, c, best[0], best[1]]:
                best = (iy, ix)
        dx[n, c, best[0], best[1]] += g[n, c, oy, ox]
    return dx


# ---- losses, written plainly -------------------------------------------------------------------


def logsumexp_rows(z):
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def softmax_cross_entropy_plain(z, labels):
    z = np.asarray(z, np.float64)
    return float(np.mean(logsumexp_rows(z) - z[np.arange(len(labels)), labels]))


def sigmoid_bce_textbook(z, t):
    s = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
    return float(np.mean(-t * np.log(s) - (1 - t) * np.log(1 - s)))


# ---- comparing numbers ------------------------------------------------------------------------


def rel_err(actual, expected) -> float:
    """Largest absolute difference relative to the largest magnitude of the expected values."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = float(np.max(np.abs(actual - expected), initial=0.0))
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-12)
    return diff / scale


def numeric_grad(f, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Finite differences of the scalar function f at x (float64), entry by entry: central
    differences at steps eps and 2·eps, Richardson-extrapolated.

    One central difference errs by eps²·f'''/6, which a steep function makes large: at x = 1.65
    exp(exp(exp(x))) has f'''/f' near 1e6, and its exact gradient seemed 1.4e-6 off. Combining
    (4·D(eps) - D(2·eps)) / 3 cancels that term, leaving one in eps⁴; rounding (1e-16 |f| / eps)
    stays near 1e-11 at eps = 1e-5."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        gflat[i] = (4 * _central_difference(f, x, flat, i, eps) - _central_difference(f, x, flat, i, 2 * eps)) / 3
    return grad


def _central_difference(f, x, flat, i, step) -> float:
    """(f(x + step·e_i) - f(x - step·e_i)) / 2·step, with x restored after (flat views x)."""
    orig = flat[i]
    flat[i] = orig + step
    plus = f(x)
    flat[i] = orig - step
    minus = f(x)
    flat[i] = orig
    return (plus - minus) / (2 * step)


def _declare(graph, name, value, differentiable):
    value = np.asarray(value)
    if value.dtype.kind in "iu":
        return graph.input(name, value.shape, dtype="int32")
    if differentiable:
        return graph.param(name, value.shape)
    return graph.input(name, value.shape)


def check_op_gradients(build, values: dict, constants: dict | None = None, seed: int = 0,
                       eps: float = 1e-5) -> dict[str, float]:
    """Build `build(**tensors)` from float params `values` (and non-differentiated `constants`:
    int labels, float targets), reduce it to a scalar with fixed random weights, and compare
    `gc.grad` (evaluated in float64) with central finite differences of every entry of every
    param. Returns the relative error per param and checks each gradient's shape."""
    constants = constants or {}
    graph = gc.Graph("gradcheck")
    tensors = {name: _declare(graph, name, v, True) for name, v in values.items()}
    tensors.update({name: _declare(graph, name, v, False) for name, v in constants.items()})
    out = build(*tensors.values())
    weights = np.random.default_rng(seed + 1000).uniform(0.5, 1.5, size=out.shape)
    loss = gc.sum(out * graph.constant(weights, dtype=out.dtype)) if out.shape else out * 1.3
    params = {name: np.asarray(v, np.float64) for name, v in values.items()}
    feeds = {name: np.asarray(v) for name, v in constants.items()}
    wrt = [tensors[name] for name in values]
    grads = gc.grad(loss, wrt)
    analytic = gc.evaluate(grads, feeds, params, dtype="float64")
    errors = {}
    for name, g in zip(values, analytic):
        assert g.shape == params[name].shape, f"gradient of {name} has shape {g.shape}, not {params[name].shape}"

        def loss_at(v, name=name):
            return float(gc.evaluate(loss, feeds, {**params, name: v}, dtype="float64"))

        errors[name] = rel_err(g, numeric_grad(loss_at, params[name], eps))
    return errors


def assert_gradients_match(build, values, constants=None, tol=1e-6, **kw):
    errors = check_op_gradients(build, values, constants, **kw)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"relative gradient errors above {tol}: {bad}"
    return errors


def evaluate64(outputs, feeds=None, params=None):
    return gc.evaluate(outputs, feeds or {}, params or {}, dtype="float64")


def away_from_zero(x, margin=0.1):
    """Push values at least `margin` away from 0 (keeps finite differences off ReLU's kink)."""
    return np.where(x >= 0, x + margin, x - margin)


def distinct_values(rng, shape, spacing=0.05):
    """A random permutation of well-separated values: no ties, no near-ties for max pooling."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * spacing - size * spacing / 2).reshape(shape)
