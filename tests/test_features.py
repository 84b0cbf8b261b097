"""The edge-orientation-histogram graph against a direct numpy computation of the same definition."""
import numpy as np
import pytest

import graphc as gc
from graphc.tools.features import (extract_features, feature_count, feature_graph, map_batches,
                                   orientation_histogram_features)


def numpy_orientation_histograms(images, orientations=8, cell=2, eps=1e-3):
    """The definition step by step, in float64 numpy: central-difference gradients with zero
    padding, projection onto unit vectors at 2πk/K, ReLU, cell means, per-cell L2 normalization."""
    padded = np.pad(images[:, 0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    gx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]) / 2
    gy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]) / 2
    angles = 2 * np.pi * np.arange(orientations) / orientations
    responses = np.maximum(np.cos(angles)[:, None, None] * gx[:, None] + np.sin(angles)[:, None, None] * gy[:, None], 0)
    n, k, h, w = responses.shape
    histograms = responses.reshape(n, k, h // cell, cell, w // cell, cell).mean(axis=(3, 5))
    norms = np.sqrt((histograms ** 2).sum(axis=1, keepdims=True))
    return (histograms / (norms + eps)).reshape(n, -1)


@pytest.fixture(scope="module")
def digit_images():
    datasets = pytest.importorskip("sklearn.datasets")
    return (datasets.load_digits().images[:300] / 16).astype(np.float32)[:, None]


def test_digit_features_match_numpy(digit_images):
    features = extract_features(digit_images, batch=128)     # 300 = 2 full batches + a padded one
    assert features.shape == (300, feature_count((1, 8, 8)))
    np.testing.assert_allclose(features, numpy_orientation_histograms(digit_images), rtol=1e-4, atol=1e-5)


def test_other_geometry_matches_numpy():
    images = np.random.default_rng(0).random((10, 1, 12, 16), dtype=np.float32)
    options = dict(orientations=6, cell=4, eps=1e-2)
    features = extract_features(images, batch=4, **options)
    assert features.shape == (10, 6 * 3 * 4)
    np.testing.assert_allclose(features, numpy_orientation_histograms(images, **options), rtol=1e-4, atol=1e-5)


def test_the_graph_is_fixed_and_the_reference_executor_agrees(digit_images):
    graph, x, features = feature_graph(16)
    assert graph.params == {}
    (reference,) = gc.evaluate([features], {"x": digit_images[:16]}, {})
    np.testing.assert_allclose(reference, numpy_orientation_histograms(digit_images[:16]), rtol=1e-4, atol=1e-5)


def test_a_vertical_edge_votes_for_the_orientation_of_its_gradient():
    dark_to_light = np.zeros((1, 1, 8, 8), dtype=np.float32)
    dark_to_light[..., 4:] = 1.0                        # the gradient points along +x: orientation 0
    histograms = extract_features(dark_to_light, batch=1).reshape(8, 4, 4)
    assert histograms.sum(axis=(1, 2)).argmax() == 0
    # Half-wave rectification: the opposite orientation (-x) sees nothing, except at the right
    # border, where the zero padding makes a light-to-dark edge.
    assert histograms[4, :, :3].max() < 1e-6


def test_normalization_makes_features_invariant_to_contrast(digit_images):
    options = dict(eps=1e-6)
    np.testing.assert_allclose(extract_features(0.25 * digit_images[:50], **options),
                               extract_features(digit_images[:50], **options), atol=1e-3)


@pytest.mark.parametrize("shape, cell, message", [((3, 8, 8), 2, "grayscale"), ((1, 8, 8), 3, "multiple")])
def test_bad_geometry_is_refused(shape, cell, message):
    g = gc.Graph()
    with pytest.raises(ValueError, match=message):
        orientation_histogram_features(g.input("x", (2,) + shape), cell=cell)


def test_map_batches_pads_the_last_batch_and_drops_its_rows():
    g = gc.Graph()
    x = g.input("x", (4, 3))
    doubled = gc.compile(x * 2.0, {})
    rows = np.arange(21, dtype=np.float32).reshape(7, 3)
    np.testing.assert_array_equal(map_batches(doubled, rows, 4), rows * 2)
    np.testing.assert_array_equal(map_batches(doubled, rows[:2], 4), rows[:2] * 2)
