"""The same linear softmax classifier on raw pixels and on SIFT-like edge-orientation histograms:
better features beat pixels.

    python examples/softmax_pixels_vs_features.py [--epochs 100]

The features come from a fixed graph (graphc.features): image gradients by fixed convolutions,
projection onto 8 orientations, half-wave rectification, average pooling over 2×2 cells and
per-cell normalization. `feature_softmax_classifier` puts that graph in front of the classifier,
so one compiled program computes features and logits from the images.
"""
import argparse

from graphc.tools.classic import feature_softmax_classifier, softmax_classifier
from graphc.tools.data import load_digits
from graphc.tools.features import feature_count
from graphc.tools.train import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()

    digits = load_digits()
    pixels = digits.image_shape[1] * digits.image_shape[2]
    classifiers = {
        f"pixels ({pixels} values)": lambda batch: softmax_classifier(batch, pixels),
        f"orientation histograms ({feature_count(digits.image_shape)} values)": feature_softmax_classifier,
    }
    print(f"linear softmax classifier on digits, {args.epochs} epochs of minibatch SGD")
    for name, model_fn in classifiers.items():
        result = train(model_fn, digits, epochs=args.epochs, batch_size=32, lr=0.3, progress=False)
        print(f"  {name:<36} train accuracy {result.accuracy(digits.x_train, digits.y_train):.2%}  "
              f"test accuracy {result.accuracy(digits.x_test, digits.y_test):.2%}  "
              f"({result.train_seconds:.2f} s)")


if __name__ == "__main__":
    main()
