"""The graph IR: a Graph is an append-only DAG of Tensors, one Tensor per node.

A node has an op name, input nodes, hashable attrs and one typed output (static shape, dtype).
Nodes are created in topological order (an op's inputs exist before it), so a graph's node list
is always a valid schedule; graph algorithms beyond that go through `to_networkx()`.

Every node records its provenance: `site`, the user's `file:line` that built it, and `grad_of`,
the forward node whose gradient it helps compute (None for forward nodes).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any, Iterable

import networkx as nx
import numpy as np

from graphc.core.errors import ShapeError, at_user_line, user_site

FLOAT_DTYPES = ("float32", "float64")
INT_DTYPES = ("int32", "int64")
SOURCE_OPS = ("input", "param", "constant", "fill")


def normalize_dtype(dtype, what: str = "dtype") -> str:
    """A graphc dtype's numpy name. None is refused: numpy would read it as float64."""
    try:
        name = np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        name = None
    if name is None:
        raise TypeError(at_user_line(f"{what}: {dtype!r} is not a dtype; graphc tensors are one of "
                                     f"{FLOAT_DTYPES + INT_DTYPES}"))
    if name not in FLOAT_DTYPES + INT_DTYPES:
        raise ValueError(at_user_line(f"{what}: unsupported dtype {name!r}: graphc tensors are one of "
                                      f"{FLOAT_DTYPES + INT_DTYPES}"))
    return name


# ---- arguments: the one place that says what an int, a shape and a finite float are ----------------


def is_int(value) -> bool:
    """A Python or numpy integer. Never a bool: True would silently become the dimension 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_int(value, what: str) -> int:
    """`value` as a Python int, or TypeError naming `what` (a float is refused, not truncated)."""
    if not is_int(value):
        raise TypeError(at_user_line(f"{what} must be an int, got {value!r} ({type(value).__name__})"))
    return int(value)


def as_int_tuple(values, what: str) -> tuple[int, ...]:
    """A sequence of ints (a shape, axes) as a tuple of Python ints, or TypeError naming `what`."""
    if not (isinstance(values, Sequence) and not isinstance(values, (str, bytes))
            or isinstance(values, np.ndarray) and values.ndim == 1):
        # a set would have no order, a string only digits; an int is not a shape in torch either
        raise TypeError(at_user_line(f"{what} must be a tuple of ints, got {values!r}"))
    values = tuple(values)
    for value in values:
        if not is_int(value):
            raise TypeError(at_user_line(f"{what} must be a tuple of ints, got {values!r}: "
                                         f"{value!r} is a {type(value).__name__}"))
    return tuple(int(v) for v in values)


def as_finite_float(value, what: str) -> float:
    """A real number (Python or numpy, not a bool) as a finite Python float; TypeError or ValueError naming `what`."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(at_user_line(f"{what} must be a number, got {value!r} ({type(value).__name__})"))
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(at_user_line(f"{what} must be finite, got {value!r}"))
    return value


def as_bool(value, what: str) -> bool:
    """A flag: True or False (numpy's too); any other truthy value is more likely a mistake."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(at_user_line(f"{what} must be True or False, got {value!r} ({type(value).__name__})"))
    return bool(value)


def normalize_shape(shape, what: str) -> tuple[int, ...]:
    """A declared shape as a tuple of Python ints, each >= 1.

    An empty dimension would reach the code generator as a zero-sized GEMM or a division by a
    batch of 0, so it is refused where the user wrote it."""
    dims = as_int_tuple(shape, f"{what}: shape")
    if any(d < 1 for d in dims):
        raise ShapeError(at_user_line(f"{what}: graphc compiles static shapes with every dimension >= 1, "
                                      f"got shape {dims}"))
    return dims


def constant_array(value, dtype, what: str) -> np.ndarray:
    """`value` as an array of a graphc dtype: float32 or int32 unless `dtype` says otherwise.

    Every value must survive the cast: an int beyond int32 would wrap, 1.5 would become 1 and
    1e300 would become inf, each silently."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(at_user_line(f"{what}: values must be ints or floats, got {_short_repr(value)} "
                                     f"({array.dtype})"))
    if array.dtype.kind == "b" and dtype is None:
        raise TypeError(at_user_line(f"{what}: graphc has no bool tensors; give a dtype= for {_short_repr(value)}"))
    target = normalize_dtype(dtype if dtype is not None else np.float32 if array.dtype.kind == "f" else np.int32, what)
    with np.errstate(invalid="ignore", over="ignore"):
        converted = array.astype(target)
        changed = _changed_by_cast(array, converted)
    if changed.any():
        offender = array[changed].flat[0].item()
        raise ValueError(at_user_line(f"{what}: value {offender!r} cannot be held exactly as {target}"
                                      f"{' (it overflows)' if converted.dtype.kind == 'f' else ''}"))
    return converted


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _changed_by_cast(source: np.ndarray, converted: np.ndarray) -> np.ndarray:
    """Where a cast lost a value: wrapped or truncated ints, finite floats become infinite.

    Rounding a float64 to float32 is the cast's purpose, not a loss."""
    if converted.dtype.kind != "f":
        return converted.astype(source.dtype) != source
    if source.dtype.kind != "f":
        return np.zeros(source.shape, bool)  # ints and bools fit float32's range
    return np.isfinite(source) & ~np.isfinite(converted)


class ConstArray:
    """A numpy array held as a node attribute: hashable by content, so CSE can merge equal constants."""

    __slots__ = ("array", "_digest")

    def __init__(self, array: np.ndarray):
        # a private C-ordered copy: np.ascontiguousarray would turn a 0-d array 1-d, and would
        # share (then freeze) a caller's array
        self.array = np.array(array, order="C", copy=True)
        self.array.setflags(write=False)
        h = hashlib.sha256(self.array.tobytes())
        h.update(repr((self.array.shape, self.array.dtype.str)).encode())
        self._digest = h.hexdigest()

    @property
    def digest(self) -> str:
        """sha256 of the array's bytes, shape and dtype."""
        return self._digest

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, ConstArray) and other._digest == self._digest

    def __repr__(self):
        if self.array.size <= 4:
            return np.array2string(self.array, separator=",")
        return f"<{self.array.dtype}{list(self.array.shape)} {self._digest[:8]}>"


class Tensor:
    """A node of a Graph and the value it produces."""

    __slots__ = ("graph", "id", "op", "inputs", "attrs", "shape", "dtype", "name", "site", "grad_of", "origin",
                 "__weakref__")

    def __init__(self, graph, id, op, inputs, attrs, shape, dtype, name, site, grad_of, origin=None):
        self.graph = graph
        self.id = id
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.shape = shape
        self.dtype = dtype
        self.name = name
        self.site = site
        self.grad_of = grad_of
        # For a node a rebuild (an optimization pass) made: the node of the graph before that it
        # was made for. Followed back, it maps an optimized node to the one the user wrote.
        self.origin = origin

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_backward(self) -> bool:
        return self.grad_of is not None

    @property
    def T(self) -> "Tensor":
        from graphc.core.ops.shape import transpose
        return transpose(self)

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        return f"<Tensor %{self.id} {self.op}{label} {self.dtype}{list(self.shape)}>"

    # Arithmetic with numpy broadcasting; Python scalars become constants of the expression.
    def __add__(self, other): return _ew().add(self, other)
    def __radd__(self, other): return _ew().add(other, self)
    def __sub__(self, other): return _ew().sub(self, other)
    def __rsub__(self, other): return _ew().sub(other, self)
    def __mul__(self, other): return _ew().mul(self, other)
    def __rmul__(self, other): return _ew().mul(other, self)
    def __truediv__(self, other): return _ew().div(self, other)
    def __rtruediv__(self, other): return _ew().div(other, self)
    def __pow__(self, exponent): return _ew().power(self, exponent)
    def __neg__(self): return _ew().neg(self)

    def __matmul__(self, other):
        from graphc.core.ops.linalg import matmul
        return matmul(self, other)

    def __rmatmul__(self, other):
        from graphc.core.ops.linalg import matmul
        return matmul(other, self)

    # Tensors are graph nodes: identity is equality (networkx and dicts rely on it).
    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError("a graphc Tensor is symbolic and has no truth value; evaluate it first")


def _ew():
    from graphc.core.ops import elementwise
    return elementwise


_graph_collectors: list[list] = []


@contextlib.contextmanager
def collect_graphs():
    """Yields a list that receives every Graph created inside the block (for `graphc show`)."""
    created: list = []
    _graph_collectors.append(created)
    try:
        yield created
    finally:
        _graph_collectors.remove(created)


class Graph:
    """A static computation graph: inputs, trainable params, and the ops between them."""

    def __init__(self, name: str = "graph"):
        for collector in _graph_collectors:
            collector.append(self)
        self.name = name
        self.nodes: list[Tensor] = []
        self.inputs: dict[str, Tensor] = {}
        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        # name -> the constant a param or buffer starts at (`init=`); others follow init_params' rule
        self.initial_values: dict[str, float] = {}
        # In-place writes of buffers by the ops that own them (batch norm's running statistics)
        self.buffer_updates: list[BufferUpdate] = []
        # The source of every random mask: [seed, call index], supplied by whoever runs the graph
        self.random_key: Tensor | None = None
        self._grad_of_stack: list[Tensor] = []

    # ---- declaring sources -------------------------------------------------------------
    def input(self, name: str, shape, dtype="float32") -> Tensor:
        """A value fed at every call (a minibatch, its labels)."""
        return self._source("input", self.inputs, name, shape, dtype)

    def param(self, name: str, shape, dtype="float32", init=None) -> Tensor:
        """A trainable parameter; its values live outside the graph (see `gc.init_params`).

        `init`: None for init_params' rule (He-normal, zeros for 1-D), or a float to fill with."""
        if init is not None:
            init = self._initial_value(init, f"param {name!r}", dtype)
        node = self._source("param", self.params, name, shape, dtype)
        if init is not None:
            self.initial_values[node.name] = init
        return node

    def buffer(self, name: str, shape, init=0.0) -> Tensor:
        """Non-trainable float32 state (batch norm's running statistics), updated in place by
        the op that owns it; held with the params, by name (see `gc.init_params`)."""
        init = self._initial_value(init, f"buffer {name!r}", "float32")
        node = self._source("param", self.buffers, name, shape, "float32", kind="buffer")
        self.initial_values[node.name] = init
        return node

    def bound_sources(self) -> dict[str, Tensor]:
        """Every source bound from outside rather than fed: params, buffers, the random key."""
        key = {self.random_key.name: self.random_key} if self.random_key is not None else {}
        return {**self.params, **self.buffers, **key}

    def has_name(self, name: str) -> bool:
        return name in self.inputs or name in self.params or name in self.buffers or (
            self.random_key is not None and name == self.random_key.name)

    def random_key_node(self) -> Tensor:
        """The graph's random key: int32 [seed, call index], one per graph, made on first use."""
        if self.random_key is None:
            name = "rng:key"
            while self.has_name(name):
                name += "'"
            self.random_key = self.add_node("param", [], {}, (2,), "int32", name=name, site="<graphc>")
        return self.random_key

    def update_buffer(self, buffer: Tensor, value: Tensor, owner: Tensor) -> None:
        """Record that evaluating `owner` writes `value` into `buffer` (as torch's in-place update)."""
        if buffer.graph is not self or buffer.op != "param" or self.buffers.get(buffer.name) is not buffer:
            raise ValueError(at_user_line(f"{buffer!r} is not a buffer of graph {self.name!r}"))
        if value.shape != buffer.shape or value.dtype != buffer.dtype:
            raise ShapeError(at_user_line(f"the update of buffer {buffer.name!r} {buffer.dtype}{list(buffer.shape)} "
                                          f"has shape {value.shape} {value.dtype}"))
        self.buffer_updates.append(BufferUpdate(owner, buffer, value))

    def buffer_updates_for(self, outputs: Iterable[Tensor]) -> list["BufferUpdate"]:
        """The buffer writes that computing `outputs` makes: those whose owner they depend on.

        Two owners updating one buffer in one evaluation would leave it to the order of the
        writes: refused, naming both."""
        needed = {node.id for node in self.ancestors(outputs)}
        updates = [u for u in self.buffer_updates if u.owner.id in needed]
        writers: dict[str, BufferUpdate] = {}
        for update in updates:
            earlier = writers.setdefault(update.buffer.name, update)
            if earlier is not update:
                raise ValueError(f"buffer {update.buffer.name!r} would be updated twice by one evaluation: "
                                 f"by %{earlier.owner.id} {earlier.owner.op} (at {earlier.owner.site}) and by "
                                 f"%{update.owner.id} {update.owner.op} (at {update.owner.site})")
        return updates

    @staticmethod
    def _initial_value(init, what: str, dtype) -> float:
        """`init=` checked before anything is declared: a refused one leaves the name free."""
        init = as_finite_float(init, f"{what}: init")
        if normalize_dtype(dtype, what) not in FLOAT_DTYPES:
            raise ValueError(at_user_line(f"{what}: init= needs a float tensor, not {normalize_dtype(dtype, what)}"))
        return init

    def constant(self, value, dtype=None, name: str | None = None) -> Tensor:
        """A fixed array baked into the graph (e.g. a fixed filter bank)."""
        what = f"constant {name!r}" if name else "constant"
        array = constant_array(value, dtype, what)
        shape = normalize_shape(array.shape, what)
        return self.add_node("constant", [], {"value": ConstArray(array)}, shape, array.dtype.name, name=name)

    def _source(self, op, table, name, shape, dtype, kind=None) -> Tensor:
        kind = kind or op
        if not isinstance(name, str):
            raise TypeError(at_user_line(f"{kind} name must be a string, got {name!r}"))
        if not name:
            raise ValueError(at_user_line(f"{kind} name must be a non-empty string, got {name!r}"))
        if self.has_name(name):
            raise ValueError(at_user_line(f"graph {self.name!r} already has an input, param or buffer named {name!r}"))
        what = f"{kind} {name!r}"
        node = self.add_node(op, [], {}, normalize_shape(shape, what), normalize_dtype(dtype, what), name=name)
        table[name] = node
        return node

    # ---- adding nodes ------------------------------------------------------------------
    def add_node(self, op: str, inputs: list[Tensor], attrs: dict[str, Any], shape, dtype: str,
                 name: str | None = None, site: str | None = None) -> Tensor:
        """Append a node. Ops call this after their type rule has accepted the operands."""
        grad_of = self._grad_of_stack[-1] if self._grad_of_stack else None
        node = Tensor(self, len(self.nodes), op, tuple(inputs), dict(attrs), tuple(shape), dtype,
                      name, site or user_site(), grad_of)
        self.nodes.append(node)
        return node

    @contextlib.contextmanager
    def building_gradient_of(self, forward: Tensor):
        """Nodes created inside this block are marked as computing the gradient of `forward`."""
        self._grad_of_stack.append(forward)
        try:
            yield
        finally:
            self._grad_of_stack.pop()

    # ---- graph algorithms --------------------------------------------------------------
    def to_networkx(self) -> nx.MultiDiGraph:
        """The graph as networkx: node ids, one edge per operand use (an op may use a value twice)."""
        dg = nx.MultiDiGraph()
        for node in self.nodes:
            dg.add_node(node.id, tensor=node)
            for index, operand in enumerate(node.inputs):
                dg.add_edge(operand.id, node.id, operand_index=index)
        return dg

    def ancestors(self, outputs: Iterable[Tensor]) -> list[Tensor]:
        """Every node `outputs` depend on, outputs included, in topological order."""
        # Nodes are stored in topological order, so one backward sweep marks every ancestor:
        # linear in the graph's size however many outputs there are.
        needed = {out.id for out in outputs}
        for node in reversed(self.nodes):
            if node.id in needed:
                needed.update(operand.id for operand in node.inputs)
        return [self.nodes[i] for i in sorted(needed)]

    # ---- inspection --------------------------------------------------------------------
    def __str__(self) -> str:
        from graphc.core.display import listing
        return listing(self)

    def __repr__(self) -> str:
        buffers = f", {len(self.buffers)} buffers" if self.buffers else ""
        return (f"<Graph {self.name!r}: {len(self.nodes)} nodes, {len(self.inputs)} inputs, "
                f"{len(self.params)} params{buffers}>")

    def to_dot(self, outputs: Iterable[Tensor] | None = None) -> str:
        """Graphviz DOT text; backward nodes are drawn distinctly from forward ones."""
        from graphc.core.display import to_dot
        return to_dot(self, outputs)


class BufferUpdate:
    """`value` is written into `buffer` whenever `owner` is evaluated."""

    __slots__ = ("owner", "buffer", "value")

    def __init__(self, owner: Tensor, buffer: Tensor, value: Tensor):
        self.owner, self.buffer, self.value = owner, buffer, value

    def __repr__(self):
        return f"<BufferUpdate {self.buffer.name!r} <- %{self.value.id} by %{self.owner.id} {self.owner.op}>"


def check_same_graph(op: str, tensors: list[Tensor]) -> Graph:
    graphs = {id(t.graph) for t in tensors}
    if len(graphs) != 1:
        raise ShapeError(f"{op}: operands belong to different graphs (at {user_site()})")
    return tensors[0].graph
