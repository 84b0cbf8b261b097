"""Nearest-neighbour classification of digits (1-NN and k-NN); the distances from every test image
to every training image come from a compiled graph, ‖a‖² − 2a·b + ‖b‖² as one GEMM.

    python examples/nearest_neighbour.py [--k 1 3 5]
"""
import argparse
import time

from graphc.tools.classic import NearestNeighbors
from graphc.tools.data import load_digits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3, 5], help="neighbour counts to try")
    args = parser.parse_args()

    digits = load_digits()
    for k in args.k:
        started = time.perf_counter()
        knn = NearestNeighbors(digits.x_train, digits.y_train, k=k)   # "training" stores the images
        compiled = time.perf_counter()
        # A training image is its own nearest neighbour: 1-NN scores (nearly) 100% on the train split.
        train_accuracy = (knn.predict(digits.x_train) == digits.y_train).mean()
        predicting = time.perf_counter()
        test_accuracy = (knn.predict(digits.x_test) == digits.y_test).mean()
        predicted = time.perf_counter()
        print(f"{k}-NN  train accuracy {train_accuracy:.2%}  test accuracy {test_accuracy:.2%}  "
              f"(compile {compiled - started:.2f} s, {len(digits.x_test)} test predictions "
              f"{predicted - predicting:.3f} s)")


if __name__ == "__main__":
    main()
