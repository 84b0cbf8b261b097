"""The artifact file: a manifest and named binary sections, checksummed (`fn.save` writes one,
`graphc_runtime.load` reads it; what the manifest says is manifest.py's).

    offset 0   magic b"GRAPHCX\\0"
           8   format version, uint32 little-endian (FORMAT_VERSION)
          12   flags, uint32: 0
          16   length of the body, uint64
          24   sha256 of the body, 32 bytes
          56   the body: the manifest's length (uint64), the manifest (UTF-8 JSON), zeros up to a
               multiple of 64 bytes from the file's start, then the sections' data back to back,
               each at a multiple of 64 bytes from the data's start

The manifest lists every section (name, offset in the data, size, sha256). Reading checks, in
this order and before anything else is parsed: a regular file of bounded size, the magic, the
format version (before the checksum: another version may checksum otherwise), the length, the
body's checksum; then the manifest as strict JSON of bounded size, then each section's bounds
and checksum. Any failure is a ValueError naming the file and the check. Nothing is unpickled
or evaluated; the sections are bytes for the caller to check further (object code goes through
elf_link's validation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import struct
from collections.abc import Mapping

__all__ = ["FORMAT_VERSION", "ArtifactError", "pack", "read", "write"]

MAGIC = b"GRAPHCX\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")
_LENGTH = struct.Struct("<Q")
ALIGNMENT = 64
# Bounds on what a file may claim, far beyond any model graphc compiles for one CPU.
MAX_FILE_BYTES = 1 << 34
MAX_MANIFEST_BYTES = 1 << 24
MAX_SECTIONS = 1 << 16
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class ArtifactError(ValueError):
    """A file that is not an artifact this runtime can load, and why."""


def pack(manifest: Mapping, sections: Mapping[str, bytes]) -> bytes:
    """The artifact holding `manifest` (JSON-able; its "sections" entry is written here) and
    `sections` (name -> bytes)."""
    layout, data, offset = [], [], 0
    for name, blob in sections.items():
        blob = bytes(blob)
        layout.append({"name": name, "offset": offset, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        padding = -len(blob) % ALIGNMENT
        data += [blob, bytes(padding)]
        offset += len(blob) + padding
    text = json.dumps({**manifest, "sections": layout}, indent=1, allow_nan=False).encode("utf-8")
    start = _HEADER.size + _LENGTH.size + len(text)
    body = _LENGTH.pack(len(text)) + text + bytes(-start % ALIGNMENT) + b"".join(data)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest()) + body


def write(path, manifest: Mapping, sections: Mapping[str, bytes]) -> None:
    """Write the artifact to `path` atomically: a temporary file beside it, synced, renamed."""
    blob = pack(manifest, sections)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.incoming")
    try:
        with open(temporary, "xb") as file:
            file.write(blob)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read(path) -> tuple[dict, dict[str, memoryview]]:
    """(manifest, sections by name) of the artifact at `path`, every check above passed."""
    where = os.fspath(path)
    blob = _read_file(where)
    if len(blob) < _HEADER.size or not blob.startswith(MAGIC):
        raise ArtifactError(f"{where}: not a graphc artifact (no GRAPHCX header)")
    _, version, flags, length, digest = _HEADER.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format version {version}; this graphc_runtime reads version "
                            f"{FORMAT_VERSION} only")
    if flags != 0:
        raise ArtifactError(f"{where}: damaged: header flags {flags:#x}, expected 0")
    body = memoryview(blob)[_HEADER.size:]
    if length != len(body):
        raise ArtifactError(f"{where}: damaged: truncated or extended (the header says {length} bytes of body, "
                            f"the file holds {len(body)})")
    if hashlib.sha256(body).digest() != digest:
        raise ArtifactError(f"{where}: damaged: the checksum of its contents does not match")
    manifest, data = _manifest_and_data(where, body)
    return manifest, _sections(where, manifest, data)


def _read_file(where: str) -> bytes:
    """The file's bytes: a regular file (never a FIFO or a device, which could block or never
    end) of at most MAX_FILE_BYTES."""
    try:
        descriptor = os.open(where, _OPEN_FLAGS)
    except (FileNotFoundError, PermissionError) as error:   # as open() says it: not a damaged artifact
        raise type(error)(error.errno, f"cannot open the artifact ({error.strerror})", where) from None
    except OSError as error:
        raise ArtifactError(f"{where}: cannot open the artifact ({error.strerror})") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ArtifactError(f"{where}: not a regular file")
        if status.st_size > MAX_FILE_BYTES:
            raise ArtifactError(f"{where}: {status.st_size} bytes, more than the {MAX_FILE_BYTES} an artifact may have")
        with open(descriptor, "rb", closefd=False) as file:
            blob = file.read(status.st_size)
    except OSError as error:
        raise ArtifactError(f"{where}: cannot read the artifact ({error.strerror})") from None
    finally:
        os.close(descriptor)
    if len(blob) != status.st_size:
        raise ArtifactError(f"{where}: the file changed while it was read")
    return blob


def _manifest_and_data(where: str, body: memoryview) -> tuple[dict, memoryview]:
    if len(body) < _LENGTH.size:
        raise ArtifactError(f"{where}: damaged: no manifest")
    (length,) = _LENGTH.unpack_from(body)
    if length > min(MAX_MANIFEST_BYTES, len(body) - _LENGTH.size):
        raise ArtifactError(f"{where}: damaged: a manifest of {length} bytes")
    text = bytes(body[_LENGTH.size:_LENGTH.size + length])
    start = _HEADER.size + _LENGTH.size + length
    data_start = _LENGTH.size + length + (-start % ALIGNMENT)
    if data_start > len(body) or any(body[_LENGTH.size + length:data_start]):
        raise ArtifactError(f"{where}: damaged: the manifest's padding")
    try:
        manifest = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ArtifactError(f"{where}: damaged: the manifest is not JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: damaged: the manifest is not a JSON object")
    return manifest, body[data_start:]


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _sections(where: str, manifest: dict, data: memoryview) -> dict[str, memoryview]:
    layout = manifest.get("sections")
    if not isinstance(layout, list) or len(layout) > MAX_SECTIONS:
        raise ArtifactError(f"{where}: damaged: the manifest lists no sections")
    sections, end = {}, 0
    for entry in layout:
        if not (isinstance(entry, dict) and set(entry) == {"name", "offset", "size", "sha256"}
                and isinstance(entry["name"], str) and isinstance(entry["sha256"], str)
                and all(type(entry[key]) is int for key in ("offset", "size"))):
            raise ArtifactError(f"{where}: damaged: a section entry {str(entry)[:200]}")
        name, offset, size = entry["name"], entry["offset"], entry["size"]
        if name in sections:
            raise ArtifactError(f"{where}: damaged: two sections named {name!r}")
        if offset < end or offset % ALIGNMENT or size < 0 or offset + size > len(data):
            raise ArtifactError(f"{where}: damaged: section {name!r} lies outside the file or over another")
        section = data[offset:offset + size]
        if hashlib.sha256(section).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{where}: damaged: the checksum of section {name!r} does not match")
        sections[name] = section
        end = offset + size
    return sections
