"""graphc_runtime.load refuses what it must not run, with a ValueError saying which check, before
any code is linked: damage (flipped bytes, truncation), another format version, code for another
CPU or machine, a manifest or object the checks reject; and never hangs on a file."""
import hashlib
import json
import re
import struct

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from fifo_guard import assert_fifo_refused_without_waiting
from graphc.tools import models
from graphc_runtime import artifact, cpu_features, deployed

HEADER = struct.Struct("<8sIIQ32s")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved LeNet-5 training step (Adam, batch 4) and a batch for it."""
    model = models.lenet5(4)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.Adam(lr=1e-3), seed=0)
    path = tmp_path_factory.mktemp("artifact") / "lenet.gcx"
    step.save(path)
    return path.read_bytes(), models.random_batch(model, np.random.default_rng(0))


@pytest.fixture
def linked(monkeypatch):
    """The object files load() links (a refused file must link none)."""
    calls = []
    native_library = deployed.NativeLibrary

    def recording(objects):
        calls.append(objects)
        return native_library(objects)

    monkeypatch.setattr(deployed, "NativeLibrary", recording)
    return calls


def _refused(path, match: str, linked) -> ValueError:
    with pytest.raises(ValueError, match=match) as caught:
        rt.load(path)
    assert str(path) in str(caught.value)
    assert linked == [], "code was linked before the refusal"
    return caught.value


def _rewritten(blob: bytes, edit_manifest=None, edit_sections=None) -> bytes:
    """The artifact with its manifest or sections changed, every checksum made right again."""
    manifest, sections = _parse(blob)
    if edit_manifest:
        edit_manifest(manifest)
    if edit_sections:
        edit_sections(sections)
    return artifact.pack({key: value for key, value in manifest.items() if key != "sections"}, sections)


def _parse(blob: bytes):
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".gcx") as file:
        file.write(blob)
        file.flush()
        manifest, sections = artifact.read(file.name)
        return manifest, {name: bytes(view) for name, view in sections.items()}


def _with_body_checksum(blob: bytearray) -> bytes:
    """`blob` with its header's checksum made right for its (edited) body."""
    blob[24:56] = hashlib.sha256(blob[HEADER.size:]).digest()
    return bytes(blob)


def test_the_untouched_artifact_loads_and_runs(saved, tmp_path):
    blob, feeds = saved
    (tmp_path / "a.gcx").write_bytes(blob)
    assert np.isfinite(rt.load(tmp_path / "a.gcx")(**feeds))
    (tmp_path / "b.gcx").write_bytes(_rewritten(blob))   # the test's rewriting changes nothing that matters
    assert rt.load(tmp_path / "b.gcx")(**feeds) == rt.load(tmp_path / "a.gcx")(**feeds)


def test_every_flipped_byte_is_refused_as_damage(saved, tmp_path, linked):
    blob, _ = saved
    manifest_end = HEADER.size + 8 + struct.unpack_from("<Q", blob, HEADER.size)[0]
    positions = sorted({*range(0, HEADER.size + 12), *range(manifest_end - 4, manifest_end + 4),
                        *np.random.default_rng(0).integers(0, len(blob), 120).tolist(), len(blob) - 1})
    for position in positions:
        damaged = bytearray(blob)
        damaged[position] ^= 0x20
        (tmp_path / "damaged.gcx").write_bytes(damaged)
        match = "format version" if 8 <= position < 12 else "damaged|not a graphc artifact"
        _refused(tmp_path / "damaged.gcx", match, linked)


@pytest.mark.parametrize("length", [0, 7, 40, HEADER.size, HEADER.size + 3, 1000, -4096, -1])
def test_a_truncated_or_extended_file_is_refused(saved, tmp_path, linked, length):
    blob, _ = saved
    (tmp_path / "cut.gcx").write_bytes(blob[:length])
    _refused(tmp_path / "cut.gcx", "damaged|not a graphc artifact", linked)
    (tmp_path / "long.gcx").write_bytes(blob + bytes(64))
    _refused(tmp_path / "long.gcx", "damaged: truncated or extended", linked)


def test_another_format_version_is_refused_before_its_checksum_is_read(saved, tmp_path, linked):
    blob, _ = saved
    other = bytearray(blob)
    struct.pack_into("<I", other, 8, 2)
    (tmp_path / "v2.gcx").write_bytes(other)
    assert "version 2" in str(_refused(tmp_path / "v2.gcx", "format version 2; this graphc_runtime reads version 1",
                                       linked))
    (tmp_path / "manifest-v2.gcx").write_bytes(_rewritten(blob, lambda m: m.update(format_version=2)))
    _refused(tmp_path / "manifest-v2.gcx", "format version 2", linked)


def test_code_needing_a_cpu_feature_this_host_lacks_is_refused(saved, tmp_path, linked):
    blob, _ = saved
    made_up = _rewritten(blob, lambda m: m["target"]["cpu_features"].append("avx1024-made-up"))
    (tmp_path / "made-up.gcx").write_bytes(made_up)
    _refused(tmp_path / "made-up.gcx", "CPU features this CPU lacks: avx1024-made-up", linked)
    if not cpu_features.host_is_x86_64_linux():
        return
    flags = cpu_features._cpuinfo_flags()
    lacking = [name for name, needed in cpu_features._CPUINFO_FLAGS.items() if not set(needed) <= flags]
    if lacking:   # a real feature this CPU does not have, e.g. AMD's xop on an Intel CPU
        (tmp_path / "lacking.gcx").write_bytes(
            _rewritten(blob, lambda m: m["target"]["cpu_features"].append(lacking[0])))
        _refused(tmp_path / "lacking.gcx", f"lacks: {re.escape(lacking[0])} \\(", linked)


def test_code_for_another_machine_is_refused(saved, tmp_path, linked):
    blob, _ = saved
    arm = _rewritten(blob, lambda m: m["target"].update(triple="aarch64-unknown-linux-gnu"))
    (tmp_path / "arm.gcx").write_bytes(arm)
    machine = "aarch64" if cpu_features.host_is_x86_64_linux() else ""
    _refused(tmp_path / "arm.gcx", f"code for {machine}", linked)


def test_every_host_feature_is_either_checked_or_never_generated():
    """A feature this host has that neither table knows would make its artifacts unloadable
    here: put it in one of cpu_features' tables (those it lacks may stay unknown: refused)."""
    host = rt.host_target()
    if not host.triple.startswith("x86_64"):
        pytest.skip("the tables are x86-64's")
    named = [flag[1:] for flag in host.features.split(",") if flag.startswith("+")]
    unknown = [name for name in named
               if name not in cpu_features._CPUINFO_FLAGS and name not in cpu_features._NEVER_GENERATED]
    assert unknown == []
    required = cpu_features.required_features(host.triple, host.features)
    assert cpu_features.required_features("x86_64-unknown-linux-gnu", "+sse2,-avx2,+aes,+rtm,+fma") == ["fma", "sse2"]
    if cpu_features.host_is_x86_64_linux():
        assert cpu_features.missing_features(required) == []   # what LLVM says this CPU has, cpuinfo says too


def test_damaged_object_code_with_right_checksums_is_refused_by_the_linker(saved, tmp_path):
    blob, _ = saved

    def break_objects(sections):
        first = bytearray(sections["object:0"])
        first[0x28:0x30] = (len(first) + 4096).to_bytes(8, "little")   # the section table lies past the end
        sections["object:0"] = bytes(first)

    (tmp_path / "object.gcx").write_bytes(_rewritten(blob, edit_sections=break_objects))
    with pytest.raises(ValueError, match="object code is refused: not a loadable object file"):
        rt.load(tmp_path / "object.gcx")
    (tmp_path / "text.gcx").write_bytes(_rewritten(blob, edit_sections=lambda s: s.update({"object:0": b"#!/bin/sh"})))
    with pytest.raises(ValueError, match="object code is refused"):
        rt.load(tmp_path / "text.gcx")
    (tmp_path / "team.gcx").write_bytes(_rewritten(blob, edit_sections=lambda s: s.update({"team": b"\x7fELF"})))
    with pytest.raises(ValueError, match="object code is refused"):
        rt.load(tmp_path / "team.gcx")


def test_a_thread_team_of_another_runtime_version_is_refused(saved, tmp_path, linked):
    blob, _ = saved
    (tmp_path / "team.gcx").write_bytes(_rewritten(blob, lambda m: m["team"].update(ir_sha256="0" * 64)))
    _refused(tmp_path / "team.gcx", "thread team", linked)


def _slot(manifest, name):
    return next(slot for slot in manifest["slots"] if slot.get("name") == name)


MANIFEST_DAMAGE = {
    "a field missing": (lambda m: m.pop("graph_hash"), "missing or unexpected"),
    "a field too many": (lambda m: m.update(code="print(1)"), "missing or unexpected"),
    "an unknown kind": (lambda m: m.update(kind="daemon"), "kind"),
    "an unknown slot kind": (lambda m: m["slots"].append({"kind": "pipe", "name": "p"}), "a slot"),
    "an object dtype": (lambda m: _slot(m, "x").update(dtype="object"), "dtype"),
    "a negative extent": (lambda m: _slot(m, "x").update(shape=[-1, 1, 28, 28]), "shape"),
    "a huge workspace": (lambda m: _slot(m, "workspace").update(nbytes=1 << 50), "workspace"),
    "a huge output": (lambda m: _slot(m, "loss").update(shape=[1 << 30, 1 << 30]), "too large"),
    "a param without its values": (lambda m: _slot(m, "fc1.w").update(shape=[120, 401]), "no section"),
    "a float valid range": (lambda m: _slot(m, "y").update(valid_range=[0.5, 10]), "valid_range"),
    "an optimizer of another kind": (lambda m: m["optimizer"].update(kind="RMSprop"), "unknown kind"),
    "a negative learning rate": (lambda m: m["optimizer"].update(lr=-1.0), "lr"),
    "betas of one": (lambda m: m["optimizer"].update(betas=[0.9, 1.0]), "betas"),
    "hyperparameters of another optimizer": (lambda m: m.update(hyper_slots={"lr": "optim:step_size"}),
                                             "hyperparameter slots"),
    "more optimizer steps than calls": (lambda m: m["calls"].update(optimizer_steps=5), "optimizer steps"),
    "a random key that is no slot": (lambda m: m["calls"].update(random_key_slot="nowhere"), "random key"),
    "a seed out of range": (lambda m: m["calls"].update(seed=2 ** 32), "seed"),
    "no entry symbol": (lambda m: m.update(entry="not_there"), "no symbol 'not_there'"),
    "too many threads": (lambda m: m.update(max_threads=10 ** 6), "max_threads"),
    "objects that are not sections": (lambda m: m.update(objects=["elsewhere"]), "object files"),
    "a slot named twice": (lambda m: m["slots"].insert(0, dict(_slot(m, "x"))), "two slots"),
    "a list for a slot kind": (lambda m: _slot(m, "x").update(kind=["input"]), "a slot"),
    "a list for the team's section": (lambda m: m["team"].update(section=["team"]), "thread team"),
    "a list for the optimizer's kind": (lambda m: m["optimizer"].update(kind=["Adam"]), "unknown kind"),
    "a list for the entry": (lambda m: m.update(entry=["graphc_entry"]), "entry"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_manifest_the_checks_reject_is_refused(saved, tmp_path, damage):
    blob, _ = saved
    edit, match = MANIFEST_DAMAGE[damage]
    (tmp_path / "m.gcx").write_bytes(_rewritten(blob, edit))
    with pytest.raises(ValueError, match=match) as caught:
        rt.load(tmp_path / "m.gcx")
    assert str(tmp_path / "m.gcx") in str(caught.value)


def test_edited_manifest_bytes_with_a_right_checksum_never_crash_the_loader(saved, tmp_path):
    blob, feeds = saved
    length = struct.unpack_from("<Q", blob, HEADER.size)[0]
    start = HEADER.size + 8
    rng = np.random.default_rng(1)
    for position in rng.integers(start, start + length, 150).tolist():
        edited = bytearray(blob)
        edited[position] = rng.choice(list(b'{}[]",:0123456789-eE.tfn x'))
        (tmp_path / "e.gcx").write_bytes(_with_body_checksum(edited))
        try:
            rt.load(tmp_path / "e.gcx")
        except ValueError as error:
            assert str(tmp_path / "e.gcx") in str(error)


def test_files_that_are_not_artifacts_are_refused_without_waiting(tmp_path):
    assert_fifo_refused_without_waiting(rt.load, tmp_path / "fifo.gcx")
    with pytest.raises(ValueError, match="not a regular file"):
        rt.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="cannot open the artifact"):   # missing, not damaged
        rt.load(tmp_path / "absent.gcx")
    (tmp_path / "params.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a graphc artifact"):
        rt.load(tmp_path / "params.npz")


def test_a_manifest_that_is_not_strict_json_is_refused(saved, tmp_path):
    blob, _ = saved
    length = struct.unpack_from("<Q", blob, HEADER.size)[0]
    start = HEADER.size + 8
    text = blob[start:start + length]
    for replacement in (b"NaN", b"[" * 3, b"\xff\xfe"):
        edited = bytearray(blob)
        position = text.index(b'"lr": ') + len(b'"lr": ')
        edited[start + position:start + position + len(replacement)] = replacement
        (tmp_path / "j.gcx").write_bytes(_with_body_checksum(edited))
        with pytest.raises(ValueError, match="not JSON"):
            rt.load(tmp_path / "j.gcx")
    assert json.loads(text)["kind"] == "training step"


def _paths(value, prefix=()):
    """Every place in a JSON value: (path, value) pairs, the containers' included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):   # the first few of a list stand for the rest
            yield from _paths(item, (*prefix, index))


def test_any_value_of_any_type_anywhere_in_the_manifest_is_a_value_error_or_harmless(saved, tmp_path):
    blob, _ = saved
    manifest, _ = _parse(blob)
    places = [path for path, _ in _paths({k: v for k, v in manifest.items() if k != "sections"}) if path]
    for path in places:
        for replacement in (None, [], {}, "x", -1, 2 ** 70, 1.5, True, [[0]]):
            def edit(m, path=path, replacement=replacement):
                *parents, last = path
                for key in parents:
                    m = m[key]
                m[last] = replacement
            (tmp_path / "t.gcx").write_bytes(_rewritten(blob, edit))
            try:
                rt.load(tmp_path / "t.gcx")
            except ValueError as error:
                assert str(tmp_path / "t.gcx") in str(error), (path, replacement, error)


def test_a_manifest_input_range_must_not_be_empty(saved, tmp_path, linked):
    blob, _ = saved
    def empty_range(manifest):
        for slot in manifest["slots"]:
            if slot.get("valid_range") is not None:
                slot["valid_range"] = [5, 2]
    (tmp_path / "range.gcx").write_bytes(_rewritten(blob, edit_manifest=empty_range))
    _refused(tmp_path / "range.gcx", "valid_range", linked)
