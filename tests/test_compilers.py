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


_LITERT_FOUR_TOKEN_PROMPT = (
    "onnx2tf 2.6.9 converts the tiny model's 4-token empty-past prompt wrongly (logits off by 1.02 on LiteRT's "
    "reference kernels; XNNPack, one thread: 'XNNPack delegate failed to reshape runtime'); 2, 3, 5 and 8 tokens, "
    "and 4 tokens after 4 past rows, are right"
)


@pytest.mark.xdist_group("litert")
@pytest.mark.xfail(reason=_LITERT_FOUR_TOKEN_PROMPT, strict=True)
def test_litert_runs_a_four_token_prompt_with_empty_past():
    require("litert")
    original = onnx.load(FIXTURES["tiny"])
    feeds = {"input_ids": np.array([[3, 4, 5, 6]], np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in original.graph.input if "past" in i.name})
    want = runtimes.get_runtime("onnxruntime").load(original).run(feeds)
    got = _session("litert", "tiny", "default").run(feeds)
    assert max_error(feeds, want, got) < TOLERANCE


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
    marks = [pytest.mark.xdist_group(runtime)]
    if runtime == "litert":  # --check runs a 4-token prompt
        marks.append(pytest.mark.xfail(reason=_LITERT_FOUR_TOKEN_PROMPT, strict=True))
    return pytest.param(runtime, marks=marks)


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
