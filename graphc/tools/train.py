"""Training a model with its compiled step: minibatch SGD (or any optimizer), per-epoch train and test error.

    result = train(lambda batch: models.mlp(batch, (64, 128, 10)), load_digits(),
                   epochs=10, batch_size=32, lr=0.05, weight_decay=1e-4)
    result.history[-1].test_error, result.accuracy(x, y)
    train(models.digits_cnn, load_digits(), epochs=10, batch_size=32, optimizer=Adam(lr=3e-3), schedule="cosine")

Each step is one native call (forward, backward, optimizer update in place on the param arrays).
After every epoch the whole train and test splits are classified by a compiled logits function
bound to the same param arrays, giving the training error, the test error and the gap between
them (the course's generalization error, estimated on held-out data). A model builder taking
`training` is asked for its eval graph to classify (batch norm on its running statistics,
dropout off).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from graphc.backend import compiler
from graphc.backend.compiler import CompiledFunction
from graphc.core.init import init_params
from graphc.core.ir import Tensor
from graphc.core.optim import SGD, Optimizer
from graphc.distributed.checkpoint import load_checkpoint, save_checkpoint
from graphc.distributed.sampler import ShardedSampler
from graphc.tools.data import Dataset, epoch_indices, sample_indices
from graphc.tools.models import Model
from graphc.tools.schedules import cosine_lr

SAMPLINGS = ("epoch", "uniform")
SCHEDULES = {"cosine": cosine_lr}   # name -> schedule(step, total_steps): over the whole run


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    epoch: int                  # 1-based
    loss: float                 # mean minibatch loss over the epoch's steps
    train_error: float          # fraction of the training split misclassified after the epoch
    test_error: float
    generalization_gap: float   # test_error - train_error
    seconds: float              # wall time of the epoch's training steps (evaluation excluded)
    examples_per_second: float  # training examples processed per second of steps
    lr: float = math.nan        # the learning rate of the epoch's last step


@dataclasses.dataclass
class TrainResult:
    params: dict[str, np.ndarray]   # the trained arrays (the very arrays the compiled code updates)
    history: list[EpochRecord]
    train_seconds: float            # total time of the training steps (compilation and evaluation excluded)
    compile_seconds: float          # building and compiling the training step and the predict function
    predict_fn: CompiledFunction    # logits of one evaluation batch, bound to `params`

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class ids (int32) for the examples of x."""
        return predict_classes(self.predict_fn, x)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y).reshape(-1)))


def train(model_fn: Callable[..., Model], data: Dataset, *, epochs: int, batch_size: int, lr: float | None = None,
          momentum: float | None = None, weight_decay: float | None = None, optimizer: Optimizer | None = None,
          schedule=None, sampling: str = "epoch", seed: int = 0, progress: bool = True,
          eval_batch: int | None = None, params: Mapping[str, np.ndarray] | None = None, comm=None,
          checkpoint=None) -> TrainResult:
    """Train `model_fn(batch_size)` on `data` by minibatch SGD (or `optimizer`) with the compiled training step.

    model_fn(batch) builds the model for a static batch size; it is called for `batch_size` and,
    when `eval_batch` differs from it, for `eval_batch` (the batch of the compiled predict
    function, default `batch_size`). Examples are reshaped to the model's input, so a linear
    model taking (batch, 64) trains on 1×8×8 images. If model_fn has a `training` parameter
    (as `models.digits_cnn`, `models.resnet8`), the train and test errors come from its eval
    graph, `model_fn(eval_batch, training=False)`, bound to the same params and buffers.

    The optimizer is `SGD(lr, momentum, weight_decay)` (defaults momentum 0.9, weight decay 0),
    or `optimizer` (e.g. `Adam(lr=1e-3)`), which then holds these settings itself. `schedule`
    drives the lr: "cosine" anneals it to 0 over all the steps (`schedules.cosine_lr`), or a
    function (compiled step, total steps) -> a schedule such as `schedules.step_lr`'s, whose
    `.step()` runs after each training step.

    sampling="epoch" runs shuffled epochs of n // batch_size steps (the n mod batch_size
    examples left over differ every epoch); sampling="uniform" is the classic recipe, each step
    drawing batch_size examples uniformly with replacement, with an "epoch" of the same
    n // batch_size steps so that the two are comparable.

    weight_decay is the regularizer (L2, applied by SGD as in PyTorch). `params` (name -> array)
    resumes from given values and is updated in place; by default fresh values from
    `init_params(graph, seed)`; `seed` also seeds dropout's masks (the training step's `seed=`)
    and the sampling. Raises FloatingPointError if the loss stops being finite.

    `comm` (an mpi4py communicator) trains data-parallel: every rank makes the same call
    (`mpiexec -n N python -m mpi4py script.py`), with the same `params` or seed. `batch_size`
    is each rank's: the global batch is batch_size × ranks. Each rank draws its batches from
    its own shard of the training split (graphc/distributed/sampler.py), the compiled step
    averages the gradients over the ranks, the errors are counted over all ranks' shares of
    the splits, and only rank 0 shows progress.

    `checkpoint` (a path): after every epoch the step's whole state, the epoch and the history
    are written there (by rank 0, atomically); a run that finds the file resumes after that
    epoch, drawing the batches the run that never stopped drew. With `comm` or `checkpoint`,
    each epoch's batches come from (seed, rank, epoch) alone (distributed/sampler.py).
    """
    _check_options(data, epochs, batch_size, sampling, eval_batch)
    rank, ranks = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    optimizer = _optimizer(optimizer, lr, momentum, weight_decay)
    make_schedule = _schedule_maker(schedule)
    started = time.perf_counter()
    model = _build(model_fn, batch_size)
    eval_model = _eval_model(model_fn, model, eval_batch or batch_size)
    x_train = _as_model_input(data.x_train, model.x)
    y_train = data.y_train.astype(model.y.dtype).reshape((-1,) + model.y.shape[1:])
    params = init_params(model.graph, seed) if params is None else params
    step = compiler.compile_training_step(model.loss, params, optimizer, seed=seed, comm=comm)
    predict_fn = compiler.compile(eval_model.logits, params)
    compile_seconds = time.perf_counter() - started

    if comm is None and checkpoint is None:
        batches = _batch_sampler(sampling, np.random.default_rng(_sampling_seed(seed)), len(x_train), batch_size)
        steps_per_epoch = len(x_train) // batch_size
        epoch_batches = lambda _epoch: batches()   # noqa: E731
    else:
        sampler = ShardedSampler(len(x_train), batch_size, rank=rank, ranks=ranks, seed=seed, sampling=sampling)
        steps_per_epoch, epoch_batches = sampler.steps_per_epoch, sampler.epoch
    lr_schedule = make_schedule(step, epochs * steps_per_epoch) if make_schedule else None
    if lr_schedule is not None and not callable(getattr(lr_schedule, "step", None)):
        raise TypeError(f"train: the schedule function returned {lr_schedule!r}, which has no step() method; "
                        f"return a schedule such as schedules.step_lr(step, n // 3)")
    history = _resumed_history(checkpoint, step, comm)
    for _ in range(len(history) * steps_per_epoch if lr_schedule is not None else 0):
        lr_schedule.step()
    display = _progress_display(progress and rank == 0, epochs, epochs * steps_per_epoch)
    try:
        for epoch in range(len(history) + 1, epochs + 1):
            loss, seconds, last_lr = _run_epoch(step, model, x_train, y_train, epoch_batches(epoch - 1), display,
                                                lr_schedule)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged in epoch {epoch}: the mean loss is {loss}; "
                                         f"try a smaller lr (now {last_lr})")
            train_error = _error_rate(predict_fn, data.x_train, data.y_train, comm)
            test_error = _error_rate(predict_fn, data.x_test, data.y_test, comm)
            history.append(EpochRecord(epoch, loss, train_error, test_error, test_error - train_error,
                                       seconds, steps_per_epoch * batch_size * ranks / seconds, last_lr))
            display.epoch_done(history[-1])
            if checkpoint is not None:
                save_checkpoint(checkpoint, step, comm, extra={"history": _history_array(history)})
    finally:
        display.close()
    return TrainResult(params, history, sum(record.seconds for record in history), compile_seconds, predict_fn)


def _check_options(data: Dataset, epochs, batch_size, sampling, eval_batch) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= len(data.x_train):
        raise ValueError(f"batch_size must be an int in 1..{len(data.x_train)} (the training examples), "
                         f"got {batch_size!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if eval_batch is not None and (not isinstance(eval_batch, int) or eval_batch < 1):
        raise ValueError(f"eval_batch must be a positive int, got {eval_batch!r}")


def _optimizer(optimizer, lr, momentum, weight_decay) -> Optimizer:
    """The given optimizer, or SGD(lr, momentum 0.9, weight decay 0) made of the settings given."""
    if optimizer is None:
        if lr is None:
            raise TypeError("train: give lr (the default optimizer is SGD(lr, momentum, weight_decay)) "
                            "or an optimizer such as Adam(lr=1e-3)")
        return SGD(lr, 0.9 if momentum is None else momentum, 0.0 if weight_decay is None else weight_decay)
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"train: optimizer must be an optimizer such as SGD(...) or Adam(...), got {optimizer!r}")
    given = [name for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
             if value is not None]
    if given:
        raise ValueError(f"train: {', '.join(given)} belong to the optimizer when one is given "
                         f"(e.g. Adam(lr=1e-3, weight_decay=1e-4)), not to train")
    return optimizer


def _schedule_maker(schedule):
    """A function (compiled step, total steps) -> schedule, or None for a constant lr."""
    if schedule is None or callable(schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    raise ValueError(f"train: schedule must be None, one of {sorted(SCHEDULES)} or a function (step, total_steps) "
                     f"-> a schedule (e.g. lambda step, n: schedules.step_lr(step, n // 3)), got {schedule!r}")


def _build(model_fn, batch: int, **options) -> Model:
    model = model_fn(batch, **options)
    if model.x.shape[0] != batch:
        call = ", ".join([str(batch)] + [f"{name}={value!r}" for name, value in options.items()])
        raise ValueError(f"model_fn({call}) built a model whose input {model.x.name!r} has batch size "
                         f"{model.x.shape[0]}")
    return model


def _eval_model(model_fn, model: Model, batch: int) -> Model:
    """The model that classifies: model_fn's eval graph if it takes `training`, else the
    training model itself (or one built for the eval batch)."""
    if not _takes_training(model_fn):
        graph = model.graph
        if graph.buffers or graph.random_key is not None:
            warnings.warn("train: model_fn takes no `training` parameter, so the train and test errors come from "
                          "the training graph (batch norm on each batch's statistics, updating the running "
                          "statistics; dropout on); give model_fn a `training` parameter for its eval graph",
                          stacklevel=3)
        return model if batch == model.x.shape[0] else _build(model_fn, batch)
    eval_model = _build(model_fn, batch, training=False)
    trained = {**model.graph.params, **model.graph.buffers}
    for name, node in {**eval_model.graph.params, **eval_model.graph.buffers}.items():
        if name not in trained or trained[name].shape != node.shape:
            found = f"shape {trained[name].shape}" if name in trained else "no such param or buffer"
            raise ValueError(f"model_fn({batch}, training=False) declares {name!r} of shape {node.shape}, but the "
                             f"training graph has {found}: both must bind one params dict")
    return eval_model


def _takes_training(model_fn) -> bool:
    try:
        parameters = inspect.signature(model_fn).parameters
    except (TypeError, ValueError):   # a builtin or an extension without a signature
        return False
    parameter = parameters.get("training")
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _sampling_seed(seed: int) -> np.random.SeedSequence:
    # init_params draws from default_rng(seed): sampling gets a stream independent of it.
    return np.random.SeedSequence(seed).spawn(1)[0]


def _batch_sampler(sampling: str, rng: np.random.Generator, n: int, k: int) -> Callable[[], Iterable[np.ndarray]]:
    """A function giving the index batches of one epoch."""
    if sampling == "uniform":
        return lambda: (sample_indices(rng, n, k) for _ in range(n // k))
    return lambda: epoch_indices(rng, n, k, drop_last=True)


def _resumed_history(checkpoint, step, comm) -> list[EpochRecord]:
    """The epochs a checkpoint holds, loaded into `step` (on every rank), or [] without one.
    Rank 0 decides whether the file exists, so that every rank takes the same path."""
    if checkpoint is None:
        return []
    exists = os.path.exists(checkpoint) if comm is None or comm.Get_rank() == 0 else None
    if comm is not None:
        exists = comm.bcast(exists, root=0)
    if not exists:
        return []
    rows = load_checkpoint(checkpoint, step, comm).get("history", np.zeros((0, len(dataclasses.fields(EpochRecord)))))
    return [EpochRecord(int(row[0]), *(float(value) for value in row[1:])) for row in rows]


def _history_array(history: list[EpochRecord]) -> np.ndarray:
    return np.array([dataclasses.astuple(record) for record in history], np.float64)


def _error_rate(predict_fn: CompiledFunction, x: np.ndarray, y: np.ndarray, comm) -> float:
    """error_rate over all of x; with `comm`, each rank classifies its share and the counts are summed."""
    if comm is None:
        return error_rate(predict_fn, x, y)
    share = np.array_split(np.arange(len(x)), comm.Get_size())[comm.Get_rank()]
    wrong = int(np.sum(predict_classes(predict_fn, x[share]) != np.asarray(y).reshape(-1)[share]))
    return comm.allreduce(wrong) / len(x)


def _run_epoch(step, model: Model, x: np.ndarray, y: np.ndarray, batches: Iterable[np.ndarray], display,
               lr_schedule=None):
    """(mean loss, seconds, lr of the last step) of one epoch of training steps."""
    total_loss, steps, examples = 0.0, 0, 0
    lr = step.lr
    started = time.perf_counter()
    for indices in batches:
        total_loss += step(**{model.x.name: x[indices], model.y.name: y[indices]})
        if lr_schedule is not None:
            lr = step.lr
            lr_schedule.step()
        steps += 1
        examples += len(indices)
        display.step(total_loss / steps, examples / (time.perf_counter() - started))
    return total_loss / steps, time.perf_counter() - started, lr


# ---- prediction ------------------------------------------------------------------------------

def predict_classes(compiled_logits_fn: CompiledFunction, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    """Class ids (int32) of every example of x, from a compiled function of one input whose
    (first) output is the logits: argmax over classes, or logit > 0 for a single-logit binary model.

    The compiled function has a static batch size (checked against `batch` when given): x is
    run batch by batch, the last partial batch padded with zeros whose predictions are dropped.
    """
    images = _only_input(compiled_logits_fn)
    if batch is not None and batch != images.shape[0]:
        raise ValueError(f"predict_classes: batch {batch} differs from the compiled function's batch {images.shape[0]}")
    batch = images.shape[0]
    examples = _as_model_input(np.asarray(x, dtype=np.float32), images)
    classes = np.empty(len(examples), dtype=np.int32)
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        count = len(chunk)
        if count < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - count,) + chunk.shape[1:], np.float32)])
        logits = compiled_logits_fn(**{images.name: chunk})
        if isinstance(logits, list):
            logits = logits[0]
        classes[start:start + count] = _class_ids(logits[:count])
    return classes


def error_rate(compiled_logits_fn: CompiledFunction, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of the examples of x that the compiled logits function misclassifies."""
    return float(np.mean(predict_classes(compiled_logits_fn, x) != np.asarray(y).reshape(-1)))


def _only_input(fn: CompiledFunction) -> Tensor:
    inputs = [node for node in fn.graph.ancestors(fn.outputs) if node.op == "input"]
    if len(inputs) != 1:
        raise ValueError(f"predict_classes: the compiled function must take one input (the images), "
                         f"it takes {[node.name for node in inputs]}")
    return inputs[0]


def _class_ids(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int32)
    return np.argmax(logits, axis=1).astype(np.int32)


def _as_model_input(x: np.ndarray, model_input: Tensor) -> np.ndarray:
    """x (n, ...) reshaped to the model input's per-example shape, e.g. (n, 1, 8, 8) -> (n, 64)."""
    example_shape = model_input.shape[1:]
    if math.prod(x.shape[1:]) != math.prod(example_shape):
        raise ValueError(f"examples of shape {x.shape[1:]} do not fit the model's input {model_input.name!r} "
                         f"{model_input.shape}")
    return x.reshape((len(x),) + example_shape)


# ---- progress display ------------------------------------------------------------------------

def _progress_display(enabled: bool, epochs: int, total_steps: int):
    """A tqdm bar with the running loss and throughput plus one line per epoch; without tqdm,
    the per-epoch lines alone; nothing when disabled."""
    if not enabled:
        return _SilentDisplay()
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineDisplay(epochs)
    return _TqdmDisplay(tqdm(total=total_steps, unit="step", desc="training", dynamic_ncols=True), epochs)


def _epoch_summary(record: EpochRecord, epochs: int) -> str:
    return (f"epoch {record.epoch}/{epochs}  loss {record.loss:.4f}  train error {record.train_error:.2%}  "
            f"test error {record.test_error:.2%}  gap {record.generalization_gap:+.2%}  "
            f"{record.seconds:.3g} s  {record.examples_per_second:,.0f} examples/s")


class _SilentDisplay:
    def step(self, mean_loss: float, examples_per_second: float) -> None:
        pass

    def epoch_done(self, record: EpochRecord) -> None:
        pass

    def close(self) -> None:
        pass


class _LineDisplay(_SilentDisplay):
    def __init__(self, epochs: int):
        self.epochs = epochs

    def epoch_done(self, record: EpochRecord) -> None:
        print(_epoch_summary(record, self.epochs), flush=True)


class _TqdmDisplay(_LineDisplay):
    # A step can take microseconds: refresh the postfix text a few times a second, not every step.
    POSTFIX_INTERVAL = 0.25

    def __init__(self, bar, epochs: int):
        super().__init__(epochs)
        self.bar = bar
        self.postfix_time = 0.0

    def step(self, mean_loss: float, examples_per_second: float) -> None:
        now = time.perf_counter()
        if now - self.postfix_time >= self.POSTFIX_INTERVAL:
            self.bar.set_postfix_str(f"loss {mean_loss:.4f}, {examples_per_second:,.0f} examples/s", refresh=False)
            self.postfix_time = now
        self.bar.update(1)

    def epoch_done(self, record: EpochRecord) -> None:
        self.bar.set_postfix_str(f"loss {record.loss:.4f}, {record.examples_per_second:,.0f} examples/s")
        self.bar.write(_epoch_summary(record, self.epochs))

    def close(self) -> None:
        self.bar.close()
