"""graphc does not need onnx: `import graphc` works without it, and the ONNX functions say how to get it."""
import subprocess
import sys

BLOCK_ONNX = "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"


def test_graphc_imports_and_explains_without_onnx():
    script = BLOCK_ONNX + (
        "import graphc as gc\n"
        "for call in (lambda: gc.import_onnx('m.onnx'), lambda: gc.export_onnx(gc.Graph().input('x', (1,)), {})):\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as err:\n"
        "        print(err)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('ONNX interchange needs the onnx package: pip install "graphc[onnx]"') == 2
