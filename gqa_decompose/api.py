"""The Python API: decompose a model in memory or on disk."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping
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
    import numpy as np

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
    ops_pass = DecomposeOpsPass(options.ops, options.runtime_profile)
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
    """What :func:`decompose_file` did: what the CLI prints and reports.

    ``verifications`` and ``op_verifications`` follow ``nodes`` and ``ops`` by position (node names need
    not be unique); an entry is None where that level was not run. With ``raise_on_failure=False`` a run
    that stopped keeps what it found up to there, and ``error`` says why it stopped.
    """

    output: pathlib.Path | None  # None: nothing written (nothing to decompose, or a failure)
    nodes: tuple[DecomposedNode, ...] = ()
    ops: tuple[DecomposedOp, ...] = ()
    verifications: tuple[NodeVerification | None, ...] = ()
    op_verifications: tuple[OpVerification | None, ...] = ()
    model_verification: ModelVerification | None = None
    written: tuple[pathlib.Path, ...] = ()  # the files written: the model, and its data file
    opsets: dict[str, int] = dataclasses.field(default_factory=dict)  # the model's imports, as loaded
    ops_left: dict[str, dict[str, int]] | None = None  # non-standard ops left by domain (None: not reached)
    raised_opset: tuple[int, int] | None = None  # (before, after): the default-domain opset raised
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per stage
    error: GqaDecomposeError | OSError | None = None  # why the run stopped (raise_on_failure=False)

    @property
    def verified(self) -> bool:
        """No node failed the verifications that ran (a node skipped but not refused passes)."""
        model = self.model_verification
        return (
            all(v is None or _node_passed(v) for v in self.verifications)
            and all(v is None or v.ok is not False for v in self.op_verifications)
            and (model is None or model.skipped is not None or model.passed)
        )

    @property
    def notes(self) -> tuple[str, ...]:
        notes = []
        if self.raised_opset is not None:
            notes.append("default-domain opset raised from {} to {} (raise_opset)".format(*self.raised_opset))
        left = sorted(f"{domain}::{op}" for domain, ops in (self.ops_left or {}).items() for op in ops)
        if left:
            notes.append(f"the model still holds non-standard ops: {', '.join(left)}")
        return tuple(notes)

    def failure(self) -> GqaDecomposeError | None:
        """The first verification that failed, as :func:`decompose_file` raises it."""
        for entry, verification in zip(self.nodes, self.verifications, strict=True):
            if verification is not None and not _node_passed(verification):
                reason = verification.refused or "; ".join(
                    f"{r.phase.name}: {r.failure}" for r in verification.results if not r.passed
                )
                return GqaDecomposeError(f"verification failed, nothing written: {reason}", entry.name)
        for entry, verification in zip(self.ops, self.op_verifications):
            if verification is not None and verification.ok is False:
                return GqaDecomposeError(f"verification failed, nothing written: {verification.detail}", entry.name)
        model = self.model_verification
        if model is not None and model.skipped is None and not model.passed:
            return GqaDecomposeError(f"model verification failed, nothing written: {model.summary()}")
        return None


def decompose_file(
    model_path: str | os.PathLike,
    output_path: str | os.PathLike | None = None,
    *,
    options: DecomposeOptions | None = None,
    verify: str = "nodes",
    steps: int = 4,
    batch: int | None = None,
    dims: Mapping[str, int] | None = None,
    feeds: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    reuse_data: bool = False,
    create_folders: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    raise_on_failure: bool = True,
) -> DecomposeFileResult:
    """Decompose a model file into ``output_path``, verified first: the CLI's whole run, without its printing.

    Args:
        output_path: a file, or a folder (existing, or a string ending in a path separator) to write
            ``<stem>.decomposed.onnx`` into; default: that file beside the model.
        verify: the CLI's ``--verify``: "nodes" (every decomposed node against ONNX Runtime CPU, the
            default), "model" (a prompt and ``steps`` decode steps of the whole model), "all" or "none";
            nothing is written unless the verification asked for passes.
        steps, batch, dims, feeds: the model-level run's settings (:func:`gqa_decompose.verify_model`).
        reuse_data: the output refers to the input's external-data file instead of its own copy.
        create_folders: create a missing output folder (the CLI: only for ``-o folder/``).
        progress: called with (what, done, total), ``what`` one of "rewrite", "nodes", "model", "save".
        raise_on_failure: False: a refusal, an unusable path or a failed verification is returned
            (``result.error``, ``result.verified``) with what was found up to there, instead of raised.

    Weights stay on disk: the output gets its own external-data file when the input had external data.

    Raises:
        GqaDecomposeError: a node is refused, the output path is unusable, or verification failed
            (nothing is written).
        OSError: the output cannot be written.
    """
    from gqa_decompose.outcome import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    run = _FileRun(options or DecomposeOptions(), verify, progress)
    try:
        run.decompose(pathlib.Path(model_path), output_path, reuse_data, create_folders, (steps, batch, dims, feeds))
    except (GqaDecomposeError, OSError) as error:
        if raise_on_failure:
            raise
        run.found["error"] = error
    return run.result(raise_on_failure)


class _FileRun:
    """One :func:`decompose_file`, stage by stage; ``found`` keeps what each stage found when a later one
    fails."""

    def __init__(
        self, options: DecomposeOptions, verify: str, progress: Callable[[str, int, int], None] | None
    ) -> None:
        self.options, self.verify, self.progress = options, verify, progress
        self.found: dict = {"output": None}
        self.timings: dict[str, float] = {}

    def result(self, raise_on_failure: bool) -> DecomposeFileResult:
        """What the stages found; with ``raise_on_failure``, raises the first failed verification instead."""
        result = DecomposeFileResult(timings=self.timings, **self.found)
        failure = result.failure() if raise_on_failure else None
        if failure is not None:
            raise failure
        return result

    def _tagged(self, what: str) -> Callable[[int, int], None] | None:
        progress = self.progress
        return None if progress is None else lambda done, total: progress(what, done, total)

    def _timed(self, stage: str, work: Callable):
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.timings[stage] = time.perf_counter() - started

    def decompose(self, source: pathlib.Path, output_path, reuse_data: bool, create_folders: bool, settings) -> None:
        from gqa_decompose.report import ops_left, opsets
        from gqa_decompose.verify_ops import verify_ops

        model = self._timed("load", lambda: model_io.load_model(source))  # first: it refuses a folder in one line
        self.found["opsets"] = opsets(model)
        target = model_io.output_file(source, output_path)
        external_data = bool(model_io.external_tensors(model))
        model_io.check_output_path(model, target, external_data=external_data, reuse_input_data=reuse_data)
        model_io.check_output_folder(target, create_missing=create_folders)
        original = model.clone() if self.verify != "none" else None  # tensors shared: no weights read
        opset_before = _default_opset(model)
        decomposed = self._timed("rewrite", lambda: rewrite(model, self.options, progress=self._tagged("rewrite")))
        if _default_opset(model) != opset_before:
            self.found["raised_opset"] = (opset_before, _default_opset(model))
        if not decomposed:
            self.found["ops_left"] = ops_left(model)
            return
        nodes_verified = self.verify in ("nodes", "all")
        verifications = self._timed("verify_nodes", lambda: self._verify_nodes(original)) if nodes_verified else None
        self.found.update(nodes=tuple(decomposed), verifications=verifications or (None,) * len(decomposed))
        ops = tuple(decomposed.ops)
        op_verifications = (
            verify_ops(original, self.options.ops, runtime_profile=self.options.runtime_profile)
            if nodes_verified and ops
            else [None] * len(ops)
        )
        self.found.update(ops=ops, op_verifications=tuple(op_verifications))
        if self.verify in ("model", "all"):
            self._timed("verify_model", lambda: self._verify_model(source, original, model, settings))
        self.found["ops_left"] = ops_left(model)
        if not DecomposeFileResult(**self.found).verified:
            return
        written = self._timed(
            "save",
            lambda: model_io.save_model(
                model, target, external_data=external_data, reuse_input_data=reuse_data, progress=self._tagged("save")
            ),
        )
        self.found.update(output=target, written=tuple(written))

    def _verify_nodes(self, original: ir.Model) -> tuple[NodeVerification, ...]:
        from gqa_decompose.verify import verify as verify_nodes

        return tuple(verify_nodes(original, options=self.options, progress=self._tagged("nodes")).nodes)

    def _verify_model(self, source: pathlib.Path, original: ir.Model, rewritten: ir.Model, settings) -> None:
        from gqa_decompose.verify_model import verify_model

        steps, batch, dims, feeds = settings
        self.found["model_verification"] = verify_model(
            original,
            rewritten,
            steps=steps,
            batch=batch,
            dims=dims,
            feeds=feeds,
            genai_config=model_io.read_genai_config(source),
            progress=self._tagged("model"),
            options=self.options,
        )


def _default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _node_passed(verification: NodeVerification) -> bool:
    """As the CLI judges it: passed, or skipped (no phase could run) without being refused."""
    return verification.passed or (verification.skipped is not None and verification.refused is None)
