"""Compiled programs saved to a file and loaded without the compiler: `graphc_runtime.load`.

An artifact (artifact.py, manifest.py) holds a program's object code, the thread team's, its
slot layout, its params and buffers, its State (optimizer state, call counter) and what the
runtime must write before each call (dropout's key, the optimizer's hyperparameters:
optimizers.py). Loading checks the whole file, this CPU and the code before anything runs;
then a loaded function or training step behaves as the compiled one did, bit for bit: the
same machine code, on the same slots, fed the same per-call values.

Needs numpy and this package only: on x86-64 Linux no LLVM is imported (the objects are linked
by elf_link, the thread team's code comes from the file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
from collections.abc import Mapping

import numpy as np

from . import artifact, threads
from .artifact import ArtifactError
from .buffers import aligned_zeros
from .cpu_features import missing_features
from .elf_link import ElfObject
from .loader import NativeLibrary
from .manifest import Manifest, manifest_to_json, parse_manifest
from .call_values import CallValues, FunctionCalls, TrainingStepCalls
from .optimizers import changes_every_call, hyper_values
from .program import Program
from .slots import Param, State
from .team_native import TeamFunctions, team_ir

__all__ = ["load", "read_checked", "save_program", "LoadedFunction", "LoadedTrainingStep", "team_ir_digest"]


def load(path) -> LoadedFunction:
    """The compiled function or training step saved at `path` (by `fn.save(path)`).

    Raises ValueError naming the file and the check for a damaged file, another format
    version, code for another CPU (or features this one lacks), or code the linker refuses;
    nothing runs before every check has passed.
    """
    where = os.fspath(path)
    manifest, sections = read_checked(where)
    params = {slot.name: _array(sections[f"param:{slot.name}"], slot)
              for slot in manifest.slots if isinstance(slot, Param)}
    team_object = bytes(sections[manifest.team_section])
    try:
        ElfObject(team_object)   # checked as the program's objects are, also when it is not linked here
        library = NativeLibrary([bytes(sections[name]) for name in manifest.objects])
        team = NativeLibrary(team_object) if manifest.max_threads > 1 and threads.needs_team_code() else None
    except ValueError as error:   # elf_link's checks: malformed objects, missing symbols
        raise ArtifactError(f"{where}: its object code is refused: {error}") from None
    try:
        program = Program(library, manifest.entry, manifest.slots, params, max_threads=manifest.max_threads,
                          ignored_inputs=manifest.ignored_inputs)
        if team is not None:
            threads.provide_team_code(TeamFunctions(team))
    except ValueError as error:   # a symbol the objects lack, slots the program refuses
        raise ArtifactError(f"{where}: {error}") from None
    for name, memory in program.state.items():
        np.copyto(memory, _array(sections[f"state:{name}"], _state_slot(manifest, name)))
    cls = LoadedTrainingStep if manifest.kind == "training step" else LoadedFunction
    return cls(program, manifest, team_object)


def read_checked(path) -> tuple[Manifest, dict[str, memoryview]]:
    """The artifact's checked manifest and its sections, every check of `load` passed but the
    linker's (which `load` runs on the objects)."""
    where = os.fspath(path)
    raw, sections = artifact.read(where)
    try:
        manifest = parse_manifest(where, raw, sections)
    except (TypeError, KeyError, AttributeError, OverflowError) as error:   # a shape the checks did not foresee
        raise ArtifactError(f"{where}: the manifest is malformed ({type(error).__name__}: {error})") from None
    _check_target(where, manifest)
    if manifest.team_ir_sha256 != team_ir_digest(manifest.target["triple"]):
        raise ArtifactError(f"{where}: its thread team's code is not this graphc_runtime's (another version)")
    return manifest, sections


def save_program(path, program: Program, manifest: Manifest, team_object: bytes) -> None:
    """Write `program` (its code, params and state as they are now) as an artifact at `path`."""
    params, state = program.snapshot()
    sections = {f"object:{i}": obj for i, obj in enumerate(program.library.objects)}
    sections["team"] = team_object
    sections.update({f"param:{name}": array.tobytes() for name, array in params.items()})
    sections.update({f"state:{name}": array.tobytes() for name, array in state.items()})
    objects = tuple(name for name in sections if name.startswith("object:"))
    fields = manifest_to_json(manifest)
    fields.update(objects=list(objects), team={"section": "team", "ir_sha256": manifest.team_ir_sha256})
    artifact.write(path, fields, sections)


def team_ir_digest(triple: str) -> str:
    """Identifies the thread team's code: an artifact's must be the one this runtime drives."""
    return hashlib.sha256(team_ir(triple).encode()).hexdigest()


class LoadedFunction(FunctionCalls):
    """A compiled function loaded from an artifact: call it with the inputs as keywords.

    `params` are its own arrays (loaded from the file; buffers its ops update change in place),
    `load_params(values)` copies values into them, `save(path)` writes it again as it is now.
    """

    def __init__(self, program: Program, manifest: Manifest, team_object: bytes):
        self._program = program
        self._manifest = manifest
        self._team_object = team_object
        self._single = manifest.single_output
        self._call_values = _CallValues(program.state, manifest)

    @property
    def manifest(self) -> Manifest:
        """What the file said (as loaded: calls and lr change as it runs; `save` writes the new ones)."""
        return self._manifest

    @property
    def inputs(self) -> dict[str, tuple]:
        """Each input's (shape, dtype)."""
        return {slot.name: (slot.shape, slot.dtype) for slot in self._program.inputs}

    def save(self, path) -> None:
        """Write this program, with its params and state as they are now, to `path`."""
        with self._call_values.lock:
            manifest = self._call_values.updated(self._manifest)
            save_program(path, self._program, manifest, self._team_object)

    def __repr__(self) -> str:
        return f"<loaded {self._manifest.kind} of graph {self._manifest.graph_hash[:12]}>"


class LoadedTrainingStep(TrainingStepCalls, LoadedFunction):
    """A training step loaded from an artifact: `step(**feeds)` trains and returns the loss.

    `lr` is settable between calls; `state` holds the optimizer's state; training goes on
    exactly as the saved step's would have.
    """


class _CallValues(CallValues):
    """The per-call values of a loaded program, driven by the manifest: its optimizer's
    description stands for graphc's optimizer object (optimizers.py)."""

    def __init__(self, state: Mapping[str, np.ndarray], manifest: Manifest):
        optimizer = manifest.optimizer
        super().__init__(state, manifest.calls_slot, seed=manifest.seed, random_key_slot=manifest.random_key_slot,
                         hyper_slots=manifest.hyper_slots,
                         hyper_values=(lambda lr, step: hyper_values(optimizer, lr, step)) if optimizer else None,
                         changes_every_call=optimizer is not None and changes_every_call(optimizer),
                         lr=optimizer["lr"] if optimizer else None, optimizer_steps=manifest.optimizer_steps)

    def updated(self, manifest: Manifest) -> Manifest:
        """`manifest` with the counts and lr as they are now."""
        optimizer = None if manifest.optimizer is None else {**manifest.optimizer, "lr": self.lr}
        return dataclasses.replace(manifest, optimizer_steps=self.optimizer_steps, optimizer=optimizer)


def _array(section: memoryview, slot) -> np.ndarray:
    """A fresh, aligned, writable copy of a section's values."""
    array = aligned_zeros(slot.shape, slot.dtype)
    np.copyto(array, np.frombuffer(section, slot.dtype).reshape(slot.shape))
    return array


def _state_slot(manifest: Manifest, name: str) -> State:
    return next(slot for slot in manifest.slots if isinstance(slot, State) and slot.name == name)


def _check_target(where: str, manifest: Manifest) -> None:
    """Code for this kind of machine and OS, needing no CPU feature this one lacks."""
    triple = manifest.target["triple"]
    if _arch(triple.split("-")[0]) != _arch(platform.machine()) or _os_of_triple(triple) != _host_os():
        raise ArtifactError(f"{where}: code for {triple}, not for this machine ({platform.machine()}, {sys.platform})")
    missing = missing_features(manifest.target["cpu_features"])
    if missing:
        raise ArtifactError(f"{where}: its code needs CPU features this CPU lacks: {', '.join(missing)} "
                            f"(compiled for {manifest.target['cpu']}; save it from a program compiled with "
                            f"GRAPHC_TARGET=avx2 or sse to run it on older CPUs)")


def _arch(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


def _os_of_triple(triple: str) -> str:
    for marker, name in (("linux", "linux"), ("darwin", "darwin"), ("apple", "darwin"), ("macos", "darwin"),
                         ("windows", "win32"), ("freebsd", "freebsd")):
        if marker in triple:
            return name
    return triple


def _host_os() -> str:
    for prefix in ("linux", "darwin", "win32", "freebsd"):
        if sys.platform.startswith(prefix):
            return prefix
    return sys.platform

