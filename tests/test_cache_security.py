"""The object cache trusts only what no one else can write (issue 15, items a and i).

Whoever can write the cache directory or an entry can run code in the process that loads
it: such a directory is refused (one warning, then compiling goes on without it), and an
entry is read only if it is a regular file of a sane size that only this user can write.
One entry that cannot be written is skipped without turning the cache off.
"""
import os
import stat
import subprocess
import sys
import textwrap
import warnings

import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.tools import models
from graphc_runtime import cache as cache_module

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")

NOBODY = 65534
PAYLOAD = b"\x7fELF planted object code"


def planted_cache(directory):
    """A cache in `directory` holding a valid entry, written while the directory was private."""
    cache = rt.ObjectCache(directory)
    key = rt.make_key("planted")
    cache.put(key, PAYLOAD)
    assert rt.ObjectCache(directory).get(key) == PAYLOAD
    return cache, key


def runtime_warnings(action):
    """The messages of the RuntimeWarnings `action()` issues (every one, not Python's first)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def get_with_warnings(cache, key):
    """What `cache.get(key)` returns, and the RuntimeWarnings it issues."""
    got = []
    messages = runtime_warnings(lambda: got.append(cache.get(key)))
    return got[0], messages


# ------------------------------------------------------------------- the directory

UNTRUSTED_DIRECTORIES = [
    pytest.param(lambda d: os.chown(d, NOBODY, NOBODY), "owned by uid 65534", id="owned by another user",
                 marks=needs_root),
    pytest.param(lambda d: os.chmod(d, 0o770), "group-writable (mode 0770)", id="group-writable"),
    pytest.param(lambda d: os.chmod(d, 0o777), "world-writable (mode 0777)", id="world-writable"),
    pytest.param(lambda d: os.chmod(d, 0o1777), "world-writable (mode 1777)", id="world-writable and sticky"),
]


@pytest.mark.parametrize("make_untrusted, reason", UNTRUSTED_DIRECTORIES)
def test_a_planted_entry_in_an_untrusted_directory_is_never_loaded(tmp_path, make_untrusted, reason):
    directory = tmp_path / "cache"
    cache, key = planted_cache(directory)
    make_untrusted(directory)
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1
    assert str(directory) in messages[0] and reason in messages[0]


@pytest.mark.parametrize("make_untrusted, reason", UNTRUSTED_DIRECTORIES)
def test_nothing_is_written_to_an_untrusted_directory(tmp_path, make_untrusted, reason):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    make_untrusted(directory)
    cache = rt.ObjectCache(directory)
    messages = runtime_warnings(lambda: cache.put(rt.make_key("new"), b"object code"))
    assert list(directory.iterdir()) == []
    assert len(messages) == 1 and str(directory) in messages[0] and reason in messages[0]


def test_an_untrusted_directory_is_reported_once_per_process(tmp_path):
    directory = tmp_path / "cache"
    cache, key = planted_cache(directory)
    os.chmod(directory, 0o777)

    def use_it_repeatedly():
        for _ in range(3):
            for each in (cache, rt.ObjectCache(directory)):
                each.get(key)
                each.put(rt.make_key("other"), b"object code")
    messages = runtime_warnings(use_it_repeatedly)
    assert len(messages) == 1 and "world-writable" in messages[0]


def test_the_directory_becomes_usable_once_made_private(tmp_path):
    directory = tmp_path / "cache"
    cache, key = planted_cache(directory)
    os.chmod(directory, 0o777)
    runtime_warnings(lambda: cache.get(key))
    os.chmod(directory, 0o700)
    assert cache.get(key) == PAYLOAD


@needs_root
def test_a_symlinked_directory_owned_by_another_user_is_refused(tmp_path):
    """Whoever owns the link can point it elsewhere at any time."""
    target = tmp_path / "private"
    _, key = planted_cache(target)
    link = tmp_path / "cache"
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    cache = rt.ObjectCache(link)
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1 and str(link) in messages[0] and "symbolic link owned by uid 65534" in messages[0]


@needs_root
def test_a_symlink_to_a_directory_owned_by_another_user_is_refused(tmp_path):
    target = tmp_path / "theirs"
    _, key = planted_cache(target)
    os.chown(target, NOBODY, NOBODY)
    link = tmp_path / "cache"
    link.symlink_to(target)
    cache = rt.ObjectCache(link)
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1 and str(link) in messages[0] and "owned by uid 65534" in messages[0]


def test_a_symlink_of_ours_to_a_private_directory_of_ours_is_used(tmp_path):
    target = tmp_path / "private"
    _, key = planted_cache(target)
    link = tmp_path / "cache"
    link.symlink_to(target)
    assert get_with_warnings(rt.ObjectCache(link), key) == (PAYLOAD, [])


def test_missing_parents_are_created_private_too(tmp_path, monkeypatch):
    """Path.mkdir(parents=True) would make them 0o777 & ~umask: a group member could then
    swap the cache directory for theirs."""
    previous = os.umask(0o002)
    try:
        rt.ObjectCache(tmp_path / "a" / "b" / "cache").put(rt.make_key("k"), b"object code")
    finally:
        os.umask(previous)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "cache"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


# ------------------------------------------------------------------- the entries

_GET_IN_A_CHILD = """
    import resource, sys
    # A cache that reads /dev/zero to the end must fail here, not exhaust the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from graphc_runtime import ObjectCache
    print(ObjectCache(sys.argv[1]).get(sys.argv[2]))
"""


def get_in_a_child(directory, key, timeout=60):
    """`ObjectCache(directory).get(key)` in a child process with bounded memory and time:
    what it printed, or "timed out"."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(_GET_IN_A_CHILD), str(directory), key],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    return done.stdout.strip() or done.stderr


def test_an_entry_that_is_a_fifo_is_a_prompt_miss(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    key = rt.make_key("fifo")
    os.mkfifo(cache.path_for(key), 0o600)
    assert get_in_a_child(tmp_path, key, timeout=20) == "None"


def test_an_entry_that_is_a_symlink_to_dev_zero_is_a_prompt_miss(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    key = rt.make_key("zero")
    os.symlink("/dev/zero", cache.path_for(key))
    assert get_in_a_child(tmp_path, key) == "None"


def test_an_entry_that_is_a_symlink_to_a_valid_entry_is_not_followed(tmp_path):
    elsewhere, planted_key = planted_cache(tmp_path / "elsewhere")
    (tmp_path / "cache").mkdir(mode=0o700)
    cache = rt.ObjectCache(tmp_path / "cache")
    key = rt.make_key("linked")
    os.symlink(elsewhere.path_for(planted_key), cache.path_for(key))
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1 and "symbolic link" in messages[0] and str(cache.path_for(key)) in messages[0]


def test_an_entry_larger_than_the_limit_is_not_read(tmp_path, monkeypatch):
    cache = rt.ObjectCache(tmp_path)
    key = rt.make_key("large")
    cache.put(key, b"x" * (2 << 20))
    monkeypatch.setattr(cache_module, "_MAX_ENTRY_BYTES", 1 << 20, raising=False)
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1 and str(cache.path_for(key)) in messages[0] and "limit" in messages[0]


def test_an_entry_larger_than_the_limit_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_MAX_ENTRY_BYTES", 1 << 20, raising=False)
    cache = rt.ObjectCache(tmp_path)
    messages = runtime_warnings(lambda: cache.put(rt.make_key("large"), b"x" * (2 << 20)))
    assert list(tmp_path.iterdir()) == []
    assert len(messages) == 1 and "limit" in messages[0]
    cache.put(rt.make_key("small"), b"object code")   # the cache stays on
    assert cache.get(rt.make_key("small")) == b"object code"


UNTRUSTED_ENTRIES = [
    pytest.param(lambda p: os.chown(p, NOBODY, NOBODY), "owned by uid 65534", id="owned by another user",
                 marks=needs_root),
    pytest.param(lambda p: os.chmod(p, 0o620), "group-writable", id="group-writable"),
    pytest.param(lambda p: os.chmod(p, 0o602), "world-writable", id="world-writable"),
]


@pytest.mark.parametrize("make_untrusted, reason", UNTRUSTED_ENTRIES)
def test_an_entry_others_can_write_is_not_loaded(tmp_path, make_untrusted, reason):
    cache, key = planted_cache(tmp_path)
    make_untrusted(cache.path_for(key))
    got, messages = get_with_warnings(cache, key)
    assert got is None
    assert len(messages) == 1 and str(cache.path_for(key)) in messages[0] and reason in messages[0]


# ------------------------------------------------------------------- item i: one bad entry

def test_one_unwritable_entry_does_not_stop_caching_the_others(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    blocked, other_blocked = rt.make_key("blocked"), rt.make_key("also blocked")
    cache.path_for(blocked).mkdir(parents=True)          # a directory where the entry goes
    cache.path_for(other_blocked).mkdir()
    messages = runtime_warnings(lambda: cache.put(blocked, b"object code"))
    assert len(messages) == 1 and str(cache.path_for(blocked)) in messages[0]
    assert cache.enabled

    fine = rt.make_key("fine")
    # the same problem again is not reported again
    assert runtime_warnings(lambda: (cache.put(other_blocked, b"x"), cache.put(fine, b"object code"))) == []
    assert cache.get(fine) == b"object code"
    assert rt.ObjectCache(tmp_path).get(fine) == b"object code"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming-")]


# ------------------------------------------------------------------- the compile paths

def _compile_mlp():
    model = models.mlp(4, sizes=(12, 8, 3))
    return gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1, momentum=0.9))


def test_compile_training_step_ignores_a_world_writable_cache_directory(tmp_path, monkeypatch):
    from graphc.backend import compiler

    directory = tmp_path / "cache"
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(directory))
    monkeypatch.setattr(compiler, "_cache", None)
    _compile_mlp()                                        # stores the entry (the "plant")
    assert compiler.object_cache().stats.misses == 1
    os.chmod(directory, 0o777)

    monkeypatch.setattr(compiler, "_cache", None)         # as in a new process
    messages = runtime_warnings(_compile_mlp)
    assert (compiler.object_cache().stats.hits, compiler.object_cache().stats.misses) == (0, 1)
    assert len(messages) == 1 and str(directory) in messages[0] and "world-writable" in messages[0]


def test_native_helpers_ignore_a_world_writable_cache_directory(tmp_path, monkeypatch):
    from graphc_runtime import native_ir, team_native

    directory = tmp_path / "cache"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(directory))
    compiled = []
    compile_ir = native_ir._compile
    monkeypatch.setattr(native_ir, "_compile", lambda ir_text: compiled.append(1) or compile_ir(ir_text))
    team_native.team_functions.cache_clear()             # as in a new process
    try:
        messages = runtime_warnings(team_native.team_functions)
    finally:
        team_native.team_functions.cache_clear()
    assert compiled == [1] and list(directory.iterdir()) == []
    assert len(messages) == 1 and str(directory) in messages[0] and "world-writable" in messages[0]
