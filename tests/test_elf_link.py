"""graphc's own linker (graphc_runtime/elf_link.py) against MCJIT, which it replaces on x86-64
ELF hosts: the same results, the fallback to MCJIT for what it does not link, and no memory
kept by libraries that are gone."""
from __future__ import annotations

import ctypes
import gc as garbage
import os
import pickle
import platform
import re
import struct
import subprocess
import sys
import textwrap
import threading

import llvmlite.binding as llvm
import numpy as np
import pytest
from cross_targets import aarch64_target_machine
from object_mutations import mutation

import graphc as gc
import graphc_runtime as rt
from graphc.backend import compiler
from graphc.backend.llvm import parallel
from graphc.tools import models
from graphc_runtime import elf_link, loader
from graphc_runtime.loader import LINKER_VARIABLE

X86_64_ELF = llvm.get_object_format() == "ELF" and platform.machine().lower() in ("x86_64", "amd64")
needs_x86_64_elf = pytest.mark.skipif(not X86_64_ELF, reason="the own linker serves x86-64 ELF hosts")

# expf from libm, memset from libc, a constant-pool vector, an internal helper and a global:
# the kinds of reference graphc's kernels make. Not nounwind, so it also has an unwind table
# (graphc's kernels have none), which the own linker leaves out.
IR = """
@counter = internal global i64 0
declare float @expf(float)
declare ptr @memset(ptr, i32, i64)

define internal <4 x float> @scale(<4 x float> %v) noinline {
  %r = fmul <4 x float> %v, <float 1.0, float 2.0, float 3.0, float 4.0>
  ret <4 x float> %r
}

define float @entry(ptr %out, ptr %bytes, i64 %count) {
  %v = load <4 x float>, ptr %out
  %s = call <4 x float> @scale(<4 x float> %v)
  store <4 x float> %s, ptr %out
  call ptr @memset(ptr %bytes, i32 171, i64 %count)
  %c = load i64, ptr @counter
  %c1 = add i64 %c, 1
  store i64 %c1, ptr @counter
  %f = sitofp i64 %c1 to float
  %e = call float @expf(float %f)
  ret float %e
}
"""
ENTRY = ctypes.CFUNCTYPE(ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _object(jit_code_model: bool = True, ir_text: str = IR, target_machine=None) -> bytes:
    """`ir_text` compiled for the host (or `target_machine`), with the JIT code model or the
    default small one."""
    rt.initialize_llvm()
    if target_machine is None:
        target_machine = (rt.create_host_target_machine() if jit_code_model else
                          llvm.Target.from_default_triple().create_target_machine(opt=2, codemodel="small"))
    module = llvm.parse_assembly(ir_text)
    module.triple = target_machine.triple
    module.data_layout = str(target_machine.target_data)
    return target_machine.emit_object(module)


def _call_twice(library: rt.NativeLibrary) -> list:
    entry = ENTRY(library.address("entry"))
    out = np.ones(4, np.float32)
    data = np.zeros(16, np.uint8)
    results = [entry(out.ctypes.data, data.ctypes.data, 16) for _ in range(2)]
    return [results, out.tolist(), data.tolist()]


@needs_x86_64_elf
def test_the_own_linker_runs_what_mcjit_runs(monkeypatch):
    own = rt.NativeLibrary(_object())
    assert own.linker == "graphc"
    monkeypatch.setenv(LINKER_VARIABLE, "mcjit")
    reference = rt.NativeLibrary(_object())
    assert reference.linker == "mcjit"
    # each library's own counter: exp(1), exp(2); the helper's constants; libc's memset
    assert _call_twice(own) == _call_twice(reference)
    assert _call_twice(own)[0] == pytest.approx([np.exp(3), np.exp(4)], rel=1e-6)


def test_objects_it_does_not_link_go_to_mcjit():
    """The default (small) code model calls expf through a 32-bit PC-relative relocation,
    which only MCJIT links (it builds a stub)."""
    library = rt.NativeLibrary(_object(jit_code_model=False))
    assert library.linker == "mcjit"
    assert _call_twice(library)[1] == [1.0, 4.0, 9.0, 16.0]


@needs_x86_64_elf
@pytest.mark.parametrize("threads", [1, 2])
def test_a_training_step_linked_either_way_trains_alike(monkeypatch, threads):
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        model = models.mlp(64, sizes=(30, 20, 10))
        feeds = models.random_batch(model, np.random.default_rng(0))
        results = {}
        for linker in ("graphc", "mcjit"):
            monkeypatch.setenv(LINKER_VARIABLE, linker)
            params = gc.init_params(model.graph, seed=0)
            step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.1))
            assert step._program.library.linker == linker
            losses = [step(**feeds) for _ in range(3)]
            results[linker] = (losses, {name: value.copy() for name, value in params.items()})
        assert results["graphc"][0] == results["mcjit"][0]
        for name, value in results["graphc"][1].items():
            np.testing.assert_array_equal(value, results["mcjit"][1][name])
    finally:
        gc.set_num_threads(previous)


@needs_x86_64_elf
def test_a_missing_symbol_is_refused_before_anything_runs():
    with pytest.raises(rt.MissingSymbolError, match="graphc_no_such_function"):
        rt.NativeLibrary(_object(ir_text=IR.replace("@expf", "@graphc_no_such_function")))


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@needs_x86_64_elf
def test_dropped_libraries_give_their_memory_back():
    obj = _object()
    for _ in range(20):
        rt.NativeLibrary(obj)
    garbage.collect()
    before = _resident_kib()
    for _ in range(500):
        library = rt.NativeLibrary(obj)
        _call_twice(library)
        del library
    garbage.collect()
    # 500 libraries of two pages each would hold 4 MB if their mappings were not unmapped
    assert _resident_kib() - before < 1024


def test_link_declines_other_machines():
    assert elf_link.link([_object(target_machine=aarch64_target_machine())]) is None


# ---------------------------------------------------------------------------- damaged objects

_SECTION = struct.Struct("<IIQQQQIIQQ")


def _with_section_field(blob: bytes, section_name: str, field: int, value: int) -> bytes:
    """`blob` with field `field` (0 name .. 9 entry size) of the named section set to `value`."""
    header_offset, = struct.unpack_from("<Q", blob, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", blob, 0x3A)
    names = _SECTION.unpack_from(blob, header_offset + names_index * entry_size)[4]
    for index in range(count):
        position = header_offset + index * entry_size
        fields = list(_SECTION.unpack_from(blob, position))
        name = blob[names + fields[0]:blob.index(b"\0", names + fields[0])].decode()
        if name == section_name:
            fields[field] = value
            patched = bytearray(blob)
            _SECTION.pack_into(patched, position, *fields)
            return bytes(patched)
    raise KeyError(section_name)


@needs_x86_64_elf
@pytest.mark.parametrize("section, field, value", [
    (".symtab", 9, 0),            # symbol entries of 0 bytes
    (".rela.ltext", 9, 1),        # relocation entries of 1 byte
    (".lbss", 5, 2**64 - 1),      # a zero-filled section of 2**64 - 1 bytes
    (".lbss", 8, 2**64 - 1),      # an alignment that is not a power of two
    (".symtab", 6, 99),           # names in a section that does not exist
])
def test_damaged_objects_are_refused_before_anything_is_mapped(section, field, value):
    with pytest.raises(ValueError, match="not a loadable object file"):
        elf_link.link([_with_section_field(_object(), section, field, value)])


@needs_x86_64_elf
@pytest.mark.parametrize("value", [2**63, 2**64 - 1])
def test_a_section_table_beyond_any_offset_is_refused(value):
    """Offsets past what Python indexes with made OverflowError escape instead of ValueError."""
    blob = bytearray(_object())
    struct.pack_into("<Q", blob, 0x28, value)   # e_shoff
    with pytest.raises(ValueError, match="not a loadable object file"):
        elf_link.link([bytes(blob)])
    with pytest.raises(ValueError, match="not a loadable object file"):
        rt.loader.undefined_symbols(bytes(blob))


_RELA = struct.Struct("<QQq")


def _with_relocation(blob: bytes, section_name: str, index: int, **fields) -> bytes:
    """`blob` with relocation `index` of the named relocation section given another `kind`,
    `symbol` or `addend`."""
    section = next(s for s in elf_link.ElfObject(blob).sections if s.name == section_name)
    position = section.offset + index * _RELA.size
    offset, info, addend = _RELA.unpack_from(blob, position)
    kind, symbol = fields.get("kind", info & 0xFFFFFFFF), fields.get("symbol", info >> 32)
    patched = bytearray(blob)
    _RELA.pack_into(patched, position, offset, symbol << 32 | kind, fields.get("addend", addend))
    return bytes(patched)


def _symbol_index(blob: bytes, name: str) -> int:
    return [symbol.name for symbol in elf_link.ElfObject(blob).symbols].index(name)


# What MCJIT would abort on is refused by the check before it (called directly here: were the
# check to miss it, MCJIT would abort pytest).
@needs_x86_64_elf
@pytest.mark.parametrize("change, problem", [
    (dict(kind=13), "relocation type 13, which MCJIT does not implement"),   # R_X86_64_PC16
    (dict(kind=10), "relocation type 10, which MCJIT does not implement"),   # R_X86_64_32: JIT memory lies anywhere
    (dict(addend=2**31), "out of reach"),
    (dict(symbol=0), "to an absolute address"),
    (dict(symbol="expf"), "'expf', defined elsewhere"),   # a PC32 to libm: a PLT32 would get a stub
])
def test_relocations_mcjit_would_abort_on_are_refused(change, problem):
    blob = _object(jit_code_model=False)
    if change.get("symbol") == "expf":
        change = dict(symbol=_symbol_index(blob, "expf"))
    with pytest.raises(ValueError, match=problem):
        loader._checked_for_mcjit([_with_relocation(blob, ".rela.text", 0, **change)])


@needs_x86_64_elf
def test_a_placeholder_out_of_reach_is_refused():
    """MCJIT adds the 32 bits at an x86-64 PC32 site to the addend, as unsigned."""
    blob = bytearray(_object(jit_code_model=False))
    parsed = elf_link.ElfObject(bytes(blob))
    rela = next(index for index, section in enumerate(parsed.sections) if section.name == ".rela.text")
    site = parsed.sections[parsed.sections[rela].info].offset + parsed.relocations[rela][0].offset
    blob[site:site + 4] = b"\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="out of reach"):
        loader._checked_for_mcjit([bytes(blob)])


@needs_x86_64_elf
def test_objects_for_another_machine_are_refused_before_mcjit():
    with pytest.raises(ValueError, match="ELF machine 183"):
        loader._checked_for_mcjit([_object(target_machine=aarch64_target_machine())])


def test_mcjit_is_given_no_unwind_tables_to_register():
    """The C++ unwinder trusts a registered .eh_frame and aborts on what it cannot parse, at
    the next unwind anywhere in the process: MCJIT gets the table unnamed, loads it as data."""
    blob = _object(jit_code_model=False)
    assert ".eh_frame" in [section.name for section in elf_link.ElfObject(blob).sections]
    given, = loader._checked_for_mcjit([blob])
    assert ".eh_frame" not in [section.name for section in elf_link.ElfObject(given).sections]


@pytest.mark.parametrize("jit_code_model", [True, False])
def test_the_aarch64_rules_accept_what_llvm_emits_for_aarch64(monkeypatch, jit_code_model):
    """Nothing runs AArch64 code here: the check alone, with the rules of an AArch64 host."""
    machine = aarch64_target_machine()
    if not jit_code_model:
        machine = llvm.Target.from_triple(machine.triple).create_target_machine(cpu="generic", opt=1)
    model = models.mlp(8, sizes=(16, 10))
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.1))
    texts = [re.sub(r'^target (triple|datalayout) = ".*"$', "", text, flags=re.MULTILINE)
             for text in parallel.split_modules(step.llvm_ir)] + [IR]
    monkeypatch.setattr(loader, "_HOST_MACHINE", elf_link.EM_AARCH64)
    for text in texts:
        obj = _object(ir_text=text, target_machine=machine)
        loader._check_machine_and_relocations(elf_link.ElfObject(obj))


@needs_x86_64_elf
def test_names_are_looked_up_in_the_process_not_in_ctypes():
    """A ctypes library object has attributes of its own (_handle, _FuncPtr): a generated
    reference to one must not link to them."""
    with pytest.raises(rt.MissingSymbolError, match="_handle"):
        rt.NativeLibrary(_object(ir_text=IR.replace("@expf", "@_handle")))


def test_the_interpreter_exits_cleanly_while_a_thread_runs_generated_code():
    """The code stays mapped until the process ends: a daemon thread inside a step when the
    interpreter exits must not fault (exit status 0, not -11)."""
    script = textwrap.dedent("""
        import threading, time
        import numpy as np
        import graphc as gc
        from graphc.tools import models
        gc.set_num_threads(1)
        model = models.mlp(256, sizes=(512, 512, 10))
        feeds = models.random_batch(model, np.random.default_rng(0))
        step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
        step(**feeds)
        def train():
            while True:
                step(**feeds)
        threading.Thread(target=train, daemon=True).start()
        time.sleep(0.3)
        print(step._program.library.linker)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ mutation fuzzing of the loader

# Mutations of real objects, loaded in child processes: whatever the bytes, loading them either
# succeeds or raises ValueError, never another exception and never an abort of the process
# (MCJIT aborts on what it does not implement: `LLVM ERROR: Relocation type not implemented
# yet!`). Seeded, so that a failure names a mutation that can be made again.
# GRAPHC_FUZZ_MUTATIONS raises the count for a deeper run.
FUZZ_MUTATIONS = int(os.environ.get("GRAPHC_FUZZ_MUTATIONS", "3000"))
_FUZZ_CHILD = """
    import os, pickle, sys
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    from object_mutations import mutation
    import graphc_runtime as rt

    with open(sys.argv[2], "rb") as source:
        programs = pickle.load(source)
    for index in range(int(sys.argv[3]), int(sys.argv[4])):
        print(index, flush=True)              # started: the last index printed names an abort
        try:
            rt.NativeLibrary(mutation(programs, index)[0])   # linked, never called
            outcome = "loaded"
        except ValueError:
            outcome = "refused"
        except Exception as error:  # noqa: BLE001 - what the test reports
            outcome = f"{type(error).__name__}: {error}"[:300]
        print(index, outcome, flush=True)
"""


def _fuzz_programs() -> list[list[bytes]]:
    """Objects as graphc's compiler emits them (a compiled function's, one or more modules),
    this file's test object with either code model (the small one goes to MCJIT), and two
    objects linked together."""
    x = gc.Graph("fuzz").input("x", (4, 8))
    function = gc.compile(gc.relu(x) * 2.0 + gc.sigmoid(x), {})
    two_objects = [_object(), _object(ir_text=IR.replace("@entry", "@other_entry"))]
    return [compiler.object_code(function.llvm_ir), [_object()], [_object(jit_code_model=False)], two_objects]


def _run_fuzz_children(programs, count: int, linker: str, tmp_path) -> tuple[dict[int, str], list[str]]:
    """The outcome of each mutation, loaded in child processes (two at a time, one per core),
    and how each child that did not exit normally ended, naming the mutation it was loading.
    The mutations after one that killed its child are loaded by a new child."""
    path = tmp_path / f"programs-{linker}.pickle"
    path.write_bytes(pickle.dumps(programs))
    environment = {**os.environ, LINKER_VARIABLE: linker}
    environment.pop("GRAPHC_PERF_MAP", None)
    outcomes, deaths = {}, []

    def load_range(start: int, end: int) -> None:
        while start < end:
            child = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(_FUZZ_CHILD), __file__, str(path), str(start), str(end)],
                capture_output=True, text=True, env=environment, timeout=600)
            started = None
            for line in child.stdout.splitlines():
                index, _, outcome = line.partition(" ")
                started = int(index)
                if outcome:
                    outcomes[started] = outcome
            if started is None or child.returncode == 0 and started + 1 < end:
                deaths.append(f"a child loaded nothing or stopped early: {child.stderr[-2000:]}")
                return
            if child.returncode != 0:
                deaths.append(f"mutation {started} ({mutation(programs, started)[1]}) ended its child "
                              f"with status {child.returncode}: {child.stderr[-300:]}")
            start = started + 1

    halves = [threading.Thread(target=load_range, args=bounds) for bounds in ((0, count // 2), (count // 2, count))]
    for half in halves:
        half.start()
    for half in halves:
        half.join()
    return outcomes, deaths


@pytest.mark.parametrize("linker", ["graphc", "mcjit"])
def test_mutated_objects_load_or_are_refused_with_value_error(linker, tmp_path):
    if linker == "graphc" and not X86_64_ELF:
        pytest.skip("the own linker serves x86-64 ELF hosts")
    programs = _fuzz_programs()
    count = FUZZ_MUTATIONS // 2
    outcomes, deaths = _run_fuzz_children(programs, count, linker, tmp_path)
    wrong = [f"mutation {index} ({mutation(programs, index)[1]}): {outcome}"
             for index, outcome in sorted(outcomes.items()) if outcome not in ("loaded", "refused")]
    assert not deaths + wrong, "\n".join(deaths + wrong)
    assert len(outcomes) == count
