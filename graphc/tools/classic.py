"""The classic image classifiers of the course, each as a graphc graph compiled to native code.

- `softmax_classifier`: a linear softmax classifier on any feature vector (e.g. raw pixels);
  `feature_softmax_classifier`: the same on the edge-orientation histograms of graphc.tools.features;
- `NearestNeighbors`: 1-NN and k-NN, distances by a compiled graph in GEMM form;
- `compile_decision_tree`: a trained scikit-learn tree turned into GEMMs and step functions;
- `digits_mlp`, `digits_cnn`: a ReLU multilayer perceptron and a small conv net for 1×8×8 digits.

Binary logistic regression is `graphc.tools.models.logistic_regression`. The trainable models return
a `graphc.tools.models.Model` and are trained by any loop over `gc.compile_training_step`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from graphc.backend.compiler import CompiledFunction
from graphc.backend.compiler import compile as compile_graph
from graphc.core import ops
from graphc.core.ir import Graph, Tensor
from graphc.core.ops.elementwise import elementwise
from graphc.core.scalar import Step
from graphc.tools import models
from graphc.tools.features import map_batches, orientation_histogram_features
from graphc.tools.models import Model

DIGITS_IMAGE = (1, 8, 8)
INSTALL_HINT = 'pip install "graphc[demo]"'


def softmax_classifier(batch: int, features: int, classes: int = 10) -> Model:
    """A linear softmax classifier (multinomial logistic regression) on (batch, features) vectors."""
    return models.softmax_regression(batch, features, classes)


def feature_softmax_classifier(batch: int, image=DIGITS_IMAGE, classes: int = 10, **feature_options) -> Model:
    """The linear softmax classifier on edge-orientation histograms, as one graph from the images:
    the fixed feature graph (no params, so training never differentiates through it) feeds the
    classifier's linear layer. `feature_options` are those of `orientation_histogram_features`."""
    g = Graph("feature_softmax")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    features = orientation_histogram_features(x, **feature_options)
    width = features.shape[1]
    logits = ops.linear(features, g.param("w", (classes, width)), g.param("b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def digits_mlp(batch: int, image=DIGITS_IMAGE, hidden=(128,), classes: int = 10) -> Model:
    """A ReLU multilayer perceptron on flattened images: linear → ReLU (per hidden width) → linear."""
    g = Graph("digits_mlp")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h = ops.flatten(x)
    widths = (h.shape[1],) + tuple(hidden)
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        h = ops.relu(ops.linear(h, g.param(f"fc{i + 1}.w", (n_out, n_in)), g.param(f"fc{i + 1}.b", (n_out,))))
    logits = ops.linear(h, g.param("out.w", (classes, widths[-1])), g.param("out.b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def digits_cnn(batch: int, image=DIGITS_IMAGE, widths=(16, 32, 64), classes: int = 10) -> Model:
    """conv3×3 → ReLU → conv3×3 → ReLU → max pool 2 → conv3×3 → ReLU → global average pool → linear.

    Same-padded convolutions keep the 8×8 grid until the one pooling step; global average
    pooling then makes the classifier's input independent of the image size.
    """
    g = Graph("digits_cnn")
    x = g.input("x", (batch,) + tuple(image))
    y = g.input("y", (batch,), dtype="int32")
    h, channels = x, image[0]
    for i, width in enumerate(widths):
        w = g.param(f"conv{i + 1}.w", (width, channels, 3, 3))
        h = ops.relu(ops.conv2d(h, w, g.param(f"conv{i + 1}.b", (width,)), padding="same"))
        if i == 1:
            h = ops.max_pool2d(h, 2)
        channels = width
    h = ops.global_avg_pool2d(h)
    logits = ops.linear(h, g.param("fc.w", (classes, channels)), g.param("fc.b", (classes,)))
    return Model(g, x, y, logits, ops.softmax_cross_entropy(logits, y))


def _step(x: Tensor) -> Tensor:
    """1 where x > 0, else 0 (elementwise)."""
    return elementwise(Step, x, name="step")


# ---- nearest neighbour ------------------------------------------------------------------------

def squared_distance_graph(batch: int, n_points: int, dims: int) -> tuple[Graph, Tensor]:
    """(graph, distances): ‖q‖² − 2 q·p + ‖p‖² between the queries "x" (batch, dims) and every
    row of the param "points" (n_points, dims), as one GEMM plus norms."""
    g = Graph("squared_distances")
    queries = g.input("x", (batch, dims))
    points = g.param("points", (n_points, dims))
    query_norms = ops.sum(queries * queries, axis=1, keepdims=True)
    point_norms = ops.reshape(ops.sum(points * points, axis=1), (1, n_points))
    cross = queries @ ops.transpose(points)
    # Rounding can leave a tiny negative for (near-)duplicate points; a distance never is.
    return g, ops.relu(query_norms - 2.0 * cross + point_norms)


def smallest_in_each_row(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest values, ordered by (value, column): what a stable
    argsort would give, at the cost of a partition (sorting whole rows took far longer than
    the distances; bench/NOTES.md)."""
    kth_smallest = np.partition(values, k - 1, axis=1)[:, k - 1:k]
    # Every value up to the k-th smallest is a candidate, ties at the boundary included.
    rows, columns = np.nonzero(values <= kth_smallest)
    order = np.lexsort((columns, values[rows, columns], rows))
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(values)))[:-1]])
    return columns[order][starts[:, None] + np.arange(k)]


class NearestNeighbors:
    """k-nearest-neighbour classifier: a query gets the majority label of its k nearest training
    points (squared Euclidean distance on flattened inputs).

    Ties: neighbours at equal distance are ranked by their index in the training set; labels
    with equal votes go to the one whose first neighbour is nearest (so k=2 always agrees with
    1-NN). Distances are computed one batch of queries at a time, so memory stays at
    batch × training points.
    """

    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, k: int = 1, batch: int = 256):
        points = np.ascontiguousarray(np.reshape(train_x, (len(train_x), -1)), dtype=np.float32)
        if len(points) != len(train_y):
            raise ValueError(f"NearestNeighbors: {len(points)} training points but {len(train_y)} labels")
        if not 1 <= k <= len(points):
            raise ValueError(f"NearestNeighbors: k must be in 1..{len(points)}, got {k}")
        self.k = k
        self.batch = batch
        self.points = points
        self.classes, self._train_codes = np.unique(np.asarray(train_y), return_inverse=True)
        _, distances = squared_distance_graph(batch, *points.shape)
        self.distance_function: CompiledFunction = compile_graph(distances, {"points": self.points})

    def squared_distances(self, x: np.ndarray) -> np.ndarray:
        """(queries, training points) squared distances, from the compiled graph."""
        return map_batches(self.distance_function, self._queries(x), self.batch)

    def kneighbors(self, x: np.ndarray) -> np.ndarray:
        """(queries, k) indices of the nearest training points, nearest first."""
        return map_batches(self.distance_function, self._queries(x), self.batch,
                           transform=lambda distances: smallest_in_each_row(distances, self.k))

    def predict(self, x: np.ndarray) -> np.ndarray:
        neighbour_codes = self._train_codes[self.kneighbors(x)]
        rows = np.arange(len(neighbour_codes))[:, None]
        votes = np.zeros((len(neighbour_codes), len(self.classes)), dtype=np.int64)
        np.add.at(votes, (rows, neighbour_codes), 1)
        # Rank of each label's nearest neighbour among the k (k when the label got no vote).
        first_rank = np.full_like(votes, self.k)
        np.minimum.at(first_rank, (rows, neighbour_codes), np.arange(self.k))
        # One more vote always outweighs a nearer first neighbour (ranks are < k + 1).
        return self.classes[np.argmax(votes * (self.k + 1) - first_rank, axis=1)]

    def _queries(self, x: np.ndarray) -> np.ndarray:
        queries = np.reshape(np.asarray(x, dtype=np.float32), (len(x), -1))
        if queries.shape[1] != self.points.shape[1]:
            raise ValueError(f"NearestNeighbors: queries have {queries.shape[1]} features, "
                             f"the training points {self.points.shape[1]}")
        return queries


# ---- decision tree ----------------------------------------------------------------------------

@dataclasses.dataclass
class TreeMatrices:
    """A binary decision tree as the matrices of the GEMM strategy (I internal nodes, L leaves).

    selection  (features, I)  one-hot: column i picks node i's feature
    thresholds (I,)           x goes left at node i exactly when x < thresholds[i] (float32)
    paths      (I, L)         +1 if leaf l lies in node i's left subtree, -1 if in its right, else 0
    left_turns (L,)           the number of +1 entries of each leaf's column
    leaf_votes (L, classes)   one-hot: the class each leaf predicts
    """
    selection: np.ndarray
    thresholds: np.ndarray
    paths: np.ndarray
    left_turns: np.ndarray
    leaf_votes: np.ndarray


def float32_strict_upper_bound(thresholds: np.ndarray) -> np.ndarray:
    """The least float32 t' with: float32 x < t'  ⇔  x <= threshold (a float64), for every x.

    scikit-learn sends x left when float64(x) <= threshold; rounding the threshold to float32
    could flip the cases where x equals it or falls between it and its rounding.
    """
    with np.errstate(over="ignore"):   # beyond float32's range: ±inf, and the steps below still hold
        below = np.asarray(thresholds, dtype=np.float64).astype(np.float32)
        above = below.astype(np.float64) > thresholds
        below[above] = np.nextafter(below[above], np.float32(-np.inf))
        return np.nextafter(below, np.float32(np.inf))


def tree_matrices(tree, n_features: int) -> TreeMatrices:
    """The GEMM-strategy matrices of a fitted scikit-learn DecisionTreeClassifier's `tree_`."""
    left, right = tree.children_left, tree.children_right
    internal = [node for node in range(tree.node_count) if left[node] != right[node]]
    leaves = [node for node in range(tree.node_count) if left[node] == right[node]]
    column = {node: i for i, node in enumerate(internal)}
    # graphc tensors cannot be empty: a lone leaf keeps one all-zero comparison that no path uses.
    n_internal = max(len(internal), 1)
    selection = np.zeros((n_features, n_internal), dtype=np.float32)
    selection[tree.feature[internal], np.arange(len(internal))] = 1.0
    thresholds = np.zeros(n_internal, dtype=np.float32)
    thresholds[:len(internal)] = float32_strict_upper_bound(tree.threshold[internal])
    paths = np.zeros((n_internal, len(leaves)), dtype=np.float32)
    turns = _turns_to_each_node(left, right)
    for l, leaf in enumerate(leaves):
        for node, direction in turns[leaf]:
            paths[column[node], l] = direction
    leaf_votes = np.zeros((len(leaves), tree.value.shape[2]), dtype=np.float32)
    # np.argmax takes the first maximum, as scikit-learn's predict does on the same float64 values.
    leaf_votes[np.arange(len(leaves)), np.argmax(tree.value[leaves, 0, :], axis=1)] = 1.0
    return TreeMatrices(selection, thresholds, paths, (paths == 1).sum(axis=0).astype(np.float32), leaf_votes)


def _turns_to_each_node(left, right) -> dict[int, list[tuple[int, int]]]:
    """For every node, the (ancestor, +1 left / -1 right) turns from the root down to it."""
    turns = {0: []}
    stack = [0]
    while stack:
        node = stack.pop()
        if left[node] != right[node]:
            for child, direction in ((left[node], 1), (right[node], -1)):
                turns[child] = turns[node] + [(node, direction)]
                stack.append(child)
    return turns


def decision_tree_graph(batch: int, n_features: int, n_internal: int, n_leaves: int, n_classes: int):
    """(graph, votes): the one-hot class (batch, n_classes) of the leaf each row of "x" reaches.

    goes_left = step(thresholds − x @ selection)         1 where row r goes left at node i
    reached   = step(goes_left @ paths − left_turns + ½)  1 at the one leaf whose path agrees
    votes     = reached @ leaf_votes

    goes_left @ paths counts a leaf's agreeing left turns minus the left turns taken where its
    path goes right: it equals left_turns only for the leaf reached (integers, exact in float32).
    The matrices are params bound to fixed arrays, so the IR does not grow with the tree.
    """
    g = Graph("decision_tree")
    x = g.input("x", (batch, n_features))
    selection = g.param("selection", (n_features, n_internal))
    thresholds = g.param("thresholds", (n_internal,))
    goes_left = _step(thresholds - x @ selection)
    reached = _step(goes_left @ g.param("paths", (n_internal, n_leaves)) - g.param("left_turns", (n_leaves,)) + 0.5)
    return g, reached @ g.param("leaf_votes", (n_leaves, n_classes))


class CompiledDecisionTree:
    """A scikit-learn decision tree compiled to native code; `predict` equals the tree's own."""

    def __init__(self, matrices: TreeMatrices, classes: np.ndarray, batch: int):
        self.matrices = matrices
        self.classes = classes
        self.batch = batch
        n_features, n_internal = matrices.selection.shape
        n_leaves, n_classes = matrices.leaf_votes.shape
        _, votes = decision_tree_graph(batch, n_features, n_internal, n_leaves, n_classes)
        self.function: CompiledFunction = compile_graph(votes, dict(vars(matrices)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.matrices.selection.shape[0]:
            raise ValueError(f"CompiledDecisionTree: expected (N, {self.matrices.selection.shape[0]}) features, "
                             f"got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("CompiledDecisionTree: features must be finite (missing values are not supported)")
        return self.classes[np.argmax(map_batches(self.function, x, self.batch), axis=1)]


def compile_decision_tree(classifier, n_features: int, batch: int = 256) -> CompiledDecisionTree:
    """Compile a fitted `sklearn.tree.DecisionTreeClassifier` (single output) for native inference."""
    try:
        from sklearn.tree import DecisionTreeClassifier
    except ImportError:
        raise ImportError(f"compile_decision_tree needs scikit-learn: {INSTALL_HINT}") from None
    if not isinstance(classifier, DecisionTreeClassifier) or not hasattr(classifier, "tree_"):
        raise TypeError(f"compile_decision_tree: expected a fitted DecisionTreeClassifier, got {classifier!r}")
    if classifier.n_outputs_ != 1:
        raise ValueError(f"compile_decision_tree: only single-output trees, this one has {classifier.n_outputs_}")
    if classifier.n_features_in_ != n_features:
        raise ValueError(f"compile_decision_tree: the tree was fitted on {classifier.n_features_in_} features, "
                         f"not {n_features}")
    return CompiledDecisionTree(tree_matrices(classifier.tree_, n_features), classifier.classes_, batch)
