"""The command line: options -> API call -> report -> exit code."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable

import click
import onnx_ir as ir
import tqdm

from gqa_decompose import model_io
from gqa_decompose.api import check_nodes, foreign_ops, rewrite
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.passes import InferGqaTypesPass, find_gqa_nodes
from gqa_decompose.runtime_check import PROMPT_LENGTH, check_runtime
from gqa_decompose.runtimes import get_runtime
from gqa_decompose.spec import DecomposeOptions
from gqa_decompose.verify import NodeVerification, verify

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

_EPILOG = """\b
Examples:
  gqa-decompose model.onnx                   writes model.decomposed.onnx, verified
  gqa-decompose model.onnx -o out/model.onnx --report report.json
  gqa-decompose model.onnx --check           portability check for CI, writes nothing
  gqa-decompose model.onnx --check --runtime openvino --runtime tract
                                             ... and run the rewritten model on those runtimes

\b
Exit codes:
  0  success (with --check: the model is portable once decomposed)
  1  verification against ONNX Runtime failed (nothing is written), or with
     --check: a node is refused, fails verification, or other non-standard ops remain,
     or the rewritten model fails on a --runtime
  2  bad input: unreadable or malformed model, a refused node, bad paths

Weights are never loaded into memory (but for --runtime, which runs the model):
external data is streamed into <OUTPUT>.data. The output appears atomically; the input is never modified.
"""


def _progress_bar(description: str, quiet: bool) -> tuple[tqdm.tqdm, Callable[[int, int], None]]:
    bar = tqdm.tqdm(desc=description, unit="node", disable=True if quiet else None, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def _verification_json(result: NodeVerification | None) -> dict | None:
    if result is None:
        return None
    return {
        "passed": result.passed,
        "skipped": result.skipped,
        "refused": result.refused,
        "max_error": result.max_error,
        "phases": [
            {
                "phase": r.phase.name,
                "passed": r.passed,
                "max_errors": r.max_errors,
                "failure": r.failure,
            }
            for r in result.results
        ],
    }


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
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option(
    "-o",
    "--output",
    type=str,
    help="Where to write the rewritten model: a file, or a folder (existing, or ending in '/') "
    "to write <MODEL stem>.decomposed.onnx into. Default: beside MODEL.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the node-by-node comparison with ONNX Runtime CPU (on by default).",
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
    "onnxruntime, reference (onnx.reference), openvino, tract; repeatable. Each GQA node's "
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
    help="'any': growing or static, ragged or not, decided at run time (two copies of the cache "
    "per layer and step; one with --fast-paths except for a ragged growing batch). 'static': promise past is always a "
    "max-length buffer (T <= past length); 'growing': promise past grows by the new rows "
    "(T = past + new) with batch rows aligned after the first prompt. A promise emits only its "
    "path; a run that breaks it fails instead of computing anything wrong. With 'static' or "
    "'any', a runtime that binds present to past gets an in-place write. 'auto': "
"static when a genai_config.json beside MODEL sets past_present_share_buffer, else any.",
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
    "without a --kv-cache promise. For ONNX Runtime and OpenVINO; tract cannot run them.",
)
@click.option(
    "--reuse-data",
    is_flag=True,
    help="Let the output refer to the input's external-data file instead of writing its own "
    "copy of the weights (seconds instead of minutes for multi-GB models). The output must be "
    "in the input's folder, and depends on that file.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; only the summary lines.")
@click.version_option(package_name="gqa-decompose")
def main(
    model: pathlib.Path,
    output: str | None,
    no_verify: bool,
    report_path: pathlib.Path | None,
    check: bool,
    runtime_names: tuple[str, ...],
    legacy_window: bool,
    kv_cache: str,
    native_precision: bool,
    fast_paths: bool,
    reuse_data: bool,
    quiet: bool,
) -> None:
    """Rewrite com.microsoft.GroupQueryAttention nodes of MODEL into standard ONNX ops.

    Every GQA node (main graph, If/Loop bodies, model-local functions) is
    replaced by Reshape/Transpose/ScatterND/MatMul/Softmax/... at the model's
    own opset. Each node is then checked against ONNX Runtime CPU on
    synthesized inputs (first prompt, ragged decode, chunked prefill), and the
    model is written only if every node matches.
    """
    static_kv_cache = kv_cache == "static" or (
        kv_cache == "auto" and model_io.genai_shares_kv_buffer(model)
    )
    if kv_cache == "auto" and static_kv_cache:
        click.echo("note: genai_config.json shares past/present buffers: assuming a static KV buffer "
                   "(--kv-cache any to keep the growing-cache path)")
    options = DecomposeOptions(
        legacy_window=legacy_window,
        static_kv_cache=static_kv_cache,
        growing_kv_cache=kv_cache == "growing",
        native_precision=native_precision,
        fast_paths=fast_paths,
    )
    report: dict = {
        "model": str(model),
        "mode": "check" if check else "decompose",
        "options": dataclasses.asdict(options),
        "nodes": [],
    }
    try:
        if runtime_names and not check:
            raise GqaDecomposeError("--runtime needs --check (it runs the rewritten model in memory)")
        for name in runtime_names:
            get_runtime(name)  # an unknown name is bad input, before any work
        if check:
            code = _run_check(model, options, not no_verify, quiet, report, runtime_names)
        else:
            code = _run_decompose(model, output, options, not no_verify, quiet, report, reuse_data)
    except (GqaDecomposeError, OSError) as error:  # OSError: an output path that cannot be written
        report["error"] = str(error)
        report["exit_code"] = EXIT_BAD_INPUT
        _write_report(report_path, report)
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    report["exit_code"] = code
    if not _write_report(report_path, report):
        code = EXIT_BAD_INPUT
    sys.exit(code)


def _verify_nodes(original: ir.Model, options: DecomposeOptions, quiet: bool) -> dict[str, NodeVerification]:
    """verify() works on a copy: ``original`` is left as it is."""
    bar, update = _progress_bar("verifying", quiet)
    with bar:
        result = verify(original, progress=update, **dataclasses.asdict(options))
    return {node.name: node for node in result.nodes}


def _output_path(model_path: pathlib.Path, output: str | None) -> pathlib.Path:
    default = model_io.default_output_path(model_path)
    if not output:
        return default.absolute()
    path = pathlib.Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        return (path / default.name).absolute()
    return path.absolute()


def _run_decompose(
    model_path: pathlib.Path,
    output: str | None,
    options: DecomposeOptions,
    run_verify: bool,
    quiet: bool,
    report: dict,
    reuse_data: bool = False,
) -> int:
    target = _output_path(model_path, output)
    model = model_io.load_model(model_path)
    had_external_data = bool(model_io.external_tensors(model))
    model_io.check_output_path(model, target, external_data=had_external_data, reuse_input_data=reuse_data)
    original = model.clone() if run_verify else None  # tensors shared: no second load, no weights read
    bar, update = _progress_bar("decomposing", quiet)
    with bar:
        decomposed = rewrite(model, options, progress=update)
    if not decomposed:
        click.echo(f"{model_path}: no com.microsoft.GroupQueryAttention node; nothing to do, nothing written")
        report["output"] = None
        return EXIT_OK
    verifications = _verify_nodes(original, options, quiet) if run_verify else {}
    failed = False
    for entry in decomposed:
        verification = verifications.get(entry.name)
        failed |= verification is not None and not verification.passed and not verification.skipped
        click.echo(
            f"{entry.name}: decomposed ({', '.join(entry.spec.features())}) into "
            f"{entry.new_node_count} nodes; {_verification_text(verification)}"
        )
        report["nodes"].append(
            {
                "name": entry.name,
                "scope": entry.scope,
                "status": "decomposed",
                "features": entry.spec.features(),
                "new_nodes": entry.new_node_count,
                "verification": _verification_json(verification),
            }
        )
    remaining = foreign_ops(model)
    report["non_standard_ops"] = remaining
    if remaining:
        click.echo(f"note: the model still holds non-standard ops: {', '.join(remaining)}")
    if failed:
        report["output"] = None
        click.echo("error: verification failed; nothing written", err=True)
        return EXIT_FAILED
    bar, update = _progress_bar("saving tensors", quiet)
    with bar:
        written = model_io.save_model(
            model, target, external_data=had_external_data, reuse_input_data=reuse_data, progress=update
        )
    report["output"] = str(target)
    click.echo(f"wrote {', '.join(str(p) for p in written)}")
    return EXIT_OK


def _run_check(
    model_path: pathlib.Path,
    options: DecomposeOptions,
    run_verify: bool,
    quiet: bool,
    report: dict,
    runtime_names: tuple[str, ...] = (),
) -> int:
    model = model_io.load_model(model_path)
    InferGqaTypesPass()(model)
    checks = check_nodes(model, options)
    decomposable = [c for c in checks if c.refusal is None]
    verifications = _verify_nodes(model, options, quiet) if run_verify and decomposable else {}
    portable = True
    for entry in checks:
        verification = verifications.get(entry.name)
        if entry.refusal is not None:
            portable = False
            click.echo(f"{entry.name}: REFUSED: {entry.refusal}")
            report["nodes"].append({"name": entry.name, "status": "refused", "reason": entry.refusal})
            continue
        if verification is not None and not verification.passed and not verification.skipped:
            portable = False
        click.echo(
            f"{entry.name}: decomposable ({', '.join(entry.spec.features())}); {_verification_text(verification)}"
        )
        report["nodes"].append(
            {
                "name": entry.name,
                "status": "decomposable",
                "features": entry.spec.features(),
                "verification": _verification_json(verification),
            }
        )
    remaining = foreign_ops(model)
    report["non_standard_ops"] = remaining
    report["portable"] = portable and not remaining
    if remaining:
        click.echo(f"non-standard ops besides GroupQueryAttention: {', '.join(remaining)}")
    if not find_gqa_nodes(model):
        click.echo("no com.microsoft.GroupQueryAttention node")
    verdict = "portable" if report["portable"] else "NOT portable"
    click.echo(f"{model_path}: {verdict} once decomposed")
    runs_everywhere = True
    if runtime_names:
        if any(entry.refusal is not None for entry in checks):
            click.echo("not run on any runtime: a node is refused")
            runs_everywhere = False
        else:
            runs_everywhere = _run_on_runtimes(model_path, model, options, run_verify, runtime_names, report)
    return EXIT_OK if report["portable"] and runs_everywhere else EXIT_FAILED


def _run_on_runtimes(
    model_path: pathlib.Path,
    model: ir.Model,
    options: DecomposeOptions,
    run_verify: bool,
    runtime_names: tuple[str, ...],
    report: dict,
) -> bool:
    """Runs the rewritten model on each runtime; prints what fails; True if nothing does."""
    report["runtimes"] = []
    all_passed = True
    for name in dict.fromkeys(runtime_names):
        result = check_runtime(model, name, options, verify_nodes=run_verify)
        all_passed &= result.passed
        label = f"{name} {result.version}" if result.version else name
        entry = {"runtime": name, "version": result.version, "passed": result.passed}
        if result.unavailable:
            click.echo(f"{name}: NOT AVAILABLE: {result.unavailable}")
            entry["error"] = result.unavailable
            report["runtimes"].append(entry)
            continue
        entry["nodes"] = []
        for node in result.nodes.nodes if result.nodes is not None else ():
            click.echo(f"{node.name}: on {label}: {_verification_text(node)}")
            entry["nodes"].append({"name": node.name, "verification": _verification_json(node)})
        model_run = result.model
        if model_run.passed:
            click.echo(
                f"{label}: the rewritten model runs a prompt (batch 1, {PROMPT_LENGTH} tokens), "
                f"max error {model_run.max_error or 0.0:.2g} against the original on ONNX Runtime"
            )
        else:
            click.echo(f"{label}: the rewritten model FAILS: {model_run.failure}")
        entry["model"] = {"passed": model_run.passed, "max_errors": model_run.max_errors,
                          "failure": model_run.failure}
        report["runtimes"].append(entry)
        click.echo(f"{model_path}: {'runs' if result.passed else 'does NOT run'} on {label} once decomposed")
    return all_passed
