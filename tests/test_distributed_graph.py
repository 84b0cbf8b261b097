"""The pieces of data-parallel training that run in one process, without MPI: the training
graph with its all-reduces (buckets, their place in the schedule), its native kernels run
without a communicator (each value is then its own average) against the reference executor,
and the sharded sampler. tests/test_distributed.py runs the steps on several ranks."""
import dataclasses
import types

import numpy as np
import pytest

import graphc as gc
from graphc.backend.compiler import _training_graph
from graphc.backend.kernels.collective import MpiAbi, sums_in_place
from graphc.core.ops.collective import allreduce_start
from graphc.distributed.buckets import plan_buckets
from graphc.distributed.sampler import ShardedSampler
from graphc.tools import models

MPICH = MpiAbi(comm_bytes=4, datatype_bytes=4, op_bytes=4, request_bytes=4, status_bytes=20)


def data_parallel(bucket_bytes, shared=0):
    """What _training_graph reads of a DataParallel, without a communicator."""
    return types.SimpleNamespace(abi=MPICH, bucket_bytes=bucket_bytes, shared=shared)


def training_graph(model, optimizer, bucket_bytes=1024, shared=0):
    graph = model.graph
    updates = graph.buffer_updates_for([model.loss])
    trainable = [name for name in graph.params]
    return _training_graph(model.loss, updates, trainable, optimizer, data_parallel(bucket_bytes, shared))


def state_values(built, params, optimizer):
    """Every param the training graph reads: the model's, the optimizer's state (zeros), its
    hyperparameter slots, and a communicator slot of zeros (no communicator)."""
    values = dict(params)
    for name, node in built.graph.params.items():
        if name not in values:
            values[name] = np.zeros(node.shape, node.dtype)
    for hyper, slot in built.hyper_slots.items():
        values[slot] = np.array([optimizer.hyper_values(optimizer.lr, 1)[hyper]], np.float32)
    return values


MODELS = {
    "lenet": (lambda: models.lenet5(4, image=(1, 12, 12)), gc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "convnet": (lambda: models.small_convnet(4, image=(2, 8, 8), classes=3), gc.Adam(lr=1e-2)),
    "bn": (lambda: models.digits_cnn(4, widths=(4, 8), p=0.0), gc.SGD(lr=0.1)),
}


@pytest.mark.parametrize("shared", [0, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_native_step_without_communicator_matches_the_reference(name, shared):
    """Without a communicator the kernels run as one process: each average is the value itself
    (summed by MPI, or in the shared memory of 3 ranks: then each bucket is also written)."""
    build, optimizer = MODELS[name]
    model = build()
    built = training_graph(model, optimizer, bucket_bytes=512, shared=shared)
    ops = [node.op for node in built.graph.nodes]
    assert ops.count("allreduce_start") > 1 and "allreduce_progress" in ops
    assert ops.count("allreduce_finish") == (1 if shared else 0)
    if name == "lenet" and not shared:     # its largest gradient has a bucket of its own, summed in place
        optimized = gc.optimize(built.outputs).graph
        assert any(sums_in_place(node) for node in optimized.nodes if node.op == "allreduce_start")
    params = state_values(built, gc.init_params(model.graph, seed=0), optimizer)
    feeds = models.random_batch(model, np.random.default_rng(0))
    expected = gc.evaluate(built.outputs, feeds, {k: v.copy() for k, v in params.items()})
    got = gc.compile(built.outputs, {k: v.copy() for k, v in params.items()})(**feeds)
    for value, reference in zip(got, expected):
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-6)


def test_averages_are_the_gradients_in_one_process():
    """The reduction is the identity in one process: each average is the value its bucket
    took at its offset, a gradient that gc.grad_check compares with finite differences."""
    model = models.small_convnet(4, image=(2, 8, 8), classes=3)
    params = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(1))
    assert gc.grad_check(model.loss, params, feeds).passed(1e-4)
    optimizer = gc.SGD(lr=0.5)
    built = training_graph(model, optimizer, bucket_bytes=256)
    averages = [node for node in built.graph.nodes if node.op == "allreduce_done"]
    sources = []
    for node in averages:
        start, offsets = node.inputs[0], np.cumsum([0] + [value.size for value in node.inputs[0].inputs[:-1]])
        sources.append(start.inputs[list(offsets).index(node.attrs["offset"])])
    assert len(averages) == 1 + len(model.graph.params)
    values = gc.evaluate(averages + sources, feeds, state_values(built, params, optimizer))
    for average, source in zip(values[:len(averages)], values[len(averages):]):
        np.testing.assert_array_equal(average, source)


def test_each_start_follows_its_bucket_and_the_updates_wait_for_the_backward():
    model = models.lenet5(4, image=(1, 12, 12))
    built = training_graph(model, gc.SGD(lr=0.1), bucket_bytes=2048)
    nodes = built.graph.ancestors(built.outputs)
    position = {node.id: i for i, node in enumerate(nodes)}
    backward = [node for node in nodes if node.is_backward and node.op not in ("allreduce_start",
                                                                                "allreduce_progress")]
    starts = [node for node in nodes if node.op == "allreduce_start"]
    assert len(starts) >= 3
    for start in starts:
        values = [operand for operand in start.inputs[:-1] if operand.op != "param"]
        # right after its last value (or after the progress point that value's kernel gets)
        gap = [node.op for node in nodes[position[max(v.id for v in values)] + 1:position[start.id]]]
        assert set(gap) <= {"allreduce_progress"}, gap
    first = min(position[start.id] for start in starts)
    later_work = [node for node in backward if position[node.id] > first and node.op in ("matmul", "conv2d_weight_grad",
                                                                                         "conv2d_input_grad")]
    progress = [node for node in nodes if node.op == "allreduce_progress"]
    assert later_work and len(progress) >= len(later_work)
    dones = [position[node.id] for node in nodes if node.op == "allreduce_done"]
    assert min(dones) > max(position[node.id] for node in backward)


def test_buckets_follow_the_backward_order_and_the_byte_budget():
    model = models.mlp(4, (10, 300, 20, 3))
    graph = model.graph
    grads = gc.grad(model.loss, list(graph.params.values()))
    values = [model.loss, *grads]
    buckets = plan_buckets(values, bucket_bytes=1000)
    order = [i for bucket in buckets for i in bucket.members]
    assert [values[i].id for i in order] == sorted(value.id for value in values)
    for bucket in buckets:
        held = sum(values[i].size * 4 for i in bucket.members)
        assert held <= 1000 or len(bucket.members) == 1       # a larger value has a bucket of its own
    big = next(i for i, value in enumerate(values) if value.size == 300 * 10)
    assert [bucket.members for bucket in buckets if big in bucket.members] == [[big]]
    assert [bucket.ready for bucket in buckets] == sorted(bucket.ready for bucket in buckets)


def test_a_bucket_is_summed_in_place_only_in_a_buffer_nothing_else_reads():
    g = gc.Graph()
    x, w = g.input("x", (4, 3)), g.param("w", (4, 3))
    comm = g.param("comm", (2 * 20,), "int32")
    alone = gc.exp(x * w)
    shared = gc.exp(x + w)
    gc.sum(shared)                 # another kernel reads `shared`

    def start(*values):
        return allreduce_start(list(values), comm, bucket=0, abi=dataclasses.astuple(MPICH))
    assert sums_in_place(start(alone))
    assert sums_in_place(start(gc.reshape(gc.exp(x - w), (12,))))   # through a reshape
    assert not sums_in_place(start(shared))
    assert not sums_in_place(start(w)) and not sums_in_place(start(x))  # the caller's memory
    assert not sums_in_place(start(gc.exp(x), gc.exp(w)))               # two values: copied into the bucket


def test_bucket_bytes_and_allreduce_need_a_communicator():
    model = models.mlp(4, (10, 5, 3))
    with pytest.raises(ValueError, match="bucket_bytes sizes the all-reduces of a step compiled with comm="):
        gc.compile_training_step(model.loss, gc.init_params(model.graph), gc.SGD(lr=0.1), bucket_bytes=1024)
    with pytest.raises(ValueError, match="allreduce chooses how a step compiled with comm= averages; there is no comm"):
        gc.compile_training_step(model.loss, gc.init_params(model.graph), gc.SGD(lr=0.1), allreduce="mpi")


# ---- the sharded sampler -------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["uniform", "epoch"])
def test_shards_are_disjoint_and_cover_the_examples(sampling):
    n, k, ranks = 103, 5, 3
    samplers = [ShardedSampler(n, k, rank=r, ranks=ranks, seed=4, sampling=sampling) for r in range(ranks)]
    shards = [set(sampler.shard.tolist()) for sampler in samplers]
    assert set.union(*shards) == set(range(n)) and sum(map(len, shards)) == n
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert len({sampler.steps_per_epoch for sampler in samplers}) == 1 == len({n // ranks // k})
    for sampler, shard in zip(samplers, shards):
        batches = list(sampler.epoch(0))
        assert len(batches) == sampler.steps_per_epoch
        assert all(len(batch) == k and set(batch.tolist()) <= shard for batch in batches)
        if sampling == "epoch":            # a pass over the shard: no example twice
            drawn = np.concatenate(batches)
            assert len(set(drawn.tolist())) == len(drawn)


def test_uniform_sampling_draws_with_replacement_from_the_whole_shard():
    sampler = ShardedSampler(40, 10, rank=1, ranks=2, seed=0, sampling="uniform")
    drawn = np.concatenate([batch for epoch in range(200) for batch in sampler.epoch(epoch)])
    counts = np.bincount(drawn, minlength=40)[sampler.shard]
    assert (counts > 0).all()          # every example of the shard is drawn ...
    assert counts.max() / counts.mean() < 1.5    # ... about equally often
    repeats = [len(set(batch.tolist())) < len(batch) for epoch in range(50) for batch in sampler.epoch(epoch)]
    assert any(repeats)                # an example may appear twice in one batch


def test_an_epoch_depends_on_seed_rank_and_epoch_alone():
    def batches(seed, rank, epoch):
        return [b.tolist() for b in ShardedSampler(50, 4, rank=rank, ranks=2, seed=seed).epoch(epoch)]
    assert batches(1, 0, 3) == batches(1, 0, 3)
    assert batches(1, 0, 3) != batches(1, 0, 2) != batches(2, 0, 2)
    assert batches(1, 0, 3) != batches(1, 1, 3)


def test_too_few_examples_for_every_rank_is_refused():
    with pytest.raises(ValueError, match="10 examples cannot give each of 3 ranks a batch of 4"):
        ShardedSampler(10, 4, rank=0, ranks=3)


@pytest.mark.parametrize("bucket_bytes", [1, 4, 64])
def test_buckets_ready_before_the_communicator_start_with_the_backward(bucket_bytes):
    """The loss and batch norm's statistics exist before the comm slot: their buckets start at
    the backward's first node, before any progress point reads them."""
    for name in sorted(MODELS):
        build, optimizer = MODELS[name]
        built = training_graph(build(), optimizer, bucket_bytes=bucket_bytes)
        nodes = built.graph.nodes
        first_start = min(node.id for node in nodes if node.op == "allreduce_start")
        first_progress = min((node.id for node in nodes if node.op == "allreduce_progress"), default=None)
        assert first_progress is None or first_start < first_progress
        last_backward = max(node.id for node in nodes if node.is_backward and node.op != "allreduce_start")
        assert first_start < last_backward, f"{name}: the first bucket starts only after the backward"
