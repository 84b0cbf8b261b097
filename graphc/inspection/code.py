"""A program's LLVM IR and assembly cut into functions, so each kernel can show its own."""
from __future__ import annotations

import re

_DEFINE = re.compile(r'^define [^@]*@"?([^"(\s]+)"?\(')
_CALL = re.compile(r'call [^@]*@"?([^"(\s]+)"?\(')


def ir_functions(module_texts: list[str]) -> dict[str, str]:
    """Function name -> its definition in LLVM IR. A helper that several modules define (each
    module carries its own copy) appears once."""
    functions: dict[str, str] = {}
    for text in module_texts:
        name, body = None, []
        for line in text.splitlines():
            if name is None:
                match = _DEFINE.match(line)
                if match:
                    name, body = match.group(1), [line]
                continue
            body.append(line)
            if line == "}":
                functions.setdefault(name, "\n".join(body))
                name = None
    return functions


def callees(ir_text: str) -> list[str]:
    """The functions a definition calls, in first-call order (LLVM intrinsics left out)."""
    seen: dict[str, None] = {}
    for match in _CALL.finditer(ir_text):
        if not match.group(1).startswith("llvm."):
            seen.setdefault(match.group(1), None)
    return list(seen)


def assembly_functions(assembly_texts: list[str], names) -> dict[str, str]:
    """Function name -> its machine code, from each name's label to the end of the function."""
    wanted = set(names)
    functions: dict[str, str] = {}
    for text in assembly_texts:
        name, body = None, []
        for line in text.splitlines():
            if name is None:
                label = line[:-1].strip('"') if line.endswith(":") and not line.startswith((".", "\t")) else None
                if label in wanted and label not in functions:
                    name, body = label, [line]
                continue
            body.append(line)
            if line.startswith(".Lfunc_end"):
                functions[name] = "\n".join(body)
                name = None
    return functions


def kernel_functions(index: int, functions) -> list[str]:
    """The functions that are kernel `index`'s own phases (named k<index>.<label>...)."""
    prefix = f"k{index}."
    return [name for name in functions if name.startswith(prefix)]
