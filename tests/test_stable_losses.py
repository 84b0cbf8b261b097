"""Softmax, softmax cross-entropy and the logistic loss stay finite and exact for logits of
magnitude 100 (and 1000), in float32 and float64. The oracle is 50-digit mpmath arithmetic."""
import mpmath
import numpy as np
import pytest
from core_oracles import assert_gradients_match

import graphc as gc

mpmath.mp.dps = 50

LOGITS = np.array([[100.0, -100.0, 50.0, 0.0],
                   [-100.0, 100.0, 99.0, -3.0],
                   [-100.0, -100.0, -100.0, -99.5]])
LABELS = np.array([0, 2, 1], np.int32)


def mp_softmax_row(row):
    m = max(row)
    exps = [mpmath.exp(mpmath.mpf(v) - m) for v in row]
    total = mpmath.fsum(exps)
    return [e / total for e in exps]


def mp_cross_entropy(z, labels):
    losses = [-mpmath.log(mp_softmax_row(list(z[i]))[labels[i]]) for i in range(len(labels))]
    return float(mpmath.fsum(losses) / len(labels))


def mp_sigmoid(v):
    return 1 / (1 + mpmath.exp(-mpmath.mpf(v)))


def mp_logistic_loss(z, t):
    terms = [-mpmath.mpf(tt) * mpmath.log(mp_sigmoid(zz)) - (1 - mpmath.mpf(tt)) * mpmath.log(1 - mp_sigmoid(zz))
             for zz, tt in zip(z.ravel(), t.ravel())]
    return float(mpmath.fsum(terms) / z.size)


@pytest.mark.parametrize("scale", [1, 10])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_large_logits(dtype, scale):
    z = LOGITS * scale
    g = gc.Graph()
    zt = g.param("z", z.shape)
    loss = gc.softmax_cross_entropy(zt, g.input("y", (3,), dtype="int32"))
    value, dz = gc.evaluate([loss, gc.grad(loss, zt)], {"y": LABELS}, {"z": z.astype(dtype)}, dtype=dtype)
    assert np.isfinite(value) and np.isfinite(dz).all()
    tol = 1e-6 if dtype == "float32" else 1e-13
    expected = mp_cross_entropy(z, LABELS)
    assert abs(float(value) - expected) <= tol * abs(expected)
    expected_dz = np.array([[float((p - (j == LABELS[i])) / 3) for j, p in enumerate(mp_softmax_row(list(z[i])))]
                            for i in range(3)])
    np.testing.assert_allclose(dz, expected_dz, rtol=tol, atol=tol * 1e-3)


def test_softmax_cross_entropy_large_logits_finite_differences():
    assert_gradients_match(gc.softmax_cross_entropy, {"z": LOGITS * 1.01}, {"y": LABELS})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_large_logits(dtype):
    z = np.concatenate([LOGITS, LOGITS * 10])
    g = gc.Graph()
    zt = g.param("z", z.shape)
    p = gc.softmax(zt)
    w = np.linspace(-1, 1, z.size).reshape(z.shape)
    value, dz = gc.evaluate([p, gc.grad(gc.sum(p * g.input("w", z.shape)), zt)], {"w": w},
                           {"z": z.astype(dtype)}, dtype=dtype)
    assert np.isfinite(value).all() and np.isfinite(dz).all()
    expected = np.array([[float(v) for v in mp_softmax_row(list(row))] for row in z])
    tol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(value, expected, rtol=tol, atol=1e-30)
    # d/dz sum(w * softmax(z)) = p * (w - sum(w * p)); its terms are of the size of w (<= 1), so
    # float32 rounding shows as an absolute error of that scale
    expected_dz = expected * (w - (w * expected).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(dz, expected_dz, rtol=tol, atol=tol)


Z_BIG = np.array([[100.0, -100.0], [1000.0, -1000.0], [100.0, -100.0], [30.0, -0.5]])
T_BIG = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.3, 0.7]])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_binary_cross_entropy_large_logits(dtype):
    g = gc.Graph()
    zt = g.param("z", Z_BIG.shape)
    loss = gc.sigmoid_binary_cross_entropy(zt, g.input("t", T_BIG.shape))
    value, dz = gc.evaluate([loss, gc.grad(loss, zt)], {"t": T_BIG}, {"z": Z_BIG.astype(dtype)}, dtype=dtype)
    assert np.isfinite(value) and np.isfinite(dz).all()
    tol = 1e-6 if dtype == "float32" else 1e-13
    expected = mp_logistic_loss(Z_BIG, T_BIG)
    assert abs(float(value) - expected) <= tol * abs(expected)
    expected_dz = np.array([float((mp_sigmoid(z) - t) / Z_BIG.size) for z, t in zip(Z_BIG.ravel(), T_BIG.ravel())])
    np.testing.assert_allclose(dz.ravel(), expected_dz, rtol=tol, atol=1e-40)


def test_sigmoid_binary_cross_entropy_large_logits_finite_differences():
    assert_gradients_match(gc.sigmoid_binary_cross_entropy, {"z": Z_BIG[[0, 2, 3]] * 1.01}, {"t": T_BIG[[0, 2, 3]]})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_saturates_without_overflow(dtype):
    z = np.array([-1000.0, -100.0, 0.0, 100.0, 1000.0])
    g = gc.Graph()
    zt = g.param("z", z.shape)
    s = gc.sigmoid(zt)
    value, dz = gc.evaluate([s, gc.grad(gc.sum(s), zt)], {}, {"z": z.astype(dtype)}, dtype=dtype)
    expected = [float(mp_sigmoid(v)) for v in z]
    np.testing.assert_allclose(value, np.array(expected, dtype), rtol=1e-6, atol=0)
    # sigmoid' = s(1 - s), as PyTorch computes it: at z = 100, 1 - s rounds to 0 (the true value is 4e-44)
    expected_d = np.array([float(mp_sigmoid(v) * (1 - mp_sigmoid(v))) for v in z], dtype)
    np.testing.assert_allclose(dz, expected_d, rtol=1e-5, atol=1e-40)
