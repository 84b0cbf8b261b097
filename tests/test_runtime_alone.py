"""graphc_runtime installs alone (runtime/pyproject.toml: numpy its only dependency on x86-64
Linux), and a fresh virtualenv holding it and numpy alone runs a saved LeNet-5 training step,
bit for bit as the compiled step goes on. Takes some seconds: a venv, a wheel, numpy's install."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import graphc as gc
from graphc.tools import models
from graphc_runtime import cpu_features

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"

_RUN_IN_THE_VENV = """
import importlib.util, json, sys
import numpy as np
import graphc_runtime

step = graphc_runtime.load(sys.argv[1])
batches = np.load(sys.argv[2])
losses = [step(x=batches[f"x{i}"], y=batches[f"y{i}"]) for i in range(int(sys.argv[3]))]
print(json.dumps({"losses": losses, "location": graphc_runtime.__file__,
                  "installed": [name for name in ("llvmlite", "sympy", "networkx", "graphc")
                                if importlib.util.find_spec(name) is not None],
                  "params": {name: array.tobytes().hex() for name, array in step.params.items()}}))
"""


def _run(command, **options):
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, **options)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _build_wheel(source: Path, into: Path) -> Path:
    """The runtime's wheel, built from a copy (building writes build/ and egg-info beside the source)."""
    shutil.copytree(RUNTIME, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    # With setuptools >= 77 here, nothing is downloaded; else pip fetches it for an isolated build.
    flags = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *flags, str(source), "-w", str(into)])
    (wheel,) = into.glob("graphc_runtime-*.whl")
    return wheel


def _setuptools_major() -> int:
    try:
        import setuptools
    except ImportError:
        return 0
    return int(setuptools.__version__.split(".")[0])


@pytest.mark.skipif(not cpu_features.host_is_x86_64_linux(), reason="numpy alone suffices on x86-64 Linux")
def test_a_fresh_venv_with_only_the_runtime_and_numpy_runs_a_saved_lenet_step(tmp_path):
    model = models.lenet5(8)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.05, momentum=0.9), seed=0)
    rng = np.random.default_rng(0)
    batches = [models.random_batch(model, rng) for _ in range(4)]
    step(**batches[0])
    step.save(tmp_path / "lenet.gcx")
    np.savez(tmp_path / "batches.npz", **{f"{k}{i}": feeds[k] for i, feeds in enumerate(batches[1:]) for k in feeds})

    wheel = _build_wheel(tmp_path / "runtime-source", tmp_path / "wheels")
    venv = tmp_path / "venv"
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "venv", str(venv)], env=environment)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], env=environment)
    _run([python, "-m", "pip", "install", "-q", f"numpy=={np.__version__}"], env=environment)
    listed = json.loads(_run([python, "-m", "pip", "list", "--format", "json"], env=environment))
    assert {p["name"].lower() for p in listed} - {"pip", "setuptools", "wheel"} == {"graphc-runtime", "numpy"}

    environment["GRAPHC_NUM_THREADS"] = str(gc.get_num_threads())
    result = json.loads(_run([python, "-c", textwrap.dedent(_RUN_IN_THE_VENV), str(tmp_path / "lenet.gcx"),
                              str(tmp_path / "batches.npz"), "3"], env=environment, cwd=tmp_path))
    assert result["installed"] == [] and result["location"].startswith(str(venv))
    assert result["losses"] == [step(**feeds) for feeds in batches[1:]]
    assert result["params"] == {name: array.tobytes().hex() for name, array in step.params.items()}
