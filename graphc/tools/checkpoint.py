"""Saving and loading named float32 arrays (parameters, and any other state) as `.npz` archives.

The format is an ordinary uncompressed .npz, one `<name>.npy` member per array stored as
little-endian float32, so `np.load(path, allow_pickle=False)` opens it as usual. Its zip comment,
the last bytes of the file, is `graphc-checkpoint/1 sha256=<64 hex digits>`: the SHA-256 of every
byte of the file before those digits. One digest over the whole file, zip structure included,
means a change anywhere is detected, not only in array data (zip's CRC-32 covers only member
contents, and zipfile ignores many header fields).

Writes are atomic: the archive is written to a temporary file in the destination's directory,
synced, and moved over the destination with `os.replace`, so a crash mid-write leaves either
the old checkpoint or the new one, never half of one.

Loads never unpickle (a checkpoint from elsewhere cannot run code), and validate before they
trust or allocate: the path must be a regular file (a FIFO would block), the digest must match
before the zip is parsed, and every member's declared shape must agree with the bytes the file
holds, so a crafted header cannot request a huge allocation. Every kind of damage becomes a
ValueError that names the file; a missing or unreadable file stays an OSError.

Archives without the digest (np.savez, or graphc before the digest existed) are still read,
since they were the documented format, with the same structural checks; they are only as well
protected against damage as zip's CRC-32 makes them, and a UserWarning naming the file says so.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
import struct
import unicodedata
import warnings
import zipfile
from collections.abc import Mapping

import numpy as np

from graphc.core.ir import Graph
from graphc.tools.files import DEFLATE_MAX_RATIO, READ_CHUNK, open_regular_file

# A zip archive starts with a local file header, or when empty with the end-of-directory record.
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
_END_OF_DIRECTORY = b"PK\x05\x06"
_END_OF_DIRECTORY_SIZE = 22                # the fixed part, before the comment
_DIGEST_PREFIX = b"graphc-checkpoint/1 sha256="
_DIGEST_HEX_LENGTH = 64
_COMMENT_LENGTH = len(_DIGEST_PREFIX) + _DIGEST_HEX_LENGTH
_STORED_DTYPE = np.dtype("<f4")
_MEMBER_SUFFIX = ".npy"
_MAX_MEMBER_NAME_BYTES = 0xFFFF            # zip's 16-bit name length


class _Damaged(ValueError):
    """A ValueError whose message already names the file: passed through as is."""


# ---- saving ----------------------------------------------------------------------------------

def save_params(path, params: Mapping[str, np.ndarray]) -> None:
    """Write `params` (name -> floating-point array, stored as float32) to the .npz at exactly `path`.

    Any named arrays can be saved (parameters, buffers, optimizer state, a step count as a
    float32 array). Names must be non-empty strings without control characters or backslashes.
    """
    arrays = {name: _checked_array(name, value) for name, value in params.items()}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary, file = _create_temporary(directory, os.path.basename(path))
    try:
        with file:
            _write_npz(file, arrays)
            _write_digest(file)
            file.flush()
            os.fsync(file.fileno())   # the data must be on disk before the rename makes it visible
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _checked_array(name, value) -> np.ndarray:
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"save_params: param name {name!r} {problem}")
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"save_params: param {name!r} has dtype {array.dtype}; params are floating point")
    return np.asarray(array, dtype=_STORED_DTYPE, order="C")   # ascontiguousarray would make 0-d arrays 1-d


def _name_problem(name) -> str | None:
    """Why `name` cannot name an array in a checkpoint, or None."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    # zipfile cuts a name at NUL, and control characters make names that print misleadingly.
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        return f"holds control or surrogate characters {''.join(bad)!r}"
    if "\\" in name:   # zipfile turns it into "/" on Windows, so the name would not round-trip
        return "holds a backslash"
    if len((name + _MEMBER_SUFFIX).encode("utf-8")) > _MAX_MEMBER_NAME_BYTES:
        return f"is longer than a zip member name can be ({_MAX_MEMBER_NAME_BYTES} bytes)"
    return None


def _create_temporary(directory: str, basename: str):
    """(path, binary file open for writing and reading) of a new file next to the destination.

    Created with mode 0o666 so the umask decides the permissions, as for any new file
    (tempfile.mkstemp would make every checkpoint private to its owner).
    """
    while True:
        temporary = os.path.join(directory, f".{basename}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        return temporary, os.fdopen(fd, "w+b")


def _write_npz(file, arrays: dict[str, np.ndarray]) -> None:
    # The .npz layout (one .npy member per array) written directly rather than through
    # np.savez, whose own keyword arguments would collide with params named "file" or "allow_pickle".
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}{_MEMBER_SUFFIX}", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
        # A placeholder of the digest's length: the digest covers the comment's length field.
        archive.comment = _DIGEST_PREFIX + b"0" * _DIGEST_HEX_LENGTH


def _write_digest(file) -> None:
    """Overwrite the placeholder at the end of the file with the digest of everything before it."""
    covered = file.seek(0, os.SEEK_END) - _DIGEST_HEX_LENGTH
    file.seek(0)
    digest = _sha256_of_prefix(file, covered)
    file.seek(covered)
    file.write(digest.hexdigest().encode("ascii"))


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows, where this is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_of_prefix(file, length: int):
    """SHA-256 of the next `length` bytes of `file`; None when the file ends before them."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(length, READ_CHUNK)))   # not 1 MiB for a small file
    while length > 0:
        got = file.readinto(buffer[:min(length, READ_CHUNK)])
        if not got:
            return None
        digest.update(buffer[:got])
        length -= got
    return digest


# ---- loading ---------------------------------------------------------------------------------

def load_params(path, expected: Mapping[str, tuple] | Graph | None = None) -> dict[str, np.ndarray]:
    """name -> C-contiguous float32 array, from an archive written by `save_params` (or np.savez).

    `expected` (name -> shape, or a Graph whose params are expected) makes a checkpoint that does
    not fit the model fail here, naming every missing, unexpected and mis-shaped entry, rather
    than later inside a compiled call.
    """
    params = _read_checkpoint(path)
    if expected is not None:
        _check_expected(path, params, expected)
    return params


def _read_checkpoint(path) -> dict[str, np.ndarray]:
    with open_regular_file(path, "an .npz archive", _Damaged) as file:   # a missing file: FileNotFoundError
        try:
            params, has_digest = _read_verified_npz(path, file)
        except (_Damaged, MemoryError):
            raise   # MemoryError: the sizes were checked, so the arrays really do not fit
        except Exception as error:   # whatever zipfile or numpy raise on a damaged archive
            raise ValueError(f"{path}: damaged or truncated .npz archive "
                             f"({type(error).__name__}: {error})") from error
    if not has_digest:
        warnings.warn(f"{path}: a checkpoint without a checksum (np.savez, or an older graphc): damage "
                      f"beyond what zip's CRC-32 catches goes unnoticed; save it again to add one",
                      UserWarning, stacklevel=3)
    return params


def _read_verified_npz(path, file) -> tuple[dict[str, np.ndarray], bool]:
    """(name -> array, whether the file carried a digest), validating before reading."""
    size = os.fstat(file.fileno()).st_size
    _check_signature(path, file)
    has_digest = _has_digest(path, file, size)
    if has_digest:
        _verify_digest(path, file, size)
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        members = archive.infolist()
        names = [_checked_member(path, info, size, has_digest) for info in members]
        _check_unique(path, names)
        params = {name: _read_member(path, archive, info, has_digest) for name, info in zip(names, members)}
    return params, has_digest


def _check_signature(path, file) -> None:
    signature = file.read(4)
    if not signature:
        raise _Damaged(f"{path}: not an .npz archive (the file is empty)")
    if signature not in _ZIP_SIGNATURES:
        raise _Damaged(f"{path}: not an .npz archive (it starts with {signature!r}, not a zip signature)")


def _has_digest(path, file, size: int) -> bool:
    """Whether the archive ends with graphc's digest comment (True) or with no comment (False)."""
    tail_size = min(size, _END_OF_DIRECTORY_SIZE + _COMMENT_LENGTH)
    file.seek(size - tail_size)
    tail = file.read(tail_size)
    if _is_end_of_directory(tail[-_END_OF_DIRECTORY_SIZE:], comment_length=0):
        return False
    if (len(tail) == _END_OF_DIRECTORY_SIZE + _COMMENT_LENGTH
            and _is_end_of_directory(tail[:_END_OF_DIRECTORY_SIZE], comment_length=_COMMENT_LENGTH)
            and tail[_END_OF_DIRECTORY_SIZE:].startswith(_DIGEST_PREFIX)):
        return True
    raise _Damaged(f"{path}: damaged or truncated .npz archive (it ends neither with graphc's checksum "
                   f"nor with a zip end-of-directory record without a comment)")


def _is_end_of_directory(record: bytes, comment_length: int) -> bool:
    return (len(record) == _END_OF_DIRECTORY_SIZE and record.startswith(_END_OF_DIRECTORY)
            and struct.unpack("<H", record[-2:])[0] == comment_length)


def _verify_digest(path, file, size: int) -> None:
    covered = size - _DIGEST_HEX_LENGTH
    file.seek(0)
    digest = _sha256_of_prefix(file, covered)
    stored = file.read(_DIGEST_HEX_LENGTH)
    if digest is None or len(stored) != _DIGEST_HEX_LENGTH:
        raise _Damaged(f"{path}: damaged or truncated .npz archive (the file changed size while read)")
    if digest.hexdigest().encode("ascii") != stored:
        raise _Damaged(f"{path}: damaged .npz archive (CRC/checksum mismatch: the SHA-256 of its "
                       f"contents is not the one stored at its end)")


def _checked_member(path, info: zipfile.ZipInfo, size: int, has_digest: bool) -> str:
    """The array name of a member, after checking the member is what save_params or np.savez writes."""
    what = f"{path}: damaged .npz archive: member {info.orig_filename!r}"
    if info.filename != info.orig_filename:   # zipfile cut the name at a NUL (or replaced a backslash)
        raise _Damaged(f"{what} has a name zipfile alters (a NUL in it?)")
    if not info.filename.endswith(_MEMBER_SUFFIX):
        raise _Damaged(f"{what} is not an .npy array")
    name = info.filename[:-len(_MEMBER_SUFFIX)]
    problem = _name_problem(name)
    if problem:
        raise _Damaged(f"{what}: the name {problem}")
    if info.flag_bits & 0x1:
        raise _Damaged(f"{what} is encrypted")
    if info.header_offset + info.compress_size > size:
        raise _Damaged(f"{what} claims {info.compress_size} bytes at offset {info.header_offset}, "
                       f"past the end of the {size}-byte file")
    _check_compression(what, info, has_digest)
    return name


def _check_compression(what: str, info: zipfile.ZipInfo, has_digest: bool) -> None:
    # Bounding the uncompressed size by the compressed one bounds every later allocation by the file's size.
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise _Damaged(f"{what} is stored uncompressed, yet its sizes differ "
                           f"({info.file_size} and {info.compress_size} bytes)")
    elif info.compress_type == zipfile.ZIP_DEFLATED and not has_digest:   # np.savez_compressed
        if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 64:
            raise _Damaged(f"{what} claims {info.file_size} bytes from {info.compress_size} compressed: "
                           f"more than deflate can produce")
    else:
        raise _Damaged(f"{what} uses compression method {info.compress_type}, not one this format uses")


def _check_unique(path, names: list[str]) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise _Damaged(f"{path}: damaged .npz archive: {repeated} appear more than once")


def _read_member(path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, has_digest: bool) -> np.ndarray:
    name = info.filename[:-len(_MEMBER_SUFFIX)]
    with archive.open(info) as member:
        shape, fortran_order, dtype = _read_npy_header(path, name, member, has_digest)
        nbytes = math.prod(shape) * dtype.itemsize
        if member.tell() + nbytes != info.file_size:
            raise _Damaged(f"{path}: damaged .npz archive: entry {name!r} declares shape {shape} of {dtype}, "
                           f"{nbytes} bytes, but holds {info.file_size - member.tell()}")
        flat = _read_exactly(path, name, member, math.prod(shape), dtype)
        if member.read(1):   # also reaches the member's end, where zipfile checks the CRC-32
            raise _Damaged(f"{path}: damaged .npz archive: entry {name!r} holds more than its shape")
    array = flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)
    return np.asarray(array, dtype=np.float32, order="C")


def _read_npy_header(path, name: str, member, has_digest: bool):
    """(shape, fortran_order, dtype) from an .npy header, refusing anything but float arrays."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise _Damaged(f"{path}: damaged .npz archive: entry {name!r} has .npy version {version}")
    if any(extent < 0 for extent in shape):
        raise _Damaged(f"{path}: damaged .npz archive: entry {name!r} has a negative extent in {shape}")
    allowed = dtype == _STORED_DTYPE if has_digest else dtype.kind == "f" and not dtype.fields
    if not allowed:
        stored = "float32" if has_digest else "floating point"
        raise _Damaged(f"{path}: entry {name!r} has dtype {dtype}; params are {stored}")
    return shape, fortran_order, dtype


def _read_exactly(path, name: str, member, count: int, dtype: np.dtype) -> np.ndarray:
    """`count` elements read in chunks straight into their array (no second copy of the data)."""
    flat = np.empty(count, dtype)
    view = memoryview(flat.view(np.uint8))
    position = 0
    while position < len(view):
        chunk = member.read(min(READ_CHUNK, len(view) - position))
        if not chunk:
            raise _Damaged(f"{path}: damaged or truncated .npz archive: entry {name!r} ends early")
        view[position:position + len(chunk)] = chunk
        position += len(chunk)
    return flat


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
