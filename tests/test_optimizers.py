"""Adam, AdamW and SGD in the compiled step: torch.optim's semantics, a learning rate settable
between calls, and checkpoints that resume bit for bit."""
import numpy as np
import pytest
from refusals import refused

import graphc as gc
from graphc.core.ops.norm import batch_norm
from graphc.core.optim import Adam, AdamW


def small_net(batch=8, features=6, hidden=5, classes=3, bn=False, dropout=0.0):
    g = gc.Graph()
    x = g.input("x", (batch, features))
    y = g.input("y", (batch,), dtype="int32")
    h = gc.linear(x, g.param("fc1.w", (hidden, features)), None if bn else g.param("fc1.b", (hidden,)))
    if bn:
        h = batch_norm(h, g.param("bn.w", (hidden,), init=1.0), g.param("bn.b", (hidden,)),
                       g.buffer("bn.rm", (hidden,)), g.buffer("bn.rv", (hidden,), init=1.0))
    h = gc.dropout(gc.relu(h), dropout)
    logits = gc.linear(h, g.param("fc2.w", (classes, hidden)), g.param("fc2.b", (classes,)))
    return g, gc.softmax_cross_entropy(logits, y)


def batches(steps, batch=8, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, features)).astype(np.float32),
             rng.integers(0, classes, batch).astype(np.int32)) for _ in range(steps)]


LR_SCHEDULE = [0.05] * 5 + [0.01] * 5    # the learning rate changes after five steps


@pytest.mark.parametrize("kind", ["Adam", "AdamW", "SGD"])
def test_ten_steps_match_torch_optim_with_a_learning_rate_change(kind):
    torch = pytest.importorskip("torch")
    g, loss = small_net()
    params = gc.init_params(g, seed=1)
    t = {name: torch.tensor(value.copy(), requires_grad=True) for name, value in params.items()}
    if kind == "SGD":
        ours, theirs = gc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01), torch.optim.SGD(
            t.values(), lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        cls = {"Adam": (Adam, torch.optim.Adam), "AdamW": (AdamW, torch.optim.AdamW)}[kind]
        ours, theirs = cls[0](lr=0.05, weight_decay=0.01), cls[1](t.values(), lr=0.05, weight_decay=0.01)
    step = gc.compile_training_step(loss, params, ours)
    for lr, (xb, yb) in zip(LR_SCHEDULE, batches(10)):
        step.lr = lr
        for group in theirs.param_groups:
            group["lr"] = lr
        ours_loss = step(x=xb, y=yb)
        theirs.zero_grad()
        h = torch.relu(torch.tensor(xb) @ t["fc1.w"].T + t["fc1.b"])
        expected = torch.nn.functional.cross_entropy(h @ t["fc2.w"].T + t["fc2.b"], torch.tensor(yb).long())
        expected.backward()
        theirs.step()
        assert ours_loss == pytest.approx(expected.item(), rel=1e-5)
    for name in params:
        np.testing.assert_allclose(params[name], t[name].detach().numpy(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("optimizer", [Adam(lr=0.02, weight_decay=0.1), AdamW(lr=0.02, betas=(0.8, 0.99)),
                                       gc.SGD(lr=0.1, momentum=0.5, nesterov=True)], ids=["Adam", "AdamW", "SGD"])
def test_ten_steps_match_the_reference_executor(optimizer):
    """The same update graph, run by numpy: each step's hyperparameters as constants."""
    g, loss = small_net()
    params = gc.init_params(g, seed=2)
    reference = {name: value.astype(np.float64) for name, value in params.items()}
    step = gc.compile_training_step(loss, params, optimizer)
    reference_step = ReferenceOptimizer(g, loss, optimizer, reference)
    for lr, (xb, yb) in zip(LR_SCHEDULE, batches(10, seed=3)):
        step.lr = lr
        step(x=xb, y=yb)
        reference_step(lr, {"x": xb, "y": yb})
    for name in params:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6)


class ReferenceOptimizer:
    """The optimizer's update graph run by the reference executor in float64, one call per step,
    each step's hyperparameters as constants; `values` (params, then state) updated in place."""

    def __init__(self, graph, loss, optimizer, values):
        self.graph, self.optimizer, self.values = graph, optimizer, values
        self.trainable = [graph.params[name] for name in graph.params]
        self.grads = gc.grad(loss, self.trainable)
        self.steps = 0

    def __call__(self, lr, feeds):
        self.steps += 1
        hyper = self.optimizer.hyper_values(lr, self.steps).__getitem__
        graph = self.graph if self.steps == 1 else _StateGraph(self.graph)   # state declared once
        writes, state = self.optimizer.updates(graph, self.trainable, self.grads, hyper=hyper)
        for name in state:
            self.values.setdefault(name, np.zeros(self.graph.params[name].shape))
        new = gc.evaluate([value for _, value in writes], feeds, self.values, dtype="float64")
        self.values.update({name: value for (name, _), value in zip(writes, new)})


class _StateGraph:
    """A graph whose state params exist already (declared at the first step): returns them."""

    def __init__(self, graph):
        self._graph = graph

    def param(self, name, *args, **kwargs):
        return self._graph.params[name]


def test_setting_lr_takes_effect_at_the_next_call_without_recompiling():
    g, loss = small_net()
    params = gc.init_params(g, seed=3)
    step = gc.compile_training_step(loss, params, gc.SGD(lr=0.1))
    program = step._program
    (xb, yb), = batches(1)
    before = {name: value.copy() for name, value in params.items()}
    step.lr = 0.0
    step(x=xb, y=yb)
    for name in params:
        np.testing.assert_array_equal(params[name], before[name])    # lr 0: nothing moves
    step.lr = 0.5
    assert step.lr == 0.5
    step(x=xb, y=yb)
    assert step._program is program
    assert any(not np.array_equal(params[name], before[name]) for name in params)


def test_sgd_update_with_a_settable_lr_stays_fused_into_the_weight_gradient_gemm():
    """The learning rate is a one-float slot now, read as a broadcast scalar by the epilogue."""
    g, loss = small_net(batch=64, features=32, hidden=16)
    step = gc.compile_training_step(loss, gc.init_params(g), gc.SGD(lr=0.1, momentum=0.9))
    labels = [s.label for s in step.steps]
    assert sum(label.startswith("gemm") and label.endswith("+ew") for label in labels) >= 2, labels


@pytest.mark.parametrize("features, hidden", [(40, 33), (7, 64), (130, 17)])
@pytest.mark.parametrize("optimizer", [Adam(lr=0.01, weight_decay=0.01), AdamW(lr=0.01)], ids=["Adam", "AdamW"])
def test_adam_updates_fused_into_the_weight_gradient_gemm_match_the_reference(features, hidden, optimizer):
    """The GEMM writing a weight's gradient computes Adam's moments and the update as it stores,
    writing all three in place (side stores); shapes cover edge tiles and narrow outputs."""
    g, loss = small_net(batch=32, features=features, hidden=hidden)
    params = gc.init_params(g, seed=7)
    step = gc.compile_training_step(loss, params, optimizer)
    labels = [s.label for s in step.steps]
    assert sum(label.startswith("gemm") and label.endswith("+ew+2 in place") for label in labels) >= 1, labels
    assert sum(label.endswith("in place") for label in labels) == 4, labels     # one kernel per param
    reference = {name: value.astype(np.float64) for name, value in params.items()}
    reference_step = ReferenceOptimizer(g, loss, optimizer, reference)
    for xb, yb in batches(3, batch=32, features=features, seed=8):
        step(x=xb, y=yb)
        reference_step(optimizer.lr, {"x": xb, "y": yb})
    for name in params:
        np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-6)
    for name, moment in step.state.items():
        np.testing.assert_allclose(moment, reference[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", [Adam(lr=0.01), gc.SGD(lr=0.05, momentum=0.9)], ids=["Adam", "SGD"])
def test_a_run_resumed_from_a_checkpoint_continues_bit_for_bit(tmp_path, optimizer):
    data = batches(6, seed=4)
    g, loss = small_net(bn=True, dropout=0.3)     # buffers, optimizer state and the masks' call index

    straight = gc.init_params(g, seed=5)
    step = gc.compile_training_step(loss, straight, optimizer)
    for xb, yb in data:
        step(x=xb, y=yb)

    first = gc.init_params(g, seed=5)
    step = gc.compile_training_step(loss, first, optimizer)
    for xb, yb in data[:3]:
        step(x=xb, y=yb)
    gc.save_params(tmp_path / "ckpt.npz", step.state_dict())

    resumed = gc.init_params(g, seed=99)
    step = gc.compile_training_step(loss, resumed, optimizer)
    step.load_state_dict(gc.load_params(tmp_path / "ckpt.npz"))
    for xb, yb in data[3:]:
        step(x=xb, y=yb)
    for name in straight:
        assert resumed[name].tobytes() == straight[name].tobytes(), name


def test_reset_state_restarts_adam_from_step_one():
    g, loss = small_net()
    (xb, yb), = batches(1)
    fresh = gc.init_params(g, seed=6)
    reused = {name: value.copy() for name, value in fresh.items()}
    step = gc.compile_training_step(loss, reused, Adam(lr=0.01))
    step(x=xb, y=yb)
    for name, value in fresh.items():
        reused[name][...] = value
    step.reset_state()
    assert step.optimizer_steps == 0
    step(x=xb, y=yb)
    gc.compile_training_step(loss, fresh, Adam(lr=0.01))(x=xb, y=yb)
    for name in fresh:
        assert fresh[name].tobytes() == reused[name].tobytes()


def test_a_damaged_state_dict_is_refused_before_anything_changes():
    g, loss = small_net(dropout=0.2)
    params = gc.init_params(g)
    step = gc.compile_training_step(loss, params, Adam(lr=0.01), seed=3)
    (xb, yb), = batches(1)
    step(x=xb, y=yb)
    state = step.state_dict()
    assert {"optimizer:exp_avg:fc1.w", "optimizer:exp_avg_sq:fc2.b", "counter:optimizer_steps",
            "counter:seed"} <= set(state)
    other = {name: value + 1 for name, value in state.items() if not name.startswith("counter:")}
    damaged = [
        ({k: v for k, v in other.items() if k != "optimizer:exp_avg:fc1.w"}, "missing optimizer state 'exp_avg:fc1.w'"),
        ({**state, **other, "counter:calls": np.array([0.5, 0, 0, 0], np.float32)}, "counter:calls"),
        ({**state, **other, "optimizer:exp_avg:fc1.w": np.ones((5, 6), complex)}, "exp_avg:fc1.w"),
        ({**state, **other, "counter:optimizer_steps": np.array([9, 0, 0, 0], np.float32)}, "cannot follow"),
        ({**state, **other, "counter:seed": np.array([4, 0, 0, 0], np.float32)}, "seed=4"),
    ]
    before = step.state_dict()
    for values, fragment in damaged:
        with pytest.raises(ValueError, match=fragment):
            step.load_state_dict(values)
        after = step.state_dict()
        assert all(after[name].tobytes() == before[name].tobytes() for name in before), fragment


def test_sgd_steps_are_counted_on_the_fastest_call_path_too():
    """The entry counts its calls natively: an SGD step (no per-call Python) still knows them."""
    g, loss = small_net()
    step = gc.compile_training_step(loss, gc.init_params(g), gc.SGD(lr=0.1))
    (xb, yb), = batches(1)
    for _ in range(3):
        step(x=xb, y=yb)
    assert step.optimizer_steps == 3 and step.calls == 3
    step.reset_state()
    step(x=xb, y=yb)
    assert step.optimizer_steps == 1 and step.calls == 4
    assert step.state_dict()["counter:optimizer_steps"].tolist() == [1, 0, 0, 0]


def test_the_cache_key_holds_every_setting_of_an_optimizer_subclass(tmp_path, monkeypatch):
    import dataclasses

    import graphc_runtime as rt
    from graphc.backend import compiler
    monkeypatch.setattr(compiler, "_cache", rt.ObjectCache(tmp_path))

    @dataclasses.dataclass(frozen=True, repr=False)
    class ScaledSGD(gc.SGD):
        factor: float = 1.0

        def updates(self, graph, params, grads, hyper=None):
            return super().updates(graph, params, [self.factor * grad for grad in grads], hyper)

        def __repr__(self):
            return "ScaledSGD()"      # leaves out `factor`: the key must not rely on repr

    g, loss = small_net()
    (xb, yb), = batches(1)
    moved = []
    for factor in (1.0, 100.0):
        params = gc.init_params(g, seed=0)
        before = params["fc2.w"].copy()
        gc.compile_training_step(loss, params, ScaledSGD(lr=0.01, factor=factor))(x=xb, y=yb)
        moved.append(np.abs(params["fc2.w"] - before).max())
    assert moved[1] == pytest.approx(100 * moved[0], rel=1e-3)


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_hyperparameters_are_refused():
    refused(ValueError, lambda: Adam(lr=0.1, betas=(0.9, 1.0)), "Adam", "betas[1]", "[0, 1)")
    refused(ValueError, lambda: AdamW(betas=(-0.1, 0.9)), "AdamW", "betas[0]")
    refused(TypeError, lambda: Adam(betas=0.9), "Adam", "betas")
    refused(ValueError, lambda: Adam(lr=-1e-3), "Adam: lr", ">= 0")
    refused(ValueError, lambda: AdamW(eps=float("nan")), "AdamW: eps", "finite")
    refused(ValueError, lambda: gc.SGD(lr=-0.1), "SGD: lr")


def test_a_negative_learning_rate_set_on_a_step_is_refused():
    g, loss = small_net()
    step = gc.compile_training_step(loss, gc.init_params(g), Adam())
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.1"):
        step.lr = -0.1
    with pytest.raises(ValueError, match="finite"):
        step.lr = float("inf")
    assert step.lr == 1e-3
