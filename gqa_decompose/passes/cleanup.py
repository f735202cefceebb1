"""Clean-up scoped to what the rewrite emitted: nothing the rewrite does not own changes.

onnx-ir's CommonSubexpressionEliminationPass, RemoveUnusedNodesPass and
NameFixPass work on the whole model: they would merge or drop a model's own
nodes and initializers, trim its nodes' trailing empty inputs and name its
empty optional outputs (``''`` -> ``v``, ``v_1``; onnxruntime-web's WebNN
provider then refuses those nodes). The passes here apply the same rules to the
emitted nodes only (the nodes inside an emitted If's branches included), and
``KeepInterface`` puts back the graph's input and output declarations, which
shape inference would otherwise rewrite.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

import onnx_ir as ir

from gqa_decompose.passes.graph_queries import with_branches
from gqa_decompose.spec import GQA_DOMAIN

__all__ = ["DropGqaImportPass", "EmittedCsePass", "FixEmittedNamesPass", "KeepInterface", "RemoveUnusedEmittedPass"]

EmittedNodes = Callable[[], Iterable[ir.Node]]

# onnx-ir's CSE default: larger constants are not merged.
_CSE_SIZE_LIMIT = 10


def _containers(model: ir.Model) -> list[ir.Graph | ir.Function]:
    containers: list[ir.Graph | ir.Function] = [model.graph, *model.graph.subgraphs()]
    for function in model.functions.values():
        containers.extend([function, *function.subgraphs()])
    return containers


def _cse_key(node: ir.Node) -> tuple | None:
    """What makes two nodes compute the same (onnx-ir's CSE rule); None when a node is never merged."""
    if node.domain == "" and node.op_type in (
        "RandomUniform",
        "RandomNormal",
        "RandomUniformLike",
        "RandomNormalLike",
        "Multinomial",
    ):
        return None
    attributes = []
    for name, attr in node.attributes.items():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return None
        value = attr.value
        if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            value = tuple(value)
        elif attr.type == ir.AttributeType.TENSOR:
            if value.size > _CSE_SIZE_LIMIT:
                return None
            array = value.numpy()
            value = (array.shape, str(array.dtype), array.tobytes())
        attributes.append((name, value))
    return node.op_identifier(), len(node.outputs), tuple(id(v) for v in node.inputs), tuple(sorted(attributes))


class EmittedCsePass(ir.passes.InPlacePass):
    """Merge emitted nodes of the main graph into an earlier node that computes the same thing (the
    per-layer constants, anything two layers compute alike, a model's own constants). A model's own
    nodes are never removed: only their outputs gain readers."""

    def __init__(self, emitted: EmittedNodes) -> None:
        super().__init__()
        self._emitted = emitted

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        emitted = set(self._emitted())
        seen: dict[tuple, ir.Node] = {}
        modified = False
        for node in list(model.graph):
            key = _cse_key(node)
            if key is None:
                continue
            kept = seen.setdefault(key, node)
            if kept is node or node not in emitted or any(value.is_graph_output() for value in node.outputs):
                continue
            ir.convenience.replace_all_uses_with(node.outputs, kept.outputs)
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


class RemoveUnusedEmittedPass(ir.passes.InPlacePass):
    """Remove emitted nodes whose outputs nothing reads (a model's own nodes and initializers stay,
    read or not)."""

    def __init__(self, emitted: EmittedNodes) -> None:
        super().__init__()
        self._emitted = emitted

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        emitted = with_branches(self._emitted())
        removed = 0
        for container in _containers(model):
            outputs = frozenset(container.outputs)
            for node in reversed(list(container)):
                if node not in emitted:
                    continue
                if any(value in outputs or value.uses() for value in node.outputs):
                    _trim_trailing_empty_inputs(node)
                    continue
                container.remove(node, safe=True)
                removed += 1
        return ir.passes.PassResult(model, modified=bool(removed))


def _trim_trailing_empty_inputs(node: ir.Node) -> None:
    count = len(node.inputs)
    while count and node.inputs[count - 1] is None:
        count -= 1
    if count != len(node.inputs):
        node.resize_inputs(count)


class FixEmittedNamesPass(ir.passes.InPlacePass):
    """Unique names for emitted nodes and values (expansion names derive from GQA node names, which
    models do not always keep unique, and every graph's shared subgraph is ``gqa_shared/...``).

    A name already taken gets ``_<k>`` appended, as onnx-ir's NameFixPass does; only emitted nodes and
    the values they produce are renamed. Names are unique per namespace: the main graph with its
    subgraphs, and each function with its own.
    """

    def __init__(self, emitted: EmittedNodes) -> None:
        super().__init__()
        self._emitted = emitted

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        emitted = with_branches(self._emitted())
        modified = False
        namespaces: list[list[ir.Graph | ir.Function]] = [[model.graph, *model.graph.subgraphs()]]
        namespaces.extend([function, *function.subgraphs()] for function in model.functions.values())
        for namespace in namespaces:
            modified |= _fix_names(namespace, emitted)
        return ir.passes.PassResult(model, modified=modified)


def _fix_names(namespace: list[ir.Graph | ir.Function], emitted: set[ir.Node]) -> bool:
    value_names: set[str] = set()
    node_names: set[str] = set()
    for container in namespace:
        value_names.update(v.name for v in container.inputs if v.name)
        value_names.update(v.name for v in container.outputs if v.name and v.producer() not in emitted)
        if isinstance(container, ir.Graph):
            value_names.update(name for name in container.initializers if name)
        for node in container:
            if node not in emitted:
                node_names.add(node.name or "")
                value_names.update(v.name for v in node.outputs if v.name)
    node_counter: collections.Counter[str] = collections.Counter()
    value_counter: collections.Counter[str] = collections.Counter()
    modified = False
    for container in namespace:
        for node in container:
            if node not in emitted:
                continue
            name = _unique(node.name or "node", node_names, node_counter)
            modified |= name != node.name
            node.name = name
            for value in node.outputs:
                if not value.name and not value.uses() and not value.is_graph_output():
                    continue  # an empty optional output stays empty
                name = _unique(value.name or "v", value_names, value_counter)
                modified |= name != value.name
                value.name = name
    return modified


def _unique(preferred: str, used: set[str], counter: collections.Counter[str]) -> str:
    name = preferred
    while name in used:
        counter[preferred] += 1
        name = f"{preferred}_{counter[preferred]}"
    used.add(name)
    return name


class DropGqaImportPass(ir.passes.InPlacePass):
    """Drop the com.microsoft opset import (of the model, of a function) once nothing there uses it.

    onnx-ir's RemoveUnusedOpsetsPass would also drop any other import the model declares and
    does not use; those are the model's own.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        scopes: list[tuple[ir.Graph | ir.Function, set[str]]] = [
            (model.graph, {function.domain for function in model.functions.values()})
        ]
        scopes.extend((function, set()) for function in model.functions.values())
        for scope, used in scopes:
            used |= {node.domain for node in ir.traversal.RecursiveGraphIterator(scope)}
            if GQA_DOMAIN in scope.opset_imports and GQA_DOMAIN not in used:
                del scope.opset_imports[GQA_DOMAIN]
                modified = True
        return ir.passes.PassResult(model, modified=modified)


class KeepInterface:
    """The graph's input and output declarations (type and shape, by position) as they were.

    ``remember`` runs first in the pipeline and ``restore`` last; in between, shape inference may
    re-declare an output from what it infers.
    """

    def __init__(self) -> None:
        self._inputs: list[tuple[ir.TypeProtocol | None, ir.Shape | None]] = []
        self._outputs: list[tuple[ir.TypeProtocol | None, ir.Shape | None]] = []
        self.remember = _Callback(self._remember)
        self.restore = _Callback(self._restore)

    def _remember(self, model: ir.Model) -> None:
        self._inputs = [(v.type, v.shape) for v in model.graph.inputs]
        self._outputs = [(v.type, v.shape) for v in model.graph.outputs]

    def _restore(self, model: ir.Model) -> None:
        for values, declared in ((model.graph.inputs, self._inputs), (model.graph.outputs, self._outputs)):
            for value, (type_, shape) in zip(values, declared):
                value.type, value.shape = type_, shape


class _Callback(ir.passes.InPlacePass):
    def __init__(self, function: Callable[[ir.Model], None]) -> None:
        super().__init__()
        self._function = function

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._function(model)
        return ir.passes.PassResult(model, modified=False)
