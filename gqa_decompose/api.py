"""The Python API: decompose a model in memory or on disk."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING, overload

import onnx
import onnx_ir as ir

from gqa_decompose import model_io
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import (
    DecomposedNode,
    DecomposeGqaPass,
    build_pipeline,
    find_gqa_nodes,
)
from gqa_decompose.passes.decompose_ops import DecomposedOp, DecomposeOpsPass, find_op_nodes
from gqa_decompose.spec import DecomposeOptions, options_of

if TYPE_CHECKING:
    from gqa_decompose.verify import NodeVerification
    from gqa_decompose.verify_model import ModelVerification
    from gqa_decompose.verify_ops import OpVerification

__all__ = ["Decomposed", "DecomposeFileResult", "decompose", "decompose_file", "rewrite"]

logger = logging.getLogger("gqa_decompose")


class Decomposed(list):
    """The GQA nodes decomposed (a list of DecomposedNode, as before), with ``ops``: every companion-op node
    decomposed (DecomposedOp, in model order). True when either is not empty."""

    def __init__(self, nodes=(), ops=()) -> None:
        super().__init__(nodes)
        self.ops: list[DecomposedOp] = list(ops)

    def __bool__(self) -> bool:
        return bool(len(self) or self.ops)


def rewrite(
    model: ir.Model,
    options: DecomposeOptions | None = None,
    *,
    check: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Decomposed:
    """Decompose every GQA node and companion-op node of ``model`` in place (``options.ops``: only those
    op types); returns what was done.

    A model with none of them is left untouched (an empty result is returned).
    """
    options = options or DecomposeOptions()
    gqa = find_gqa_nodes(model) if options.decomposes("GroupQueryAttention") else []
    if not gqa and not find_op_nodes(model, options.ops):
        logger.info("no com.microsoft.GroupQueryAttention node nor companion-op node found; the model is unchanged")
        return Decomposed()
    decompose_pass = DecomposeGqaPass(options, progress=progress)
    ops_pass = DecomposeOpsPass(options.ops)
    pipeline = build_pipeline(decompose_pass, check=check, ops_pass=ops_pass)
    try:
        pipeline(model)
    except ir.passes.PassError as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, GqaDecomposeError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    return Decomposed(decompose_pass.decomposed, ops_pass.decomposed)


@overload
def decompose(model: onnx.ModelProto, **fields) -> onnx.ModelProto: ...
@overload
def decompose(model: ir.Model, **fields) -> ir.Model: ...


def decompose(model, *, check: bool = True, options: DecomposeOptions | None = None, **fields):
    """Rewrite every com.microsoft.GroupQueryAttention node, and the companion contrib ops
    (normalizations, RotaryEmbedding, activations: see :mod:`gqa_decompose.ops`), into standard ONNX ops.

    Args:
        model: an ``onnx.ModelProto`` (left untouched; a new ModelProto is
            returned) or an ``onnx_ir.Model`` (rewritten in place and returned).
        check: run the ONNX checker on the result.
        options: a :class:`DecomposeOptions`, or ``fields``, its fields as keywords: ``legacy_window=True``
            reads ``local_window_size`` as ONNX Runtime <= 1.23 did (W + 1
            visible keys); ``static_kv_cache=True`` promises a max-length KV
            buffer, ``growing_kv_cache=True`` a cache that grows with aligned
            rows (either: one cache copy less per layer and step);
            ``native_precision=True`` computes fp16/bf16 attention natively;
            ``target="attention"`` emits one standard Attention op per node
            (opset >= 23; other nodes fall back to primitives, reported in
            the returned pass's ``decomposed`` / the verify report), and
            ``strict_target=True`` refuses a node that would fall back;
            ``ops=["GroupQueryAttention"]`` decomposes only those op types (default:
            GQA and every companion op of :mod:`gqa_decompose.ops`).

    Raises:
        GqaDecomposeError: a node is malformed or uses a feature that cannot be
            reproduced exactly; the message names the node.
    """
    options = options_of(options, fields)
    if isinstance(model, onnx.ModelProto):
        ir_model = ir.serde.deserialize_model(model)
        _merge_repeated_declarations(model, ir_model)
        rewrite(ir_model, options, check=check)
        return _with_declarations_of(model, ir.serde.serialize_model(ir_model))
    if isinstance(model, ir.Model):
        rewrite(model, options, check=check)
        return model
    raise TypeError(f"expected onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def _merge_repeated_declarations(proto: onnx.ModelProto, model: ir.Model) -> None:
    """A graph input or output declared more than once gets only the dims its declarations agree on.

    onnx_ir keeps the last declaration; ONNX Runtime merges them leniently and runs either shape, so
    the expansion must not build on one of them.
    """
    for declared, values in ((proto.graph.input, model.graph.inputs), (proto.graph.output, model.graph.outputs)):
        shapes: dict[str, list[ir.Shape | None]] = {}
        for info in declared:
            shapes.setdefault(info.name, []).append(ir.serde.deserialize_value_info_proto(info, None).shape)
        for value in values:
            seen = shapes.get(value.name or "", [])
            if len(seen) < 2:
                continue
            if any(shape is None or len(shape) != len(seen[0]) for shape in seen):
                value.shape = None
                continue
            dims = [dim if all(shape[i] == dim for shape in seen) else None for i, dim in enumerate(seen[0])]
            value.shape = ir.Shape(dims)


def _with_declarations_of(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> onnx.ModelProto:
    """``rewritten`` with ``original``'s graph input and output declarations, verbatim.

    A ModelProto may declare a name twice with different shapes (ORT's test_gqa_cpu declares
    present_key/present_value twice); an onnx_ir value holds one of them, so the rewrite would
    re-declare both from the last one, and ONNX Runtime then refuses a run it accepted before.
    """
    for declared, written in (
        (original.graph.input, rewritten.graph.input),
        (original.graph.output, rewritten.graph.output),
    ):
        if [v.name for v in declared] == [v.name for v in written]:
            del written[:]
            written.extend(declared)
    return rewritten


@dataclasses.dataclass(frozen=True)
class DecomposeFileResult:
    """What :func:`decompose_file` did: what the CLI prints.

    ``verifications`` and ``op_verifications`` follow ``nodes`` and ``ops`` by position (node names need
    not be unique); an entry is None where that level was not run.
    """

    output: pathlib.Path | None  # None: the model had nothing to decompose, nothing was written
    nodes: tuple[DecomposedNode, ...] = ()
    ops: tuple[DecomposedOp, ...] = ()
    verifications: tuple[NodeVerification | None, ...] = ()
    op_verifications: tuple[OpVerification | None, ...] = ()
    model_verification: ModelVerification | None = None
    notes: tuple[str, ...] = ()


def decompose_file(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    options: DecomposeOptions | None = None,
    verify: str = "nodes",
    progress: Callable[[int, int], None] | None = None,
) -> DecomposeFileResult:
    """Decompose a model file into ``output_path`` (default ``<stem>.decomposed.onnx``), verified first.

    Weights stay on disk: the output gets its own external-data file when the
    input had external data. ``verify`` is the CLI's ``--verify``: "nodes" (every decomposed node against
    ONNX Runtime CPU, the default), "model" (a prompt and decode steps of the whole model), "all" or "none";
    nothing is written unless the verification asked for passes.

    Raises:
        GqaDecomposeError: a node is refused, the output path is unusable, or verification failed
            (nothing is written).
    """
    from gqa_decompose.outcome import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    options = options or DecomposeOptions()
    source = pathlib.Path(model_path).absolute()
    target = pathlib.Path(output_path).absolute() if output_path else model_io.default_output_path(source)
    model = model_io.load_model(source)
    external_data = bool(model_io.external_tensors(model))
    model_io.check_output_path(model, target, external_data=external_data)
    model_io.check_output_folder(target)
    original = model.clone() if verify != "none" else None  # tensors shared: no weights read
    opset_before = _default_opset(model)
    decomposed = rewrite(model, options, progress=progress)
    if not decomposed:
        return DecomposeFileResult(None)
    result = _verified(source, original, model, decomposed, options, verify)
    notes = []
    if _default_opset(model) != opset_before:
        notes.append(f"default-domain opset raised from {opset_before} to {_default_opset(model)} (raise_opset)")
    left = _non_standard_ops(model)
    if left:
        notes.append(f"the model still holds non-standard ops: {', '.join(left)}")
    model_io.save_model(model, target, external_data=external_data)
    return dataclasses.replace(result, output=target, notes=tuple(notes))


def _default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _non_standard_ops(model: ir.Model) -> list[str]:
    from gqa_decompose.report import ops_left

    return sorted(f"{domain}::{op}" for domain, ops in ops_left(model).items() for op in ops)


def _verified(
    source: pathlib.Path,
    original: ir.Model | None,
    rewritten: ir.Model,
    decomposed: Decomposed,
    options: DecomposeOptions,
    verify: str,
) -> DecomposeFileResult:
    """The verifications ``verify`` asks for, as the CLI runs them.

    Raises:
        GqaDecomposeError: one failed (naming the first node that did).
    """
    verifications: tuple = (None,) * len(decomposed)
    op_verifications: tuple = (None,) * len(decomposed.ops)
    model_verification = None
    if verify in ("nodes", "all"):
        from gqa_decompose.verify import verify as verify_nodes
        from gqa_decompose.verify_ops import verify_ops

        verifications = tuple(verify_nodes(original, options=options).nodes)
        if decomposed.ops:
            op_verifications = tuple(verify_ops(original, options.ops))
    if verify in ("model", "all"):
        from gqa_decompose.verify_model import verify_model

        model_verification = verify_model(
            original, rewritten, genai_config=model_io.read_genai_config(source), options=options
        )
    for entry, verification in zip(decomposed, verifications, strict=True):
        if verification is not None and not _node_passed(verification):
            reason = verification.refused or "; ".join(
                f"{r.phase.name}: {r.failure}" for r in verification.results if not r.passed
            )
            raise GqaDecomposeError(f"verification failed, nothing written: {reason}", entry.name)
    for entry, verification in zip(decomposed.ops, op_verifications):
        if verification is not None and verification.ok is False:
            raise GqaDecomposeError(f"verification failed, nothing written: {verification.detail}", entry.name)
    if model_verification is not None and model_verification.skipped is None and not model_verification.passed:
        raise GqaDecomposeError(f"model verification failed, nothing written: {model_verification.summary()}")
    return DecomposeFileResult(
        None, tuple(decomposed), tuple(decomposed.ops), verifications, op_verifications, model_verification
    )


def _node_passed(verification: NodeVerification) -> bool:
    """As the CLI judges it: passed, or skipped (no phase could run) without being refused."""
    return verification.passed or (verification.skipped is not None and verification.refused is None)
