"""Reading an ONNX model nobody vouched for: every way a file can be damaged or hostile ends in
a ValueError naming the file, before any of its nodes is looked at.
"""
from __future__ import annotations

import os
from pathlib import Path


def require_onnx():
    """The onnx module, or an ImportError saying how to get it."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError('ONNX interchange needs the onnx package: pip install "graphc[onnx]"') from err
    return onnx


def load_checked_model(source):
    """(model, label): a ModelProto that passed onnx's checker, and how errors name where it came from.

    `source` is a path, the bytes of a model, or an onnx.ModelProto (checked as well: a proto
    built in memory can be as broken as a file)."""
    onnx = require_onnx()
    base_dir = None
    if isinstance(source, onnx.ModelProto):
        label = f"ONNX model {source.graph.name!r}" if source.graph.name else "ONNX model"
        model = onnx.ModelProto()
        model.CopyFrom(source)   # loading external data below must not change the caller's proto
    elif isinstance(source, (bytes, bytearray)):
        label = "ONNX model bytes"
        model = _parse(onnx, bytes(source), label)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = f"ONNX file {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{label}: no such file")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"{label}: cannot be read: {err}") from None
        model = _parse(onnx, data, label)
        base_dir = path.resolve().parent
    else:
        raise TypeError(f"import_onnx: expected a path, bytes or an onnx.ModelProto, got {type(source).__name__}")
    _load_external_data(onnx, model, base_dir, label)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:   # the checker raises several types; all mean "not a valid model"
        raise ValueError(f"{label}: not a valid ONNX model: {_first_line(err)}") from None
    return model, label


def _parse(onnx, data: bytes, label: str):
    if not data:
        raise ValueError(f"{label}: empty, not an ONNX model")
    try:
        # external data is loaded separately, after its paths are checked
        return onnx.load_model_from_string(data)
    except Exception as err:   # protobuf's DecodeError, or anything a damaged stream provokes
        raise ValueError(f"{label}: not an ONNX model (cannot be parsed: {_first_line(err)})") from None


def _external_tensors(onnx, model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data
    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _load_external_data(onnx, model, base_dir: Path | None, label: str) -> None:
    """Load tensors stored beside the model, refusing any location outside the model's folder
    (an absolute path or ../ would let a model read any file the user can)."""
    tensors = _external_tensors(onnx, model)
    if not tensors:
        return
    if base_dir is None:
        raise ValueError(f"{label}: its tensors are stored in external files; give the model's path so "
                         f"they can be found beside it")
    for tensor in tensors:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base_dir / location).resolve()
        if not location or os.path.isabs(location) or base_dir not in target.parents or not target.is_file():
            raise ValueError(f"{label}: tensor {tensor.name!r} refers to external data {location!r}, which is not "
                             f"a file inside the model's folder {str(base_dir)!r}")
    try:
        from onnx.external_data_helper import load_external_data_for_model
        load_external_data_for_model(model, str(base_dir))
    except Exception as err:
        raise ValueError(f"{label}: its external data cannot be loaded: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
