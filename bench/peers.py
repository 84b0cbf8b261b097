"""The benchmark workloads written idiomatically for the peers (PyTorch eager, torch.compile).

Each builder mirrors the graphc model of the same name in graphc/models.py layer for layer.
"""
from __future__ import annotations


def torch_model(name: str, torch):
    nn = torch.nn
    if name == "logreg":
        return nn.Linear(784, 10)
    if name == "w5":
        return nn.Linear(64, 1)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    if name == "convnet":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    raise KeyError(name)


def torch_step(name: str, torch, lr: float, compiled: bool = False):
    """A function running one training step of the workload on (x, y) tensors."""
    model = torch_model(name, torch)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if name == "w5":
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    else:
        loss_fn = torch.nn.functional.cross_entropy

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return torch.compile(step) if compiled else step
