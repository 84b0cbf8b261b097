"""Tests of graphc_runtime: cache, loader, threads, program.

Native code under test is tiny LLVM IR written here and compiled with llvmlite directly;
the real compiler is not involved.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import llvmlite.binding as llvm
import numpy as np
import pytest
from hand_written_ir import compile_ir, load_ir

import graphc_runtime as rt
from graphc_runtime.buffers import aligned_zeros, data_pointer
from graphc_runtime.loader import undefined_symbols


def run_python(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def restore_num_threads():
    saved = rt.get_num_threads()
    yield
    rt.set_num_threads(saved)


# ---------------------------------------------------------------------------- packaging

def test_runtime_imports_neither_compiler_nor_its_dependencies():
    result = run_python("""
        import sys, graphc_runtime
        print(sorted(m for m in ("graphc", "sympy", "networkx") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- buffers

@pytest.mark.parametrize("dtype", ["float32", "int64", "uint8"])
def test_aligned_zeros_are_zero_aligned_and_contiguous(dtype):
    for shape in [(3,), (5, 7), (), (0,)]:
        array = aligned_zeros(shape, dtype)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and not array.any()
        assert array.size == 0 or data_pointer(array) % 64 == 0


def test_data_pointer_matches_numpy():
    base = np.arange(100, dtype=np.float64)
    for array in (base, base[10:], base.reshape(10, 10)[3], base[::2]):
        assert data_pointer(array) == array.ctypes.data
    with pytest.raises(TypeError):
        data_pointer([1.0, 2.0])


# ---------------------------------------------------------------------------- cache

def test_make_key_is_sha256_hex_and_separates_parts():
    key = rt.make_key("ir", "cpu", "0.50")
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == rt.make_key("ir", "cpu", "0.50")
    assert rt.make_key("ab", "c") != rt.make_key("a", "bc")
    with pytest.raises(TypeError):
        rt.make_key(b"bytes")


def test_cache_miss_put_hit(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    key = rt.make_key("module")
    assert cache.get(key) is None
    cache.put(key, b"\x7fELF object code")
    assert cache.get(key) == b"\x7fELF object code"
    assert cache.path_for(key).parent == tmp_path
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (1, 1, 0)
    # A second cache on the same directory (a rerun of the script) hits too.
    assert rt.ObjectCache(tmp_path).get(key) == b"\x7fELF object code"


def _truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def _flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 0x01])


def _flip_header_byte(blob: bytes) -> bytes:
    return bytes([blob[0] ^ 0xFF]) + blob[1:]


def _append_garbage(blob: bytes) -> bytes:
    return blob + b"junk"


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _flip_header_byte, _append_garbage, lambda blob: b""])
def test_damaged_entry_is_a_miss_deleted_and_rebuilt(tmp_path, damage):
    cache = rt.ObjectCache(tmp_path)
    key = rt.make_key("damaged")
    payload = bytes(range(256)) * 4
    cache.put(key, payload)
    path = cache.path_for(key)
    path.write_bytes(damage(path.read_bytes()))

    assert cache.get(key) is None
    assert not path.exists()
    assert (cache.stats.misses, cache.stats.corrupt) == (1, 1)
    cache.put(key, payload)  # what the compiler does after a miss
    assert cache.get(key) == payload


def test_clear_removes_entries_and_leftover_temporaries(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    for index in range(3):
        cache.put(rt.make_key(str(index)), b"x")
    (tmp_path / ".incoming-crashed").write_bytes(b"partial")
    (tmp_path / "unrelated.txt").write_text("keep me")
    cache.clear()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unrelated.txt"]


@pytest.mark.parametrize("key", ["../escape", "a/b", "", "x" * 129, "dot.dot"])
def test_keys_that_are_not_plain_names_are_rejected(tmp_path, key):
    with pytest.raises(ValueError):
        rt.ObjectCache(tmp_path).path_for(key)


def test_unwritable_directory_warns_once_and_compiles_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = rt.ObjectCache(blocker / "cache")  # mkdir fails even for root
    with pytest.warns(RuntimeWarning, match="cannot write the graphc object cache"):
        cache.put(rt.make_key("k"), b"data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put(rt.make_key("k2"), b"data")
        rt.ObjectCache(blocker / "cache").put(rt.make_key("k3"), b"data")
        assert cache.get(rt.make_key("k")) is None
    assert not cache.enabled


def test_default_directory_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "explicit"))
    assert rt.default_cache_directory() == tmp_path / "explicit"
    assert rt.ObjectCache().directory == tmp_path / "explicit"
    monkeypatch.delenv("GRAPHC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert rt.default_cache_directory() == tmp_path / "xdg" / "graphc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert rt.default_cache_directory() == tmp_path / "home" / ".cache" / "graphc"


_PAYLOADS_SCRIPT = """
    import hashlib
    def payload(writer):  # different sizes, so a torn mix of two writes cannot pass as one
        return hashlib.sha256(str(writer).encode()).digest() * (2000 + 700 * writer)
"""


def test_concurrent_writer_processes_never_expose_a_damaged_entry(tmp_path):
    script = _PAYLOADS_SCRIPT + """
    import sys
    from graphc_runtime import ObjectCache
    writer, directory = int(sys.argv[1]), sys.argv[2]
    valid = {payload(w) for w in range(4)}
    cache = ObjectCache(directory)
    for _ in range(150):
        cache.put("shared", payload(writer))
        seen = cache.get("shared")
        assert seen is None or seen in valid, "read a payload no writer wrote"
    assert cache.stats.corrupt == 0, cache.stats
    """
    processes = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(writer), str(tmp_path)],
                         stderr=subprocess.PIPE, text=True)
        for writer in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    namespace = {}
    exec(textwrap.dedent(_PAYLOADS_SCRIPT), namespace)
    assert rt.ObjectCache(tmp_path).get("shared") in {namespace["payload"](w) for w in range(4)}
    assert not list(tmp_path.glob(".incoming-*"))


def test_concurrent_writer_threads_never_expose_a_damaged_entry(tmp_path):
    cache = rt.ObjectCache(tmp_path)
    payloads = [bytes([writer]) * (10_000 + 3_000 * writer) for writer in range(4)]
    bad_reads = []

    def write_and_read(writer):
        for _ in range(100):
            cache.put("shared", payloads[writer])
            seen = cache.get("shared")
            if seen is not None and seen not in payloads:
                bad_reads.append(len(seen))

    threads = [threading.Thread(target=write_and_read, args=(writer,)) for writer in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bad_reads == [] and cache.stats.corrupt == 0


# ---------------------------------------------------------------------------- loader

LIBM_IR = """
declare float @expf(float)
declare float @logf(float)
declare float @tanhf(float)
declare ptr @memset(ptr, i32, i64)
declare ptr @memcpy(ptr, ptr, i64)

; args[0]: float[3], replaced by expf, logf, tanhf of its elements
; args[1]: bytes set to 0xAB by memset; args[2]: memcpy of them; args[3]: i64 byte count
; (the count is a runtime value so that LLVM keeps real memset/memcpy calls)
define void @entry(ptr %args, i64 %tid, i64 %nthreads) {
  %values = load ptr, ptr %args
  %bytes_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %bytes = load ptr, ptr %bytes_slot
  %copy_slot = getelementptr inbounds ptr, ptr %args, i64 2
  %copy = load ptr, ptr %copy_slot
  %count_slot = getelementptr inbounds ptr, ptr %args, i64 3
  %count_address = load ptr, ptr %count_slot
  %count = load i64, ptr %count_address
  %p1 = getelementptr inbounds float, ptr %values, i64 1
  %p2 = getelementptr inbounds float, ptr %values, i64 2
  %v0 = load float, ptr %values
  %v1 = load float, ptr %p1
  %v2 = load float, ptr %p2
  %e = call float @expf(float %v0)
  %l = call float @logf(float %v1)
  %t = call float @tanhf(float %v2)
  store float %e, ptr %values
  store float %l, ptr %p1
  store float %t, ptr %p2
  call ptr @memset(ptr %bytes, i32 171, i64 %count)
  call ptr @memcpy(ptr %copy, ptr %bytes, i64 %count)
  ret void
}
"""


def test_library_resolves_libm_and_libc_functions():
    object_code = compile_ir(LIBM_IR)
    assert {"expf", "logf", "tanhf", "memset", "memcpy"} <= set(undefined_symbols(object_code))
    library = rt.NativeLibrary(object_code)
    values = np.array([0.5, 3.0, -0.25], np.float32)
    filled, copied = np.zeros(37, np.uint8), np.zeros(37, np.uint8)
    count = np.array([37], np.int64)
    slots = [rt.Param("values", (3,), updated=True), rt.Param("filled", (37,), "uint8", updated=True),
             rt.Param("copied", (37,), "uint8", updated=True), rt.Param("count", (1,), "int64")]
    arrays = {"values": values, "filled": filled, "copied": copied, "count": count}
    rt.Program(library, "entry", slots, arrays)()
    np.testing.assert_allclose(values, [math.exp(0.5), math.log(3.0), math.tanh(-0.25)], rtol=1e-6)
    assert (filled == 0xAB).all() and (copied == 0xAB).all()


def test_unknown_symbols_are_reported_not_crashed_on():
    library = load_ir("define void @entry(ptr %a, i64 %t, i64 %n) { ret void }")
    assert library.address("entry") == library.address("entry") != 0
    with pytest.raises(rt.MissingSymbolError, match="no_such_entry"):
        library.address("no_such_entry")
    unresolvable = """
        declare float @graphc_test_no_such_function(float)
        define float @entry(float %x) {
          %y = call float @graphc_test_no_such_function(float %x)
          ret float %y
        }"""
    with pytest.raises(rt.MissingSymbolError, match="graphc_test_no_such_function"):
        load_ir(unresolvable)


@pytest.mark.parametrize("damage", [lambda blob: b"garbage", lambda blob: blob[:64], lambda blob: blob[:-8]])
def test_malformed_objects_are_refused_not_crashed_on(damage):
    with pytest.raises(ValueError, match="not a loadable object file"):
        rt.NativeLibrary(damage(compile_ir(LIBM_IR)))


def test_host_target_and_idempotent_initialization():
    rt.initialize_llvm()
    rt.initialize_llvm()
    host = rt.host_target()
    assert host.triple == llvm.get_process_triple() and host.cpu == llvm.get_host_cpu_name()


# ---------------------------------------------------------------------------- threads

# Every thread counts itself in, then waits until all nthreads have arrived. If the team
# ran the threads one after another, the first would wait forever: instead it gives up
# after ~a second of yielding and raises the flag.
BARRIER_IR = """
declare i32 @sched_yield()

; args[0]: i64 arrival counter (zero before the call); args[1]: i64[nthreads] results;
; args[2]: i64 timed-out flag
define void @entry(ptr %args, i64 %tid, i64 %nthreads) {
entry:
  %counter = load ptr, ptr %args
  %results_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %results = load ptr, ptr %results_slot
  %flag_slot = getelementptr inbounds ptr, ptr %args, i64 2
  %flag = load ptr, ptr %flag_slot
  atomicrmw add ptr %counter, i64 1 seq_cst
  br label %wait
wait:
  %spins = phi i64 [ 0, %entry ], [ %next, %again ]
  %arrived = load atomic i64, ptr %counter acquire, align 8
  %everyone = icmp sge i64 %arrived, %nthreads
  br i1 %everyone, label %passed, label %again
again:
  call i32 @sched_yield()
  %next = add i64 %spins, 1
  %patient = icmp ult i64 %next, 3000000
  br i1 %patient, label %wait, label %timed_out
timed_out:
  store atomic i64 1, ptr %flag seq_cst, align 8
  ret void
passed:
  %slot = getelementptr inbounds i64, ptr %results, i64 %tid
  %scaled = mul i64 %nthreads, 1000
  %result = add i64 %scaled, %tid
  store i64 %result, ptr %slot
  ret void
}
"""


@pytest.fixture(scope="module")
def barrier_library():
    return load_ir(BARRIER_IR)


class BarrierRun:
    """Memory for one barrier job, with its argument vector."""

    def __init__(self, nthreads: int):
        self.nthreads = nthreads
        self.counter = np.zeros(1, np.int64)
        self.results = np.zeros(nthreads, np.int64)
        self.flag = np.zeros(1, np.int64)
        self.argv = np.array([data_pointer(array) for array in (self.counter, self.results, self.flag)], np.uintp)

    def check(self):
        assert self.flag[0] == 0, "threads did not run concurrently"
        assert self.results.tolist() == [1000 * self.nthreads + tid for tid in range(self.nthreads)]


@pytest.mark.parametrize("nthreads", [2, 3, 4])
def test_team_runs_all_threads_concurrently(barrier_library, nthreads):
    entry = barrier_library.address("entry")
    with rt.ThreadTeam() as team:
        for _ in range(20):  # repeated jobs reuse the persistent workers
            job = BarrierRun(nthreads)
            team.run(entry, data_pointer(job.argv), nthreads)
            job.check()
        assert team.started_workers == nthreads - 1


def test_team_code_is_compiled_once_then_loaded_from_the_object_cache(barrier_library, tmp_path, monkeypatch):
    from graphc_runtime import native_ir, team_native
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    compiled = []
    compile_ir = native_ir._compile
    monkeypatch.setattr(native_ir, "_compile", lambda ir_text: compiled.append(1) or compile_ir(ir_text))
    team_native.team_functions.cache_clear()   # as in a new process
    try:
        team_native.team_functions()
        assert compiled == [1] and len(list(tmp_path.glob("*.gcobj"))) == 1
        team_native.team_functions.cache_clear()
        team_native.team_functions()
        assert compiled == [1]                  # the second process loads it
        with rt.ThreadTeam() as team:           # and the loaded code runs jobs
            job = BarrierRun(3)
            team.run(barrier_library.address("entry"), data_pointer(job.argv), 3)
            job.check()
    finally:
        team_native.team_functions.cache_clear()


def test_a_damaged_team_object_in_the_cache_is_compiled_again(barrier_library, tmp_path, monkeypatch):
    from graphc_runtime import native_ir, team_native
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path))
    host = rt.host_target()
    key = native_ir._cache_key("graphc-team", team_native.team_ir(host.triple), host, team_native.__file__)
    cache = rt.ObjectCache(tmp_path)
    cache.put(key, b"\x7fELF but not an object")   # a sound entry holding unloadable bytes
    team_native.team_functions.cache_clear()
    try:
        team_native.team_functions()
        stored = cache.get(key)
        assert stored.startswith(b"\x7fELF") and len(stored) > 1000   # replaced by the compiled object
        with rt.ThreadTeam() as team:
            job = BarrierRun(2)
            team.run(barrier_library.address("entry"), data_pointer(job.argv), 2)
            job.check()
    finally:
        team_native.team_functions.cache_clear()


def test_team_grows_and_shrinks_per_job_and_closes(barrier_library):
    entry = barrier_library.address("entry")
    team = rt.ThreadTeam()
    for nthreads in [2, 4, 1, 3, 2]:
        job = BarrierRun(nthreads)
        team.run(entry, data_pointer(job.argv), nthreads)
        job.check()
    assert team.started_workers == 3  # never more than the largest job needed
    workers = list(team._workers)
    assert all(worker.is_alive() for worker in workers)
    team.close()
    team.close()
    assert team.closed and not any(worker.is_alive() for worker in workers)
    with pytest.raises(RuntimeError, match="closed"):
        team.run(entry, data_pointer(BarrierRun(2).argv), 2)


def test_team_serializes_jobs_from_several_python_threads(barrier_library):
    entry = barrier_library.address("entry")
    failures = []

    def submit(team):
        for _ in range(30):
            job = BarrierRun(2)
            team.run(entry, data_pointer(job.argv), 2)
            try:
                job.check()
            except AssertionError as error:
                failures.append(error)

    with rt.ThreadTeam() as team:
        submitters = [threading.Thread(target=submit, args=(team,)) for _ in range(3)]
        for submitter in submitters:
            submitter.start()
        for submitter in submitters:
            submitter.join(timeout=60)
    assert failures == []


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (rt.MAX_THREADS + 1, ValueError),
                                        (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_thread_counts_are_validated(restore_num_threads, barrier_library, bad, error):
    with pytest.raises(error):
        rt.set_num_threads(bad)
    with pytest.raises(error):
        rt.default_team().run(barrier_library.address("entry"), 0, bad)


def test_set_num_threads_roundtrip(restore_num_threads):
    rt.set_num_threads(3)
    assert rt.get_num_threads() == 3


def test_num_threads_environment_variable_is_read_at_import():
    script = "import graphc_runtime as rt; print(rt.get_num_threads(), rt.usable_cpu_count())"
    valid = run_python(script, {"GRAPHC_NUM_THREADS": "3"})
    assert valid.returncode == 0 and valid.stdout.split()[0] == "3"
    invalid = run_python(script, {"GRAPHC_NUM_THREADS": "lots"})
    threads, cpus = invalid.stdout.split()
    assert invalid.returncode == 0 and threads == cpus
    assert "GRAPHC_NUM_THREADS='lots'" in invalid.stderr and "RuntimeWarning" in invalid.stderr


# ---------------------------------------------------------------------------- program

# Slots: x f32[4] input, labels i32[4] input in [0, 3), w f32[4] param (updated),
# calls f32[1] state, out f32[4] output, scratch workspace.
# out = x * w + labels, then w += x and calls += 1.
STEP_IR = """
define void @step(ptr %args, i64 %tid, i64 %nthreads) {
entry:
  %x = load ptr, ptr %args
  %labels_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %labels = load ptr, ptr %labels_slot
  %w_slot = getelementptr inbounds ptr, ptr %args, i64 2
  %w = load ptr, ptr %w_slot
  %calls_slot = getelementptr inbounds ptr, ptr %args, i64 3
  %calls = load ptr, ptr %calls_slot
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 4
  %out = load ptr, ptr %out_slot
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %next, %loop ]
  %x_at = getelementptr inbounds float, ptr %x, i64 %i
  %w_at = getelementptr inbounds float, ptr %w, i64 %i
  %label_at = getelementptr inbounds i32, ptr %labels, i64 %i
  %out_at = getelementptr inbounds float, ptr %out, i64 %i
  %xi = load float, ptr %x_at
  %wi = load float, ptr %w_at
  %label = load i32, ptr %label_at
  %label_float = sitofp i32 %label to float
  %product = fmul float %xi, %wi
  %result = fadd float %product, %label_float
  store float %result, ptr %out_at
  %updated = fadd float %wi, %xi
  store float %updated, ptr %w_at
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, 4
  br i1 %more, label %loop, label %done
done:
  %count = load float, ptr %calls
  %count_next = fadd float %count, 1.0
  store float %count_next, ptr %calls
  ret void
}
"""

STEP_SLOTS = [
    rt.Input("x", (4,)),
    rt.Input("labels", (4,), "int32", valid_range=(0, 3)),
    rt.Param("w", (4,), updated=True),
    rt.State("calls", (1,)),
    rt.Output("out", (4,)),
    rt.Workspace(100, "scratch"),
]


@pytest.fixture(scope="module")
def step_library():
    return load_ir(STEP_IR)


@pytest.fixture
def step(step_library):
    weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    return rt.Program(step_library, "step", STEP_SLOTS, {"w": weights, "unused": np.zeros(2)}), weights


X = np.array([0.5, -1.0, 2.0, 0.25], np.float32)
LABELS = np.array([0, 2, 1, 2], np.int32)


def test_program_runs_binds_params_without_copy_and_keeps_state(step):
    program, weights = step
    (out,) = program(x=X, labels=LABELS)
    np.testing.assert_array_equal(out, X * [1, 2, 3, 4] + LABELS)
    np.testing.assert_array_equal(weights, np.array([1, 2, 3, 4], np.float32) + X)  # the caller's array
    assert program.params["w"] is weights
    program(x=X, labels=LABELS)
    assert program.state["calls"][0] == 2.0
    program.reset_state()
    assert program.state["calls"][0] == 0.0
    assert data_pointer(program.state["calls"]) % 64 == 0
    assert data_pointer(program._workspaces["scratch"]) % 64 == 0


def test_state_bound_to_the_callers_memory_is_used_in_place_and_not_zeroed(step_library):
    weights = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    calls = aligned_zeros((1,))
    calls[0] = 5.0
    program = rt.Program(step_library, "step", STEP_SLOTS, {"w": weights}, state_memory={"calls": calls})
    program(x=X, labels=LABELS)
    assert program.state["calls"] is calls and calls[0] == 6.0
    program.reset_state()
    assert calls[0] == 6.0


@pytest.mark.parametrize("memory, message", [
    ({"count": aligned_zeros((1,))}, "the program has no State slot 'count'"),
    ({"calls": aligned_zeros((2,))}, r"'calls' must be an array of shape \(1,\) float32, got \(2,\) float32"),
    ({"calls": aligned_zeros((1,), np.int32)}, r"'calls' must be an array of shape \(1,\) float32"),
    ({"calls": aligned_zeros((2,))[1:]}, "'calls' must be C-contiguous, writeable and 64-byte aligned"),
])
def test_state_memory_of_the_wrong_kind_is_refused(step_library, memory, message):
    with pytest.raises(ValueError, match="state_memory: " + message):
        rt.Program(step_library, "step", STEP_SLOTS, {"w": np.ones(4, np.float32)}, state_memory=memory)


def test_outputs_are_fresh_arrays_owned_by_the_caller(step):
    program, _ = step
    (first,) = program(x=X, labels=LABELS)
    kept = first.copy()
    (second,) = program(x=X, labels=LABELS)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)
    assert first.flags.owndata and first.flags.writeable


@pytest.mark.parametrize("feeds, message", [
    ({"x": X}, r"missing input 'labels' \(shape \(4,\) int32\)"),
    ({"x": X, "labels": LABELS, "y": X}, "unexpected input 'y'"),
    ({"x": X[:3], "labels": LABELS}, r"input 'x': expected shape \(4,\) float32, got shape \(3,\) float32"),
    ({"x": X.reshape(2, 2), "labels": LABELS}, r"input 'x': expected shape \(4,\) float32, got shape \(2, 2\)"),
    ({"x": X, "labels": LABELS.astype(np.float32)}, r"input 'labels'.*got shape \(4,\) float32.*integer array"),
    ({"x": LABELS, "labels": LABELS}, r"input 'x'.*got shape \(4,\) int32.*float array"),
    ({"x": X > 0, "labels": LABELS}, r"input 'x'.*bool.*float array"),
    ({"x": X.astype(np.complex64), "labels": LABELS}, r"input 'x'.*complex64"),
    ({"x": X, "labels": np.array([0, 1, 3, 0], np.int32)},
     r"input 'labels': values must lie in the valid range \[0, 3\), got values from 0 to 3"),
    ({"x": X, "labels": np.array([0, -1, 2, 0], np.int64)}, r"input 'labels'.*\[0, 3\).*from -1 to 2"),
    ({"x": X, "labels": np.array([0, -1, 2, 0], np.int32)}, r"input 'labels'.*\[0, 3\).*from -1 to 2"),
    ({"x": X, "labels": np.array([0, 2**31 - 1, 2, 0], np.int32)}, r"input 'labels'.*\[0, 3\).*from 0 to 2147483647"),
    ({"x": X, "labels": np.array([True, False, True, True])}, r"input 'labels'.*bool.*integer array"),
])
def test_bad_feeds_are_rejected_before_native_code_runs(step, feeds, message):
    program, weights = step
    before = weights.copy()
    with pytest.raises(ValueError, match=message):
        program(**feeds)
    np.testing.assert_array_equal(weights, before)
    assert program.state["calls"][0] == 0.0


def test_integer_conversion_checks_the_target_range(step_library):
    slots = [rt.Input("x", (4,)), rt.Input("labels", (4,), "int32"), rt.Param("w", (4,), updated=True),
             rt.State("calls", (1,)), rt.Output("out", (4,))]
    program = rt.Program(step_library, "step", slots, {"w": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"input 'labels': values must lie in the range of int32"):
        program(x=X, labels=np.array([0, 2**31, 0, 0], np.int64))
    (out,) = program(x=X, labels=np.array([0, -5, 2**31 - 1, 0], np.int64))
    assert out[1] == -5.0 and out[2] == np.float32(2**31 - 1)


def test_feeds_are_converted_within_their_kind(step):
    program, _ = step
    expected = X * [1, 2, 3, 4] + LABELS
    (from_float64,) = program(x=X.astype(np.float64), labels=LABELS.astype(np.int64))
    np.testing.assert_array_equal(from_float64, expected)
    program.params["w"][:] = [1, 2, 3, 4]
    (from_lists,) = program(x=X.tolist(), labels=LABELS.tolist())
    np.testing.assert_array_equal(from_lists, expected)


def test_non_contiguous_and_big_endian_feeds_are_accepted(step):
    program, _ = step
    strided_x = np.zeros(8, np.float32)
    strided_x[::2] = X
    transposed_labels = np.stack([LABELS, LABELS], axis=1)[:, 0]
    assert not strided_x[::2].flags.c_contiguous and not transposed_labels.flags.c_contiguous
    (out,) = program(x=strided_x[::2], labels=transposed_labels)
    np.testing.assert_array_equal(out, X * [1, 2, 3, 4] + LABELS)
    program.params["w"][:] = [1, 2, 3, 4]
    (out,) = program(x=X.astype(">f4"), labels=LABELS.astype(">i4"))
    np.testing.assert_array_equal(out, X * [1, 2, 3, 4] + LABELS)


@pytest.mark.parametrize("array, message", [
    (np.zeros(4, np.float64), r"param 'w': expected shape \(4,\) float32, got shape \(4,\) float64"),
    (np.zeros(5, np.float32), r"param 'w': expected shape \(4,\) float32, got shape \(5,\) float32"),
    (np.zeros(8, np.float32)[::2], "param 'w': the array must be C-contiguous"),
    (np.zeros(4, np.float32).tolist(), "param 'w': expected a numpy array"),
    (np.broadcast_to(np.float32(1), (4,)), "param 'w': the array must be C-contiguous"),
])
def test_params_that_cannot_be_bound_in_place_are_rejected(step_library, array, message):
    with pytest.raises(ValueError, match=message):
        rt.Program(step_library, "step", STEP_SLOTS, {"w": array})


def test_missing_and_read_only_params_are_rejected(step_library):
    with pytest.raises(ValueError, match="param 'w'.*missing"):
        rt.Program(step_library, "step", STEP_SLOTS, {})
    read_only = np.zeros(4, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="param 'w': the program updates this param in place but the array is read-"):
        rt.Program(step_library, "step", STEP_SLOTS, {"w": read_only})


def test_slot_declarations_are_validated(step_library):
    with pytest.raises(ValueError, match="two slots are named 'x'"):
        rt.Program(step_library, "step", [rt.Input("x", (4,)), rt.Output("x", (4,))])
    with pytest.raises(ValueError, match="valid_range"):
        rt.Input("y", (4,), "float32", valid_range=(0, 3))
    with pytest.raises(ValueError, match="valid_range"):
        rt.Input("y", (4,), "int8", valid_range=(0, 300))
    with pytest.raises(rt.MissingSymbolError):
        rt.Program(step_library, "no_such_entry", [])


TOTAL_IR = """
define void @total(ptr %args, i64 %tid, i64 %nthreads) {
  %x = load ptr, ptr %args
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %out = load ptr, ptr %out_slot
  %x1_at = getelementptr inbounds float, ptr %x, i64 1
  %x0 = load float, ptr %x
  %x1 = load float, ptr %x1_at
  %sum = fadd float %x0, %x1
  store float %sum, ptr %out
  ret void
}
"""


def test_call_scalar_returns_the_only_output_as_a_number(step):
    program = rt.Program(load_ir(TOTAL_IR), "total", [rt.Input("x", (2,)), rt.Output("total", ())])
    total = program.call_scalar({"x": [1.5, 2.0]})  # a converted copy, alive while native code runs
    assert type(total) is float and total == 3.5
    (fresh,) = program(x=np.array([1, 2], np.float32))
    assert program.call_scalar({"x": np.array([4, 5], np.float32)}) == 9.0
    assert fresh == 3.0  # call_scalar writes its own buffer, never an array returned before
    with pytest.raises(ValueError, match="missing input 'x'"):
        program.call_scalar({})
    step_program, _ = step
    with pytest.raises(TypeError, match="exactly one output of one element"):
        step_program.call_scalar({"x": X, "labels": LABELS})


def test_keyword_call_scalar_binds_feeds_as_parameters_and_reports_like_call_scalar():
    program = rt.Program(load_ir(TOTAL_IR), "total", [rt.Input("x", (2,)), rt.Output("total", ())],
                         ignored_inputs=["labels"])
    call = program.keyword_call_scalar
    owner = object()   # the instance whose __call__ it is
    assert call(owner, x=np.array([1, 2], np.float32)) == 3.0
    assert call(owner, x=[1.5, 2.0]) == 3.5                         # converted, as call_scalar does
    assert call(owner, x=np.array([1, 2], np.float32), labels=np.zeros(2)) == 3.0   # ignored input
    for feeds, message in [({}, "missing input 'x'"), ({"x": [1, 2], "y": 0}, "unexpected input 'y'"),
                           ({"y": 0}, "missing input 'x'.*unexpected input 'y'"),
                           ({"x": np.zeros(3, np.float32)}, r"input 'x': expected shape \(2,\)")]:
        with pytest.raises(ValueError, match=message):
            call(owner, **feeds)
        with pytest.raises(ValueError, match=message):
            program.call_scalar(feeds)
    with pytest.raises(TypeError):
        call(owner, np.zeros(2, np.float32))                         # feeds are keywords only


@pytest.mark.parametrize("name", ["lock", "entry", "v0", "dtype0", "type", "min", "extra", "self", "feeds"])
def test_keyword_call_scalar_takes_any_ascii_name_its_generated_code_does_not_use(name):
    """Inputs named like the built-ins or the old names of the generated code's variables."""
    program = rt.Program(load_ir(TOTAL_IR), "total", [rt.Input(name, (2,)), rt.Output("total", ())])
    assert program.keyword_call_scalar(object(), **{name: np.array([1, 2], np.float32)}) == 3.0
    with pytest.raises(ValueError, match=f"missing input '{name}'"):
        program.keyword_call_scalar(object())


@pytest.mark.parametrize("name", ["_lock", "_v0", "_extra", "class", "\uff58", "my-input"])
def test_no_keyword_call_scalar_when_an_input_name_cannot_be_its_parameter(name):
    """Names beginning with "_" are the generated code's own; a keyword cannot be a parameter;
    Python folds a fullwidth "ｘ" in source to "x" but not a call's keyword "ｘ"."""
    program = rt.Program(load_ir(TOTAL_IR), "total", [rt.Input(name, (2,)), rt.Output("total", ())])
    assert program.keyword_call_scalar is None
    assert program.call_scalar({name: [1.0, 2.0]}) == 3.0


def test_keyword_call_scalar_reports_a_missing_input_beside_one_named_extra():
    program = rt.Program(load_ir(TOTAL_IR), "total", [rt.Input("extra", (1,)), rt.Input("x", (1,)),
                                                      rt.Output("total", ())])
    with pytest.raises(ValueError, match="missing input 'x'"):
        program.keyword_call_scalar(object(), extra=np.zeros(1, np.float32))


PERF_MAP_IR = """
define internal float @helper(float %x) {
  %y = fadd float %x, %x
  ret float %y
}
define void @visible(ptr %args, i64 %tid, i64 %nthreads) {
  %x = load float, ptr %args
  %y = call float @helper(float %x)
  store float %y, ptr %args
  ret void
}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="perf maps are a Linux perf convention")
def test_perf_map_names_every_function_internal_ones_too(monkeypatch):
    from graphc_runtime.perf_map import PERF_MAP_VARIABLE
    path = f"/tmp/perf-{os.getpid()}.map"
    size_before = os.path.getsize(path) if os.path.exists(path) else None
    objects = compile_ir(PERF_MAP_IR)
    monkeypatch.delenv(PERF_MAP_VARIABLE, raising=False)
    try:
        rt.NativeLibrary(objects)                      # not asked: nothing written
        assert (os.path.getsize(path) if os.path.exists(path) else None) == size_before
        monkeypatch.setenv(PERF_MAP_VARIABLE, "1")
        library = rt.NativeLibrary(objects)
        with open(path) as perf_map:
            lines = perf_map.read().splitlines()[-2:]
        entries = {name: (int(start, 16), int(size, 16)) for start, size, name in (line.split() for line in lines)}
        assert set(entries) == {"helper", "visible"}
        assert entries["visible"][0] == library.address("visible")
        assert all(size > 0 for _, size in entries.values())
        # Both in one .text section, one after the other, neither overlapping the other.
        (first, first_size), (second, _) = sorted(entries.values())
        assert first + first_size <= second < first + 4096
        # The internal function's address (derived, not reported by MCJIT) holds its code:
        # it has no relocation, so the loaded bytes are the object's.
        helper_code = ctypes.string_at(*entries["helper"])
        assert len(helper_code) >= 4 and helper_code in objects
        data = np.array([3.0], np.float32)
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(library.address("visible"))(
            data.ctypes.data, 0, 1)
        assert data[0] == 6.0
    finally:
        if size_before is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            os.truncate(path, size_before)


# Slow, non-atomic increment of a counter: load, yield the CPU a few times, store + 1.
# Overlapping calls would lose increments.
RACY_INCREMENT_IR = """
declare i32 @sched_yield()
define void @increment(ptr %args, i64 %tid, i64 %nthreads) {
  %counter = load ptr, ptr %args
  %value = load i64, ptr %counter
  call i32 @sched_yield()
  call i32 @sched_yield()
  call i32 @sched_yield()
  %incremented = add i64 %value, 1
  store i64 %incremented, ptr %counter
  ret void
}
"""


def test_concurrent_python_calls_of_one_program_are_serialized():
    program = rt.Program(load_ir(RACY_INCREMENT_IR), "increment", [rt.State("counter", (1,), "int64")])

    def call_many():
        for _ in range(200):
            program()

    callers = [threading.Thread(target=call_many) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=60)
    assert program.state["counter"][0] == 800


# Each thread handles a contiguous block of the 1000 elements: out = 2 * x + tid.
SPLIT_IR = """
define void @scale(ptr %args, i64 %tid, i64 %nthreads) {
entry:
  %x = load ptr, ptr %args
  %out_slot = getelementptr inbounds ptr, ptr %args, i64 1
  %out = load ptr, ptr %out_slot
  %start_scaled = mul i64 %tid, 1000
  %start = udiv i64 %start_scaled, %nthreads
  %tid_next = add i64 %tid, 1
  %end_scaled = mul i64 %tid_next, 1000
  %end = udiv i64 %end_scaled, %nthreads
  %tid_float = sitofp i64 %tid to float
  %empty = icmp uge i64 %start, %end
  br i1 %empty, label %done, label %loop
loop:
  %i = phi i64 [ %start, %entry ], [ %next, %loop ]
  %x_at = getelementptr inbounds float, ptr %x, i64 %i
  %out_at = getelementptr inbounds float, ptr %out, i64 %i
  %value = load float, ptr %x_at
  %doubled = fmul float %value, 2.0
  %result = fadd float %doubled, %tid_float
  store float %result, ptr %out_at
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, %end
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""


@pytest.mark.parametrize("num_threads, max_threads, expected_threads", [(2, 4, 2), (3, 3, 3), (4, 1, 1), (1, 4, 1)])
def test_program_splits_work_over_min_of_set_and_max_threads(
    restore_num_threads, num_threads, max_threads, expected_threads
):
    slots = [rt.Input("x", (1000,)), rt.Output("out", (1000,))]
    program = rt.Program(load_ir(SPLIT_IR), "scale", slots, max_threads=max_threads)
    rt.set_num_threads(num_threads)
    assert program.num_threads == expected_threads
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    (out,) = program(x=x)
    block_starts = [tid * 1000 // expected_threads for tid in range(expected_threads + 1)]
    owner = np.repeat(np.arange(expected_threads), np.diff(block_starts))
    np.testing.assert_array_equal(out, (2 * x + owner).astype(np.float32))


def test_forked_child_runs_multithreaded_programs_with_a_fresh_team(restore_num_threads, barrier_library):
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    rt.set_num_threads(2)
    program = rt.Program(barrier_library, "entry",
                         [rt.Param("counter", (1,), "int64", True), rt.Output("results", (2,), "int64"),
                          rt.Param("flag", (1,), "int64", True)],
                         {"counter": np.zeros(1, np.int64), "flag": np.zeros(1, np.int64)}, max_threads=2)
    program()  # the parent's default team now has a worker the child will not inherit
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        signal.alarm(20)  # a hang must not outlive the test
        program.params["counter"][0] = 0
        (results,) = program()
        os._exit(0 if results.tolist() == [2000, 2001] and program.params["flag"][0] == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
