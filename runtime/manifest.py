"""What an artifact's manifest says, checked field by field before anything is built from it.

    format_version   artifact.FORMAT_VERSION
    kind             "function" or "training step"
    graph_hash       sha256 of the graph the program was compiled from (graphc's, for reference)
    graphc_version   the compiler's version
    target           {"triple", "cpu", "level", "cpu_features": the features the code may use}
    entry            the program's entry symbol; objects: its object files' section names
    team             {"section": the thread team's object, "ir_sha256": digest of the team's IR}
    max_threads      the most threads the entry uses
    single_output    a function returning one array rather than a list
    ignored_inputs   names a caller may feed that the program does not read
    slots            the entry's argument slots in order (see slots.py); each Param's and
                     State's contents are the sections "param:<name>" and "state:<name>"
    calls            {"slot": the call counter's State slot, "seed": dropout's seed,
                      "random_key_slot": the State slot of [seed, call] or null,
                      "optimizer_steps": updates since the optimizer's state was zeroed}
    optimizer        null, or {"kind": "SGD" | "Adam" | "AdamW", "lr", and its fields}
    hyper_slots      hyperparameter -> its State slot (optimizers.py writes them)
    check_finite     whether the entry checks its results for NaN and infinity
    sections         the sections' layout (artifact.py)

Every check raises ArtifactError naming the file and the field. Sizes are bounded: a manifest
cannot make the loader allocate more than MAX_ALLOCATION_BYTES per slot.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from .artifact import FORMAT_VERSION, ArtifactError
from .optimizers import check_optimizer, hyper_values
from .slots import Input, Output, Param, State, Status, Workspace
from .team_native import MAX_THREADS

__all__ = ["Manifest", "parse_manifest", "manifest_to_json", "slot_to_json", "KINDS"]

KINDS = ("function", "training step")
DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
MAX_ALLOCATION_BYTES = 1 << 36
MAX_NAME_CHARACTERS = 4096
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"format_version", "kind", "graph_hash", "graphc_version", "target", "entry", "objects", "team",
           "max_threads", "single_output", "ignored_inputs", "slots", "calls", "optimizer", "hyper_slots",
           "check_finite", "sections"}
_SLOT_FIELDS = {
    "input": ({"name", "shape", "dtype", "valid_range", "range_checked_natively"}, Input),
    "param": ({"name", "shape", "dtype", "updated", "role"}, Param),
    "state": ({"name", "shape", "dtype"}, State),
    "output": ({"name", "shape", "dtype"}, Output),
    "workspace": ({"name", "nbytes"}, Workspace),
    "status": ({"name"}, Status),
}
_KIND_OF_SLOT = {cls: kind for kind, (_, cls) in _SLOT_FIELDS.items()}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A checked manifest: the slots built, the rest as the file says."""

    kind: str
    graph_hash: str
    graphc_version: str
    target: dict
    entry: str
    objects: tuple[str, ...]
    team_section: str
    team_ir_sha256: str
    max_threads: int
    single_output: bool
    ignored_inputs: tuple[str, ...]
    slots: tuple
    param_roles: dict          # param name -> "param" or "buffer"
    calls_slot: str
    seed: int
    random_key_slot: str | None
    optimizer_steps: int
    optimizer: dict | None
    hyper_slots: dict
    check_finite: bool


def slot_to_json(slot, role: str | None = None) -> dict:
    """A slot as the manifest lists it (`role`: "param" or "buffer", for a Param)."""
    kind = _KIND_OF_SLOT[type(slot)]
    if kind == "workspace":
        return {"kind": kind, "name": slot.name, "nbytes": slot.nbytes}
    if kind == "status":
        return {"kind": kind, "name": slot.name}
    fields = {"kind": kind, "name": slot.name, "shape": list(slot.shape), "dtype": slot.dtype.name}
    if kind == "input":
        fields.update(valid_range=None if slot.valid_range is None else list(slot.valid_range),
                      range_checked_natively=slot.range_checked_natively)
    elif kind == "param":
        fields.update(updated=slot.updated, role=role or "param")
    return fields


def parse_manifest(where: str, manifest: dict, sections: dict) -> Manifest:
    """The checked manifest; ArtifactError naming `where` and the field for anything wrong."""
    def fail(problem: str):
        raise ArtifactError(f"{where}: the manifest has {problem}")

    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        fail(f"format version {version!r}, but its header says {FORMAT_VERSION}")
    if set(manifest) != _FIELDS:
        fail(f"fields {sorted(set(manifest) ^ _FIELDS)} missing or unexpected")
    kind = manifest["kind"]
    if kind not in KINDS:
        fail(f"kind {kind!r}, neither of {KINDS}")
    for field in ("graph_hash", "graphc_version", "entry"):
        _string(manifest[field], field, fail)
    target = _target(manifest["target"], fail)
    objects = _names(manifest["objects"], "objects", fail)
    if not objects or any(name not in sections for name in objects):
        fail("object files that are not among its sections")
    team = manifest["team"]
    if not (isinstance(team, dict) and set(team) == {"section", "ir_sha256"} and isinstance(team["section"], str)
            and team["section"] in sections
            and isinstance(team["ir_sha256"], str) and _HEX_DIGEST.fullmatch(team["ir_sha256"])):
        fail("no thread team's object among its sections")
    max_threads = manifest["max_threads"]
    if type(max_threads) is not int or not 1 <= max_threads <= MAX_THREADS:
        fail(f"max_threads {max_threads!r}")
    for field in ("single_output", "check_finite"):
        if type(manifest[field]) is not bool:
            fail(f"{field} {manifest[field]!r}, not true or false")
    ignored = _names(manifest["ignored_inputs"], "ignored_inputs", fail)
    slots, roles = _slots(manifest["slots"], fail)
    states = {slot.name: slot for slot in slots if isinstance(slot, State)}
    for slot in slots:
        if isinstance(slot, (Param, State)):
            section = sections.get(f"{'param' if isinstance(slot, Param) else 'state'}:{slot.name}")
            if section is None or len(section) != math.prod(slot.shape) * slot.dtype.itemsize:
                fail(f"no section of {math.prod(slot.shape) * slot.dtype.itemsize} bytes for {slot.name!r}")
    calls = _calls(manifest["calls"], states, sections, fail)
    optimizer, hyper = _optimizer(manifest["optimizer"], manifest["hyper_slots"], kind, slots, states, fail)
    return Manifest(kind, manifest["graph_hash"], manifest["graphc_version"], target, manifest["entry"],
                    tuple(objects), team["section"], team["ir_sha256"], max_threads, manifest["single_output"],
                    tuple(ignored), tuple(slots), roles, calls["slot"], calls["seed"], calls["random_key_slot"],
                    calls["optimizer_steps"], optimizer, hyper, manifest["check_finite"])


def _string(value, field: str, fail) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARACTERS:
        fail(f"{field} {str(value)[:100]!r}, not a string")
    return value


def _names(value, field: str, fail) -> list[str]:
    if not isinstance(value, list):
        fail(f"{field} that are not a list")
    return [_string(item, field, fail) for item in value]


def _target(target, fail) -> dict:
    if not (isinstance(target, dict) and set(target) == {"triple", "cpu", "level", "cpu_features"}):
        fail("no target (triple, cpu, level, cpu_features)")
    for field in ("triple", "cpu", "level"):
        _string(target[field], f"target {field}", fail)
    _names(target["cpu_features"], "target cpu_features", fail)
    return target


def _shape(value, fail) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32 or any(type(n) is not int or n < 0 for n in value):
        fail(f"a shape {str(value)[:100]}")
    return tuple(value)


def _slots(items, fail) -> tuple[list, dict]:
    if not isinstance(items, list) or not items:
        fail("no slots")
    slots, roles = [], {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("kind"), str) or item["kind"] not in _SLOT_FIELDS:
            fail(f"a slot {str(item)[:100]}")
        fields, cls = _SLOT_FIELDS[item["kind"]]
        if set(item) - {"kind"} != fields:
            fail(f"a {item['kind']} slot with fields {sorted(item)}")
        name = _string(item["name"], "a slot name", fail)
        if cls is Workspace:
            if type(item["nbytes"]) is not int or not 0 <= item["nbytes"] <= MAX_ALLOCATION_BYTES:
                fail(f"workspace {name!r} of {item['nbytes']!r} bytes")
            slots.append(Workspace(item["nbytes"], name))
            continue
        if cls is Status:
            slots.append(Status(name))
            continue
        shape = _shape(item["shape"], fail)
        if item["dtype"] not in DTYPES:
            fail(f"slot {name!r} of dtype {str(item['dtype'])[:40]!r}")
        if math.prod(shape) * np.dtype(item["dtype"]).itemsize > MAX_ALLOCATION_BYTES:
            fail(f"slot {name!r} of shape {shape}, too large")
        extra = {}
        if cls is Input:
            valid_range = item["valid_range"]
            if valid_range is not None and not (isinstance(valid_range, list) and len(valid_range) == 2
                                                and all(type(n) is int for n in valid_range)
                                                and valid_range[0] < valid_range[1]):
                fail(f"input {name!r} with valid_range {str(valid_range)[:60]}")
            if type(item["range_checked_natively"]) is not bool:
                fail(f"input {name!r} whose range_checked_natively is not true or false")
            extra = {"valid_range": None if valid_range is None else tuple(valid_range),
                     "range_checked_natively": item["range_checked_natively"]}
        elif cls is Param:
            if type(item["updated"]) is not bool or item["role"] not in ("param", "buffer"):
                fail(f"param {name!r} with updated {item['updated']!r}, role {str(item['role'])[:40]!r}")
            extra = {"updated": item["updated"]}
            roles[name] = item["role"]
        try:
            slots.append(cls(name, shape, item["dtype"], **extra))
        except ValueError as error:
            fail(f"a slot the runtime refuses: {error}")
    return slots, roles


def _calls(calls, states: dict, sections: dict, fail) -> dict:
    if not (isinstance(calls, dict) and set(calls) == {"slot", "seed", "random_key_slot", "optimizer_steps"}):
        fail("no call counts (slot, seed, random_key_slot, optimizer_steps)")
    counter = states.get(calls["slot"]) if isinstance(calls["slot"], str) else None
    if counter is None or counter.shape != (1,) or counter.dtype != np.int64:
        fail("a call counter that is not an int64 State slot of shape (1,)")
    count = int(np.frombuffer(sections[f"state:{counter.name}"], np.int64)[0])
    key = calls["random_key_slot"]
    if key is not None and (not isinstance(key, str) or key not in states or states[key].shape != (2,)
                            or states[key].dtype != np.int32):
        fail("a random key that is not an int32 State slot of shape (2,)")
    if type(calls["seed"]) is not int or not 0 <= calls["seed"] < 2 ** 32:
        fail(f"seed {calls['seed']!r}, not in [0, 2**32)")
    steps = calls["optimizer_steps"]
    if type(steps) is not int or not 0 <= steps <= count:
        fail(f"{steps!r} optimizer steps after {count} calls")
    return calls


def _optimizer(optimizer, hyper, kind: str, slots: list, states: dict, fail) -> tuple[dict | None, dict]:
    if kind == "function":
        if optimizer is not None or hyper != {}:
            fail("an optimizer, but it is a function, not a training step")
        return None, {}
    problem = check_optimizer(optimizer)
    if problem:
        fail(problem)
    # As floats, as graphc holds them: the hyperparameters' arithmetic is then graphc's.
    optimizer = {name: float(value) if type(value) is int else value for name, value in optimizer.items()}
    if "betas" in optimizer:
        optimizer["betas"] = [float(beta) for beta in optimizer["betas"]]
    outputs = [slot for slot in slots if isinstance(slot, Output)]
    if len(outputs) != 1 or math.prod(outputs[0].shape) != 1:
        fail("a training step whose outputs are not one loss")
    expected = set(hyper_values(optimizer, optimizer["lr"], 1))
    if not isinstance(hyper, dict) or set(hyper) != expected:
        fail(f"hyperparameter slots {sorted(hyper) if isinstance(hyper, dict) else hyper!r}, "
             f"not the {optimizer['kind']} optimizer's {sorted(expected)}")
    for name, slot in hyper.items():
        state = states.get(slot) if isinstance(slot, str) else None
        if state is None or state.shape != (1,) or state.dtype != np.float32:
            fail(f"hyperparameter {name!r} in {str(slot)[:60]!r}, not a float32 State slot of shape (1,)")
    return optimizer, dict(hyper)


def manifest_to_json(manifest: Manifest) -> dict:
    """The manifest's JSON fields (artifact.pack adds its sections' layout)."""
    return {
        "format_version": FORMAT_VERSION, "kind": manifest.kind, "graph_hash": manifest.graph_hash,
        "graphc_version": manifest.graphc_version, "target": manifest.target, "entry": manifest.entry,
        "objects": list(manifest.objects),
        "team": {"section": manifest.team_section, "ir_sha256": manifest.team_ir_sha256},
        "max_threads": manifest.max_threads, "single_output": manifest.single_output,
        "ignored_inputs": list(manifest.ignored_inputs),
        "slots": [slot_to_json(slot, manifest.param_roles.get(slot.name) if isinstance(slot, Param) else None)
                  for slot in manifest.slots],
        "calls": {"slot": manifest.calls_slot, "seed": manifest.seed, "random_key_slot": manifest.random_key_slot,
                  "optimizer_steps": manifest.optimizer_steps},
        "optimizer": manifest.optimizer, "hyper_slots": manifest.hyper_slots, "check_finite": manifest.check_finite,
    }
