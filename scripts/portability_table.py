"""Run the portability matrix (runtime x target x feature group) and write the table in docs/portability.md.

Every cell runs the cases of tests/portability_cases.py: one-GQA-node models over
every phase their shapes admit, the expansion on the runtime against ONNX Runtime
CPU's fused node (same inputs and tolerances as ``verify``), plus the tiny Llama's
prompt and decode steps with presents fed back. Targets: ``primitives`` (the
default), ``attention`` when ``DecomposeOptions`` has a ``target`` field, and
``none (fused GQA)``: the original node on the runtime, no rewrite. A summary
table comes first: per runtime, the original model's column and each target's.

Each runtime's cells are kept in ``docs/portability-cells.json``: the compilers
and the browser take long (a compile per case, or per input shape), so a run can
redo some runtimes and keep the others' last results (their versions say when).

    python scripts/portability_table.py                      # every installed runtime; rewrites docs/portability.md
    python scripts/portability_table.py --runtime iree tvm   # only these again, the others from the JSON
    python scripts/portability_table.py --runtime tvm --resume   # only tvm's cells not in the JSON yet
    python scripts/portability_table.py --runtime            # runs nothing: the table from the JSON
    python scripts/portability_table.py --stdout             # prints the table only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from portability_cases import (  # noqa: E402
    CASES,
    FUSED,
    PORTABLE_RUNTIMES,
    PRIMITIVES,
    failures,
    run_case,
    run_whole_model,
    targets,
)

from gqa_decompose import runtimes  # noqa: E402

BEGIN, END = "<!-- portability:begin -->", "<!-- portability:end -->"
RUNTIMES = ("onnxruntime", *PORTABLE_RUNTIMES, "wasm", "webnn", "iree", "tvm", "litert")
CELLS = REPO / "docs" / "portability-cells.json"
WHOLE_MODEL = {
    "growing": "tiny Llama: prompt + 3 decode steps, growing cache",
    "static": "tiny Llama: prompt + 3 decode steps, static buffer",
}
WHOLE_MODEL_TOLERANCE = 1e-4
# Runtime profiles (--runtime-profile) run on a runtime besides the default forms, as a target of their own.
PROFILES = {"openvino": ("openvino",), "webnn": ("webnn",), "litert": ("litert",)}


def _profile_target(profile: str) -> str:
    return f"{PRIMITIVES}, --runtime-profile {profile}"


def _targets(results: dict[str, dict] | None = None) -> list[str]:
    """The rewrite's targets, then the profile targets (those some result has, when ``results`` is given)."""
    profiles = dict.fromkeys(p for ps in PROFILES.values() for p in ps)
    extra = [_profile_target(p) for p in profiles]
    if results is not None:
        extra = [t for t in extra if any(t in r["cells"] for r in results.values())]
    return [*targets(), *extra]


def _target_and_profile(target: str) -> tuple[str, str]:
    prefix = f"{PRIMITIVES}, --runtime-profile "
    return (PRIMITIVES, target[len(prefix) :]) if target.startswith(prefix) else (target, "portable")


def _reason(message: str) -> str:
    """A failure message without node numbers and names, so equal causes share a footnote."""
    message = re.sub(r"^\w+ failed: ", "", message)
    message = re.sub(r"#\d+ ", "", message)
    message = re.sub(r'"[^"]*"', "", message)
    message = re.sub(r"'[^' ]*_\d+'", "", message)
    message = re.sub(r"\b([A-Za-z]+)_\d+\b", r"\1", message)  # OpenVINO's run-dependent op numbers
    message = re.sub(r"\s+", " ", message).strip()
    return message[:220]


class Footnotes:
    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}

    def mark(self, runtime: str, message: str) -> str:
        text = f"{runtime}: {_reason(message)}"
        number = self.reasons.setdefault(text, len(self.reasons) + 1)
        return f"[{number}]"


def _case_cell(runtime: str, target: str, group: str) -> dict:
    """{"text": ..., "failure": the first failure's message or None, "passed": cases passed, "cases": count}."""
    target, profile = _target_and_profile(target)
    phases = passed = 0
    worst = 0.0
    first_failure = None
    failed_cases = []
    for case in (c for c in CASES if c.group == group):
        result = run_case(case, runtime, target, profile)
        problems = failures(result)
        phases += max(len(result.results), 1)
        passed += sum(r.passed for r in result.results)
        worst = max(worst, result.max_error or 0.0)
        if problems:
            failed_cases.append(case.name)
        if problems and first_failure is None:
            phase, message = problems[0].split(": ", 1) if ": " in problems[0] else ("", problems[0])
            # A wrong value says in which phase; a refusal reads the same in every phase.
            first_failure = f"{message} ({case.name}, {phase})" if "differs" in message else message
    count = sum(c.group == group for c in CASES)
    cell = {"failure": first_failure, "passed": count - len(failed_cases), "cases": count}
    if first_failure is None:
        return {**cell, "text": f"pass ({phases} runs, max err {worst:.0e})"}
    which = "all cases" if len(failed_cases) == count else ", ".join(failed_cases)
    return {**cell, "text": f"**FAIL** {phases - passed}/{phases} runs ({which})"}


def _model_cell(runtime: str, target: str, cache: str) -> dict:
    target, profile = _target_and_profile(target)
    try:
        error = run_whole_model(runtime, cache, target, profile=profile)
    except Exception as failure:  # noqa: BLE001 - a runtime's failure is a table entry
        message = str(failure).splitlines()[0] if str(failure) else repr(failure)
        return {"text": "**FAIL**", "failure": message, "passed": 0, "cases": 1}
    if error < WHOLE_MODEL_TOLERANCE:
        return {"text": f"pass (max err {error:.0e})", "failure": None, "passed": 1, "cases": 1}
    return {"text": "**FAIL**", "failure": f"differs from ONNX Runtime by {error:.3g}", "passed": 0, "cases": 1}


def run_runtime(runtime: str, log=print, save=None, done: dict | None = None) -> dict:
    """Every cell of ``runtime``: {"version": ..., "cells": {target: {row: cell}}}; ``save`` gets the cells so
    far after each row (a long run that stops keeps them; the table says "not run" for the rest). ``done``:
    an earlier run's result, whose cells are kept when its version is the installed one (``--resume``).

    The quick rows first: the tiny Llama's, then the original node's (most runtimes refuse it at once), then
    the rewrite's cases."""
    version = runtimes.get_runtime(runtime).version()
    result: dict = {"version": version, "cells": {}}
    if done is not None and done.get("version") == version:
        result["cells"] = done["cells"]
    groups = list(dict.fromkeys(case.group for case in CASES))
    profile_targets = [_profile_target(profile) for profile in PROFILES.get(runtime, ())]
    work = [
        (target, label, partial(_model_cell, runtime, target, cache))
        for target in [*targets(), *profile_targets, FUSED]
        for cache, label in WHOLE_MODEL.items()
    ]
    for target in [FUSED, *targets(), *profile_targets]:
        work += [(target, _group_label(group), partial(_case_cell, runtime, target, group)) for group in groups]
    for target, label, cell in work:
        rows = result["cells"].setdefault(target, {})
        if label in rows:
            continue
        log(f"{runtime}, {target}: {label}")
        rows[label] = cell()
        if save is not None:
            save(result)
    return result


def _verdict(cell: dict) -> str:
    return "not run" if cell is _NOT_RUN else "pass" if cell["failure"] is None else "fail"


def _rows() -> list[str]:
    """The tables' rows in the cases' order (the JSON sorts them)."""
    return [_group_label(group) for group in dict.fromkeys(case.group for case in CASES)] + list(WHOLE_MODEL.values())


def _group_label(group: str) -> str:
    count = sum(case.group == group for case in CASES)
    return f"{group} ({count} case{'s' if count > 1 else ''})"


def build_table(results: dict[str, dict]) -> str:
    """The summary and the per-target tables, from :func:`run_runtime`'s results by runtime."""
    chosen = [r for r in RUNTIMES if r in results]
    versions = ", ".join(
        f"{name} {results[name]['version']}" + (" (onnx.reference)" if name == "reference" else "") for name in chosen
    )
    missing = [r for r in RUNTIMES if r not in results]
    notes = Footnotes()
    lines = [
        "Generated by `python scripts/portability_table.py` (do not edit by hand). "
        f"Versions: {versions}." + (f" Not installed or not run, left out: {', '.join(missing)}." if missing else ""),
        "",
        *_summary(results, chosen),
        "",
    ]
    for target in [*_targets(results), FUSED]:
        # A profile's table has the runtimes it ran on only.
        shown = [r for r in chosen if target in results[r]["cells"]] if "--runtime-profile" in target else chosen
        lines += [f"**target: {target}**", "", "| feature group | " + " | ".join(shown) + " |"]
        lines.append("|---|" + "---|" * len(shown))
        for row in _rows():
            cells = []
            for runtime in shown:
                cell = results[runtime]["cells"].get(target, {}).get(row, _NOT_RUN)
                mark = f" {notes.mark(runtime, cell['failure'])}" if cell["failure"] else ""
                cells.append(cell["text"] + mark)
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    if notes.reasons:
        lines += [f"[{number}] {text}  " for text, number in notes.reasons.items()]
    return "\n".join(lines).rstrip() + "\n"


_NOT_RUN = {"text": "not run", "failure": None, "passed": 0, "cases": 0}


def _summary(results: dict[str, dict], chosen: list[str]) -> list[str]:
    """Per runtime: one-node cases passed, and the tiny Llama's two runs, for the original and each target."""
    columns = [FUSED, *_targets(results)]
    titles = {FUSED: "original model (fused GQA)", PRIMITIVES: "rewritten: primitives (default)"}
    lines = [
        "**Summary**: one-GQA-node cases that pass every phase, and the tiny Llama (prompt + 3 decode steps, "
        "growing / static cache).",
        "",
        "| runtime | " + " | ".join(titles.get(c, f"rewritten: {c}") for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for runtime in chosen:
        cells = []
        for target in columns:
            if "--runtime-profile" in target and target not in results[runtime]["cells"]:
                cells.append("—")  # a profile for another runtime
                continue
            rows = results[runtime]["cells"].get(target, {})
            groups = [cell for row, cell in rows.items() if row not in WHOLE_MODEL.values()]
            passed, count = sum(c["passed"] for c in groups), sum(c["cases"] for c in groups)
            model = " / ".join(_verdict(rows.get(label, _NOT_RUN)) for label in WHOLE_MODEL.values())
            total = sum(case.group != "" for case in CASES)
            ran = f"{passed}/{count} cases" + (f" ({count} of {total} run)" if count < total else "")
            ran = "cases not run" if count == 0 else ran
            cells.append(f"{ran}; tiny Llama {model}")
        lines.append(f"| {runtime} | " + " | ".join(cells) + " |")
    return lines


def _saver(runtime: str):
    def save(cells: dict) -> None:
        # Read again before each write: two runs (of other runtimes) can go side by side.
        results = json.loads(CELLS.read_text()) if CELLS.exists() else {}
        CELLS.write_text(json.dumps({**results, runtime: cells}, indent=1, sort_keys=True) + "\n")

    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stdout", action="store_true", help="print the table instead of writing docs/portability.md")
    parser.add_argument(
        "--runtime", nargs="*", choices=RUNTIMES, help="run only these, the others from the JSON (none: only render)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the cells a runtime's same version has in the JSON")
    args = parser.parse_args()
    available = runtimes.available_runtimes()
    for runtime in args.runtime if args.runtime is not None else [r for r in RUNTIMES if r in available]:
        done = json.loads(CELLS.read_text()).get(runtime) if args.resume and CELLS.exists() else None
        run_runtime(runtime, log=lambda message: print(message, file=sys.stderr), save=_saver(runtime), done=done)
    table = build_table(json.loads(CELLS.read_text()) if CELLS.exists() else {})
    if args.stdout:
        print(table)
        return
    readme = REPO / "docs" / "portability.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")
    print(f"wrote the portability table into {readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
