"""Logistic regression (sigmoid + logistic loss) telling even digits from odd ones, on raw pixels,
trained by minibatch SGD with graphc's compiled training step.

    python examples/logistic_regression.py [--epochs 30]
"""
import argparse
import dataclasses

from graphc.tools.data import load_digits
from graphc.tools.models import logistic_regression
from graphc.tools.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()

    digits = load_digits()
    # A binary task: target 1 for odd digits, 0 for even ones.
    odd = dataclasses.replace(digits, y_train=digits.y_train % 2, y_test=digits.y_test % 2, classes=2,
                              name="digits: odd?")
    # One logit per 8×8 image, read as 64 pixels (train() flattens the images to fit the input).
    result = train(lambda batch: logistic_regression(batch, features=64), odd,
                   epochs=args.epochs, batch_size=32, lr=0.1, progress=False)

    print(f"logistic regression, odd vs even digits, {args.epochs} epochs in {result.train_seconds:.2f} s")
    print(f"  train accuracy {result.accuracy(odd.x_train, odd.y_train):.2%}")
    print(f"  test accuracy  {result.accuracy(odd.x_test, odd.y_test):.2%}")


if __name__ == "__main__":
    main()
