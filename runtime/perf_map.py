"""Names for generated code in `perf` profiles: a perf map of every loaded function.

Linux `perf` attributes samples in JIT code to a function when the process has written
/tmp/perf-<pid>.map, one line per function: its start address and size in hex, then its name.
With GRAPHC_PERF_MAP=1, every `NativeLibrary` appends its functions there, the internal ones
too (micro-kernels, packers, conv tiles), so that

    GRAPHC_PERF_MAP=1 perf record python train.py && perf report --sort symbol

splits a training step's time by generated function, below `CompiledFunction.profile`'s
per-kernel times.

MCJIT reports addresses of global symbols only. An object's symbol table gives every
function's offset in its section, and the section's load address follows from any global
symbol of the same section: address = global's address - global's offset + offset.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

__all__ = ["PERF_MAP_VARIABLE", "perf_map_wanted", "perf_map_lines", "append_perf_map"]

PERF_MAP_VARIABLE = "GRAPHC_PERF_MAP"


def perf_map_wanted() -> bool:
    return os.environ.get(PERF_MAP_VARIABLE, "").strip() not in ("", "0")


def perf_map_lines(symbol_tables: Iterable[list], address_of: Callable[[str], int]) -> list[str]:
    """The perf map lines of the functions of ELF objects linked into this process, given each
    object's symbols (`loader.elf_symbols`); `address_of(name)` is the loaded address of an
    exported symbol."""
    lines = []
    for symbols in symbol_tables:
        functions = [symbol for symbol in symbols if symbol.is_function and symbol.defined]
        section_bases = {}
        for symbol in functions:
            if symbol.exported and symbol.section not in section_bases:
                section_bases[symbol.section] = address_of(symbol.name) - symbol.value
        for symbol in functions:
            if symbol.size and symbol.section in section_bases:
                lines.append(f"{section_bases[symbol.section] + symbol.value:x} {symbol.size:x} {symbol.name}")
    return lines


def append_perf_map(lines: list[str]) -> str:
    """Append `lines` to this process's perf map; returns its path."""
    path = f"/tmp/perf-{os.getpid()}.map"
    with open(path, "a") as perf_map:
        perf_map.writelines(line + "\n" for line in lines)
    return path
