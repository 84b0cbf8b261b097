"""The benchmark workloads written idiomatically for the peers: PyTorch (eager and torch.compile)
and JAX (jit).

Each builder mirrors the graphc model of the same name in graphc/tools/models.py layer for layer.
The JAX versions name their params as graphc does, so they start from graphc's own initial
values; PyTorch models keep PyTorch's initializers (timing does not depend on the values).

JAX runs in a worker process per thread count (`JaxWorker`): XLA sizes its CPU thread pool
once, when the backend starts, so one process cannot time JAX at 1 and then at 2 threads.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics
import time


def median_time(fn, repeats: int, budget_s: float) -> float:
    """Median seconds per call over `repeats` calls (fewer if the budget runs out), after a warm-up."""
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# PyTorch

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

    if not compiled:
        return step
    # Every call of torch_step makes the same code object with new closure values (model,
    # optimizer): Dynamo would recompile it under new guards only up to its recompile limit, then
    # silently run it eagerly. A reset makes each compiled step compile afresh.
    torch._dynamo.reset()
    return torch.compile(step)


# ---------------------------------------------------------------------------------------------
# JAX

def jax_forward(name: str, jax):
    """(forward(params, x) -> logits, loss(logits, y) -> scalar) of the workload, pure JAX."""
    jnp, lax = jax.numpy, jax.lax

    def dense(p, layer, h):
        # graphc stores a linear layer's weight as (out, in), as PyTorch does.
        return h @ p[layer + ".w"].T + p[layer + ".b"]

    def conv(p, layer, h, padding):
        out = lax.conv_general_dilated(h, p[layer + ".w"], window_strides=(1, 1), padding=padding,
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out + p[layer + ".b"][None, :, None, None]

    def avg_pool(h):
        return lax.reduce_window(h, 0.0, lax.add, (1, 1, 2, 2), (1, 1, 2, 2), "VALID") * 0.25

    def max_pool(h):
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    relu = jax.nn.relu

    def softmax_cross_entropy(logits, y):
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

    def binary_cross_entropy(z, t):
        return jnp.mean(jax.nn.softplus(z) - t * z)

    if name in ("logreg", "w5"):
        return (lambda p, x: x @ p["w"].T + p["b"]), \
            (binary_cross_entropy if name == "w5" else softmax_cross_entropy)
    if name == "mlp":
        def forward(p, x):
            h = relu(dense(p, "fc1", x))
            h = relu(dense(p, "fc2", h))
            return dense(p, "fc3", h)
    elif name == "lenet5":
        def forward(p, x):
            h = avg_pool(relu(conv(p, "conv1", x, "SAME")))
            h = avg_pool(relu(conv(p, "conv2", h, "VALID")))
            h = h.reshape(h.shape[0], -1)
            h = relu(dense(p, "fc1", h))
            h = relu(dense(p, "fc2", h))
            return dense(p, "fc3", h)
    elif name == "convnet":
        def forward(p, x):
            h = relu(conv(p, "conv1", x, "SAME"))
            h = max_pool(relu(conv(p, "conv2", h, "SAME")))
            h = relu(conv(p, "conv3", h, "SAME"))
            h = max_pool(relu(conv(p, "conv4", h, "SAME")))
            return dense(p, "fc", jnp.mean(h, axis=(2, 3)))
    else:
        raise KeyError(name)
    return forward, softmax_cross_entropy


def jax_step(name: str, jax, lr: float):
    """A jitted training step (params, x, y) -> (new params, loss): value_and_grad, then SGD.

    The params are donated, so XLA may update them in place as graphc and torch.optim do.
    """
    forward, loss_fn = jax_forward(name, jax)

    def loss_of(params, x, y):
        return loss_fn(forward(params, x), y)

    def step(params, x, y):
        loss, grads = jax.value_and_grad(loss_of)(params, x, y)
        return jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads), loss

    return jax.jit(step, donate_argnums=0)


def _jax_timed_step(jax, name: str, params: dict, x, y, lr: float):
    """A function running one step of the workload, its params carried from call to call, and
    returning once XLA has finished it."""
    step = jax_step(name, jax, lr)
    state = {"params": jax.device_put(params)}
    x, y = jax.device_put(x), jax.device_put(y)

    def call():
        state["params"], loss = step(state["params"], x, y)
        jax.block_until_ready((state["params"], loss))

    return call


def _jax_worker(conn, cpus: list[int]) -> None:
    """Serve a JaxWorker: set up a workload's step, then time it on request."""
    # Before JAX starts its backend: XLA's CPU thread pool is as large as the CPUs this
    # process may run on, so pinning the process is what sets JAX's thread count.
    os.sched_setaffinity(0, cpus)
    import jax
    while True:
        request, *args = conn.recv()
        if request == "setup":
            call = _jax_timed_step(jax, *args)
            start = time.perf_counter()
            call()  # the first call traces and compiles
            conn.send(time.perf_counter() - start)
        elif request == "time":
            conn.send(median_time(call, *args))
        elif request == "version":
            conn.send(f"JAX {jax.__version__}, {jax.default_backend()}")
        else:
            return


class JaxWorker:
    """JAX jit in its own process, pinned to `threads` CPUs.

    The parent blocks while the worker times, so interleaving it with in-process peers still
    gives every peer the same machine load.
    """

    def __init__(self, threads: int):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        # spawn, not fork: a forked child would inherit the parent's threads (torch, graphc) half-copied.
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_jax_worker, args=(child, cpus), daemon=True)
        self._process.start()
        child.close()

    def _ask(self, *request):
        self._conn.send(request)
        return self._conn.recv()

    def version(self) -> str:
        return self._ask("version")

    def setup(self, name: str, params: dict, x, y, lr: float) -> float:
        """Build and compile the step of `name` on numpy params and inputs; returns the first call's seconds."""
        return self._ask("setup", name, params, x, y, lr)

    def median_time(self, repeats: int, budget_s: float) -> float:
        return self._ask("time", repeats, budget_s)

    def close(self) -> None:
        self._conn.send(("quit",))
        self._process.join()
