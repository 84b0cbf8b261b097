"""Linking graphc's x86-64 ELF objects into memory without an MCJIT engine.

Why: an MCJIT engine costs ~80 KiB of resident memory per library (the engine, the
TargetMachine it owns, its memory manager): a third of all the data of a small training step
(softmax regression at batch 64 holds 234 KiB), and a program's fixed cost halved without it. And there is little to link: the objects are
compiled with the JIT code model (`loader.create_host_target_machine`), which on x86-64 is the
large one, so every reference to code, to constants or to a library function is an absolute
64-bit address, an R_X86_64_64 relocation. Linking is then: lay the allocated sections out in
one mapping for code and one for data, give each symbol its address, write S + A at every
relocation, and make the code read-and-execute only.

`link` returns None for anything else (another machine or relocation type, common symbols, a
section kind it does not know, a failed mmap or mprotect), and the caller links with MCJIT as
before. It raises MissingSymbolError for an external that neither another object nor the
process provides, and ValueError for a malformed object: either would crash the process once
called, so nothing is mapped executable before the whole link has succeeded.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import weakref
from typing import NamedTuple

__all__ = ["LinkedImage", "link"]

# ELF64 little-endian (System V ABI) layouts and the constants used here; the loader lists
# symbols with the same layouts.
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")
ELF64_SYMBOL = struct.Struct("<IBBHQQ")
_RELA = struct.Struct("<QQq")
ELF64_MAGIC = b"\x7fELF\x02\x01"
_ET_REL, _EM_X86_64 = 1, 62
_SHT_PROGBITS, SHT_SYMTAB, _SHT_RELA, _SHT_NOBITS, _SHT_REL = 1, 2, 4, 8, 9
_SHT_X86_64_UNWIND = 0x70000001
_SHF_ALLOC, _SHF_EXECINSTR, _SHF_TLS = 0x2, 0x4, 0x400
SHN_UNDEF, _SHN_ABS, _SHN_LORESERVE = 0, 0xFFF1, 0xFF00
_STB_LOCAL = 0
_STT_SECTION, _STT_GNU_IFUNC = 3, 10
_R_X86_64_NONE, _R_X86_64_64 = 0, 1
# Far beyond any object graphc emits; bounds a malformed size before it reaches mmap.
_MAX_SECTION_BYTES = 1 << 32

try:  # the process's own symbols (libc, libm, ...) and the POSIX memory calls
    _process = ctypes.CDLL(None)
    _mmap, _munmap, _mprotect = _process.mmap, _process.munmap, _process.mprotect
    _MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
except (OSError, TypeError, AttributeError):  # not POSIX (Windows): MCJIT links everything
    _process = None
else:
    _mmap.restype = ctypes.c_void_p
    _mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _malformed(problem: str) -> ValueError:
    return ValueError(f"not a loadable object file: {problem}")


class _Unsupported(Exception):
    """The objects need something this linker does not do: link them with MCJIT."""


class _Section(NamedTuple):
    name_offset: int
    kind: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int
    entry_size: int


class _Object:
    """One relocatable object: its sections, its symbol table and where each section goes."""

    def __init__(self, blob: bytes):
        if not blob.startswith(ELF64_MAGIC):
            raise _malformed("not an ELF64 little-endian object")
        header = ELF64_HEADER.unpack_from(blob)
        file_type, machine = header[1], header[2]
        if file_type != _ET_REL or machine != _EM_X86_64:
            raise _Unsupported(f"ELF type {file_type}, machine {machine}")
        section_offset, section_entry_size, section_count = header[6], header[11], header[12]
        self.blob = blob
        self.sections = []
        for index in range(section_count):
            name, kind, flags, _, offset, size, link, info, align, entry_size = ELF64_SECTION.unpack_from(
                blob, section_offset + index * section_entry_size)
            if size > _MAX_SECTION_BYTES or (kind != _SHT_NOBITS and offset + size > len(blob)):
                raise _malformed(f"section {index} lies past the end of the object")
            align = max(align, 1)
            if align & (align - 1):
                raise _malformed(f"section {index} has alignment {align}, not a power of two")
            self.sections.append(_Section(name, kind, flags, offset, size, link, info, align, entry_size))
        for section in self.sections:
            if section.flags & _SHF_ALLOC and (section.flags & _SHF_TLS or section.align > mmap.PAGESIZE):
                raise _Unsupported("thread-local or over-aligned section")
            if section.kind == _SHT_REL:  # relocations without addends: never emitted for x86-64
                raise _Unsupported("SHT_REL relocations")
        self.addresses: dict[int, int] = {}   # section index -> address, for allocated sections
        symbol_tables = [s for s in self.sections if s.kind == SHT_SYMTAB]
        if len(symbol_tables) != 1:
            raise _malformed(f"{len(symbol_tables)} symbol tables")
        self.symbols = self._read_symbols(symbol_tables[0])
        if any(kind == _STT_GNU_IFUNC for _, _, kind, _, _ in self.symbols):
            raise _Unsupported("indirect functions")

    def _read_symbols(self, table: _Section) -> list[tuple[str, int, int, int, int]]:
        """(name, binding, kind, section index, value) of every entry, the null one included."""
        if table.entry_size < ELF64_SYMBOL.size:
            raise _malformed(f"symbol entries of {table.entry_size} bytes")
        strings = self.sections[table.link].offset
        symbols = []
        for position in range(table.offset, table.offset + table.size, table.entry_size):
            name_offset, info, _, section, value, _ = ELF64_SYMBOL.unpack_from(self.blob, position)
            end = self.blob.find(b"\0", strings + name_offset)
            if end < 0:
                raise _malformed("a symbol name runs past the end of the object")
            name = self.blob[strings + name_offset:end].decode()
            symbols.append((name, info >> 4, info & 0xF, section, value))
        return symbols

    def allocated(self, executable: bool) -> list[int]:
        # Unwind tables are left out: nothing unwinds through generated code (graphc's kernels
        # are nounwind and emit none; MCJIT would register them with the C++ unwinder).
        return [index for index, s in enumerate(self.sections)
                if s.flags & _SHF_ALLOC and s.kind != _SHT_X86_64_UNWIND
                and bool(s.flags & _SHF_EXECINSTR) == executable]

    def symbol_address(self, index: int, externals: dict[str, int]) -> int:
        if not 0 <= index < len(self.symbols):
            raise _malformed(f"a relocation names symbol {index} of {len(self.symbols)}")
        if index == 0:  # the null symbol: S = 0
            return 0
        name, _, kind, section, value = self.symbols[index]
        if section == SHN_UNDEF:
            return externals[name]
        if section == _SHN_ABS:
            return value
        if section >= _SHN_LORESERVE or section not in self.addresses:
            raise _Unsupported(f"symbol {name!r} in section {section:#x}")
        return self.addresses[section] + (0 if kind == _STT_SECTION else value)


class LinkedImage:
    """Code and data linked into this process; unmapped when the image is collected."""

    def __init__(self, regions: list[tuple[int, int]], exported: dict[str, int]):
        self.exported = exported
        self._finalizer = weakref.finalize(self, _unmap, regions)
        # Not at interpreter exit: a daemon thread may still be running the code then (the
        # process's end frees the memory anyway).
        self._finalizer.atexit = False

    def address(self, symbol: str) -> int | None:
        """Address of a global or weak symbol the objects define (as MCJIT's lookup, but
        internal functions are not found: nothing asks for them)."""
        return self.exported.get(symbol)


def _unmap(regions: list[tuple[int, int]]) -> None:
    for base, size in regions:
        _munmap(base, size)


def _process_symbol(name: str) -> int | None:
    try:  # item access always asks dlsym (attribute access could find the CDLL's own attributes)
        return ctypes.cast(_process[name], ctypes.c_void_p).value
    except (AttributeError, ValueError):  # ValueError: a name with a NUL byte
        return None


def link(objects: list[bytes]) -> LinkedImage | None:
    """Link `objects` into this process, or None when MCJIT must do it (see the module doc)."""
    if _process is None:
        return None
    try:
        parsed = [_Object(blob) for blob in objects]
    except _Unsupported:
        return None
    except (struct.error, IndexError, UnicodeDecodeError) as error:
        raise _malformed(str(error)) from None
    regions = []
    try:
        code = _lay_out(parsed, executable=True, regions=regions)
        # Data stays read-write: .lbss holds the program's zero-initialized globals.
        _lay_out(parsed, executable=False, regions=regions)
        exported = _exported_symbols(parsed)
        externals = _externals(parsed, exported)
        for obj in parsed:
            _copy_sections(obj)
            _relocate(obj, externals)
        if code and _mprotect(code[0], code[1], mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise _Unsupported("mprotect refused read+execute")
    except _Unsupported:
        _unmap(regions)
        return None
    except (struct.error, IndexError, UnicodeDecodeError) as error:
        _unmap(regions)
        raise _malformed(str(error)) from None
    except BaseException:
        _unmap(regions)
        raise
    return LinkedImage(regions, exported)


def _lay_out(parsed: list[_Object], executable: bool, regions: list) -> tuple[int, int] | None:
    """Map one region for every object's code (or data) sections and give each its address."""
    placements, size = [], 0
    for obj in parsed:
        for index in obj.allocated(executable):
            section = obj.sections[index]
            size = -(-size // section.align) * section.align
            placements.append((obj, index, size))
            size += section.size
    if size == 0:
        return None
    if size > _MAX_SECTION_BYTES:
        raise _malformed(f"{size} bytes of sections")
    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    base = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
    if base in (None, _MAP_FAILED):
        raise _Unsupported("mmap failed")
    regions.append((base, size))
    for obj, index, offset in placements:
        obj.addresses[index] = base + offset
    return base, size


def _copy_sections(obj: _Object) -> None:
    for index, address in obj.addresses.items():
        section = obj.sections[index]
        if section.kind == _SHT_PROGBITS:
            ctypes.memmove(address, obj.blob[section.offset:section.offset + section.size], section.size)
        elif section.kind != _SHT_NOBITS:  # NOBITS: the fresh mapping is already zero
            raise _Unsupported(f"allocated section of type {section.kind}")


def _exported_symbols(parsed: list[_Object]) -> dict[str, int]:
    exported: dict[str, int] = {}
    for obj in parsed:
        for index, (name, binding, _, section, _) in enumerate(obj.symbols):
            if name and binding != _STB_LOCAL and section != SHN_UNDEF:
                if name in exported:
                    raise _malformed(f"symbols defined twice: {name}")
                exported[name] = obj.symbol_address(index, {})
    return exported


def _externals(parsed: list[_Object], exported: dict[str, int]) -> dict[str, int]:
    """The address of every undefined symbol: another object's export, else the process's."""
    from .loader import MissingSymbolError
    externals, missing = {}, set()
    for obj in parsed:
        for name, _, _, section, _ in obj.symbols[1:]:
            if section == SHN_UNDEF and name not in externals:
                address = exported.get(name) or _process_symbol(name)
                if address:
                    externals[name] = address
                else:
                    missing.add(name)
    if missing:
        raise MissingSymbolError(
            "the compiled object needs symbols this process does not provide: " + ", ".join(sorted(missing)))
    return externals


def _relocate(obj: _Object, externals: dict[str, int]) -> None:
    for section in obj.sections:
        if section.kind != _SHT_RELA or section.info not in obj.addresses:
            continue  # relocations of sections not loaded (unwind tables)
        target = obj.addresses[section.info]
        target_size = obj.sections[section.info].size
        if section.entry_size < _RELA.size:
            raise _malformed(f"relocation entries of {section.entry_size} bytes")
        for position in range(section.offset, section.offset + section.size, section.entry_size):
            offset, info, addend = _RELA.unpack_from(obj.blob, position)
            kind = info & 0xFFFFFFFF
            if kind == _R_X86_64_NONE:
                continue
            if kind != _R_X86_64_64:
                raise _Unsupported(f"relocation type {kind}")
            if offset + 8 > target_size:
                raise _malformed("a relocation lies past its section")
            value = (obj.symbol_address(info >> 32, externals) + addend) & 0xFFFFFFFFFFFFFFFF
            ctypes.c_uint64.from_address(target + offset).value = value
