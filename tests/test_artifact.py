"""fn.save(path) and graphc_runtime.load(path): a saved function or training step runs without
the compiler and goes on exactly as the compiled one would (API.md, "Deployment without the
compiler"); refusals are in test_artifact_refusals.py."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.tools import models
from graphc_runtime import artifact
from graphc_runtime.optimizers import hyper_values

BATCH = 8
OPTIMIZERS = {
    "sgd-momentum": lambda: gc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd-nesterov": lambda: gc.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda: gc.Adam(lr=1e-3, weight_decay=1e-4),
    "adamw": lambda: gc.AdamW(lr=1e-3, betas=(0.8, 0.99), weight_decay=1e-2),
}


def _lenet_step(optimizer, seed=0):
    model = models.lenet5(BATCH)
    params = gc.init_params(model.graph, seed=seed)
    step = gc.compile_training_step(model.loss, params, optimizer, seed=seed)
    return model, step


def _batches(model, count, seed=1):
    rng = np.random.default_rng(seed)
    return [models.random_batch(model, rng) for _ in range(count)]


def _assert_same_state(original, loaded):
    assert set(original.params) == set(loaded.params)
    for name, array in original.params.items():
        assert np.array_equal(array, loaded.params[name]), name
    assert set(original.state) == set(loaded.state)
    for name, array in original.state.items():
        assert np.array_equal(array, loaded.state[name]), name
    assert (original.calls, original.optimizer_steps, original.lr) == (loaded.calls, loaded.optimizer_steps, loaded.lr)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_loaded_training_step_trains_on_bit_for_bit(optimizer, tmp_path):
    model, step = _lenet_step(OPTIMIZERS[optimizer]())
    batches = _batches(model, 7)
    for feeds in batches[:2]:
        step(**feeds)
    step.save(tmp_path / "lenet.gcx")
    loaded = rt.load(tmp_path / "lenet.gcx")
    assert isinstance(loaded, rt.LoadedTrainingStep)
    _assert_same_state(step, loaded)
    for i, feeds in enumerate(batches[2:]):
        if i == 3:   # a schedule's new learning rate, set on both
            step.lr = loaded.lr = 0.5 * step.lr
        assert loaded(**feeds) == step(**feeds)
    _assert_same_state(step, loaded)


def test_dropout_batch_norm_and_adamw_go_on_bit_for_bit_after_a_save_of_the_loaded_step(tmp_path):
    model = models.digits_cnn(BATCH)
    params = gc.init_params(model.graph, seed=3)
    step = gc.compile_training_step(model.loss, params, gc.AdamW(lr=1e-2), seed=7)
    batches = _batches(model, 6, seed=2)
    step(**batches[0])
    step.save(tmp_path / "first.gcx")
    first = rt.load(tmp_path / "first.gcx")
    assert first.seed == 7 and first.calls == 1
    assert first.manifest.param_roles["bn1.running_mean"] == "buffer"
    assert first.manifest.param_roles["conv1.weight"] == "param"
    assert first(**batches[1]) == step(**batches[1])
    first.save(tmp_path / "second.gcx")               # the runtime writes artifacts too
    second = rt.load(tmp_path / "second.gcx")
    for feeds in batches[2:]:
        assert second(**feeds) == step(**feeds)       # new masks each call, as the step's
    _assert_same_state(step, second)


def test_a_loaded_function_returns_the_same_arrays_and_ignores_the_labels(tmp_path):
    model = models.lenet5(BATCH)
    params = gc.init_params(model.graph, seed=0)
    predict = gc.compile(model.logits, params)
    predict.save(tmp_path / "predict.gcx")
    loaded = rt.load(tmp_path / "predict.gcx")
    assert type(loaded) is rt.LoadedFunction and set(loaded.params) == set(params)
    feeds = _batches(model, 1)[0]
    assert np.array_equal(loaded(x=feeds["x"]), predict(x=feeds["x"]))
    assert np.array_equal(loaded(**feeds), predict(x=feeds["x"]))      # labels fed to a predictor: ignored
    with pytest.raises(ValueError, match="'x'"):
        loaded(x=feeds["x"][:1])


def test_a_loaded_function_updates_its_buffers_as_the_compiled_one(tmp_path):
    model = models.digits_cnn(BATCH)
    params = gc.init_params(model.graph, seed=0)
    forward = gc.compile([model.logits, model.loss], params, seed=5)
    forward.save(tmp_path / "forward.gcx")
    loaded = rt.load(tmp_path / "forward.gcx")
    for feeds in _batches(model, 3):
        for mine, theirs in zip(loaded(**feeds), forward(**feeds)):
            assert np.array_equal(mine, theirs)
    assert np.array_equal(loaded.params["bn1.running_var"], params["bn1.running_var"])
    assert loaded.calls == forward.calls == 3


def test_the_loaded_step_keeps_its_params_and_the_lr_is_checked(tmp_path):
    model, step = _lenet_step(gc.SGD(lr=0.1))
    step.save(tmp_path / "step.gcx")
    loaded = rt.load(tmp_path / "step.gcx")
    before = {name: array.copy() for name, array in loaded.params.items()}
    loaded(**_batches(model, 1)[0])
    assert all(not np.array_equal(before[name], loaded.params[name]) for name in ("conv1.w", "fc3.b"))
    loaded.load_params(before)
    assert all(np.array_equal(before[name], loaded.params[name]) for name in before)
    with pytest.raises(ValueError, match="lr"):
        loaded.lr = -1.0
    with pytest.raises(ValueError, match="lr"):
        loaded.lr = float("nan")
    loaded.lr = np.float32(0.25)
    assert loaded.lr == 0.25 and loaded.state == {}


@pytest.mark.parametrize("optimizer", [gc.SGD(lr=0.3, momentum=0.5), gc.Adam(lr=3e-4, betas=(0.85, 0.995)),
                                       gc.AdamW(lr=1e-2, weight_decay=0.05), gc.AdamW(lr=1e-2, weight_decay=0.0)])
def test_the_runtime_computes_the_hyperparameters_as_graphc(optimizer, tmp_path):
    from graphc.backend.artifact import _optimizer
    described = json.loads(json.dumps(_optimizer(optimizer, optimizer.lr)))   # as the manifest holds it
    for lr in (optimizer.lr, 1e-5, 0.123456789):
        for step in [*range(1, 200), 12345, 10 ** 7]:
            assert hyper_values({**described, "lr": lr}, lr, step) == optimizer.hyper_values(lr, step)


def test_the_manifest_says_what_the_artifact_holds(tmp_path):
    _, step = _lenet_step(gc.SGD(lr=0.1, momentum=0.9))
    step.save(tmp_path / "step.gcx")
    manifest, sections = artifact.read(tmp_path / "step.gcx")
    assert manifest["format_version"] == artifact.FORMAT_VERSION and manifest["kind"] == "training step"
    assert manifest["graphc_version"] == gc.__version__ and len(manifest["graph_hash"]) == 64
    assert manifest["target"]["triple"] == rt.host_target().triple and "sse2" in manifest["target"]["cpu_features"]
    assert manifest["optimizer"] == {"kind": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False}
    assert manifest["objects"] and all(bytes(sections[name][:4]) == b"\x7fELF" for name in manifest["objects"])
    assert bytes(sections["team"][:4]) == b"\x7fELF"
    layout = {entry["name"]: entry for entry in manifest["sections"]}
    assert layout["param:fc1.w"]["size"] == 120 * 400 * 4
    assert np.array_equal(np.frombuffer(sections["param:fc1.w"], np.float32).reshape(120, 400), step.params["fc1.w"])
    assert "state:momentum:fc1.w" in sections
    params = [slot for slot in manifest["slots"] if slot["kind"] == "param"]
    assert {slot["name"] for slot in params} == set(step.params) and {slot["role"] for slot in params} == {"param"}


_LOAD_WITHOUT_THE_COMPILER = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("sympy", "networkx", "llvmlite", "graphc"):
            raise ImportError(f"{name} must not be imported to run an artifact")

sys.meta_path.insert(0, Refuse())
import numpy as np
import graphc_runtime

step = graphc_runtime.load(sys.argv[1])
batches = np.load(sys.argv[2])
losses = [step(x=batches[f"x{i}"], y=batches[f"y{i}"]) for i in range(int(sys.argv[3]))]
print(json.dumps({"losses": losses, "threads": step.num_threads,
                  "params": {name: array.tobytes().hex() for name, array in step.params.items()},
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                    ("sympy", "networkx", "llvmlite", "graphc"))}))
"""


def test_a_saved_lenet_step_runs_where_the_compiler_cannot_be_imported(tmp_path, splitting_pays):
    model, step = _lenet_step(gc.Adam(lr=1e-3))
    assert step._program.max_threads > 1           # the thread team's code comes from the file
    batches = _batches(model, 5)
    step(**batches[0])
    step.save(tmp_path / "lenet.gcx")
    np.savez(tmp_path / "batches.npz", **{f"{k}{i}": feeds[k] for i, feeds in enumerate(batches[1:]) for k in feeds})
    environment = {**os.environ, "GRAPHC_NUM_THREADS": str(gc.get_num_threads())}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOAD_WITHOUT_THE_COMPILER),
                           str(tmp_path / "lenet.gcx"), str(tmp_path / "batches.npz"), "4"],
                          capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["modules"] == []
    assert result["threads"] == step.num_threads
    assert result["losses"] == [step(**feeds) for feeds in batches[1:]]
    assert result["params"] == {name: array.tobytes().hex() for name, array in step.params.items()}


def test_saving_an_optimizer_the_runtime_cannot_drive_is_refused(tmp_path):
    from graphc.backend.artifact import _optimizer

    class Scaled(gc.SGD):
        pass

    with pytest.raises(ValueError, match="Scaled"):
        _optimizer(Scaled(lr=0.1), 0.1)


def test_a_loaded_check_finite_step_stops_at_a_nan_with_nothing_updated(tmp_path):
    model = models.lenet5(BATCH)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1, momentum=0.9), check_finite=True)
    step.save(tmp_path / "checked.gcx")
    loaded = rt.load(tmp_path / "checked.gcx")
    assert loaded.manifest.check_finite
    feeds = _batches(model, 1)[0]
    feeds["x"][0, 0, 3, 3] = np.nan
    before = {name: array.copy() for name, array in loaded.params.items()}
    with pytest.raises(FloatingPointError):
        loaded(**feeds)
    assert all(np.array_equal(before[name], loaded.params[name]) for name in before) and loaded.calls == 0


def test_a_data_parallel_step_is_not_saved(tmp_path):
    model = models.softmax_regression(BATCH, features=16)
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    step._call_values._fixed = {"graphc:comm": None}     # what comm= binds: this process's MPI handles
    with pytest.raises(ValueError, match="data-parallel"):
        step.save(tmp_path / "step.gcx")
    assert not (tmp_path / "step.gcx").exists()
