"""ONNX Runtime's own ``test_gqa_cpu.py``, run as it is, with every session's model passed through ``decompose()``.

ORT tests its CPU GroupQueryAttention kernel in ``onnxruntime/test/python/transformers/test_gqa_cpu.py``
(``TestGQA``: three unittest methods looping over 624 parity checks against a torch reference). This script imports
ORT's file unchanged and monkeypatches the one place it creates sessions, the module-level name
``InferenceSession``: each model the file builds is passed through ``gqa_decompose.decompose()`` (default options)
before ORT CPU loads it. The parity checks (``parity_check_gqa_*``) are wrapped so that one failing check does not
stop its test method: each check is one case, counted and listed.

Each case runs twice from the same random state (torch's and Python's): first on the original graph (ORT's own
verdict; a case ORT fails there is *skipped*, not counted against the rewrite), then on the rewrite. Outcomes of
the rewrite run: ``passed``, ``failed`` (the file's assertion or ``allclose``; the max |rewrite - original| of
output and presents is given), ``refused`` (GqaDecomposeError), ``error`` (any other exception).

One adaptation, to both runs: ``onnx.helper.make_model`` of onnx >= 1.20 writes IR 14 / opset 28, which ORT 1.31
does not load, so the IR version and the default-domain opset of each model are lowered to 10 / 21 (the node is
a com.microsoft one; nothing else changes). Without it ORT's file fails every case on the original already.

ORT's file needs torch, einops and its sibling ``bert_padding.py``; run it from a venv that has them
(``/work/venvs/fixtures``: torch 2.13.0 CPU) with ``PYTHONPATH`` at the repository. ORT's two files are not part
of this repository: put them in ``scripts/ort_suite/`` (see its README.md for the commit and the checksums).

    PYTHONPATH=$PWD /work/venvs/fixtures/bin/python scripts/ort_test_gqa_cpu.py --json out.json
    ... scripts/ort_test_gqa_cpu.py --tests past --limit 10     # the first 10 cases of test_gqa_past
    ... scripts/ort_test_gqa_cpu.py --legacy-window             # decompose(legacy_window=True)

This version of the file checks local windows against ORT <= 1.23's reading of ``local_window_size`` (W + 1
visible keys); ORT 1.31 fails those checks on the original graph, so they count as skipped. ``--legacy-window``
rewrites with that reading instead, to show the rewrite passes the file's own reference there too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gqa_decompose  # noqa: E402

SUITE_DIR = REPO / "scripts" / "ort_suite"
# microsoft/onnxruntime, onnxruntime/test/python/transformers/, at the commits in scripts/ort_suite/README.md
CHECKSUMS = {
    "test_gqa_cpu.py": "2a4c2df0d799f33a9a098fae893ac0e823065ee6377dd0b80f80a12a9d8af9ef",
    "bert_padding.py": "cb067446cba3b603f8fc569f6b5bda628a2865de741ff20be4bbc6bae4257713",
}
IR_VERSION, OPSET = 10, 21
TESTS = {"no_past": "test_gqa_no_past", "past": "test_gqa_past", "interactive": "test_gqa_interactive_one_batch"}
CHECKS = (
    "parity_check_gqa_prompt",
    "parity_check_gqa_prompt_no_buff",
    "parity_check_gqa_past",
    "parity_check_gqa_past_no_buff",
)
FLAGS = ("local", "rotary", "rotary_interleaved", "packed", "softcap", "use_smooth_softmax", "do_custom_tree_attention")


def load_suite(suite_dir: Path):
    """Import ORT's test file from ``suite_dir``; warn when a file differs from the recorded version."""
    for name, digest in CHECKSUMS.items():
        path = suite_dir / name
        if not path.is_file():
            sys.exit(f"error: {path} is missing: see scripts/ort_suite/README.md")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            print(f"warning: {name} is not the recorded version (sha256 differs)", file=sys.stderr)
    sys.path.insert(0, str(suite_dir))
    return importlib.import_module("test_gqa_cpu")


def lowered(model_bytes: bytes) -> onnx.ModelProto:
    """The model as ORT 1.31 loads it: IR 10, default-domain opset 21 (see the module docstring)."""
    model = onnx.load_from_string(model_bytes)
    model.ir_version = IR_VERSION
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    return model


class Harness:
    """The monkeypatches: a session factory that rewrites the model when ``rewrite`` is set, and the case wrappers."""

    def __init__(self, suite, options: dict | None = None) -> None:
        self.suite = suite
        self.options = options or {}  # decompose() options; the default run uses none
        self.rewrite = False
        self.outputs: dict[bool, tuple] = {}  # rewrite flag -> (output, present_k, present_v) of the last run
        self.results: list[dict] = []

    def install(self) -> None:
        suite = self.suite
        suite.InferenceSession = self.session
        suite.print = lambda *args, **kwargs: None  # the file prints one line per check
        for name in ("gqa_prompt_func", "gqa_past_func"):
            setattr(suite, name, self._recording(getattr(suite, name)))
        for name in CHECKS:
            setattr(suite, name, self._case(name, getattr(suite, name)))

    def session(self, model_bytes, sess_options=None, providers=None, **kwargs):
        model = lowered(model_bytes)
        if self.rewrite:
            model = gqa_decompose.decompose(model, **self.options)
        return ort.InferenceSession(model.SerializeToString(), sess_options, providers=providers, **kwargs)

    def _recording(self, func):
        def recorded(*args, **kwargs):
            result = func(*args, **kwargs)
            self.outputs[self.rewrite] = tuple(np.asarray(r) for r in result)
            return result

        return recorded

    def _attempt(self, check, args, kwargs) -> tuple[str, str]:
        try:
            return ("passed", "") if check(*args, **kwargs) else ("failed", "allclose(output) is False")
        except gqa_decompose.GqaDecomposeError as error:
            return "refused", first_line(error)
        except AssertionError:
            return "failed", "assert allclose(present) failed"
        except Exception as error:  # noqa: BLE001 - ORT's verdict, recorded
            return "error", f"{type(error).__name__}: {first_line(error)}"

    def _case(self, name, check):
        def case(config, **kwargs):
            state = torch_state(self.suite), random.getstate()
            self.outputs.clear()
            self.rewrite = False
            original, original_detail = self._attempt(check, (config,), kwargs)
            restore_state(self.suite, state)
            self.rewrite = True
            outcome, detail = self._attempt(check, (config,), kwargs)
            self.rewrite = False
            result = {"case": case_name(name, config, kwargs), "outcome": outcome, "detail": detail}
            if original != "passed":  # ORT's own verdict on its own graph: not counted against the rewrite
                result = {**result, "outcome": "skipped", "detail": original_detail, "rewrite": [outcome, detail]}
            self.results.append({**result, **self._errors()})
            return True  # the test method goes on to the next check

        return case

    def _errors(self) -> dict:
        if set(self.outputs) != {False, True}:
            return {}
        errors = {}
        for label, want, have in zip(
            ("output", "present_key", "present_value"), self.outputs[False], self.outputs[True]
        ):
            errors[label] = float(np.max(np.abs(have - want))) if have.shape == want.shape and want.size else None
        return {"max_error_vs_original": errors}


def torch_state(suite):
    return suite.torch.get_rng_state()


def restore_state(suite, state) -> None:
    suite.torch.set_rng_state(state[0])
    random.setstate(state[1])


def first_line(error: Exception) -> str:
    """ORT's status message (what follows "Status Message: "), else the message's first line or two."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = " ".join(lines[:2]) if lines[0].endswith("following indices") else lines[0]
    return line.split("Status Message: ", 1)[-1]


def case_name(check: str, config, kwargs: dict) -> str:
    """``check`` B/S/kv/N/Nkv/H and the flags that are on, e.g. ``past_no_buff B1 S1 kv128 9/3 H64 local packed``."""
    sequence = getattr(config, "q_sequence_length", None) or config.sequence_length
    flags = [f"{k}={kwargs[k]}" if k == "softcap" else k for k in FLAGS if kwargs.get(k)]
    shape = f"B{config.batch_size} S{sequence} kv{config.kv_sequence_length} {config.num_heads}/{config.kv_num_heads}"
    return " ".join([check.removeprefix("parity_check_gqa_"), shape, f"H{config.head_size}", *flags])


class Stop(Exception):
    """Raised by the case wrapper once ``--limit`` cases ran."""


def run(suite, harness: Harness, tests: list[str], limit: int | None) -> dict[str, str]:
    """Run the chosen TestGQA methods; returns each method's unittest verdict."""
    if limit is not None:
        for name in CHECKS:
            inner = getattr(suite, name)

            def limited(config, _inner=inner, **kwargs):
                if len(harness.results) >= limit:
                    raise Stop
                return _inner(config, **kwargs)

            setattr(suite, name, limited)
    verdicts = {}
    for key in tests:
        method = TESTS[key]
        start = len(harness.results)
        test = suite.TestGQA(method)
        outcome = test.defaultTestResult()
        with contextlib.suppress(Stop):
            test.run(outcome)
        problems = outcome.errors + outcome.failures
        stopped = any("Stop" in text for _, text in problems)
        ran = len(harness.results) - start
        verdicts[method] = (
            f"{ran} checks"
            + (" (limit)" if stopped else "")
            + ("" if stopped or not problems else f"; unittest: {problems[0][1].strip().splitlines()[-1]}")
        )
    return verdicts


def summarize(results: list[dict], verdicts: dict[str, str], seconds: float) -> str:
    counts = collections.Counter(r["outcome"] for r in results)
    lines = [
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}; {seconds:.0f} s",
        f"cases run: {len(results)}; passed {counts['passed']}, failed {counts['failed']}, "
        f"refused {counts['refused']}, error {counts['error']}, skipped (ORT fails the original) {counts['skipped']}",
    ]
    lines += [f"  {method}: {verdict}" for method, verdict in verdicts.items()]
    worst = {}
    for r in results:
        for label, error in r.get("max_error_vs_original", {}).items():
            if r["outcome"] == "passed" and error is not None:
                worst[label] = max(worst.get(label, 0.0), error)
    if worst:
        worst_text = ", ".join(f"{label} {error:.3g}" for label, error in worst.items())
        lines.append(f"largest |rewrite - original| over passed cases: {worst_text}")
    bad = [r for r in results if r["outcome"] in ("failed", "refused", "error")]
    if bad:
        lines.append("failures:")
        lines += [f"  {r['case']}: {r['outcome']}: {r['detail']} {r.get('max_error_vs_original', '')}" for r in bad]
    skipped = collections.Counter(r["detail"] for r in results if r["outcome"] == "skipped")
    if skipped:
        lines.append("skipped, by ORT's message on the original:")
        lines += [f"  {n} x {detail}" for detail, n in skipped.most_common()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite-dir", type=Path, default=SUITE_DIR, help="where ORT's test_gqa_cpu.py is")
    parser.add_argument("--tests", nargs="+", choices=sorted(TESTS), default=list(TESTS))
    parser.add_argument("--limit", type=int, help="stop after this many cases (over all tests)")
    parser.add_argument("--json", type=Path, help="write every case's outcome here")
    parser.add_argument(
        "--legacy-window",
        action="store_true",
        help="decompose with legacy_window=True (ORT <= 1.23's local_window_size, as this file's reference)",
    )
    args = parser.parse_args()
    ort.set_default_logger_severity(4)  # the cases ORT rejects log an error line each
    suite = load_suite(args.suite_dir)
    harness = Harness(suite, {"legacy_window": True} if args.legacy_window else None)
    harness.install()
    start = time.perf_counter()
    verdicts = run(suite, harness, args.tests, args.limit)
    seconds = time.perf_counter() - start
    print(summarize(harness.results, verdicts, seconds))
    if args.json:
        args.json.write_text(json.dumps({"verdicts": verdicts, "cases": harness.results}, indent=1))
    return 1 if any(r["outcome"] in ("failed", "refused", "error") for r in harness.results) else 0


if __name__ == "__main__":
    sys.exit(main())
