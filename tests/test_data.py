"""graphc.tools.data: the embedded digits, IDX files (valid and malformed), and the minibatch samplers."""
import gzip
import math
import os
import sys
import tracemalloc

import numpy as np
import pytest
from fifo_guard import assert_fifo_refused_without_waiting

from graphc.tools.data import (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, Dataset, epoch_indices, load_digits, load_mnist,
                               read_idx_images, read_idx_labels, sample_indices, stratified_split)

DIGITS = 1797


# ---- embedded digits -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_sizes_shapes_and_ranges(digits):
    assert len(digits.x_train) + len(digits.x_test) == DIGITS
    assert len(digits.x_test) == round(0.25 * DIGITS)
    assert digits.shapes == {"x_train": (1348, 1, 8, 8), "y_train": (1348,), "x_test": (449, 1, 8, 8),
                             "y_test": (449,)}
    assert digits.x_train.dtype == digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == digits.y_test.dtype == np.int32
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(digits.y_train)) == set(np.unique(digits.y_test)) == set(range(10))
    assert digits.classes == 10


def test_digits_split_is_fixed_by_the_seed(digits):
    again = load_digits()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(digits, name), getattr(again, name))
    other = load_digits(seed=1)
    assert not np.array_equal(digits.y_test, other.y_test)


def test_digits_test_fraction():
    data = load_digits(test_fraction=0.4)
    assert len(data.x_test) == round(0.4 * DIGITS)
    assert len(data.x_train) + len(data.x_test) == DIGITS
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_stratified_split_partitions_and_keeps_class_shares():
    labels = np.repeat(np.arange(3), [50, 30, 21])
    train, test = stratified_split(labels, 0.3, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert len(test) == round(0.3 * len(labels))
    test_counts = np.bincount(labels[test], minlength=3)
    assert np.all(np.abs(test_counts - 0.3 * np.array([50, 30, 21])) < 1)


def test_subset_takes_the_first_training_examples(digits):
    small = digits.subset(100)
    np.testing.assert_array_equal(small.x_train, digits.x_train[:100])
    np.testing.assert_array_equal(small.y_train, digits.y_train[:100])
    assert small.x_test is digits.x_test
    with pytest.raises(ValueError, match="n_train"):
        digits.subset(0)


def test_dataset_rejects_labels_outside_its_classes():
    x = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="labels outside"):
        Dataset(x, np.array([0, 3], np.int32), x, np.array([0, 1], np.int32), classes=3, name="toy")


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "graphc\[demo\]"'):
        load_digits()


# ---- IDX files -------------------------------------------------------------------------------

def idx_bytes(magic: int, dims, payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def write(path, content: bytes, compress: bool = False):
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


@pytest.fixture
def pixels():
    return np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)


@pytest.mark.parametrize("name, compress", [("x-images-idx3-ubyte", False), ("x-images-idx3-ubyte.gz", True),
                                            ("gzipped-without-suffix", True)])
def test_idx_images_read_back_exactly(tmp_path, pixels, name, compress):
    path = write(tmp_path / name, idx_bytes(IDX_IMAGES_MAGIC, pixels.shape, pixels.tobytes()), compress)
    images = read_idx_images(path)
    assert images.shape == (5, 1, 3, 4) and images.dtype == np.float32
    np.testing.assert_array_equal(images[:, 0], pixels.astype(np.float32) / 255)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_labels_read_back_exactly(tmp_path, compress):
    labels = np.array([7, 0, 9, 3, 3], np.uint8)
    path = write(tmp_path / "y-labels-idx1-ubyte", idx_bytes(IDX_LABELS_MAGIC, [5], labels.tobytes()), compress)
    read = read_idx_labels(path)
    assert read.dtype == np.int32
    np.testing.assert_array_equal(read, labels)


MALFORMED_IMAGES = {
    "not IDX at all": (b"hello, world", "magic number 0x68656c6c"),
    "a labels file": (idx_bytes(IDX_LABELS_MAGIC, [3], bytes(3)), "it is a labels file"),
    "two dimensions": (idx_bytes(0x00000802, [2, 6], bytes(12)), "it has 2 dimensions"),
    "truncated header": (idx_bytes(IDX_IMAGES_MAGIC, [2, 3], b""), "truncated header"),
    "truncated payload": (idx_bytes(IDX_IMAGES_MAGIC, [2, 3, 4], bytes(23)), "truncated"),
    "extra bytes": (idx_bytes(IDX_IMAGES_MAGIC, [2, 3, 4], bytes(25)), "extra bytes"),
    "too short": (b"\x00\x00", "too short"),
}


@pytest.mark.parametrize("case", MALFORMED_IMAGES)
def test_malformed_idx_images_raise_naming_the_file_and_the_problem(tmp_path, case):
    content, problem = MALFORMED_IMAGES[case]
    path = write(tmp_path / "bad-images-idx3-ubyte", content)
    with pytest.raises(ValueError, match=problem) as error:
        read_idx_images(path)
    assert str(path) in str(error.value)


def test_size_errors_state_the_expected_and_actual_sizes(tmp_path):
    path = write(tmp_path / "short-images-idx3-ubyte", idx_bytes(IDX_IMAGES_MAGIC, [2, 3, 4], bytes(20)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) need 24 bytes of data, the file holds 20"):
        read_idx_images(path)


def test_malformed_idx_labels_raise(tmp_path):
    images = write(tmp_path / "images", idx_bytes(IDX_IMAGES_MAGIC, [1, 1, 1], b"\x00"))
    with pytest.raises(ValueError, match="it is an images file"):
        read_idx_labels(images)
    long = write(tmp_path / "labels", idx_bytes(IDX_LABELS_MAGIC, [2], bytes(3)))
    with pytest.raises(ValueError, match="extra bytes"):
        read_idx_labels(long)


def test_damaged_gzip_raises_value_error(tmp_path, pixels):
    compressed = gzip.compress(idx_bytes(IDX_IMAGES_MAGIC, pixels.shape, pixels.tobytes()))
    path = write(tmp_path / "images-idx3-ubyte.gz", compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="damaged gzip") as error:
        read_idx_images(path)
    assert str(path) in str(error.value)


def gzip_of(header: bytes, zeros: int) -> bytes:
    """A small gzip file that inflates to `header` and then `zeros` zero bytes (a bomb when large):
    one gzip member per MiB of zeros, which a gzip reader concatenates."""
    mib_of_zeros = gzip.compress(bytes(1 << 20), mtime=0)
    return gzip.compress(header, mtime=0) + mib_of_zeros * (zeros >> 20)


def peak_memory_of_refusal(read, path, problem):
    """The peak bytes allocated while `read(path)` raises a ValueError naming `path` and `problem`."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=problem) as error:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(error.value)
    return peak


MIB = 1 << 20


def test_a_gzip_bomb_behind_a_small_header_is_not_inflated(tmp_path, pixels):
    header = idx_bytes(IDX_IMAGES_MAGIC, pixels.shape, pixels.tobytes())
    path = write(tmp_path / "bomb-images-idx3-ubyte.gz", gzip_of(header, 200 * MIB))
    assert peak_memory_of_refusal(read_idx_images, path, "extra bytes") < 4 * MIB


def test_a_gzip_header_declaring_more_than_the_file_can_inflate_to_is_refused_unread(tmp_path):
    header = idx_bytes(IDX_IMAGES_MAGIC, [1_000_000, 28, 28], b"")   # 784 MB from a 200 KB file
    path = write(tmp_path / "huge-images-idx3-ubyte.gz", gzip_of(header, 200 * MIB))
    assert peak_memory_of_refusal(read_idx_images, path, "more than a .* gzip file can hold") < 4 * MIB


def test_a_gzip_read_stops_at_the_size_the_header_declares(tmp_path):
    header = idx_bytes(IDX_LABELS_MAGIC, [20 * MIB], b"")   # plausible for the file, but 200 MiB follow
    path = write(tmp_path / "long-labels-idx1-ubyte.gz", gzip_of(header, 200 * MIB))
    assert peak_memory_of_refusal(read_idx_labels, path, "extra bytes") < 30 * MIB


def test_a_plain_file_of_the_wrong_size_is_refused_before_its_payload_is_read(tmp_path, pixels):
    path = write(tmp_path / "long-images-idx3-ubyte", idx_bytes(IDX_IMAGES_MAGIC, pixels.shape, b""))
    with open(path, "r+b") as file:
        file.truncate(100 * MIB)   # sparse: no disk used
    problem = rf"need 60 bytes of data, the file holds {100 * MIB - 16}"
    assert peak_memory_of_refusal(read_idx_images, path, problem) < 4 * MIB


def test_a_directory_is_not_an_idx_file(tmp_path):
    with pytest.raises(ValueError, match="directory") as error:
        read_idx_labels(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    assert_fifo_refused_without_waiting(read_idx_labels, tmp_path / "labels-idx1-ubyte")


def write_mnist(directory, train_labels=6):
    """6 train and 4 test examples; the train files gzipped, the test files plain."""
    rng = np.random.default_rng(1)
    for prefix, n_images, n_labels, compress in [("train", 6, train_labels, True), ("t10k", 4, 4, False)]:
        pixels = rng.integers(0, 256, (n_images, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n_labels, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        write(directory / f"{prefix}-images-idx3-ubyte{suffix}",
              idx_bytes(IDX_IMAGES_MAGIC, pixels.shape, pixels.tobytes()), compress)
        write(directory / f"{prefix}-labels-idx1-ubyte{suffix}",
              idx_bytes(IDX_LABELS_MAGIC, labels.shape, labels.tobytes()), compress)


def test_load_mnist_finds_plain_and_gzipped_files(tmp_path):
    write_mnist(tmp_path)
    data = load_mnist(tmp_path)
    assert data.shapes == {"x_train": (6, 1, 28, 28), "y_train": (6,), "x_test": (4, 1, 28, 28), "y_test": (4,)}
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int32


def test_load_mnist_rejects_mismatched_counts(tmp_path):
    write_mnist(tmp_path, train_labels=5)
    with pytest.raises(ValueError, match="6 images but .*train-labels-idx1-ubyte.gz holds 5 labels"):
        load_mnist(tmp_path)


def test_load_mnist_names_a_missing_file(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


# ---- samplers --------------------------------------------------------------------------------

def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


# The 99.9th percentile of the chi-square distribution with 9 degrees of freedom: a fair
# sampler exceeds it once in a thousand seeds (and these seeds are fixed).
CHI2_9_DOF_999 = 27.88


def test_uniform_sampler_is_uniform_at_every_batch_position():
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(rng, 10, 8) for _ in range(4000)])
    assert draws.shape == (4000, 8) and draws.min() >= 0 and draws.max() <= 9
    assert chi_square(np.bincount(draws.ravel(), minlength=10)) < CHI2_9_DOF_999
    for position in range(8):
        assert chi_square(np.bincount(draws[:, position], minlength=10)) < CHI2_9_DOF_999


def test_uniform_sampler_draws_with_replacement():
    # Birthday problem: a batch of k from n without a repeat has probability n! / ((n-k)! n^k).
    n, k, batches = 20, 10, 4000
    rng = np.random.default_rng(1)
    with_repeat = np.mean([len(set(sample_indices(rng, n, k))) < k for _ in range(batches)])
    expected = 1 - math.perm(n, k) / n ** k
    standard_error = math.sqrt(expected * (1 - expected) / batches)
    assert abs(with_repeat - expected) < 5 * standard_error


def test_epoch_sampler_covers_every_index_once_when_k_divides_n():
    rng = np.random.default_rng(2)
    first = list(epoch_indices(rng, 12, 4))
    assert [len(batch) for batch in first] == [4, 4, 4]
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(12))
    second = np.concatenate(list(epoch_indices(rng, 12, 4)))
    assert not np.array_equal(np.concatenate(first), second)   # reshuffled every epoch


def test_epoch_sampler_shuffles_uniformly():
    rng = np.random.default_rng(3)
    first_examples = [next(epoch_indices(rng, 10, 5))[0] for _ in range(4000)]
    assert chi_square(np.bincount(first_examples, minlength=10)) < CHI2_9_DOF_999


def test_epoch_sampler_with_a_partial_last_batch():
    rng = np.random.default_rng(4)
    dropped = list(epoch_indices(rng, 10, 4, drop_last=True))
    assert [len(batch) for batch in dropped] == [4, 4]
    assert len(set(np.concatenate(dropped))) == 8
    completed = list(epoch_indices(rng, 10, 4, drop_last=False))
    assert [len(batch) for batch in completed] == [4, 4, 4]
    assert set(np.concatenate(completed)) == set(range(10))
    assert [len(batch) for batch in epoch_indices(rng, 3, 5, drop_last=False)] == [5]


def test_samplers_reject_impossible_sizes():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="no batch"):
        epoch_indices(rng, 3, 5)
    with pytest.raises(ValueError):
        sample_indices(rng, 0, 5)
    with pytest.raises(ValueError):
        epoch_indices(rng, 5, 0)
