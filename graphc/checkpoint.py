"""Saving and loading parameters as `.npz` archives.

Writes are atomic: the archive is written to a temporary file in the destination's directory
and moved over the destination with `os.replace`, so a crash mid-write leaves either the old
checkpoint or the new one, never half of one. Loads never unpickle (a checkpoint from elsewhere
cannot run code) and turn every kind of damage into a ValueError that names the file.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from .ir import Graph

# A zip archive starts with a local file header, or when empty with the end-of-directory record.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")


def save_params(path, params: Mapping[str, np.ndarray]) -> None:
    """Write `params` (name -> floating-point array) to the .npz archive at exactly `path`."""
    arrays = {name: _checked_array(name, value) for name, value in params.items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            _write_npz(file, arrays)
            file.flush()
            os.fsync(file.fileno())   # the data must be on disk before the rename makes it visible
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _checked_array(name, value) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise ValueError(f"save_params: param names must be non-empty strings, got {name!r}")
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"save_params: param {name!r} has dtype {array.dtype}; params are floating point")
    return array


def _write_npz(file, arrays: dict[str, np.ndarray]) -> None:
    # The .npz layout (one .npy member per array) written directly rather than through
    # np.savez, whose own keyword arguments would collide with params named "file" or "allow_pickle".
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def load_params(path, expected: Mapping[str, tuple] | Graph | None = None) -> dict[str, np.ndarray]:
    """name -> C-contiguous float32 array, from an archive written by `save_params` (or np.savez).

    `expected` (name -> shape, or a Graph whose params are expected) makes a checkpoint that does
    not fit the model fail here, naming every missing, unexpected and mis-shaped entry, rather
    than later inside a compiled call.
    """
    params = _read_npz(path)
    if expected is not None:
        _check_expected(path, params, expected)
    return params


def _read_npz(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as file:   # a missing file stays a FileNotFoundError
        signature = file.read(4)
        if not signature:
            raise ValueError(f"{path}: not an .npz archive (the file is empty)")
        if signature not in _ZIP_SIGNATURES:
            raise ValueError(f"{path}: not an .npz archive (it starts with {signature!r}, not a zip signature)")
        file.seek(0)
        try:
            with np.load(file, allow_pickle=False) as archive:
                loaded = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"{path}: damaged or truncated .npz archive ({error})") from error
    params = {}
    for name, array in loaded.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path}: entry {name!r} has dtype {array.dtype}; params are floating point")
        params[name] = np.ascontiguousarray(array, dtype=np.float32)
    return params


def _check_expected(path, params: dict[str, np.ndarray], expected) -> None:
    if isinstance(expected, Graph):
        shapes = {name: tensor.shape for name, tensor in expected.params.items()}
    else:
        shapes = {name: tuple(shape) for name, shape in expected.items()}
    problems = [f"missing {name!r} {shape}" for name, shape in shapes.items() if name not in params]
    problems += [f"unexpected {name!r} {params[name].shape}" for name in params if name not in shapes]
    problems += [f"{name!r} is {params[name].shape}, expected {shape}"
                 for name, shape in shapes.items() if name in params and params[name].shape != shape]
    if problems:
        raise ValueError(f"{path}: does not fit the expected params: " + "; ".join(problems))
