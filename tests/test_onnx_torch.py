"""Round trip from PyTorch: LeNet-5 and ResNet-8 defined in torch, exported with
torch.onnx.export (the TorchScript exporter, dynamo=False, which runs offline), imported with
gc.import_onnx and trained natively; the losses of a few SGD steps match torch's own training of
the same model on the same batches, and so do batch norm's running statistics.
"""
import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
nn = torch.nn

import graphc as gc  # noqa: E402
from torch_models import torch_resnet  # noqa: E402

BATCH = 8


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        h = nn.functional.avg_pool2d(torch.relu(self.conv2(h)), 2)
        h = torch.flatten(h, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def resnet8():
    """CIFAR ResNet-8: a stem and three stages of one basic block each (16, 32, 64 channels)."""
    return torch_resnet(torch, 8)


def export(model, example, training):
    """The model as ONNX bytes; TRAINING keeps batch norm in training form (not folded into the conv)."""
    buffer = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    model.train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, training=mode, do_constant_folding=False,
                          input_names=["x"], output_names=["logits"], opset_version=17)
    return buffer.getvalue()


def batches(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((BATCH,) + shape).astype(np.float32), rng.integers(0, 10, BATCH).astype(np.int32))
            for _ in range(steps)]


def torch_losses(model, data, lr):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y).long())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def graphc_losses(onnx_bytes, data, lr):
    m = gc.import_onnx(onnx_bytes)
    loss = gc.softmax_cross_entropy(m.outputs[0], m.graph.input("y", (BATCH,), dtype="int32"))
    step = gc.compile_training_step(loss, m.params, gc.SGD(lr=lr))
    return m, [step(x=x, y=y) for x, y in data]


@pytest.mark.parametrize("make, shape, training", [(LeNet5, (1, 28, 28), False), (resnet8, (3, 16, 16), True)],
                         ids=["lenet5", "resnet8"])
def test_a_torch_model_trains_natively_as_in_torch(make, shape, training):
    torch.manual_seed(0)
    model = make()
    onnx_bytes = export(model, torch.zeros((BATCH,) + shape), training)
    data = batches(shape, steps=2) * 3   # batches seen again: the loss must fall
    m, ours = graphc_losses(onnx_bytes, data, lr=0.01)
    theirs = torch_losses(model, data, lr=0.01)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)
    assert ours[-2:] < ours[:2]
    # the params are the initializers under torch's names, trained in place like torch's
    state = model.state_dict()
    for name, value in m.params.items():
        np.testing.assert_allclose(value, state[name].numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_resnet8_imports_its_batch_norms_as_layers_with_buffers():
    torch.manual_seed(0)
    model = resnet8()
    m = gc.import_onnx(export(model, torch.zeros(BATCH, 3, 16, 16), training=True))
    assert {"bn1.running_mean", "layer2.0.downsample.1.running_var"} <= set(m.graph.buffers)
    assert "conv1.weight" in m.graph.params and "bn1.running_mean" not in m.graph.params
    assert set(m.params) == set(m.graph.params) | set(m.graph.buffers)


def test_an_eval_export_evaluates_as_torch():
    torch.manual_seed(0)
    model = resnet8()
    x = np.random.default_rng(1).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)
    model.train()
    model(torch.from_numpy(x))   # running statistics that are not the initial ones
    model.eval()
    m = gc.import_onnx(export(model, torch.from_numpy(x), training=False))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gc.evaluate(m.outputs[0], {"x": x}, m.params), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gc.compile(m.outputs, m.params)(x=x)[0], want, rtol=1e-4, atol=1e-5)
