"""The modern models (ResNets, the batch-norm digits CNN, the dropout MLP), the learning-rate
schedules and `train` with Adam and a cosine schedule: numbers against the reference executor,
and against torch where it is installed."""
import math

import numpy as np
import pytest

import graphc as gc
from graphc.core.optim import SGD, Adam
from graphc.tools import models, schedules
from graphc.tools.data import load_digits
from graphc.tools.train import train
from torch_models import torch_resnet

BATCH = 4
IMAGE = (3, 16, 16)   # small enough for a fast step; all three stages still halve the grid
# torch's CIFAR ResNets with option-B shortcuts, as counted by test_resnet_state_matches_torch
RESNET_PARAM_COUNTS = {8: 78_042, 20: 272_474}


def state_shapes(model):
    return {name: node.shape for name, node in {**model.graph.params, **model.graph.buffers}.items()}


def copy(params):
    return {name: np.array(value) for name, value in params.items()}


# ---- ResNets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [8, 20])
def test_resnet_param_counts(depth):
    model = models.resnet(2, depth)
    assert sum(math.prod(node.shape) for node in model.graph.params.values()) == RESNET_PARAM_COUNTS[depth]
    # two buffers per batch norm: the stem's, two per block, one per projection shortcut
    assert len(model.graph.buffers) == 2 * (1 + 2 * 3 * (depth - 2) // 6 + 2)
    assert model.logits.shape == (2, 10)


def test_resnet_depth_must_be_6n_plus_2():
    for depth in (6, 9, 21, 8.0, True):
        with pytest.raises(ValueError, match="6n\\+2"):
            models.resnet(2, depth)


def torch_state_shapes(module):
    state = {name: tuple(p.shape) for name, p in module.named_parameters()}
    state.update({name: tuple(b.shape) for name, b in module.named_buffers()
                  if not name.endswith("num_batches_tracked")})
    return state


@pytest.mark.parametrize("depth", [8, 20])
def test_resnet_state_matches_torch(depth):
    torch = pytest.importorskip("torch")
    reference = torch_resnet(torch, depth)
    model = models.resnet(2, depth)
    assert state_shapes(model) == torch_state_shapes(reference)
    assert list(model.graph.params) == [name for name, _ in reference.named_parameters()]   # torch's order too
    assert sum(p.numel() for p in reference.parameters()) == RESNET_PARAM_COUNTS[depth]


@pytest.mark.parametrize("build", [models.resnet8, models.resnet20, models.digits_cnn, models.mlp_dropout],
                         ids=lambda build: build.__name__)
def test_train_and_eval_graphs_declare_the_same_params_and_buffers(build):
    training, evaluation = build(2, training=True), build(2, training=False)
    assert state_shapes(training) == state_shapes(evaluation)
    assert list(training.graph.params) == list(evaluation.graph.params)
    assert (training.graph.buffers == {}) == (build is models.mlp_dropout)
    # one params dict binds both: the eval graph compiles against the training graph's params
    params = gc.init_params(training.graph, seed=0)
    feeds = models.random_batch(training, np.random.default_rng(0))
    (logits,) = gc.evaluate([evaluation.logits], {training.x.name: feeds[training.x.name]}, params)
    assert logits.shape == evaluation.logits.shape and np.all(np.isfinite(logits))


def test_batch_norm_params_and_buffers_start_as_torch_does():
    params = gc.init_params(models.resnet8(2).graph, seed=0)
    assert np.all(params["layer2.0.bn1.weight"] == 1) and np.all(params["layer2.0.bn1.bias"] == 0)
    assert np.all(params["layer2.0.downsample.1.running_mean"] == 0)
    assert np.all(params["layer2.0.downsample.1.running_var"] == 1)


@pytest.fixture(scope="module")
def resnet8_step():
    """A compiled resnet8 training step (plain SGD, so the update reveals the gradient), its
    params before the first step, and the first batch."""
    model = models.resnet8(BATCH, image=IMAGE)
    params = gc.init_params(model.graph, seed=0)
    initial = copy(params)
    feeds = models.random_batch(model, np.random.default_rng(1))
    step = gc.compile_training_step(model.loss, params, SGD(lr=0.1))
    loss = step(**feeds)
    return model, step, params, initial, feeds, loss


def test_one_resnet8_step_matches_the_reference_executor(resnet8_step):
    model, step, params, initial, feeds, loss = resnet8_step
    reference = models.resnet8(BATCH, image=IMAGE)
    names = list(reference.graph.params)
    grads = gc.grad(reference.loss, [reference.graph.params[name] for name in names])
    before = copy(initial)
    ref_loss, *ref_grads = gc.evaluate([reference.loss] + grads, feeds, before)   # updates before's buffers
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    for name, g in zip(names, ref_grads):
        expected = initial[name] - np.float32(0.1) * g
        np.testing.assert_allclose(params[name], expected, rtol=1e-4, atol=1e-5 * np.abs(initial[name]).max() + 1e-6,
                                   err_msg=name)
    for name in reference.graph.buffers:
        assert not np.array_equal(params[name], initial[name]), name   # the step updated the running stats
        np.testing.assert_allclose(params[name], before[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_resnet8_matches_torch_in_training_and_eval_mode(resnet8_step):
    torch = pytest.importorskip("torch")
    model, _, _, initial, feeds, _ = resnet8_step
    reference = torch_resnet(torch, 8)
    missing, unexpected = reference.load_state_dict({name: torch.from_numpy(value) for name, value in initial.items()},
                                                    strict=False)
    assert all(name.endswith("num_batches_tracked") for name in missing) and not unexpected
    x, y = torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["y"]).long()

    reference.train()
    torch_loss = torch.nn.functional.cross_entropy(reference(x), y)
    torch_loss.backward()
    fresh = models.resnet8(BATCH, image=IMAGE)
    values = copy(initial)
    names = list(fresh.graph.params)
    grads = gc.grad(fresh.loss, [fresh.graph.params[name] for name in names])
    loss, *grads = gc.evaluate([fresh.loss] + grads, feeds, values)
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-5)
    torch_params = dict(reference.named_parameters())
    for name, g in zip(names, grads):
        expected = torch_params[name].grad.numpy()
        np.testing.assert_allclose(g, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max() + 1e-7, err_msg=name)
    torch_buffers = dict(reference.named_buffers())
    for name in fresh.graph.buffers:
        np.testing.assert_allclose(values[name], torch_buffers[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)

    reference.eval()
    evaluation = models.resnet8(BATCH, image=IMAGE, training=False)
    (logits,) = gc.evaluate([evaluation.logits], {"x": feeds["x"]}, values)
    with torch.no_grad():
        np.testing.assert_allclose(logits, reference(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained_resnet8():
    """resnet8's params after a few compiled SGD steps, and a batch."""
    model = models.resnet8(BATCH, image=IMAGE)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, SGD(lr=0.05, momentum=0.9))
    rng = np.random.default_rng(2)
    for _ in range(5):
        step(**models.random_batch(model, rng))
    return params, models.random_batch(model, rng)


def test_eval_graph_normalizes_with_the_running_statistics(trained_resnet8):
    params, feeds = trained_resnet8
    assert not np.all(params["layer1.0.bn2.running_mean"] == 0)   # the statistics moved away from their init
    evaluation = models.resnet8(BATCH, image=IMAGE, training=False)
    predict = gc.compile(evaluation.logits, params)
    buffers = {name: params[name].copy() for name in evaluation.graph.buffers}
    logits = predict(x=feeds["x"])
    for name, value in buffers.items():
        np.testing.assert_array_equal(params[name], value, err_msg=f"{name}: eval mode updated it")
    (expected,) = gc.evaluate([evaluation.logits], {"x": feeds["x"]}, copy(params))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    # Running statistics make each example's logits independent of the rest of its batch;
    # batch statistics (training mode) do not.
    shuffled = feeds["x"][::-1].copy()
    np.testing.assert_allclose(predict(x=shuffled)[::-1], logits, rtol=1e-5, atol=1e-6)
    training = models.resnet8(BATCH, image=IMAGE)
    mixed = feeds["x"].copy()
    mixed[1:] = shuffled[1:] * 3
    (train_logits,) = gc.evaluate([training.logits], {"x": mixed}, copy(params))
    (train_logits_alone,) = gc.evaluate([training.logits], {"x": feeds["x"]}, copy(params))
    assert not np.allclose(train_logits[0], train_logits_alone[0], rtol=1e-3)


# ---- the digits CNN and the dropout MLP ------------------------------------------------------

def test_digits_cnn_state_has_torch_names():
    assert state_shapes(models.digits_cnn(2, training=False)) == {
        "conv1.weight": (16, 1, 3, 3), "bn1.weight": (16,), "bn1.bias": (16,),
        "bn1.running_mean": (16,), "bn1.running_var": (16,),
        "conv2.weight": (32, 16, 3, 3), "bn2.weight": (32,), "bn2.bias": (32,),
        "bn2.running_mean": (32,), "bn2.running_var": (32,),
        "fc.weight": (10, 32 * 4 * 4), "fc.bias": (10,)}


def test_mlp_dropout_in_eval_mode_is_the_mlp():
    sizes = (64, 32, 16, 10)
    plain, evaluation = models.mlp(8, sizes), models.mlp_dropout(8, sizes, training=False)
    params = gc.init_params(plain.graph, seed=0)
    feeds = models.random_batch(plain, np.random.default_rng(0))
    (expected,) = gc.evaluate([plain.logits], feeds, params)
    (logits,) = gc.evaluate([evaluation.logits], feeds, params)
    np.testing.assert_array_equal(logits, expected)


def test_mlp_dropout_training_step_matches_the_reference_executor():
    sizes = (64, 32, 16, 10)
    model = models.mlp_dropout(8, sizes, p=0.5)
    params = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(0))
    (expected,) = gc.evaluate([model.loss], feeds, copy(params), seed=3)
    (without_dropout,) = gc.evaluate([models.mlp(8, sizes).loss], feeds, params)
    assert float(expected) != pytest.approx(float(without_dropout), rel=1e-3)   # the masks did something
    step = gc.compile_training_step(model.loss, params, Adam(lr=1e-3), seed=3)
    assert step(**feeds) == pytest.approx(float(expected), rel=1e-5)


# ---- learning-rate schedules -----------------------------------------------------------------

class FakeStep:
    """What a schedule drives: an object with a settable lr (a compiled training step's)."""

    def __init__(self, lr):
        self.lr = lr


def lrs(make, steps, base_lr=0.1):
    """The lr of each of steps + 1 training steps, as the schedule set it."""
    step = FakeStep(base_lr)
    schedule = make(step)
    values = [step.lr]
    for _ in range(steps):
        assert schedule.lr == step.lr
        schedule.step()
        values.append(step.lr)
    return values


def torch_lrs(make, steps, base_lr=0.1):
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = make(torch.optim.lr_scheduler, optimizer)
    values = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        values.append(optimizer.param_groups[0]["lr"])
    return values


TOTAL, WARMUP = 20, 5
SCHEDULES = {
    "cosine": (lambda s: schedules.cosine_lr(s, TOTAL),
               lambda lr, o: lr.CosineAnnealingLR(o, TOTAL),
               lambda t: 0.05 * (1 + math.cos(math.pi * t / TOTAL))),
    "cosine to min_lr": (lambda s: schedules.cosine_lr(s, TOTAL, min_lr=0.01),
                         lambda lr, o: lr.CosineAnnealingLR(o, TOTAL, eta_min=0.01),
                         lambda t: 0.01 + 0.045 * (1 + math.cos(math.pi * t / TOTAL))),
    "cosine with warm-up": (
        lambda s: schedules.cosine_lr(s, TOTAL, warmup_steps=WARMUP),
        lambda lr, o: lr.SequentialLR(o, [lr.LinearLR(o, 1 / WARMUP, total_iters=WARMUP - 1),
                                          lr.CosineAnnealingLR(o, TOTAL - WARMUP)], milestones=[WARMUP]),
        lambda t: 0.1 * (t + 1) / WARMUP if t < WARMUP else
        0.05 * (1 + math.cos(math.pi * (t - WARMUP) / (TOTAL - WARMUP)))),
    "step": (lambda s: schedules.step_lr(s, 6, gamma=0.5),
             lambda lr, o: lr.StepLR(o, 6, gamma=0.5),
             lambda t: 0.1 * 0.5 ** (t // 6)),
    "warm-up": (lambda s: schedules.warmup_lr(s, WARMUP),
                lambda lr, o: lr.LinearLR(o, 1 / WARMUP, total_iters=WARMUP - 1),
                lambda t: 0.1 * min(1.0, (t + 1) / WARMUP)),
}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedules_follow_their_closed_forms(kind):
    make, _, closed_form = SCHEDULES[kind]
    np.testing.assert_allclose(lrs(make, TOTAL), [closed_form(t) for t in range(TOTAL + 1)], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedules_follow_torch(kind):
    make, make_torch, _ = SCHEDULES[kind]
    pytest.importorskip("torch")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # SequentialLR's deprecation notes on step(epoch)
        expected = torch_lrs(make_torch, TOTAL)
    np.testing.assert_allclose(lrs(make, TOTAL), expected, rtol=1e-12, atol=1e-15)


def test_a_schedule_resumes_from_a_step_count():
    step = FakeStep(0.1)
    schedule = schedules.cosine_lr(step, TOTAL, warmup_steps=WARMUP)
    schedule.steps = 12
    assert step.lr == schedule.lr == lrs(lambda s: schedules.cosine_lr(s, TOTAL, warmup_steps=WARMUP), 12)[12]
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        schedule.steps = -1


def test_cosine_holds_min_lr_after_total_steps():
    values = lrs(lambda s: schedules.cosine_lr(s, 4, min_lr=0.02), 8)
    assert values[4:] == [pytest.approx(0.02)] * 5


def test_a_schedule_drives_a_compiled_step():
    model = models.softmax_regression(8, features=16, classes=3)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, SGD(lr=0.2))
    schedule = schedules.step_lr(step, 2, gamma=0.5)
    feeds = models.random_batch(model, np.random.default_rng(0))
    seen = []
    for _ in range(5):
        before = params["w"].copy()
        (g,) = gc.evaluate(gc.grad(model.loss, [model.graph.params["w"]]), feeds, params)
        step(**feeds)
        seen.append(float(np.median((before - params["w"])[g != 0] / g[g != 0])))
        schedule.step()
    np.testing.assert_allclose(seen, [0.2, 0.2, 0.1, 0.1, 0.05], rtol=1e-3)
    assert "StepLR(base_lr=0.2" in repr(schedule) and schedule.steps == 5


@pytest.mark.parametrize("make, error, message", [
    (lambda s: schedules.cosine_lr(s, 0), ValueError, "total_steps must be a positive int"),
    (lambda s: schedules.cosine_lr(s, -3), ValueError, "total_steps must be a positive int, got -3"),
    (lambda s: schedules.cosine_lr(s, 10.0), TypeError, "total_steps must be an int"),
    (lambda s: schedules.cosine_lr(s, 10, warmup_steps=-1), ValueError, "warmup_steps must be a non-negative int"),
    (lambda s: schedules.cosine_lr(s, 10, warmup_steps=10), ValueError, "fewer than total_steps"),
    (lambda s: schedules.cosine_lr(s, 10, min_lr=0.5), ValueError, "min_lr must lie in"),
    (lambda s: schedules.cosine_lr(s, 10, min_lr=float("nan")), ValueError, "min_lr must be finite"),
    (lambda s: schedules.step_lr(s, 0), ValueError, "step_size must be a positive int"),
    (lambda s: schedules.step_lr(s, True), TypeError, "step_size must be an int"),
    (lambda s: schedules.step_lr(s, 3, gamma=0), ValueError, "gamma"),
    (lambda s: schedules.warmup_lr(s, -2), ValueError, "warmup_steps must be a non-negative int"),
    (lambda s: schedules.warmup_lr(object(), 2), TypeError, "expected a compiled training step"),
])
def test_schedule_settings_are_checked(make, error, message):
    with pytest.raises(error, match=message):
        make(FakeStep(0.1))


def test_a_compiled_function_without_optimizer_has_no_lr_to_schedule():
    model = models.softmax_regression(2, features=4, classes=3)
    predict = gc.compile(model.logits, gc.init_params(model.graph, seed=0))
    with pytest.raises(TypeError, match="expected a compiled training step"):
        schedules.cosine_lr(predict, 10)


# ---- train with a modern recipe --------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def adam_cosine_digits(digits):
    return train(models.digits_cnn, digits, epochs=5, batch_size=32, optimizer=Adam(lr=3e-3),
                 schedule="cosine", progress=False, eval_batch=128)


def test_adam_and_a_cosine_schedule_train_the_digits_cnn(adam_cosine_digits, digits):
    result = adam_cosine_digits
    # Measured 3.6% test error after 5 epochs (0.7%..3.6% over seeds 0..4); chance is 90%.
    assert result.history[-1].test_error < 0.06
    assert result.history[-1].loss < result.history[0].loss
    steps = len(digits.x_train) // 32
    lrs_by_epoch = [record.lr for record in result.history]
    np.testing.assert_allclose(lrs_by_epoch, [1.5e-3 * (1 + math.cos(math.pi * (steps * e - 1) / (5 * steps)))
                                              for e in range(1, 6)], rtol=1e-9)


def test_train_classifies_with_the_eval_graph(adam_cosine_digits, digits):
    result = adam_cosine_digits
    buffers = {name: value.copy() for name, value in result.params.items() if "running" in name}
    assert len(buffers) == 4
    evaluation = models.digits_cnn(len(digits.x_test), training=False)
    (logits,) = gc.evaluate([evaluation.logits], {"x": digits.x_test}, copy(result.params))
    np.testing.assert_array_equal(result.predict(digits.x_test), np.argmax(logits, axis=1))
    for name, value in buffers.items():   # predicting leaves the running statistics alone
        np.testing.assert_array_equal(result.params[name], value)


def test_train_warns_when_it_cannot_ask_for_the_eval_graph(digits):
    with pytest.warns(UserWarning, match="no `training` parameter"):
        train(lambda batch: models.digits_cnn(batch, p=0.0), digits.subset(64), epochs=1, batch_size=32,
              lr=0.01, progress=False)


def test_train_checks_the_optimizer_and_the_schedule(digits):
    small = digits.subset(64)
    build = models.digits_cnn
    with pytest.raises(ValueError, match="lr belong to the optimizer"):
        train(build, small, epochs=1, batch_size=32, lr=0.1, optimizer=Adam(), progress=False)
    with pytest.raises(TypeError, match="give lr"):
        train(build, small, epochs=1, batch_size=32, progress=False)
    with pytest.raises(TypeError, match="optimizer must be an optimizer"):
        train(build, small, epochs=1, batch_size=32, optimizer="adam", progress=False)
    with pytest.raises(ValueError, match="schedule must be None, one of \\['cosine'\\]"):
        train(build, small, epochs=1, batch_size=32, lr=0.1, schedule="linear", progress=False)
