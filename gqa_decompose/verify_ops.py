"""Per-node verification of the companion ops: each node alone on ONNX Runtime CPU against its expansion.

For a node with a registered decomposer, two one-node models are built from it, the original
(in the domain ORT runs it under) and its expansion (the node through :class:`DecomposeOpsPass`).
Both run on ORT CPU with the same feeds: the node's constant inputs (initializers) as they are,
the decomposer's ``sample_feeds``, or random values by declared type and shape (a symbolic
dimension takes one size per name). Every read output is compared elementwise at the
decomposer's tolerance, NaN and infinities where they agree counting as equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from gqa_decompose.ops import Decomposer, OpContext, oracle_domain
from gqa_decompose.passes.decompose_ops import DecomposeOpsPass, find_op_nodes

__all__ = ["OpVerification", "one_node_model", "verify_op_node", "verify_ops"]

# Sizes for dimensions a node's declared shapes leave symbolic or unknown.
SYMBOLIC_DIM_SIZE = 3
MODEL_IR_VERSION = 10  # ORT 1.31 reads IR <= 13; 10 is safe everywhere


@dataclasses.dataclass(frozen=True)
class OpVerification:
    """One node's verdict: ``ok`` None when it could not be run (``detail`` says why)."""

    name: str
    domain: str
    op_type: str
    ok: bool | None
    max_abs_error: dict[str, float]
    detail: str = ""


def _read(value: ir.Value) -> bool:
    return value.name != "" and (bool(value.uses()) or value.is_graph_output())


def one_node_model(node: ir.Node, opset: int, domain: str | None = None) -> ir.Model:
    """A model of ``node`` alone: its inputs as graph inputs, its read outputs as graph outputs."""
    mapping: dict[ir.Value, ir.Value] = {}
    inputs: list[ir.Value | None] = []
    for value in node.inputs:
        if value is not None and value not in mapping:
            mapping[value] = ir.Value(name=value.name, type=value.type, shape=value.shape)
        inputs.append(None if value is None else mapping[value])
    copy = ir.Node(
        node.domain if domain is None else domain,
        node.op_type,
        inputs,
        attributes=list(node.attributes.values()),
        num_outputs=len(node.outputs),
        name=node.name,
    )
    outputs = []
    for old, new in zip(node.outputs, copy.outputs):
        new.name = old.name if _read(old) else ""
        new.type, new.shape = old.type, old.shape
        if _read(old):
            outputs.append(new)
    graph = ir.Graph(
        list(mapping.values()), outputs, nodes=[copy], opset_imports={"": opset, "com.microsoft": 1}, name="node"
    )
    return ir.Model(graph, ir_version=MODEL_IR_VERSION)


def _random_feed(value: ir.Value, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    if value.shape is None or value.dtype is None:
        raise ValueError(f"input '{value.name}' has no declared type and shape")
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        else:
            dims.append(sizes.setdefault(dim.value, SYMBOLIC_DIM_SIZE) if dim.value else SYMBOLIC_DIM_SIZE)
    dtype = value.dtype.numpy()
    if value.dtype.is_floating_point():
        return rng.standard_normal(dims).astype(dtype)
    if value.dtype == ir.DataType.BOOL:
        return rng.integers(0, 2, dims).astype(bool)
    return rng.integers(0, 4, dims).astype(dtype)


def _feeds(node: ir.Node, decomposer: Decomposer, spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    given = decomposer.sample_feeds(node, spec, rng) or {}
    feeds, sizes = {}, {}
    for value in node.inputs:
        if value is None or value.name in feeds:
            continue
        if value.name in given:
            feeds[value.name] = given[value.name]
        elif value.const_value is not None:
            feeds[value.name] = value.const_value.numpy()
        else:
            feeds[value.name] = _random_feed(value, sizes, rng)
    return feeds


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _compare(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> tuple[bool, float]:
    if expected.shape != got.shape:
        return False, float("inf")
    expected, got = expected.astype(np.float64), got.astype(np.float64)
    same = (expected == got) | (np.isnan(expected) & np.isnan(got))
    diff = np.where(same, 0.0, np.abs(expected - got))
    diff = np.nan_to_num(diff, nan=np.inf)
    error = float(diff.max()) if diff.size else 0.0
    return bool(np.all(diff <= atol + rtol * np.abs(np.nan_to_num(expected)))), error


def verify_op_node(
    node: ir.Node,
    decomposer: Decomposer,
    opset: int,
    rng: np.random.Generator | None = None,
    runtime_profile: str = "portable",
) -> OpVerification:
    """``node`` (in any model) alone on ORT CPU against its expansion for ``runtime_profile``."""
    rng = rng or np.random.default_rng(0)
    spec = decomposer.parse(node, OpContext(opset, runtime_profile=runtime_profile))
    feeds = _feeds(node, decomposer, spec, rng)
    verdict = dict(name=node.name or "", domain=node.domain, op_type=node.op_type)
    expanded = one_node_model(node, opset)
    DecomposeOpsPass(ops={node.op_type}, runtime_profile=runtime_profile)(expanded)
    names = [value.name for value in expanded.graph.outputs]
    try:
        expected = _run(one_node_model(node, opset, oracle_domain(decomposer)), feeds)
    except Exception as error:  # ORT has no CPU kernel, or refuses these feeds
        reference = getattr(decomposer, "reference", None)
        if reference is None:
            return OpVerification(
                **verdict,
                ok=None,
                max_abs_error={},
                detail=f"ORT CPU cannot run the original: {str(error).splitlines()[0]}",
            )
        expected = reference(node, spec, feeds)
    got = _run(expanded, feeds)
    errors, ok = {}, True
    for name, value, want, have in zip(names, expanded.graph.outputs, expected, got):
        tolerance = decomposer.tolerance(spec, value.dtype or ir.DataType.FLOAT)
        matched, errors[name] = _compare(np.asarray(want), np.asarray(have), tolerance.atol, tolerance.rtol)
        ok = ok and matched
    return OpVerification(**verdict, ok=ok, max_abs_error=errors)


def verify_ops(
    model: ir.Model, ops: Collection[str] | None = None, seed: int = 0, runtime_profile: str = "portable"
) -> list[OpVerification]:
    """Every companion-op node of ``model`` (of ``ops``, None: all) verified alone, in model order, as
    expanded for ``runtime_profile``. ``model`` is not modified: the nodes are typed on a clone, for a model
    whose value_info does not declare their inputs."""
    from gqa_decompose.passes.infer_types import InferGqaTypesPass

    model = model.clone()  # tensors are shared, so no weight is read
    InferGqaTypesPass()(model)
    rng = np.random.default_rng(seed)
    return [
        verify_op_node(item.node, item.decomposer, item.opset, rng, runtime_profile)
        for item in find_op_nodes(model, ops)
    ]
