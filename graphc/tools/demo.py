"""`graphc demo`: the image-recognition path end to end on scikit-learn's embedded digits.

Trains the CNN with the compiled training step (progress bar), then every classic classifier of
the course, then a modern CNN (batch norm, dropout, Adam, a cosine learning-rate schedule), and
prints one table: train/test accuracy, training time, inference time of the test set. Writes the
CNN's loss/error curves, a learning curve, the CNN's first-layer filters, the HTML report of its
compiled training step (gradient graph, kernels, timings: open it in a browser) and its trained
parameters to the output folder.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from graphc.backend.compiler import compile_training_step
from graphc.core.optim import SGD, Adam
from graphc.inspection import report
from graphc.tools import classic, models
from graphc.tools.checkpoint import save_params
from graphc.tools.data import Dataset, load_digits
from graphc.tools.plots import plot_filters, plot_learning_curve, plot_training_curves
from graphc.tools.train import train


@dataclasses.dataclass
class Row:
    name: str
    train_accuracy: float
    test_accuracy: float
    train_seconds: float
    inference_seconds: float


def run_demo(args) -> int:
    data = load_digits(seed=args.seed)
    out = Path(args.out)
    epochs = 3 if args.quick else args.epochs
    short = 2 if args.quick else 20
    from graphc_runtime import get_num_threads
    print(f"digits: {len(data.x_train)} training and {len(data.x_test)} test images of {data.x_train.shape[1:]}, "
          f"{data.classes} classes; {get_num_threads()} native thread(s)\n")

    print(f"Training the CNN with the compiled training step ({epochs} epochs, batch {args.batch}):")
    cnn = train(classic.digits_cnn, data, epochs=epochs, batch_size=args.batch, lr=args.lr, momentum=0.9,
                weight_decay=1e-4, seed=args.seed, progress=not args.no_progress)
    rows = [_trained_row("CNN (conv, ReLU, max pool, GAP)", cnn, data)]

    print("\nThe classic classifiers:")
    common = dict(batch_size=args.batch, momentum=0.9, seed=args.seed, progress=False)
    binary = _binary_task(data, 3, 8)
    logistic = train(lambda b: models.logistic_regression(b, 64), binary, epochs=short, lr=0.1,
                     weight_decay=1e-4, **common)
    rows.append(_trained_row("logistic regression (3 vs 8)", logistic, binary))
    pixels = train(lambda b: classic.softmax_classifier(b, 64), data, epochs=short, lr=0.1, weight_decay=1e-4,
                   **common)
    rows.append(_trained_row("softmax on pixels", pixels, data))
    features = train(classic.feature_softmax_classifier, data, epochs=short, lr=0.5, weight_decay=1e-4, **common)
    rows.append(_trained_row("softmax on orientation histograms", features, data))
    for k in (1, 3):
        rows.append(_fitted_row(f"{k}-nearest neighbour", lambda k=k: classic.NearestNeighbors(
            data.x_train, data.y_train, k=k), data))
    tree_row = _decision_tree_row(data, args.seed)
    if tree_row:
        rows.append(tree_row)
    mlp = train(classic.digits_mlp, data, epochs=short, lr=0.1, weight_decay=1e-4, **common)
    rows.append(_trained_row("MLP (64-128-10, ReLU)", mlp, data))
    rows.append(rows.pop(0))  # the CNN last, as the course builds up to it
    print(f"\nThe modern CNN (batch norm, dropout, Adam, cosine schedule; {epochs} epochs, as the CNN):")
    modern = train(models.digits_cnn, data, epochs=epochs, batch_size=args.batch, optimizer=Adam(lr=3e-3),
                   schedule="cosine", seed=args.seed, progress=False)
    rows.append(_trained_row("CNN + batch norm, dropout, Adam, cosine lr", modern, data))
    print(format_table(rows))

    print(f"\nFiles in {out}/:")
    for path in _pictures(cnn, data, out, args, short):
        print(f"  {path}")
    save_params(out / "cnn_params.npz", cnn.params)
    print(f"  {out / 'cnn_params.npz'}  (the trained CNN: gc.load_params)")
    return 0


def _binary_task(data: Dataset, negative: int, positive: int) -> Dataset:
    """The images of two classes, labelled 0 (negative) and 1 (positive)."""
    def pick(x, y):
        keep = (y == negative) | (y == positive)
        return x[keep], (y[keep] == positive).astype(np.int32)
    x_train, y_train = pick(data.x_train, data.y_train)
    x_test, y_test = pick(data.x_test, data.y_test)
    return Dataset(x_train, y_train, x_test, y_test, 2, f"{data.name} {negative} vs {positive}")


def _trained_row(name, result, data) -> Row:
    started = time.perf_counter()
    test_accuracy = result.accuracy(data.x_test, data.y_test)
    inference = time.perf_counter() - started
    return Row(name, result.accuracy(data.x_train, data.y_train), test_accuracy, result.train_seconds, inference)


def _fitted_row(name, fit, data) -> Row:
    started = time.perf_counter()
    classifier = fit()
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    test_accuracy = float(np.mean(classifier.predict(data.x_test) == data.y_test))
    inference = time.perf_counter() - started
    train_accuracy = float(np.mean(classifier.predict(data.x_train) == data.y_train))
    return Row(name, train_accuracy, test_accuracy, fit_seconds, inference)


def _decision_tree_row(data, seed) -> Row | None:
    try:
        from sklearn.tree import DecisionTreeClassifier
    except ImportError:
        print('  (decision tree skipped: pip install "graphc[demo]" for scikit-learn)')
        return None
    flat_train = data.x_train.reshape(len(data.x_train), -1)
    started = time.perf_counter()
    tree = DecisionTreeClassifier(random_state=seed).fit(flat_train, data.y_train)
    compiled = classic.compile_decision_tree(tree, flat_train.shape[1])
    fit_seconds = time.perf_counter() - started
    flat_test = data.x_test.reshape(len(data.x_test), -1)
    started = time.perf_counter()
    predictions = compiled.predict(flat_test)
    inference = time.perf_counter() - started
    agree = np.array_equal(predictions, tree.predict(flat_test))
    name = "decision tree (sklearn-trained, compiled)" + ("" if agree else " [DIFFERS FROM SKLEARN]")
    return Row(name, float(np.mean(compiled.predict(flat_train) == data.y_train)),
               float(np.mean(predictions == data.y_test)), fit_seconds, inference)


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'classifier':<{width}}  {'train acc':>9}  {'test acc':>8}  {'train s':>8}  {'infer ms':>8}",
             "-" * (width + 43)]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {100 * r.train_accuracy:8.1f}%  {100 * r.test_accuracy:7.1f}%  "
                     f"{r.train_seconds:8.2f}  {1000 * r.inference_seconds:8.1f}")
    return "\n".join(lines)


def _pictures(cnn, data, out: Path, args, short_epochs):
    yield plot_training_curves(cnn.history, out / "cnn_training.png")
    sizes, train_errors, test_errors = _learning_curve(data, args, short_epochs)
    yield plot_learning_curve(sizes, train_errors, test_errors, out / "learning_curve.png",
                              title="MLP on digits: error vs training-set size")
    yield plot_filters(cnn.params["conv1.w"], out / "cnn_conv1_filters.png")
    yield _step_report(cnn, data, out, args)


def _step_report(cnn, data: Dataset, out: Path, args) -> Path:
    """The report of the CNN's training step, its kernels timed on one minibatch (on copies of
    the trained params: nothing more is trained)."""
    model = classic.digits_cnn(args.batch)
    params = {name: array.copy() for name, array in cnn.params.items()}
    step = compile_training_step(model.loss, params, SGD(lr=args.lr, momentum=0.9, weight_decay=1e-4))
    feeds = {"x": data.x_train[:args.batch], "y": data.y_train[:args.batch].astype(np.int32)}
    return report(step, out / "cnn_report.html", feeds=feeds)


def _learning_curve(data: Dataset, args, short_epochs):
    """The MLP trained on growing prefixes of the training set, with the same number of steps."""
    sizes = [n for n in (50, 100, 200, 400, 800) if n < len(data.x_train)] + [len(data.x_train)]
    batch = 16
    train_errors, test_errors = [], []
    for n in sizes:
        subset = data.subset(n)
        epochs = max(1, (short_epochs * 40 * batch) // n) if not args.quick else 1
        result = train(classic.digits_mlp, subset, epochs=epochs, batch_size=batch, lr=0.05, momentum=0.9,
                       weight_decay=1e-4, seed=args.seed, progress=False)
        train_errors.append(1 - result.accuracy(subset.x_train, subset.y_train))
        test_errors.append(1 - result.accuracy(subset.x_test, subset.y_test))
    return sizes, train_errors, test_errors
