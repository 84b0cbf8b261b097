"""Seeded mutations of object files, for the loader's fuzz test (test_elf_link) and the child
processes it starts."""
from __future__ import annotations

import random
import struct


def mutation(programs: list[list[bytes]], index: int) -> tuple[list[bytes], str]:
    """Mutation `index` of one of `programs` (each a list of objects linked together): one of
    its objects with one to three bytes or fields changed, or cut short, and what was done."""
    rng = random.Random(index)
    program = rng.randrange(len(programs))
    objects = list(programs[program])
    which = rng.randrange(len(objects))
    data = bytearray(objects[which])
    done = [_mutate_once(data, rng) for _ in range(rng.choice((1, 1, 2, 3)))]
    objects[which] = bytes(data)
    return objects, f"program {program}, object {which}: " + ", ".join(done)


def _mutate_once(data: bytearray, rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        del data[rng.randrange(len(data)):]
        return f"cut to {len(data)} bytes"
    position = _fuzz_position(data, rng)
    if kind <= 3:
        data[position] ^= 1 << rng.randrange(8)
        return f"bit flipped at {position}"
    if kind <= 6:
        value = rng.choice((0, 0xFF, rng.randrange(256)))
        data[position] = value
        return f"byte {position} = {value:#x}"
    width = rng.choice((2, 4, 8))
    position -= position % width
    if position + width > len(data):
        return "nothing"
    value = rng.choice((0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), len(data), rng.randrange(2**(8 * width))))
    data[position:position + width] = value.to_bytes(width, "little")
    return f"{width}-byte field at {position} = {value:#x}"


def _fuzz_position(data: bytearray, rng: random.Random) -> int:
    """Half the time anywhere, else in the tables that describe the object (the header, the
    section headers, the symbols and relocations), where a change matters most."""
    if rng.random() < 0.5 or len(data) < 64:
        return rng.randrange(len(data))
    header_at, = struct.unpack_from("<Q", data, 0x28)
    count, = struct.unpack_from("<H", data, 0x3C)
    regions = [(0, 64)]
    if header_at + 64 * count <= len(data):
        regions.append((header_at, header_at + 64 * count))
        for index in range(count):
            kind, _, _, offset, size = struct.unpack_from("<IQQQQ", data, header_at + 64 * index + 4)
            if kind in (2, 3, 4) and 0 < size and offset + size <= len(data):
                regions.append((offset, offset + size))
    start, end = rng.choice(regions)
    return rng.randrange(start, end)
