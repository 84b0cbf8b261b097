"""Random graphs built from the contract's ops, compiled, against the reference executor.

Hypothesis draws a graph (random shapes, strides, paddings, fan-out, broadcasting), its loss's
gradients w.r.t. every param are derived, and the compiled loss and gradients must match
`gc.evaluate`. The "ci" profile runs a few hundred graphs; HYPOTHESIS_PROFILE=thorough runs
thousands.
"""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import graphc as gc

from test_compile import assert_matches


class Builder:
    """Grows a random graph one op at a time from a pool of live tensors."""

    def __init__(self, draw, graph):
        self.draw, self.g = draw, graph
        self.params = 0

    def param(self, shape):
        self.params += 1
        return self.g.param(f"p{self.params}", shape)

    def dense_op(self, t):
        n, f = t.shape
        choice = self.draw(st.sampled_from(["linear", "act", "bias", "scale", "sum", "softmax", "transpose_mm"]))
        if choice == "linear":
            out = self.draw(st.integers(1, 9))
            return gc.linear(t, self.param((out, f)), self.param((out,)) if self.draw(st.booleans()) else None)
        if choice == "act":
            act = self.draw(st.sampled_from([gc.relu, gc.sigmoid, gc.tanh, lambda v: gc.exp(v * 0.3), lambda v: -v]))
            return act(t)
        if choice == "bias":
            shape = self.draw(st.sampled_from([(f,), (1, f), (n, 1), (n, f)]))
            return t + self.param(shape) if self.draw(st.booleans()) else t * self.param(shape)
        if choice == "scale":
            return (t * 0.5 + 1.0) / (gc.sigmoid(t) + 1.0)
        if choice == "sum":
            return gc.sum(t, axis=self.draw(st.sampled_from([0, 1])), keepdims=True) + t
        if choice == "softmax":
            return gc.softmax(t, axis=self.draw(st.sampled_from([0, 1, -1])))
        return t @ gc.transpose(self.param((self.draw(st.integers(1, 7)), f)))

    def image_op(self, t):
        n, c, h, w = t.shape
        choice = self.draw(st.sampled_from(["conv", "conv", "avg", "max", "act", "bias"]))
        if choice == "conv":
            kh, kw = self.draw(st.integers(1, 3)), self.draw(st.integers(1, 3))
            stride = self.draw(st.sampled_from([1, 2, (2, 1)]))
            padding = self.draw(st.sampled_from([0, 1, (1, 0), "valid", "full", "same"]))
            assume(not (padding == "same" and stride != 1))
            out = self.draw(st.integers(1, 4))
            try:
                return gc.conv2d(t, self.param((out, c, kh, kw)), self.param((out,)) if self.draw(st.booleans()) else None,
                                 stride=stride, padding=padding)
            except gc.ShapeError:
                assume(False)
        if choice in ("avg", "max"):
            kernel = self.draw(st.integers(1, 3))
            stride = self.draw(st.sampled_from([None, 1, 2]))
            padding = self.draw(st.integers(0, kernel // 2))
            pool = gc.avg_pool2d if choice == "avg" else gc.max_pool2d
            try:
                return pool(t, kernel, stride, padding)
            except gc.ShapeError:
                assume(False)
        if choice == "act":
            return self.draw(st.sampled_from([gc.relu, gc.tanh, gc.sigmoid]))(t)
        return t + self.param((c, 1, 1))


@st.composite
def random_programs(draw):
    g = gc.Graph("random")
    b = Builder(draw, g)
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(3, 9)), draw(st.integers(3, 9)))
        x = g.input("x", shape)
        t = x
        for _ in range(draw(st.integers(1, 3))):
            t = b.image_op(t)
        t = gc.global_avg_pool2d(t) if draw(st.booleans()) else gc.flatten(t)
    else:
        t = x = g.input("x", (draw(st.integers(1, 6)), draw(st.integers(1, 10))))
    pool = [t]
    for _ in range(draw(st.integers(1, 4))):
        source = draw(st.sampled_from(pool))                        # fan-out: reuse any earlier value
        pool.append(b.dense_op(source))
    out = pool[-1]
    extra = draw(st.sampled_from(pool))
    if extra.shape == out.shape and extra is not out:
        out = out + extra
    if draw(st.booleans()) and out.shape[1] > 1:
        labels = g.input("y", (out.shape[0],), dtype="int32")
        loss = gc.softmax_cross_entropy(out, labels)
    else:
        loss = gc.mean(out * out) + gc.sum(gc.sigmoid(out))
    assume(b.params > 0)
    return g, loss


@settings(max_examples=int(__import__("os").environ.get("GRAPHC_RANDOM_GRAPHS", "200")), deadline=None)
@given(random_programs(), st.integers(0, 2**16))
def test_random_graph_compiles_to_the_reference_values(program, seed):
    graph, loss = program
    rng = np.random.default_rng(seed)
    params = {name: (rng.standard_normal(p.shape) * 0.5).astype(np.float32) for name, p in graph.params.items()}
    feeds = {"x": rng.standard_normal(graph.inputs["x"].shape).astype(np.float32)}
    if "y" in graph.inputs:
        feeds["y"] = rng.integers(0, loss.inputs[0].shape[1], graph.inputs["y"].shape).astype(np.int32)
    outputs = [loss] + gc.grad(loss, list(graph.params.values()))
    reference32 = gc.evaluate(outputs, feeds, params)
    exact = gc.evaluate(outputs, feeds, params, dtype="float64")
    actual = gc.compile(outputs, params)(**feeds)
    largest = max(node.size for node in graph.nodes)
    for a, r32, r64, label in zip(actual, reference32, exact, ["loss"] + list(graph.params)):
        # Random graphs can be ill-conditioned (gradients through sums that cancel exactly, like
        # those of softmax - onehot): there any float32 evaluation is off. Native code must then
        # be as accurate as the float32 reference executor, measured against float64, or within
        # the rounding of such a sum: a softmax sums to 1 only to an ulp, and a gradient adds up
        # to `largest` of those cancelling terms (seen: 17 x 1.1e-7 where float64 gives 0).
        reference_error = float(np.abs(r32 - r64).max(initial=0.0))
        cancellation = 4 * np.finfo(np.float32).eps * largest
        assert_matches(a, r64, rtol=2e-4, atol=1e-6 + 2 * reference_error + cancellation, what=label)
