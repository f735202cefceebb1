"""The decomposed fixtures on the compilers: IREE, TVM and LiteRT (gqa_decompose.runtimes: iree, tvm, litert).

* IREE compiles the output as written, dynamic dims and all: one module per model serves every phase.
* TVM and LiteRT (onnx2tf) compile fixed-shape copies, one per set of input shapes
  (gqa_decompose.fixed_shapes: dims fixed, shape arithmetic folded, the empty past a constant).

Cases (tests/fixture_phases.py, as the browser tests): the tiny model and the builder fixture, in the default
form and with ``static_kv_cache``, a first prompt with empty past and a decode step, growing and static buffers,
batch 1, against ORT CPU's run of the original. Each runtime's own bugs are strict xfails quoting its error.

A runtime that is not installed is skipped, except where ``GQA_DECOMPOSE_REQUIRE_RUNTIMES=1`` (.ci/run):
there it is a failure. Installs: ``pip install -e .[runtimes]`` (IREE, TVM); LiteRT needs a Python >= 3.12
with ``onnx2tf`` and ``ai-edge-litert``, named by ``GQA_DECOMPOSE_LITERT_PYTHON`` (default ``.litert-venv``).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from fixture_phases import FIXTURES, PHASES, TOLERANCE, VARIANTS, decomposed, max_error, phases
from onnx import helper

from gqa_decompose import runtimes
from gqa_decompose.errors import GqaDecomposeError

COMPILERS = ("iree", "tvm", "litert")

# static_kv_cache reads max_b t_b rows of the buffer, a length from the mask's contents: a compiler that
# fixes every shape ahead of time cannot (tract and WebNN neither; docs/portability.md).
_TVM_DATA_DEPENDENT = (
    "TVM 0.27's Relax frontend: Reshape expects the input tensor to have known shape when there is some "
    "dimension length to infer"
)
KNOWN_FAILURES: dict[tuple[str, str, str], str] = {
    ("tvm", "tiny", "kvstatic-static"): _TVM_DATA_DEPENDENT,
    ("tvm", "builder", "kvstatic-static"): _TVM_DATA_DEPENDENT,
}
# The fragment of the runtime's error that the pin quotes.
KNOWN_ERRORS = {
    _TVM_DATA_DEPENDENT: "Reshape expects the input tensor to have known shape",
}


def require(runtime: str) -> None:
    """Skip when ``runtime`` is not installed; fail instead where GQA_DECOMPOSE_REQUIRE_RUNTIMES=1."""
    try:
        runtimes.get_runtime(runtime).version()
    except GqaDecomposeError as error:
        if os.environ.get("GQA_DECOMPOSE_REQUIRE_RUNTIMES") == "1":
            pytest.fail(f"GQA_DECOMPOSE_REQUIRE_RUNTIMES=1 but {error.reason}", pytrace=False)
        pytest.skip(error.reason)


@functools.cache
def _session(runtime: str, fixture: str, form: str) -> runtimes.Session:
    return runtimes.get_runtime(runtime).load(decomposed(fixture, form))


def _case(runtime: str, fixture: str, variant: str, phase: str):
    # One xdist worker per runtime: its compiled modules are cached for the other cases.
    marks = [pytest.mark.xdist_group(runtime)]
    known = KNOWN_FAILURES.get((runtime, fixture, variant))
    if known:
        marks.append(pytest.mark.xfail(reason=known, strict=True, raises=RuntimeError))
    return pytest.param(runtime, fixture, variant, phase, marks=marks, id=f"{runtime}-{fixture}-{variant}-{phase}")


CASES = [
    _case(runtime, fixture, variant, phase)
    for runtime in COMPILERS
    for fixture in FIXTURES
    for variant in VARIANTS
    for phase in PHASES
]


@pytest.mark.parametrize("runtime,fixture,variant,phase", CASES)
def test_decomposed_fixture_runs_on_the_compiler(runtime, fixture, variant, phase, record_property):
    require(runtime)
    form, cache = VARIANTS[variant]
    feeds, want = phases(fixture, cache)[phase]
    known = KNOWN_FAILURES.get((runtime, fixture, variant))
    try:
        got = _session(runtime, fixture, form).run(feeds)
    except RuntimeError as error:
        if known is None or KNOWN_ERRORS[known] not in str(error):  # another failure than the pinned one
            raise AssertionError(f"fails, and not as pinned ({known}): {error}") from None
        raise
    error = max_error(feeds, want, got)
    record_property("max_error", error)
    assert error < TOLERANCE, error


# Upstream bugs, pinned on the smallest model that shows them ------------------------------------------


def _transpose_model() -> onnx.ModelProto:
    """Transpose of [b, 2, n, d] whose result is declared [b, 2, 16, n]: valid ONNX (a value_info may be
    more precise than what inference derives), as the rewrite's values beside a model's symbolic head size."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 2, "n", "d"])
    t = helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, ["b", 2, 16, "n"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 2, "d", "n"])
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), helper.make_node("Identity", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "transpose", [x], [y], value_info=[t])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.xdist_group("iree")
def test_iree_fails_a_transpose_declared_more_static_than_its_input_and_the_adapter_drops_value_info():
    """IREE 3.13 bug: the builder rewrite failed to compile on this. The adapter strips value_info (ONNX's
    inference retypes every value), so the model runs. If IREE fixes it, this test fails: drop the workaround."""
    require("iree")
    from gqa_decompose import runtime_iree

    with pytest.raises(RuntimeError, match=r"'linalg.transpose' op dim\(result, 2\) = 16 doesn't match dim\(input"):
        runtime_iree._compile(_transpose_model())
    x = np.arange(2 * 2 * 3 * 16, dtype=np.float32).reshape(2, 2, 3, 16)
    got = runtimes.get_runtime("iree").load(_transpose_model()).run({"x": x})["y"]
    np.testing.assert_array_equal(got, x.transpose(0, 1, 3, 2))


def _empty_input_model() -> onnx.ModelProto:
    """y = Pad(past) along axis 0 to 3 rows: with an empty past, a dim of 0 in the input."""
    past = helper.make_tensor_value_info("past", onnx.TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    pads = helper.make_tensor("pads", onnx.TensorProto.INT64, [4], [0, 0, 3, 0])
    node = helper.make_node("Pad", ["past", "pads"], ["y"])
    graph = helper.make_graph([node], "pad", [past], [y], initializer=[pads])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.xdist_group("tvm")
def test_tvm_reads_a_dim_of_0_as_unknown_and_the_fixed_shape_copy_makes_an_empty_input_a_constant():
    """TVM 0.27 bug: its ONNX frontend turns a dim_value of 0 into a fresh symbolic dim, so downstream shapes
    are lost (the empty-past prompt failed in a Reshape). The adapter's fixed-shape copy makes an empty input an
    initializer. If TVM fixes it, this test fails: the workaround can go."""
    require("tvm")
    from tvm.relax.frontend.onnx import from_onnx

    fixed = _empty_input_model()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    signature = [line for line in str(from_onnx(fixed)["main"]).splitlines() if "def main" in line][0]
    assert "def main(past: R.Tensor((v, 4)" in signature, signature  # the 0 became a variable
    got = runtimes.get_runtime("tvm").load(_empty_input_model()).run({"past": np.zeros((0, 4), np.float32)})["y"]
    np.testing.assert_array_equal(got, np.zeros((3, 4), np.float32))


@pytest.mark.xdist_group("litert")
def test_litert_runs_a_four_token_prompt_with_empty_past():
    """onnx2tf 2.6.9 converted the tiny model's 4-token empty-past prompt wrongly (logits off by 1.02 on LiteRT's
    reference kernels; XNNPack: "failed to reshape runtime"), through Reshape targets with 0 (keep the dim): the
    fixed-shape copy spells each target out. The prompt ``--check`` runs."""
    require("litert")
    original = onnx.load(FIXTURES["tiny"])
    feeds = {"input_ids": np.array([[3, 4, 5, 6]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in original.graph.input if "past" in i.name})
    want = runtimes.get_runtime("onnxruntime").load(original).run(feeds)
    got = _session("litert", "tiny", "default").run(feeds)
    assert max_error(feeds, want, got) < TOLERANCE


@pytest.mark.xdist_group("litert")
def test_litert_writes_nothing_into_the_working_folder(tmp_path, monkeypatch):
    """onnx2tf saves ``sym_shape_infer_temp.onnx`` and two external-data files into its working folder when it
    cannot type an op (GroupQueryAttention itself, the portability table's column of the original): that column
    left three in the repository. The worker runs in a folder of its own."""
    require("litert")
    from portability_cases import CASES, FUSED, failures, run_case

    (case,) = [c for c in CASES if c.name == "no-past-packed"]
    monkeypatch.chdir(tmp_path)
    assert any("GROUPQUERYATTENTION" in problem for problem in failures(run_case(case, "litert", FUSED)))
    assert sorted(path.name for path in tmp_path.iterdir()) == []


# The one-node cases (tests/portability_cases.py) on IREE, where its table column failed ----------------

_IREE_NO_RMSNORM = (
    "IREE 3.13 has no RMSNormalization-23 (the opset-23 q/k norm form): 'failed to legalize operation "
    "'torch.operator' that was explicitly marked illegal' (onnx.RMSNormalization); the primitives form at opset 21 runs"
)
IREE_CASES = {
    # Each failed on IREE before the graph or adapter change its comment names.
    "attention bias/broadcast-window": None,  # builder.with_static_dims: the bias [1, 1, S, T] reached head 0 only
    "heads & layout/static-dims": None,  # with_static_dims on the grown present: a MatMul failed to compile
    "rotary/position-ids": None,  # rotary._positions_BS: positions [B, S], not [-1, S]
    "quantized cache/int4-per-tensor": None,  # the adapter: uint8 results read as int8, mapped buffers reused
    "q/k norm/opset-23-rmsnorm": _IREE_NO_RMSNORM,
}


def _iree_case(case_id: str):
    marks = [pytest.mark.xdist_group("iree")]
    if IREE_CASES[case_id]:
        marks.append(pytest.mark.xfail(reason=IREE_CASES[case_id], strict=True, raises=RuntimeError))
    return pytest.param(case_id, marks=marks, id=case_id)


@pytest.mark.parametrize("case_id", [_iree_case(case_id) for case_id in IREE_CASES])
def test_portability_case_runs_on_iree(case_id):
    """The case's expansion on IREE against ORT CPU's fused node, every phase (as the table's cells)."""
    require("iree")
    from portability_cases import CASES, failures, run_case

    (case,) = [c for c in CASES if c.id == case_id]
    problems = failures(run_case(case, "iree"))
    if problems and IREE_CASES[case_id] and all("onnx.RMSNormalization" in p for p in problems):
        raise RuntimeError(problems[0])  # the pinned failure; any other is an AssertionError
    assert not problems, problems


# Each failed on LiteRT (onnx2tf 2.6.9, ai-edge-litert 2.1.2) before the graph or adapter change its comment names.
LITERT_CASES = [
    "windowed cache/sliding-window-cache",  # sliding_cache/mask: full-shape Where branches (TFLite SELECT)
    "causal=0, no past/no-past-packed",  # rotary._positions_BS: a Reshape to [1, S], not Unsqueeze(Range)
    "qk output/qk2-sink",  # fixed_shapes: folds until nothing is left, Slices of known values included
]


@pytest.mark.xdist_group("litert")
@pytest.mark.parametrize("case_id", LITERT_CASES)
def test_portability_case_runs_on_litert(case_id):
    """The case's expansion on LiteRT against ORT CPU's fused node, every phase (as the table's cells)."""
    require("litert")
    from portability_cases import CASES, failures, run_case

    (case,) = [c for c in CASES if c.id == case_id]
    problems = failures(run_case(case, "litert"))
    assert not problems, problems


# --runtime-profile litert on LiteRT: the cases the portable default fails there, one phase each (each phase is
# an onnx2tf conversion, ~6 s; the portability table runs every phase).
LITERT_PROFILE_CASES = {
    "int8-write": ("quantized cache/int8-per-channel", {}, "decode, growing cache"),
    "int8-promised-buffer": ("quantized cache/int8-per-channel", {"static_kv_cache": True}, "decode, static buffer"),
    "int4-write": ("quantized cache/int4-per-tensor", {}, "decode, static buffer"),
    "rmsnorm": ("q/k norm/opset-23-rmsnorm", {}, "decode, growing cache"),
}


def _litert_phase(case_id: str, phase_name: str, **options):
    """One phase of the case's expansion on LiteRT against ORT CPU's fused node (``options``: DecomposeOptions
    fields besides the case's)."""
    from gqa_models import gqa_node, make_gqa_model
    from portability_cases import CASES

    from gqa_decompose.expansion.gqa import Lowering
    from gqa_decompose.spec import DecomposeOptions, parse_gqa_node
    from gqa_decompose.verify import phases_for, verify_node_model

    (case,) = [c for c in CASES if c.id == case_id]
    model = make_gqa_model(case.config)
    _, node = gqa_node(model)
    decompose_options = DecomposeOptions(**{**dict(case.options), **options})
    spec = parse_gqa_node(node, decompose_options)
    lowering = Lowering.of(node, spec, decompose_options)
    (phase,) = [p for p in phases_for(node, spec, lowering) if p.name == phase_name]
    result = verify_node_model(
        node,
        case.config.opset,
        model.ir_version,
        decompose_options,
        phases=[phase],
        runtime="litert",
        total_length_from_shape=runtimes.get_runtime("litert").shapes_from_input_shapes,
    )
    (outcome,) = result.results
    return outcome


@pytest.mark.xdist_group("litert")
@pytest.mark.parametrize("name", list(LITERT_PROFILE_CASES))
def test_litert_profile_runs_on_litert(name):
    """Its quantized cache written in int32 (TFLite aborts on onnx2tf's int8 ScatterND) and its q/k norm by
    primitives (LiteRT has no RMSNormalization kernel), on LiteRT against ORT CPU."""
    require("litert")
    case_id, options, phase = LITERT_PROFILE_CASES[name]
    outcome = _litert_phase(case_id, phase, runtime_profile="litert", **options)
    assert outcome.passed, outcome.failure


@pytest.mark.xdist_group("litert")
def test_litert_aborts_on_the_portable_int8_cache_write():
    """Why the litert profile widens the write: onnx2tf 2.6.9 spells ScatterND on int8 as
    data * (1 - ScatterND(ones)) + ScatterND(updates), and TFLite's quantized SUB aborts. If LiteRT runs it,
    this test fails: the profile's int32 write can go."""
    require("litert")
    outcome = _litert_phase("quantized cache/int8-per-channel", "decode, growing cache")
    assert not outcome.passed and "SIGABRT" in outcome.failure, outcome.failure


def _add_model() -> onnx.ModelProto:
    """y = a + c, with c's dims unknown: valid ONNX broadcasting when c turns out to be [1, n]."""
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["b", "n"])
    c = helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["p", "q"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["a", "c"], ["y"])], "add", [a, c], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.xdist_group("iree")
def test_iree_broadcasts_a_dim_it_does_not_know_is_1_wrongly_and_the_rewrite_states_the_bias_dims():
    """IREE 3.13 bug: a dim that ONNX's inference leaves unknown is taken for one that does not broadcast, so
    [2, 4] + [1, 4] adds c to row 0 only, silently. The rewrite's bias lost its dims [1, 1] through a Pad by
    computed amounts (output off by 2.69); it states them again (builder.with_static_dims). If IREE fixes it,
    this test fails: the Reshape can go."""
    require("iree")
    a, c = np.arange(8, dtype=np.float32).reshape(2, 4), np.full((1, 4), 100, np.float32)
    got = runtimes.get_runtime("iree").load(_add_model()).run({"a": a, "c": c})["y"]
    np.testing.assert_array_equal(got[0], a[0] + 100)
    np.testing.assert_array_equal(got[1], a[1])  # wrong: a + c is a[1] + 100 there


def _matmul_model() -> onnx.ModelProto:
    """[2, 2, 10, 16] @ [x, y, 16, n]: static batch dims by unknown ones, as queries by the grown cache's keys."""
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, 2, 10, 16])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["x", "y", 16, "n"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "matmul", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.xdist_group("iree")
def test_iree_fails_a_matmul_of_static_by_unknown_batch_dims():
    """IREE 3.13 bug: the static-dims case failed to compile on this (its present lost every dim through the
    Pad that grows it); the rewrite states the past's static dims again. If IREE fixes it, this test fails."""
    require("iree")
    from gqa_decompose import runtime_iree

    with pytest.raises(RuntimeError, match="'tensor.expand_shape' op expected dimension 0 of collapsed type"):
        runtime_iree._compile(_matmul_model())


@pytest.mark.xdist_group("litert")
def test_litert_runs_the_tiny_llama_at_batch_2():
    """The table's whole-model run (ragged batch 2 prompt with empty past, 3 decode steps). It failed in
    TFLite's SELECT (a Where of [1, S] and [B, S]: "select.cc:109 HaveSameShapes(input_x, input_y)"), then in
    XNNPack on a Reshape to [0, 2, 0, 16] (the fixed-shape copy spells targets out)."""
    require("litert")
    from portability_cases import run_whole_model

    assert run_whole_model("litert", "growing") < 1e-4


# The fixed-shape copy (TVM, LiteRT) -------------------------------------------------------------------


@pytest.mark.parametrize("fixture", list(FIXTURES))
@pytest.mark.parametrize("phase", PHASES)
def test_fixed_shape_copy_is_static_folds_shape_arithmetic_and_computes_the_same(fixture, phase):
    """On ORT: the copy gives the rewrite's results; every value has static dims, no Shape node is left, and
    an empty past is an initializer, not an input (TVM reads a dim of 0 as unknown)."""
    from gqa_decompose.fixed_shapes import fixed_shape_copy

    feeds, want = phases(fixture, "growing")[phase]
    model = decomposed(fixture, "default")
    fixed = fixed_shape_copy(model, {name: array.shape for name, array in feeds.items()})
    assert "Shape" not in {node.op_type for node in fixed.graph.node}
    targets = {t.name: onnx.numpy_helper.to_array(t) for t in fixed.graph.initializer}
    reshapes = [node for node in fixed.graph.node if node.op_type == "Reshape"]
    assert reshapes and all(node.input[1] in targets and min(targets[node.input[1]]) > 0 for node in reshapes)
    inputs = [value.name for value in fixed.graph.input]
    assert all(feeds[name].size > 0 for name in inputs) and len(inputs) == len(feeds) - 4 * (phase == "prompt")
    for value in [*fixed.graph.value_info, *fixed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims), value.name
    got = runtimes.get_runtime("onnxruntime").load(fixed).run({name: feeds[name] for name in inputs})
    assert max_error(feeds, want, got) < TOLERANCE


# The adapters ---------------------------------------------------------------------------------------


def test_litert_without_its_python_names_what_to_install(monkeypatch, tmp_path):
    from gqa_decompose import runtime_litert

    monkeypatch.setenv("GQA_DECOMPOSE_LITERT_PYTHON", str(tmp_path / "missing" / "python"))
    runtime_litert.version.cache_clear()
    try:
        with pytest.raises(GqaDecomposeError, match=r"runtime 'litert' is not available: no Python at .*onnx2tf"):
            runtimes.get_runtime("litert").load(onnx.load(FIXTURES["tiny"]))
        assert "litert" not in runtimes.available_runtimes()
    finally:
        runtime_litert.version.cache_clear()


def _cli_case(runtime: str):
    return pytest.param(runtime, marks=[pytest.mark.xdist_group(runtime)])


@pytest.mark.parametrize("runtime", [_cli_case(runtime) for runtime in COMPILERS])
def test_cli_check_runtime_runs_the_tiny_model_on_the_compiler(runtime):
    """``--check --runtime NAME`` on the compilers: the rewritten tiny model's prompt, against the original on ORT."""
    require(runtime)
    from click.testing import CliRunner

    from gqa_decompose.cli import main

    result = CliRunner().invoke(main, [str(FIXTURES["tiny"]), "--check", "--no-verify", "--runtime", runtime, "-q"])
    version = runtimes.get_runtime(runtime).version()
    assert result.exit_code == 0, result.stdout
    assert f"{runtime} {version}: the rewritten model runs a prompt" in result.stdout
    assert f"runs on {runtime} {version} once decomposed" in result.stdout
