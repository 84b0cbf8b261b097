"""Interchange with other frameworks: ONNX models in (`import_onnx`) and out (`export_onnx`).

The `onnx` package is imported inside these functions only, so `import graphc` works without it
(`pip install "graphc[onnx]"` brings onnx and onnxruntime).
"""
from graphc.interchange.onnx_export import export_onnx
from graphc.interchange.onnx_import import OnnxModel, import_onnx

__all__ = ["import_onnx", "export_onnx", "OnnxModel"]
