"""graphc.tools.train (the training loop, compiled prediction) and graphc.tools.checkpoint (.npz save/load)."""
import os
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.tools import models
from graphc.tools.checkpoint import load_params, save_params
from graphc.tools.data import Dataset, load_digits
from graphc.tools.train import predict_classes, train

EVAL_BATCH = 128   # does not divide the 449 test examples: the last batch is padded


def softmax_regression(batch):
    return models.softmax_regression(batch, features=64, classes=10)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def initial_params():
    return gc.init_params(softmax_regression(1).graph, seed=0)


@pytest.fixture(scope="module")
def trained(digits, initial_params):
    """Softmax regression, 3 epochs on the embedded digits; the params dict given in is trained in place."""
    params = {name: value.copy() for name, value in initial_params.items()}
    return train(softmax_regression, digits, epochs=3, batch_size=32, lr=0.1, momentum=0.9, weight_decay=1e-4,
                 progress=False, eval_batch=EVAL_BATCH, params=params)


# ---- training --------------------------------------------------------------------------------

def test_softmax_regression_learns_the_digits(trained, digits):
    # Measured 0.920..0.942 over seeds 0..9 (chance is 0.10).
    assert trained.accuracy(digits.x_test, digits.y_test) > 0.88
    assert trained.history[-1].test_error == pytest.approx(1 - trained.accuracy(digits.x_test, digits.y_test))


def test_history_records_every_epoch(trained):
    assert [record.epoch for record in trained.history] == [1, 2, 3]
    for record in trained.history:
        assert np.isfinite(record.loss)
        assert 0 <= record.train_error <= 1 and 0 <= record.test_error <= 1
        assert record.generalization_gap == pytest.approx(record.test_error - record.train_error)
        assert record.seconds > 0 and record.examples_per_second > 0
    assert trained.history[-1].loss < trained.history[0].loss
    assert trained.train_seconds == pytest.approx(sum(record.seconds for record in trained.history))
    assert trained.compile_seconds > 0


def test_params_are_trained_in_place(trained, initial_params):
    for name, initial in initial_params.items():
        assert trained.params[name] is trained.predict_fn.params[name]   # the compiled code's own array
        assert not np.array_equal(trained.params[name], initial)


def test_compiled_prediction_agrees_with_the_reference_executor(trained, digits):
    # The whole test split in one reference batch against the compiled function's padded batches.
    n = len(digits.x_test)
    reference_model = softmax_regression(n)
    x = digits.x_test.reshape(n, 64)
    (logits,) = gc.evaluate([reference_model.logits], {"x": x, "y": digits.y_test}, trained.params)
    np.testing.assert_array_equal(trained.predict(digits.x_test), np.argmax(logits, axis=1))
    np.testing.assert_allclose(trained.predict_fn(x=x[:EVAL_BATCH]), logits[:EVAL_BATCH], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(predict_classes(trained.predict_fn, digits.x_test, EVAL_BATCH),
                                  trained.predict(digits.x_test))


def test_uniform_sampling_trains_an_mlp(digits, capsys):
    result = train(lambda batch: models.mlp(batch, (64, 32, 10)), digits, epochs=2, batch_size=32, lr=0.05,
                   sampling="uniform", seed=1, progress=False)
    # Measured 0.90 with seed 1, 0.85..0.92 over seeds 0..9 (chance is 0.10).
    assert result.accuracy(digits.x_test, digits.y_test) > 0.8
    assert capsys.readouterr() == ("", "")   # progress=False prints nothing


def test_binary_logistic_regression_predicts_by_the_sign_of_its_logit(digits):
    train_mask, test_mask = digits.y_train < 2, digits.y_test < 2
    zeros_and_ones = Dataset(digits.x_train[train_mask], digits.y_train[train_mask],
                             digits.x_test[test_mask], digits.y_test[test_mask], classes=2, name="digits 0/1")
    result = train(lambda batch: models.logistic_regression(batch, features=64), zeros_and_ones, epochs=2,
                   batch_size=16, lr=0.1, progress=False)
    # Measured 0.99: 0 and 1 are the easiest pair.
    assert result.accuracy(zeros_and_ones.x_test, zeros_and_ones.y_test) > 0.95


def epoch_lines(text):
    return [line for line in text.splitlines() if line.startswith("epoch ")]


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_progress_shows_one_line_per_epoch(digits, monkeypatch, capsys, tqdm_installed):
    if not tqdm_installed:
        monkeypatch.setitem(sys.modules, "tqdm", None)   # makes `from tqdm import tqdm` fail
    train(softmax_regression, digits.subset(256), epochs=2, batch_size=32, lr=0.1, progress=True)
    out, err = capsys.readouterr()
    lines = epoch_lines(out)
    assert [line.split()[:2] for line in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert all("train error" in line and "test error" in line and "examples/s" in line for line in lines)
    # The bar (on stderr) shows the running loss and the throughput.
    assert ("loss" in err and "examples/s" in err) == tqdm_installed


def test_divergence_raises_instead_of_training_on(digits):
    with pytest.raises(FloatingPointError, match="smaller lr"):
        train(softmax_regression, digits.subset(256), epochs=1, batch_size=32, lr=1e38, progress=False)


def test_options_are_checked(digits):
    with pytest.raises(ValueError, match="sampling"):
        train(softmax_regression, digits, epochs=1, batch_size=32, lr=0.1, sampling="stratified")
    with pytest.raises(ValueError, match="batch_size"):
        train(softmax_regression, digits.subset(16), epochs=1, batch_size=32, lr=0.1)
    with pytest.raises(ValueError, match=r"do not fit the model's input 'x' \(32, 784\)"):
        train(lambda batch: models.softmax_regression(batch), digits, epochs=1, batch_size=32, lr=0.1)


# ---- checkpoints -----------------------------------------------------------------------------

@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    # "file" would collide with np.savez's own argument: it must round-trip all the same.
    return {"conv1.w": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
            "conv1.b": np.zeros(4, np.float32),
            "file": np.arange(6, dtype=np.float64).reshape(2, 3)}


def test_checkpoint_round_trip(tmp_path, params):
    path = tmp_path / "model.npz"
    save_params(path, params)
    loaded = load_params(path)
    assert loaded.keys() == params.keys()
    for name, value in loaded.items():
        assert value.dtype == np.float32 and value.flags.c_contiguous
        np.testing.assert_array_equal(value, params[name].astype(np.float32))
    assert os.listdir(tmp_path) == ["model.npz"]   # no temporary file left behind


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, params, monkeypatch):
    path = tmp_path / "model.npz"
    save_params(path, params)

    def fail_midway(file, array, **kwargs):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_params(path, {"other": np.ones(3, np.float32)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.npz"]
    assert load_params(path).keys() == params.keys()


def damage(path, how):
    content = path.read_bytes()
    if how == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif how == "flipped byte":
        position = content.index(b"\x93NUMPY") + 200   # inside the first array's data
        path.write_bytes(content[:position] + bytes([content[position] ^ 0xFF]) + content[position + 1:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a checkpoint")
    elif how == "npy":
        with open(path, "wb") as file:   # np.save(path) would append ".npy" to the name
            np.save(file, np.ones(3))


@pytest.mark.parametrize("how, message", [("truncated", "damaged or truncated"), ("flipped byte", "CRC"),
                                          ("empty", "empty"), ("text", "not an .npz"), ("npy", "not an .npz")])
def test_a_damaged_checkpoint_raises_value_error_naming_the_file(tmp_path, params, how, message):
    path = tmp_path / "model.npz"
    save_params(path, params)
    damage(path, how)
    with pytest.raises(ValueError, match=message) as error:
        load_params(path)
    assert str(path) in str(error.value)


def test_expected_shapes_name_every_mismatch(tmp_path, params):
    path = tmp_path / "model.npz"
    save_params(path, params)
    expected = {"conv1.w": (4, 1, 5, 5), "conv1.b": (4,), "fc.w": (10, 4)}
    with pytest.raises(ValueError) as error:
        load_params(path, expected=expected)
    message = str(error.value)
    assert "missing 'fc.w' (10, 4)" in message
    assert "unexpected 'file' (2, 3)" in message
    assert "'conv1.w' is (4, 1, 3, 3), expected (4, 1, 5, 5)" in message


def test_a_graph_is_an_expectation(tmp_path, trained):
    path = tmp_path / "softmax.npz"
    save_params(path, trained.params)
    loaded = load_params(path, expected=softmax_regression(1).graph)
    for name, value in trained.params.items():
        np.testing.assert_array_equal(loaded[name], value)
    with pytest.raises(ValueError, match="missing 'fc1.w'"):
        load_params(path, expected=models.mlp(1, (64, 16, 10)).graph)


def test_only_floating_point_params_are_saved(tmp_path):
    with pytest.raises(ValueError, match="dtype int64"):
        save_params(tmp_path / "model.npz", {"steps": np.arange(3)})
