"""The command line: options -> API call -> report -> exit code.

Only click and the exit codes are imported at start-up: onnx, onnx_ir, ONNX Runtime and the
verification modules are imported by the commands that use them, so ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.outcome import EXIT_BAD_INPUT, VERIFY_MODES

if TYPE_CHECKING:
    from gqa_decompose.api import DecomposeFileResult
    from gqa_decompose.report import CheckResult
    from gqa_decompose.runtime_check import RuntimeCheck
    from gqa_decompose.spec import DecomposeOptions
    from gqa_decompose.verify import NodeVerification
    from gqa_decompose.verify_model import ModelVerification

__all__ = ["main"]

_EPILOG = """\b
Examples:
  gqa-decompose model.onnx                   writes model.decomposed.onnx, verified
  gqa-decompose model.onnx -o out/model.onnx --report report.json
  gqa-decompose model.onnx --check           portability check for CI, writes nothing
  gqa-decompose model.onnx --check --verify all --report report.json
                                             the CI gate: every node and a prompt + 4
                                             decode steps of the whole model
  gqa-decompose model.onnx --check --runtime openvino --runtime tract
                                             ... and run the rewritten model on those runtimes
  gqa-decompose model.onnx --target attention one standard Attention op per node (opset >= 23)

\b
Exit codes:
  0  success (with --check: the model is portable once decomposed)
  1  verification against ONNX Runtime failed (nothing is written), or with
     --check: a node is refused, fails verification (node or model level),
     or other non-standard ops remain, or the rewritten model fails on a --runtime
  2  bad input: unreadable or malformed model, a refused node, bad paths, a
     model that cannot be driven for --verify model (see --dim, --inputs)

Weights are never loaded into memory (but for --runtime and --verify model, which
run the model): external data is streamed into <OUTPUT>.data. The output appears
atomically; the input is never modified.
"""


class _Progress:
    """A tqdm bar drawn from the first update on, when its total is known (created at once, its
    first frame would read ``0node [00:00, ?node/s]``). Set ``unit`` before the first update."""

    def __init__(self, description: str, quiet: bool, unit: str = "node") -> None:
        self.description, self.quiet, self.unit = description, quiet, unit
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            import tqdm

            self._bar = tqdm.tqdm(
                desc=self.description,
                unit=self.unit,
                total=total,
                initial=done,
                leave=False,
                disable=True if self.quiet else None,
                file=sys.stderr,
            )
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _progress_bar(description: str, quiet: bool) -> tuple[_Progress, Callable[[int, int], None]]:
    bar = _Progress(description, quiet)
    return bar, bar.update


def _verification_text(result: NodeVerification | None) -> str:
    if result is None:
        return "not verified"
    if result.refused:
        return f"refused ({result.refused})"
    if result.skipped:
        return f"not verified ({result.skipped})"
    status = "verified" if result.passed else "VERIFICATION FAILED"
    failures = [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]
    detail = f"; {'; '.join(failures)}" if failures else ""
    error = f"max error {result.max_error:.2g}" if result.max_error is not None else "no phase ran"
    return f"{status}, {error} over {len(result.results)} phases{detail}"


def _target_text(options: DecomposeOptions, target: str, fallback: str | None) -> str:
    """What the node became, when the user asked for the attention target."""
    if options.target == "primitives":
        return ""
    if fallback is None:
        return f" (target {target})"
    return f" (target primitives, fallback: {fallback})"


def _phase_lines(result: NodeVerification | None) -> list[str]:
    """-v: one line per verified phase."""
    if result is None:
        return []
    return [
        f"    {r.phase.name} (B={r.phase.batch}, S={r.phase.query_length}, T={r.phase.total_length}): "
        + ", ".join(f"{k} {v:.2g}" for k, v in r.max_errors.items())
        + ("" if r.passed else f"  FAILED: {r.failure}")
        for r in result.results
    ]


def _step_lines(result: ModelVerification) -> list[str]:
    """-v: one line per model-level step."""
    lines = [f"  note: {note}" for note in result.notes]
    for step in result.steps:
        kinds: dict[str, float] = {}
        for error in step.outputs:
            kind = "logits" if error.name == "logits" else "present" if error.name.startswith("present") else error.name
            kinds[kind] = max(kinds.get(kind, 0.0), error.max_abs)
        tokens = ""
        if step.expected_tokens is not None:
            tokens = f", tokens {list(step.expected_tokens)} / {list(step.got_tokens or ())}"
        detail = ", ".join(f"{k} {v:.2g}" for k, v in kinds.items())
        failed = "" if step.passed else f"  FAILED: {step.failure or 'out of tolerance'}"
        lines.append(
            f"  step {step.step} ({step.kind}, S={step.query_length}, t={list(step.total_lengths)}): "
            f"{detail}{tokens}{failed}"
        )
    return lines


def _write_report(path: pathlib.Path | None, report: dict) -> bool:
    if path is None:
        return True
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:
        click.echo(f"error: cannot write the report: {error}", err=True)
        return False
    return True


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=pathlib.Path))  # load_model checks it
@click.option(
    "-o",
    "--output",
    type=str,
    help="Where to write the rewritten model: a file, or a folder (existing, or ending in '/') "
    "to write <MODEL stem>.decomposed.onnx into. Default: beside MODEL.",
)
@click.option(
    "--verify",
    "verify_mode",
    type=click.Choice(VERIFY_MODES),
    default="nodes",
    show_default=True,
    help="What to compare with ONNX Runtime CPU before writing: 'nodes' each GQA node alone on synthesized "
    "inputs (every phase); 'model' the whole model, a prompt and --steps decode steps with present fed back "
    "as past; 'all' both; 'none' nothing.",
)
@click.option("--no-verify", is_flag=True, help="Same as --verify none.")
@click.option(
    "--steps",
    type=click.IntRange(0),
    default=4,
    show_default=True,
    help="Model-level verification: decode steps after the prompt.",
)
@click.option(
    "--batch",
    type=click.IntRange(1),
    help="Model-level verification: batch size (default 2, right-padded rows; or the batch of --inputs).",
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="NAME=VALUE",
    help="Model-level verification: the size of a symbolic dim, e.g. sequence_length=16 (prompt length) or "
    "past_sequence_length=512 (static buffer rows). Repeatable.",
)
@click.option(
    "--inputs",
    "inputs_path",
    type=click.Path(dir_okay=False, exists=True, path_type=pathlib.Path),
    help="Model-level verification: an .npz of the prompt's inputs by name (input_ids, attention_mask, ...); "
    "the others are synthesized.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=pathlib.Path),
    help="Also write a JSON report: each node, its features, verification errors per phase.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write no model: report whether each GQA node can be decomposed (and verify it), "
    "and list every other non-standard op. Exit 1 when the model is not portable.",
)
@click.option(
    "--runtime",
    "runtime_names",
    multiple=True,
    metavar="NAME",
    help="With --check: also run the rewritten model (in memory) on runtime NAME, one of "
    "onnxruntime, reference (onnx.reference), openvino, tract, wasm, webnn (onnxruntime-web in "
    "Chromium, docs/browser.md), iree, tvm, litert (onnx2tf, docs/portability.md); repeatable. Each GQA node's "
    "expansion runs there against ORT CPU's fused node, and the whole model runs a prompt "
    "with synthesized inputs against the original on ORT CPU. Exit 1 if anything fails.",
)
@click.option(
    "--legacy-window",
    is_flag=True,
    help="Read local_window_size W as ONNX Runtime <= 1.23 did (W + 1 visible keys) "
    "for models exported for those releases. Default: W keys (ORT >= 1.24).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["auto", "static", "growing", "any"]),
    default="auto",
    show_default=True,
    help="'auto' (= 'any'): growing or static, ragged or not, decided at run time (two copies of the cache "
    "per layer and step; one with --fast-paths except for a ragged growing batch), whatever sits beside MODEL. "
    "'static': promise past is always a max-length buffer (T <= past length, as onnxruntime-genai's "
    "past_present_share_buffer runs it); 'growing': promise past grows by the new rows (T = past + new) with batch "
    "rows aligned after the first prompt. A promise emits only its path; a run that breaks it fails instead of "
    "computing anything wrong. With 'static' or 'auto', a runtime that binds present to past gets an in-place write.",
)
@click.option(
    "--native-precision",
    is_flag=True,
    help="Compute fp16/bf16 attention in fp16/bf16 instead of fp32 (ORT's CPU kernel uses fp32): "
    "fewer casts for GPU runtimes; verified at a looser tolerance (fp16 1e-2, bf16 5e-2).",
)
@click.option(
    "--fast-paths",
    is_flag=True,
    help="Emit If nodes choosing at run time what ONNX Runtime runs fastest: causal row blocks "
    "for long prompts, a copy of the visible rows of a long buffer, a one-copy cache update "
    "without a --kv-cache promise. Decode pays one If per layer; prompts of 512+ tokens run "
    "1.6-2.8x faster on ORT CPU (README, Speed). For ONNX Runtime: OpenVINO runs these If nodes "
    "1.6-3.3x slower than straight-line (use --runtime-profile openvino) and tract cannot run them. "
    "With a static prompt length the row blocks need no If. "
    "The same as --runtime-profile onnxruntime.",
)
@click.option(
    "--runtime-profile",
    type=click.Choice(["portable", "onnxruntime", "openvino", "webnn", "litert"]),
    default="portable",
    show_default=True,
    help="The runtime the forms are picked for; every profile keeps every cache form. 'portable': "
    "straight-line, runs everywhere (tract, WebNN, LiteRT). 'onnxruntime': run-time If choices (= --fast-paths). "
    "'openvino': straight-line (OpenVINO runs If nodes slower), the query scaled instead of the scores. "
    "'webnn': onnxruntime-web's WebNN EP in strict mode (no CPU fallback), empty-past prompt included. "
    "'litert': onnx2tf + LiteRT: portable, with a quantized cache written in int32 and RMS norms from "
    "primitives (portable's int8 cache and RMSNormalization-23 fail there).",
)
@click.option(
    "--target",
    type=click.Choice(["primitives", "attention"]),
    default="primitives",
    show_default=True,
    help="'primitives': MatMul/Softmax/... at the model's opset. 'attention': one standard "
    "Attention op per node (model opset >= 23; RotaryEmbedding-23 for rotary, TensorScatter-24 for "
    "the cache at opset 24), so runtimes with a fused Attention kernel use it. A node the op cannot "
    "express exactly falls back to primitives, said on its line.",
)
@click.option(
    "--strict-target",
    is_flag=True,
    help="With --target attention: refuse (exit 2) a node that would fall back to primitives.",
)
@click.option(
    "--raise-opset",
    is_flag=True,
    help="With --target attention: raise a model's default-domain opset from 20-22 to 23 (where "
    "Attention exists) when no op the model uses changes meaning; otherwise its nodes fall back.",
)
@click.option(
    "--reuse-data",
    is_flag=True,
    help="Let the output refer to the input's external-data file instead of writing its own "
    "copy of the weights (seconds instead of minutes for multi-GB models). The output must be "
    "in the input's folder, and depends on that file.",
)
@click.option(
    "--only",
    "only",
    metavar="OP[,OP]",
    callback=lambda ctx, param, value: _parse_only(value),
    help="Decompose only these op types (e.g. GroupQueryAttention), for a runtime that keeps the others "
    "fused; default: every op the tool knows (GroupQueryAttention and the companion ops).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; only the summary lines.")
@click.option("-v", "--verbose", is_flag=True, help="Also per-phase and per-step errors, notes and timings.")
@click.version_option(package_name="gqa-decompose")
def main(
    model: pathlib.Path,
    output: str | None,
    verify_mode: str,
    no_verify: bool,
    steps: int,
    batch: int | None,
    dims: tuple[str, ...],
    inputs_path: pathlib.Path | None,
    report_path: pathlib.Path | None,
    check: bool,
    runtime_names: tuple[str, ...],
    legacy_window: bool,
    kv_cache: str,
    native_precision: bool,
    fast_paths: bool,
    runtime_profile: str,
    target: str,
    strict_target: bool,
    raise_opset: bool,
    reuse_data: bool,
    only: tuple[str, ...] | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Rewrite com.microsoft.GroupQueryAttention nodes of MODEL into standard ONNX ops.

    Every GQA node (main graph, If/Loop bodies, model-local functions) is
    replaced by Reshape/Transpose/ScatterND/MatMul/Softmax/... at the model's
    own opset. Each node is then checked against ONNX Runtime CPU on
    synthesized inputs (first prompt, ragged decode, chunked prefill), and the
    model is written only if every node matches.
    """
    options = _options_from_flags(
        model,
        kv_cache,
        only,
        legacy_window=legacy_window,
        native_precision=native_precision,
        fast_paths=fast_paths,
        runtime_profile=runtime_profile,
        target=target,
        strict_target=strict_target,
        raise_opset=raise_opset,
    )
    verify_mode = "none" if no_verify else verify_mode
    # Positional in _Run's field order; the two booleans by name, where a swap would go unnoticed.
    run = _Run(model, verify_mode, steps, batch, _parse_dims(dims), inputs_path, quiet=quiet, verbose=verbose)
    _run_and_finish(run, options, check, output, reuse_data, runtime_names, report_path)


def _run_and_finish(
    run: _Run,
    options: DecomposeOptions,
    check: bool,
    output: str | None,
    reuse_data: bool,
    runtime_names: tuple[str, ...],
    report_path: pathlib.Path | None,
) -> None:
    """The check or the rewrite, then its report and exit code; bad input (or an output path that cannot be
    written) is one error line and exit 2."""
    from gqa_decompose.report import CheckResult

    result = CheckResult(str(run.model_path), "check" if check else "decompose", options, run.verify_mode)
    started = time.perf_counter()
    try:
        if runtime_names and not check:
            raise GqaDecomposeError("--runtime needs --check (it runs the rewritten model in memory)")
        if check:
            result = _run_check(run, options, runtime_names)
        else:
            result = _run_decompose(run, output, options, reuse_data)
    except (GqaDecomposeError, OSError) as error:  # OSError: an output path that cannot be written
        result.error = str(error)
        result.exit_code = EXIT_BAD_INPUT
        result.output = None
        click.echo(f"error: {error}", err=True)
    _finish(result, started, run.verbose, report_path)


def _options_from_flags(model: pathlib.Path, kv_cache: str, only: tuple[str, ...] | None, **flags) -> DecomposeOptions:
    """The DecomposeOptions the flags ask for (``flags``: the options' own fields); a note when genai_config.json
    shares the KV buffer and ``--kv-cache`` is left at auto."""
    from gqa_decompose import model_io
    from gqa_decompose.spec import DecomposeOptions

    if flags["fast_paths"] and flags["runtime_profile"] not in ("portable", "onnxruntime"):
        raise click.UsageError(f"--fast-paths is --runtime-profile onnxruntime, not {flags['runtime_profile']}")
    if kv_cache == "auto" and model_io.genai_shares_kv_buffer(model):
        # A suggestion only: the default keeps every cache form the original accepts.
        click.echo(
            "note: genai_config.json sets past_present_share_buffer: on ONNX Runtime, --runtime-profile "
            "onnxruntime writes that buffer in place and keeps every cache form; --kv-cache static emits only the "
            "static-buffer path (one cache copy less), which a growing-cache loop cannot run"
        )
    return DecomposeOptions(
        static_kv_cache=kv_cache == "static", growing_kv_cache=kv_cache == "growing", ops=only, **flags
    )


def _oracle_text(oracle: str) -> str:
    """'the original on <oracle>', or the oracle itself when it is not the original (it says what it is)."""
    return oracle if oracle.startswith("the rewrite") else f"the original on {oracle}"


def _finish(result: CheckResult, started: float, verbose: bool, report_path: pathlib.Path | None) -> None:
    """Timings (with --verbose), the JSON report, and the exit code (2 if the report cannot be written)."""
    from gqa_decompose.report import report_json

    result.timings["total"] = time.perf_counter() - started
    if verbose:
        click.echo("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    code = result.exit_code
    if report_path is not None and not _write_report(report_path, report_json(result, _version())):
        code = EXIT_BAD_INPUT
    sys.exit(code)


def _parse_only(value: str | None) -> tuple[str, ...] | None:
    """--only's op types, each one the tool knows (a usage error otherwise: exit 2)."""
    if not value:
        return None
    from gqa_decompose.spec import DecomposeOptions

    ops = tuple(op.strip() for op in value.split(",") if op.strip())
    try:
        DecomposeOptions(ops=ops)
    except GqaDecomposeError as error:
        raise click.BadParameter(str(error), param_hint="--only") from None
    return ops


def _version() -> str:
    try:
        return importlib.metadata.version("gqa-decompose")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parse_dims(dims: tuple[str, ...]) -> dict[str, int]:
    parsed = {}
    for item in dims:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise click.BadParameter(f"expected NAME=VALUE with a whole number, got {item!r}", param_hint="--dim")
        parsed[name.strip()] = int(value)
    return parsed


@dataclasses.dataclass
class _Run:
    """What the command line asked for, besides the rewrite's options."""

    model_path: pathlib.Path
    verify_mode: str
    steps: int
    batch: int | None
    dims: dict[str, int]
    inputs_path: pathlib.Path | None
    quiet: bool
    verbose: bool
    bars: dict = dataclasses.field(default_factory=dict)  # progress bars by kind of work

    @property
    def nodes(self) -> bool:
        return self.verify_mode in ("nodes", "all")

    @property
    def whole_model(self) -> bool:
        return self.verify_mode in ("model", "all")

    def progress(self, what: str, done: int, total: int) -> None:
        """The API's progress callback: one bar per kind of work, created on first use."""
        if what not in self.bars:
            description, unit = _BARS[what]
            self.bars[what] = _Progress(description, self.quiet, unit)
        bar = self.bars[what]
        bar.update(done, total)
        if done == total:
            bar.close()

    def close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()


# What each kind of work the API reports progress on is called on its bar, and what it counts.
_BARS = {
    "rewrite": ("decomposing", "node"),
    "nodes": ("verifying nodes", "node"),
    "model": ("verifying model", "step"),
    "save": ("saving tensors", "tensor"),
}


def _echo_model_verification(run: _Run, result: ModelVerification | None) -> None:
    if result is None:
        return
    click.echo(result.summary())
    if run.verbose:
        for line in _step_lines(result):
            click.echo(line)
        for other in result.also:  # the other cache forms driven
            click.echo(f"  with a {other.cache_layout}:")
            for line in _step_lines(other):
                click.echo(line)


def _run_decompose(run: _Run, output: str | None, options: DecomposeOptions, reuse_data: bool) -> CheckResult:
    from gqa_decompose.api import decompose_file
    from gqa_decompose.report import decompose_report

    try:
        done = decompose_file(
            run.model_path,
            output,
            options=options,
            verify=run.verify_mode,
            steps=run.steps,
            batch=run.batch,
            dims=run.dims,
            feeds=run.inputs_path,
            reuse_data=reuse_data,
            # Only an -o that names a folder (a trailing /) asks for folders to be created.
            create_folders=bool(output) and output.endswith(("/", "\\")),
            progress=run.progress,
            raise_on_failure=False,
        )
    finally:
        run.close_bars()
    result = decompose_report(str(run.model_path), options, run.verify_mode, done)
    _echo_decomposed(run, options, result, done)
    return result


def _echo_decomposed(run: _Run, options: DecomposeOptions, result: CheckResult, done: DecomposeFileResult) -> None:
    """What decompose_file() did, stage by stage as far as it got: the nodes, the companion ops, the model-level
    run, and what was written (or why not)."""
    if result.raised_opset is not None:
        click.echo("note: default-domain opset raised from {} to {} (--raise-opset)".format(*result.raised_opset))
    if done.error is None and not done.nodes and not done.ops:
        click.echo(f"{run.model_path}: no com.microsoft.GroupQueryAttention node; nothing to do, nothing written")
        return
    for node in result.nodes:
        click.echo(
            f"{node.name}: decomposed ({', '.join(node.spec.features(node.lowering))}) into "
            f"{node.new_nodes} nodes{_target_text(options, node.target, node.fallback)}; "
            f"{_verification_text(node.verification)}"
        )
        if run.verbose:
            for line in _phase_lines(node.verification):
                click.echo(line)
    _echo_op_nodes(result.op_nodes, "decomposed")
    _echo_model_verification(run, result.model_verification)
    if done.ops_left is not None and result.non_standard_ops:
        click.echo(f"note: the model still holds non-standard ops: {', '.join(result.non_standard_ops)}")
    if done.error is not None:
        click.echo(f"error: {done.error}", err=True)
    elif not result.verified:
        click.echo("error: verification failed; nothing written", err=True)
    else:
        click.echo(f"wrote {', '.join(str(p) for p in done.written)}")


def _echo_op_nodes(entries: list[dict], done: str) -> None:
    """One line per companion op type: how many nodes, and their verification; one per refused node."""
    by_type: dict[str, list[dict]] = {}
    for entry in entries:
        if entry["status"] == "refused":
            click.echo(f"{entry['name']} ({entry['op_type']}): REFUSED: {entry['reason']}")
        else:
            by_type.setdefault(entry["op_type"], []).append(entry)
    for op_type, items in by_type.items():
        new_nodes = sum(entry["new_nodes"] or 0 for entry in items)
        checked = [entry for entry in items if entry["verified"] is not None]
        text = "not verified"
        if checked:
            failed = [entry["name"] for entry in checked if not entry["verified"]]
            worst = max((e for entry in checked for e in entry["max_abs_error"].values()), default=0.0)
            text = f"FAILED: {', '.join(failed)}" if failed else f"verified alone, max error {worst:.3g}"
        into = f" into {new_nodes} nodes" if new_nodes else ""
        click.echo(f"{op_type}: {len(items)} node(s) {done}{into}; {text}")


def _run_check(run: _Run, options: DecomposeOptions, runtime_names: tuple[str, ...] = ()) -> CheckResult:
    from gqa_decompose.report import check

    result = check(
        run.model_path,
        verify_mode=run.verify_mode,
        steps=run.steps,
        batch=run.batch,
        dims=run.dims,
        feeds=run.inputs_path,
        progress=run.progress,
        runtimes=runtime_names,
        options=options,
    )
    run.close_bars()
    for entry in result.nodes:
        if entry.status == "refused":
            click.echo(f"{entry.name}: REFUSED: {entry.reason}")
            continue
        click.echo(
            f"{entry.name}: decomposable ({', '.join(entry.spec.features(entry.lowering))})"
            f"{_target_text(options, entry.target, entry.fallback)}; {_verification_text(entry.verification)}"
        )
        if run.verbose:
            for line in _phase_lines(entry.verification):
                click.echo(line)
    _echo_op_nodes(result.op_nodes, "decomposable")
    if run.whole_model and result.model_verification is None and any(n.status == "refused" for n in result.nodes):
        click.echo("model not verified (a node is refused)")
    _echo_model_verification(run, result.model_verification)
    # A refused GQA node stays in the report's ops_left; its line above already says so.
    remaining = [op for op in result.non_standard_ops if op != "com.microsoft::GroupQueryAttention"]
    if remaining:
        click.echo(f"non-standard ops besides GroupQueryAttention: {', '.join(remaining)}")
    if not result.nodes:
        click.echo("no com.microsoft.GroupQueryAttention node")
    verdict = "portable" if result.portable_once_decomposed else "NOT portable"
    click.echo(f"{run.model_path}: {verdict} once decomposed")
    if runtime_names and not result.runtime_checks:
        click.echo("not run on any runtime: a node is refused")
    for checked in result.runtime_checks:
        _echo_runtime_check(run.model_path, checked)
    return result


def _echo_runtime_check(model_path: pathlib.Path, result: RuntimeCheck) -> None:
    """What the rewritten model (and each GQA node) did on one runtime."""
    from gqa_decompose.runtime_check import PROMPT_LENGTH

    name = result.runtime
    label = f"{name} {result.version}" if result.version else name
    if result.unavailable:
        click.echo(f"{name}: NOT AVAILABLE: {result.unavailable}")
        return
    for node in result.nodes.nodes if result.nodes is not None else ():
        click.echo(f"{node.name}: on {label}: {_verification_text(node)}")
    model_run = result.model
    if model_run.passed:
        click.echo(
            f"{label}: the rewritten model runs a prompt (batch 1, {PROMPT_LENGTH} tokens), "
            f"max error {model_run.max_error or 0.0:.2g} against {_oracle_text(model_run.oracle)}"
        )
    else:
        oracle = f" (oracle: {model_run.oracle})" if model_run.max_errors else ""
        click.echo(f"{label}: the rewritten model FAILS: {model_run.failure}{oracle}")
    click.echo(f"{model_path}: {'runs' if result.passed else 'does NOT run'} on {label} once decomposed")
