"""The command line: exit codes, messages, the JSON report, and what is (not) written."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gqa_models import GqaConfig, make_gqa_model
from onnx import helper
from test_model_io import (
    TINY_LLAMA,
    _failing_save,
    folder_listing,
    save_with_external_data,
    sha256,
    write_model_with_external_cos_cache,
)

import gqa_decompose.expansion.gqa
from gqa_decompose import model_io
from gqa_decompose.cli import _progress_bar, main

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILDER_MODEL = REPO / "models" / "builder-tiny-llama" / "model.onnx"
GQA_NODES = ["/model/layers.0/attn/GroupQueryAttention", "/model/layers.1/attn/GroupQueryAttention"]


def run(*args) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr). An uncaught exception fails the test."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_process(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gqa_decompose", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def save_proto(model: onnx.ModelProto, path: pathlib.Path) -> pathlib.Path:
    onnx.save(model, path)
    return path


def relu_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "no_gqa",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def scale_attention_by(factor: float, monkeypatch) -> None:
    """Make every expansion attend with a wrong scale (the CLI's and the verifier's alike)."""
    attend = gqa_decompose.expansion.gqa.attend

    def wrong_attend(*args, **kwargs):
        *values, scoring = args  # op, query, keys, values, visible, mask bias, then the Scoring
        return attend(*values, dataclasses.replace(scoring, scale=scoring.scale * factor), **kwargs)

    monkeypatch.setattr(gqa_decompose.expansion.gqa, "attend", wrong_attend)


# Success -----------------------------------------------------------------------------------


def test_decomposing_the_tiny_llama_exits_0_and_writes_the_default_output_beside_it(tiny):
    code, out, err = run(tiny)
    assert code == 0, err
    expected = tiny.with_name("tiny-llama-gqa.decomposed.onnx")
    assert folder_listing(tiny.parent) == {tiny.name, expected.name}
    decomposed = onnx.load(expected)
    assert not [n.name for n in decomposed.graph.node if n.domain == "com.microsoft"]
    onnx.checker.check_model(decomposed, full_check=True)
    for name in GQA_NODES:
        assert f"{name}: decomposed (" in out
    assert out.count("; verified, max error") == 2
    assert f"wrote {expected}" in out


def test_decomposing_with_no_verify_exits_0_and_says_nodes_were_not_verified(tiny, tmp_path):
    target = tmp_path / "out" / "plain.onnx"
    target.parent.mkdir()
    code, out, err = run(tiny, "-o", target, "--no-verify")
    assert code == 0, err
    assert target.is_file()
    assert out.count("; not verified") == 2
    assert "verified, max error" not in out


def test_a_model_without_a_gqa_node_exits_0_says_nothing_to_do_and_writes_nothing(tmp_path):
    path = save_proto(relu_model(), tmp_path / "relu.onnx")
    code, out, err = run(path)
    assert code == 0, err
    assert "nothing to do, nothing written" in out
    assert folder_listing(tmp_path) == {"relu.onnx"}


# --check -----------------------------------------------------------------------------------


def test_check_on_the_tiny_llama_exits_0_says_portable_and_writes_nothing(tiny):
    code, out, err = run(tiny, "--check")
    assert code == 0, err
    assert f"{tiny}: portable once decomposed" in out
    assert out.count("decomposable (") == 2
    assert folder_listing(tiny.parent) == {tiny.name}


def test_check_on_the_builder_model_exits_1_and_names_simplified_layer_normalization(builder, tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = run(builder, "--check", "--report", report_path, "--only", "GroupQueryAttention")
    assert code == 1, err
    assert "SimplifiedLayerNormalization" in out
    assert "NOT portable" in out
    report = json.loads(report_path.read_text())
    assert report["mode"] == "check"
    assert report["portable"] is False
    assert "ai.onnx::SimplifiedLayerNormalization" in report["non_standard_ops"]
    assert "com.microsoft::SkipSimplifiedLayerNormalization" in report["non_standard_ops"]
    assert [n["status"] for n in report["nodes"]] == ["decomposable", "decomposable"]
    assert report["exit_code"] == 1
    # Nothing written beside the model: only the report, where it was asked for.
    assert folder_listing(builder.parent) == folder_listing(BUILDER_MODEL.parent)
    assert folder_listing(tmp_path) - {str(p.relative_to(tmp_path)) for p in builder.parent.rglob("*")} == {
        "builder",
        "report.json",
    }


def test_check_exits_1_when_a_gqa_node_is_refused(tmp_path):
    path = save_proto(make_gqa_model(GqaConfig(extra_attributes=(("foo", 1),))), tmp_path / "foo.onnx")
    code, out, _ = run(path, "--check")
    assert code == 1
    assert "attn/GroupQueryAttention: REFUSED: unknown attribute(s) ['foo']" in out


# Bad input (exit 2) ------------------------------------------------------------------------


def test_a_file_that_is_not_onnx_exits_2_with_a_one_line_error_and_no_traceback(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("definitely not a protobuf\n")
    result = run_process(path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot read {path} as an ONNX model")


def test_a_missing_model_file_exits_2_with_a_one_line_error(tmp_path):
    code, out, err = run(tmp_path / "absent.onnx")
    assert code == 2
    assert err.splitlines() == [f"error: no such model file: {tmp_path / 'absent.onnx'}"]
    assert folder_listing(tmp_path) == set()


def test_a_gqa_node_with_an_unknown_attribute_exits_2_and_the_message_names_the_node(tmp_path):
    path = save_proto(make_gqa_model(GqaConfig(extra_attributes=(("foo", 1),))), tmp_path / "foo.onnx")
    code, _, err = run(path)
    assert code == 2
    assert err.startswith("error: node 'attn/GroupQueryAttention': unknown attribute(s) ['foo']")
    assert len(err.splitlines()) == 1
    assert folder_listing(tmp_path) == {"foo.onnx"}


@pytest.mark.parametrize("spelling", ["same", "dotted", "relative"])
def test_an_output_path_equal_to_the_input_exits_2_and_leaves_the_input_alone(tiny, monkeypatch, spelling):
    monkeypatch.chdir(tiny.parent)
    output = {
        "same": str(tiny),
        "dotted": str(tiny.parent / "sub" / ".." / tiny.name),
        "relative": tiny.name,
    }[spelling]
    before = sha256(tiny)
    code, _, err = run(tiny, "-o", output)
    assert code == 2
    assert "the output path is the input model" in err
    assert sha256(tiny) == before
    assert folder_listing(tiny.parent) == {tiny.name}


def test_an_output_that_would_replace_the_inputs_data_file_exits_2_and_leaves_the_input_alone(tmp_path):
    # a.onnx keeps its weights in b.onnx.data; the output b.onnx would get b.onnx.data.
    source = tmp_path / "a.onnx"
    data = save_with_external_data(TINY_LLAMA, source, location="b.onnx.data")
    hashes = (sha256(source), sha256(data))
    code, _, err = run(source, "-o", tmp_path / "b.onnx", "-q")
    assert code == 2
    assert "a file of the input model" in err
    assert (sha256(source), sha256(data)) == hashes
    assert folder_listing(tmp_path) == {"a.onnx", "b.onnx.data"}


def test_an_output_folder_that_is_a_regular_file_exits_2_with_a_one_line_error(tiny):
    blocker = tiny.parent / "blocker"
    blocker.write_text("a file, not a folder")
    code, _, err = run(tiny, "-o", blocker / "x.onnx", "--no-verify")
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "blocker" in err
    assert blocker.read_text() == "a file, not a folder"
    assert folder_listing(tiny.parent) == {tiny.name, "blocker"}


def test_a_refused_node_still_gets_a_report_with_the_error_and_exit_code_2(tmp_path):
    path = save_proto(make_gqa_model(GqaConfig(extra_attributes=(("foo", 1),))), tmp_path / "foo.onnx")
    report_path = tmp_path / "report.json"
    code, _, _ = run(path, "--report", report_path)
    assert code == 2
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 2
    assert "attn/GroupQueryAttention" in report["error"]
    assert "unknown attribute" in report["error"]


def test_a_report_path_that_cannot_be_written_exits_2_with_a_one_line_error(tiny):
    code, _, err = run(tiny, "--report", tiny.parent / "missing-folder" / "report.json", "--no-verify")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: cannot write the report: [Errno 2] No such file or directory")
    assert "missing-folder/report.json" in lines[0]


# Verification failure (exit 1) -------------------------------------------------------------


def test_a_failed_verification_exits_1_and_writes_no_output(tiny, monkeypatch):
    scale_attention_by(1.5, monkeypatch)
    report_path = tiny.parent / "report.json"
    code, out, err = run(tiny, "--report", report_path)
    assert code == 1
    assert out.count("; VERIFICATION FAILED") == 2
    assert "output differs by" in out
    assert "error: verification failed; nothing written" in err
    assert folder_listing(tiny.parent) == {tiny.name, "report.json"}
    report = json.loads(report_path.read_text())
    assert report["exit_code"] == 1
    assert report["output"] is None
    assert [n["verification"]["status"] for n in report["nodes"]] == ["failed", "failed"]
    assert all("output differs by" in n["verification"]["reason"] for n in report["nodes"])


def test_check_exits_1_when_verification_fails(tiny, monkeypatch):
    scale_attention_by(1.5, monkeypatch)
    code, out, _ = run(tiny, "--check")
    assert code == 1
    assert out.count("VERIFICATION FAILED") == 2
    assert "NOT portable" in out
    assert folder_listing(tiny.parent) == {tiny.name}


def test_no_verify_writes_even_a_wrong_expansion(tiny, monkeypatch):
    # The same sabotage as above goes unnoticed without verification: the exit-1 tests
    # owe their failure to verification, not to the sabotage breaking the rewrite.
    scale_attention_by(1.5, monkeypatch)
    code, _, err = run(tiny, "--no-verify")
    assert code == 0, err
    assert tiny.with_name("tiny-llama-gqa.decomposed.onnx").is_file()


# --report ----------------------------------------------------------------------------------


def test_the_report_holds_nodes_features_per_phase_errors_non_standard_ops_and_exit_code(tiny):
    report_path = tiny.parent / "report.json"
    code, _, err = run(tiny, "--report", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["mode"] == "decompose"
    assert report["exit_code"] == 0
    assert report["output"] == str(tiny.with_name("tiny-llama-gqa.decomposed.onnx"))
    assert report["non_standard_ops"] == []
    assert report["ops_left"] == {}
    assert report["error"] is None
    assert [n["name"] for n in report["nodes"]] == GQA_NODES
    for node in report["nodes"]:
        assert node["status"] == "decomposed"
        assert node["scope"] == "main graph"
        assert {"packed QKV", "past KV", "rotary (half)"} <= set(node["features"])
        assert node["new_nodes"] > 0
        verification = node["verification"]
        assert verification["status"] == "passed"
        assert verification["reason"] is None
        assert 0 <= verification["max_error"] < 1e-5
        phases = verification["phases"]
        assert {p["phase"] for p in phases} >= {"first prompt, growing cache", "decode, growing cache"}
        for phase in phases:
            assert phase["passed"] is True and phase["failure"] is None
            assert set(phase["max_errors"]) == {"output", "present_key", "present_value"}
        assert verification["max_error"] == max(e for p in phases for e in p["max_errors"].values())


def test_the_report_of_the_builder_model_lists_its_non_standard_ops(builder, tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = run(
        builder, "-o", tmp_path / "out.onnx", "--report", report_path, "--no-verify", "--only", "GroupQueryAttention"
    )
    assert code == 0, err
    assert "note: the model still holds non-standard ops" in out
    report = json.loads(report_path.read_text())
    assert report["non_standard_ops"] == [
        "ai.onnx::SimplifiedLayerNormalization",
        "com.microsoft::SkipSimplifiedLayerNormalization",
    ]
    assert report["ops_left"] == {
        "ai.onnx": {"SimplifiedLayerNormalization": 1},
        "com.microsoft": {"SkipSimplifiedLayerNormalization": 4},
    }
    assert [n["verification"]["status"] for n in report["nodes"]] == ["not_run", "not_run"]
    assert report["model_verification"] == {"status": "not_run", "reason": "--verify none"}


# Entry points ------------------------------------------------------------------------------


def test_python_dash_m_help_exits_0_and_documents_the_exit_codes():
    result = run_process("--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "Exit codes:" in result.stdout
    for line in ("0  success", "1  verification against ONNX Runtime failed", "2  bad input"):
        assert line in result.stdout


def test_the_gqa_decompose_script_prints_the_installed_version():
    script = pathlib.Path(sys.executable).with_name("gqa-decompose")
    assert script.is_file(), "the console script is installed beside the interpreter"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert importlib.metadata.version("gqa-decompose") in result.stdout
    assert result.stdout.startswith("gqa-decompose, version ")


# The input is never modified -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decompose", "check"])
def test_the_input_model_and_its_data_file_are_unchanged(tmp_path, mode):
    source = tmp_path / "tiny.onnx"
    data = save_with_external_data(TINY_LLAMA, source)
    before = (sha256(source), sha256(data), source.stat().st_mtime_ns, data.stat().st_mtime_ns)
    code, _, err = run(source, *(["--check"] if mode == "check" else []))
    assert code == 0, err
    assert (sha256(source), sha256(data), source.stat().st_mtime_ns, data.stat().st_mtime_ns) == before
    written = {"tiny.decomposed.onnx", "tiny.decomposed.onnx.data"} if mode == "decompose" else set()
    assert folder_listing(tmp_path) == {"tiny.onnx", "tiny.onnx.data", *written}


# Atomic writes ------------------------------------------------------------------------------


def test_a_save_failing_midway_exits_2_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    source = tmp_path / "in" / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.onnx").write_bytes(b"previous model")
    monkeypatch.setattr(model_io.ir, "save", _failing_save)
    code, _, err = run(source, "-o", out / "x.onnx", "--no-verify")
    assert code == 2
    assert err.splitlines() == [f"error: cannot write {out / 'x.onnx'}: No space left on device"]
    assert folder_listing(out) == {"x.onnx"}
    assert (out / "x.onnx").read_bytes() == b"previous model"


# External data ------------------------------------------------------------------------------


def _prompt_feeds(batch: int = 2, length: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 64, (batch, length), dtype=np.int64),
        "attention_mask": np.ones((batch, length), dtype=np.int64),
    }
    for layer in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((batch, 2, 0, 16), dtype=np.float32)
    return feeds


def _run_ort(path: pathlib.Path, feeds) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def test_a_model_with_external_data_decomposes_into_its_own_data_file_with_the_same_logits(tmp_path, monkeypatch):
    source = tmp_path / "in" / "tiny.onnx"
    source_data = save_with_external_data(TINY_LLAMA, source)
    before = sha256(source_data)
    target = tmp_path / "out" / "x.onnx"
    target.parent.mkdir()
    # Run from an unrelated folder: external data must be found beside the model, not here.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run(source, "-o", target)
    assert code == 0, err
    assert out.count("; verified, max error") == 2
    assert folder_listing(tmp_path / "out") == {"x.onnx", "x.onnx.data"}
    assert f"wrote {target}, {target}.data" in out
    assert sha256(source_data) == before
    assert folder_listing(tmp_path / "elsewhere") == set()

    decomposed = onnx.load(target, load_external_data=False)
    assert not [n.name for n in decomposed.graph.node if n.domain == "com.microsoft"]
    locations = {e.value for t in decomposed.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"x.onnx.data"}
    feeds = _prompt_feeds()
    # ONNX Runtime cannot read the input itself (its axes constants are external too): the
    # self-contained original holds the same weights.
    expected = _run_ort(TINY_LLAMA, feeds)
    got = _run_ort(target, feeds)
    assert set(got) == set(expected)
    assert float(np.abs(expected["logits"]).max()) > 0.1
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-4, rtol=1e-4, err_msg=name)


def test_reuse_data_writes_only_the_graph_and_refers_to_the_inputs_weights(tmp_path):
    source = tmp_path / "tiny.onnx"
    source_data = save_with_external_data(TINY_LLAMA, source)
    before = sha256(source_data)
    code, out, err = run(source, "--reuse-data")
    assert code == 0, err
    target = tmp_path / "tiny.decomposed.onnx"
    assert folder_listing(tmp_path) == {"tiny.onnx", source_data.name, target.name}
    decomposed = onnx.load(target, load_external_data=False)
    locations = {e.value for t in decomposed.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {source_data.name}
    assert sha256(source_data) == before
    feeds = _prompt_feeds()
    expected, got = _run_ort(TINY_LLAMA, feeds), _run_ort(target, feeds)
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4, rtol=1e-4)


def test_reuse_data_into_another_folder_exits_2(tmp_path):
    source = tmp_path / "tiny.onnx"
    save_with_external_data(TINY_LLAMA, source)
    code, out, err = run(source, "--reuse-data", "-o", tmp_path / "sub" / "x.onnx")
    assert code == 2
    assert "needs the output in the input's folder" in err
    assert not (tmp_path / "sub" / "x.onnx").exists()


@pytest.mark.parametrize("mode", ["decompose", "check"])
def test_external_data_outside_the_models_folder_exits_2(tmp_path, mode):
    path = write_model_with_external_cos_cache(tmp_path / "model", "../outside.data")
    code, out, err = run(path, *(["--check"] if mode == "check" else []))
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "'../outside.data', outside the model's folder" in err
    assert folder_listing(tmp_path / "model") == {"model.onnx"}


# Progress bars ------------------------------------------------------------------------------


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal(tiny):
    code, out, err = run(tiny)
    assert code == 0
    assert err == ""
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(prefix) for line, prefix in zip(lines, [*GQA_NODES, "wrote "]))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_knows_its_total_from_its_first_frame(tiny, monkeypatch):
    """It used to open on ``0node [00:00, ?node/s]`` before the total was known."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar, update = _progress_bar("decomposing", quiet=False)
    assert terminal.getvalue() == ""  # nothing is drawn before the total is known
    with bar:
        update(1, 3)
    frames = terminal.getvalue().split("\r")
    drawn = [frame for frame in frames if frame.strip()]
    assert drawn and all("1/3" in frame for frame in drawn), frames


def test_check_does_not_list_a_refused_gqa_node_among_the_other_ops(tmp_path):
    path = save_proto(make_gqa_model(GqaConfig(num_heads=3, kv_num_heads=2)), tmp_path / "refused.onnx")
    code, out, _ = run(path, "--check")
    assert code == 1
    assert "REFUSED" in out
    assert "besides GroupQueryAttention" not in out


def test_a_real_process_with_piped_stderr_prints_only_the_summary_lines(tiny):
    result = run_process(tiny.name, "--no-verify", cwd=tiny.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == GQA_NODES
    assert lines[2] == f"wrote {tiny.with_name('tiny-llama-gqa.decomposed.onnx')}"
    assert len(lines) == 3


@pytest.mark.parametrize("spelling", ["existing", "trailing slash"])
def test_an_output_folder_receives_the_default_file_name(tiny, tmp_path, spelling):
    folder = tmp_path / "out"
    if spelling == "existing":
        folder.mkdir()
        argument = str(folder)
    else:
        argument = f"{folder}/"
    code, out, err = run(tiny, "-o", argument, "--no-verify")
    assert code == 0, err
    assert folder_listing(folder) == {f"{tiny.stem}.decomposed.onnx"}


def test_an_output_over_an_input_file_is_refused_before_any_rewrite(tmp_path, monkeypatch):
    source = tmp_path / "a.onnx"
    save_with_external_data(TINY_LLAMA, source, location="b.onnx.data")

    def no_rewrite(*args, **kwargs):
        raise AssertionError("the rewrite ran before the output path was checked")

    monkeypatch.setattr("gqa_decompose.api.rewrite", no_rewrite)
    code, _, err = run(source, "-o", tmp_path / "b.onnx", "-q")
    assert code == 2
    assert "a file of the input model" in err


def test_a_missing_output_folder_is_created_only_when_o_names_a_folder(tiny, tmp_path):
    code, _, err = run(tiny, "-o", tmp_path / "missing" / "x.onnx", "--no-verify")
    assert code == 2 and "does not exist" in err and not (tmp_path / "missing").exists()
    code, _, err = run(tiny, "-o", f"{tmp_path / 'made'}/", "--no-verify")
    assert code == 0, err
    assert (tmp_path / "made" / "tiny-llama-gqa.decomposed.onnx").is_file()


def test_nodes_of_the_same_name_get_their_own_verification(tmp_path):
    """Node names need not be unique: each GQA node's line and report entry is its own node's verification
    (a join by name gave both the last one's)."""
    with_past = make_gqa_model(GqaConfig())
    without_past = onnx.compose.add_prefix(make_gqa_model(GqaConfig(past=False)), "b_")
    graph = with_past.graph
    graph.node.extend(without_past.graph.node)
    graph.input.extend(without_past.graph.input)
    graph.output.extend(without_past.graph.output)
    graph.initializer.extend(without_past.graph.initializer)
    for node in graph.node:
        node.name = "attn"
    path = save_proto(with_past, tmp_path / "twins.onnx")
    code, out, err = run(path, "--report", tmp_path / "report.json", "-q")
    assert code == 0, err
    phases = [len(n["verification"]["phases"]) for n in json.loads((tmp_path / "report.json").read_text())["nodes"]]
    assert phases[0] > 1 and phases[1] == 1, phases
    lines = [line for line in out.splitlines() if line.startswith("attn:")]
    assert len(lines) == 2 and "over 1 phase" not in lines[0] and "over 1 phase" in lines[1], lines
    checked = gqa_decompose.check(path, verify_mode="nodes")  # the gate joins the same way
    assert [len(n.verification.results) for n in checked.nodes] == phases


# Start-up ------------------------------------------------------------------------------------------------

_HELP_IMPORTS = """
import runpy, sys
sys.argv = ["gqa-decompose", "--help"]
try:
    runpy.run_module("gqa_decompose", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
heavy = [name for name in ("onnx", "onnxruntime", "onnx_ir", "numpy", "openvino", "tqdm") if name in sys.modules]
print("IMPORTED", heavy, file=sys.stderr)
"""


def test_help_imports_neither_onnx_nor_onnxruntime():
    result = subprocess.run([sys.executable, "-c", _HELP_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "IMPORTED []" in result.stderr, result.stderr


def test_the_package_imports_its_api_on_first_use():
    code = "import sys, gqa_decompose; assert 'onnx' not in sys.modules; gqa_decompose.decompose; assert 'onnx' in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import gqa_decompose

    assert set(gqa_decompose.__all__) == set(gqa_decompose._EXPORTS)
    assert set(gqa_decompose.__all__) <= set(dir(gqa_decompose))
    with pytest.raises(AttributeError):
        gqa_decompose.no_such_name  # noqa: B018
    # The submodules verify.py and verify_model.py do not shadow the functions of their names.
    code = (
        "import gqa_decompose.verify, gqa_decompose.verify_model, gqa_decompose; "
        "assert callable(gqa_decompose.verify) and callable(gqa_decompose.verify_model)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_default_rewrite_of_the_builder_model_leaves_no_non_standard_op(builder, tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = run(builder, "-o", tmp_path / "out.onnx", "--report", report_path, "--verify", "nodes")
    assert code == 0, err
    assert "SkipSimplifiedLayerNormalization: 4 node(s) decomposed" in out and "verified" in out
    report = json.loads(report_path.read_text())
    assert report["non_standard_ops"] == [] and report["ops_left"] == {}
    assert [entry["status"] for entry in report["op_nodes"]] == ["decomposed"] * 5
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


def test_only_with_an_unknown_op_exits_2_naming_the_known_ones(builder, tmp_path):
    code, out, err = run(builder, "-o", tmp_path / "out.onnx", "--only", "GroupQueryAttention,Nope")
    assert code == 2
    assert "Nope" in err and "SkipSimplifiedLayerNormalization" in err
