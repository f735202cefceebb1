"""The CI gate: ``--check`` exit codes with each ``--verify`` mode, the model-level options of the command line,
the versioned JSON report (keys, types, statuses) and the ``check()`` API."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model
from test_cli import GQA_NODES, run, run_process, scale_attention_by

import gqa_decompose
from gqa_decompose.report import REPORT_SCHEMA, REPORT_SCHEMA_VERSION

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_LLAMA = REPO / "models" / "tiny-llama-gqa.onnx"
BUILDER = REPO / "models" / "builder-tiny-llama"


# The report's schema (README "JSON report"): key -> type(s). A change here is a schema version change.
NUMBER = (int, float)
ERROR_VALUE = (int, float, str)  # "inf" / "nan" as strings
TOP_LEVEL = {
    "schema": str,
    "schema_version": int,
    "tool_version": str,
    "model": str,
    "mode": str,
    "status": str,
    "exit_code": int,
    "error": (str, type(None)),
    "portable": bool,
    "output": (str, type(None)),
    "options": dict,
    "opsets": dict,
    "ops_left": dict,
    "non_standard_ops": list,
    "timings": dict,
    "nodes": list,
    "model_verification": dict,
    "runtimes": list,
    "raised_opset": (list, type(None)),
    "op_nodes": list,
    "op_counts": dict,
}
NODE = {
    "name": str,
    "scope": str,
    "status": str,
    "reason": (str, type(None)),
    "config": (dict, type(None)),
    "features": list,
    "new_nodes": (int, type(None)),
    "verification": dict,
    "target": (str, type(None)),
    "fallback": (str, type(None)),
}
CONFIG = {
    "num_heads": int,
    "kv_num_heads": int,
    "head_size": int,
    "dtype": str,
    "packed_qkv": bool,
    "past": bool,
    "rotary": (str, type(None)),
    "local_window_size": (int, type(None)),
    "softcap": (float, type(None)),
    "kv_cache": str,
    "features": list,
}
NODE_VERIFICATION = {
    "status": str,
    "reason": (str, type(None)),
    "max_error": (*ERROR_VALUE, type(None)),
    "phases": list,
}
PHASE = {"phase": str, "passed": bool, "max_errors": dict, "failure": (str, type(None))}
MODEL_VERIFICATION = {
    "status": str,
    "reason": (str, type(None)),
    "batch": int,
    "prompt_length": int,
    "decode_steps": int,
    "cache_layout": str,
    "tolerance": dict,
    "notes": list,
    "max_errors": dict,
    "max_abs_error": dict,
    "token_agreement": dict,
    "steps": list,
}
STEP = {
    "step": int,
    "kind": str,
    "query_length": int,
    "total_lengths": list,
    "passed": bool,
    "failure": (str, type(None)),
    "tokens": (dict, type(None)),
    "outputs": dict,
}
STATUSES = {
    "report": {"ok", "failed", "portable", "not_portable", "error"},
    "node": {"decomposed", "decomposable", "refused"},
    "verification": {"passed", "failed", "skipped", "not_run"},
}


def _assert_keys(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), f"{where}: {sorted(set(obj) ^ set(schema))}"
    for key, types in schema.items():
        assert isinstance(obj[key], types), f"{where}.{key}: {type(obj[key]).__name__}"


def assert_valid_report(report: dict) -> None:
    """Every key and type the README documents, and only those; statuses from their sets."""
    _assert_keys(report, TOP_LEVEL, "report")
    assert report["schema"] == REPORT_SCHEMA and report["schema_version"] == REPORT_SCHEMA_VERSION
    assert report["status"] in STATUSES["report"]
    assert report["mode"] in {"decompose", "check"}
    assert report["options"]["verify"] in {"none", "nodes", "model", "all"}
    assert all(isinstance(v, int) for v in report["opsets"].values())
    for domain, ops in report["ops_left"].items():
        assert all(isinstance(n, int) and n > 0 for n in ops.values()), domain
    assert all(isinstance(v, NUMBER) and v >= 0 for v in report["timings"].values())
    for node in report["nodes"]:
        _assert_keys(node, NODE, "node")
        assert node["status"] in STATUSES["node"]
        assert (node["status"] == "refused") == (node["reason"] is not None)
        assert (node["status"] == "refused") == (node["target"] is None)
        assert node["target"] in {None, "primitives", "attention"}
        if node["config"] is not None:
            _assert_keys(node["config"], CONFIG, "config")
        verification = node["verification"]
        _assert_keys(verification, NODE_VERIFICATION, "node verification")
        assert verification["status"] in STATUSES["verification"]
        for phase in verification["phases"]:
            _assert_keys(phase, PHASE, "phase")
    model = report["model_verification"]
    assert model["status"] in STATUSES["verification"]
    if model["status"] in {"not_run", "skipped"} and "steps" not in model:
        assert set(model) == {"status", "reason"}
        return
    _assert_keys(model, MODEL_VERIFICATION, "model verification")
    assert set(model["tolerance"]) == {"atol", "rtol"}
    assert set(model["max_abs_error"]) == {"logits", "present", "other"}
    assert set(model["token_agreement"]) == {"agree", "compared"}
    assert len(model["steps"]) == model["decode_steps"] + 1
    for step in model["steps"]:
        _assert_keys(step, STEP, "step")
        assert step["kind"] == ("prompt" if step["step"] == 0 else "decode")
        for output in step["outputs"].values():
            assert set(output) == {"max_abs", "max_rel", "passed"}


def _report(path: pathlib.Path) -> dict:
    report = json.loads(path.read_text())
    assert_valid_report(report)
    return report


# --check exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "nodes", "model", "all"])
def test_check_on_a_portable_model_exits_0_with_every_verify_mode(tiny, mode):
    report_path = tiny.parent / "report.json"
    code, out, err = run(tiny, "--check", "--verify", mode, "--report", report_path)
    assert code == 0, out + err
    assert out.splitlines()[-1].endswith("portable once decomposed")
    assert ("model verified: prompt + 4 decode steps, batch 2" in out) == (mode in ("model", "all"))
    report = _report(report_path)
    assert report["status"] == "portable" and report["portable"] is True and report["exit_code"] == 0
    assert report["output"] is None
    assert [n["status"] for n in report["nodes"]] == ["decomposable", "decomposable"]
    nodes_verified = mode in ("nodes", "all")
    assert {n["verification"]["status"] for n in report["nodes"]} == {"passed" if nodes_verified else "not_run"}
    model = report["model_verification"]
    if mode in ("model", "all"):
        assert model["status"] == "passed"
        assert model["decode_steps"] == 4 and model["batch"] == 2 and model["cache_layout"] == "growing cache"
        assert model["token_agreement"] == {"agree": 10, "compared": 10}
        assert 0 <= model["max_abs_error"]["logits"] < 1e-4
        assert "verify_model" in report["timings"]
    else:
        assert model == {"status": "not_run", "reason": f"--verify {mode}"}
    assert report["opsets"] == {"ai.onnx": 21, "com.microsoft": 1}
    assert report["ops_left"] == {} and report["non_standard_ops"] == []
    assert set(tiny.parent.iterdir()) == {tiny, report_path}  # --check writes no model


@pytest.mark.parametrize("mode", ["nodes", "model", "all"])
def test_check_exits_1_when_the_expansion_is_wrong_at_the_verified_level(tiny, mode, monkeypatch):
    scale_attention_by(1.01, monkeypatch)
    report_path = tiny.parent / "report.json"
    code, out, _ = run(tiny, "--check", "--verify", mode, "--report", report_path)
    assert code == 1
    assert "NOT portable" in out
    report = _report(report_path)
    assert report["status"] == "not_portable" and report["exit_code"] == 1
    if mode in ("model", "all"):
        assert "MODEL VERIFICATION FAILED" in out
        assert report["model_verification"]["status"] == "failed"
        assert not all(step["passed"] for step in report["model_verification"]["steps"])
    if mode in ("nodes", "all"):
        assert {n["verification"]["status"] for n in report["nodes"]} == {"failed"}


def test_check_with_verify_none_does_not_catch_a_wrong_expansion(tiny, monkeypatch):
    # The gate is only as strong as what it is asked to verify.
    scale_attention_by(1.01, monkeypatch)
    code, _, _ = run(tiny, "--check", "--no-verify")
    assert code == 0


def test_check_exits_1_on_a_builder_model_for_its_layer_norms_even_though_it_verifies(builder):
    report_path = builder.parent / "report.json"
    code, out, _ = run(builder, "--check", "--verify", "all", "--report", report_path, "--only", "GroupQueryAttention")
    assert code == 1
    report = _report(report_path)
    assert report["model_verification"]["status"] == "passed"
    assert report["model_verification"]["cache_layout"] == "static buffer of 128 rows"
    assert {n["verification"]["status"] for n in report["nodes"]} == {"passed"}
    assert report["ops_left"] == {
        "ai.onnx": {"SimplifiedLayerNormalization": 1},
        "com.microsoft": {"SkipSimplifiedLayerNormalization": 4},
    }
    assert report["status"] == "not_portable"


def test_check_exits_1_on_a_refused_node_and_the_report_names_the_reason(tmp_path):
    model = make_gqa_model(GqaConfig(extra_attributes=(("mystery", 1),)))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report_path = tmp_path / "report.json"
    code, out, _ = run(path, "--check", "--verify", "all", "--report", report_path)
    assert code == 1
    assert "REFUSED" in out and "model not verified (a node is refused)" in out
    report = _report(report_path)
    (node,) = report["nodes"]
    assert node["status"] == "refused" and "mystery" in node["reason"] and node["config"] is None
    assert report["ops_left"] == {"com.microsoft": {"GroupQueryAttention": 1}}


def test_a_model_that_cannot_be_driven_exits_2_with_one_line_naming_the_input(tiny, tmp_path):
    np.savez(tmp_path / "feeds.npz", past_key_values_typo=np.zeros(2))
    report_path = tmp_path / "report.json"
    code, out, err = run(
        tiny, "--check", "--verify", "model", "--inputs", tmp_path / "feeds.npz", "--report", report_path
    )
    assert code == 2
    assert err.startswith("error: ") and "past_key_values_typo" in err and len(err.splitlines()) == 1
    report = _report(report_path)
    assert report["status"] == "error" and report["exit_code"] == 2 and "past_key_values_typo" in report["error"]


# Decompose mode with model-level verification ------------------------------------------------------------


def test_decompose_with_verify_all_writes_the_model_and_reports_both_levels(tiny):
    report_path = tiny.parent / "report.json"
    code, out, err = run(tiny, "--verify", "all", "--report", report_path)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == GQA_NODES
    assert lines[2].startswith("model verified: prompt + 4 decode steps")
    assert lines[3].startswith("wrote ")
    report = _report(report_path)
    assert report["status"] == "ok" and report["output"] == str(tiny.with_name("tiny-llama-gqa.decomposed.onnx"))
    assert report["model_verification"]["status"] == "passed"
    assert all(n["status"] == "decomposed" and n["new_nodes"] > 0 for n in report["nodes"])
    assert {"load", "rewrite", "verify_nodes", "verify_model", "save", "total"} <= set(report["timings"])


def test_decompose_with_verify_model_writes_nothing_when_the_model_differs(tiny, monkeypatch):
    scale_attention_by(1.01, monkeypatch)
    code, out, err = run(tiny, "--verify", "model")
    assert code == 1
    assert "MODEL VERIFICATION FAILED" in out and "not verified" in out  # nodes were not verified
    assert "error: verification failed; nothing written" in err
    assert set(tiny.parent.iterdir()) == {tiny}


def test_steps_batch_and_dims_reach_the_model_level_run(builder):
    report_path = builder.parent / "report.json"
    code, out, err = run(
        builder,
        "--verify",
        "model",
        "--steps",
        "2",
        "--batch",
        "3",
        "--dim",
        "sequence_length=5",
        "--dim",
        "past_sequence_length=32",
        "--report",
        report_path,
    )
    assert code == 0, err
    model = _report(report_path)["model_verification"]
    assert (model["decode_steps"], model["batch"], model["prompt_length"]) == (2, 3, 5)
    assert model["cache_layout"] == "static buffer of 32 rows"
    assert model["steps"][0]["total_lengths"] == [5, 3, 1]
    assert model["token_agreement"] == {"agree": 9, "compared": 9}


def test_inputs_npz_feeds_the_prompt(tiny, tmp_path):
    np.savez(tmp_path / "feeds.npz", input_ids=np.array([[3, 1, 4, 1, 5, 9, 2]], np.int64))
    report_path = tmp_path / "report.json"
    code, _, err = run(
        tiny, "--verify", "model", "--inputs", tmp_path / "feeds.npz", "--steps", "1", "--report", report_path
    )
    assert code == 0, err
    model = _report(report_path)["model_verification"]
    assert (model["batch"], model["prompt_length"]) == (1, 7)


@pytest.mark.parametrize("bad", ["sequence_length", "sequence_length=x", "=3"])
def test_a_malformed_dim_exits_2(tiny, bad):
    code, _, err = run(tiny, "--verify", "model", "--dim", bad)
    assert code == 2 and "--dim" in err


def test_verbose_prints_phases_steps_and_timings(tiny):
    code, out, _ = run(tiny, "--verify", "all", "-v", "--steps", "2")
    assert code == 0
    assert "    first prompt, growing cache (B=2, S=5, T=5): output" in out
    assert "  step 0 (prompt, S=8, t=[8, 6]): logits" in out
    assert "  step 2 (decode, S=1, t=[10, 8]): logits" in out
    assert out.splitlines()[-1].startswith("timings: load ")


def test_a_piped_process_with_model_verification_prints_no_progress_bar(tiny):
    result = run_process(tiny, "--verify", "all", "--steps", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\r" not in result.stdout
    assert len(result.stdout.splitlines()) == 4


# The API ------------------------------------------------------------------------------------------------


def test_check_api_returns_the_gate_and_the_same_report():
    result = gqa_decompose.check(TINY_LLAMA, verify_mode="all", steps=1)
    assert result.portable and result.verified
    assert result.model_verification.passed and len(result.model_verification.steps) == 2
    assert [n.status for n in result.nodes] == ["decomposable", "decomposable"]
    report = gqa_decompose.report_json(result, "test")
    assert_valid_report(report)
    assert report["status"] == "portable"


def test_check_api_on_a_builder_model_with_gqa_only_is_verified_but_not_portable():
    result = gqa_decompose.check(onnx.load(BUILDER / "model.onnx"), verify_mode="nodes", ops=["GroupQueryAttention"])
    assert result.verified and not result.portable
    assert result.non_standard_ops == [
        "ai.onnx::SimplifiedLayerNormalization",
        "com.microsoft::SkipSimplifiedLayerNormalization",
    ]


def test_check_on_a_builder_model_is_portable_with_its_norms_verified_node_by_node(builder):
    report_path = builder.parent / "report.json"
    code, out, err = run(builder, "--check", "--verify", "all", "--report", report_path)
    assert code == 0, out + err
    report = _report(report_path)
    assert report["status"] == "portable" and report["ops_left"] == {}
    assert report["op_counts"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4}
    assert {entry["verified"] for entry in report["op_nodes"]} == {True}


def test_check_api_rejects_an_unknown_verify_mode():
    with pytest.raises(ValueError, match="verify_mode"):
        gqa_decompose.check(TINY_LLAMA, verify_mode="everything")


def test_check_with_a_runtime_reports_it_in_the_schema(tiny):
    report_path = tiny.parent / "report.json"
    code, out, err = run(
        tiny, "--check", "--runtime", "reference", "--verify", "model", "--steps", "1", "--report", report_path
    )
    assert code == 0, out + err
    report = _report(report_path)
    (entry,) = report["runtimes"]
    assert entry["runtime"] == "reference" and entry["passed"] is True and entry["model"]["passed"] is True
    assert report["status"] == "portable" and report["model_verification"]["status"] == "passed"


def test_ops_left_counts_refused_nodes_not_names(tmp_path):
    """Two GQA nodes named alike, one refused: only that one is left (names need not be unique)."""
    refused = make_gqa_model(GqaConfig(extra_attributes=(("mystery", 1),)))
    fine = onnx.compose.add_prefix(make_gqa_model(GqaConfig()), "b_")
    model = onnx.compose.merge_models(refused, fine, io_map=[])
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.name = "attention"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report_path = tmp_path / "report.json"
    code, _, _ = run(path, "--check", "--no-verify", "--report", report_path)
    assert code == 1
    report = _report(report_path)
    assert sorted(n["status"] for n in report["nodes"]) == ["decomposable", "refused"]
    assert report["ops_left"] == {"com.microsoft": {"GroupQueryAttention": 1}}
