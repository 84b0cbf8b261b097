"""Loading compiled object code into this process.

The compiler emits one or more object files (possibly from the on-disk cache; a large program
is compiled as several modules, in parallel); `NativeLibrary` links them into memory as one
unit, and hands out function addresses. On x86-64 ELF hosts graphc links them itself
(`elf_link`: no MCJIT engine resident per library); elsewhere, or for objects
it does not handle, LLVM's MCJIT does. Symbols one object needs from
another (the entry calls kernels compiled in other modules) resolve among them; the other
external symbols the generated code uses (expf, logf, tanhf from libm; memset, memcpy from
libc; pthread functions) are resolved against the libraries already loaded in the Python
process. MCJIT trusts what it links and aborts the interpreter on what it does not implement,
so on ELF hosts every object is read in full and checked first (`elf_link.ElfObject`, then
MCJIT's relocation types and reach for x86-64 and AArch64): whatever cannot be loaded (damaged
bytes, or an external that neither another object nor a loaded library provides) raises
ValueError instead of crashing the process.

Objects must be emitted by a target machine from `create_host_target_machine`: it selects
the JIT code model, whose absolute 64-bit calls reach libm wherever MCJIT places the code;
the default small code model can overflow its 32-bit relocations.

llvmlite is imported only where MCJIT links: on x86-64 Linux, loading code (a saved artifact
included) imports no LLVM at all.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
import warnings
from typing import TYPE_CHECKING, NamedTuple

from . import elf_link
from .host import HostTarget, create_target_machine, host_target, initialize_llvm
from .elf_link import EM_AARCH64, EM_X86_64, SHF_ALLOC, SHN_ABS, SHN_UNDEF, STT_FILE, STT_SECTION, ElfObject
from .perf_map import PERF_MAP_VARIABLE, append_perf_map, perf_map_lines, perf_map_wanted

if TYPE_CHECKING:
    import llvmlite.binding as llvm

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


class MissingSymbolError(LookupError, ValueError):
    """A symbol a library defines or needs cannot be found.

    A ValueError too: objects that need what this process does not provide are not loadable
    here, and loading refuses whatever it cannot load with a ValueError."""


def create_host_target_machine(opt_level: int = 3) -> llvm.TargetMachine:
    """A fresh target machine for this process's target (host.py) with the JIT code model.

    Fresh because MCJIT takes ownership of the target machine it is given.
    """
    return create_target_machine(opt_level=opt_level)


class NativeLibrary:
    """Object files linked into this process, alive as long as this object is.

    `objects` is one object file (bytes) or a sequence of them, linked together; they are
    kept (`objects`), so that a program can be saved with its code (deployed.py): as many
    bytes again as the code mapped.
    """

    def __init__(self, objects):
        if isinstance(objects, (bytes, bytearray, memoryview)):
            objects = [objects]
        objects = [bytes(obj) for obj in objects]
        if not objects:
            raise ValueError("NativeLibrary needs at least one object file")
        self.objects = tuple(objects)
        self._addresses: dict[str, int] = {}
        # graphc's own linker where it applies (x86-64 ELF: no engine resident per library),
        # MCJIT for everything else.
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
        import llvmlite.binding as llvm
        target_machine = create_host_target_machine()
        # MCJIT is created around a module; an empty one serves, the code comes from the object.
        anchor = llvm.parse_assembly("")
        anchor.triple = target_machine.triple
        anchor.data_layout = str(target_machine.target_data)
        engine = llvm.create_mcjit_compiler(anchor, target_machine)
        # Only after an engine exists does LLVM search the process's own symbols.
        objects = _checked_for_mcjit(objects)
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


# ELF64 symbol bindings and types, beyond the layouts shared with elf_link.
_STB_GLOBAL, _STB_WEAK = 1, 2
_STT_FUNC = 2
# LLVM emits ELF for every host but macOS (Mach-O) and Windows (COFF).
_HOST_USES_ELF64_LITTLE_ENDIAN = (
    not sys.platform.startswith(("darwin", "win32", "cygwin", "msys")) and sys.byteorder == "little"
    and struct.calcsize("P") == 8
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
    """Names an ELF64 little-endian object expects from elsewhere; ValueError for anything
    that is not a well-formed one."""
    return [symbol.name for symbol in elf_symbols(object_bytes) if not symbol.defined]


def defined_symbols(object_bytes: bytes) -> list[str]:
    """Names an ELF64 little-endian object defines for others (global and weak symbols)."""
    return [symbol.name for symbol in elf_symbols(object_bytes) if symbol.exported]


def elf_symbols(object_bytes: bytes) -> list[ElfSymbol]:
    """The named symbols of an ELF64 little-endian object."""
    return [ElfSymbol(s.name, s.section, s.value, s.size, s.binding, s.kind)
            for s in ElfObject(object_bytes).symbols if s.name]


# ---------------------------------------------------------------- what MCJIT is given

class _McjitRelocation(NamedTuple):
    """What MCJIT's RuntimeDyldELF does with a relocation type, as far as checking it goes."""

    width: int              # bytes it writes at the offset
    reach: int | None       # bits the PC-relative result must fit in (LLVM asserts it); None: any
    external: bool          # may name a symbol of another object or library (a stub or GOT entry)
    implicit_addend: bool   # MCJIT adds the 32 bits at the offset to the addend (x86-64 PC32, PLT32)


_ANY, _LOCAL = None, False
# The types MCJIT implements that LLVM emits for this code, by machine; it aborts the process on
# any other (`LLVM ERROR: Relocation type not implemented yet!`) and on a 32-bit value that
# does not fit. Absolute 32-bit types are left out: JIT memory may lie above 4 GiB.
_MCJIT_RELOCATIONS = {
    EM_X86_64: {
        0: _McjitRelocation(0, _ANY, True, False),          # R_X86_64_NONE
        1: _McjitRelocation(8, _ANY, True, False),          # R_X86_64_64
        2: _McjitRelocation(4, 32, _LOCAL, True),           # R_X86_64_PC32
        4: _McjitRelocation(4, 32, True, True),             # R_X86_64_PLT32: a stub for externals
        9: _McjitRelocation(4, 32, True, False),            # R_X86_64_GOTPCREL
        24: _McjitRelocation(8, _ANY, True, False),         # R_X86_64_PC64
        41: _McjitRelocation(4, 32, True, False),           # R_X86_64_GOTPCRELX
        42: _McjitRelocation(4, 32, True, False),           # R_X86_64_REX_GOTPCRELX
    },
    EM_AARCH64: {
        0: _McjitRelocation(0, _ANY, True, False),          # R_AARCH64_NONE
        256: _McjitRelocation(0, _ANY, True, False),        # R_AARCH64_NONE (the old number)
        257: _McjitRelocation(8, _ANY, True, False),        # ABS64
        260: _McjitRelocation(8, _ANY, True, False),        # PREL64
        261: _McjitRelocation(4, 32, _LOCAL, False),        # PREL32
        264: _McjitRelocation(4, _ANY, True, False),        # MOVW_UABS_G0_NC
        266: _McjitRelocation(4, _ANY, True, False),        # MOVW_UABS_G1_NC
        268: _McjitRelocation(4, _ANY, True, False),        # MOVW_UABS_G2_NC
        269: _McjitRelocation(4, _ANY, True, False),        # MOVW_UABS_G3
        275: _McjitRelocation(4, 33, _LOCAL, False),        # ADR_PREL_PG_HI21
        277: _McjitRelocation(4, _ANY, True, False),        # ADD_ABS_LO12_NC
        278: _McjitRelocation(4, _ANY, True, False),        # LDST8_ABS_LO12_NC
        282: _McjitRelocation(4, _ANY, True, False),        # JUMP26: a stub when out of reach
        283: _McjitRelocation(4, _ANY, True, False),        # CALL26: a stub when out of reach
        284: _McjitRelocation(4, _ANY, True, False),        # LDST16_ABS_LO12_NC
        285: _McjitRelocation(4, _ANY, True, False),        # LDST32_ABS_LO12_NC
        286: _McjitRelocation(4, _ANY, True, False),        # LDST64_ABS_LO12_NC
        299: _McjitRelocation(4, _ANY, True, False),        # LDST128_ABS_LO12_NC
        311: _McjitRelocation(4, 33, True, False),          # ADR_GOT_PAGE
        312: _McjitRelocation(4, _ANY, True, False),        # LD64_GOT_LO12_NC
        314: _McjitRelocation(4, 32, _LOCAL, False),        # PLT32
    },
}
_HOST_MACHINE = {"x86_64": EM_X86_64, "amd64": EM_X86_64, "aarch64": EM_AARCH64,
                 "arm64": EM_AARCH64}.get(platform.machine().lower())


def _checked_for_mcjit(objects: list[bytes]) -> list[bytes]:
    """`objects` as MCJIT is to be given them, once checked: it trusts its input, and malformed
    bytes or a relocation it does not implement abort the interpreter, while an unresolved
    external is linked to address 0, so the first call crashes. Where objects are ELF64
    little-endian (Linux on x86-64 and aarch64), each is read in full and checked; raises
    ValueError (MissingSymbolError for a missing external) for what MCJIT cannot load."""
    if not _HOST_USES_ELF64_LITTLE_ENDIAN:
        return objects
    parsed = [ElfObject(blob) for blob in objects]
    for obj in parsed:
        _check_machine_and_relocations(obj)
    _check_symbols_resolve(parsed)
    return [_without_unwind_registration(obj) for obj in parsed]


def _check_machine_and_relocations(obj: ElfObject) -> None:
    if _HOST_MACHINE is None:  # a machine without a table here: MCJIT's own checks only
        return
    if obj.machine != _HOST_MACHINE:
        raise _not_loadable(f"code for ELF machine {obj.machine}, not this one ({_HOST_MACHINE})")
    rules = _MCJIT_RELOCATIONS[_HOST_MACHINE]
    by_name = _symbols_by_name(obj)
    for index, relocations in obj.relocations.items():
        patched = obj.sections[obj.sections[index].info]
        for relocation in relocations:
            rule = rules.get(relocation.kind)
            if rule is None:
                raise _not_loadable(f"relocation type {relocation.kind}, which MCJIT does not implement")
            if relocation.offset + rule.width > patched.size:
                raise _not_loadable("a relocation lies past its section")
            if relocation.symbol and obj.symbols[relocation.symbol].kind == STT_FILE:
                raise _not_loadable("a relocation names a file symbol")
            if rule.reach is not None:
                _check_in_reach(obj, relocation, rule, patched, by_name)


def _symbols_by_name(obj: ElfObject) -> dict:
    """The symbol MCJIT resolves each name to: it looks a relocation's symbol up by name among
    the object's defined ones, local or not, the last of a name winning (section and file
    symbols are not among them)."""
    return {symbol.name: symbol for symbol in obj.symbols
            if symbol.name and symbol.section != SHN_UNDEF and symbol.kind not in (STT_SECTION, STT_FILE)}


def _check_in_reach(obj: ElfObject, relocation, rule: _McjitRelocation, patched, by_name: dict) -> None:
    """A PC-relative value must fit in `rule.reach` bits, or LLVM aborts. It does if it points
    into the object (whose sections MCJIT keeps together) with a bounded addend; an external
    is reached through a stub or a GOT entry of the object, where the rule allows one."""
    symbol = obj.symbols[relocation.symbol]
    if symbol.kind != STT_SECTION:
        if not symbol.name:   # MCJIT takes an unnamed symbol for the absolute address 0
            raise _not_loadable("a PC-relative relocation to an absolute address")
        symbol = by_name.get(symbol.name, symbol)
    if symbol.section == SHN_UNDEF:
        if not rule.external:
            raise _not_loadable(f"a PC-relative relocation to {symbol.name!r}, defined elsewhere")
    elif symbol.section == SHN_ABS or symbol.binding == _STB_WEAK:
        raise _not_loadable("a PC-relative relocation to an absolute or weak symbol")
    elif not obj.sections[symbol.section].flags & SHF_ALLOC:
        raise _not_loadable("a PC-relative relocation to a section that is not loaded")
    addend = abs(relocation.addend)
    if rule.implicit_addend:   # MCJIT reads the placeholder as unsigned
        at = patched.offset + relocation.offset
        addend += int.from_bytes(obj.blob[at:at + 4], "little")
    if addend + obj.loaded_bytes() >= 1 << (rule.reach - 2):   # a margin for stubs and GOT entries
        raise _not_loadable("a PC-relative relocation out of reach")


def _check_symbols_resolve(parsed: list[ElfObject]) -> None:
    import llvmlite.binding as llvm
    needed, defined = set(), set()
    for obj in parsed:
        exported = {s.name for s in obj.symbols if s.binding in (_STB_GLOBAL, _STB_WEAK) and s.section != SHN_UNDEF}
        if exported & defined:
            # Linked together, one definition would silently win.
            raise _not_loadable(f"symbols defined twice: {', '.join(sorted(exported & defined))}")
        defined |= exported
        needed.update(s.name for s in obj.symbols[1:] if s.section == SHN_UNDEF)
    missing = sorted(name for name in needed - defined if llvm.address_of_symbol(name) is None)
    if missing:
        raise MissingSymbolError(
            "the compiled object needs symbols this process does not provide: " + ", ".join(missing)
        )


def _without_unwind_registration(obj: ElfObject) -> bytes:
    """The object with its .eh_frame section unnamed: MCJIT registers a section of that name
    with the C++ unwinder, whose parser trusts its contents (and aborts on what it does not
    understand, at the next unwind anywhere in the process). Nothing unwinds through generated
    code: graphc's own linker leaves these tables out too."""
    blob = bytearray(obj.blob)
    for index, section in enumerate(obj.sections):
        if section.name == ".eh_frame":
            name_field = obj.section_table + index * elf_link.ELF64_SECTION.size
            blob[name_field:name_field + 4] = bytes(4)   # offset 0: the empty name
    return bytes(blob)


def _not_loadable(problem: str) -> ValueError:
    return ValueError(f"not a loadable object file: {problem}")
