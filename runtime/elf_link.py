"""Linking graphc's x86-64 ELF objects into memory without an MCJIT engine.

Why: an MCJIT engine costs resident memory per library (the engine, the TargetMachine it owns,
its memory manager): a large share of all the data of a small training step, and of a
program's fixed cost (bench/NOTES.md, "Loading and memory").
And there is little to link: the objects are compiled with the JIT code model
(`loader.create_host_target_machine`), which on x86-64 is the large one, so every reference to
code, to constants or to a library function is an absolute 64-bit address, an R_X86_64_64
relocation. Linking is then: lay the allocated sections out in one mapping for code and one for
data, give each symbol its address, write S + A at every relocation, and make the code
read-and-execute only.

Every object is first read in full by `ElfObject`, which checks each table against the bytes
(the loader does the same before MCJIT, which trusts what it is given). `link` raises ValueError
for a malformed object and MissingSymbolError for an external that neither another object nor
the process provides: either would crash the process once called, so nothing is mapped
executable before the whole link has succeeded. It returns None for a well-formed object it
does not link (another machine or relocation type, an over-aligned section, a failed mmap or
mprotect), and the caller links with MCJIT.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import weakref
from typing import NamedTuple

__all__ = ["ElfObject", "LinkedImage", "link"]

# ELF64 little-endian (System V ABI) layouts and the constants used here and by the loader.
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_SECTION = struct.Struct("<IIQQQQIIQQ")
ELF64_SYMBOL = struct.Struct("<IBBHQQ")
ELF64_RELA = struct.Struct("<QQq")
ELF64_MAGIC = b"\x7fELF\x02\x01"
_EV_CURRENT, _ET_REL, EM_X86_64, EM_AARCH64 = 1, 1, 62, 183
SHT_NULL, SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOTE, SHT_NOBITS = 0, 1, 2, 3, 4, 7, 8
SHT_INIT_ARRAY, SHT_FINI_ARRAY = 14, 15
SHT_X86_64_UNWIND, SHT_LLVM_ADDRSIG = 0x70000001, 0x6FFF4C03
SHF_ALLOC, SHF_EXECINSTR, SHF_TLS, SHF_COMPRESSED = 0x2, 0x4, 0x400, 0x800
SHN_UNDEF, SHN_ABS = 0, 0xFFF1
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE = 0, 1, 2, 3, 4
_R_X86_64_NONE, _R_X86_64_64 = 0, 1
# The kinds of section an object may hold: those LLVM emits for graphc's code. Others (TLS,
# groups, REL relocations, extended section indexes, ...) are refused, not guessed at.
_SECTION_KINDS = {SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOTE, SHT_NOBITS, SHT_INIT_ARRAY,
                  SHT_FINI_ARRAY, SHT_X86_64_UNWIND, SHT_LLVM_ADDRSIG}
_SHT_LOOS = 0x60000000   # from here on, section types are OS- or processor-specific
# Sections relocations may patch: loaded ones with contents.
_RELOCATABLE_KINDS = {SHT_PROGBITS, SHT_INIT_ARRAY, SHT_FINI_ARRAY, SHT_X86_64_UNWIND}
# Far beyond any object graphc emits; bound a malformed size or alignment before it is used.
_MAX_SECTION_BYTES = 1 << 32
_MAX_ALIGNMENT = 1 << 16

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


class Section(NamedTuple):
    name: str
    kind: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    align: int        # 1 for none
    entry_size: int


class Symbol(NamedTuple):
    name: str
    binding: int      # STB_LOCAL, STB_GLOBAL or STB_WEAK
    kind: int         # STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION or STT_FILE
    section: int      # index of the section it lies in; SHN_UNDEF: defined elsewhere; or SHN_ABS
    value: int        # offset in that section
    size: int


class Relocation(NamedTuple):
    offset: int       # in the section patched
    kind: int         # the machine's relocation type
    symbol: int       # index in the symbol table; 0: none (S = 0)
    addend: int


class ElfObject:
    """An ELF64 little-endian relocatable object, every table in it checked against its bytes.

    Raises ValueError ("not a loadable object file: ...") for anything out of bounds or
    inconsistent, and for kinds of section or symbol that LLVM does not emit for graphc's code.
    Any machine: what a linker can relocate is for the linker to check.
    """

    def __init__(self, blob: bytes):
        self.blob = blob
        try:
            self.machine, self.section_table, section_count, names_index = _read_header(blob)
            self.sections = _read_sections(blob, self.section_table, section_count, names_index)
            self.symbol_table = _symbol_table_index(self.sections)
            self.symbols = _read_symbols(blob, self.sections, self.symbol_table)
            # index of each SHT_RELA section -> its entries
            self.relocations = {index: _read_relocations(self, index)
                                for index, section in enumerate(self.sections) if section.kind == SHT_RELA}
        except (struct.error, IndexError, OverflowError) as error:  # a bound the checks missed
            raise _malformed(str(error)) from None

    def loaded_bytes(self) -> int:
        """The bytes of its allocated sections: a bound on distances within the loaded object."""
        return sum(section.size + section.align for section in self.sections if section.flags & SHF_ALLOC)


def _read_header(blob: bytes) -> tuple[int, int, int, int]:
    """(machine, section table offset, section count, section names index)"""
    if len(blob) < ELF64_HEADER.size or not blob.startswith(ELF64_MAGIC) or blob[6] != _EV_CURRENT:
        raise _malformed("not an ELF64 little-endian object")
    (_, file_type, machine, version, _, _, section_offset, _, header_size, _, program_headers, entry_size,
     section_count, names_index) = ELF64_HEADER.unpack_from(blob)
    if file_type != _ET_REL:
        raise _malformed(f"ELF type {file_type}, not a relocatable object")
    if version != _EV_CURRENT or header_size != ELF64_HEADER.size or program_headers:
        raise _malformed("an ELF header of another version or with program headers")
    if entry_size != ELF64_SECTION.size or section_count == 0 or section_offset % 8:
        raise _malformed("a section table of entries that are not ELF64 section headers")
    if section_offset + section_count * ELF64_SECTION.size > len(blob):
        raise _malformed("the section table lies past the end of the object")
    if not 0 < names_index < section_count:
        raise _malformed(f"section names in section {names_index} of {section_count}")
    return machine, section_offset, section_count, names_index


def _read_sections(blob: bytes, table_offset: int, count: int, names_index: int) -> list[Section]:
    headers = [ELF64_SECTION.unpack_from(blob, table_offset + index * ELF64_SECTION.size) for index in range(count)]
    if any(headers[0]):
        raise _malformed("section 0 is not the null section")
    names = _string_table(blob, headers[names_index], names_index)
    sections = [Section("", SHT_NULL, 0, 0, 0, 0, 0, 1, 0)]
    for index, (name, kind, flags, _, offset, size, link, info, align, entry_size) in enumerate(headers[1:], 1):
        if kind not in _SECTION_KINDS and (kind < _SHT_LOOS or flags & SHF_ALLOC):
            # An unknown OS- or processor-specific section that is not loaded (an LLVM or
            # AArch64 attribute section a later LLVM adds) is ignored by both linkers.
            raise _malformed(f"section {index} is of type {kind:#x}")
        if flags & (SHF_TLS | SHF_COMPRESSED):
            raise _malformed(f"section {index} is thread-local or compressed")
        if size > _MAX_SECTION_BYTES or (kind != SHT_NOBITS and offset + size > len(blob)):
            raise _malformed(f"section {index} lies past the end of the object")
        if align & (align - 1) or align > _MAX_ALIGNMENT:
            raise _malformed(f"section {index} has alignment {align}")
        sections.append(Section(_string(names, name, "a section name"), kind, flags, offset, size, link, info,
                                max(align, 1), entry_size))
    return sections


def _string_table(blob: bytes, header: tuple, index: int) -> bytes:
    kind, offset, size = header[1], header[4], header[5]
    if kind != SHT_STRTAB or size == 0 or offset + size > len(blob) or blob[offset + size - 1] != 0:
        raise _malformed(f"section {index} is not a string table")
    return blob[offset:offset + size]


def _string(table: bytes, offset: int, what: str) -> str:
    if offset >= len(table):
        raise _malformed(f"{what} lies past its string table")
    try:  # the table ends with a NUL
        return table[offset:table.index(b"\0", offset)].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not UTF-8") from None


def _symbol_table_index(sections: list[Section]) -> int:
    tables = [index for index, section in enumerate(sections) if section.kind == SHT_SYMTAB]
    if len(tables) != 1:
        raise _malformed(f"{len(tables)} symbol tables")
    table = sections[tables[0]]
    if table.entry_size != ELF64_SYMBOL.size or table.size % ELF64_SYMBOL.size or table.offset % 8 or not table.size:
        raise _malformed("a symbol table of entries that are not ELF64 symbols")
    if not 0 < table.link < len(sections):
        raise _malformed(f"symbol names in section {table.link}, which does not exist")
    return tables[0]


def _read_symbols(blob: bytes, sections: list[Section], table_index: int) -> list[Symbol]:
    """Every entry of the symbol table, the null one included."""
    table = sections[table_index]
    strings = sections[table.link]
    names = _string_table(blob, (strings.name, strings.kind, 0, 0, strings.offset, strings.size), table.link)
    entries = ELF64_SYMBOL.iter_unpack(blob[table.offset:table.offset + table.size])
    if any(next(entries)):
        raise _malformed("symbol 0 is not the null symbol")
    symbols = [Symbol("", STB_LOCAL, STT_NOTYPE, SHN_UNDEF, 0, 0)]
    defined_globals = set()
    for name_offset, info, _, section, value, size in entries:
        symbol = Symbol(_string(names, name_offset, "a symbol name"), info >> 4, info & 0xF, section, value, size)
        _check_symbol(symbol, len(symbols), sections)
        if symbol.binding != STB_LOCAL and symbol.section != SHN_UNDEF:
            if symbol.name in defined_globals:
                raise _malformed(f"symbols defined twice: {symbol.name}")
            defined_globals.add(symbol.name)
        symbols.append(symbol)
    return symbols


def _check_symbol(symbol: Symbol, index: int, sections: list[Section]) -> None:
    if symbol.binding not in (STB_LOCAL, STB_GLOBAL, STB_WEAK):
        raise _malformed(f"symbol {index} has binding {symbol.binding}")
    if symbol.kind not in (STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_SECTION, STT_FILE):
        raise _malformed(f"symbol {index} is of type {symbol.kind} (thread-local, common or indirect)")
    if symbol.section == SHN_UNDEF:
        if symbol.binding == STB_LOCAL or not symbol.name or symbol.kind in (STT_SECTION, STT_FILE):
            raise _malformed(f"symbol {index} is undefined but not a named global")
    elif symbol.section == SHN_ABS:
        if symbol.kind == STT_SECTION:
            raise _malformed(f"section symbol {index} names no section")
    elif symbol.section >= len(sections) or symbol.kind == STT_FILE:
        raise _malformed(f"symbol {index} lies in section {symbol.section:#x}, which does not exist")
    elif symbol.value > sections[symbol.section].size:
        raise _malformed(f"symbol {index} lies past the end of its section")


def _read_relocations(obj: ElfObject, index: int) -> list[Relocation]:
    section = obj.sections[index]
    if section.entry_size != ELF64_RELA.size or section.size % ELF64_RELA.size or section.offset % 8:
        raise _malformed(f"section {index} holds entries that are not ELF64 relocations")
    if section.link != obj.symbol_table:
        raise _malformed(f"the relocations of section {index} refer to another symbol table")
    if not 0 < section.info < len(obj.sections):
        raise _malformed(f"the relocations of section {index} patch section {section.info}, which does not exist")
    target = obj.sections[section.info]
    if not target.flags & SHF_ALLOC or target.kind not in _RELOCATABLE_KINDS:
        raise _malformed(f"the relocations of section {index} patch a section that is not loaded")
    relocations = []
    for offset, info, addend in ELF64_RELA.iter_unpack(obj.blob[section.offset:section.offset + section.size]):
        relocation = Relocation(offset, info & 0xFFFFFFFF, info >> 32, addend)
        if relocation.symbol >= len(obj.symbols):
            raise _malformed(f"a relocation names symbol {relocation.symbol} of {len(obj.symbols)}")
        if relocation.offset >= target.size:
            raise _malformed("a relocation lies past its section")
        relocations.append(relocation)
    return relocations


class _Object:
    """One relocatable object as this linker links it: where each section goes."""

    def __init__(self, parsed: ElfObject):
        if parsed.machine != EM_X86_64:
            raise _Unsupported(f"machine {parsed.machine}")
        if any(section.flags & SHF_ALLOC and section.align > mmap.PAGESIZE for section in parsed.sections):
            raise _Unsupported("an over-aligned section")
        self.parsed = parsed
        self.blob, self.sections, self.symbols = parsed.blob, parsed.sections, parsed.symbols
        self.addresses: dict[int, int] = {}   # section index -> address, for allocated sections

    def allocated(self, executable: bool) -> list[int]:
        # Unwind tables are left out: nothing unwinds through generated code (graphc's kernels
        # are nounwind and emit none; MCJIT would register them with the C++ unwinder).
        return [index for index, s in enumerate(self.sections)
                if s.flags & SHF_ALLOC and s.kind != SHT_X86_64_UNWIND
                and bool(s.flags & SHF_EXECINSTR) == executable]

    def symbol_address(self, index: int, externals: dict[str, int]) -> int:
        if index == 0:  # the null symbol: S = 0
            return 0
        symbol = self.symbols[index]
        if symbol.section == SHN_UNDEF:
            return externals[symbol.name]
        if symbol.section == SHN_ABS:
            return symbol.value
        if symbol.section not in self.addresses:
            raise _Unsupported(f"symbol {symbol.name!r} in section {symbol.section}, which is not loaded")
        return self.addresses[symbol.section] + (0 if symbol.kind == STT_SECTION else symbol.value)


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
    parsed = [ElfObject(blob) for blob in objects]   # ValueError for a malformed one
    try:
        linkable = [_Object(obj) for obj in parsed]
    except _Unsupported:
        return None
    regions = []
    try:
        exported = _link_into(linkable, regions)
    except _Unsupported:
        _unmap(regions)
        return None
    except (struct.error, IndexError, OverflowError) as error:  # a bound the checks missed
        _unmap(regions)
        raise _malformed(str(error)) from None
    except BaseException:
        _unmap(regions)
        raise
    return LinkedImage(regions, exported)


def _link_into(linkable: list[_Object], regions: list) -> dict[str, int]:
    """Map, copy and relocate every section and make the code executable; the exported
    symbols' addresses. `regions` collects the mappings made, for the caller to unmap should
    this fail."""
    code = _lay_out(linkable, executable=True, regions=regions)
    # Data stays read-write: .lbss holds the program's zero-initialized globals.
    _lay_out(linkable, executable=False, regions=regions)
    exported = _exported_symbols(linkable)
    externals = _externals(linkable, exported)
    for obj in linkable:
        _copy_sections(obj)
        _relocate(obj, externals)
    if code and _mprotect(code[0], code[1], mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise _Unsupported("mprotect refused read+execute")
    return exported


def _lay_out(linkable: list[_Object], executable: bool, regions: list) -> tuple[int, int] | None:
    """Map one region for every object's code (or data) sections and give each its address."""
    placements, size = [], 0
    for obj in linkable:
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
        if section.kind == SHT_PROGBITS:
            ctypes.memmove(address, obj.blob[section.offset:section.offset + section.size], section.size)
        elif section.kind != SHT_NOBITS:  # NOBITS: the fresh mapping is already zero
            raise _Unsupported(f"allocated section of type {section.kind}")


def _exported_symbols(linkable: list[_Object]) -> dict[str, int]:
    exported: dict[str, int] = {}
    for obj in linkable:
        for index, symbol in enumerate(obj.symbols):
            if symbol.binding != STB_LOCAL and symbol.section != SHN_UNDEF:
                if symbol.name in exported:
                    raise _malformed(f"symbols defined twice: {symbol.name}")
                exported[symbol.name] = obj.symbol_address(index, {})
    return exported


def _externals(linkable: list[_Object], exported: dict[str, int]) -> dict[str, int]:
    """The address of every undefined symbol: another object's export, else the process's."""
    from .loader import MissingSymbolError
    externals, missing = {}, set()
    for obj in linkable:
        for symbol in obj.symbols[1:]:
            if symbol.section == SHN_UNDEF and symbol.name not in externals:
                address = exported.get(symbol.name) or _process_symbol(symbol.name)
                if address:
                    externals[symbol.name] = address
                else:
                    missing.add(symbol.name)
    if missing:
        raise MissingSymbolError(
            "the compiled object needs symbols this process does not provide: " + ", ".join(sorted(missing)))
    return externals


def _relocate(obj: _Object, externals: dict[str, int]) -> None:
    for index, relocations in obj.parsed.relocations.items():
        patched = obj.sections[index].info
        if patched not in obj.addresses:
            continue  # relocations of sections not loaded (unwind tables)
        target, target_size = obj.addresses[patched], obj.sections[patched].size
        for relocation in relocations:
            if relocation.kind == _R_X86_64_NONE:
                continue
            if relocation.kind != _R_X86_64_64:
                raise _Unsupported(f"relocation type {relocation.kind}")
            if relocation.offset + 8 > target_size:
                raise _malformed("a relocation lies past its section")
            value = (obj.symbol_address(relocation.symbol, externals) + relocation.addend) & 0xFFFFFFFFFFFFFFFF
            ctypes.c_uint64.from_address(target + relocation.offset).value = value
