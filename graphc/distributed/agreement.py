"""At compile time, the ranks check that they compiled the same program from the same params.

Ranks that ran different programs would pair unrelated all-reduces and hang, or average
gradients of different shapes; ranks starting from different params would drift apart. So
every rank all-gathers a hash of its program (the step's cache key without the thread count:
graph, shapes, optimizer, buckets, graphc's source and the CPU target), a digest of its params
and a short description, and on any difference every rank raises the same ValueError, naming
the ranks and what differs between them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

__all__ = ["check_same_program", "params_digest"]


def params_digest(params: Mapping[str, np.ndarray], names) -> dict[str, str]:
    """name -> sha256 of each bound array's shape, dtype and bytes."""
    digests = {}
    for name in sorted(names):
        array = np.ascontiguousarray(params[name])
        digest = hashlib.sha256(repr((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
        digests[name] = digest.hexdigest()
    return digests


def check_same_program(comm, where: str, program_hash: str, description: dict, param_digests: dict[str, str]) -> None:
    """All-gather (program hash, description, params_digest) over `comm`; ValueError on every
    rank if they differ. `description`: what a reader needs to tell two programs apart (the
    graph's inputs, params, optimizer, ...), compared field by field."""
    everyone = comm.allgather((program_hash, description, param_digests))
    groups = _groups([(hash_, repr(sorted(desc.items()))) for hash_, desc, _ in everyone])
    if len(groups) > 1:
        first, other = groups[0][0], groups[1][0]
        differences = _differences(everyone[first][1], everyone[other][1])
        raise ValueError(f"{where}: the ranks compiled different programs: " + _listing(groups) + "; between "
                         f"rank {first} and rank {other}: " + ("; ".join(differences) or
                                                              "the graphs differ (their ops or their order)")
                         + ". Every rank must build the same graph and optimizer with the same graphc.")
    groups = _groups([repr(sorted(digests.items())) for _, _, digests in everyone])
    if len(groups) > 1:
        first, other = groups[0][0], groups[1][0]
        names = sorted(name for name, digest in everyone[first][2].items() if everyone[other][2].get(name) != digest)
        raise ValueError(f"{where}: the ranks start from different params: " + _listing(groups) + f"; {names} differ "
                         f"between rank {first} and rank {other}. Every rank must start from the same values "
                         f"(gc.init_params with one seed, or one checkpoint loaded on every rank).")


def _groups(keys: list) -> list[list[int]]:
    """Ranks grouped by equal key, groups in order of their lowest rank."""
    groups: dict = {}
    for rank, key in enumerate(keys):
        groups.setdefault(key, []).append(rank)
    return list(groups.values())


def _listing(groups: list[list[int]]) -> str:
    return " vs ".join(f"ranks {group}" if len(group) > 1 else f"rank {group[0]}" for group in groups)


def _differences(mine: dict, theirs: dict) -> list[str]:
    out = []
    for field in sorted(set(mine) | set(theirs)):
        if mine.get(field) != theirs.get(field):
            out.append(f"{field} {_short(mine.get(field))} vs {_short(theirs.get(field))}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
