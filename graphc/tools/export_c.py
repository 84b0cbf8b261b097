"""`graphc export-c ARTIFACT... OUTDIR`: saved programs as a shared library callable from C.

Each artifact (`fn.save(path)`) becomes functions of one library, `lib<name>.so`, declared in
`<name>.h` (the generated wrapper's source, `<name>.c`, is written beside them):

    a training step   <prefix>_step(context, params, inputs..., &loss): one step, params updated
    a function        <prefix>_predict(context, params, inputs..., outputs...)

with `<prefix>_step_create(&context, threads)`, `_destroy`, `_init_params` (the saved values)
and, for a step, `_set_lr`, `_lr`, `_calls`. Params live in the caller's memory: params[i] is
the float32 array named `<prefix>_step_param_names[i]`, so that a step and a function of the
same model share them. A context holds the rest (optimizer state as saved, workspace, call
count) and the thread team; one context serves one caller thread at a time.

The library is linked by the system's C compiler (`cc -shared`, or $CC): the program's
objects, the thread team's, the wrapper and the saved values. The objects use x86-64's large
code model (absolute addresses), so the library has text relocations (`-z notext`): the
dynamic loader patches its code once, at load. Each artifact's symbols are renamed apart
(`_renamed_symbols`), so that two programs' kernels do not collide, and only the wrapper's
functions are exported. The per-call values (dropout's key, the optimizer's hyperparameters)
are computed as graphc_runtime computes them, in double precision without contraction, so the
C step gives the Python step's results bit for bit on the same number of threads.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphc_runtime.cpu_features import _CPUINFO_FLAGS
from graphc_runtime.deployed import read_checked
from graphc_runtime.elf_link import ELF64_SECTION, ELF64_SYMBOL, SHN_UNDEF, STB_LOCAL, ElfObject
from graphc_runtime.manifest import Manifest
from graphc_runtime.slots import Input, Output, Param, State, Status, Workspace
from graphc_runtime.team_native import CONTROL_BLOCK_BYTES

__all__ = ["export_c", "ExportError"]

_C_TYPES = {"float32": "float", "float64": "double", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t",
            "int64": "int64_t", "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t"}
_ALIGN = 64
_C_KEYWORDS = {"auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
               "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return",
               "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void",
               "volatile", "while", "bool", "true", "false", "NULL"}
_COMPILER_FLAGS = ["-O2", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]


class ExportError(ValueError):
    """What keeps an artifact from being exported, or the C compiler's complaint."""


@dataclass
class _Program:
    """One artifact as the library exports it."""

    path: str
    manifest: Manifest
    sections: dict
    function: str        # the C function: <prefix>_step or <prefix>_predict

    @property
    def kind(self) -> str:
        return "step" if self.manifest.kind == "training step" else "predict"


def export_c(artifacts, out_dir, *, name: str | None = None, prefix: str = "gc", cc: str | None = None) -> dict:
    """Write `lib<name>.so`, `<name>.h` and `<name>.c` into `out_dir` for the artifacts (at most
    one training step and one function). Returns their paths by suffix."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise ExportError(f"export-c: the prefix {prefix!r} is not a C identifier")
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        # it names the header's guard and the files written into out_dir
        raise ExportError(f"export-c: the name {name!r} is not a C identifier")
    artifacts = [os.fspath(path) for path in artifacts]
    if not artifacts:
        raise ExportError("export-c: no artifact given")
    programs = [_program(path, prefix) for path in artifacts]
    kinds = [program.kind for program in programs]
    if len(set(kinds)) != len(kinds):
        raise ExportError("export-c: give at most one training step and one function (artifacts of one kind: "
                          "export them into libraries of their own, with --prefix apart)")
    name = name or _identifier(Path(artifacts[0]).stem)
    compiler = _c_compiler(cc)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, source = _header(programs, prefix, name), _source(programs, prefix, name)
    (out_dir / f"{name}.h").write_text(header)
    (out_dir / f"{name}.c").write_text(source)
    library = out_dir / f"lib{name}.so"
    with tempfile.TemporaryDirectory(prefix="graphc-export-") as build:
        _link(Path(build), programs, compiler, out_dir / f"{name}.c", library, out_dir)
    return {".so": library, ".h": out_dir / f"{name}.h", ".c": out_dir / f"{name}.c"}


def _program(path: str, prefix: str) -> _Program:
    manifest, sections = read_checked(path)    # every check graphc_runtime.load makes, ValueError naming the file
    if not manifest.target["triple"].startswith("x86_64") or "linux" not in manifest.target["triple"]:
        raise ExportError(f"{path}: export-c links x86-64 Linux code, not {manifest.target['triple']}")
    for slot in manifest.slots:
        if isinstance(slot, Param) and slot.dtype != np.float32:
            raise ExportError(f"{path}: param {slot.name!r} is {slot.dtype}; the C API's params are float32")
    for name in (*manifest.objects, manifest.team_section):
        try:
            ElfObject(bytes(sections[name]))   # the runtime's checks of an object, before cc sees it
        except ValueError as error:
            raise ExportError(f"{path}: its object code is refused: {error}") from None
    kind = "step" if manifest.kind == "training step" else "predict"
    return _Program(path, manifest, {key: bytes(value) for key, value in sections.items()}, f"{prefix}_{kind}")


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text, flags=re.ASCII)
    return name if re.match(r"[A-Za-z_]", name) else f"_{name}"


def _c_compiler(cc: str | None) -> str:
    for candidate in (cc, os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise ExportError("export-c: no C compiler found (cc, gcc or clang; or set CC)")


# ---------------------------------------------------------------------------- symbols

def _renamed_symbols(objects: list[bytes], prefix: str) -> list[bytes]:
    """`objects` with every global symbol they define, and every reference to one, named
    `prefix + name`: another program's objects in the same library may define the same names."""
    parsed = [ElfObject(blob) for blob in objects]
    defined = {symbol.name for obj in parsed for symbol in obj.symbols
               if symbol.name and symbol.binding != STB_LOCAL and symbol.section != SHN_UNDEF}
    return [_with_names(obj, {name: prefix + name for name in defined}) for obj in parsed]


def _with_names(obj: ElfObject, names: dict[str, str]) -> bytes:
    """The object with the symbols named in `names` renamed: the new names are appended to a
    copy of the symbol string table, placed at the end of the file (the old strings stay, so
    section names sharing the table keep their offsets)."""
    table = obj.sections[obj.symbol_table]
    strings_index = table.link
    strings = obj.sections[strings_index]
    blob = bytearray(obj.blob)
    new_strings = bytearray(obj.blob[strings.offset:strings.offset + strings.size])
    for index, symbol in enumerate(obj.symbols):
        if index and symbol.binding != STB_LOCAL and symbol.name in names:
            struct.pack_into("<I", blob, table.offset + index * ELF64_SYMBOL.size, len(new_strings))
            new_strings += names[symbol.name].encode() + b"\0"
    blob += bytes(-len(blob) % 8)
    header = obj.section_table + strings_index * ELF64_SECTION.size
    struct.pack_into("<QQ", blob, header + 24, len(blob), len(new_strings))   # sh_offset, sh_size
    blob += new_strings
    ElfObject(bytes(blob))   # the result must be as sound as the input
    return bytes(blob)


# ---------------------------------------------------------------------------- data

def _layout(slots, kind) -> tuple[dict[str, int], int]:
    """Offsets of each slot of `kind` in one block, each on a 64-byte boundary; the block's size."""
    offsets, size = {}, 0
    for slot in slots:
        if isinstance(slot, kind):
            offsets[slot.name] = size
            size += -(-max(_nbytes(slot), 1) // _ALIGN) * _ALIGN
    return offsets, size


def _nbytes(slot) -> int:
    return math.prod(slot.shape) * slot.dtype.itemsize


def _data_blob(program: _Program) -> bytes:
    """The saved params, then the saved state, as the wrapper's offsets say."""
    slots = program.manifest.slots
    param_offsets, param_bytes = _layout(slots, Param)
    state_offsets, state_bytes = _layout(slots, State)
    blob = bytearray(param_bytes + state_bytes)
    for prefix, offsets, base in (("param", param_offsets, 0), ("state", state_offsets, param_bytes)):
        for name, offset in offsets.items():
            data = program.sections[f"{prefix}:{name}"]
            blob[base + offset:base + offset + len(data)] = data
    return bytes(blob)


# ---------------------------------------------------------------------------- linking

def _link(build: Path, programs: list[_Program], compiler: str, wrapper: Path, library: Path, out_dir: Path) -> None:
    objects = []
    for program in programs:
        renamed = _renamed_symbols([program.sections[name] for name in program.manifest.objects],
                                   f"{program.function}__")
        for i, blob in enumerate(renamed):
            path = build / f"{program.function}_{i}.o"
            path.write_bytes(blob)
            objects.append(path)
        (build / f"{program.function}.bin").write_bytes(_data_blob(program))
        (build / f"{program.function}_data.S").write_text(_data_assembly(program.function))
        objects.append(build / f"{program.function}_data.S")
    team = build / "team.o"
    team.write_bytes(programs[0].sections[programs[0].manifest.team_section])
    exported = sorted(_exported_names(programs))
    (build / "exports.map").write_text("{\n  global:\n" + "".join(f"    {n};\n" for n in exported)
                                       + "  local: *;\n};\n")
    command = [compiler, *_COMPILER_FLAGS, "-shared", "-o", str(library), str(wrapper.resolve()),
               *map(str, objects), str(team), f"-I{out_dir.resolve()}", "-lm", "-lpthread",
               f"-Wl,--version-script={build / 'exports.map'}", "-Wl,-z,noexecstack", "-Wl,-z,notext"]
    done = subprocess.run(command, cwd=build, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise ExportError(f"export-c: {Path(compiler).name} could not link the library:\n{done.stderr.strip()}")


def _data_assembly(function: str) -> str:
    return (f"    .section .rodata\n    .balign {_ALIGN}\n    .globl {function}_data\n"
            f"    .type {function}_data, @object\n{function}_data:\n    .incbin \"{function}.bin\"\n"
            f"    .size {function}_data, .-{function}_data\n    .section .note.GNU-stack,\"\",@progbits\n")


def _exported_names(programs: list[_Program]) -> list[str]:
    names = []
    for program in programs:
        f = program.function
        names += [f, f"{f}_create", f"{f}_destroy", f"{f}_init_params", f"{f}_param_names", f"{f}_param_sizes",
                  f"{f}_calls"]
        if program.kind == "step":
            names += [f"{f}_set_lr", f"{f}_lr"]
    prefix = programs[0].function.rsplit("_", 1)[0]
    return names + [f"{prefix}_missing_cpu_feature"]


# ---------------------------------------------------------------------------- C text

_WRAPPER_CALLS = ("pow", "powf", "sqrt", "sqrtf", "size_t", "int32_t", "int64_t", "uint32_t", "uint64_t",
                  "team_run", "memcpy", "memset", "free", "aligned_alloc")


def _c_names(slots) -> dict[str, str]:
    """A C identifier for each input and output, unique among them."""
    # the wrapper's own locals and the library names its bodies call: a parameter must not hide them
    names, taken = {}, {"c", "i", "t", "key", "params", *_C_KEYWORDS, *_WRAPPER_CALLS}
    for slot in slots:
        if isinstance(slot, (Input, Output)):
            base = _identifier(slot.name)
            candidate, k = base, 1
            while candidate in taken:
                candidate, k = f"{base}_{k}", k + 1
            taken.add(candidate)
            names[slot.name] = candidate
    return names


def _arguments(program: _Program) -> list[str]:
    """The C parameters of the program's call after (context, params)."""
    manifest = program.manifest
    names = _c_names(manifest.slots)
    inputs = [f"const {_C_TYPES[s.dtype.name]} *{names[s.name]}" for s in manifest.slots
              if isinstance(s, Input) and s.name not in manifest.ignored_inputs]
    outputs = [f"{_C_TYPES[s.dtype.name]} *{names[s.name]}" for s in manifest.slots if isinstance(s, Output)]
    return inputs + outputs


def _header(programs: list[_Program], prefix: str, name: str) -> str:
    guard = f"{name.upper()}_H"
    upper = prefix.upper()
    sources = ", ".join(Path(p.path).name for p in programs).replace("*/", "* /")   # inside a C comment
    lines = [f"/* {name}.h: generated by `graphc export-c` from {sources}.",
             " *",
             " * Params live in the caller's memory: params[i] is the float32 array (C order) named",
             " * <function>_param_names[i], of <function>_param_sizes[i] elements; a training step updates",
             " * them in place. A context holds the rest (optimizer state as saved, scratch memory, the",
             " * call count, the threads): one context serves one caller thread at a time.",
             " * Every function returning int returns " + upper + "_OK or an error below. */",
             f"#ifndef {guard}", f"#define {guard}", "", "#include <stddef.h>", "#include <stdint.h>", "",
             "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
             f"enum {{ {upper}_OK = 0, {upper}_ERROR_INPUT = 1, {upper}_ERROR_NOT_FINITE = 2, {upper}_ERROR_CPU = 3,",
             f"       {upper}_ERROR_MEMORY = 4, {upper}_ERROR_THREADS = 5 }};", "",
             "/* NULL if this CPU has every feature the code needs, else the name of one it lacks. */",
             f"const char *{prefix}_missing_cpu_feature(void);", ""]
    for program in programs:
        lines += _header_block(program, prefix)
    lines += ["#ifdef __cplusplus", "}", "#endif", f"#endif /* {guard} */", ""]
    return "\n".join(lines)


def _header_block(program: _Program, prefix: str) -> list[str]:
    manifest, f = program.manifest, program.function
    upper = f.upper()
    params = [s for s in manifest.slots if isinstance(s, Param)]
    names = _c_names(manifest.slots)
    what = "one training step: forward, backward and the optimizer's update" if program.kind == "step" else \
        "the compiled function's outputs"
    lines = [f"/* ---- {f}: {what} ({Path(program.path).name}, graph {manifest.graph_hash[:16]},",
             f" *      compiled for {manifest.target['cpu']}, up to {manifest.max_threads} threads) */",
             f"#define {upper}_PARAM_COUNT {len(params)}", f"#define {upper}_MAX_THREADS {manifest.max_threads}",
             f"extern const char *const {f}_param_names[];   /* {upper}_PARAM_COUNT of them */",
             f"extern const size_t {f}_param_sizes[];         /* elements of each */", "/* Inputs and outputs:"]
    for slot in manifest.slots:
        if isinstance(slot, Input) and slot.name not in manifest.ignored_inputs:
            bounds = f", values in [{slot.valid_range[0]}, {slot.valid_range[1]})" if slot.valid_range else ""
            lines.append(f" *   {names[slot.name]}: {_C_TYPES[slot.dtype.name]} {list(slot.shape)}{bounds}")
        elif isinstance(slot, Output):
            lines.append(f" *   {names[slot.name]} (written): {_C_TYPES[slot.dtype.name]} {list(slot.shape)}")
    lines += [" */", f"typedef struct {f}_context {f}_context;",
              f"/* threads: 1 to {upper}_MAX_THREADS (clamped); the results are the same bit for bit as",
              " * graphc_runtime's on as many threads. */",
              f"int {f}_create({f}_context **context, int threads);",
              f"void {f}_destroy({f}_context *context);",
              "/* Copies the values the artifact was saved with into the caller's params. */",
              f"void {f}_init_params(float *const params[]);",
              f"int {f}({f}_context *context, float *const params[], "
              f"{', '.join(_arguments(program))});",
              f"int64_t {f}_calls(const {f}_context *context);"]
    if program.kind == "step":
        lines += ["/* The learning rate, from the next step on (as step.lr = ... in Python). */",
                  f"void {f}_set_lr({f}_context *context, double lr);", f"double {f}_lr(const {f}_context *context);"]
    return lines + [""]


def _source(programs: list[_Program], prefix: str, name: str) -> str:
    features = sorted({flag for program in programs for feature in program.manifest.target["cpu_features"]
                       for flag in _CPUINFO_FLAGS[feature]})
    upper = prefix.upper()
    parts = [_SOURCE_HEAD.format(name=name, control_bytes=CONTROL_BLOCK_BYTES),
             "static const char *const required_flags[] = {" + ", ".join(f'"{flag}"' for flag in features)
             + (", " if features else "") + "NULL};",
             _CPU_CHECK.replace("PREFIX", prefix)]
    for program in programs:
        parts.append(_program_source(program, upper))
    return "\n".join(parts)


def _program_source(program: _Program, upper: str) -> str:
    manifest, f = program.manifest, program.function
    slots = manifest.slots
    param_offsets, param_bytes = _layout(slots, Param)
    state_offsets, state_bytes = _layout(slots, State)
    params = [s for s in slots if isinstance(s, Param)]
    workspace = sum(-(-max(s.nbytes, 1) // _ALIGN) * _ALIGN for s in slots if isinstance(s, Workspace))
    names = _c_names(slots)
    calls_at_save = int(np.frombuffer(program.sections[f"state:{manifest.calls_slot}"], np.int64)[0])
    lines = [f"/* ---------------- {f} */",
             f"extern void {f}__{manifest.entry}(void **args, int64_t tid, int64_t nthreads);",
             f"extern const unsigned char {f}_data[] __attribute__((visibility(\"hidden\")));",
             f"const char *const {f}_param_names[] = {{{', '.join(_c_string(s.name) for s in params) or 'NULL'}}};",
             f"const size_t {f}_param_sizes[] = {{{', '.join(str(math.prod(s.shape)) for s in params) or '0'}}};",
             f"static const size_t {f}_param_offsets[] = "
             f"{{{', '.join(str(param_offsets[s.name]) for s in params) or '0'}}};",
             "", f"struct {f}_context {{", f"    void *args[{len(slots)}];", "    unsigned char *state;",
             "    unsigned char *workspace;", "    int64_t status;", "    double lr;",
             "    int64_t steps_before_reset;",
             "    struct team team;", "};", "",
             f"int {f}_create({f}_context **out, int threads) {{",
             "    *out = NULL;",
             f"    if (PREFIX_missing_cpu_feature() != NULL) return {upper}_ERROR_CPU;".replace(
                 "PREFIX", f.rsplit("_", 1)[0]),
             f"    {f}_context *c = calloc(1, sizeof *c);",
             f"    if (c == NULL) return {upper}_ERROR_MEMORY;",
             f"    c->state = aligned_alloc({_ALIGN}, {max(state_bytes, _ALIGN)});",
             f"    c->workspace = aligned_alloc({_ALIGN}, {max(workspace, _ALIGN)});",
             "    if (c->state == NULL || c->workspace == NULL) {",
             f"        free(c->state); free(c->workspace); free(c); return {upper}_ERROR_MEMORY;", "    }",
             f"    memcpy(c->state, {f}_data + {param_bytes}, {state_bytes});",
             f"    memset(c->workspace, 0, {max(workspace, _ALIGN)});"]
    workspace_offset = 0
    for position, slot in enumerate(slots):
        if isinstance(slot, State):
            lines.append(f"    c->args[{position}] = c->state + {state_offsets[slot.name]};")
        elif isinstance(slot, Workspace):
            lines.append(f"    c->args[{position}] = c->workspace + {workspace_offset};")
            workspace_offset += -(-max(slot.nbytes, 1) // _ALIGN) * _ALIGN
        elif isinstance(slot, Status):
            lines.append(f"    c->args[{position}] = &c->status;")
    lr = manifest.optimizer["lr"] if manifest.optimizer else 0.0
    lines += [f"    c->lr = {float(lr).hex()};",
              f"    c->steps_before_reset = {calls_at_save - manifest.optimizer_steps};",
              f"    int error = team_start(&c->team, threads < 1 ? 1 : threads > {manifest.max_threads} ? "
              f"{manifest.max_threads} : threads);",
              "    if (error) {", "        free(c->state); free(c->workspace); free(c);",
              f"        return {upper}_ERROR_THREADS;", "    }",
              "    *out = c;", f"    return {upper}_OK;", "}", "",
              f"void {f}_destroy({f}_context *c) {{", "    if (c == NULL) return;", "    team_stop(&c->team);",
              "    free(c->state); free(c->workspace); free(c);", "}", "",
              f"void {f}_init_params(float *const params[]) {{",
              f"    for (size_t i = 0; i < {len(params)}; i++)",
              f"        memcpy(params[i], {f}_data + {f}_param_offsets[i], {f}_param_sizes[i] * sizeof(float));",
              "}", "",
              f"int64_t {f}_calls(const {f}_context *c) {{",
              f"    return *(const int64_t *)(c->state + {state_offsets[manifest.calls_slot]});", "}", ""]
    lines += _call_source(program, names, state_offsets, upper)
    if program.kind == "step":
        lines += [f"void {f}_set_lr({f}_context *c, double lr) {{ c->lr = lr; }}",
                  f"double {f}_lr(const {f}_context *c) {{ return c->lr; }}", ""]
    return "\n".join(lines)


def _call_source(program: _Program, names: dict, state_offsets: dict, upper: str) -> list[str]:
    manifest, f = program.manifest, program.function
    arguments = ", ".join(_arguments(program))
    lines = [f"int {f}({f}_context *c, float *const params[], {arguments}) {{"]
    param_index = 0
    for position, slot in enumerate(manifest.slots):
        if isinstance(slot, Input):
            if slot.name in manifest.ignored_inputs:
                continue
            name = names[slot.name]
            if slot.valid_range is not None and not slot.range_checked_natively:
                lo, hi = slot.valid_range
                lines += [f"    for (size_t i = 0; i < {math.prod(slot.shape)}; i++)",
                          f"        if ({name}[i] < {lo} || {name}[i] >= {hi}) return {upper}_ERROR_INPUT;"]
            lines.append(f"    c->args[{position}] = (void *){name};")
        elif isinstance(slot, Param):
            lines.append(f"    c->args[{position}] = params[{param_index}];")
            param_index += 1
        elif isinstance(slot, Output):
            lines.append(f"    c->args[{position}] = {names[slot.name]};")
    calls = f"*(int64_t *)(c->state + {state_offsets[manifest.calls_slot]})"
    if manifest.random_key_slot is not None:   # as graphc_runtime's _CallValues.before_call
        key = f"(uint32_t *)(c->state + {state_offsets[manifest.random_key_slot]})"
        lines += [f"    uint32_t *key = {key};", f"    key[0] = {manifest.seed}u;", f"    key[1] = (uint32_t){calls};"]
    if manifest.optimizer is not None:
        lines += _hyper_source(manifest, state_offsets, calls)
    lines += ["    c->status = 0;", f"    team_run(&c->team, {f}__{manifest.entry}, c->args);",
              f"    if (c->status > 0) return {upper}_ERROR_INPUT;",
              f"    if (c->status < 0) return {upper}_ERROR_NOT_FINITE;", f"    return {upper}_OK;", "}", ""]
    return lines


def _hyper_source(manifest: Manifest, state_offsets: dict, calls: str) -> list[str]:
    """The hyperparameter slots' values: graphc_runtime/optimizers.py's arithmetic, in C."""
    optimizer = manifest.optimizer
    slot = {name: f"*(float *)(c->state + {state_offsets[state]})" for name, state in manifest.hyper_slots.items()}
    if optimizer["kind"] == "SGD":
        return [f"    {slot['lr']} = (float)c->lr;"]
    beta1, beta2 = (float(beta).hex() for beta in optimizer["betas"])
    lines = [f"    double t = (double)({calls} - c->steps_before_reset + 1);",
             f"    {slot['step_size']} = (float)(c->lr / (1.0 - pow({beta1}, t)));",
             f"    {slot['inv_bias2_sqrt']} = (float)(1.0 / sqrt(1.0 - pow({beta2}, t)));"]
    if "decay" in slot:
        lines.append(f"    {slot['decay']} = (float)(1.0 - c->lr * {float(optimizer['weight_decay']).hex()});")
    return lines


def _c_string(text: str) -> str:
    escaped = "".join(c if c.isascii() and c.isprintable() and c not in '"\\?' else
                      "".join(f"\\{b:03o}" for b in c.encode()) for c in text)
    return f'"{escaped}"'


_SOURCE_HEAD = """/* {name}.c: generated by `graphc export-c`; the wrapper linked into lib{name}.so. */
#define _POSIX_C_SOURCE 200809L
#include "{name}.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The thread team (graphc_runtime/team_native.py): workers 1..n-1 wait in graphc_team_worker,
   graphc_team_run hands them a job and runs tid 0 on the caller's thread. */
#define TEAM_CONTROL_BYTES {control_bytes}
typedef void entry_function(void **args, int64_t tid, int64_t nthreads);
extern int32_t graphc_team_init(void *team);
extern void graphc_team_destroy(void *team);
extern void graphc_team_run(void *team, entry_function *entry, void **args, int64_t nthreads);
extern void graphc_team_shutdown(void *team, int64_t workers);
extern void graphc_team_worker(void *team, int64_t tid);

struct worker {{ void *control; int64_t tid; pthread_t thread; }};
struct team {{ int64_t threads; void *control; struct worker *workers; }};

static void *worker_main(void *argument) {{
    struct worker *worker = argument;
    graphc_team_worker(worker->control, worker->tid);
    return NULL;
}}

static void team_stop(struct team *team) {{
    if (team->control == NULL) return;
    graphc_team_shutdown(team->control, team->threads - 1);
    for (int64_t i = 0; i < team->threads - 1; i++) pthread_join(team->workers[i].thread, NULL);
    graphc_team_destroy(team->control);
    free(team->control);
    free(team->workers);
    team->control = NULL;
}}

static int team_start(struct team *team, int threads) {{
    team->threads = threads;
    team->control = NULL;
    team->workers = NULL;
    if (threads == 1) return 0;
    team->control = aligned_alloc(64, TEAM_CONTROL_BYTES);
    team->workers = calloc((size_t)threads - 1, sizeof *team->workers);
    if (team->control == NULL || team->workers == NULL) {{
        free(team->control); free(team->workers); team->control = NULL; return 1;
    }}
    memset(team->control, 0, TEAM_CONTROL_BYTES);
    if (graphc_team_init(team->control) != 0) {{
        free(team->control); free(team->workers); team->control = NULL; return 1;
    }}
    for (int64_t i = 0; i < threads - 1; i++) {{
        team->workers[i].control = team->control;
        team->workers[i].tid = i + 1;
        if (pthread_create(&team->workers[i].thread, NULL, worker_main, &team->workers[i]) != 0) {{
            team->threads = i + 1;   /* stop the ones started */
            team_stop(team);
            return 1;
        }}
    }}
    return 0;
}}

static void team_run(struct team *team, entry_function *entry, void **args) {{
    if (team->threads == 1) entry(args, 0, 1);
    else graphc_team_run(team->control, entry, args, team->threads);
}}
"""

_CPU_CHECK = """
/* The flags the code needs, read from /proc/cpuinfo as graphc_runtime reads them. */
static int has_flag(const char *line, const char *flag) {
    size_t length = strlen(flag);
    for (const char *at = strstr(line, flag); at != NULL; at = strstr(at + 1, flag)) {
        int starts = at == line || at[-1] == ' ' || at[-1] == '\\t' || at[-1] == ':';
        int ends = at[length] == ' ' || at[length] == '\\n' || at[length] == '\\0';
        if (starts && ends) return 1;
    }
    return 0;
}

const char *PREFIX_missing_cpu_feature(void) {
    size_t capacity = 1 << 16;   /* a flags line is a few hundred bytes */
    char *line = malloc(capacity);
    FILE *cpuinfo = fopen("/proc/cpuinfo", "r");
    if (line == NULL || cpuinfo == NULL) {
        free(line);
        if (cpuinfo != NULL) fclose(cpuinfo);
        return "(/proc/cpuinfo is unreadable)";
    }
    const char *missing = NULL;
    int seen = 0;
    while (missing == NULL && fgets(line, (int)capacity, cpuinfo) != NULL) {
        if (strncmp(line, "flags", 5) != 0) continue;
        seen = 1;
        for (int i = 0; required_flags[i] != NULL; i++)
            if (!has_flag(line, required_flags[i])) { missing = required_flags[i]; break; }
    }
    fclose(cpuinfo);
    free(line);
    return seen || missing != NULL ? missing : "(no flags in /proc/cpuinfo)";
}
"""
