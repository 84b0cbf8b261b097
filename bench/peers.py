"""The benchmark workloads written idiomatically for the peers: PyTorch (eager and torch.compile)
and JAX (jit).

Each builder mirrors the graphc model of the same name in graphc/tools/models.py layer for layer.
The JAX versions name their params as graphc does, so they start from graphc's own initial
values; PyTorch models keep PyTorch's initializers (timing does not depend on the values).

The optimizer is "sgd" (torch.optim.SGD; in JAX a tree_map update) or "adam" (torch.optim.Adam;
in JAX written by hand with torch's semantics, as graphc.core.optim.Adam). The ResNets' batch
norm runs in training mode: nn.BatchNorm2d in PyTorch; in JAX written by hand in jax.numpy with
torch's semantics (batch statistics with the biased variance normalize; the running statistics
are updated with momentum 0.1 and the unbiased variance), as graphc/core/ops/norm.py.

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
    if name in RESNET_DEPTHS:
        return torch_resnet(torch, RESNET_DEPTHS[name])
    raise KeyError(name)


# graphc.tools.models.resnet8 / resnet20: CIFAR ResNets of 6n+2 layers, widths 16, 32, 64
RESNET_DEPTHS = {"resnet8": 8, "resnet20": 20}
RESNET_WIDTHS = (16, 32, 64)


def torch_resnet(torch, depth: int, classes: int = 10):
    """graphc.tools.models.resnet in PyTorch, as torchvision writes its BasicBlock (bias-free convs,
    nn.BatchNorm2d, in-place ReLU, 1x1 stride-2 conv + BN shortcuts); the same param names."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, channels, width, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.downsample = None
            if stride != 1 or channels != width:
                self.downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride=stride, bias=False),
                                                nn.BatchNorm2d(width))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += x if self.downsample is None else self.downsample(x)
            return self.relu(out)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            blocks, channels = (depth - 2) // 6, RESNET_WIDTHS[0]
            self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU(inplace=True)
            for stage, width in enumerate(RESNET_WIDTHS):
                layer = []
                for block in range(blocks):
                    layer.append(BasicBlock(channels, width, 2 if stage > 0 and block == 0 else 1))
                    channels = width
                setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, classes)

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            h = self.layer3(self.layer2(self.layer1(h)))
            return self.fc(torch.flatten(self.avgpool(h), 1))

    return ResNet()


def torch_optimizer(torch, params, optimizer: str, lr: float):
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise KeyError(optimizer)


def torch_step(name: str, torch, lr: float, compiled: bool = False, optimizer: str = "sgd"):
    """A function running one training step of the workload on (x, y) tensors (in training mode:
    the ResNets' batch norm normalizes by the batch and updates its running statistics)."""
    model = torch_model(name, torch).train()
    optimizer = torch_optimizer(torch, model.parameters(), optimizer, lr)
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


BN_MOMENTUM, BN_EPS = 0.1, 1e-5


def is_buffer(name: str) -> bool:
    """Batch norm's running statistics, which graphc's init_params returns beside the params."""
    return name.endswith((".running_mean", ".running_var"))


def jax_resnet_forward(depth: int, jax):
    """graphc.tools.models.resnet in jax.numpy, layer for layer: forward(params, buffers, x) ->
    (logits, new buffers), batch norm in training mode written by hand (see the module docstring)."""
    jnp, lax = jax.numpy, jax.lax
    blocks = (depth - 2) // 6

    def conv(p, name, h, stride, padding):
        return lax.conv_general_dilated(h, p[name + ".weight"], window_strides=(stride, stride),
                                        padding=((padding, padding), (padding, padding)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def batch_norm(p, buffers, new_buffers, name, h):
        count = h.size // h.shape[1]
        mean = jnp.mean(h, axis=(0, 2, 3))
        centred = h - mean[None, :, None, None]
        var = jnp.mean(centred * centred, axis=(0, 2, 3))
        scale = lax.rsqrt(var + BN_EPS) * p[name + ".weight"]
        keep = 1.0 - BN_MOMENTUM
        new_buffers[name + ".running_mean"] = keep * buffers[name + ".running_mean"] + BN_MOMENTUM * mean
        new_buffers[name + ".running_var"] = \
            keep * buffers[name + ".running_var"] + BN_MOMENTUM * var * (count / (count - 1))
        return centred * scale[None, :, None, None] + p[name + ".bias"][None, :, None, None]

    relu = jax.nn.relu

    def forward(p, buffers, x):
        new = {}

        def conv_bn(h, conv_name, bn_name, stride, kernel):
            return batch_norm(p, buffers, new, bn_name, conv(p, conv_name, h, stride, kernel // 2))

        h = relu(conv_bn(x, "conv1", "bn1", 1, 3))
        channels = RESNET_WIDTHS[0]
        for stage, width in enumerate(RESNET_WIDTHS):
            for block in range(blocks):
                prefix, stride = f"layer{stage + 1}.{block}", 2 if stage > 0 and block == 0 else 1
                out = relu(conv_bn(h, f"{prefix}.conv1", f"{prefix}.bn1", stride, 3))
                out = conv_bn(out, f"{prefix}.conv2", f"{prefix}.bn2", 1, 3)
                if stride != 1 or channels != width:
                    h = conv_bn(h, f"{prefix}.downsample.0", f"{prefix}.downsample.1", stride, 1)
                h, channels = relu(out + h), width
        h = jnp.mean(h, axis=(2, 3))
        return h @ p["fc.weight"].T + p["fc.bias"], new

    return forward


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


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def jax_adam_init(params: dict, jax) -> dict:
    # Two trees of zeros, not one: the state is donated, and a buffer may be donated only once.
    def zeros():
        return jax.tree_util.tree_map(jax.numpy.zeros_like, params)
    return {"exp_avg": zeros(), "exp_avg_sq": zeros(), "t": jax.numpy.zeros((), "float32")}


def jax_adam_update(params: dict, grads: dict, state: dict, lr: float, jax):
    """torch.optim.Adam's update (amsgrad off, no weight decay), as graphc.core.optim.Adam writes it."""
    jnp, tree_map = jax.numpy, jax.tree_util.tree_map
    beta1, beta2 = ADAM_BETAS
    t = state["t"] + 1.0
    step_size, inv_bias2_sqrt = lr / (1.0 - beta1 ** t), jax.lax.rsqrt(1.0 - beta2 ** t)
    m = tree_map(lambda m, g: beta1 * m + (1.0 - beta1) * g, state["exp_avg"], grads)
    v = tree_map(lambda v, g: beta2 * v + (1.0 - beta2) * g * g, state["exp_avg_sq"], grads)
    params = tree_map(lambda p, m, v: p - step_size * m / (jnp.sqrt(v) * inv_bias2_sqrt + ADAM_EPS), params, m, v)
    return params, {"exp_avg": m, "exp_avg_sq": v, "t": t}


def jax_stateful_step(name: str, jax, lr: float, optimizer: str):
    """A jitted training step (state, x, y) -> (new state, loss) for a workload with buffers (batch
    norm's running statistics) or an optimizer with state: state = {"params", "buffers", "opt"}.
    The state is donated, as the params are in `jax_step`."""
    if name in RESNET_DEPTHS:
        forward, loss_fn = jax_resnet_forward(RESNET_DEPTHS[name], jax), jax_forward("mlp", jax)[1]
    else:
        plain, loss_fn = jax_forward(name, jax)

        def forward(params, buffers, x):
            return plain(params, x), buffers

    def loss_of(params, buffers, x, y):
        logits, new_buffers = forward(params, buffers, x)
        return loss_fn(logits, y), new_buffers

    def step(state, x, y):
        (loss, buffers), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], state["buffers"], x, y)
        if optimizer == "adam":
            params, opt = jax_adam_update(state["params"], grads, state["opt"], lr, jax)
        elif optimizer == "sgd":
            params, opt = jax.tree_util.tree_map(lambda w, g: w - lr * g, state["params"], grads), state["opt"]
        else:
            raise KeyError(optimizer)
        return {"params": params, "buffers": buffers, "opt": opt}, loss

    return jax.jit(step, donate_argnums=0)


def _jax_timed_step(jax, name: str, params: dict, x, y, lr: float, optimizer: str = "sgd"):
    """A function running one step of the workload, its params (and state) carried from call to
    call, and returning once XLA has finished it."""
    x, y = jax.device_put(x), jax.device_put(y)
    if optimizer == "sgd" and name not in RESNET_DEPTHS:
        step = jax_step(name, jax, lr)
        state = {"params": jax.device_put(params)}

        def call():
            state["params"], loss = step(state["params"], x, y)
            jax.block_until_ready((state["params"], loss))

        return call
    step = jax_stateful_step(name, jax, lr, optimizer)
    trained = jax.device_put({k: v for k, v in params.items() if not is_buffer(k)})
    state = {"state": {"params": trained,
                       "buffers": jax.device_put({k: v for k, v in params.items() if is_buffer(k)}),
                       "opt": jax_adam_init(trained, jax) if optimizer == "adam" else {}}}

    def call():
        state["state"], loss = step(state["state"], x, y)
        jax.block_until_ready((state["state"], loss))

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

    def setup(self, name: str, params: dict, x, y, lr: float, optimizer: str = "sgd") -> float:
        """Build and compile the step of `name` on numpy params (buffers included) and inputs;
        returns the first call's seconds."""
        return self._ask("setup", name, params, x, y, lr, optimizer)

    def median_time(self, repeats: int, budget_s: float) -> float:
        return self._ask("time", repeats, budget_s)

    def close(self) -> None:
        self._conn.send(("quit",))
        self._process.join()
