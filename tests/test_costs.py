"""Each kernel's FLOPs and bytes (graphc/backend/costs.py) against counts made by hand, and the
profile that divides them by time.

The hand counts follow costs.py's rules: a multiply-add is 2 FLOPs, a reduction of n terms n,
window ops count every tap (padding included), elementwise expressions one FLOP per operation
and function; bytes are each buffer read once plus each written once, 4 per float32 or int32.
"""
import numpy as np
import pytest

import graphc as gc
from graphc.backend.costs import PHILOX_FLOPS_PER_ELEMENT
from graphc.backend.gemm_peak import gemm_peak_gflops


def the_step(fn, label, shape=None):
    """The one step of `fn` with this label (and node shape)."""
    found = [s for s in fn.steps if s.label == label and (shape is None or s.node.shape == shape)]
    assert len(found) == 1, [(s.label, s.node.shape) for s in fn.steps]
    return found[0]


def test_gemm():
    g = gc.Graph("gemm")
    a, b = g.input("a", (8, 16)), g.param("b", (16, 4))
    fn = gc.compile([a @ b], gc.init_params(g, seed=0))
    step = the_step(fn, "gemm")
    assert step.flops == 2 * 8 * 4 * 16
    assert step.bytes_moved == 4 * (8 * 16 + 16 * 4 + 8 * 4)


def test_gemm_with_bias_and_relu_epilogue():
    g = gc.Graph("linear")
    x, w, b = g.input("x", (8, 16)), g.param("w", (4, 16)), g.param("b", (4,))
    fn = gc.compile([gc.relu(gc.linear(x, w, b))], gc.init_params(g, seed=0))
    step = the_step(fn, "gemm+bias+relu")                    # w read transposed, in place
    assert step.flops == 2 * 8 * 4 * 16 + 8 * 4 + 8 * 4     # the product, one add, one max per output
    assert step.bytes_moved == 4 * (8 * 16 + 4 * 16 + 4 + 8 * 4)


def test_weight_gradient_gemm_with_adams_update_and_moments():
    g = gc.Graph("adam")
    x, y, w = g.input("x", (8, 16)), g.input("y", (8,), dtype="int32"), g.param("w", (4, 16))
    step = gc.compile_training_step(gc.softmax_cross_entropy(gc.linear(x, w), y), gc.init_params(g, seed=0),
                                    gc.Adam(lr=0.1))
    dw = the_step(step, "gemmT+ew+2 in place")
    # per weight: m' = 0.1 g + 0.9 m (2 multiplies, 1 add); v' = 0.001 g² + 0.999 v (a square, 2
    # multiplies, 1 add); w' = w - step_size·m' / (inv_bias2_sqrt·sqrt(v') + eps) (sqrt, 2
    # multiplies, add, divide, subtract)
    assert dw.flops == 2 * 4 * 16 * 8 + 4 * 16 * (3 + 4 + 6)
    # reads dlogits (8, 4), x, m, v, w and the two one-float slots; writes w, m and v
    assert dw.bytes_moved == 4 * (8 * 4 + 8 * 16 + 3 * 4 * 16 + 2) + 4 * 3 * 4 * 16


def test_conv_forward_with_bias_and_relu():
    g = gc.Graph("conv")
    x, w, b = g.input("x", (2, 3, 9, 9)), g.param("w", (4, 3, 3, 3)), g.param("b", (4,))
    fn = gc.compile([gc.relu(gc.conv2d(x, w, b, stride=2, padding=1))], gc.init_params(g, seed=0))
    step = the_step(fn, "conv2d+bias+relu")
    # output (2, 4, 5, 5): (9 + 2 - 3) // 2 + 1 = 5; each output 3·3·3 multiply-adds, then bias and relu
    assert step.node.shape == (2, 4, 5, 5)
    assert step.flops == 2 * (2 * 4 * 5 * 5) * (3 * 3 * 3) + 2 * (2 * 4 * 5 * 5)
    assert step.bytes_moved == 4 * (2 * 3 * 9 * 9 + 4 * 3 * 3 * 3 + 4 + 2 * 4 * 5 * 5)


def test_conv_input_and_weight_gradients():
    g = gc.Graph("convs")
    x, y = g.input("x", (2, 3, 8, 8)), g.input("y", (2,), dtype="int32")
    w1, w2, fc = g.param("w1", (4, 3, 3, 3)), g.param("w2", (5, 4, 3, 3)), g.param("fc", (10, 80))
    h1 = gc.relu(gc.conv2d(x, w1, padding=1))                  # (2, 4, 8, 8)
    h2 = gc.conv2d(h1, w2, stride=2, padding=1)                # (2, 5, 4, 4)
    loss = gc.softmax_cross_entropy(gc.linear(gc.flatten(h2), fc), y)
    step = gc.compile_training_step(loss, gc.init_params(g, seed=0), gc.SGD(lr=0.1))

    dx = next(s for s in step.steps if s.label.startswith("conv2d_input_grad"))
    # each of dy's 2·5·4·4 values meets each of 4·3·3 weights; ReLU's backward dy·step(h1)
    # (2 per element of dh1) when fused
    relu_backward = 2 * (2 * 4 * 8 * 8) if dx.label.endswith("+ew") else 0
    assert dx.flops == 2 * (2 * 5 * 4 * 4) * (4 * 3 * 3) + relu_backward
    assert dx.bytes_moved == 4 * (2 * 5 * 4 * 4 + 5 * 4 * 3 * 3 + (2 * 4 * 8 * 8 if relu_backward else 0)
                                  + 2 * 4 * 8 * 8)

    dw2 = the_step(step, "conv2d_weight_grad", (5, 4, 3, 3))
    assert dw2.flops == 2 * (2 * 5 * 4 * 4) * (4 * 3 * 3)
    assert dw2.bytes_moved == 4 * (2 * 4 * 8 * 8 + 2 * 5 * 4 * 4 + 5 * 4 * 3 * 3)
    dw1 = the_step(step, "conv2d_weight_grad", (4, 3, 3, 3))
    assert dw1.flops == 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    assert dw1.bytes_moved == 4 * (2 * 3 * 8 * 8 + 2 * 4 * 8 * 8 + 4 * 3 * 3 * 3)


def test_pooling_forward():
    g = gc.Graph("pools")
    x = g.input("x", (2, 3, 8, 8))
    fn = gc.compile([gc.avg_pool2d(x, 2), gc.max_pool2d(x, 3, stride=2, padding=1)], {})
    avg = the_step(fn, "avg_pool2d")
    assert avg.flops == (2 * 3 * 4 * 4) * (2 * 2 + 1)        # 4 adds and a divide per window
    assert avg.bytes_moved == 4 * (2 * 3 * 8 * 8 + 2 * 3 * 4 * 4)
    maximum = the_step(fn, "max_pool2d")
    # (8 + 2 - 3) // 2 + 1 = 4 windows a side, 9 comparisons each, padded taps included
    assert maximum.flops == (2 * 3 * 4 * 4) * (3 * 3)
    assert maximum.bytes_moved == 4 * (2 * 3 * 8 * 8 + 2 * 3 * 4 * 4)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooling_gradients(pool):
    g = gc.Graph("pool_grad")
    x, y = g.input("x", (2, 3, 8, 8)), g.input("y", (2,), dtype="int32")
    w, fc = g.param("w", (4, 3, 3, 3)), g.param("fc", (10, 64))
    h = gc.relu(gc.conv2d(x, w, padding=1))                           # (2, 4, 8, 8)
    pooled = gc.avg_pool2d(h, 2) if pool == "avg" else gc.max_pool2d(h, 3, stride=2, padding=1)  # (2, 4, 4, 4)
    loss = gc.softmax_cross_entropy(gc.linear(gc.flatten(pooled), fc), y)
    step = gc.compile_training_step(loss, gc.init_params(g, seed=0), gc.SGD(lr=0.1))

    dx = next(s for s in step.steps if s.label.startswith(f"{pool}_pool2d_grad"))
    relu_backward = 2 * (2 * 4 * 8 * 8) if dx.label.endswith("+ew") else 0
    extra_read = 2 * 4 * 8 * 8 if relu_backward else 0               # h, read by ReLU's backward
    if pool == "avg":
        # per window of dy: scaled by 1/4 once, added to its 4 cells
        assert dx.flops == (2 * 4 * 4 * 4) * (1 + 2 * 2) + relu_backward
        assert dx.bytes_moved == 4 * (2 * 4 * 4 * 4 + extra_read + 2 * 4 * 8 * 8)
    else:
        # per window of dy: 9 comparisons find its maximum, one add gives it dy; reads h (the
        # pooling's x, and ReLU's backward's operand: one buffer, read once) and dy
        assert dx.flops == (2 * 4 * 4 * 4) * (3 * 3 + 1) + relu_backward
        assert dx.bytes_moved == 4 * (2 * 4 * 8 * 8 + 2 * 4 * 4 * 4 + 2 * 4 * 8 * 8)


def test_an_elementwise_chain_is_one_kernel_costing_each_operation_once():
    g = gc.Graph("chain")
    a, b, c = (g.input(name, (8, 16)) for name in "abc")
    fn = gc.compile([gc.relu(a * b + c) - a], {})
    (step,) = fn.steps
    assert step.flops == 8 * 16 * 4                      # multiply, add, relu, subtract
    assert step.bytes_moved == 4 * (3 * 8 * 16 + 8 * 16)  # a read once though used twice


def test_a_common_subexpression_counts_once():
    g = gc.Graph("sigmoid_derivative")
    a = g.input("a", (8, 16))
    fn = gc.compile([gc.sigmoid(a) * (1 - gc.sigmoid(a))], {})
    (step,) = fn.steps
    assert step.flops == 8 * 16 * 3                      # sigmoid (once), subtract, multiply
    assert step.bytes_moved == 4 * (8 * 16 + 8 * 16)


def test_sums():
    g = gc.Graph("sums")
    a, b = g.input("a", (8, 16)), g.input("b", (8, 16))
    fn = gc.compile([gc.sum(a, axis=1)], {})
    step = the_step(fn, "sum")
    assert step.flops == 8 * 16
    assert step.bytes_moved == 4 * (8 * 16 + 8)
    fn = gc.compile([gc.sum(a * b, axis=1)], {})
    step = the_step(fn, "sum+ew")                        # the product computed as the sum reads it
    assert step.flops == 8 * 16 * (1 + 1)
    assert step.bytes_moved == 4 * (2 * 8 * 16 + 8)


def test_softmax_and_cross_entropy():
    g = gc.Graph("softmax")
    logits, labels = g.input("logits", (8, 10)), g.input("labels", (8,), dtype="int32")
    fn = gc.compile([gc.softmax(logits), gc.softmax_cross_entropy(logits, labels)], {})
    softmax = the_step(fn, "softmax")
    # per logit max, subtract, exp, add, scale; per row 1 / sum
    assert softmax.flops == 5 * 8 * 10 + 8
    assert softmax.bytes_moved == 4 * (8 * 10 + 8 * 10)
    loss = the_step(fn, "softmax_cross_entropy")
    # per logit max, subtract, exp, add; per row log, two subtracts, its add to the mean; the mean's divide
    assert loss.flops == 4 * 8 * 10 + 4 * 8 + 1
    assert loss.bytes_moved == 4 * (8 * 10 + 8) + 4


def test_moving_data_costs_bytes_only():
    g = gc.Graph("moves")
    a, b = g.input("a", (8, 3)), g.input("b", (8, 5))
    fn = gc.compile([gc.concat([a, b], axis=1), a], {})
    concat, copy = the_step(fn, "concat"), the_step(fn, "copy")
    assert concat.flops == copy.flops == 0
    assert concat.bytes_moved == 4 * (8 * 3 + 8 * 5 + 8 * 8)
    assert copy.bytes_moved == 4 * (8 * 3 + 8 * 3)


def test_dropout_mask_counts_flop_equivalents():
    g = gc.Graph("dropout")
    x = g.input("x", (8, 100))
    fn = gc.compile([gc.dropout(x, 0.25)], {})
    mask = the_step(fn, "dropout_mask")
    assert mask.flops == PHILOX_FLOPS_PER_ELEMENT * 8 * 100
    assert mask.bytes_moved == 4 * 2 + 4 * 8 * 100       # the key's two int32 words, the mask


# ---- the profile divides the same numbers by time ----------------------------------------------

def test_profile_reports_the_steps_costs_and_rates():
    g = gc.Graph("mlp")
    x, y = g.input("x", (64, 128)), g.input("y", (64,), dtype="int32")
    w1, w2 = g.param("w1", (256, 128)), g.param("w2", (10, 256))
    loss = gc.softmax_cross_entropy(gc.linear(gc.relu(gc.linear(x, w1)), w2), y)
    step = gc.compile_training_step(loss, gc.init_params(g, seed=0), gc.SGD(lr=0.1))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((64, 128), dtype=np.float32), "y": rng.integers(0, 10, 64).astype(np.int32)}
    report = step.profile(repeats=3, **feeds)
    assert report.gemm_peak_gflops is None and "%peak" not in str(report)
    for kernel, s in zip(report.kernels, step.steps):
        assert (kernel.label, kernel.flops, kernel.bytes_moved) == (s.label, s.flops, s.bytes_moved)
        if kernel.seconds > 0:
            assert kernel.gb_per_s == pytest.approx(s.bytes_moved / kernel.seconds / 1e9)
            assert kernel.gflop_per_s == (pytest.approx(s.flops / kernel.seconds / 1e9) if s.flops else None)

    with_peak = report.with_gemm_peak()
    assert with_peak.gemm_peak_gflops == gemm_peak_gflops(report.threads) > 0
    gemm = max(with_peak.kernels, key=lambda k: k.flops)
    assert with_peak.fraction_of_peak(gemm) == pytest.approx(gemm.gflop_per_s / with_peak.gemm_peak_gflops)
    text = str(with_peak)
    assert all(column in text.splitlines()[0] for column in ("µs", "%", "GFLOP/s", "GB/s", "%peak"))
    assert "GEMM peak" in text.splitlines()[-1]


def test_profile_with_peak_measures_it_on_the_profiles_threads():
    from graphc.backend.profile import profile
    g = gc.Graph("gemm")
    a, b = g.input("a", (32, 32)), g.param("b", (32, 32))
    fn = gc.compile([a @ b], gc.init_params(g, seed=0))
    report = profile(fn, {"a": np.ones((32, 32), np.float32)}, repeats=2, peak=True)
    assert report.gemm_peak_gflops == gemm_peak_gflops(report.threads)


def test_gemm_peak_is_measured_once_and_leaves_the_thread_setting_alone():
    threads = gc.get_num_threads()
    first = gemm_peak_gflops(1)
    assert first > 0 and gemm_peak_gflops(1) == first
    assert gc.get_num_threads() == threads
    with pytest.raises(ValueError, match="positive int"):
        gemm_peak_gflops(0)
