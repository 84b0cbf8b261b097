"""Reading graphs: the text listing, Graphviz DOT, tensor attributes, and init_params."""
import inspect
import re
import shutil
import subprocess

import numpy as np
import pytest

import graphc as gc

SHORT = {"float32": "f32", "float64": "f64", "int32": "i32", "int64": "i64"}


def line_here():
    return inspect.currentframe().f_back.f_lineno


def small_net():
    """A conv net and its gradient, recording the line that built each forward layer."""
    g = gc.Graph("net")
    lines = {}
    x = g.input("x", (2, 1, 6, 6))
    y = g.input("y", (2,), dtype="int32")
    w = g.param("conv.w", (3, 1, 3, 3))
    lines["conv"] = line_here() + 1
    h = gc.relu(gc.conv2d(x, w, padding="same"))
    lines["pool"] = line_here() + 1
    h = gc.max_pool2d(h, 2)
    fc = g.param("fc.w", (4, 27))
    lines["linear"] = line_here() + 1
    logits = gc.linear(gc.flatten(h), fc)
    loss = gc.softmax_cross_entropy(logits, y)
    lines["grad"] = line_here() + 1
    grads = gc.grad(loss, [w, fc])
    return g, loss, grads, lines


LINE = re.compile(r"^(?P<mark>[* ]) %(?P<id>\d+)\s+= (?P<summary>.*?)\s{2,}(?P<type>[fi]\d\d\[[\d,]*\])\s+(?P<origin>.*)$")


def test_listing_has_one_line_per_node_with_everything():
    g, loss, grads, lines = small_net()
    text = str(g)
    rows = text.splitlines()
    assert len(rows) == 1 + len(g.nodes)
    assert "net" in rows[0]
    for node, row in zip(g.nodes, rows[1:]):
        m = LINE.match(row)
        assert m, f"unparsable listing line: {row!r}"
        assert int(m["id"]) == node.id
        assert m["type"] == f"{SHORT[node.dtype]}[{','.join(map(str, node.shape))}]"
        summary = m["summary"]
        if node.op in ("input", "param"):
            assert summary == f"{node.op} {node.name}"
        else:
            operands = ", ".join(f"%{o.id}" for o in node.inputs)
            assert summary.startswith(f"{node.op}({operands})")
        assert node.site in m["origin"]
        if node.is_backward:
            assert m["mark"] == "*"
            assert f"grad of %{node.grad_of.id}" in m["origin"]
        else:
            assert m["mark"] == " " and "grad of" not in m["origin"]


def test_listing_shows_attrs_and_provenance():
    g, loss, grads, lines = small_net()
    text = str(g)
    by_op = {}
    for node in g.nodes:
        by_op.setdefault(node.op, []).append(node)
    conv = by_op["conv2d"][0]
    conv_row = next(r for r in text.splitlines() if r.startswith(f"  %{conv.id} "))
    assert "stride=(1, 1)" in conv_row and "padding=((1, 1), (1, 1))" in conv_row
    assert f"test_inspect.py:{lines['conv']}" in conv_row
    pool_row = next(r for r in text.splitlines() if f"%{by_op['max_pool2d'][0].id} " in r)
    assert "kernel=(2, 2)" in pool_row and f"test_inspect.py:{lines['pool']}" in pool_row
    relu_row = next(r for r in text.splitlines() if "Relu(x0)" in r)
    assert f"test_inspect.py:{lines['conv']}" in relu_row
    # the backward graph: conv's weight gradient is a convolution serving the forward conv node
    wgrad = by_op["conv2d_weight_grad"][0]
    wgrad_row = next(r for r in text.splitlines() if r.startswith(f"* %{wgrad.id} "))
    assert f"grad of %{conv.id}" in wgrad_row and f"test_inspect.py:{lines['grad']}" in wgrad_row
    assert "max_pool2d_grad" in text
    header = text.splitlines()[0]
    n_backward = sum(n.is_backward for n in g.nodes)
    assert f"{len(g.nodes) - n_backward} forward" in header and f"{n_backward} backward" in header


def test_forward_only_graph_lists_no_backward_nodes():
    g = gc.Graph("fwd")
    x = g.input("x", (3,))
    gc.exp(x) * 2
    rows = str(g).splitlines()
    assert len(rows) == 1 + len(g.nodes) and not any(r.startswith("*") for r in rows[1:])


# ---- DOT ----------------------------------------------------------------------------------------

TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<arrow>->)|(?P<id>[A-Za-z_][\w.]*|-?\d+(?:\.\d+)?)'
                   r'|(?P<punct>[{}\[\];,=]))')


def tokenize(text):
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m and m.end() > pos, f"DOT syntax error near {text[pos:pos + 40]!r}"
        tokens.append(next((k, v) for k, v in m.groupdict().items() if v is not None))
        pos = m.end()
    return tokens


def parse_dot(text):
    """A small parser for the DOT subset a digraph listing needs: node, edge and default-attr
    statements with attribute lists. Returns (name, nodes: id -> attrs, edges: [(a, b, attrs)])."""
    toks = tokenize(text)
    i = 0

    def take(kind=None, value=None):
        nonlocal i
        k, v = toks[i]
        assert (kind is None or k == kind) and (value is None or v == value), (k, v, kind, value)
        i += 1
        return v

    def attrs():
        result = {}
        if i < len(toks) and toks[i] == ("punct", "["):
            take("punct", "[")
            while toks[i] != ("punct", "]"):
                key = take()
                take("punct", "=")
                result[key] = take()
                if toks[i] == ("punct", ","):
                    take()
            take("punct", "]")
        return result

    assert take("id") == "digraph"
    name = take() if toks[i][1] != "{" else None
    take("punct", "{")
    nodes, edges = {}, []
    while toks[i] != ("punct", "}"):
        first = take()
        if toks[i] == ("punct", "="):  # graph attribute: rankdir=TB
            take()
            take()
        elif toks[i][0] == "arrow":
            take("arrow")
            second = take()
            edges.append((first, second, attrs()))
        else:
            a = attrs()
            if first not in ("node", "edge", "graph"):
                nodes[first] = a
        take("punct", ";")
    take("punct", "}")
    assert i == len(toks), "text after the closing brace"
    return name, nodes, edges


def unquote(v):
    return v[1:-1] if v.startswith('"') else v


def test_to_dot_is_valid_and_marks_backward_nodes():
    g, loss, grads, lines = small_net()
    text = g.to_dot()
    assert text.count("{") == text.count("}")
    name, nodes, edges = parse_dot(text)
    assert unquote(name) == "net"
    assert len(nodes) == len(g.nodes)
    assert len(edges) == sum(len(n.inputs) for n in g.nodes)
    for a, b, _ in edges:
        assert a in nodes and b in nodes, f"edge {a} -> {b} uses an undeclared node"
    by_key = {f"n{n.id}": n for n in g.nodes}
    assert set(by_key) == set(nodes)
    forward_styles, backward_styles = set(), set()
    for key, attr in nodes.items():
        node = by_key[key]
        label = unquote(attr["label"])
        assert f"%{node.id} " in label
        assert "\\n" in label and "\\\\" not in label  # line breaks, not literal backslashes
        style = (unquote(attr.get("style", "")), unquote(attr.get("fillcolor", "")), unquote(attr.get("color", "")))
        if node.is_backward:
            assert f"grad of %{node.grad_of.id}" in label
            assert "dashed" in style[0]
            backward_styles.add(style)
        elif node.op not in ("input", "param"):
            forward_styles.add(style)
    assert backward_styles and forward_styles and not backward_styles & forward_styles


def test_to_dot_restricted_to_outputs():
    g, loss, grads, lines = small_net()
    _, nodes, edges = parse_dot(g.to_dot([loss]))
    forward = [n for n in g.nodes if not n.is_backward]
    assert set(nodes) == {f"n{n.id}" for n in g.ancestors([loss])}
    assert set(nodes) <= {f"n{n.id}" for n in forward}
    assert all(a in nodes and b in nodes for a, b, _ in edges)


def test_to_dot_escapes_quotes_in_names():
    g = gc.Graph('my "quoted" graph')
    x = g.input('x"1', (2,))
    gc.grad(gc.sum(x * x), x)
    name, nodes, edges = parse_dot(g.to_dot())
    assert name == r'"my \"quoted\" graph"'
    assert len(nodes) == len(g.nodes)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_graphviz_accepts_the_dot():
    g, loss, grads, lines = small_net()
    result = subprocess.run(["dot", "-Tsvg"], input=g.to_dot(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "<svg" in result.stdout
    plain = subprocess.run(["dot", "-Tplain"], input=g.to_dot(), capture_output=True, text=True, timeout=60)
    node_lines = [row for row in plain.stdout.splitlines() if row.startswith("node ")]
    assert len(node_lines) == len(g.nodes)
    assert all("\\n" in row and "\\\\n" not in row for row in node_lines)  # labels break lines


# ---- tensors ------------------------------------------------------------------------------------


def test_tensor_attributes():
    g = gc.Graph("attrs")
    x = g.input("x", [2, 3])
    y = g.input("y", (2,), dtype="int32")
    z = g.input("z", (2, 3), dtype=np.float64)
    h = gc.relu(x)
    assert x.shape == (2, 3) and isinstance(x.shape, tuple) and x.dtype == "float32" and x.name == "x"
    assert y.dtype == "int32" and z.dtype == "float64"
    assert h.graph is g and h.shape == (2, 3) and h.dtype == "float32"
    assert g.inputs == {"x": x, "y": y, "z": z} and g.params == {}


# ---- init_params ---------------------------------------------------------------------------------


def test_init_params_follows_the_contract():
    g = gc.Graph()
    g.input("x", (1, 3, 8, 8))
    shapes = {"conv.w": (64, 32, 3, 3), "conv.b": (64,), "fc.w": (512, 784), "fc.b": (512,), "scale": (7,)}
    for name, shape in shapes.items():
        g.param(name, shape)
    params = gc.init_params(g, seed=0)
    assert set(params) == set(shapes)
    for name, value in params.items():
        assert value.shape == shapes[name]
        assert value.dtype == np.float32
        assert value.flags["C_CONTIGUOUS"]
    for name in ("conv.b", "fc.b", "scale"):
        np.testing.assert_array_equal(params[name], 0.0)
    for name, fan_in in (("conv.w", 32 * 9), ("fc.w", 784)):
        v = params[name].astype(np.float64).ravel()
        std = np.sqrt(2.0 / fan_in)
        n = v.size
        assert abs(v.std() / std - 1) < 5 / np.sqrt(2 * n), (name, v.std(), std)
        assert abs(v.mean()) < 5 * std / np.sqrt(n)
        # normal, not uniform: 68.3% of values within one standard deviation (uniform: 57.7%)
        assert abs(np.mean(np.abs(v) < std) - 0.6827) < 0.02


def test_init_params_is_deterministic_per_seed():
    def build():
        g = gc.Graph()
        g.param("a", (20, 10))
        g.param("b", (5, 4, 3, 3))
        return g
    p0, p0_again, p1 = gc.init_params(build(), seed=0), gc.init_params(build(), seed=0), gc.init_params(build(), 1)
    for name in p0:
        np.testing.assert_array_equal(p0[name], p0_again[name])
        assert not np.array_equal(p0[name], p1[name])
