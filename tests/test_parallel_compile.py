"""Compiling a program as several LLVM modules, in worker processes beside the generating thread
(graphc/backend/llvm: parallel.py, worker_process.py, program_modules.py): the same numbers as
the one-module serial build, workers that fail or cannot start, multi-object cache entries and
loading, and no crash when compiling in parallel over and over."""
import collections
import re
import sys
import threading

import llvmlite.ir as ir
import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.backend import compiler
from graphc.backend.emit import entry
from graphc.backend.emit.kernel import Kernel
from graphc.backend.llvm import parallel, program_modules, target, worker_process
from graphc.backend.program_cache import CachedProgram, pack_entry, unpack_entry
from graphc.tools import models


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A new, empty program cache for every compile made through `use_fresh_cache()`."""
    counter = iter(range(1000))

    def use_fresh_cache():
        cache = rt.ObjectCache(tmp_path / f"cache{next(counter)}")
        monkeypatch.setattr(compiler, "_cache", cache)
        return cache
    return use_fresh_cache


@pytest.fixture
def parallel_mode(monkeypatch):
    """Compile on 3 threads (more than this machine may have: still correct) in small modules."""
    def set_mode(threads: int, budget: int = 400):
        monkeypatch.setenv(parallel.COMPILE_THREADS_VARIABLE, str(threads))
        monkeypatch.setattr(program_modules, "INSTRUCTIONS_PER_MODULE", budget)
    return set_mode


def train(model, feeds, mode_setter, threads, steps=3, momentum=0.9):
    mode_setter(threads)
    params = gc.init_params(model.graph, seed=3)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.05, momentum=momentum))
    losses = [step(**feeds) for _ in range(steps)]
    return step, losses, params


NETWORKS = {
    "lenet5": lambda: models.lenet5(8),
    "convnet": lambda: models.convnet(4, image=(3, 16, 16), widths=(8, 8, 16, 16)),
    "mlp": lambda: models.mlp(16, sizes=(64, 48, 32, 10)),
}


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_parallel_build_computes_bit_for_bit_what_the_serial_build_does(network, fresh_cache, parallel_mode):
    model = NETWORKS[network]()
    feeds = models.random_batch(model, np.random.default_rng(7))

    fresh_cache()
    serial_step, serial_losses, serial_params = train(model, feeds, parallel_mode, threads=1)
    fresh_cache()
    parallel_step, parallel_losses, parallel_params = train(model, feeds, parallel_mode, threads=3)

    assert len(parallel.split_modules(serial_step.llvm_ir)) == 1
    assert len(parallel.split_modules(parallel_step.llvm_ir)) > 2     # really split
    assert parallel_losses == serial_losses
    for name in serial_params:
        assert parallel_params[name].tobytes() == serial_params[name].tobytes(), name
    for name in serial_step.state:
        assert parallel_step.state[name].tobytes() == serial_step.state[name].tobytes(), name
    # ... and both are right.
    reference = gc.init_params(model.graph, seed=3)
    expected = float(gc.evaluate(model.loss, feeds, reference))
    assert abs(serial_losses[0] - expected) < 1e-4 * max(1.0, abs(expected))


def test_inference_function_split_into_modules(fresh_cache, parallel_mode):
    model = models.lenet5(4)
    params = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(8))
    results = []
    for threads in (1, 2):
        fresh_cache()
        parallel_mode(threads)
        predict = gc.compile([model.logits, model.loss], params)
        results.append(predict(x=feeds["x"], y=feeds["y"]))
    for serial, split in zip(*results):
        assert serial.tobytes() == split.tobytes()
    np.testing.assert_allclose(results[0][0], gc.evaluate(model.logits, feeds, params), rtol=1e-4, atol=1e-5)


def test_llvm_ir_shows_every_module_and_profile_works(fresh_cache, parallel_mode):
    fresh_cache()
    parallel_mode(2)
    model = models.lenet5(4)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.01))
    text = step.llvm_ir
    modules = parallel.split_modules(text)
    assert len(modules) > 1 and text.count("; ModuleID = ") == len(modules)
    assert "define void @\"graphc_entry\"" in modules[-1]
    assert all("@\"graphc_entry\"" not in module for module in modules[:-1])
    # its parts go into the modules before it, which compile while the rest of it is generated
    assert "define external i1 @\"graphc.entry.part0\"" in "".join(modules[:-1])
    # every kernel is defined in exactly one module, and exported only when called from another;
    # the modules before the last hold kernels or parts of the entry
    for module in modules[:-1]:
        assert re.search(r'define external (void @"?k\d|i1 @"graphc\.entry\.part)', module)
    report = step.profile(repeats=2, **models.random_batch(model, np.random.default_rng(0)))
    assert len(report.kernels) == len(step.steps) and report.native_seconds > 0


def test_an_entry_in_parts_computes_what_one_part_does_and_profiles_every_kernel(fresh_cache, monkeypatch):
    """The entry calls the kernels in parts of at most CALLS_PER_PART calls (emit/entry.py)."""
    model = models.lenet5(4)
    feeds = models.random_batch(model, np.random.default_rng(2))
    runs = {}
    for calls_per_part in (1, 10_000):
        fresh_cache()
        monkeypatch.setattr(entry, "CALLS_PER_PART", calls_per_part)
        params = gc.init_params(model.graph, seed=0)
        step = gc.compile_training_step(model.loss, params, gc.Adam(lr=0.01))
        parts = re.findall(r'^define (?:internal |external )?i1 @"graphc\.entry\.part\d+"', step.llvm_ir, re.MULTILINE)
        runs[calls_per_part] = (step, len(parts), [step(**feeds) for _ in range(3)], params)
    many, one = runs[1], runs[10_000]
    assert many[1] == len(many[0].steps) > 10 and one[1] == 1
    assert many[2] == one[2]
    for name in one[3]:
        assert many[3][name].tobytes() == one[3][name].tobytes(), name
    report = many[0].profile(repeats=2, **feeds)
    assert len(report.kernels) == len(many[0].steps) and report.native_seconds > 0
    assert sum(kernel.seconds for kernel in report.kernels) > 0


def test_compiling_where_no_worker_process_can_start_falls_back_to_this_process(fresh_cache, parallel_mode,
                                                                               monkeypatch):
    """An interpreter that exits at once (an embedding application's executable, say) starts no
    worker: every module compiles in this process."""
    monkeypatch.setattr(worker_process.sys, "executable", "/bin/false")
    with pytest.raises(worker_process.WorkerUnavailable, match="died"):
        worker_process.WorkerProcess(target.worker_settings())
    fresh_cache()
    parallel_mode(2)
    model = models.lenet5(4)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.01))
    assert len(parallel.split_modules(step.llvm_ir)) > 2
    feeds = models.random_batch(model, np.random.default_rng(1))
    expected = float(gc.evaluate(model.loss, feeds, gc.init_params(model.graph, seed=0)))
    assert abs(step(**feeds) - expected) < 1e-4 * max(1.0, abs(expected))


def test_a_worker_compiles_what_this_process_compiles():
    text = _module_text("w", _define_triple)
    worker = worker_process.WorkerProcess(target.worker_settings())
    try:
        assert worker.compile(text) == parallel.compile_module(text, isolated=True)
        with pytest.raises(RuntimeError, match="LLVM refused a module"):
            worker.compile("this is not LLVM IR")
        assert worker.compile(text) == parallel.compile_module(text, isolated=True)   # still serving
    finally:
        worker.close()


def test_a_worker_that_dies_is_restarted_once_then_its_module_is_an_error(monkeypatch):
    text = _module_text("w", _define_triple)
    here = []
    worker = worker_process.RestartingWorker(target.worker_settings(), here.append)
    try:
        worker.compile(text)
        worker._worker._process.kill()                 # killed from outside: started again
        assert worker.compile(text) == parallel.compile_module(text, isolated=True)

        def dies(self, ir_text):
            raise worker_process.WorkerDied("a graphc compile worker died (signal 6)")
        monkeypatch.setattr(worker_process.WorkerProcess, "compile", dies)
        with pytest.raises(worker_process.WorkerDied, match="signal 6"):
            worker.compile(text)                       # twice on the same module: never compiled here
        assert here == []
    finally:
        worker.close()


def test_a_worker_that_dies_is_an_error_here_not_a_crash():
    worker = worker_process.WorkerProcess(target.worker_settings())
    worker._process.kill()
    with pytest.raises(worker_process.WorkerDied, match="died .signal 9"):
        worker.compile(_module_text("w", _define_triple))
    worker.close()


def test_the_default_path_uses_only_llvmlites_public_api():
    """The compile path reaches no private llvmlite attribute (its lock wrapper, raw ctypes
    functions): every llvmlite name graphc's backend and runtime use is public."""
    import pathlib
    backend = pathlib.Path(parallel.__file__).parent.parent
    sources = "\n".join(path.read_text() for folder in (backend, pathlib.Path(rt.__file__).parent)
                         for path in folder.rglob("*.py"))
    assert not re.search(r"\bffi\.|_cfn\b|_lib_wrapper|_fntab", sources)


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.COMPILE_THREADS_VARIABLE, "1")
    assert parallel.compile_threads() == 1 and program_modules.default_budget() is None
    monkeypatch.setenv(parallel.COMPILE_THREADS_VARIABLE, "4")
    assert parallel.compile_threads() == 4
    assert program_modules.default_budget() == program_modules.INSTRUCTIONS_PER_MODULE
    monkeypatch.setenv(parallel.COMPILE_THREADS_VARIABLE, "zero")
    with pytest.warns(RuntimeWarning, match="GRAPHC_COMPILE_THREADS"):
        assert parallel.compile_threads() == rt.usable_cpu_count()


# ----------------------------------------------------------------------------- the cache


def test_cache_round_trips_multi_object_entries(fresh_cache, parallel_mode):
    cache = fresh_cache()
    parallel_mode(2)
    model = models.lenet5(4)
    feeds = models.random_batch(model, np.random.default_rng(2))
    params_a = gc.init_params(model.graph, seed=0)
    step_a = gc.compile_training_step(model.loss, params_a, gc.SGD(lr=0.01))
    (entry,) = [path for path in cache.directory.iterdir() if path.is_file()]
    objects = unpack_entry(cache.get(entry.stem)).objects
    assert len(objects) == len(parallel.split_modules(step_a.llvm_ir)) > 1
    params_b = gc.init_params(model.graph, seed=0)
    step_b = gc.compile_training_step(model.loss, params_b, gc.SGD(lr=0.01))   # loaded
    assert cache.stats.hits == 2 and "_spec" not in vars(step_b)
    assert [step_a(**feeds) for _ in range(2)] == [step_b(**feeds) for _ in range(2)]


def test_damaged_multi_object_entry_is_rebuilt(fresh_cache, parallel_mode):
    cache = fresh_cache()
    parallel_mode(2)
    model = models.lenet5(4)
    gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    (entry,) = [path for path in cache.directory.iterdir() if path.is_file()]
    blob = bytearray(entry.read_bytes())
    blob[-100] ^= 0x5A            # inside the last object
    entry.write_bytes(bytes(blob))
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    assert cache.stats.corrupt == 1
    feeds = models.random_batch(model, np.random.default_rng(3))
    expected = float(gc.evaluate(model.loss, feeds, gc.init_params(model.graph, seed=0)))
    assert abs(step(**feeds) - expected) < 1e-4 * max(1.0, abs(expected))


def test_an_entry_whose_objects_the_loader_refuses_is_rebuilt(fresh_cache, parallel_mode):
    """A checksummed entry holding objects no linker accepts (written by another version, or
    by someone else): a miss, rebuilt, never a crash."""
    cache = fresh_cache()
    parallel_mode(2)
    model = models.lenet5(4)
    gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    ((key, blob),) = [(path.name.rsplit(".", 1)[0], cache.get(path.name.rsplit(".", 1)[0]))
                      for path in cache.directory.iterdir() if path.is_file()]
    entry = unpack_entry(blob)
    cache.put(key, pack_entry(CachedProgram([b"\x7fELF" + bytes(60)] * len(entry.objects), entry.slots,
                                            entry.max_threads)))
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    feeds = models.random_batch(model, np.random.default_rng(3))
    expected = float(gc.evaluate(model.loss, feeds, gc.init_params(model.graph, seed=0)))
    assert abs(step(**feeds) - expected) < 1e-4 * max(1.0, abs(expected))


def test_entry_format_checks():
    slots = [rt.Input("x", (2, 3), "float32"), rt.Workspace(64)]
    objects = [b"first object", b"second", b"third one"]
    unpacked = unpack_entry(pack_entry(CachedProgram(objects, slots, max_threads=2)))
    assert unpacked.objects == objects and unpacked.max_threads == 2
    assert [vars(s) for s in unpacked.slots] == [vars(s) for s in slots]
    good = pack_entry(CachedProgram(objects, slots, max_threads=2))
    no_threads = pack_entry(CachedProgram(objects, slots, max_threads=0))
    for damaged in (good[:-1], good + b"x", good[:3], b"", no_threads):
        with pytest.raises(ValueError):
            unpack_entry(damaged)
    # the format before several objects: a bare list of slots, then one object
    import json
    import struct
    old_header = json.dumps([]).encode()
    with pytest.raises(ValueError):
        unpack_entry(struct.pack("<I", len(old_header)) + old_header + b"object")


# ----------------------------------------------------------------------------- loading


def _module_text(name: str, body) -> str:
    module = target.new_module(name)
    body(module)
    return str(module)


def _i64_function(module, name):
    return ir.Function(module, ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), name)


def _define_triple(module):
    fn = _i64_function(module, "triple")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(b.mul(fn.args[0], ir.Constant(ir.IntType(64), 3)))


def _define_caller(module):
    triple = _i64_function(module, "triple")          # a declaration: defined by another object
    fn = _i64_function(module, "nine_times")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(b.call(triple, [b.call(triple, [fn.args[0]])]))


def test_objects_link_to_each_other():
    import ctypes
    objects = parallel.compile_modules([_module_text("a", _define_caller), _module_text("b", _define_triple)], 2)
    library = rt.NativeLibrary(objects)
    nine_times = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(library.address("nine_times"))
    assert nine_times(5) == 45


def test_loader_refuses_unresolved_and_twice_defined_symbols():
    caller = parallel.compile_modules([_module_text("a", _define_caller)], 1)
    with pytest.raises(rt.MissingSymbolError, match="triple"):
        rt.NativeLibrary(caller)
    twice = parallel.compile_modules([_module_text("b", _define_triple)] * 2, 2)
    with pytest.raises(ValueError, match="defined twice"):
        rt.NativeLibrary(twice)


def _kernel_of(instructions: int, name: str):
    """A build function for ProgramModules.add_kernel: one phase of `instructions` instructions."""
    def build(module):
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.IntType(64)]), name=name)
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        value = fn.args[0]
        for _ in range(instructions - 1):
            value = builder.add(value, value)
        builder.ret_void()
        return Kernel([fn])
    return build


def test_modules_end_between_groups_of_kernels():
    """A full module takes the further kernels of its last kernel's group (they call the same
    helpers, which a cut would copy), up to twice the budget; a kernel of another group, or
    one past twice the budget, starts a new module."""
    modules = program_modules.ProgramModules("groups", budget=100)
    kernels = [(60, "a"), (60, "a"), (60, "a"), (30, "b"), (90, "b"), (250, "c"), (10, "c")]
    for i, (size, group) in enumerate(kernels):
        modules.add_kernel(_kernel_of(size, f"k{i}"), group=group)
    defined = [re.findall(r'define [^@]*@"(k\d+)"', text) for text in modules.finish()]
    assert defined == [["k0", "k1", "k2"], ["k3", "k4"], ["k5"], ["k6"]]


def test_a_finished_module_keeps_its_text_and_frees_its_instructions():
    """Only a finished module's text is used after it is handed on; its functions keep their
    names and types (the entry calls earlier modules' phases through declarations)."""
    texts = []
    modules = program_modules.ProgramModules("freed", budget=10, on_module=lambda text, **_: texts.append(text))
    first = modules.add_kernel(_kernel_of(20, "k0"), group="a")
    modules.add_kernel(_kernel_of(20, "k1"), group="b")
    assert len(texts) == 1 and 'define external void @"k0"' in texts[0] and texts[0].count("add i64") == 19
    phase = first.phases[0]
    assert phase.blocks == [] and phase.name == "k0"
    declaration = modules.callee(phase)
    assert declaration.module is modules.module and declaration.function_type == phase.function_type


def _kernel_calling_helper(name: str, helper_builds: list):
    """A build function for ProgramModules.add_kernel whose phase calls the shared helper "helper"."""
    def build(module):
        def build_helper(helper):
            helper_builds.append(module)
            builder = ir.IRBuilder(helper.append_basic_block("entry"))
            builder.ret(builder.mul(helper.args[0], ir.Constant(ir.IntType(64), 3)))
        helper = program_modules.shared_function(module, "helper", _HELPER_TYPE, build_helper)
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.IntType(64)]), name=name)
        builder = ir.IRBuilder(fn.append_basic_block("entry"))
        builder.call(helper, [fn.args[0]])
        builder.ret_void()
        return Kernel([fn])
    return build


_HELPER_TYPE = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])


def test_a_shared_helper_is_built_once_per_program_and_declared_in_its_other_modules():
    builds = []
    modules = program_modules.ProgramModules("shared", budget=1)
    for i in range(3):
        modules.add_kernel(_kernel_calling_helper(f"k{i}", builds), group=i)
    texts = modules.finish()
    assert len(texts) == 3 and len(builds) == 1
    assert 'define external i64 @"helper"' in texts[0]
    assert all('declare i64 @"helper"' in text and 'define external i64 @"helper"' not in text for text in texts[1:])
    objects = parallel.compile_modules(texts, 1)
    rt.NativeLibrary(objects)      # links: defined once, found by the others
    # a module of no program keeps a definition of its own
    def identity(fn):
        builds.append(fn)
        ir.IRBuilder(fn.append_basic_block()).ret(fn.args[0])
    alone = target.new_module("alone")
    helper = program_modules.shared_function(alone, "helper", _HELPER_TYPE, identity)
    assert helper.linkage == "internal" and len(builds) == 2
    assert program_modules.shared_function(alone, "helper", _HELPER_TYPE, None) is helper


def test_the_conv_helpers_are_defined_once_per_program(fresh_cache, parallel_mode):
    """Register tiles specialized for their callers' constants, and the transpose, are each
    defined in one module of a program and declared in the others that call them."""
    fresh_cache()
    parallel_mode(3)
    model = NETWORKS["convnet"]()
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    modules = parallel.split_modules(step.llvm_ir)
    home, declared, callers = {}, collections.defaultdict(set), collections.defaultdict(set)
    for index, text in enumerate(modules):
        for name in re.findall(r'^define [^@]*@"(graphc\.conv\.[^"]+)"', text, re.MULTILINE):
            assert name not in home, f"{name} defined twice"
            home[name] = index
        for name in re.findall(r'^declare [^@]*@"(graphc\.conv\.[^"]+)"', text, re.MULTILINE):
            declared[name].add(index)
        for name in re.findall(r'call void @"(graphc\.conv\.[^"]+)"', text):
            callers[name].add(index)
    assert any(name.startswith("graphc.conv.tile") for name in home) and "graphc.conv.transpose" in home
    assert any(len(where) > 1 for where in callers.values()), "no helper is called from two modules"
    for name, where in callers.items():
        assert where - {home[name]} <= declared[name], name


def test_split_modules():
    a, b = _module_text("a", _define_caller), _module_text("b", _define_triple)
    assert parallel.split_modules(a) == [a]
    assert parallel.split_modules(a + "\n" + b) == [a + "\n", b]
    headless = "define i64 @f() {\n  ret i64 1\n}\n"
    assert parallel.split_modules(headless) == [headless]
    assert parallel.split_modules(headless + a) == [headless, a]


# ----------------------------------------------------------------------------- robustness


def test_errors_reach_the_caller_and_threads_stop():
    before = {t.name for t in threading.enumerate()}
    good = _module_text("b", _define_triple)
    with pytest.raises(RuntimeError, match="parsing error"):
        parallel.compile_modules([good, "this is not LLVM IR", good], threads=2)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("graphc-compile") for name in leftover)


def test_compiling_changes_no_interpreter_setting():
    """No process-wide setting changes while modules compile in the background."""
    import gc as cyclic_gc
    interval, collecting = sys.getswitchinterval(), cyclic_gc.isenabled()
    seen = []
    with parallel.ObjectCompiler(threads=2) as compiler:
        compiler.submit(_module_text("a", _define_triple))
        seen.append((sys.getswitchinterval(), cyclic_gc.isenabled()))
        compiler.submit(_module_text("b", _define_triple))
        compiler.objects()
        seen.append((sys.getswitchinterval(), cyclic_gc.isenabled()))
    assert seen == [(interval, collecting)] * 2


def test_no_compile_thread_or_worker_outlives_the_compile():
    before = {t.name for t in threading.enumerate()}
    parallel.compile_modules([_module_text(name, _define_triple) for name in "abc"], threads=3)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("graphc-compile") for name in leftover)


def test_compiling_in_parallel_over_and_over(fresh_cache, parallel_mode):
    """Many modules, many rounds, two callers at once: same objects every time, no crash."""
    fresh_cache()
    parallel_mode(2, budget=300)
    model = models.mlp(8, sizes=(32, 24, 16, 10))
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    modules = parallel.split_modules(step.llvm_ir)
    assert len(modules) > 2
    expected = parallel.compile_modules(modules, threads=1)
    failures = []

    def rounds(count, threads):
        try:
            for _ in range(count):
                if parallel.compile_modules(modules, threads=threads) != expected:
                    failures.append("different objects")
        except Exception as error:  # reported below
            failures.append(repr(error))

    callers = [threading.Thread(target=rounds, args=(3, threads)) for threads in (2, 4)]
    for caller in callers:
        caller.start()
    rounds(2, 3)
    for caller in callers:
        caller.join()
    assert not failures
    # The objects still load and run.
    feeds = models.random_batch(model, np.random.default_rng(4))
    program = rt.Program(rt.NativeLibrary(expected), "graphc_entry", step._spec.slots,
                         gc.init_params(model.graph, seed=0))
    assert np.isfinite(program(**feeds)[0]).all()
