"""Test harness for one Decomposer: one-node model -> expanded model -> both on ORT CPU, compared.

Generic over the protocol in ``gqa_decompose.ops.base``: it calls ``parse``, ``expand``,
``sample_feeds`` and ``tolerance`` exactly as a pass would, and checks that the expansion is
standard ONNX (no custom domain, ``onnx.checker`` full check) before comparing numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common  # noqa: F401  (ir.passes.common is used below; importing onnx_ir alone does not load it)
import onnxruntime as ort
from onnx import helper

from gqa_decompose.expansion.builder import OpBuilder
from gqa_decompose.ops.base import Decomposer, OpContext

IR_VERSION = 10


def one_node_model(
    op_type: str,
    inputs: Sequence[tuple[str, np.ndarray] | None],
    outputs: Sequence[tuple[str, int, Sequence[int | str | None]]],
    *,
    constants: Sequence[str] = (),
    opset: int = 21,
    domain: str = "com.microsoft",
    input_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
    **attributes,
) -> onnx.ModelProto:
    """A model of one ``domain::op_type`` node; inputs named in ``constants`` are initializers.

    ``inputs``: (name, example array) per position, None for an absent optional input; the array gives
    a graph input its type and (unless ``input_shapes`` says otherwise) its shape.
    ``outputs``: (name, onnx elem type, shape) (the checker needs output shapes; dims may be symbolic).
    """
    names, graph_inputs, initializers = [], [], []
    for entry in inputs:
        if entry is None:
            names.append("")
            continue
        name, array = entry
        names.append(name)
        if name in constants:
            initializers.append(onnx.numpy_helper.from_array(array, name=name))
        else:
            shape = (input_shapes or {}).get(name, array.shape)
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, elem, shape))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(
        op_type, names, [n for n, _, _ in outputs], name=f"{op_type}_0", domain=domain, **attributes
    )
    graph = helper.make_graph(
        [node],
        f"{op_type}_node",
        graph_inputs,
        [helper.make_tensor_value_info(n, t, shape) for n, t, shape in outputs],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)


@dataclasses.dataclass
class Expanded:
    model: onnx.ModelProto
    spec: object
    sampled_feeds: dict[str, np.ndarray] | None  # the decomposer's sample_feeds, asked before the rewrite


def expand_model(original: onnx.ModelProto, decomposer: Decomposer, rng: np.random.Generator) -> Expanded:
    """The model with its one contrib node replaced by the decomposer's expansion."""
    model = ir.serde.deserialize_model(original)
    opset = model.opset_imports[""]
    graph = model.graph
    node = next(n for n in graph if n.domain == decomposer.domain and n.op_type == decomposer.op_type)
    spec = decomposer.parse(node, OpContext(opset=opset, container=graph))
    sampled = decomposer.sample_feeds(node, spec, rng)
    op = OpBuilder(node.name or decomposer.op_type, opset)
    outputs = decomposer.expand(op, node, spec)
    ir.convenience.replace_nodes_and_values(
        graph, node, [node], op.take_nodes(), list(node.outputs), [v for v in outputs if v is not None]
    )
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.opset_imports.pop(decomposer.domain, None)
    proto = ir.serde.serialize_model(model)
    return Expanded(proto, spec, sampled)


def assert_standard(model: onnx.ModelProto) -> None:
    """Only default-domain ops, and the full ONNX checker passes."""
    foreign = {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    assert not foreign, f"non-standard ops left: {foreign}"
    onnx.checker.check_model(model, full_check=True)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, optimize: bool = True) -> list[np.ndarray]:
    """The model's outputs on ORT CPU; ``optimize=False`` keeps ORT from fusing the expansion back."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal (or small integer) feeds from the declared graph inputs, symbolic dims as 3."""
    feeds = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


@dataclasses.dataclass
class Comparison:
    expanded: Expanded
    expected: list[np.ndarray]
    got: list[np.ndarray]
    max_errors: list[float]


def compare(
    decomposer: Decomposer,
    original: onnx.ModelProto,
    *,
    seed: int = 0,
    feeds: Mapping[str, np.ndarray] | None = None,
    optimize: bool = True,
) -> Comparison:
    """Expand, check standardness, run both on ORT CPU and assert the decomposer's tolerance holds."""
    rng = np.random.default_rng(seed)
    expanded = expand_model(original, decomposer, rng)
    assert_standard(expanded.model)
    if feeds is None:
        feeds = expanded.sampled_feeds or random_feeds(original, rng)
    expected = run(original, feeds)
    got = run(expanded.model, feeds, optimize=optimize)
    errors = []
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert want.shape == have.shape and want.dtype == have.dtype, (index, want.shape, have.shape, have.dtype)
        tolerance = decomposer.tolerance(expanded.spec, ir.DataType.from_numpy(want.dtype))
        want64, have64 = want.astype(np.float64), have.astype(np.float64)
        error = np.abs(want64 - have64)
        errors.append(float(error.max()) if error.size else 0.0)
        bound = tolerance.atol + tolerance.rtol * np.abs(want64)
        assert np.all(error <= bound), f"output {index}: max error {error.max()} over tolerance {tolerance}"
    return Comparison(expanded, expected, got, errors)


def decompose_all(model: ir.Model, decomposer: Decomposer) -> int:
    """Replace every node of the decomposer's op in the main graph (a stand-in for the pipeline's pass)."""
    opset = model.opset_imports[""]
    count = 0
    for node in list(model.graph):
        if node.domain != decomposer.domain or node.op_type != decomposer.op_type:
            continue
        spec = decomposer.parse(node, OpContext(opset=opset, container=model.graph))
        op = OpBuilder(node.name, opset)
        outputs = decomposer.expand(op, node, spec)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], op.take_nodes(), node.outputs, outputs)
        count += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


def builder_feeds(
    model: onnx.ModelProto, tokens: Sequence[int], cache_shapes: Mapping[str, tuple[int, int, int]] | None = None
) -> dict[str, np.ndarray]:
    """Prefill feeds for an onnxruntime-genai builder model: input_ids, attention_mask, a zero past.

    ``cache_shapes``: (kv heads, head size, rows) per past input (tests/test_real_producers.py's
    ``_cache_shapes``); default an empty past of head size 16.
    """
    feeds = {"input_ids": np.array([tokens], np.int64), "attention_mask": np.ones((1, len(tokens)), np.int64)}
    for value in model.graph.input:
        if value.name.startswith("past_key_values"):
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            heads, head_size, rows = (cache_shapes or {}).get(value.name, (dims[1], 16, 0))
            elem = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feeds[value.name] = np.zeros((1, heads, rows, head_size), elem)
    return feeds
