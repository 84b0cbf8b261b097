"""Image-classification data: the embedded digits, MNIST-format IDX files, and minibatch samplers.

Images are float32 arrays shaped (n, channels, height, width) with values in [0, 1], labels
int32 class ids. Compiled programs have static shapes, so the samplers always produce batches of
exactly k indices.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graphc.tools.files import DEFLATE_MAX_RATIO, READ_CHUNK, open_regular_file

IDX_IMAGES_MAGIC = 0x00000803   # unsigned bytes, 3 dimensions: count, rows, columns
IDX_LABELS_MAGIC = 0x00000801   # unsigned bytes, 1 dimension: count
_GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of an image-classification task."""

    x_train: np.ndarray   # (n_train, C, H, W) float32 in [0, 1]
    y_train: np.ndarray   # (n_train,) int32 in [0, classes)
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    name: str

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or x.dtype != np.float32:
                raise ValueError(f"{self.name}: x_{split} must be float32 (n, C, H, W), got {x.dtype} {x.shape}")
            if y.shape != (len(x),) or y.dtype != np.int32:
                raise ValueError(f"{self.name}: y_{split} must be int32 of shape ({len(x)},), got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= self.classes):
                raise ValueError(f"{self.name}: y_{split} holds labels outside 0..{self.classes - 1}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images are {self.x_train.shape[1:]} but test images "
                             f"are {self.x_test.shape[1:]}")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: getattr(self, name).shape for name in ("x_train", "y_train", "x_test", "y_test")}

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one example."""
        return self.x_train.shape[1:]

    def subset(self, n_train: int) -> "Dataset":
        """The first `n_train` training examples and the whole test split (for learning curves)."""
        if not 1 <= n_train <= len(self.x_train):
            raise ValueError(f"{self.name}: n_train must be in 1..{len(self.x_train)}, got {n_train}")
        return dataclasses.replace(self, x_train=self.x_train[:n_train], y_train=self.y_train[:n_train],
                                   name=f"{self.name}[:{n_train}]")


# ---- the embedded digits ---------------------------------------------------------------------

def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's embedded handwritten digits: 1,797 8×8 grey images of 0..9, no download.

    The split is stratified: each class puts the same share of its examples in the test split
    (the per-class counts are rounded so the test split holds exactly round(test_fraction · n)),
    so a small test set still represents every digit fairly. Both splits are then shuffled, so
    `subset(n)` takes a random sample. The same arguments always give the same split.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError('the embedded digits come with scikit-learn: pip install "graphc[demo]"') from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]   # pixel values are 0..16
    labels = bunch.target.astype(np.int32)
    train, test = stratified_split(labels, test_fraction, np.random.default_rng(seed))
    return Dataset(images[train], labels[train], images[test], labels[test], classes=10, name="digits")


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """(train indices, test indices), each shuffled, with every class split in the same proportion."""
    classes, counts = np.unique(labels, return_counts=True)
    n_test = round(test_fraction * len(labels))
    if not 0 < n_test < len(labels):
        raise ValueError(f"test_fraction {test_fraction} of {len(labels)} examples leaves a split empty")
    test_counts = _largest_remainder(counts * n_test / len(labels))
    train, test = [], []
    for label, count in zip(classes, test_counts):
        members = rng.permutation(np.flatnonzero(labels == label))
        test.append(members[:count])
        train.append(members[count:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _largest_remainder(shares: np.ndarray) -> np.ndarray:
    """Whole numbers near `shares` that add up to round(sum(shares)): the biggest fractions round up."""
    whole = np.floor(shares).astype(np.int64)
    short = round(shares.sum()) - whole.sum()
    whole[np.argsort(whole - shares, kind="stable")[:short]] += 1
    return whole


# ---- MNIST-format IDX files ------------------------------------------------------------------

def read_idx_images(path) -> np.ndarray:
    """Images of a `*-images-idx3-ubyte[.gz]` file as float32 (n, 1, rows, cols) in [0, 1]."""
    (count, rows, cols), pixels = _read_idx(path, IDX_IMAGES_MAGIC, "images")
    images = np.frombuffer(pixels, dtype=np.uint8).reshape(count, 1, rows, cols)
    return images.astype(np.float32) / np.float32(255)


def read_idx_labels(path) -> np.ndarray:
    """Labels of a `*-labels-idx1-ubyte[.gz]` file as int32 (n,)."""
    _, labels = _read_idx(path, IDX_LABELS_MAGIC, "labels")
    return np.frombuffer(labels, dtype=np.uint8).astype(np.int32)


def _read_idx(path, expected_magic: int, kind: str) -> tuple[tuple[int, ...], bytearray]:
    """(dimensions, payload) of an IDX file of unsigned bytes, checking the header against the size.

    Header: a big-endian 32-bit magic (0x0000, the element type 0x08 = unsigned byte, the number
    of dimensions), then one big-endian 32-bit size per dimension. The header is read and checked
    before the payload, and the payload read stops at the size the header declares, so a gzip
    bomb is never inflated beyond it.
    """
    with open_regular_file(path, "an IDX file") as file:
        file_size = os.fstat(file.fileno()).st_size
        compressed = _is_gzipped(path, file)
        stream = gzip.GzipFile(fileobj=file, mode="rb") if compressed else file
        try:
            dims, header_size = _read_idx_header(path, stream, expected_magic, kind)
            _check_declared_size(path, dims, header_size, file_size, compressed)
            return dims, _read_payload(path, stream, dims)
        except (OSError, EOFError, zlib.error) as error:
            if not compressed:
                raise
            raise ValueError(f"{path}: damaged gzip data ({error})") from error


def _is_gzipped(path, file) -> bool:
    """Whether the file starts with gzip's magic bytes or is named *.gz (then it must be gzip)."""
    magic = file.read(len(_GZIP_MAGIC))
    file.seek(0)
    return magic == _GZIP_MAGIC or str(path).endswith(".gz")


def _read_idx_header(path, stream, expected_magic: int, kind: str) -> tuple[tuple[int, ...], int]:
    """(dimensions, header size in bytes), leaving `stream` at the start of the payload."""
    start = stream.read(4)
    if len(start) < 4:
        raise ValueError(f"{path}: {len(start)} bytes is too short for an IDX header")
    magic = int.from_bytes(start, "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: magic number 0x{magic:08x} is not that of IDX {kind} "
                         f"(0x{expected_magic:08x}){_describe_magic(magic)}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    sizes = stream.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {header_size} bytes, "
                         f"the file has {4 + len(sizes)}")
    return tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim)), header_size


def _check_declared_size(path, dims: tuple[int, ...], header_size: int, file_size: int, compressed: bool) -> None:
    """Refuse a header that cannot fit the file before reading any of the payload."""
    expected_payload = math.prod(dims)
    if not compressed and file_size - header_size != expected_payload:
        _raise_size_mismatch(path, dims, file_size - header_size)
    if compressed and header_size + expected_payload > DEFLATE_MAX_RATIO * file_size:
        raise ValueError(f"{path}: the header's dimensions {dims} need {expected_payload} bytes of data, "
                         f"more than a {file_size}-byte gzip file can hold")


def _read_payload(path, stream, dims: tuple[int, ...]) -> bytearray:
    """Exactly the payload the header declares; more or less is an error (found without reading on)."""
    expected_payload = math.prod(dims)
    payload = bytearray()   # grown as data arrives: the declared size of a gzip file is unproven
    while len(payload) < expected_payload:
        chunk = stream.read(min(READ_CHUNK, expected_payload - len(payload)))
        if not chunk:
            _raise_size_mismatch(path, dims, len(payload))
        payload += chunk
    if stream.read(1):   # at a gzip stream's end this also checks its CRC
        _raise_size_mismatch(path, dims, None)
    return payload


def _raise_size_mismatch(path, dims: tuple[int, ...], held: int | None) -> None:
    """`held`: the payload bytes the file holds, or None when there are more than declared (not counted)."""
    expected_payload = math.prod(dims)
    problem = "truncated" if held is not None and held < expected_payload else "has extra bytes"
    holds = f"more than {expected_payload}" if held is None else held
    raise ValueError(f"{path}: {problem}: the header's dimensions {dims} need {expected_payload} bytes "
                     f"of data, the file holds {holds}")


def _describe_magic(magic: int) -> str:
    if magic == IDX_IMAGES_MAGIC:
        return "; it is an images file"
    if magic == IDX_LABELS_MAGIC:
        return "; it is a labels file"
    if magic >> 16 == 0 and (magic >> 8) & 0xFF == 0x08:
        return f"; it has {magic & 0xFF} dimensions"
    return "; not an IDX file of unsigned bytes"


MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def load_mnist(directory) -> Dataset:
    """MNIST (or a dataset in its format, such as Fashion-MNIST) from the four IDX files in
    `directory`, each plain or gzipped: train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]."""
    paths = {split: _find_idx_file(Path(directory), stem) for split, stem in MNIST_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        images, labels = read_idx_images(paths[f"x_{split}"]), read_idx_labels(paths[f"y_{split}"])
        if len(images) != len(labels):
            raise ValueError(f"{paths[f'x_{split}']} holds {len(images)} images but "
                             f"{paths[f'y_{split}']} holds {len(labels)} labels")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    classes = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
    return Dataset(**arrays, classes=classes, name="mnist")


def _find_idx_file(directory: Path, stem: str) -> Path:
    candidates = [directory / stem, directory / f"{stem}.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{directory}: found neither {candidates[0].name} nor {candidates[1].name}")


# ---- minibatch sampling ----------------------------------------------------------------------

def sample_indices(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k example indices drawn uniformly from 0..n-1 with replacement: the classic SGD recipe's
    minibatch i_1, ..., i_k ~ Uniform(n). An example may appear twice in one batch."""
    _check_batch(n, k)
    return rng.integers(0, n, size=k)


def epoch_indices(rng: np.random.Generator, n: int, k: int, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Batches of k indices covering one shuffled pass over 0..n-1.

    Every batch has exactly k indices, as a compiled step's static shapes require. When k does
    not divide n, drop_last=True leaves out the n mod k examples at the end of this epoch's
    shuffle (different ones each epoch); drop_last=False instead completes the last batch with
    examples from the start of the same shuffle, so every example is seen at least once.
    """
    _check_batch(n, k)
    order = rng.permutation(n)
    if drop_last:
        if k > n:
            raise ValueError(f"batch size {k} exceeds the {n} examples: drop_last=True would give no batch")
        batches = n // k
        order = order[:batches * k]
    else:
        batches = -(-n // k)
        order = np.resize(order, batches * k)   # np.resize repeats the array cyclically
    return iter(order.reshape(batches, k))


def _check_batch(n: int, k: int) -> None:
    if n < 1 or k < 1:
        raise ValueError(f"need at least one example and a batch size of at least 1, got n={n}, k={k}")
