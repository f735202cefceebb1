"""The CI gate and its JSON report: :func:`check` and :func:`report_json` (schema version 1, see README).

``check`` answers "is this model portable once decomposed?": every GQA node parses into a spec (or is
refused with a reason), is verified node by node and/or as a whole model against ONNX Runtime CPU, and no
other non-standard op remains. The CLI's ``--check`` and ``--report`` are thin layers over this module.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from gqa_decompose import model_io
from gqa_decompose.api import DecomposeFileResult, rewrite
from gqa_decompose.outcome import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, VERIFY_MODES  # noqa: F401 - re-exported
from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes, non_standard_nodes
from gqa_decompose.plan import plan_gqa, plan_ops
from gqa_decompose.spec import DecomposeOptions, GqaSpec, options_of
from gqa_decompose.verify import NodeVerification, verify
from gqa_decompose.verify_model import ModelVerification, read_genai_config, verify_model

if TYPE_CHECKING:
    from gqa_decompose.expansion.gqa import Lowering
    from gqa_decompose.runtime_check import RuntimeCheck

__all__ = [
    "decompose_report",
    "op_node_entry",
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "VERIFY_MODES",
    "CheckResult",
    "NodeEntry",
    "check",
    "node_verification_json",
    "ops_left",
    "report_json",
]

REPORT_SCHEMA = "gqa-decompose-report"
REPORT_SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class NodeEntry:
    """One GQA node: what became of it and how it verified."""

    name: str
    scope: str
    status: str  # "decomposed" (rewritten), "decomposable" (--check) or "refused"
    spec: GqaSpec | None
    reason: str | None = None  # why it was refused
    new_nodes: int | None = None  # nodes it became (decompose mode)
    verification: NodeVerification | None = None
    target: str | None = None  # what it becomes: "primitives" or "attention" (None when refused)
    fallback: str | None = None  # why it is not the target asked for
    lowering: Lowering | None = None  # how it is emitted (None when refused)

    @property
    def passed(self) -> bool:
        """Not refused, and its node-level verification (when run) did not fail."""
        if self.status == "refused":
            return False
        v = self.verification
        return v is None or v.passed or (v.skipped is not None and v.refused is None)


@dataclasses.dataclass
class CheckResult:
    """Everything a run found out; :func:`report_json` turns it into the JSON report."""

    model: str
    mode: str  # "check" or "decompose"
    options: DecomposeOptions
    verify: str  # one of VERIFY_MODES
    nodes: list[NodeEntry] = dataclasses.field(default_factory=list)
    opsets: dict[str, int] = dataclasses.field(default_factory=dict)
    ops_left: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    model_verification: ModelVerification | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    output: str | None = None
    error: str | None = None
    exit_code: int | None = None
    runtimes: list[dict] = dataclasses.field(default_factory=list)  # --check --runtime: one entry each
    runtime_checks: list[RuntimeCheck] = dataclasses.field(default_factory=list)  # and what each found
    raised_opset: tuple[int, int] | None = None  # (before, after) with --raise-opset
    op_nodes: list[dict] = dataclasses.field(default_factory=list)  # companion-op nodes: see op_node_entry

    @property
    def non_standard_ops(self) -> list[str]:
        """Sorted ``domain::op_type`` of what is left that a plain ONNX runtime would not know."""
        return sorted(f"{domain}::{op}" for domain, ops in self.ops_left.items() for op in ops)

    @property
    def verified(self) -> bool:
        """No node refused or failing, and the model-level run (when asked and not skipped) passed."""
        model_ok = (
            self.model_verification is None
            or self.model_verification.skipped is not None
            or self.model_verification.passed
        )
        ops_ok = all(entry["status"] != "refused" and entry.get("verified") is not False for entry in self.op_nodes)
        return all(node.passed for node in self.nodes) and model_ok and ops_ok

    @property
    def portable_once_decomposed(self) -> bool:
        """Every GQA node decomposable and verified, and no non-standard op left (the runtimes aside)."""
        return self.error is None and self.verified and not self.ops_left

    @property
    def portable(self) -> bool:
        """The CI gate: portable once decomposed, and the rewritten model running on every runtime asked for."""
        return self.portable_once_decomposed and all(entry.get("passed") for entry in self.runtimes)


def decompose_report(model: str, options: DecomposeOptions, verify_mode: str, done: DecomposeFileResult) -> CheckResult:
    """The decompose-mode result (what ``--report`` writes) of a :func:`gqa_decompose.decompose_file` run."""
    result = CheckResult(model, "decompose", options, verify_mode)
    result.opsets = dict(done.opsets)
    result.ops_left = dict(done.ops_left or {})
    result.raised_opset = done.raised_opset
    result.timings = dict(done.timings)
    result.model_verification = done.model_verification
    for entry, verification in zip(done.nodes, done.verifications, strict=True):
        result.nodes.append(
            NodeEntry(
                entry.name,
                entry.scope,
                "decomposed",
                entry.spec,
                new_nodes=entry.new_node_count,
                verification=verification,
                target=entry.target,
                fallback=entry.fallback,
                lowering=entry.lowering,
            )
        )
    result.op_nodes = [op_node_entry(entry, v) for entry, v in zip(done.ops, done.op_verifications)]
    result.output = str(done.output) if done.output is not None else None
    if done.error is not None:
        result.error = str(done.error)
        result.exit_code = EXIT_BAD_INPUT
    else:
        result.exit_code = EXIT_OK if result.verified else EXIT_FAILED
    return result


def op_node_entry(entry, verification=None, status: str = "decomposed", reason: str | None = None) -> dict:
    """One companion-op node of the report: a DecomposedOp (or OpNode when checking) and its OpVerification."""
    node = getattr(entry, "node", None)
    return {
        "name": entry.name if node is None else node.name or "",
        "domain": entry.domain if node is None else node.domain,
        "op_type": entry.op_type if node is None else node.op_type,
        "status": status,
        "reason": reason,
        "new_nodes": getattr(entry, "new_node_count", None),
        "verified": None if verification is None else verification.ok,
        "max_abs_error": {} if verification is None else verification.max_abs_error,
        "detail": "" if verification is None else verification.detail,
    }


def ops_left(
    model: ir.Model, *, keep_gqa: set[int] | None = None, decomposable: set[int] | None = None
) -> dict[str, dict[str, int]]:
    """Non-standard ops by domain (``ai.onnx`` for the default one) with their counts.

    GroupQueryAttention nodes are left out (they are being decomposed), except those whose ``id()`` is in
    ``keep_gqa`` (refused; nodes, not names, since names need not be unique); so are the companion-op nodes
    whose ``id()`` is in ``decomposable``.
    """
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in non_standard_nodes(model):
        if decomposable is not None and id(node) in decomposable:
            continue
        if node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention":
            if keep_gqa is None or id(node) not in keep_gqa:
                continue
        counts[node.domain or "ai.onnx"][node.op_type] += 1
    return {domain: dict(sorted(ops.items())) for domain, ops in sorted(counts.items())}


def opsets(model: ir.Model) -> dict[str, int]:
    return {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())}


def check(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    *,
    verify_mode: str = "nodes",
    steps: int = 4,
    batch: int | None = None,
    dims: Mapping[str, int] | None = None,
    feeds: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    runtimes: Sequence[str] = (),
    options: DecomposeOptions | None = None,
    **fields,
) -> CheckResult:
    """Whether ``model`` is portable once decomposed; nothing is written.

    Args:
        model: a path (weights stay on disk; a ``genai_config.json`` beside it is read), a ModelProto or an
            onnx_ir.Model (not modified).
        verify_mode: "nodes" (each GQA node against ORT CPU), "model" (a prompt and ``steps`` decode steps of
            the whole model, see :func:`gqa_decompose.verify_model`), "all" (both) or "none".
        steps, batch, dims, feeds: the model-level run's settings (:func:`gqa_decompose.verify_model`).
        progress: called with (what, done, total) as nodes and steps are verified.
        runtimes: also run the rewritten model (and each GQA node) on these runtimes
            (:mod:`gqa_decompose.runtimes`): ``result.runtime_checks``; they count in ``result.portable``.
        options: the :class:`DecomposeOptions` (or ``fields``, its fields as keywords).

    Returns:
        A :class:`CheckResult`; ``result.portable`` is the gate.

    Raises:
        GqaDecomposeError: the model cannot be read, or cannot be driven for model-level verification, or
            a runtime's name is unknown.
    """
    _reject_bad_arguments(verify_mode, runtimes)
    decompose_options = options_of(options, fields)
    loaded, path, result = _load_and_plan(model, decompose_options, verify_mode)
    if verify_mode in ("nodes", "all") and any(n.status == "decomposable" for n in result.nodes):
        _verify_nodes(loaded, decompose_options, progress, result)
    if verify_mode in ("model", "all") and _whole_model_verifiable(result):
        model_settings = dict(steps=steps, batch=batch, dims=dims, feeds=feeds)
        _verify_whole_model(loaded, path, decompose_options, model_settings, progress, result)
    if runtimes:
        _check_runtimes(loaded, decompose_options, verify_mode, runtimes, result)
    result.exit_code = EXIT_OK if result.portable else EXIT_FAILED
    return result


def _reject_bad_arguments(verify_mode: str, runtimes: Sequence[str]) -> None:
    """An unknown verify mode or runtime name is bad input, raised before any work."""
    from gqa_decompose.runtimes import get_runtime

    if verify_mode not in VERIFY_MODES:
        raise ValueError(f"verify_mode must be one of {VERIFY_MODES}, got {verify_mode!r}")
    for name in runtimes:
        get_runtime(name)


def _load_and_plan(
    model: str | os.PathLike | onnx.ModelProto | ir.Model, options: DecomposeOptions, verify_mode: str
) -> tuple[ir.Model, pathlib.Path | None, CheckResult]:
    """A typed copy of ``model``, its path, and the result so far: the load's timing, an entry per GQA node and
    per companion-op node (the latter verified with --verify nodes), the opsets and the non-standard ops left."""
    started = time.perf_counter()
    loaded, path = _load_copy(model)
    result = CheckResult(str(path) if path else "<in memory>", "check", options, verify_mode)
    result.timings["load"] = time.perf_counter() - started
    InferGqaTypesPass()(loaded)
    refused = _plan_entries(loaded, options, result)
    result.opsets = opsets(loaded)
    decomposable_ops = _check_op_nodes(loaded, options, verify_mode, result)
    result.ops_left = ops_left(loaded, keep_gqa=refused, decomposable=decomposable_ops)
    return loaded, path, result


def _whole_model_verifiable(result: CheckResult) -> bool:
    """Something to rewrite (GQA nodes or companion ops) and nothing refused."""
    # A model without GQA (a MultiHeadAttention export) is verified whole too: its companion ops are rewritten.
    nodes, op_nodes = [n.status for n in result.nodes], [entry["status"] for entry in result.op_nodes]
    return ("decomposable" in nodes or "decomposable" in op_nodes) and "refused" not in nodes + op_nodes


def _verify_nodes(
    loaded: ir.Model, options: DecomposeOptions, progress: Callable[[str, int, int], None] | None, result: CheckResult
) -> None:
    """Each GQA node against ORT CPU: ``result.nodes`` get their verifications."""
    started = time.perf_counter()
    report = verify(loaded, progress=_tagged(progress, "nodes"), options=options)
    # One verification per GQA node in the same (find_gqa_nodes) order: joined by position, not by name.
    result.nodes = [dataclasses.replace(n, verification=v) for n, v in zip(result.nodes, report.nodes, strict=True)]
    result.timings["verify_nodes"] = time.perf_counter() - started


def _verify_whole_model(
    loaded: ir.Model,
    path: pathlib.Path | None,
    options: DecomposeOptions,
    settings: dict,
    progress: Callable[[str, int, int], None] | None,
    result: CheckResult,
) -> None:
    """The model rewritten in memory, then driven against the original (``settings``: steps, batch, dims,
    feeds of :func:`gqa_decompose.verify_model`): ``result.model_verification``."""
    started = time.perf_counter()
    rewritten = loaded.clone()
    rewrite(rewritten, options)
    result.timings["rewrite"] = time.perf_counter() - started
    started = time.perf_counter()
    result.model_verification = verify_model(
        loaded,
        rewritten,
        **settings,
        genai_config=read_genai_config(path),
        progress=_tagged(progress, "model"),
        options=options,
    )
    result.timings["verify_model"] = time.perf_counter() - started


def _load_copy(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> tuple[ir.Model, pathlib.Path | None]:
    """A model check() may type and plan (the caller's is left as it is), and its path if it has one."""
    if isinstance(model, ir.Model):
        return model.clone(), None
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    path = pathlib.Path(model).absolute()
    return model_io.load_model(path), path


def _plan_entries(model: ir.Model, options: DecomposeOptions, result: CheckResult) -> set[int]:
    """One entry per GQA node, decomposable or refused (whatever ``options.ops`` says: a node left as it
    is stays a GQA node, so check() judges it); returns the ``id()`` of the nodes refused."""
    refused = set()
    for item in plan_gqa(model, options, find_gqa_nodes(model)).nodes:
        if item.refusal is not None:
            refused.add(id(item.node))
            name = item.refusal.node_name or item.node.name
            result.nodes.append(NodeEntry(name, item.scope, "refused", None, item.refusal.reason))
            continue
        result.nodes.append(
            NodeEntry(
                item.spec.node_name,
                item.scope,
                "decomposable",
                item.spec,
                target=item.target,
                fallback=item.fallback,
                lowering=item.lowering,
            )
        )
    return refused


def _check_runtimes(
    model: ir.Model, options: DecomposeOptions, verify_mode: str, names: Sequence[str], result: CheckResult
) -> None:
    """The rewritten model, and each GQA node with node-level verification, on each runtime; none when a
    node is refused."""
    from gqa_decompose.runtime_check import check_runtime

    if any(entry.status == "refused" for entry in result.nodes):
        refused = {"runtime": None, "version": None, "passed": False, "error": "not run: a node is refused"}
        result.runtimes.append(refused)
        return
    for name in dict.fromkeys(names):
        checked = check_runtime(model, name, options, verify_nodes=verify_mode in ("nodes", "all"))
        result.runtime_checks.append(checked)
        result.runtimes.append(_runtime_json(checked))


def _runtime_json(checked: RuntimeCheck) -> dict:
    entry = {"runtime": checked.runtime, "version": checked.version, "passed": checked.passed}
    if checked.unavailable:
        entry["error"] = checked.unavailable
        return entry
    nodes = checked.nodes.nodes if checked.nodes is not None else ()
    entry["nodes"] = [{"name": node.name, "verification": node_verification_json(node)} for node in nodes]
    run = checked.model
    entry["model"] = {"passed": run.passed, "max_errors": run.max_errors, "failure": run.failure, "oracle": run.oracle}
    return entry


def _check_op_nodes(model: ir.Model, options: DecomposeOptions, verify_mode: str, result: CheckResult) -> set[int]:
    """Parse (and with --verify nodes, verify) every companion-op node; the ids of those that decompose."""
    from gqa_decompose.verify_ops import verify_op_node

    decomposable = set()
    rng = np.random.default_rng(0)
    for planned in plan_ops(model, options.ops, runtime_profile=options.runtime_profile):
        item = planned.item
        if planned.refusal is not None:
            result.op_nodes.append(op_node_entry(item, status="refused", reason=planned.refusal.reason))
            continue
        verification = (
            verify_op_node(item.node, item.decomposer, item.opset, rng, options.runtime_profile)
            if verify_mode in ("nodes", "all")
            else None
        )
        result.op_nodes.append(op_node_entry(item, verification, status="decomposable"))
        decomposable.add(id(item.node))
    return decomposable


def _tagged(progress: Callable[[str, int, int], None] | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(what, done, total)


# JSON ----------------------------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None | str:
    """JSON has no inf/NaN: they become the strings "inf" / "nan"."""
    if value is None or np.isfinite(value):
        return value
    return "nan" if np.isnan(value) else "inf"


def _config_json(spec: GqaSpec | None, lowering: Lowering | None) -> dict | None:
    if spec is None:
        return None
    return {
        "num_heads": spec.num_heads,
        "kv_num_heads": spec.kv_num_heads,
        "head_size": spec.head_size,
        "dtype": spec.dtype.name.lower(),
        "packed_qkv": spec.packed_qkv,
        "past": spec.has_past,
        "rotary": ("interleaved" if spec.rotary_interleaved else "half") if spec.do_rotary else None,
        "local_window_size": spec.local_window_size if spec.local_window_size >= 0 else None,
        "softcap": spec.softcap if spec.softcap > 0 else None,
        "kv_cache": (
            "windowed"
            if spec.sliding_window_cache
            else "static"
            if lowering is not None and lowering.static_kv_cache
            else "growing"
            if lowering is not None and lowering.growing_kv_cache
            else "any"
        ),
        "features": spec.features(lowering),
    }


def node_verification_json(result: NodeVerification | None) -> dict:
    if result is None:
        return {"status": "not_run", "reason": None, "max_error": None, "phases": []}
    if result.refused:
        status, reason = "failed", result.refused
    elif result.skipped:
        status, reason = "skipped", result.skipped
    else:
        failures = [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]
        status, reason = ("passed", None) if result.passed else ("failed", "; ".join(failures) or None)
    return {
        "status": status,
        "reason": reason,
        "max_error": _finite(result.max_error),
        "phases": [
            {
                "phase": r.phase.name,
                "passed": r.passed,
                "max_errors": {k: _finite(v) for k, v in r.max_errors.items()},
                "failure": r.failure,
            }
            for r in result.results
        ],
    }


def _model_verification_json(result: ModelVerification | None, verify_mode: str) -> dict:
    if result is None:
        reason = None if verify_mode in ("model", "all") else f"--verify {verify_mode}"
        return {"status": "not_run", "reason": reason}
    agree, compared = result.token_agreement
    status = "skipped" if result.skipped else "passed" if result.passed else "failed"
    return {
        "status": status,
        "reason": result.skipped,
        "batch": result.batch,
        "prompt_length": result.prompt_length,
        "decode_steps": max(len(result.steps) - 1, 0),
        "cache_layout": result.cache_layout,
        "tolerance": {"atol": result.tolerance[0], "rtol": result.tolerance[1]},
        "notes": list(result.notes),
        "max_errors": {
            name: {"max_abs": _finite(a), "max_rel": _finite(r)} for name, (a, r) in result.max_errors().items()
        },
        "max_abs_error": {kind: _finite(result.max_error(kind)) for kind in ("logits", "present", "other")},
        "token_agreement": {"agree": agree, "compared": compared},
        "steps": [
            {
                "step": s.step,
                "kind": s.kind,
                "query_length": s.query_length,
                "total_lengths": list(s.total_lengths),
                "passed": s.passed,
                "failure": s.failure,
                "tokens": None
                if s.expected_tokens is None
                else {"original": list(s.expected_tokens), "rewritten": list(s.got_tokens or ())},
                "outputs": {
                    o.name: {"max_abs": _finite(o.max_abs), "max_rel": _finite(o.max_rel), "passed": o.passed}
                    for o in s.outputs
                },
            }
            for s in result.steps
        ],
    }


def report_json(result: CheckResult, version: str) -> dict:
    """The JSON report of ``result`` (schema ``gqa-decompose-report`` version 1, documented in README)."""
    if result.error is not None:
        status = "error"
    elif result.mode == "check":
        status = "portable" if result.portable else "not_portable"
    else:
        status = "ok" if result.exit_code == EXIT_OK else "failed"
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool_version": version,
        "model": result.model,
        "mode": result.mode,
        "status": status,
        "exit_code": result.exit_code,
        "error": result.error,
        "portable": result.portable if result.error is None else False,
        "output": result.output,
        "options": {**dataclasses.asdict(result.options), "verify": result.verify},
        "opsets": result.opsets,
        "ops_left": result.ops_left,
        "non_standard_ops": result.non_standard_ops,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
        "raised_opset": list(result.raised_opset) if result.raised_opset else None,
        "nodes": [
            {
                "name": node.name,
                "scope": node.scope,
                "status": node.status,
                "reason": node.reason,
                "config": _config_json(node.spec, node.lowering),
                "features": node.spec.features(node.lowering) if node.spec else [],
                "new_nodes": node.new_nodes,
                "target": node.target,
                "fallback": node.fallback,
                "verification": node_verification_json(node.verification),
            }
            for node in result.nodes
        ],
        "model_verification": _model_verification_json(result.model_verification, result.verify),
        "runtimes": result.runtimes,
        "op_nodes": result.op_nodes,
        "op_counts": dict(collections.Counter(entry["op_type"] for entry in result.op_nodes)),
    }
