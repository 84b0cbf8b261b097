"""Loading compiled object code into this process.

The compiler emits one or more object files (possibly from the on-disk cache; a large program
is compiled as several modules, in parallel); `NativeLibrary` links them into memory as one
unit, and hands out function addresses. On x86-64 ELF hosts graphc links them itself
(`elf_link`: no MCJIT engine, ~80 KiB less resident per library); elsewhere, or for objects
it does not handle, LLVM's MCJIT does. Symbols one object needs from
another (the entry calls kernels compiled in other modules) resolve among them; the other
external symbols the generated code uses (expf, logf, tanhf from libm; memset, memcpy from
libc; pthread functions) are resolved against the libraries already loaded in the Python
process. MCJIT trusts what it links, so on ELF hosts the objects are checked first: malformed
bytes or an external that neither another object nor a loaded library provides raise an error
instead of crashing the process.

Objects must be emitted by a target machine from `create_host_target_machine`: it selects
the JIT code model, whose absolute 64-bit calls reach libm wherever MCJIT places the code;
the default small code model can overflow its 32-bit relocations.
"""

from __future__ import annotations

import functools
import os
import platform
import struct
import sys
import threading
import warnings
from typing import NamedTuple

import llvmlite.binding as llvm

from . import elf_link
from .elf_link import ELF64_HEADER, ELF64_MAGIC, ELF64_SECTION, ELF64_SYMBOL, SHN_UNDEF, SHT_SYMTAB
from .perf_map import PERF_MAP_VARIABLE, append_perf_map, perf_map_lines, perf_map_wanted

__all__ = [
    "HostTarget",
    "MissingSymbolError",
    "NativeLibrary",
    "create_host_target_machine",
    "defined_symbols",
    "host_target",
    "initialize_llvm",
    "undefined_symbols",
]


class MissingSymbolError(LookupError):
    """A symbol a library defines or needs cannot be found."""


_initialize_lock = threading.Lock()
_initialized = False


def initialize_llvm() -> None:
    """Initialize LLVM for the host target; cheap and safe to call any number of times.

    llvmlite 0.50 removed `llvm.initialize()` (it raises); the three native initializers
    are all that code generation and loading for the host need.
    """
    global _initialized
    if _initialized:
        return
    with _initialize_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            llvm.initialize_native_asmparser()
            _initialized = True


class HostTarget(NamedTuple):
    """What machine code is specialized to; part of every cache key."""

    triple: str
    cpu: str
    features: str


@functools.cache
def host_target() -> HostTarget:
    initialize_llvm()
    return HostTarget(
        triple=llvm.get_process_triple(),
        cpu=llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten(),
    )


def create_host_target_machine(opt_level: int = 3) -> llvm.TargetMachine:
    """A fresh target machine for this CPU with the JIT code model.

    Fresh because MCJIT takes ownership of the target machine it is given.
    """
    host = host_target()
    return llvm.Target.from_triple(host.triple).create_target_machine(
        cpu=host.cpu, features=host.features, opt=opt_level, jit=True
    )


class NativeLibrary:
    """Object files linked into this process, alive as long as this object is.

    `objects` is one object file (bytes) or a sequence of them, linked together.
    """

    def __init__(self, objects):
        if isinstance(objects, (bytes, bytearray, memoryview)):
            objects = [objects]
        objects = [bytes(obj) for obj in objects]
        if not objects:
            raise ValueError("NativeLibrary needs at least one object file")
        self._addresses: dict[str, int] = {}
        # graphc's own linker where it applies (x86-64 ELF, ~80 KiB less resident per
        # library), MCJIT for everything else.
        self._image = elf_link.link(objects) if _HOST_IS_X86_64_ELF and own_linker_enabled() else None
        self._engine = None if self._image is not None else self._link_with_mcjit(objects)
        if _HOST_USES_ELF64_LITTLE_ENDIAN and perf_map_wanted():
            try:
                append_perf_map(perf_map_lines([elf_symbols(obj) for obj in objects], self.address))
            except OSError as error:  # a diagnostic: the library is loaded and works without it
                warnings.warn(f"{PERF_MAP_VARIABLE}: could not write the perf map ({error})", RuntimeWarning,
                              stacklevel=2)

    @property
    def linker(self) -> str:
        """Which linker loaded the objects: "graphc" (elf_link) or "mcjit"."""
        return "graphc" if self._image is not None else "mcjit"

    @staticmethod
    def _link_with_mcjit(objects: list[bytes]) -> llvm.ExecutionEngine:
        target_machine = create_host_target_machine()
        # MCJIT is created around a module; an empty one serves, the code comes from the object.
        anchor = llvm.parse_assembly("")
        anchor.triple = target_machine.triple
        anchor.data_layout = str(target_machine.target_data)
        engine = llvm.create_mcjit_compiler(anchor, target_machine)
        # Only after an engine exists does LLVM search the process's own symbols.
        _check_loadable(objects)
        for object_bytes in objects:
            engine.add_object_file(llvm.ObjectFileRef.from_data(object_bytes))
        engine.finalize_object()
        return engine

    def address(self, symbol: str) -> int:
        """Address of a global function the objects define; raises MissingSymbolError if they
        do not."""
        address = self._addresses.get(symbol)
        if address is None:
            if self._image is not None:
                address = self._image.address(symbol)
            else:
                address = self._engine.get_function_address(symbol)
            if not address:
                raise MissingSymbolError(f"the compiled object defines no symbol {symbol!r}")
            self._addresses[symbol] = address
        return address


def _check_loadable(objects: list[bytes]) -> None:
    # MCJIT trusts its input: malformed bytes crash the interpreter, and an unresolved
    # external is linked to address 0, so the first call crashes. Where objects are ELF64
    # little-endian (Linux on x86-64 and aarch64), check both and refuse with a clear error.
    if not _HOST_USES_ELF64_LITTLE_ENDIAN:
        return
    needed, defined = set(), set()
    try:
        for object_bytes in objects:
            needed.update(undefined_symbols(object_bytes))
            exported = set(defined_symbols(object_bytes))
            if exported & defined:
                # Linked together, one definition would silently win.
                raise ValueError(f"symbols defined twice: {', '.join(sorted(exported & defined))}")
            defined |= exported
    except (struct.error, IndexError, ValueError) as error:
        raise ValueError(f"not a loadable object file: {error}") from None
    missing = sorted(name for name in needed - defined if llvm.address_of_symbol(name) is None)
    if missing:
        raise MissingSymbolError(
            "the compiled object needs symbols this process does not provide: " + ", ".join(missing)
        )


# ELF64 symbol bindings and types, beyond the layouts shared with elf_link.
_STB_GLOBAL, _STB_WEAK = 1, 2
_STT_FUNC = 2
_HOST_USES_ELF64_LITTLE_ENDIAN = (
    llvm.get_object_format() == "ELF" and sys.byteorder == "little" and struct.calcsize("P") == 8
)
_HOST_IS_X86_64_ELF = _HOST_USES_ELF64_LITTLE_ENDIAN and platform.machine().lower() in ("x86_64", "amd64")

# GRAPHC_LINKER=mcjit links every library with MCJIT (for comparison, or should the own
# linker ever misbehave on some system).
LINKER_VARIABLE = "GRAPHC_LINKER"


def own_linker_enabled() -> bool:
    return os.environ.get(LINKER_VARIABLE, "graphc").strip().lower() != "mcjit"


class ElfSymbol(NamedTuple):
    """A named entry of an ELF64 object's symbol table."""

    name: str
    section: int      # index of the section it lies in; SHN_UNDEF: defined elsewhere
    value: int        # offset in that section (in a relocatable object)
    size: int
    binding: int      # _STB_GLOBAL, _STB_WEAK, or local
    kind: int         # _STT_FUNC for functions

    @property
    def defined(self) -> bool:
        return self.section != SHN_UNDEF

    @property
    def exported(self) -> bool:
        """Visible to other objects (and to MCJIT's address lookup)."""
        return self.defined and self.binding in (_STB_GLOBAL, _STB_WEAK)

    @property
    def is_function(self) -> bool:
        return self.kind == _STT_FUNC


def undefined_symbols(object_bytes: bytes) -> list[str]:
    """Names an ELF64 little-endian object expects from elsewhere.

    Raises ValueError (or struct.error, IndexError for damaged tables) for anything else.
    """
    return [symbol.name for symbol in elf_symbols(object_bytes) if not symbol.defined]


def defined_symbols(object_bytes: bytes) -> list[str]:
    """Names an ELF64 little-endian object defines for others (global and weak symbols)."""
    return [symbol.name for symbol in elf_symbols(object_bytes) if symbol.exported]


def elf_symbols(object_bytes: bytes) -> list[ElfSymbol]:
    """The named symbols of an ELF64 little-endian object."""
    if not object_bytes.startswith(ELF64_MAGIC):
        raise ValueError("not an ELF64 little-endian object")
    header = ELF64_HEADER.unpack_from(object_bytes)
    section_offset, section_entry_size, section_count = header[6], header[11], header[12]
    sections = [
        ELF64_SECTION.unpack_from(object_bytes, section_offset + index * section_entry_size)
        for index in range(section_count)
    ]
    symbols = []
    for _, kind, _, _, offset, size, link, _, _, entry_size in sections:
        if kind != SHT_SYMTAB:
            continue
        strings_offset = sections[link][4]
        # Entry 0 of a symbol table is the reserved null symbol.
        for position in range(offset + entry_size, offset + size, entry_size):
            name_offset, info, _, section_index, value, symbol_size = ELF64_SYMBOL.unpack_from(object_bytes, position)
            if name_offset:
                name = _c_string(object_bytes, strings_offset + name_offset)
                symbols.append(ElfSymbol(name, section_index, value, symbol_size, info >> 4, info & 0xF))
    return symbols


def _c_string(blob: bytes, start: int) -> str:
    return blob[start:blob.index(b"\0", start)].decode("utf-8")
