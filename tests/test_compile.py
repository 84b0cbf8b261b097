"""Compiled programs against the numpy reference executor: whole networks, gradients, training
steps, feed validation and parameter binding."""
import contextlib
import dataclasses
import tempfile

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as gc_runtime
from graphc.tools import models


def assert_matches(actual, expected, rtol=1e-4, what="", atol=0.0):
    """Agreement to float32 rounding: errors measured against the largest reference magnitude.

    `atol` covers values that are exactly zero in the reference but sums of cancelling terms
    natively (e.g. gradients through a softmax along a length-1 axis)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, what
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-6)
    error = float(np.abs(actual - expected).max(initial=0.0))
    assert error <= rtol * scale + atol, f"{what}: error {error:.3e}, relative {error / scale:.3e}"


NETWORKS = {
    "logistic": lambda: models.logistic_regression(16, 64),
    "softmax_regression": lambda: models.softmax_regression(16),
    "mlp": lambda: models.mlp(8),
    "lenet5": lambda: models.lenet5(4),
    "small_convnet": lambda: models.small_convnet(3),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_loss_and_gradients_match_reference(name):
    model = NETWORKS[name]()
    params = gc.init_params(model.graph, seed=1)
    for value in params.values():
        if value.ndim == 1:
            value[:] = np.linspace(-0.1, 0.1, value.size)   # non-zero biases exercise the epilogues
    feeds = models.random_batch(model, np.random.default_rng(2))
    wrt = list(model.graph.params.values())
    outputs = [model.loss, model.logits] + gc.grad(model.loss, wrt)
    compiled = gc.compile(outputs, params)
    expected = gc.evaluate(outputs, feeds, params)
    for value, reference, label in zip(compiled(**feeds), expected, ["loss", "logits"] + [p.name for p in wrt]):
        assert_matches(value, reference, what=f"{name} {label}")


def reference_sgd(model, params, batches, lr, momentum, weight_decay, nesterov=False):
    """The same steps with the reference executor and torch.optim.SGD's update rule, in numpy."""
    names = list(params)
    params = {k: v.copy() for k, v in params.items()}
    grads = gc.grad(model.loss, [model.graph.params[n] for n in names])
    buffers = {n: np.zeros_like(params[n]) for n in names}
    losses = []
    for feeds in batches:
        values = gc.evaluate([model.loss] + grads, feeds, params)
        losses.append(float(values[0]))
        for n, g in zip(names, values[1:]):
            d = g + weight_decay * params[n]
            if momentum:
                buffers[n] = momentum * buffers[n] + d
                d = d + momentum * buffers[n] if nesterov else buffers[n]
            params[n] = (params[n] - lr * d).astype(np.float32)
    return losses, params


@pytest.mark.parametrize("name", ["softmax_regression", "mlp", "lenet5", "small_convnet"])
def test_ten_training_steps_with_momentum_and_weight_decay_match_reference(name):
    model = NETWORKS[name]()
    params = gc.init_params(model.graph, seed=3)
    rng = np.random.default_rng(4)
    batches = [models.random_batch(model, rng) for _ in range(10)]
    expected_losses, expected_params = reference_sgd(model, params, batches, lr=0.05, momentum=0.9,
                                                     weight_decay=1e-3)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3))
    losses = [step(**feeds) for feeds in batches]
    assert isinstance(losses[0], float)
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-4)
    for n in params:
        assert_matches(params[n], expected_params[n], rtol=2e-4, what=n)


def test_training_step_plain_sgd_and_nesterov():
    model = models.mlp(4, sizes=(20, 16, 3))
    for optimizer in (gc.SGD(lr=0.1), gc.SGD(lr=0.1, momentum=0.5, nesterov=True)):
        params = gc.init_params(model.graph, seed=5)
        batches = [models.random_batch(model, np.random.default_rng(i)) for i in range(5)]
        expected_losses, expected_params = reference_sgd(model, params, batches, optimizer.lr, optimizer.momentum,
                                                         optimizer.weight_decay, optimizer.nesterov)
        step = gc.compile_training_step(model.loss, params, optimizer)
        np.testing.assert_allclose([step(**f) for f in batches], expected_losses, rtol=2e-4)
        for n in params:
            assert_matches(params[n], expected_params[n], rtol=2e-4, what=n)


def test_training_step_leaves_the_users_graph_alone():
    model = models.mlp(4, sizes=(20, 16, 3))
    before = len(model.graph.nodes)
    gc.compile_training_step(model.loss, gc.init_params(model.graph), gc.SGD(lr=0.1))
    assert len(model.graph.nodes) == before


def test_params_are_bound_without_copy():
    model = models.softmax_regression(4, features=8, classes=3)
    params = gc.init_params(model.graph, seed=0)
    predict = gc.compile([model.logits], params)
    feeds = models.random_batch(model, np.random.default_rng(0))
    before = predict(x=feeds["x"])[0]
    params["b"][:] = 5.0
    after = predict(x=feeds["x"])[0]
    assert_matches(after, before + 5.0)


def test_outputs_are_fresh_arrays_owned_by_the_caller():
    model = models.softmax_regression(4, features=8, classes=3)
    fn = gc.compile([model.logits], gc.init_params(model.graph))
    x = np.ones((4, 8), np.float32)
    first = fn(x=x)[0]
    second = fn(x=x)[0]
    assert first is not second and not np.shares_memory(first, second)


def test_single_tensor_gives_single_array_and_outputs_that_alias():
    g = gc.Graph("alias")
    x = g.input("x", (2, 3))
    w = g.param("w", (2, 3))
    y = gc.reshape(x * w, (3, 2))
    params = {"w": np.full((2, 3), 2.0, np.float32)}
    fn = gc.compile([y, x, w, y], params)
    xv = np.arange(6, dtype=np.float32).reshape(2, 3)
    y1, x1, w1, y2 = fn(x=xv)
    assert_matches(y1, (xv * 2).reshape(3, 2))
    assert_matches(y2, y1)
    assert_matches(x1, xv)
    assert_matches(w1, params["w"])
    single = gc.compile(y, params)(x=xv)
    assert isinstance(single, np.ndarray) and single.shape == (3, 2)


def test_feed_validation_happens_before_native_code():
    model = models.softmax_regression(4, features=8, classes=3)
    fn = gc.compile([model.loss], gc.init_params(model.graph))
    good = {"x": np.zeros((4, 8), np.float32), "y": np.zeros(4, np.int32)}
    fn(**good)
    cases = [
        ({"x": good["x"]}, "y"),                                            # missing
        ({**good, "z": good["x"]}, "z"),                                    # extra
        ({**good, "x": np.zeros((4, 9), np.float32)}, "x"),                 # shape
        ({**good, "y": np.zeros(4, np.float32)}, "y"),                      # kind
        ({**good, "x": np.zeros((4, 8), np.int32)}, "x"),                   # kind
        ({**good, "y": np.array([0, 1, 2, 3], np.int32)}, "y"),             # label out of range
        ({**good, "y": np.array([0, -1, 2, 1], np.int32)}, "y"),
    ]
    for feeds, name in cases:
        with pytest.raises(ValueError, match=repr(name)):
            fn(**feeds)


def test_non_contiguous_and_float64_inputs_are_accepted():
    model = models.softmax_regression(4, features=8, classes=3)
    params = gc.init_params(model.graph)
    fn = gc.compile([model.logits], params)
    x = np.random.default_rng(0).standard_normal((8, 4)).T       # float64, Fortran order
    expected = gc.evaluate(model.logits, {"x": x.astype(np.float32)}, params)
    assert_matches(fn(x=x)[0], expected)


def test_compile_rejects_missing_params():
    model = models.softmax_regression(4, features=8, classes=3)
    with pytest.raises(ValueError, match="'b'"):
        gc.compile([model.logits], {"w": np.zeros((3, 8), np.float32)})


def test_compiled_function_exposes_graph_and_llvm_ir():
    model = models.mlp(4, sizes=(20, 16, 3))
    fn = gc.compile([model.loss], gc.init_params(model.graph))
    assert "define" in fn.llvm_ir and "graphc_entry" in fn.llvm_ir
    listing = str(fn.graph)
    assert "softmax_cross_entropy" in listing
    assert "gemm" in fn.describe()


def test_gemm_epilogue_fuses_bias_and_relu():
    model = models.mlp(4, sizes=(20, 16, 3))
    fn = gc.compile([model.logits], gc.init_params(model.graph))
    labels = [step.label for step in fn.steps]
    assert labels == ["gemm+bias+relu", "gemm+bias"], labels


def test_sum_of_two_products_keeps_both_products():
    """Each matmul of `a @ w1 + a @ w2` could take the sum as its bias epilogue; only one may."""
    g = gc.Graph("two_products")
    a = g.input("a", (1, 5))
    w1, w2 = g.param("w1", (5, 3)), g.param("w2", (5, 3))
    y = a @ w1 + a @ w2
    params = gc.init_params(g, seed=0)
    av = np.arange(5, dtype=np.float32).reshape(1, 5)
    assert_matches(gc.compile(y, params)(a=av), av @ params["w1"] + av @ params["w2"])


def test_sgd_update_fuses_into_the_weight_gradient_gemm():
    model = models.mlp(8, sizes=(20, 16, 3))
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1, weight_decay=0.01))
    labels = [s.label for s in step.steps]
    assert sum(label.startswith("gemmT") and label.endswith("+ew") for label in labels) == 2, labels


def test_sgd_update_stays_apart_from_a_gemm_with_several_k_blocks():
    """With several K blocks a GEMM's C holds partial sums until the last one, so an update of
    W from C fused in place would read them: a batch of 3000 (K of the weight gradients, more
    than one block on any host; 16 and 13 output rows, more than two row tiles, so B is packed)
    keeps the updates as kernels of their own, and they are right."""
    model = models.mlp(3000, sizes=(20, 16, 13))
    params = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(1))
    names = list(params)
    before = {name: value.copy() for name, value in params.items()}
    grads = gc.evaluate(gc.grad(model.loss, [model.graph.params[n] for n in names]), feeds, before)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1))
    assert not any(s.label.startswith("gemmT") and s.label.endswith("+ew") for s in step.steps)
    step(**feeds)
    for name, grad in zip(names, grads):
        assert_matches(params[name], before[name] - 0.1 * grad)


@pytest.mark.parametrize("pool, kernel, stride, padding, image", [
    ("avg", 2, 2, 0, (8, 16)),   # LeNet's: windows tile the image (epilogue on each vector)
    ("avg", 2, 2, 0, (7, 9)),    # ... but for a ragged edge (epilogue over the finished plane)
    ("avg", 3, 2, 1, (7, 9)),    # overlapping windows, padding
    ("max", 2, 2, 0, (7, 9)),
    ("max", 2, 2, 0, (8, 16)),   # the conv net's: 2x2 windows over rows of whole vectors
    ("max", 3, 1, 1, (7, 9)),
])
def test_relu_backward_fuses_into_the_pooling_gradient(pool, kernel, stride, padding, image):
    """relu -> pool: the backward's x1*Step(x0) becomes the pooling gradient's epilogue, and the
    fused kernel's gradients match the reference."""
    g = gc.Graph("relu_pool")
    x = g.input("x", (3, 2) + image)
    w = g.param("w", (4, 2, 3, 3))
    h = gc.relu(gc.conv2d(x, w, padding="same"))
    pooled = (gc.avg_pool2d if pool == "avg" else gc.max_pool2d)(h, kernel, stride=stride, padding=padding)
    loss = gc.sum(pooled * pooled)
    params = gc.init_params(g, seed=3)
    feeds = {"x": np.random.default_rng(4).standard_normal((3, 2) + image).astype(np.float32)}
    fn = gc.compile(gc.grad(loss, w), params)
    assert f"{pool}_pool2d_grad+ew" in [step.label for step in fn.steps]
    assert_matches(fn(**feeds), gc.evaluate(gc.grad(loss, w), feeds, params))


@pytest.mark.parametrize("image", [(8, 8), (7, 9)])
def test_relu_backward_fuses_into_the_conv_input_gradient(image):
    """conv -> relu -> conv: the second conv's input gradient takes ReLU's backward as its
    epilogue, and the gradients of both convs' weights match the reference."""
    g = gc.Graph("relu_conv")
    x = g.input("x", (3, 2) + image)
    w1, w2 = g.param("w1", (4, 2, 3, 3)), g.param("w2", (5, 4, 3, 3))
    h = gc.relu(gc.conv2d(x, w1, padding="same"))
    y = gc.conv2d(h, w2, padding="same")
    loss = gc.sum(y * y)
    params = gc.init_params(g, seed=5)
    feeds = {"x": np.random.default_rng(6).standard_normal((3, 2) + image).astype(np.float32)}
    grads = gc.grad(loss, [w1, w2])
    fn = gc.compile(grads, params)
    assert "conv2d_input_grad+ew" in [step.label for step in fn.steps]
    for got, expected in zip(fn(**feeds), gc.evaluate(grads, feeds, params)):
        assert_matches(got, expected)


@pytest.mark.parametrize("layer", ["conv", "max_pool", "avg_pool"])
def test_training_an_input_through_a_fusing_kernel_updates_it_from_its_old_values(layer):
    """The param fed to a conv input gradient or a pooling gradient is also the operand of its
    SGD update: fused into that kernel and written in place, the update would read values it
    has already overwritten. The update must equal old - lr * grad."""
    g = gc.Graph("train_input")
    image = g.param("image", (2, 3, 8, 8))
    if layer == "conv":
        y = gc.conv2d(image, g.param("w", (4, 3, 3, 3)), padding="same")
    elif layer == "max_pool":
        y = gc.max_pool2d(image, 3, stride=1, padding=1)
    else:
        y = gc.avg_pool2d(image, 3, stride=1, padding=1)
    loss = gc.sum(y * y)
    params = gc.init_params(g, seed=7)
    params["image"] = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = {name: value.copy() for name, value in params.items()}
    expected = before["image"] - 0.01 * gc.evaluate(gc.grad(loss, image), {}, before)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.01))
    step()
    assert_matches(params["image"], expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bad_label", [10, -1, 2**31 - 1])
def test_out_of_range_labels_are_refused_before_any_kernel_runs(splitting_pays, threads, bad_label):
    """The entry checks the labels first: a wrong one raises ValueError naming the input and its
    range, and leaves the params (trained in place) and the momentum untouched."""
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        model = models.mlp(64)
        params = gc.init_params(model.graph, seed=0)
        step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1, momentum=0.9))
        feeds = models.random_batch(model, np.random.default_rng(0))
        step(**feeds)
        before = {name: value.copy() for name, value in {**params, **step.state}.items()}
        labels = feeds["y"].copy()
        labels[37] = bad_label
        with pytest.raises(ValueError, match=r"input 'y': values must lie in the valid range \[0, 10\)"):
            step(**{**feeds, "y": labels})
        with pytest.raises(ValueError, match=r"input 'y'"):
            step._program(**{**feeds, "y": labels})
        for name, value in {**params, **step.state}.items():
            np.testing.assert_array_equal(value, before[name], err_msg=name)
        assert np.isfinite(step(**feeds))  # and the next good call runs
    finally:
        gc.set_num_threads(previous)


def test_threads_only_where_this_hosts_costs_say_splitting_pays(monkeypatch):
    """The thread count comes from the host's measured costs (thread_costs.py), injected here:
    with cheap fork/join and barriers the softmax regression at B = 64 (2.0 MFLOP) runs on two
    threads and W5 (0.02 MFLOP) on one; with costly ones both run on one. Either way the step
    computes the reference's update."""
    from graphc.backend import thread_costs
    cheap = thread_costs.ThreadCosts(flop_s=1e-11, fork_join_s={2: 2e-6}, barrier_s={2: 2e-7}, efficiency={2: 0.9})
    costly = dataclasses.replace(cheap, fork_join_s={2: 1e-4})
    previous = gc.get_num_threads()
    gc.set_num_threads(2)
    try:
        for costs, expected in [(cheap, (1, 2)), (costly, (1, 1))]:
            monkeypatch.setattr(thread_costs, "measured_thread_costs", lambda requested, costs=costs: costs)
            for model, threads in zip([models.logistic_regression(64, 64), models.softmax_regression(64, 784, 10)],
                                      expected):
                params = gc.init_params(model.graph, seed=0)
                feeds = models.random_batch(model, np.random.default_rng(0))
                grads = gc.grad(model.loss, [model.graph.params[n] for n in params])
                values = gc.evaluate(grads, feeds, params)
                expected_params = {n: params[n] - 0.1 * g for n, g in zip(params, values)}
                with _empty_program_cache(monkeypatch):
                    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1))
                assert step.num_threads == threads
                step(**feeds)
                for name in params:
                    assert_matches(params[name], expected_params[name])
    finally:
        gc.set_num_threads(previous)


@contextlib.contextmanager
def _empty_program_cache(monkeypatch):
    """Compile afresh: the disk cache holds programs compiled with other thread counts."""
    from graphc.backend import compiler
    with tempfile.TemporaryDirectory() as directory:
        monkeypatch.setattr(compiler, "_cache", gc_runtime.ObjectCache(directory))
        yield


def test_compiling_changes_no_interpreter_setting_unless_asked_with_fast_compile(tmp_path, monkeypatch):
    import gc as cyclic_gc
    import sys

    from graphc.backend import compiler
    monkeypatch.setattr(compiler, "_cache", gc_runtime.ObjectCache(tmp_path))   # every step below is compiled
    model = models.logistic_regression(8, 4)
    seen = []
    from graphc.core import autodiff
    original_grad = autodiff.grad

    def grad_seeing_settings(*args, **kwargs):
        seen.append((cyclic_gc.isenabled(), sys.getswitchinterval()))
        return original_grad(*args, **kwargs)

    interval = sys.getswitchinterval()
    assert cyclic_gc.isenabled()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autodiff, "grad", grad_seeing_settings)
        gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
        assert seen == [(True, interval)]
        other = models.logistic_regression(9, 4)    # another program: its gradient is built
        with gc.fast_compile():
            gc.compile_training_step(other.loss, gc.init_params(other.graph, seed=1), gc.SGD(lr=0.1))
        assert seen[1][0] is False and seen[1][1] < interval
        assert cyclic_gc.isenabled() and sys.getswitchinterval() == interval
        cyclic_gc.disable()        # the user's choice is kept
        try:
            with gc.fast_compile():
                gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=2), gc.SGD(lr=0.1))
            assert not cyclic_gc.isenabled()
        finally:
            cyclic_gc.enable()
    with pytest.raises(ValueError, match="scalar"):
        with gc.fast_compile():
            gc.compile_training_step(model.y, {}, gc.SGD(lr=0.1))
    assert cyclic_gc.isenabled() and sys.getswitchinterval() == interval   # restored after an error too


# "_lock" is a name of the fast call's own code: such an input takes the dict call.
@pytest.mark.parametrize("input_name", ["x", "lock", "type", "min", "_lock"])
def test_training_step_takes_feeds_as_keywords_with_the_same_checks(input_name):
    import inspect
    g = gc.Graph("keywords")
    x = g.input(input_name, (4, 3))
    w = g.param("w", (3, 2))
    loss = gc.sum(gc.relu(x @ w))
    params = {"w": np.full((3, 2), 0.5, np.float32)}
    feed = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    expected_loss = gc.evaluate(loss, {input_name: feed}, params)
    expected_w = params["w"] - 0.1 * gc.evaluate(gc.grad(loss, w), {input_name: feed}, params)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    assert isinstance(step, gc.CompiledTrainingStep)
    fast = not input_name.startswith("_")
    assert (list(inspect.signature(step).parameters)[0] == input_name) == fast
    assert_matches(step(**{input_name: feed}), expected_loss)
    assert_matches(params["w"], expected_w)
    with pytest.raises(ValueError, match=f"missing input '{input_name}'"):
        step()
    with pytest.raises(ValueError, match="unexpected input 'z'"):
        step(**{input_name: feed, "z": feed})
    with pytest.raises(ValueError, match=rf"input '{input_name}': expected shape \(4, 3\)"):
        step(**{input_name: feed[:2]})
    with pytest.raises(TypeError):
        step(feed)


def test_a_shared_override_may_be_entered_again_while_it_restores():
    """What a finalizer does when the GC, resumed by the last compile's exit, collects at once
    (still under the override's lock) and the finalizer compiles: deterministically here."""
    import threading

    from graphc.backend.interpreter_settings import SharedOverride

    events = []

    def restore(saved):
        events.append(("restore", saved))
        if "nested" not in events:   # the "finalizer": a whole nested use, on the same thread
            with override:
                events.append("nested")

    override = SharedOverride(lambda: len(events), restore)

    def use():
        with override:
            events.append("outer")

    user = threading.Thread(target=use, daemon=True)
    user.start()
    user.join(timeout=10)
    assert not user.is_alive(), "deadlocked re-entering the override from its own restore"
    assert events == ["outer", ("restore", 0), "nested", ("restore", 2)]


def test_a_finalizer_that_compiles_during_a_compile_does_not_deadlock():
    """Cyclic garbage made during a compile under gc.fast_compile() is collected when it ends;
    its finalizer compiles."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import gc as cyclic_gc, numpy as np, graphc as gc
        from graphc.backend import compiler
        g = gc.Graph("n"); x = g.input("x", (4, 3)); w = g.param("w", (3, 2)); loss = gc.sum(x @ w)
        params = {"w": np.ones((3, 2), np.float32)}
        compiled = []
        class CompilesWhenCollected:
            def __del__(self):
                compiled.append(gc.compile(loss, params))
        check_params = compiler._check_params
        def check_and_leave_a_cycle(*args):
            compiler._check_params = check_params       # once
            cycle = CompilesWhenCollected(); cycle.self = cycle
            return check_params(*args)
        compiler._check_params = check_and_leave_a_cycle
        with gc.fast_compile():
            gc.compile(loss, params)
        cyclic_gc.collect()
        print(len(compiled), cyclic_gc.isenabled(), float(compiled[0](x=np.ones((4, 3), np.float32))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True", "24.0"]


def test_the_nodes_a_compile_adds_name_the_users_line():
    """Backward and update nodes are built inside compile_training_step: their site is the
    user's line that called it, not a frame of graphc or of a wrapper around it."""
    import inspect
    model = models.softmax_regression(4, features=8, classes=3)
    line = inspect.currentframe().f_lineno + 1
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    added = [node for node in step.graph.nodes if node.grad_of is not None]
    assert added and {node.site for node in added} == {f"test_compile.py:{line}"}


def test_update_of_a_weight_the_gradient_gemm_reads_is_not_done_in_place():
    """loss(w) = sum((x @ w) @ w): the gradient GEMMs read w, so w's update must wait for them."""
    g = gc.Graph("self_product")
    x = g.input("x", (3, 4))
    w = g.param("w", (4, 4))
    loss = gc.sum((x @ w) @ w)
    params = {"w": (np.eye(4) * 0.5 + 0.1).astype(np.float32)}
    expected = params["w"] - 0.01 * gc.evaluate(gc.grad(loss, w), {"x": np.ones((3, 4), np.float32)}, params)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.01))
    step(x=np.ones((3, 4), np.float32))
    assert_matches(params["w"], expected)


def test_declared_inputs_the_outputs_do_not_read_are_accepted_and_ignored():
    model = models.softmax_regression(4, features=8, classes=3)
    predict = gc.compile([model.logits], gc.init_params(model.graph))
    x = np.ones((4, 8), np.float32)
    assert_matches(predict(x=x, y=np.zeros(4, np.int32))[0], predict(x=x)[0])
    with pytest.raises(ValueError, match="unexpected input 'labels'"):
        predict(x=x, labels=np.zeros(4, np.int32))


def test_unsupported_tensors_are_refused_at_compile_time_with_the_users_line():
    g = gc.Graph("unsupported")
    with pytest.raises(gc.ShapeError, match=r"\(0, 3\) \(at test_compile.py:\d+\)"):
        g.input("x", (0, 3))   # empty tensors are refused where they are declared
    wide = g.input("z", (2, 3), dtype="float64")
    with pytest.raises(NotImplementedError, match="float64"):
        gc.compile(gc.relu(wide), {})


@pytest.mark.parametrize("view_of", ["a kernel's result", "an input"])
def test_a_buffer_updated_with_a_view_of_a_value_gets_its_values(view_of):
    """An in-place write of a reshape: the kernel computing the value writes the buffer itself,
    or, for a value no kernel computes (an input), a copy does."""
    g = gc.Graph("views")
    x = g.input("x", (3, 4))
    w = g.param("w", (4, 2))
    hidden = gc.relu(x @ w)
    viewed = hidden if view_of == "a kernel's result" else x
    kept = g.buffer("kept", (viewed.size,))
    g.update_buffer(kept, gc.reshape(viewed, (viewed.size,)), owner=hidden)
    params = gc.init_params(g, seed=1)
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)}
    (total,) = gc.compile([gc.sum(hidden * 2.0)], params)(**feeds)
    expected = np.maximum(feeds["x"] @ params["w"], 0)
    np.testing.assert_allclose(total, 2 * expected.sum(), rtol=1e-5)
    source = expected if view_of == "a kernel's result" else feeds["x"]
    np.testing.assert_allclose(params["kept"], source.reshape(-1), rtol=1e-5)


def test_a_buffer_updated_with_an_input_gets_its_values_and_the_input_stays_itself():
    g = gc.Graph("flat")
    x = g.input("x", (3,))
    kept = g.buffer("kept", (3,))
    total = gc.sum(x * 2.0)
    g.update_buffer(kept, x, owner=total)
    params = gc.init_params(g)
    feeds = {"x": np.array([1.0, 2.0, 3.0], np.float32)}
    (result,) = gc.compile([total], params)(**feeds)
    assert result == pytest.approx(12.0)
    np.testing.assert_array_equal(params["kept"], feeds["x"])


@pytest.mark.parametrize("view", [False, True])
def test_a_buffer_updated_with_another_buffers_old_value_gets_the_old_value(view):
    """`a ← b` (or a reshape of it) while b is updated in place in the same call: a gets b's
    value from before the call, as the reference executor computes it."""
    g = gc.Graph("swap")
    x = g.input("x", (3,))
    a, b = g.buffer("a", (3,)), g.buffer("b", (3,))
    total = gc.sum(x * 2.0)
    g.update_buffer(a, gc.reshape(gc.reshape(b, (1, 3)), (3,)) if view else b, owner=total)
    g.update_buffer(b, b * 0.5 + x, owner=total)
    params = gc.init_params(g)
    params["a"][:], params["b"][:] = [10, 20, 30], [1, 2, 3]
    gc.compile([total], params)(x=np.array([1.0, 2.0, 3.0], np.float32))
    np.testing.assert_array_equal(params["a"], [1, 2, 3])
    np.testing.assert_array_equal(params["b"], [1.5, 3, 4.5])


@pytest.mark.parametrize("rows", [2, 40])
def test_a_buffer_updated_with_its_own_transpose_gets_the_transpose(rows):
    """A kernel that reads the buffer it writes at other positions than each one it writes
    (a transpose) computes into a buffer of its own, then a copy writes the buffer."""
    g = gc.Graph("transposed")
    x = g.input("x", (3,))
    kept = g.buffer("kept", (rows * 4,))
    total = gc.sum(x * 2.0)
    g.update_buffer(kept, gc.reshape(gc.transpose(gc.reshape(kept, (rows, 4)), (1, 0)), (rows * 4,)), owner=total)
    params = gc.init_params(g)
    params["kept"][:] = np.arange(rows * 4, dtype=np.float32)
    old = params["kept"].copy()
    gc.compile([total], params)(x=np.ones(3, np.float32))
    np.testing.assert_array_equal(params["kept"], old.reshape(rows, 4).T.reshape(-1))


def test_a_buffer_updated_with_a_transpose_a_matmul_also_reads_gets_its_values():
    """A transpose its consumers would read in place is computed when a buffer is its write."""
    g = gc.Graph("folded")
    x = g.input("x", (3, 4))
    w = g.param("w", (2, 4))
    wt = gc.transpose(w, (1, 0))
    kept = g.buffer("kept", (4, 2))
    out = gc.sum(x @ wt)
    g.update_buffer(kept, wt, owner=out)
    params = gc.init_params(g, seed=0)
    gc.compile([out], params)(x=np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(params["kept"], params["w"].T)
