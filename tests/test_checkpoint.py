"""graphc.tools.checkpoint's format and its refusals: every damaged or crafted file is a ValueError naming it.

The round trip, atomic replacement, expected shapes and a few damage cases are in test_train.py.
"""
import hashlib
import io
import os
import stat
import warnings
import zipfile

import numpy as np
import pytest
from fifo_guard import assert_fifo_refused_without_waiting

import graphc as gc
from graphc.tools.checkpoint import load_params, save_params

DIGEST_PREFIX = b"graphc-checkpoint/1 sha256="   # the documented format: pinned so a change is deliberate


@pytest.fixture
def state():
    """Named arrays of the kinds a checkpoint holds: params, optimizer state, a step count."""
    rng = np.random.default_rng(0)
    return {"fc.w": rng.standard_normal((3, 4)).astype(np.float32),
            "fc.b": np.zeros(4, np.float32),
            "momentum/fc.w": rng.standard_normal((3, 4)).astype(np.float32),
            "step": np.array(7, np.float32)}


@pytest.fixture
def checkpoint(tmp_path, state):
    path = tmp_path / "model.npz"
    save_params(path, state)
    return path


def assert_refused(path, match=None):
    with pytest.raises(ValueError, match=match) as error:
        load_params(path)
    assert str(path) in str(error.value)


# ---- the format ------------------------------------------------------------------------------

def test_save_and_load_are_exported_at_the_top_level(tmp_path, state):
    assert gc.save_params is save_params and gc.load_params is load_params
    path = tmp_path / "ckpt.npz"
    gc.save_params(path, state)
    loaded = gc.load_params(path, {name: value.shape for name, value in state.items()})
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_numpy_reads_a_checkpoint_without_pickle(checkpoint, state):
    with np.load(checkpoint, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(state)
        for name, value in state.items():
            assert archive[name].dtype == np.float32
            np.testing.assert_array_equal(archive[name], value)


def test_the_digest_ends_the_file_and_covers_every_byte_before_it(checkpoint):
    content = checkpoint.read_bytes()
    digest = content[-64:]
    assert content[-64 - len(DIGEST_PREFIX):-64] == DIGEST_PREFIX
    assert digest == hashlib.sha256(content[:-64]).hexdigest().encode()
    assert zipfile.ZipFile(checkpoint).comment == DIGEST_PREFIX + digest


def test_a_checkpoint_gets_the_permissions_of_any_new_file(tmp_path, state):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "model.npz"
    save_params(path, state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_the_file_and_then_its_directory_are_synced(tmp_path, state, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_params(tmp_path / "model.npz", state)
    assert synced == ["file", "directory"]


@pytest.mark.parametrize("name", ["a\x00b", "a\nb", "tab\there", "del\x7f", "surrogate\ud800", "back\\slash",
                                  "", 3])
def test_names_with_control_characters_are_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="param name") as error:
        save_params(tmp_path / "model.npz", {"fine": np.ones(2, np.float32), name: np.ones(2, np.float32)})
    assert repr(name) in str(error.value)
    assert os.listdir(tmp_path) == []


# ---- damage ----------------------------------------------------------------------------------

def test_every_single_bit_flip_is_refused(checkpoint):
    content = checkpoint.read_bytes()
    escaped = []
    fd = os.open(checkpoint, os.O_RDWR)   # flipped in place: rewriting the file each time is far slower
    try:
        for bit in range(8 * len(content)):
            position = bit // 8
            os.pwrite(fd, bytes([content[position] ^ (1 << bit % 8)]), position)
            try:
                load_params(checkpoint)
                escaped.append((position, bit % 8, "loaded"))
            except ValueError as error:
                if str(checkpoint) not in str(error):
                    escaped.append((position, bit % 8, f"unnamed: {error}"))
            except Exception as error:   # noqa: BLE001 - the point is to see every kind
                escaped.append((position, bit % 8, repr(error)))
            os.pwrite(fd, content[position:position + 1], position)
    finally:
        os.close(fd)
    assert escaped == [], f"{len(escaped)} of {8 * len(content)} flips escaped, e.g. {escaped[:5]}"


def test_every_truncation_is_refused(checkpoint):
    for length in reversed(range(checkpoint.stat().st_size)):
        os.truncate(checkpoint, length)   # in place, shortest last: rewriting the file each time is slower
        assert_refused(checkpoint)


def test_a_directory_is_refused(tmp_path):
    assert_refused(tmp_path, match="directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    assert_fifo_refused_without_waiting(load_params, tmp_path / "model.npz")


def raised_by(function, *args):
    try:
        function(*args)
    except Exception as error:   # noqa: BLE001 - returned for the test to judge
        return error
    return None


# ---- crafted files: a valid digest, or none at all, around bad contents ---------------------

def npy(shape, data=b"\x00" * 16, descr="<f4"):
    """.npy bytes whose header declares `shape` whatever `data` holds."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def write_archive(path, members, sealed, compression=zipfile.ZIP_STORED):
    """A zip of (member name, bytes); `sealed` adds a correct digest, as a crafted file could."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # zipfile warns of the duplicate names some cases need
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, content in members:
                archive.writestr(name, content)
            if sealed:
                archive.comment = DIGEST_PREFIX + b"0" * 64
    if sealed:
        reseal(path)
    return path


def reseal(path):
    content = path.read_bytes()
    path.write_bytes(content[:-64] + hashlib.sha256(content[:-64]).hexdigest().encode())


def rename_member(path, old: bytes, new: bytes, sealed):
    """Rewrite a member's name in both zip headers (zipfile itself would cut it at a NUL)."""
    path.write_bytes(path.read_bytes().replace(old, new))
    if sealed:
        reseal(path)


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize("shape", [(10**6, 10**6), (2**62,), (3, 2**40, 2**20)])
def test_a_header_declaring_a_huge_array_is_refused_before_allocating(tmp_path, sealed, shape):
    path = write_archive(tmp_path / "model.npz", [("w.npy", npy(shape))], sealed)
    assert_refused(path, match="declares shape")


def test_a_compressed_member_declaring_a_huge_array_is_refused(tmp_path):
    path = write_archive(tmp_path / "model.npz", [("w.npy", npy((10**6, 10**6)))], sealed=False,
                         compression=zipfile.ZIP_DEFLATED)
    assert_refused(path, match="declares shape")


@pytest.mark.parametrize("sealed", [True, False])
@pytest.mark.parametrize("character", [b"\x00", b"\n", b"\x1b"])
def test_a_member_name_with_a_control_character_is_refused(tmp_path, sealed, character):
    path = write_archive(tmp_path / "model.npz", [("abXcd.npy", npy((4,)))], sealed)
    rename_member(path, b"abXcd", b"ab" + character + b"cd", sealed)
    assert_refused(path, match="NUL" if character == b"\x00" else "control")


CRAFTED = {
    "float64 in a checkpoint with a digest": ([("w.npy", npy((2,), descr="<f8"))], True, "float32"),
    "an integer array": ([("w.npy", npy((4,), descr="<i4"))], False, "floating point"),
    "an object array": ([("w.npy", npy((2,), descr="|O"))], False, "floating point"),
    "a member that is not .npy": ([("w.npy", npy((4,))), ("notes.txt", b"hello")], True, "not an .npy"),
    "a repeated member": ([("w.npy", npy((4,))), ("w.npy", npy((4,)))], True, "more than once"),
    "data longer than the shape": ([("w.npy", npy((2,)))], True, "declares shape"),
    "data shorter than the shape": ([("w.npy", npy((8,)))], True, "declares shape"),
    "a negative extent": ([("w.npy", npy((-4,)))], True, "negative"),
    "not .npy at all": ([("w.npy", b"PK not an array")], True, "damaged"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_members_are_refused(tmp_path, case):
    members, sealed, problem = CRAFTED[case]
    assert_refused(write_archive(tmp_path / "model.npz", members, sealed), match=problem)


def test_a_compressed_member_in_a_checkpoint_with_a_digest_is_refused(tmp_path):
    path = write_archive(tmp_path / "model.npz", [("w.npy", npy((4,)))], sealed=True,
                         compression=zipfile.ZIP_DEFLATED)
    assert_refused(path, match="compression method")


def test_a_foreign_zip_comment_is_refused(tmp_path):
    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", npy((4,)))
        archive.comment = b"made elsewhere"
    assert_refused(path, match="checksum")


# ---- archives from before the digest ---------------------------------------------------------

@pytest.mark.parametrize("savez", [np.savez, np.savez_compressed])
def test_an_archive_without_a_digest_loads_with_a_warning(tmp_path, savez):
    path = tmp_path / "old.npz"
    savez(path, w=np.arange(6.0).reshape(2, 3), b=np.ones(3, np.float32))
    with pytest.warns(UserWarning, match="without a checksum") as warning:
        loaded = load_params(path)
    assert str(path) in str(warning[0].message)
    np.testing.assert_array_equal(loaded["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["w"].dtype == np.float32


def test_damage_to_an_archive_without_a_digest_is_still_refused(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, w=np.arange(64, dtype=np.float32))
    content = bytearray(path.read_bytes())
    content[content.index(b"\x93NUMPY") + 200] ^= 0x01   # inside the array data: zip's CRC-32 catches it
    path.write_bytes(bytes(content))
    assert_refused(path, match="CRC")
