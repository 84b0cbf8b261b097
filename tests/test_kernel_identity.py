"""Steps of repeated layers share one kernel: only where the kernels would be identical.

For every step that calls another step's kernel, both kernels are generated afresh into
modules of their own and their IR compared, in networks that repeat layers in every way the
models use (convolutions, batch norm, dropout, residual adds, Adam's fused updates)."""
import numpy as np
import pytest

import graphc as gc
from graphc.backend.llvm.target import new_module
from graphc.tools import models


def kernel_ir(step, max_threads: int) -> str:
    module = new_module("kernel")
    step.build(module, "kernel", max_threads)
    return str(module)


NETWORKS = {
    "resnet8 adam": lambda: (models.resnet8(4), gc.Adam(lr=1e-3)),
    "resnet8 eval": lambda: (models.resnet8(4, training=False), None),
    "mlp dropout adamw": lambda: (models.mlp_dropout(8, sizes=(32, 32, 32, 32, 10)), gc.AdamW(lr=1e-3)),
    "digits cnn sgd": lambda: (models.digits_cnn(8), gc.SGD(lr=0.1, momentum=0.9)),
    "lenet5 sgd": lambda: (models.lenet5(8), gc.SGD(lr=0.1)),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_steps_share_a_kernel_only_when_its_code_is_identical(name):
    model, optimizer = NETWORKS[name]()
    params = gc.init_params(model.graph, seed=0)
    fn = (gc.compile(model.logits, params) if optimizer is None
          else gc.compile_training_step(model.loss, params, optimizer))
    max_threads = fn.recipe.assemble_args["max_threads"]
    shared = [(owner, index) for index, owner in enumerate(fn.shares_code_with) if owner != index]
    if name.startswith("resnet8") or name.startswith("mlp"):
        assert shared, "repeated layers should share kernels"
    for owner, index in shared:
        assert owner < len(fn.steps) and fn.shares_code_with[owner] == owner
        assert kernel_ir(fn.steps[owner], max_threads) == kernel_ir(fn.steps[index], max_threads), \
            f"k{index} ({fn.steps[index].label}) shares k{owner}'s code but generates other IR"


def test_shared_kernels_compute_what_the_reference_does():
    model = models.resnet8(4)
    params = gc.init_params(model.graph, seed=0)
    reference_params = {name: array.copy() for name, array in params.items()}
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.05))
    assert len(set(step.shares_code_with)) < len(step.steps)
    rng = np.random.default_rng(0)
    feeds = models.random_batch(model, rng)
    loss = step(**feeds)
    expected = gc.evaluate(model.loss, feeds, reference_params)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
