"""A convolutional network on digits: 3×3 convolutions with ReLU, max pooling, global average
pooling and a linear classifier, trained with the compiled training step.

    python examples/cnn.py [--epochs 30] [--threads 2]
"""
import argparse

import graphc as gc
from graphc.tools.classic import digits_cnn
from graphc.tools.data import load_digits
from graphc.tools.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="default: every core")
    args = parser.parse_args()
    if args.threads:
        gc.set_num_threads(args.threads)

    digits = load_digits()
    result = train(digits_cnn, digits, epochs=args.epochs, batch_size=32, lr=0.05, weight_decay=1e-4)
    print(f"CNN conv16 → conv32 → max pool → conv64 → global average pool → linear: "
          f"{args.epochs} epochs in {result.train_seconds:.2f} s (+ {result.compile_seconds:.2f} s compiling)")
    print(f"  train accuracy {result.accuracy(digits.x_train, digits.y_train):.2%}")
    print(f"  test accuracy  {result.accuracy(digits.x_test, digits.y_test):.2%}")


if __name__ == "__main__":
    main()
