"""The static-KV-buffer promise (--kv-cache static): one cache copy less, exact on static buffers, loud otherwise."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from gqa_models import GqaConfig, all_nodes, gqa_node, make_gqa_model
from test_structure import MODELS

import gqa_decompose
from gqa_decompose import runtimes
from gqa_decompose.cli import main
from gqa_decompose.spec import DecomposeOptions
from gqa_decompose.verify import verify_node_model

CONFIGS = {
    "plain": GqaConfig(),
    "packed_rotary": GqaConfig(packed=True, rotary="half"),
    "interleaved_fp16": GqaConfig(rotary="interleaved", dtype="float16"),
    "window_bias": GqaConfig(local_window_size=2, attention_bias="full"),
    "qk_output_sink": GqaConfig(qk_output=2, head_sink=True),
    "no_present": GqaConfig(present=False, rotary="half"),
    "kv_empty": GqaConfig(kv_empty=True),
}


@pytest.mark.parametrize("static_dims", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_kv_cache_matches_ort_on_static_buffers(name, static_dims):
    config = dataclasses.replace(CONFIGS[name], static_dims=static_dims)
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    result = verify_node_model(node, config.opset, model.ir_version, DecomposeOptions(static_kv_cache=True))
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
    assert all("static buffer" in r.phase.name for r in result.results)


def test_static_kv_cache_writes_into_past_without_padding():
    model = make_gqa_model(GqaConfig(rotary="half"))
    static_ops = [n.op_type for n in all_nodes(gqa_decompose.decompose(model, static_kv_cache=True).graph)]

    def pads_of_past(graph) -> int:
        return sum(n.op_type == "Pad" and n.input[0] in ("past_key", "past_value") for n in all_nodes(graph))

    default_graph = gqa_decompose.decompose(model).graph
    static_graph = gqa_decompose.decompose(model, static_kv_cache=True).graph
    assert pads_of_past(default_graph) == 2
    assert pads_of_past(static_graph) == 0 and static_ops.count("ScatterND") == 2


def test_static_kv_cache_fails_loudly_on_a_growing_cache():
    model = gqa_decompose.decompose(make_gqa_model(GqaConfig()), static_kv_cache=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "query": rng.standard_normal((1, 1, 64)).astype(np.float32),
        "key": rng.standard_normal((1, 1, 32)).astype(np.float32),
        "value": rng.standard_normal((1, 1, 32)).astype(np.float32),
        "past_key": rng.standard_normal((1, 2, 6, 16)).astype(np.float32),
        "past_value": rng.standard_normal((1, 2, 6, 16)).astype(np.float32),
        "seqlens_k": np.array([6], np.int32),
        "total_sequence_length": np.array(7, np.int32),  # T = P + 1: growing
    }
    with pytest.raises(Exception, match="ScatterND"):
        session.run(None, feeds)


def _pads_past(graph: onnx.GraphProto) -> bool:
    """Whether a Pad grows a past input (the general cache write; a static buffer is written in place)."""
    inputs = {value.name for value in graph.input}
    return any(node.op_type == "Pad" and node.input[0] in inputs for node in all_nodes(graph))


@pytest.mark.parametrize("kv_cache,expect_pad", [("auto", True), ("any", True), ("static", False)])
def test_kv_cache_auto_keeps_the_growing_path_beside_a_genai_config(tmp_path, kv_cache, expect_pad):
    """A genai_config.json with past_present_share_buffer only adds a note; the default stays general."""
    folder = tmp_path / "genai"
    shutil.copytree(MODELS / "builder-tiny-llama", folder)
    output = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, [str(folder / "model.onnx"), "-o", str(output), "--kv-cache", kv_cache, "-q"])
    assert result.exit_code == 0, result.output
    assert _pads_past(onnx.load(output).graph) == expect_pad
    assert ("note: genai_config.json sets past_present_share_buffer" in result.output) == (kv_cache == "auto")


def _growing_loop(path, decode_steps: int = 2) -> list[dict[str, np.ndarray]]:
    """A transformers.js-style loop on ORT CPU: a first prompt of 5 tokens with an empty past, then one token
    a step with each present fed back as past (it grows by a row). Every step's outputs, by name."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pasts = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values")}
    cache_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    feeds = {name: np.zeros((1, i.shape[1], 0, 16), cache_dtype[i.type]) for name, i in pasts.items()}
    ids = np.array([[1, 30, 33, 17, 48]], np.int64)
    steps = []
    for _ in range(decode_steps + 1):
        length = (feeds.get("attention_mask", np.zeros((1, 0))).shape[1]) + ids.shape[1]
        feeds.update(input_ids=ids, attention_mask=np.ones((1, length), np.int64))
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        steps.append(outputs)
        feeds.update({name: outputs[name.replace("past_key_values", "present")] for name in pasts})
        ids = outputs["logits"][:, -1:].argmax(-1).astype(np.int64)
    return steps


def test_default_output_of_a_genai_builder_model_runs_a_growing_cache_loop(tmp_path):
    """The CLI's default beside genai_config.json (past_present_share_buffer: true) must still run the growing
    loop the original runs (a static-only graph failed at the first prompt: ScatterND indices out of range)."""
    folder = tmp_path / "genai"
    shutil.copytree(MODELS / "builder-tiny-llama", folder)
    result = CliRunner().invoke(main, [str(folder / "model.onnx"), "-q", "--no-verify"])
    assert result.exit_code == 0, result.output
    expected, got = _growing_loop(folder / "model.onnx"), _growing_loop(folder / "model.decomposed.onnx")
    for step, (want, have) in enumerate(zip(expected, got)):
        assert want.keys() == have.keys()
        for name in want:
            assert have[name].shape == want[name].shape, (step, name)
            np.testing.assert_allclose(have[name], want[name], atol=1e-4, rtol=1e-4, err_msg=f"step {step} {name}")
    assert expected[-1]["present.0.key"].shape[2] == 7


def test_kv_cache_auto_without_genai_config_keeps_the_growing_path(tmp_path):
    model_path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "tiny-llama-gqa.onnx", model_path)
    result = CliRunner().invoke(main, [str(model_path), "-q"])
    assert result.exit_code == 0, result.output
    assert _pads_past(onnx.load(tmp_path / "m.decomposed.onnx").graph)


# The growing-cache promise (--kv-cache growing) ---------------------------------------------------

GROWING = {
    "plain": GqaConfig(),
    "packed_rotary_fp16": GqaConfig(packed=True, rotary="half", dtype="float16"),
    "window_bias": GqaConfig(local_window_size=2, attention_bias="full"),
    "no_present": GqaConfig(present=False, rotary="interleaved"),
    "int4_cache": GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4),
}


@pytest.mark.parametrize("name", list(GROWING))
def test_growing_kv_cache_matches_ort_on_aligned_rows(name):
    model = make_gqa_model(GROWING[name])
    _, node = gqa_node(model)
    result = verify_node_model(node, 21, model.ir_version, DecomposeOptions(growing_kv_cache=True))
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
    assert {r.phase.name for r in result.results} - {"long first prompt, growing cache"} == {
        "first prompt, growing cache",
        "decode, growing cache",
        "chunked prefill, growing cache",
    }


def test_growing_kv_cache_appends_without_scatter_or_pad():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half")), growing_kv_cache=True)
    ops = [node.op_type for node in decomposed.graph.node]
    assert "ScatterND" not in ops and "Pad" not in ops


def _decode_feeds(past_rows: int, seqlens, total: int):
    rng = np.random.default_rng(0)
    batch = len(seqlens)
    return {
        "query": rng.standard_normal((batch, 1, 64)).astype(np.float32),
        "key": rng.standard_normal((batch, 1, 32)).astype(np.float32),
        "value": rng.standard_normal((batch, 1, 32)).astype(np.float32),
        "past_key": rng.standard_normal((batch, 2, past_rows, 16)).astype(np.float32),
        "past_value": rng.standard_normal((batch, 2, past_rows, 16)).astype(np.float32),
        "seqlens_k": np.array(seqlens, np.int32),
        "total_sequence_length": np.array(total, np.int32),
    }


@pytest.mark.parametrize(
    "past_rows,seqlens,total",
    [(6, [6, 4], 7), (10, [6, 6], 7)],
    ids=["ragged rows", "static buffer"],
)
def test_growing_kv_cache_fails_loudly_when_the_promise_is_broken(past_rows, seqlens, total):
    model = gqa_decompose.decompose(make_gqa_model(GqaConfig()), growing_kv_cache=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    aligned = _decode_feeds(6, [6, 6], 7)
    session.run(None, aligned)  # the promise kept: runs
    with pytest.raises(Exception, match="Reshape"):
        session.run(None, _decode_feeds(past_rows, seqlens, total))


def test_static_and_growing_promises_exclude_each_other():
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="opposite"):
        DecomposeOptions(static_kv_cache=True, growing_kv_cache=True)


def test_cli_kv_cache_growing(tmp_path):
    model_path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "tiny-llama-gqa.onnx", model_path)
    result = CliRunner().invoke(main, [str(model_path), "-q", "--kv-cache", "growing"])
    assert result.exit_code == 0, result.output
    assert "growing KV cache" in result.output
    ops = {n.op_type for n in onnx.load(tmp_path / "m.decomposed.onnx").graph.node}
    assert "ScatterND" not in ops


# Runtime profiles (--fast-paths is onnxruntime's): the same contract through other forms --------


@pytest.mark.parametrize("profile", ["onnxruntime", "openvino", "webnn"])
@pytest.mark.parametrize("kv_cache", ["any", "static", "growing"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_runtime_profiles_match_ort_in_every_phase(name, kv_cache, profile):
    """onnxruntime's every branch: Concat / ScatterND into past / Pad + ScatterND, whole or cut
    buffer, row blocks; openvino's straight-line graph with the query scaled; webnn's If on an empty past
    (both branches run on ORT, which sees no fixed dims), a static buffer read whole."""
    config = CONFIGS[name]
    if kv_cache == "growing" and config.kv_empty:
        pytest.skip("a KV-shared layer has no growing cache")
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    options = DecomposeOptions(
        runtime_profile=profile, static_kv_cache=kv_cache == "static", growing_kv_cache=kv_cache == "growing"
    )
    result = verify_node_model(node, config.opset, model.ir_version, options)
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
    if kv_cache == "any" and not config.kv_empty:
        names = {r.phase.name for r in result.results}
        assert {"decode, growing cache", "decode, static buffer", "first prompt, growing cache"} <= names


@pytest.mark.parametrize("kv_cache", ["any", "static"])
@pytest.mark.parametrize("causal", [None, 0])
def test_fast_paths_over_a_past_of_no_rows(kv_cache, causal):
    """A KV-shared layer (or a static buffer) whose past has 0 rows in the graph: ORT could not type the
    whole-buffer branch of the cut (a Reshape of 0-column scores); found by the fuzzer."""
    config = GqaConfig(kv_empty=kv_cache == "any", sizes=(3, 4, 0, None), causal=causal, attention_bias="full")
    model = make_gqa_model(config)
    decomposed = gqa_decompose.decompose(model, fast_paths=True, static_kv_cache=kv_cache == "static")
    ort.InferenceSession(decomposed.SerializeToString(), providers=["CPUExecutionProvider"])
    _, node = gqa_node(model)
    options = DecomposeOptions(fast_paths=True, static_kv_cache=kv_cache == "static")
    result = verify_node_model(node, config.opset, model.ir_version, options)
    assert all(r.passed for r in result.results), [r.failure for r in result.results]


def test_fast_paths_is_the_onnxruntime_profile():
    model = make_gqa_model(GqaConfig(rotary="half"))
    assert DecomposeOptions(fast_paths=True) == DecomposeOptions(runtime_profile="onnxruntime")
    fast = gqa_decompose.decompose(model, fast_paths=True)
    assert fast.SerializeToString() == gqa_decompose.decompose(model, runtime_profile="onnxruntime").SerializeToString()
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="runtime_profile must be one of"):
        DecomposeOptions(runtime_profile="tract")


def test_openvino_profile_is_straight_line_with_the_query_scaled():
    """No If (OpenVINO runs them slower than the straight-line graph); the scale Mul feeds the
    scores' MatMul instead of following it (OpenVINO would move it onto the keys)."""
    model = make_gqa_model(GqaConfig(rotary="half"))

    def scaled_queries(profile: str) -> tuple[int, set[str]]:
        nodes = list(all_nodes(gqa_decompose.decompose(model, runtime_profile=profile).graph))
        produced_by = {output: n for n in nodes for output in n.output}
        matmuls = [n for n in nodes if n.op_type == "MatMul" and n.input[0] in produced_by]
        return sum(produced_by[m.input[0]].op_type == "Mul" for m in matmuls), {n.op_type for n in nodes}

    (openvino, ops), (portable, _) = scaled_queries("openvino"), scaled_queries("portable")
    assert "If" not in ops and (openvino, portable) == (1, 0)


def test_cli_runtime_profile(tmp_path):
    model_path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "tiny-llama-gqa.onnx", model_path)
    result = CliRunner().invoke(main, [str(model_path), "-q", "--runtime-profile", "onnxruntime"])
    assert result.exit_code == 0, result.output
    ops = {n.op_type for n in all_nodes(onnx.load(tmp_path / "m.decomposed.onnx").graph)}
    assert "If" in ops
    result = CliRunner().invoke(
        main, [str(model_path), "-q", "--runtime-profile", "webnn", "-o", str(tmp_path / "w.onnx")]
    )
    assert result.exit_code == 0, result.output
    graph = onnx.load(tmp_path / "w.onnx").graph
    assert {n.op_type for n in all_nodes(graph)} >= {"If", "ScatterND"} and "Pad" not in {n.op_type for n in graph.node}


@pytest.mark.parametrize(
    "config",
    [
        GqaConfig(kv_quant="PER_CHANNEL", kv_bits=8, rotary="half"),
        GqaConfig(kv_quant="PER_TENSOR", kv_bits=4),
        GqaConfig(local_window_size=2, extra_attributes=(("sliding_window_cache", 1),)),
        GqaConfig(dtype="bfloat16", rotary="half"),
        GqaConfig(past=False, packed=True),
    ],
    ids=["int8", "int4", "windowed", "bfloat16", "no-past"],
)
@pytest.mark.parametrize("profile", ["onnxruntime", "openvino", "webnn", "litert"])
def test_runtime_profiles_with_other_caches_and_types(config, profile):
    report = gqa_decompose.verify(make_gqa_model(config), runtime_profile=profile)
    assert report.passed, [r.failure for r in report.nodes[0].results]


# --runtime-profile litert: the portable graph but where LiteRT fails it (tests/test_compilers.py runs it there).
_LITERT_CONFIGS = {
    "int8_per_channel": GqaConfig(kv_quant="PER_CHANNEL", kv_bits=8, rotary="half"),
    "int8_per_tensor_packed": GqaConfig(kv_quant="PER_TENSOR", kv_bits=8, packed=True),
    "int4_per_tensor": GqaConfig(kv_quant="PER_TENSOR", kv_bits=4),
    "int4_per_channel_window": GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4, local_window_size=2),
    "qk_norm_opset23": GqaConfig(qk_norm="qk", rotary="half", opset=23),
    "qk_norm_packed_opset23_fp16": GqaConfig(qk_norm="qk", packed=True, opset=23, dtype="float16"),
}


@pytest.mark.parametrize("kv_cache", ["any", "static", "growing"])
@pytest.mark.parametrize("name", list(_LITERT_CONFIGS))
def test_litert_profile_matches_ort_in_every_phase(name, kv_cache):
    """Its int32 write of a quantized cache (a promised buffer's too) and its q/k norm by primitives, exact
    against ORT CPU: growing cache, static buffer, ragged batch, first prompt and chunked prefill."""
    config = _LITERT_CONFIGS[name]
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    options = DecomposeOptions(
        runtime_profile="litert", static_kv_cache=kv_cache == "static", growing_kv_cache=kv_cache == "growing"
    )
    result = verify_node_model(node, config.opset, model.ir_version, options)
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
    if kv_cache == "any":
        names = {r.phase.name for r in result.results}
        assert {"decode, growing cache", "decode, static buffer", "first prompt, growing cache"} <= names


def _scatter_data_types(model: onnx.ModelProto) -> list[str]:
    """The element type of every ScatterND's data input (the cache writes)."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    return sorted({onnx.TensorProto.DataType.Name(types[n.input[0]]) for n in graph.node if n.op_type == "ScatterND"})


@pytest.mark.parametrize("bits,codes", [(8, "INT8"), (4, "UINT8")])
@pytest.mark.parametrize("kv_cache", ["any", "static"])
def test_litert_profile_writes_a_quantized_cache_in_int32(kv_cache, bits, codes):
    """onnx2tf spells an int8 ScatterND with a quantized SUB that TFLite aborts on; the portable default
    scatters the codes themselves (ONNX Runtime's int8 decode would take 1.7x as long in int32)."""
    model = make_gqa_model(GqaConfig(kv_quant="PER_CHANNEL", kv_bits=bits, rotary="half"))
    static = kv_cache == "static"
    portable = gqa_decompose.decompose(model, static_kv_cache=static)
    litert = gqa_decompose.decompose(model, runtime_profile="litert", static_kv_cache=static)
    assert (_scatter_data_types(portable), _scatter_data_types(litert)) == ([codes], ["INT32"])
    assert "If" not in {n.op_type for n in all_nodes(litert.graph)}


def test_litert_profile_norms_by_primitives_and_is_the_portable_graph_otherwise():
    """LiteRT has no RMSNormalization kernel; a node with neither a quantized cache nor a q/k norm is
    emitted as by the portable default, byte for byte."""
    normed = make_gqa_model(GqaConfig(qk_norm="qk", rotary="half", opset=23))

    def ops(profile: str) -> set[str]:
        return {n.op_type for n in all_nodes(gqa_decompose.decompose(normed, runtime_profile=profile).graph)}

    assert "RMSNormalization" in ops("portable")
    assert "RMSNormalization" not in ops("litert") and "If" not in ops("litert")
    for config in (GqaConfig(rotary="half", packed=True), GqaConfig(local_window_size=2, attention_bias="full")):
        model = make_gqa_model(config)
        litert = gqa_decompose.decompose(model, runtime_profile="litert").graph.SerializeToString()
        assert litert == gqa_decompose.decompose(model).graph.SerializeToString()


@pytest.mark.parametrize("profile", ["openvino", "webnn", "litert"])
def test_fast_paths_is_refused_with_another_profile(tmp_path, profile):
    """--fast-paths is the onnxruntime profile: with another one, the API raises and the CLI exits 2 naming
    both; the profile alone rewrites."""
    with pytest.raises(
        gqa_decompose.GqaDecomposeError, match=f"fast_paths is the onnxruntime runtime profile, not {profile}"
    ):
        DecomposeOptions(fast_paths=True, runtime_profile=profile)
    model_path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "tiny-llama-gqa.onnx", model_path)
    result = CliRunner().invoke(main, [str(model_path), "-q", "--runtime-profile", profile, "--fast-paths"])
    assert result.exit_code == 2 and f"--fast-paths is --runtime-profile onnxruntime, not {profile}" in result.output
    assert not (tmp_path / "m.decomposed.onnx").exists()
    result = CliRunner().invoke(main, [str(model_path), "-q", "--runtime-profile", profile])
    assert result.exit_code == 0, result.output


_FIRST_PROMPT_CONFIGS = pytest.mark.parametrize(
    "config",
    [GqaConfig(rotary="half"), GqaConfig(packed=True, opset=24), GqaConfig(kv_quant="PER_TENSOR")],
    ids=["rotary", "packed_opset24", "int8"],
)


@pytest.mark.parametrize(
    "options",
    [
        DecomposeOptions(runtime_profile="onnxruntime"),
        DecomposeOptions(runtime_profile="onnxruntime", static_kv_cache=True),
        DecomposeOptions(runtime_profile="openvino"),
    ],
    ids=["onnxruntime", "onnxruntime_static", "openvino"],
)
@_FIRST_PROMPT_CONFIGS
def test_first_prompt_rows_past_the_prompt_are_zero_as_in_ort(config, options):
    """A first prompt into a static buffer with t_b = seqlens_k[b] + 1 > S: ORT copies no past
    rows, so present rows S .. t_b - 1 are 0 (the defined rows of present are [0, t_b)). The
    onnxruntime profile chooses at run time (an If): zeros in a first prompt, past otherwise."""
    _check_first_prompt_rows(config, options)


@pytest.mark.parametrize(
    "options",
    [
        DecomposeOptions(),
        DecomposeOptions(static_kv_cache=True),
        DecomposeOptions(target="attention"),
    ],
    ids=["default", "static", "attention"],
)
@_FIRST_PROMPT_CONFIGS
@pytest.mark.xfail(
    strict=True,
    reason="issue 13 item 7, left as a trade-off in the straight-line profiles: the rewrite keeps past in present "
    "rows S .. t_b - 1 of such a first prompt (as ORT does with a shared buffer). Tried: a Slice of past to a "
    "data-dependent row count (tract cannot type it); negative Pad pads cropping past in the first prompt (free on "
    "ORT, but tract aborts and onnx.reference rejects negative pads: the openvino profile uses them); a Where over the rows (exact and portable, but "
    "ORT's Where costs ~4.7x a copy: +77% on a decode step into a 4096-row buffer); a Mul by a row mask (not exact "
    "for non-finite past, no int8 Mul). The onnxruntime profile matches ORT (an If), the openvino one (negative pads)",
)
def test_first_prompt_rows_past_the_prompt_keep_past_in_straight_line_forms(config, options):
    """The straight-line forms keep past's rows S .. t_b - 1 in such a first prompt (ORT zeroes them)."""
    _check_first_prompt_rows(config, options)


@_FIRST_PROMPT_CONFIGS
def test_first_prompt_rows_past_the_prompt_are_zero_on_openvino(config):
    """The openvino profile's negative Pad pads, run by OpenVINO itself against ORT CPU's fused node."""
    if "openvino" not in runtimes.available_runtimes():
        pytest.skip("openvino is not installed")
    _check_first_prompt_rows(config, DecomposeOptions(runtime_profile="openvino"), runtime="openvino")


def _check_first_prompt_rows(config: GqaConfig, options: DecomposeOptions, runtime: str | None = None) -> None:
    from gqa_decompose.verify import Phase

    model = make_gqa_model(config)
    _, node = gqa_node(model)
    phases = [
        Phase("first prompt, static buffer, t_b > S", 2, 3, 8, 3, (6, 2)),
        Phase("first prompt, static buffer, t_b = S", 2, 3, 8, 3, (3, 2)),
    ]
    result = verify_node_model(node, config.opset, model.ir_version, options, phases=phases, runtime=runtime)
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
