"""Build LeNet-5, derive its gradient graph, print it, and check it against finite differences.

    python examples/lenet_gradient_graph.py [--batch 2] [--dot lenet.dot]
"""
import argparse

import numpy as np

import graphc as gc


def lenet(batch: int):
    g = gc.Graph("lenet")
    x = g.input("x", (batch, 1, 28, 28))
    y = g.input("y", (batch,), dtype="int32")
    h = gc.conv2d(x, g.param("conv1.w", (6, 1, 5, 5)), g.param("conv1.b", (6,)), padding="same")
    h = gc.avg_pool2d(gc.relu(h), 2)
    h = gc.conv2d(h, g.param("conv2.w", (16, 6, 5, 5)), g.param("conv2.b", (16,)))
    h = gc.avg_pool2d(gc.relu(h), 2)
    h = gc.relu(gc.linear(gc.flatten(h), g.param("fc1.w", (120, 400)), g.param("fc1.b", (120,))))
    h = gc.relu(gc.linear(h, g.param("fc2.w", (84, 120)), g.param("fc2.b", (84,))))
    logits = gc.linear(h, g.param("fc3.w", (10, 84)), g.param("fc3.b", (10,)))
    return g, gc.softmax_cross_entropy(logits, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dot", help="also write the graph as Graphviz DOT to this file")
    args = parser.parse_args()

    g, loss = lenet(args.batch)
    gc.grad(loss, list(g.params.values()))
    print(g)

    params = gc.init_params(g, seed=0)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32),
             "y": rng.integers(0, 10, args.batch).astype(np.int32)}
    print(f"\nloss = {float(gc.evaluate(loss, feeds, params)):.4f}")
    report = gc.grad_check(loss, params, feeds)
    print("\ngradient check (autodiff vs central differences, float64):")
    print(report)
    print("OK" if report.passed(1e-6) else "FAILED")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(g.to_dot())
        print(f"wrote {args.dot}")


if __name__ == "__main__":
    main()
