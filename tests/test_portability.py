"""Portability proven: rewritten models run on runtimes other than ONNX Runtime and match
ORT CPU's fused GroupQueryAttention there.

Runtimes: onnx.reference (the spec's semantics), OpenVINO CPU (f32 precision) and
tract; cases and the whole-model run are in portability_cases.py. A runtime that
is not installed is skipped (the test extras install all three).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from gqa_models import GqaConfig, gqa_node, make_gqa_model
from portability_cases import (
    ATTENTION_TARGET_FAILURES,
    ATTENTION_TARGET_PASSES,
    CASES,
    KNOWN_FAILURES,
    PORTABLE_RUNTIMES,
    PRIMITIVES,
    TINY_LLAMA,
    failures,
    run_case,
    run_whole_model,
    targets,
)
from portability_cases import (
    MODELS as MODELS_DIR,
)

import gqa_decompose
from gqa_decompose import runtimes
from gqa_decompose.errors import GqaDecomposeError
from gqa_decompose.verify import verify_node_model


def _require(runtime: str) -> None:
    if runtime not in runtimes.available_runtimes():
        pytest.skip(f"{runtime} is not installed")


def _cell(runtime, case, profile="portable"):
    known = KNOWN_FAILURES.get((runtime, case.id))
    marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
    label = "" if profile == "portable" else f"{profile}-profile-"
    return pytest.param(runtime, case, profile, marks=marks, id=f"{runtime}-{label}{case.id}")


# The portable default everywhere; the openvino profile on OpenVINO (tract aborts on its negative Pad pads).
CELLS = [
    _cell(runtime, case)
    for runtime in PORTABLE_RUNTIMES
    for case in CASES
    if not (runtime == "reference" and case.slow)
] + [_cell("openvino", case, "openvino") for case in CASES if not case.slow]


@pytest.mark.parametrize("runtime,case,profile", CELLS)
def test_rewritten_node_matches_ort_on_runtime(runtime, case, profile):
    _require(runtime)
    result = run_case(case, runtime, profile=profile)
    assert result.results, "no phase ran"
    assert not failures(result), failures(result)


def _attention_cell(runtime, case):
    passes = case.id in ATTENTION_TARGET_PASSES[runtime]
    marks = [] if passes else [pytest.mark.xfail(reason=ATTENTION_TARGET_FAILURES[runtime], strict=True)]
    return pytest.param(runtime, case, marks=marks, id=f"{runtime}-attention-{case.id}")


@pytest.mark.parametrize(
    "runtime,case", [_attention_cell(runtime, case) for runtime in ATTENTION_TARGET_PASSES for case in CASES]
)
def test_attention_target_on_runtime(runtime, case):
    """Which cases the Attention target runs on OpenVINO and tract, pinned both ways."""
    _require(runtime)
    result = run_case(case, runtime, "attention")
    assert result.results, "no phase ran"
    assert not failures(result), failures(result)


@pytest.mark.parametrize("cache", ["growing", "static"])
@pytest.mark.parametrize("runtime", PORTABLE_RUNTIMES)
def test_whole_model_generation_matches_ort_on_runtime(runtime, cache):
    _require(runtime)
    assert run_whole_model(runtime, cache) < 1e-4


# The adapters themselves ----------------------------------------------------------------------


def test_unknown_runtime_is_a_clear_error():
    with pytest.raises(GqaDecomposeError, match="unknown runtime 'tflite'.*onnxruntime, reference"):
        runtimes.get_runtime("tflite")


def test_missing_runtime_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # None in sys.modules: "import openvino" fails
    with pytest.raises(GqaDecomposeError, match=r"runtime 'openvino' is not available.*pip install openvino"):
        runtimes.get_runtime("openvino").load(onnx.load(TINY_LLAMA))
    assert "openvino" not in runtimes.available_runtimes()


@pytest.mark.parametrize("runtime", ["onnxruntime", *PORTABLE_RUNTIMES])
def test_session_runs_a_path_and_returns_outputs_by_name(runtime, tmp_path):
    _require(runtime)
    model = gqa_decompose.decompose(onnx.load(TINY_LLAMA))
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    feeds = {
        "input_ids": np.array([[3, 5, 7]], np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
        **{i.name: np.zeros((1, 2, 0, 16), np.float32) for i in model.graph.input if i.name.startswith("past")},
    }
    outputs = runtimes.get_runtime(runtime).load(path).run(feeds)
    assert list(outputs) == [o.name for o in model.graph.output]
    assert outputs["logits"].shape == (1, 3, 64)
    assert outputs["present.0.key"].shape == (1, 2, 3, 16)


def test_missing_feed_is_a_clear_error():
    session = runtimes.get_runtime("reference").load(gqa_decompose.decompose(onnx.load(TINY_LLAMA)))
    with pytest.raises(GqaDecomposeError, match="no feed for the model's input.*attention_mask"):
        session.run({"input_ids": np.zeros((1, 1), np.int64)})


def test_openvino_runs_in_f32_not_its_bf16_default():
    """On AMX/AVX512-BF16 CPUs OpenVINO's default is bf16 (errors ~1e-2 on the tiny Llama)."""
    _require("openvino")
    for cache in ("growing",):
        assert run_whole_model("openvino", cache, steps=0) < 1e-5


def test_tract_needs_total_sequence_length_from_a_shape():
    """tract 0.23 types a model from its input shapes: a total_sequence_length fed as a
    value sizes the present cache (Pad's pads) from data, which tract refuses. Real
    producers derive it from the attention mask's shape; then tract runs the rewrite.
    If tract learns data-dependent pads, this test fails: update the table in docs/portability.md."""
    _require("tract")
    model = make_gqa_model(GqaConfig(rotary="half"))
    _, node = gqa_node(model)
    as_value = verify_node_model(node, 21, model.ir_version, runtime="tract")
    assert not as_value.passed
    assert all("Expect padding to be constant" in r.failure for r in as_value.results), failures(as_value)
    from_shape = verify_node_model(node, 21, model.ir_version, runtime="tract", total_length_from_shape=True)
    assert from_shape.passed, failures(from_shape)


def test_total_length_from_shape_is_exact_on_onnxruntime():
    """The test harness's rewiring of total_sequence_length changes nothing on ORT."""
    model = make_gqa_model(GqaConfig(rotary="interleaved", packed=True, local_window_size=3))
    _, node = gqa_node(model)
    result = verify_node_model(node, 21, model.ir_version, runtime="onnxruntime", total_length_from_shape=True)
    assert result.passed and len(result.results) >= 4, failures(result)


# gqa-decompose --check --runtime ---------------------------------------------------------------


def _cli(*args) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from gqa_decompose.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_check_runtime_runs_the_rewritten_model_there(tmp_path):
    _require("openvino")
    report_path = tmp_path / "report.json"
    code, out, _ = _cli(
        TINY_LLAMA, "--check", "--runtime", "openvino", "--runtime", "reference", "-q", "--report", report_path
    )
    assert code == 0, out
    version = runtimes.get_runtime("openvino").version()
    assert f"/model/layers.0/attn/GroupQueryAttention: on openvino {version}: verified" in out
    assert f"openvino {version}: the rewritten model runs a prompt" in out
    assert f"runs on reference {onnx.__version__} once decomposed" in out
    import json

    report = json.loads(report_path.read_text())
    assert [(r["runtime"], r["passed"]) for r in report["runtimes"]] == [("openvino", True), ("reference", True)]
    assert report["runtimes"][0]["model"]["max_errors"]["logits"] < 1e-4
    assert not list(tmp_path.glob("*.onnx")), "--check writes no model"


def test_cli_check_runtime_reports_what_fails(tmp_path):
    """A free total_sequence_length input sizes the cache from data: tract refuses the
    whole model (its nodes pass when T comes from a shape, as in real models)."""
    _require("tract")
    path = tmp_path / "node.onnx"
    onnx.save(make_gqa_model(GqaConfig(rotary="half")), path)
    code, out, _ = _cli(path, "--check", "--runtime", "tract", "-q")
    assert code == 1, out
    assert "attn/GroupQueryAttention: on tract" in out and "verified, max error" in out
    assert "the rewritten model FAILS: fails to run a prompt: " in out
    assert "Expect padding to be constant" in out
    assert "does NOT run on tract" in out


def test_cli_check_runtime_reports_ops_a_runtime_lacks():
    """The builder's ORT-only ops (SimplifiedLayerNormalization, ...), kept by --only, stop onnx.reference."""
    code, out, _ = _cli(
        MODELS_DIR / "builder-tiny-llama" / "model.onnx",
        "--check",
        "--no-verify",
        "--runtime",
        "reference",
        "-q",
        "--only",
        "GroupQueryAttention",
    )
    assert code == 1
    assert "the rewritten model FAILS: does not load: " in out
    assert "SimplifiedLayerNormalization" in out


def test_cli_runtime_on_onnxruntime_passes_when_ops_remain():
    """ORT itself runs the builder's contrib ops: the rewritten model runs there."""
    code, out, _ = _cli(
        MODELS_DIR / "builder-tiny-llama" / "model.onnx",
        "--check",
        "--no-verify",
        "--runtime",
        "onnxruntime",
        "-q",
        "--only",
        "GroupQueryAttention",
    )
    assert code == 1  # still not portable: other non-standard ops remain
    assert "runs on onnxruntime" in out


# builder-mistral: window-sized ring caches on every layer; builder-gpt-oss: a ring beside a full layer sharing
# the past's dim name (ORT rejects a first prompt into a ring of fewer rows than the window).
@pytest.mark.parametrize("fixture", ["builder-tiny-llama", "builder-mistral", "builder-gpt-oss"])
def test_cli_check_runtime_runs_the_builder_model_on_onnx_reference_once_its_norms_are_decomposed(fixture):
    code, out, _ = _cli(MODELS_DIR / fixture / "model.onnx", "--check", "--no-verify", "--runtime", "reference", "-q")
    assert code == 0, out
    assert "runs on reference" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--check", "--runtime", "tflite"], "unknown runtime 'tflite'"),
        (["--runtime", "reference"], "--runtime needs --check"),
    ],
)
def test_cli_bad_runtime_arguments_exit_2(args, message):
    code, out, err = _cli(TINY_LLAMA, *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_unavailable_runtime_fails_the_check(monkeypatch):
    def unavailable(runtime):
        raise GqaDecomposeError(f"runtime '{runtime.name}' is not available: no module (pip install x)")

    monkeypatch.setattr(runtimes, "_import", unavailable)
    code, out, _ = _cli(TINY_LLAMA, "--check", "--no-verify", "--runtime", "openvino", "-q")
    assert code == 1
    assert "openvino: NOT AVAILABLE: runtime 'openvino' is not available" in out


def test_cli_check_runtime_reads_external_weights(tmp_path):
    """The runtime needs the weights: external data is loaded for the run (never for the check)."""
    from test_model_io import save_with_external_data

    path = tmp_path / "external" / "model.onnx"
    data = save_with_external_data(TINY_LLAMA, path)
    before = data.read_bytes()
    code, out, _ = _cli(path, "--check", "--no-verify", "--runtime", "reference", "-q")
    assert code == 0, out
    assert "the rewritten model runs a prompt" in out
    assert data.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


# The table --------------------------------------------------------------------------------------


def test_docs_table_is_generated_and_covers_every_group():
    """A new case group or runtime needs `python scripts/portability_table.py` to be run."""
    readme = (MODELS_DIR.parent / "docs" / "portability.md").read_text()
    table = readme.split("<!-- portability:begin -->", 1)[1].split("<!-- portability:end -->", 1)[0]
    assert table.lstrip().startswith("Generated by `python scripts/portability_table.py`")
    for runtime in ("onnxruntime", *PORTABLE_RUNTIMES):
        assert f"{runtime} {runtimes.get_runtime(runtime).version()}" in table or runtime not in (
            runtimes.available_runtimes()
        )
    for target in targets():
        assert f"**target: {target}**" in table
    for group in {case.group for case in CASES}:
        count = sum(case.group == group for case in CASES)
        assert f"| {group} ({count} case" in table, group


def test_docs_table_is_rendered_from_the_kept_cells():
    """docs/portability.md's table is what scripts/portability_table.py renders from docs/portability-cells.json
    (`python scripts/portability_table.py --runtime` re-renders it)."""
    import importlib.util
    import json

    path = MODELS_DIR.parent / "scripts" / "portability_table.py"
    spec = importlib.util.spec_from_file_location("portability_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (MODELS_DIR.parent / "docs" / "portability.md").read_text()
    table = readme.split("<!-- portability:begin -->\n", 1)[1].split("<!-- portability:end -->", 1)[0]
    assert script.build_table(json.loads(script.CELLS.read_text())) == table


def test_table_includes_the_attention_target():
    import portability_cases

    assert portability_cases.targets() == [PRIMITIVES, "attention"]
    options = portability_cases.case_options(CASES[0], "attention")
    assert (options.target, options.raise_opset, options.strict_target) == ("attention", True, True)
    assert portability_cases.case_options(CASES[0], PRIMITIVES).target == PRIMITIVES


@pytest.mark.parametrize("runtime", ["onnxruntime", "reference"])
def test_attention_target_cases_run_on_runtimes_with_attention_23(runtime):
    import portability_cases

    for case in CASES[:3]:
        result = portability_cases.run_case(case, runtime, "attention")
        assert result.target == "attention" and result.fallback is None
        assert not portability_cases.failures(result), (case.name, portability_cases.failures(result))


_TRACT_IF = (
    "tract 0.23.9 types both branches of an If alike and refuses branches whose shapes differ "
    "(growing: its guard's data-dependent Reshape, as without --fast-paths)"
)


@pytest.mark.parametrize("kv_cache", ["any", "static", "growing"])
@pytest.mark.parametrize(
    "runtime", ["openvino", "reference", pytest.param("tract", marks=pytest.mark.xfail(reason=_TRACT_IF, strict=True))]
)
def test_fast_paths_run_on_runtimes_with_if(runtime, kv_cache):
    """--fast-paths' If nodes (row blocks at S = 128, the cut, the one-copy update) on other runtimes."""
    from gqa_decompose.spec import DecomposeOptions

    _require(runtime)
    options = {"static": {"static_kv_cache": True}, "growing": {"growing_kv_cache": True}}.get(kv_cache, {})
    model = make_gqa_model(GqaConfig(rotary="half", packed=kv_cache == "static", positions=256))
    _, node = gqa_node(model)
    result = verify_node_model(
        node,
        21,
        model.ir_version,
        DecomposeOptions(fast_paths=True, **options),
        runtime=runtime,
        total_length_from_shape=runtimes.get_runtime(runtime).shapes_from_input_shapes,
    )
    assert any(r.phase.name.startswith("long first prompt") for r in result.results)
    assert result.results and not failures(result), failures(result)


@pytest.mark.parametrize("past", [True, False], ids=["past", "no past"])
def test_default_graph_of_a_static_long_prompt_runs_on_tract(past):
    """The default output of a static S >= 128 has no row blocks, and tract runs it;
    --fast-paths' straight-line blocks (data-dependent slices) it cannot type."""
    from gqa_decompose.spec import DecomposeOptions

    _require("tract")
    model = make_gqa_model(GqaConfig(rotary="half", positions=512, past=past, sizes=(1, 128, None, None)))
    _, node = gqa_node(model)
    for fast_paths in (False, True):
        result = verify_node_model(
            node,
            21,
            model.ir_version,
            DecomposeOptions(fast_paths=fast_paths),
            runtime="tract",
            total_length_from_shape=True,
        )
        assert result.results and bool(failures(result)) == fast_paths, failures(result)


def test_runtime_check_knows_present_by_its_output_position_not_its_name():
    """A static buffer's rows past the prompt are undefined: they are left out of present's comparison even
    when present is not named "present" (found by name, cache_k_out was compared whole and failed)."""
    from gqa_decompose.passes import InferGqaTypesPass
    from gqa_decompose.runtime_check import check_runtime
    from gqa_decompose.spec import DecomposeOptions

    proto = make_gqa_model(GqaConfig())
    renamed = {"present_key": "cache_k_out", "present_value": "cache_v_out"}
    for node in proto.graph.node:
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for output in proto.graph.output:
        output.name = renamed.get(output.name, output.name)
    model = ir.serde.deserialize_model(proto)
    InferGqaTypesPass()(model)
    result = check_runtime(model, "onnxruntime", DecomposeOptions(static_kv_cache=True), verify_nodes=False)
    assert result.model.failure is None
    assert set(result.model.max_errors) == {"output", "cache_k_out", "cache_v_out"}
