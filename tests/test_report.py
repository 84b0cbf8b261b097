"""gc.report: what the HTML file holds, read back from its data block and drawings (the browser
test, test_report_browser.py, clicks through the same pages)."""
import json
import re

import numpy as np
import pytest

import graphc as gc
from graphc.core.provenance import derivation
from graphc.inspection import code
from graphc.inspection.layout import Box, layered_layout
from graphc.tools import models


def page_data(path):
    text = path.read_text()
    block = re.search(r'<script type="application/json" id="graphc-data">(.*?)</script>', text, re.S).group(1)
    return text, json.loads(block)


def drawn_ids(text, graph_key):
    svg = re.search(rf'<svg[^>]*data-graph="{graph_key}".*?</svg>', text, re.S).group(0)
    return [int(i) for i in re.findall(r'<g class="node [^"]*" data-id="(\d+)"', svg)]


@pytest.fixture(scope="module")
def mlp_step():
    g = gc.Graph("mlp")
    x = g.input("x", (8, 6))
    y = g.input("y", (8,), dtype="int32")
    w1, w2 = g.param("w1", (5, 6)), g.param("w2", (3, 5))
    hidden = gc.sqrt(gc.relu(gc.linear(x, w1)) + 1.0)
    loss = gc.softmax_cross_entropy(gc.linear(hidden, w2), y)
    params = gc.init_params(g, seed=0)
    step = gc.compile_training_step(loss, params, gc.Adam(lr=1e-3))
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((8, 6)).astype(np.float32), "y": rng.integers(0, 3, 8).astype(np.int32)}
    return step, params, feeds


def test_training_step_report_draws_every_node_of_every_graph(mlp_step, tmp_path):
    step, _, _ = mlp_step
    text, data = page_data(gc.report(step, tmp_path / "step.html"))
    keys = [graph["key"] for graph in data["graphs"]]
    assert keys == ["forward", "backward", "optimized"]
    for graph in data["graphs"]:
        assert sorted(drawn_ids(text, graph["key"])) == sorted(int(i) for i in graph["nodes"])
    optimized = {int(i) for i in data["graphs"][2]["nodes"]}
    assert optimized == {node.id for node in step.graph.ancestors(list(step.optimization.outputs))}
    backward = data["graphs"][1]["nodes"]
    assert {n["kind"] for n in backward.values()} >= {"input", "param", "forward", "backward", "update"}


def test_each_backward_node_names_its_forward_node_and_rule(mlp_step, tmp_path):
    step, _, _ = mlp_step
    _, data = page_data(gc.report(step, tmp_path / "step.html"))
    nodes = data["graphs"][1]["nodes"]
    source = step.source_outputs[0].graph
    backward = [n for n in nodes.values() if n["kind"] == "backward"]
    assert backward
    for record in backward:
        node = source.nodes[record["id"]]
        assert record["forward"] == node.grad_of.id
        assert str(record["forward"]) in nodes, "the forward node is drawn in the same graph"
        assert record["rule"] == derivation(node)
        assert record["site"] == node.site and record["site"].startswith("test_report.py:")
    sqrt_grads = [n for n in backward if nodes[str(n["forward"])]["text"].endswith("sqrt(x0 + 1.0)")
                  or "sqrt" in nodes[str(n["forward"])]["text"]]
    assert sqrt_grads and all("sympy" in n["rule"] for n in sqrt_grads)


def test_kernels_carry_their_ir_assembly_and_costs(mlp_step, tmp_path):
    step, _, _ = mlp_step
    text, data = page_data(gc.report(step, tmp_path / "step.html"))
    assert len(data["kernels"]) == len(step.steps)
    for kernel, planned in zip(data["kernels"], step.steps):
        assert kernel["label"] == planned.label and kernel["flops"] == planned.flops
        assert kernel["bytes"] == planned.bytes_moved > 0
        assert kernel["functions"], f"k{kernel['index']} has no function of its own"
        for name in kernel["functions"] + kernel["helpers"]:
            assert data["ir"][name].startswith("define ") and data["ir"][name].endswith("}")
        assert any(name in data["asm"] for name in kernel["functions"])
        assert "us" not in kernel      # no feeds, no times
    gemms = [k for k in data["kernels"] if k["label"].startswith("gemm")]
    assert gemms and all("ret" in data["asm"][k["functions"][0]] for k in gemms)


def test_every_kernel_is_reachable_from_the_nodes_the_user_wrote(mlp_step, tmp_path):
    step, _, _ = mlp_step
    _, data = page_data(gc.report(step, tmp_path / "step.html"))
    source_kernels = {k for n in data["graphs"][1]["nodes"].values() for k in n["kernels"]}
    assert source_kernels == set(range(len(data["kernels"])))


def test_feeds_time_each_kernel_and_train_nothing(mlp_step, tmp_path):
    step, params, feeds = mlp_step
    before = {name: array.copy() for name, array in params.items()}
    _, data = page_data(gc.report(step, tmp_path / "timed.html", feeds=feeds, repeats=3))
    for kernel in data["kernels"]:
        assert kernel["us"] >= 0 and kernel["gflops"] >= 0 and kernel["gbs"] >= 0
    assert sum(k["us"] for k in data["kernels"]) > 0
    gemms = [k for k in data["kernels"] if k["label"].startswith("gemm")]
    assert gemms and all(k["peak"] > 0 for k in gemms if k["us"] > 0)
    for name, array in params.items():
        np.testing.assert_array_equal(array, before[name])


def test_a_compiled_function_without_gradients_has_no_backward_graph(tmp_path):
    g = gc.Graph("f")
    x = g.input("x", (4, 4))
    fn = gc.compile(gc.exp(x) * 2.0, {})
    text, data = page_data(gc.report(fn, tmp_path / "f.html"))
    assert [graph["key"] for graph in data["graphs"]] == ["forward", "optimized"]
    assert "graphc report: f (compiled function)" in text


def test_the_page_is_self_contained(mlp_step, tmp_path):
    step, _, _ = mlp_step
    text, _ = page_data(gc.report(step, tmp_path / "step.html"))
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r'\b(src|href)="(?!#)', text), "no reference to another file or address"
    urls = set(re.findall(r"https?://[^\s\"'<)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}


def test_names_cannot_end_or_hide_the_pages_script(tmp_path):
    g = gc.Graph("<!--<script>")
    x = g.input("</script><script>alert(1)</script>", (2, 2))
    fn = gc.compile(gc.exp(x), {})
    text, data = page_data(gc.report(fn, tmp_path / "names.html"))
    block = re.search(r'id="graphc-data">(.*?)</script>', text, re.S).group(1)
    assert "<" not in block
    assert "</script><script>alert(1)</script>" in {n["name"] for n in data["graphs"][0]["nodes"].values()}
    assert "<script>alert" not in text.replace("&lt;script&gt;alert", "")


def test_lenet_report_is_at_most_5_mb(tmp_path):
    model = models.lenet5(64)
    step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=0.01))
    path = gc.report(step, tmp_path / "lenet.html")
    assert path.stat().st_size <= 5 * 1024 * 1024


def test_memory_chart_has_a_bar_per_buffer(mlp_step, tmp_path):
    step, _, _ = mlp_step
    text, _ = page_data(gc.report(step, tmp_path / "step.html"))
    chart = re.search(r'<svg[^>]*class="memory".*?</svg>', text, re.S).group(0)
    assert chart.count("<rect ") == len(step.memory.intervals) > 0
    assert f"Arena {step.memory.arena_bytes:,} bytes" in text


@pytest.mark.parametrize("call, error, words", [
    (lambda step, tmp: gc.report(object(), tmp / "a.html"), TypeError, "gc.compile"),
    (lambda step, tmp: gc.report(step, tmp / "missing" / "a.html"), FileNotFoundError, "does not exist"),
    (lambda step, tmp: gc.report(step, tmp / "a.html", feeds=[1, 2]), TypeError, "feeds"),
    (lambda step, tmp: gc.report(step, tmp / "a.html", feeds={"x": np.zeros((3, 6), np.float32),
                                                                "y": np.zeros(8, np.int32)}), ValueError, "x"),
])
def test_bad_arguments_are_refused_by_name(mlp_step, tmp_path, call, error, words):
    step, _, _ = mlp_step
    with pytest.raises(error, match=words):
        call(step, tmp_path)
    assert not (tmp_path / "a.html").exists()


# ---- the pieces -------------------------------------------------------------------------------------------


def test_layered_layout_puts_consumers_below_and_never_overlaps_a_layer():
    edges = [(0, 2), (1, 2), (2, 3), (0, 3), (3, 4), (1, 5), (5, 4), (0, 4)]
    boxes = {i: Box(40 + 10 * i, 30) for i in range(6)}
    layout = layered_layout(list(range(6)), edges, boxes, sources={0, 1})
    for a, b in edges:
        assert layout.positions[a][1] < layout.positions[b][1]
    rows = {}
    for node, (x, y) in layout.positions.items():
        rows.setdefault(y, []).append((x - boxes[node].width / 2, x + boxes[node].width / 2))
    for spans in rows.values():
        spans.sort()
        assert all(left[1] <= right[0] for left, right in zip(spans, spans[1:]))
    assert layout == layered_layout(list(range(6)), edges, boxes, sources={0, 1})


def test_sources_sit_just_above_their_first_consumer():
    edges = [(0, 1), (1, 2), (2, 3), (4, 3)]
    layout = layered_layout([0, 1, 2, 3, 4], edges, {i: Box(40, 30) for i in range(5)}, sources={0, 4})
    assert layout.positions[4][1] == layout.positions[2][1]


IR = '''define internal void @"k3.gemm.gemm"(ptr %"out") noinline
{
entry:
  call void @"graphc.gemm.micro6x16"(ptr %"out")
  call float @"llvm.fma.f32"(float 1.0, float 1.0, float 1.0)
  ret void
}
define internal void @"graphc.gemm.micro6x16"(ptr %"out")
{
entry:
  ret void
}
'''

ASM = '''\t.text
\t.globl\tk3.gemm.gemm
k3.gemm.gemm:
\tcallq\tgraphc.gemm.micro6x16
\tretq
.Lfunc_end0:
\t.size\tk3.gemm.gemm, .Lfunc_end0-k3.gemm.gemm
"graphc.gemm.micro6x16":
\tretq
.Lfunc_end1:
'''


def test_code_is_cut_into_functions_with_their_callees():
    functions = code.ir_functions([IR, IR])
    assert list(functions) == ["k3.gemm.gemm", "graphc.gemm.micro6x16"]
    assert code.callees(functions["k3.gemm.gemm"]) == ["graphc.gemm.micro6x16"]
    assert code.kernel_functions(3, functions) == ["k3.gemm.gemm"] and code.kernel_functions(31, functions) == []
    assembly = code.assembly_functions([ASM], functions)
    assert assembly["k3.gemm.gemm"].splitlines()[1] == "\tcallq\tgraphc.gemm.micro6x16"
    assert assembly["graphc.gemm.micro6x16"].startswith('"graphc.gemm.micro6x16":')


def test_derivation_names_the_sympy_derivative_or_the_vjp_rule():
    g = gc.Graph("d")
    x = g.input("x", (2, 3))
    w = g.param("w", (3, 3))
    loss = gc.sum(gc.sigmoid(x @ w))
    gc.grad(loss, w)
    rules = {derivation(node) for node in g.nodes if node.is_backward}
    assert "sympy: ∂/∂x0 Sigmoid(x0) = (1 - Sigmoid(x0))*Sigmoid(x0)" in rules
    assert "VJP of matmul: dA = dY · Bᵀ; dB = Aᵀ · dY" in rules
    assert derivation(x) is None
