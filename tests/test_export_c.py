"""`graphc export-c`: a saved training step and predictor as a shared library called from C, giving
the loaded Python step's losses, params and predictions bit for bit."""
import shutil
import subprocess

import numpy as np
import pytest

import graphc as gc
import graphc_runtime as rt
from graphc.tools import models
from graphc.tools.cli import main
from graphc.tools.export_c import ExportError, _renamed_symbols, export_c
from graphc_runtime import artifact, cpu_features

BATCH, STEPS = 8, 4
CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_a_c_compiler = pytest.mark.skipif(CC is None or not cpu_features.host_is_x86_64_linux(),
                                        reason="needs a C compiler and x86-64 Linux")

_DRIVER = r"""
#include "model.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int threads = atoi(argv[3]);
    FILE *data = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    float *params[GC_STEP_PARAM_COUNT], *predict_params[GC_PREDICT_PARAM_COUNT];
    for (int i = 0; i < GC_STEP_PARAM_COUNT; i++) params[i] = malloc(gc_step_param_sizes[i] * sizeof(float));
    gc_step_init_params(params);
    for (int j = 0; j < GC_PREDICT_PARAM_COUNT; j++)           /* the same arrays, by name */
        for (int i = 0; i < GC_STEP_PARAM_COUNT; i++)
            if (strcmp(gc_predict_param_names[j], gc_step_param_names[i]) == 0) predict_params[j] = params[i];
    gc_step_context *step;
    gc_predict_context *predict;
    if (gc_step_create(&step, threads) != GC_OK || gc_predict_create(&predict, threads) != GC_OK) return 1;
    static float x[X_SIZE], logits[LOGITS_SIZE];
    static int32_t y[BATCH];
    float loss;
    for (int s = 0; s < STEPS; s++) {
        if (fread(x, sizeof x, 1, data) != 1 || fread(y, sizeof y, 1, data) != 1) return 2;
        if (s == 2) gc_step_set_lr(step, gc_step_lr(step) * 0.5);
        int status = gc_step(step, params, x, y, &loss);
        printf("loss %d %.9g\n", status, loss);
    }
    y[0] = 10;
    printf("out of range %d\n", gc_step(step, params, x, y, &loss));
    printf("calls %lld\n", (long long)gc_step_calls(step));
    printf("predict %d\n", gc_predict(predict, predict_params, x, logits));
    fwrite(logits, sizeof logits, 1, out);
    for (int i = 0; i < GC_STEP_PARAM_COUNT; i++) fwrite(params[i], sizeof(float), gc_step_param_sizes[i], out);
    gc_step_destroy(step);
    gc_predict_destroy(predict);
    fclose(out);
    return 0;
}
"""


MODELS = {
    # LeNet-5 with Adam: the bias corrections computed in C
    "lenet5-adam": (models.lenet5, models.lenet5, lambda: gc.Adam(lr=1e-3)),
    # batch norm's buffers, dropout's key and SGD's lr slot; the predictor is the eval graph
    "digits-bn-dropout-sgd": (models.digits_cnn, lambda batch: models.digits_cnn(batch, training=False),
                              lambda: gc.SGD(lr=0.05, momentum=0.9, nesterov=True)),
}


@pytest.fixture(params=list(MODELS))
def saved(request, tmp_path, splitting_pays):
    return _saved(request.param, tmp_path)


@pytest.fixture
def lenet_saved(tmp_path, splitting_pays):
    return _saved("lenet5-adam", tmp_path)


def _saved(name, tmp_path):
    """A step trained once and its predictor, saved as step.gcx and predict.gcx; batches for more steps."""
    training, evaluation, optimizer = MODELS[name]
    model = training(BATCH)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, optimizer(), seed=3)
    predict = gc.compile(evaluation(BATCH).logits, params)
    rng = np.random.default_rng(0)
    step(**models.random_batch(model, rng))
    step.save(tmp_path / "step.gcx")
    predict.save(tmp_path / "predict.gcx")
    return model, [models.random_batch(model, rng) for _ in range(STEPS)]


@needs_a_c_compiler
def test_the_exported_step_and_predictor_give_pythons_numbers_bit_for_bit(saved, tmp_path):
    model, batches = saved
    assert main(["export-c", str(tmp_path / "step.gcx"), str(tmp_path / "predict.gcx"), str(tmp_path / "out"),
                 "--name", "model"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"libmodel.so", "model.h", "model.c"}
    exported = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / "out" / "libmodel.so")],
                              capture_output=True, text=True).stdout
    assert "gc_step_create" in exported and "graphc_entry" not in exported and "graphc_team" not in exported

    step, predict = rt.load(tmp_path / "step.gcx"), rt.load(tmp_path / "predict.gcx")
    threads = step.num_threads
    assert step.manifest.max_threads > 1          # the C library runs the thread team
    with open(tmp_path / "batches.bin", "wb") as data:
        for feeds in batches:
            data.write(feeds["x"].tobytes() + feeds["y"].tobytes())
    driver = tmp_path / "driver"
    (tmp_path / "driver.c").write_text(_DRIVER)
    subprocess.run([CC, "-O2", f"-I{tmp_path / 'out'}", str(tmp_path / "driver.c"), f"-L{tmp_path / 'out'}", "-lmodel",
                    f"-Wl,-rpath,{tmp_path / 'out'}", "-o", str(driver), f"-DX_SIZE={batches[0]['x'].size}",
                    f"-DBATCH={BATCH}", f"-DLOGITS_SIZE={BATCH * 10}", f"-DSTEPS={STEPS}"], check=True, timeout=120)
    ran = subprocess.run([str(driver), str(tmp_path / "batches.bin"), str(tmp_path / "results.bin"), str(threads)],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()

    losses = []
    for i, feeds in enumerate(batches):
        if i == 2:
            step.lr = step.lr * 0.5
        losses.append(step(**feeds))
    assert [line.split()[:2] for line in lines[:STEPS]] == [["loss", "0"]] * STEPS
    assert [np.float32(line.split()[2]) for line in lines[:STEPS]] == [np.float32(loss) for loss in losses]
    with pytest.raises(ValueError, match="'y'"):
        step(x=batches[-1]["x"], y=np.where(np.arange(BATCH) == 0, 10, batches[-1]["y"]).astype(np.int32))
    assert lines[STEPS:STEPS + 2] == ["out of range 1", f"calls {step.calls}"]
    predict.load_params(step.params)
    expected_logits = predict(x=batches[-1]["x"])
    results = np.fromfile(tmp_path / "results.bin", np.float32)
    assert lines[STEPS + 2] == "predict 0"
    assert np.array_equal(results[:BATCH * 10].reshape(BATCH, 10), expected_logits)
    trained = results[BATCH * 10:]
    assert np.array_equal(trained, np.concatenate([step.params[name].ravel() for name in step.params]))


def test_renamed_objects_still_load_and_run_as_before(lenet_saved, tmp_path):
    """The renaming that keeps two programs' symbols apart in one library, checked in-process."""
    model, batches = lenet_saved
    manifest, sections = artifact.read(tmp_path / "step.gcx")
    objects = _renamed_symbols([bytes(sections[name]) for name in manifest["objects"]], "gc_step__")
    edited = {name: bytes(view) for name, view in sections.items()}
    edited.update(zip(manifest["objects"], objects))
    renamed_manifest = {key: value for key, value in manifest.items() if key != "sections"}
    renamed_manifest["entry"] = "gc_step__" + manifest["entry"]
    (tmp_path / "renamed.gcx").write_bytes(artifact.pack(renamed_manifest, edited))
    renamed, original = rt.load(tmp_path / "renamed.gcx"), rt.load(tmp_path / "step.gcx")
    assert all(renamed(**feeds) == original(**feeds) for feeds in batches)
    assert rt.loader.defined_symbols(objects[-1]) and all(
        name.startswith("gc_step__") for obj in objects for name in rt.loader.defined_symbols(obj))


@needs_a_c_compiler
def test_export_refusals_name_the_problem(lenet_saved, tmp_path):
    (tmp_path / "damaged.gcx").write_bytes((tmp_path / "step.gcx").read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged"):
        export_c([tmp_path / "damaged.gcx"], tmp_path / "out")
    with pytest.raises(ExportError, match="at most one training step"):
        export_c([tmp_path / "step.gcx", tmp_path / "step.gcx"], tmp_path / "out")
    with pytest.raises(ExportError, match="prefix"):
        export_c([tmp_path / "step.gcx"], tmp_path / "out", prefix="not-c")
    for name in ("my-model", "../escape", "a/b"):      # the header's guard and the files' names
        with pytest.raises(ExportError, match="name .* is not a C identifier"):
            export_c([tmp_path / "step.gcx"], tmp_path / "out", name=name)
    assert not (tmp_path / "escape.h").exists()
    assert main(["export-c", str(tmp_path / "damaged.gcx"), str(tmp_path / "out")]) == 1


def test_the_cli_needs_an_artifact_and_a_folder(capsys):
    with pytest.raises(SystemExit):
        main(["export-c", "only-one"])
    assert "at least one artifact" in capsys.readouterr().err

