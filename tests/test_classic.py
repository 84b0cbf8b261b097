"""The classic classifiers: k-NN against brute force, the compiled tree against scikit-learn,
features against pixels, and short training runs of the logistic, MLP and CNN models."""
import collections
import sys

import numpy as np
import pytest

import graphc as gc
from graphc.tools import classic, models
from graphc.tools.features import map_batches

sklearn_tree = pytest.importorskip("sklearn.tree")


@pytest.fixture(scope="module")
def digits():
    """(x_train, y_train, x_test, y_test): images (n, 1, 8, 8) in [0, 1], a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    images = (bunch.images / 16).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, bunch.target.astype(np.int32), test_size=0.25,
                                                        random_state=0, stratify=bunch.target)
    return x_train, y_train, x_test, y_test


def flat(images):
    return images.reshape(len(images), -1)


# ---- nearest neighbour --------------------------------------------------------------------------

def brute_force_knn(train_x, train_y, queries, k):
    """Majority of the k nearest (float64 distances, ties by index); equal votes go to the label
    met first in order of distance."""
    distances = ((queries[:, None, :].astype(np.float64) - train_x[None, :, :]) ** 2).sum(axis=2)
    predictions = []
    for row in distances:
        labels = [train_y[i] for i in np.argsort(row, kind="stable")[:k]]
        counts = collections.Counter(labels)
        best = max(counts.values())
        predictions.append(next(label for label in labels if counts[label] == best))
    return np.array(predictions)


@pytest.mark.parametrize("k", [1, 3])
def test_knn_matches_brute_force_on_digits(digits, k):
    x_train, y_train, x_test, _ = digits
    knn = classic.NearestNeighbors(x_train, y_train, k=k, batch=128)
    # Digit pixels are multiples of 1/16: every distance is exact in float32, so even ties agree.
    np.testing.assert_array_equal(knn.predict(x_test), brute_force_knn(flat(x_train), y_train, flat(x_test), k))


def test_squared_distances_match_numpy_on_random_data():
    rng = np.random.default_rng(0)
    points, queries = rng.standard_normal((300, 20)), rng.standard_normal((70, 20))
    knn = classic.NearestNeighbors(points, np.zeros(300), batch=32)
    expected = ((queries[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(knn.squared_distances(queries), expected, rtol=1e-4, atol=1e-4)
    assert knn.squared_distances(points[:5]).min() >= 0       # a point to itself: 0, never below


def test_knn_tie_rules():
    points = np.array([[0.0], [1.0], [2.0], [3.0]])
    knn = classic.NearestNeighbors(points, np.array([7, 5, 5, 9]), k=3, batch=4)
    assert knn.predict(np.array([[0.1]]))[0] == 5                     # 2 votes beat a nearer 1
    knn = classic.NearestNeighbors(points, np.array([7, 5, 5, 9]), k=2, batch=4)
    assert knn.predict(np.array([[0.9]]))[0] == 5                     # 1 vote each: the nearest
    equidistant = classic.NearestNeighbors(np.array([[1.0], [-1.0]]), np.array([4, 3]), k=1, batch=4)
    assert equidistant.predict(np.array([[0.0]]))[0] == 4             # equal distances: lower index


def test_smallest_in_each_row_orders_like_a_stable_argsort():
    values = np.random.default_rng(3).integers(0, 5, (60, 40)).astype(np.float32)   # many ties
    for k in (1, 2, 7, 40):
        np.testing.assert_array_equal(classic.smallest_in_each_row(values, k),
                                      np.argsort(values, axis=1, kind="stable")[:, :k])


def test_knn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        classic.NearestNeighbors(np.zeros((3, 2)), np.zeros(3), k=4)
    knn = classic.NearestNeighbors(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="features"):
        knn.predict(np.zeros((1, 5)))


# ---- decision tree ------------------------------------------------------------------------------

def test_compiled_tree_equals_sklearn_on_the_digits_test_set(digits):
    x_train, y_train, x_test, _ = digits
    tree = sklearn_tree.DecisionTreeClassifier(random_state=0).fit(flat(x_train), y_train)
    compiled = classic.compile_decision_tree(tree, 64, batch=128)
    np.testing.assert_array_equal(compiled.predict(flat(x_test)), tree.predict(flat(x_test)))
    np.testing.assert_array_equal(compiled.predict(flat(x_train)), tree.predict(flat(x_train)))


def test_compiled_tree_equals_sklearn_on_random_data_and_at_every_threshold():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    labels = np.array(["a", "b", "c"])[(x[:, 0] + x[:, 1] ** 2 + 0.5 * rng.standard_normal(400) > 0.5).astype(int)
                                       + (x[:, 2] > 0)]
    tree = sklearn_tree.DecisionTreeClassifier(max_depth=8, random_state=0).fit(x, labels)
    compiled = classic.compile_decision_tree(tree, 6, batch=64)
    fresh = rng.standard_normal((500, 6)).astype(np.float32)
    np.testing.assert_array_equal(compiled.predict(fresh), tree.predict(fresh))
    # Queries sitting exactly on each threshold's float32 rounding and on its neighbours.
    internal = tree.tree_.feature >= 0
    on_thresholds = np.repeat(fresh[:1], 3 * internal.sum(), axis=0)
    rounded = tree.tree_.threshold[internal].astype(np.float32)
    values = np.concatenate([np.nextafter(rounded, -np.inf), rounded, np.nextafter(rounded, np.inf)])
    on_thresholds[np.arange(len(values)), np.tile(tree.tree_.feature[internal], 3)] = values
    np.testing.assert_array_equal(compiled.predict(on_thresholds), tree.predict(on_thresholds))


def test_float32_bound_reproduces_the_float64_comparison():
    rng = np.random.default_rng(2)
    thresholds = np.concatenate([rng.standard_normal(200), rng.standard_normal(50).astype(np.float32), [0.0, 1e39]])
    bound = classic.float32_strict_upper_bound(thresholds)
    with np.errstate(over="ignore"):
        rounded = thresholds.astype(np.float32)                 # 1e39 rounds to inf
    for x in (np.nextafter(rounded, -np.inf), rounded, np.nextafter(rounded, np.inf)):
        np.testing.assert_array_equal(x < bound, x.astype(np.float64) <= thresholds)


def test_a_single_leaf_tree_predicts_its_class():
    tree = sklearn_tree.DecisionTreeClassifier().fit(np.zeros((5, 3)), np.full(5, 4))
    compiled = classic.compile_decision_tree(tree, 3, batch=8)
    np.testing.assert_array_equal(compiled.predict(np.ones((3, 3))), [4, 4, 4])


def test_compile_decision_tree_names_the_extra_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.tree", None)     # makes `import sklearn.tree` fail
    with pytest.raises(ImportError, match=r'pip install "graphc\[demo\]"'):
        classic.compile_decision_tree(object(), 3)


def test_compiled_tree_rejects_missing_values(digits):
    x_train, y_train, _, _ = digits
    tree = sklearn_tree.DecisionTreeClassifier(max_depth=3).fit(flat(x_train), y_train)
    compiled = classic.compile_decision_tree(tree, 64, batch=16)
    with pytest.raises(ValueError, match="finite"):
        compiled.predict(np.full((1, 64), np.nan))


# ---- trained models -----------------------------------------------------------------------------

def fit_and_score(model_fn, x_train, y_train, x_test, y_test, *, epochs, lr, batch=32, eval_batch=150, seed=0):
    """Test accuracy after shuffled-epoch SGD with momentum on the compiled training step."""
    model = model_fn(batch)
    params = gc.init_params(model.graph, seed=seed)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=lr, momentum=0.9))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            step(x=x_train[rows], y=y_train[rows])
    logits = map_batches(gc.compile(model_fn(eval_batch).logits, params), x_test, eval_batch)
    predictions = (logits[:, 0] > 0) if logits.shape[1] == 1 else logits.argmax(axis=1)
    return float(np.mean(predictions == y_test.reshape(-1)))


def test_features_beat_pixels_for_the_softmax_classifier(digits):
    x_train, y_train, x_test, y_test = digits
    training = dict(epochs=100, lr=0.3)
    pixels = fit_and_score(lambda b: classic.softmax_classifier(b, 64), flat(x_train), y_train,
                           flat(x_test), y_test, **training)
    features = fit_and_score(classic.feature_softmax_classifier, x_train, y_train, x_test, y_test, **training)
    assert pixels > 0.93
    # Measured on this split: 0.967 on pixels, 0.989 on features.
    assert features >= pixels + 0.01


def test_logistic_regression_separates_zeros_from_ones(digits):
    x_train, y_train, x_test, y_test = digits
    train_rows, test_rows = y_train <= 1, y_test <= 1
    accuracy = fit_and_score(lambda b: models.logistic_regression(b, 64), flat(x_train[train_rows]),
                             y_train[train_rows, None].astype(np.float32), flat(x_test[test_rows]),
                             y_test[test_rows], epochs=5, lr=0.1, batch=16, eval_batch=30)
    assert accuracy > 0.98


@pytest.mark.parametrize("model_fn, expected", [(classic.digits_mlp, 0.93), (classic.digits_cnn, 0.93)])
def test_mlp_and_cnn_learn_digits(digits, model_fn, expected):
    assert fit_and_score(model_fn, *digits, epochs=8, lr=0.05) > expected


def test_the_cnn_has_the_documented_layers():
    model = classic.digits_cnn(4)
    ops_used = collections.Counter(node.op for node in model.graph.nodes)
    assert ops_used["conv2d"] == 3 and ops_used["max_pool2d"] == 1
    assert model.logits.shape == (4, 10)

