"""Whether a model's default-domain opset import can be raised to 23 without changing any of its ops.

The Attention op exists from opset 23. Raising a model's opset import re-reads
every other node under the newer definition of its op; that is only a no-op
when no op the model uses changed meaning in between. Checked node by node:

* an ONNX op whose definition is the same at both opsets: fine;
* an ONNX op whose newer definitions between the two only widened its type
  lists or added attributes whose defaults keep the old behaviour (opset 21:
  int4/uint4; 22: bfloat16; 23: float4e2m1, QuantizeLinear ``precision`` and
  DequantizeLinear ``output_dtype`` defaulting to the old rule; ONNX Changelog):
  fine, after checking its inputs, outputs and old attributes are unchanged;
* GroupNormalization-21 changed the meaning of scale and bias: refused;
* an op ONNX does not define (ONNX Runtime's SimplifiedLayerNormalization in
  the default domain): fine when ONNX Runtime registers one definition for
  both opsets;
* anything else, and models below opset 20 (Reduce*-18, Pad-18/19 changed
  inputs): refused, with the op named.
"""

from __future__ import annotations

import functools

import onnx
import onnx_ir as ir

from gqa_decompose.opsets import ATTENTION_MIN_OPSET, MIN_RAISABLE_OPSET
from gqa_decompose.spec import DecomposeOptions

__all__ = [
    "attention_opset",
    "opset_raise_obstacle",
    "raise_default_opset",
]

# Version bumps in (20, 23] that change what a node means for the types it already had.
_MEANING_CHANGED = {("GroupNormalization", 21)}


def _signature(schema) -> tuple:
    inputs = tuple((i.name, int(i.option)) for i in schema.inputs)
    outputs = tuple((o.name, int(o.option)) for o in schema.outputs)
    return inputs, outputs, schema.min_input, schema.max_input, schema.min_output, schema.max_output


def _attributes(schema) -> dict[str, tuple]:
    return {
        name: (int(a.type), a.required, a.default_value.SerializeToString()) for name, a in schema.attributes.items()
    }


@functools.cache
def _ort_versions(op_type: str) -> tuple[int, ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return tuple(
        sorted(s.since_version for s in ort_state.get_all_operator_schema() if s.name == op_type and s.domain == "")
    )


@functools.cache
def _op_obstacle(op_type: str, old: int, new: int) -> str | None:
    try:
        before = onnx.defs.get_schema(op_type, old, "")
        after = onnx.defs.get_schema(op_type, new, "")
    except onnx.defs.SchemaError:
        versions = _ort_versions(op_type)
        if not versions:
            return f"{op_type} is defined neither by ONNX nor by ONNX Runtime"
        if any(old < v <= new for v in versions):
            return f"ONNX Runtime redefines {op_type} between opsets {old} and {new}"
        return None
    if before.since_version == after.since_version:
        return None
    bumps = {onnx.defs.get_schema(op_type, version, "").since_version for version in range(old + 1, new + 1)} - {
        before.since_version
    }
    changed = sorted(v for v in bumps if (op_type, v) in _MEANING_CHANGED)
    if changed:
        return f"{op_type}-{changed[0]} changed meaning"
    added = set(after.attributes) - set(before.attributes)
    kept = {k: v for k, v in _attributes(after).items() if k in before.attributes}
    if (
        _signature(before) != _signature(after)
        or kept != _attributes(before)
        or any(after.attributes[name].required for name in added)
    ):
        return f"{op_type}-{after.since_version} has other inputs or attributes than {op_type}-{before.since_version}"
    return None


def opset_raise_obstacle(model: ir.Model, new: int = ATTENTION_MIN_OPSET) -> str | None:
    """Why raising ``model``'s default-domain opset import to ``new`` could change a node; None if it cannot."""
    old = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if old is None or old >= new:
        return None
    if old < MIN_RAISABLE_OPSET:
        return f"opset {old} is below {MIN_RAISABLE_OPSET}: too many ops changed since"
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():  # their import must equal the model's: raised too
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        obstacle = _op_obstacle(node.op_type, old, new)
        if obstacle is not None:
            return f"{obstacle} (node '{node.name}')"
    return None


def attention_opset(model: ir.Model, options: DecomposeOptions) -> tuple[int, str | None]:
    """(the default-domain opset the expansion will see, why it could not be raised).

    The opset is raised to 23 only with the attention target and ``raise_opset``,
    and only when :func:`opset_raise_obstacle` finds nothing.
    """
    old = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if options.target != "attention" or not options.raise_opset or old >= ATTENTION_MIN_OPSET:
        return old, None
    obstacle = opset_raise_obstacle(model)
    return (old, obstacle) if obstacle is not None else (ATTENTION_MIN_OPSET, None)


def raise_default_opset(model: ir.Model, new: int) -> None:
    """Set the default-domain import of ``model`` and of its functions to ``new``."""
    model.opset_imports.pop("ai.onnx", None)
    model.opset_imports[""] = new
    for function in model.functions.values():
        function.opset_imports.pop("ai.onnx", None)
        if "" in function.opset_imports:
            function.opset_imports[""] = new
