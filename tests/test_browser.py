"""The decomposed fixtures in a real browser: onnxruntime-web in headless Chromium, on wasm and on WebNN.

WebNN runs are strict (``session.disable_cpu_ep_fallback=1``): a node the WebNN
execution provider does not take fails the session, so a pass means the whole
model ran on WebNN (its LiteRT/XNNPACK CPU backend, from npm's @sparticuz/chromium).

Each fixture, rewritten in two forms, runs a first prompt (empty past) and one
decode step, batch 1, with each cache the form admits:

* ``default-growing``: the default rewrite, fed a cache that grows (past = the prompt's present);
* ``default-static``: the default rewrite, fed a max-length buffer of ``BUFFER`` rows;
* ``kvstatic-static``: the rewrite with ``static_kv_cache=True`` (what the CLI writes
  for builder models, whose genai_config shares past and present), fed the buffer;
* on WebNN also ``webnn-growing``, ``webnn-static``, ``webnn-kvstatic-static``: the same with
  ``--runtime-profile webnn``, which must pass them all.

Outputs are compared with ORT CPU's run of the original model on the same feeds;
the decode step is fed ORT's own presents, so each phase is judged alone.
One browser serves the whole file (gqa_decompose.browser starts it once).

Needs ``npm ci --prefix tests/browser`` (.ci/run does it); skipped without it, except
where ``GQA_DECOMPOSE_REQUIRE_BROWSER=1`` (.ci/run): there a missing harness is an error.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np
import onnx
import pytest
from fixture_phases import FIXTURES, MODELS, PHASES, TOLERANCE, VARIANTS, max_error
from fixture_phases import decomposed as _decomposed
from fixture_phases import original as _original
from fixture_phases import phases as _phases

from gqa_decompose import runtimes
from gqa_decompose.errors import GqaDecomposeError

# One xdist worker runs the whole file (with --dist loadgroup, as .ci/run): one browser, not one per worker.
pytestmark = pytest.mark.xdist_group("browser")

BACKENDS = ("wasm", "webnn")

try:
    runtimes.get_runtime("wasm").require()
    MISSING = None
except GqaDecomposeError as error:
    MISSING = error.reason
    if os.environ.get("GQA_DECOMPOSE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"GQA_DECOMPOSE_REQUIRE_BROWSER=1 but {MISSING}", pytrace=False)


# Why WebNN (strict) refuses a case today, from the WebNN EP's log (onnxruntime-web 1.30, Chromium 153): the
# fragments its error must contain. Strict xfails: a case that passes, or fails for another reason, fails the
# test, so this table follows the fixes (issue 14) instead of hiding them.
_ZERO_DIM_PADS = (  # the empty past, padded to the present's length
    "Pad (/model/layers.0/attn/GroupQueryAttention/Pad_",
    "The shape of [past_key_values.0.key] has 0 dimension which is not supported by WebNN",
)
_RENAMED_NORM_OUTPUTS = (  # the rewrite names SkipSimplifiedLayerNormalization's empty optional outputs
    "SkipSimplifiedLayerNormalization (/model/layers.0/post_attention_layernorm/SkipLayerNorm",
    "SkipSimplifiedLayerNormalization's output mean and inv_std_var are not supported.",
)
_DATA_DEPENDENT_SHAPES = (  # static_kv_cache reads the rows to attend from the mask's contents
    "Dynamic shape is not supported, use sessionOptions.FreeDimensionOverrides to set a fixed shape",
    "MatMul (/model/layers.0/attn/GroupQueryAttention/MatMul_",
)
WEBNN_KNOWN_FAILURES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("tiny", "default-growing", "prompt"): _ZERO_DIM_PADS,
    ("tiny", "kvstatic-static", "prompt"): _DATA_DEPENDENT_SHAPES,
    ("tiny", "kvstatic-static", "decode"): _DATA_DEPENDENT_SHAPES,
    # The builder's norms are decomposed by default now (and kept whole, their empty outputs empty, with
    # --only GroupQueryAttention): _RENAMED_NORM_OUTPUTS no longer applies to any case.
    ("builder", "default-growing", "prompt"): _ZERO_DIM_PADS,
    ("builder", "kvstatic-static", "prompt"): _DATA_DEPENDENT_SHAPES,
    ("builder", "kvstatic-static", "decode"): _DATA_DEPENDENT_SHAPES,
}


# --runtime-profile webnn, on WebNN (strict) only: every variant passes, the empty-past prompt and the
# static_kv_cache form included (what WEBNN_KNOWN_FAILURES pins for the portable default).
WEBNN_PROFILE_VARIANTS = {
    "webnn-growing": ("webnn", "growing"),
    "webnn-static": ("webnn", "static"),
    "webnn-kvstatic-static": ("webnn-kvstatic", "static"),
}


def _case(backend: str, fixture: str, variant: str, phase: str):
    marks = []
    if backend == "webnn" and (fixture, variant, phase) in WEBNN_KNOWN_FAILURES:
        reason = " / ".join(WEBNN_KNOWN_FAILURES[fixture, variant, phase])
        marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=RuntimeError))
    return pytest.param(backend, fixture, variant, phase, marks=marks, id=f"{backend}-{fixture}-{variant}-{phase}")


CASES = [
    _case(backend, fixture, variant, phase)
    for backend in BACKENDS
    for fixture in FIXTURES
    for variant in VARIANTS
    for phase in PHASES
] + [
    _case("webnn", fixture, variant, phase)
    for fixture in FIXTURES
    for variant in WEBNN_PROFILE_VARIANTS
    for phase in PHASES
]

needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"browser harness not installed: {MISSING}")


@needs_browser
@pytest.mark.parametrize("backend,fixture,variant,phase", CASES)
def test_decomposed_fixture_runs_in_the_browser(backend, fixture, variant, phase, record_property):
    form, cache = {**VARIANTS, **WEBNN_PROFILE_VARIANTS}[variant]
    feeds, want = _phases(fixture, cache)[phase]
    pinned = WEBNN_KNOWN_FAILURES.get((fixture, variant, phase), ()) if backend == "webnn" else ()
    try:
        got = _session(backend, fixture, form).run(feeds)
    except RuntimeError as error:
        missing = [fragment for fragment in pinned if fragment not in str(error)]
        if not pinned or missing:  # failing for another reason than the pinned one is a real failure
            raise AssertionError(f"fails, and not (only) as pinned {missing}: {error}") from None
        raise
    error = max_error(feeds, want, got)
    record_property("max_error", error)
    assert error < TOLERANCE, error


@functools.cache
def _session(backend: str, fixture: str, form: str) -> runtimes.Session:
    return runtimes.get_runtime(backend).load(_decomposed(fixture, form))


# The anchor: WebNN strict can pass a GQA model ------------------------------------------------------


@needs_browser
def test_original_builder_model_with_a_static_buffer_prompt_runs_on_webnn():
    """The WebNN EP has its own GroupQueryAttention: the original builder model's static-buffer prompt runs
    100% on WebNN. What the rewrite must match (and, with a growing cache, beat: there the original fails)."""
    feeds, want = _phases("builder", "static")["prompt"]
    got = runtimes.get_runtime("webnn").load(_original("builder")).run(feeds)
    assert max_error(feeds, want, got) < TOLERANCE


@needs_browser
@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="WebNN EP refuses GroupQueryAttention on an empty past")
def test_original_builder_model_empty_past_prompt_does_not_run_on_webnn():
    """The original's own GQA on WebNN: its first prompt on an empty past goes to the CPU ("has 0 dimension"),
    which --runtime-profile webnn runs (the webnn-growing prompt cases above)."""
    feeds, want = _phases("builder", "growing")["prompt"]
    try:
        runtimes.get_runtime("webnn").load(_original("builder")).run(feeds)
    except RuntimeError as error:
        assert "GroupQueryAttention (/model/layers.0/attn/GroupQueryAttention" in str(error), error
        assert "has 0 dimension which is not supported by WebNN" in str(error), error
        raise


# The adapter ---------------------------------------------------------------------------------------


def _identity_model(dtypes: dict[str, int]) -> onnx.ModelProto:
    from onnx import helper

    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in dtypes]
    inputs = [helper.make_tensor_value_info(name, t, None) for name, t in dtypes.items()]
    outputs = [helper.make_tensor_value_info(f"{name}_out", t, None) for name, t in dtypes.items()]
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@needs_browser
def test_tensors_cross_into_the_browser_and_back_unchanged():
    """The raw transport keeps dtype, shape and bytes: scalars, empty tensors, int64 beyond 2**53, fp16, bool."""
    feeds = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "f16": np.array([[1.5, -0.0, 65504]], np.float16),
        "i64": np.array([2**62 + 1, -3], np.int64),
        "i32": np.array(7, np.int32),
        "u8": np.zeros((1, 0, 4), np.uint8),
        "b": np.array([True, False, True]),
    }
    types = {name: onnx.helper.np_dtype_to_tensor_dtype(array.dtype) for name, array in feeds.items()}
    got = runtimes.get_runtime("wasm").load(_identity_model(types)).run(feeds)
    for name, array in feeds.items():
        have = got[f"{name}_out"]
        assert have.dtype == array.dtype and have.shape == array.shape, name
        assert have.tobytes() == array.tobytes(), name


def test_missing_npm_packages_name_npm_install(monkeypatch, tmp_path):
    monkeypatch.setenv("GQA_DECOMPOSE_BROWSER_HARNESS", str(tmp_path))
    with pytest.raises(GqaDecomposeError, match="runtime 'webnn' is not available: no browser harness at"):
        runtimes.get_runtime("webnn").load(_original("tiny"))
    (tmp_path / "harness.mjs").write_text("")
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    pattern = rf"runtime 'wasm' is not available: npm packages onnxruntime-web, .* are missing \(npm install --prefix {tmp_path}\)"
    with pytest.raises(GqaDecomposeError, match=pattern):
        runtimes.get_runtime("wasm").version()
    assert "wasm" not in runtimes.available_runtimes() and "webnn" not in runtimes.available_runtimes()


def _add_model() -> onnx.ModelProto:
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"], name="double")], "add", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@needs_browser
def test_webnn_is_strict_and_says_which_nodes_it_left_to_the_cpu_and_why():
    """WebNN takes no zero-size tensor: strict mode refuses the session, and the error names the node and the
    WebNN EP's reason (ORT's own message says only that some node fell back). Non-empty, it runs."""
    session = runtimes.get_runtime("webnn").load(_add_model())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(session.run({"x": x})["y"], 2 * x)  # its own session: rows fixed to 2
    with pytest.raises(RuntimeError) as failure:
        session.run({"x": np.zeros((0, 4), np.float32)})
    assert str(failure.value).startswith(
        "WebNN EP left 1 of 1 nodes to the CPU: 1 Add (double); its reasons: "
        "The shape of [x] has 0 dimension which is not supported by WebNN"
    )
    assert "fallback to CPU EP has been explicitly disabled by the user" in str(failure.value)


@needs_browser
def test_bench_timer_runs_the_model_in_the_page_and_webnn_timing_stays_strict():
    """scripts/bench.py's browser timings: ``timer(model, feeds, backend)(n)`` runs the feeds n times in the page
    and returns seconds per run; a WebNN timing session is strict too, so a model it refuses cannot be timed."""
    from gqa_decompose import browser

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for backend in BACKENDS:
        seconds = browser.timer(_add_model(), {"x": x}, backend)(3)
        assert 0 < seconds < 10, (backend, seconds)
    with pytest.raises(RuntimeError, match="fallback to CPU EP has been explicitly disabled"):
        browser.timer(_add_model(), {"x": np.zeros((0, 4), np.float32)}, "webnn")(1)


# gqa-decompose --check --runtime wasm / webnn -----------------------------------------------------------


@needs_browser
def test_cli_check_runtime_runs_the_model_in_the_browser(tmp_path):
    from click.testing import CliRunner

    from gqa_decompose.cli import main

    result = CliRunner().invoke(main, [str(FIXTURES["tiny"]), "--check", "--runtime", "wasm", "--runtime", "webnn"])
    out = result.stdout
    version = runtimes.get_runtime("wasm").version()
    assert f"GroupQueryAttention: on wasm {version}: verified" in out
    assert f"runs on wasm {version} once decomposed" in out
    # --check runs an empty-past prompt: on WebNN, what the table above says of it.
    pinned = WEBNN_KNOWN_FAILURES.get(("tiny", "default-growing", "prompt"))
    assert result.exit_code == (1 if pinned else 0), out
    if pinned:
        assert all(fragment in out for fragment in pinned), out
        assert f"does NOT run on webnn {version} once decomposed" in out
    else:
        assert f"runs on webnn {version} once decomposed" in out


@needs_browser
def test_check_browser_script_runs_a_users_model(monkeypatch, capsys):
    """scripts/check_browser.py (docs/browser.md): the tiny model's default rewrite with a static buffer runs
    on both backends, prompt and decode."""
    import importlib.util

    path = MODELS.parent / "scripts" / "check_browser.py"
    spec = importlib.util.spec_from_file_location("check_browser", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("sys.argv", ["check_browser.py", str(FIXTURES["tiny"]), "--static-buffer"])
    assert script.main() == 0
    out = capsys.readouterr().out
    assert [line.split(": ")[1].split(",")[0] for line in out.splitlines()] == ["pass"] * 4, out
    assert out.count("webnn (") == 2
