"""A decision tree trained by scikit-learn, compiled into graphc ops (the tensorized "GEMM"
form: feature-threshold comparisons and leaf selection as matrix products and step functions),
predicting exactly what scikit-learn predicts.

    python examples/decision_tree.py [--max-depth 12]
"""
import argparse
import time

import numpy as np
from sklearn.tree import DecisionTreeClassifier

from graphc.tools.classic import compile_decision_tree
from graphc.tools.data import load_digits


def best_time(predict, x, repeats=5) -> float:
    """Milliseconds of the fastest of a few calls: the first call also pays one-off start-up costs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-depth", type=int, default=None, help="default: grow until the leaves are pure")
    args = parser.parse_args()

    digits = load_digits()
    x_train = digits.x_train.reshape(len(digits.x_train), -1)   # a tree splits on single pixels
    x_test = digits.x_test.reshape(len(digits.x_test), -1)

    started = time.perf_counter()
    tree = DecisionTreeClassifier(max_depth=args.max_depth, random_state=0).fit(x_train, digits.y_train)
    fitted = time.perf_counter()
    compiled = compile_decision_tree(tree, n_features=x_train.shape[1])
    internal, leaves = compiled.matrices.paths.shape
    print(f"tree of depth {tree.get_depth()}: {internal} comparisons, {leaves} leaves "
          f"(fit {fitted - started:.2f} s, compile {time.perf_counter() - fitted:.2f} s)")

    predictions = compiled.predict(x_test)
    assert np.array_equal(predictions, tree.predict(x_test)), "the compiled tree disagrees with scikit-learn"
    print(f"graphc predictions identical to scikit-learn's on all {len(x_test)} test images "
          f"(graphc {best_time(compiled.predict, x_test):.2f} ms, "
          f"scikit-learn {best_time(tree.predict, x_test):.2f} ms)")
    print(f"train accuracy {(compiled.predict(x_train) == digits.y_train).mean():.2%}  "
          f"test accuracy {(predictions == digits.y_test).mean():.2%}")


if __name__ == "__main__":
    main()
