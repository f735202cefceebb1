"""What the rewritten graph looks like: standard ops only, shared mask, no KV repetition, names."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from gqa_models import IR_VERSION, GqaConfig, all_nodes, gqa_node, make_gqa_model
from onnx import TensorProto, helper
from test_grid import assert_matches_ort

import gqa_decompose
from gqa_decompose.expansion.mask import ROW_BLOCK_TIERS, row_block_min_queries

MODELS = pathlib.Path(__file__).parent.parent / "models"
TINY_LLAMA = MODELS / "tiny-llama-gqa.onnx"


@pytest.fixture(scope="module")
def tiny_llama_decomposed() -> onnx.ModelProto:
    return gqa_decompose.decompose(onnx.load(TINY_LLAMA))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in all_nodes(model.graph) for output in node.output}


def test_no_microsoft_op_or_opset_import_is_left(tiny_llama_decomposed):
    assert all(node.domain in ("", "ai.onnx") for node in tiny_llama_decomposed.graph.node)
    assert [o.domain for o in tiny_llama_decomposed.opset_import] == [""]
    onnx.checker.check_model(tiny_llama_decomposed, full_check=True)


def test_model_keeps_its_ir_version_and_opset(tiny_llama_decomposed):
    original = onnx.load(TINY_LLAMA)
    assert tiny_llama_decomposed.ir_version == original.ir_version
    assert tiny_llama_decomposed.opset_import[0].version == 21


def test_both_layers_read_one_shared_mask(tiny_llama_decomposed):
    producers = _producers(tiny_llama_decomposed)
    mask_biases = {
        node.output[0]
        for node in tiny_llama_decomposed.graph.node
        if node.op_type == "Where" and producers[node.input[0]].op_type in ("Less", "And")
    }
    assert len(mask_biases) == 1
    (mask_bias,) = mask_biases
    score_masks = [node for node in all_nodes(tiny_llama_decomposed.graph) if mask_bias in node.input]
    assert len(score_masks) == 2
    assert all(node.op_type == "Add" and "/attn/" in node.name for node in score_masks)
    counts = collections.Counter(node.op_type for node in tiny_llama_decomposed.graph.node)
    assert counts["Less"] == 1
    assert counts["Range"] <= 3  # query rows, key columns, batch rows of the scatter indices


def test_kv_heads_are_never_repeated(tiny_llama_decomposed):
    for node in all_nodes(tiny_llama_decomposed.graph):
        assert node.op_type != "Tile"
        if node.op_type == "Expand":
            assert node.name.startswith("gqa_shared/"), node.name  # index tensors only


def test_grouped_query_heads_are_folded_into_gemm_rows(tiny_llama_decomposed):
    producers = _producers(tiny_llama_decomposed)
    constants = {
        node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t)
        for node in all_nodes(tiny_llama_decomposed.graph)
        if node.op_type == "Constant"
    }
    score_matmuls = [
        node
        for node in all_nodes(tiny_llama_decomposed.graph)
        if node.op_type == "MatMul"
        and producers.get(node.input[1]) is not None
        and producers[node.input[1]].op_type == "Transpose"
    ]
    assert len(score_matmuls) == 2
    for matmul in score_matmuls:
        transpose = producers[matmul.input[1]]
        assert list(transpose.attribute[0].ints) == [0, 1, 3, 2]
        query_reshape = producers[matmul.input[0]]
        assert query_reshape.op_type == "Reshape"
        # [B, Nkv=2, G*S, H=16]
        assert constants[query_reshape.input[1]].tolist() == [0, 2, -1, 16]


def test_new_nodes_are_named_after_the_replaced_node(tiny_llama_decomposed):
    original_names = {node.name for node in onnx.load(TINY_LLAMA).graph.node}
    for node in all_nodes(tiny_llama_decomposed.graph):
        if node.name in original_names:
            continue
        assert node.name.startswith(
            ("/model/layers.0/attn/GroupQueryAttention/", "/model/layers.1/attn/GroupQueryAttention/", "gqa_shared/")
        ), node.name


def test_layer_without_present_readers_writes_no_kv():
    model = make_gqa_model(GqaConfig(present=False, rotary="half"))
    decomposed = gqa_decompose.decompose(model)
    ops = {node.op_type for node in all_nodes(decomposed.graph)}
    assert "ScatterND" not in ops and "Pad" not in ops


def test_no_past_layer_writes_no_kv():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(past=False)))
    ops = {node.op_type for node in all_nodes(decomposed.graph)}
    assert "ScatterND" not in ops


def test_present_output_read_by_nobody_gets_no_kv_ops():
    model = make_gqa_model(GqaConfig(rotary="half"))
    del model.graph.output[1:]  # present_key/present_value exist on the node but nobody reads them
    decomposed = gqa_decompose.decompose(model)
    assert "ScatterND" not in {node.op_type for node in all_nodes(decomposed.graph)}


@pytest.mark.parametrize("opset", [13, 14, 17, 18, 21, 23, 24])
def test_expansion_is_valid_at_the_models_opset(opset):
    config = GqaConfig(opset=opset, rotary="half", dtype="float16", head_sink=True, attention_bias="full")
    decomposed = gqa_decompose.decompose(make_gqa_model(config))
    assert {o.domain: o.version for o in decomposed.opset_import} == {"": opset}
    onnx.checker.check_model(decomposed, full_check=True)
    assert all(not node.domain for node in decomposed.graph.node)
    assert_matches_ort(config)


def test_opset_below_13_is_refused_with_a_clear_error():
    with pytest.raises(gqa_decompose.GqaDecomposeError, match="opset is 12"):
        gqa_decompose.decompose(make_gqa_model(GqaConfig(opset=12)))


def test_model_without_gqa_is_returned_unchanged(caplog):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    with caplog.at_level("INFO", logger="gqa_decompose"):
        result = gqa_decompose.decompose(model)
    assert result.graph == model.graph
    assert "no com.microsoft.GroupQueryAttention" in caplog.text


def test_proto_input_is_not_modified():
    model = make_gqa_model(GqaConfig(rotary="half"))
    before = model.SerializeToString()
    gqa_decompose.decompose(model)
    assert model.SerializeToString() == before


def test_ir_model_is_rewritten_in_place_and_pass_runs_in_a_pass_manager():
    ir_model, _ = gqa_node(make_gqa_model(GqaConfig()))
    assert gqa_decompose.decompose(ir_model) is ir_model
    assert not any(node.domain == "com.microsoft" for node in ir_model.graph)

    other, _ = gqa_node(make_gqa_model(GqaConfig()))
    from gqa_decompose.passes import InferGqaTypesPass

    manager = ir.passes.PassManager([InferGqaTypesPass(), gqa_decompose.DecomposeGqaPass()])
    assert manager(other).modified
    assert not any(node.domain == "com.microsoft" for node in other.graph)

    # Alone, on a model whose second layer is untyped (ONNX inference stops at the first GQA).
    tiny = ir.serde.deserialize_model(onnx.load(TINY_LLAMA))
    assert ir.passes.PassManager([gqa_decompose.DecomposeGqaPass()])(tiny).modified
    assert not any(node.domain == "com.microsoft" for node in tiny.graph)


def _wrap_in_function(model: onnx.ModelProto, opset: int = 21) -> onnx.ModelProto:
    """The GQA node moves into a model-local function local::Attention, called once."""
    inner = model.graph
    gqa = inner.node[0]
    inputs = [name for name in gqa.input if name]
    imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    function = helper.make_function("local", "Attention", inputs, ["output"], [gqa], opset_imports=imports)
    call = helper.make_node("Attention", inputs, ["output"], domain="local", name="call")
    graph = helper.make_graph([call], "main", list(inner.input), list(inner.output))
    return helper.make_model(
        graph,
        functions=[function],
        ir_version=IR_VERSION,
        opset_imports=[*imports, helper.make_opsetid("local", 1)],
    )


def _wrap_in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """The GQA node moves into both branches of an If on a bool graph input."""
    inner = model.graph
    then_graph = helper.make_graph(
        list(inner.node), "then", [], [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    )
    else_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in inner.node]
    for node in else_nodes:
        node.name = "else/" + node.name
        node.output[:] = ["else_" + o if o else "" for o in node.output]
    else_graph = helper.make_graph(
        else_nodes, "else", [], [helper.make_tensor_value_info("else_output", TensorProto.FLOAT, None)]
    )
    if_node = helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if")
    graph = helper.make_graph(
        [if_node],
        "main",
        [*inner.input, helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inner.initializer),
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=IR_VERSION)


def _single_prompt_feeds(config: GqaConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "query": rng.standard_normal((2, 4, config.num_heads * config.head_size)).astype(np.float32),
        "key": rng.standard_normal((2, 4, config.kv_num_heads * config.head_size)).astype(np.float32),
        "value": rng.standard_normal((2, 4, config.kv_num_heads * config.head_size)).astype(np.float32),
        "seqlens_k": np.array([3, 1], np.int32),
        "total_sequence_length": np.array(4, np.int32),
    }


def _run(model: onnx.ModelProto, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def test_gqa_inside_if_branches_is_decomposed():
    config = GqaConfig(past=False, rotary="half", present=False)
    model = _wrap_in_if(make_gqa_model(config))
    decomposed = gqa_decompose.decompose(model)
    branches = [attr.g for attr in decomposed.graph.node[0].attribute]
    assert all(node.op_type != "GroupQueryAttention" for g in branches for node in g.node)
    assert all(node.domain == "" for g in branches for node in g.node)
    feeds = _single_prompt_feeds(config)
    for flag in (True, False):
        feeds["flag"] = np.array(flag)
        expected, got = _run(model, feeds)[0], _run(decomposed, feeds)[0]
        np.testing.assert_allclose(got[0], expected[0], atol=1e-5)
        np.testing.assert_allclose(got[1, :2], expected[1, :2], atol=1e-5)


def test_gqa_inside_a_model_local_function_is_decomposed():
    config = GqaConfig(past=False, present=False)
    model = _wrap_in_function(make_gqa_model(config))
    decomposed = gqa_decompose.decompose(model)
    assert all(node.domain != "com.microsoft" for f in decomposed.functions for node in f.node)
    feeds = _single_prompt_feeds(config)
    expected, got = _run(model, feeds)[0], _run(decomposed, feeds)[0]
    np.testing.assert_allclose(got[0], expected[0], atol=1e-5)


def test_a_model_without_value_info_is_typed_by_ort_symbolic_inference():
    # ONNX's inference stops at the builder's SimplifiedLayerNormalization; ORT's knows it.
    model = onnx.load(MODELS / "builder-tiny-llama" / "model.onnx")
    del model.graph.value_info[:]
    decomposed = gqa_decompose.decompose(model)
    assert not any(node.op_type == "GroupQueryAttention" for node in decomposed.graph.node)
    assert gqa_decompose.verify(model, decomposed).passed


@pytest.mark.parametrize("opset", [13, 17, 24])
@pytest.mark.parametrize(
    "config",
    [
        GqaConfig(local_window_size=2, extra_attributes=(("sliding_window_cache", 1),), attention_bias="full"),
        GqaConfig(kv_quant="PER_CHANNEL", kv_bits=4, rotary="interleaved", qk_output=2),
        GqaConfig(kv_empty=True, causal=0, smooth_softmax=1),
    ],
    ids=["windowed-cache-bias", "int4-cache-qk-output", "kv-empty-causal0"],
)
def test_later_features_are_valid_at_low_and_high_opsets(opset, config):
    import dataclasses

    config = dataclasses.replace(config, opset=opset)
    decomposed = gqa_decompose.decompose(make_gqa_model(config))
    onnx.checker.check_model(decomposed, full_check=True)
    assert_matches_ort(config)


def test_gqa_in_the_main_graph_and_a_subgraph_with_one_name_stays_ssa():
    config = GqaConfig(past=False, present=False)
    inner = make_gqa_model(config)
    gqa = inner.graph.node[0]
    branch_node = onnx.NodeProto.FromString(gqa.SerializeToString())  # same node name
    branch_node.output[0] = "branch_output"
    then_graph = helper.make_graph(
        [branch_node], "then", [], [helper.make_tensor_value_info("branch_output", TensorProto.FLOAT, None)]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["output"], ["else_output"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_output", TensorProto.FLOAT, None)],
    )
    if_node = helper.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if")
    graph = helper.make_graph(
        [gqa, if_node],
        "main",
        [*inner.graph.input, helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        # A shape, so that the model itself passes the checker: its declarations come out as they were.
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 64])],
    )
    model = helper.make_model(graph, opset_imports=list(inner.opset_import), ir_version=IR_VERSION)
    decomposed = gqa_decompose.decompose(model)
    onnx.checker.check_model(decomposed, full_check=True)
    names = [o for n in decomposed.graph.node for o in n.output]
    names += [
        o
        for n in decomposed.graph.node
        for a in n.attribute
        if a.type == onnx.AttributeProto.GRAPH
        for m in a.g.node
        for o in m.output
    ]
    assert len(names) == len(set(names))
    feeds = _single_prompt_feeds(config)
    for flag in (True, False):
        feeds["flag"] = np.array(flag)
        np.testing.assert_allclose(_run(decomposed, feeds)[0][0], _run(model, feeds)[0][0], atol=1e-5)


# Run-time read paths: causal row blocks for long prompts, a cut of long buffers --------------------


def _softmax_count(graph: onnx.GraphProto) -> int:
    return sum(node.op_type == "Softmax" for node in all_nodes(graph))


def _row_block_ifs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """If nodes of the main graph choosing causal row blocks (then) over one full-width attention (else)."""
    producers = _producers(model)
    return [
        node
        for node in model.graph.node
        if node.op_type == "If"
        and producers[node.input[0]].op_type == "GreaterOrEqual"
        and _softmax_count(node.attribute[0].g)
    ]


def _threshold(model: onnx.ModelProto, choice: onnx.NodeProto) -> int:
    """The constant S is compared with by the If's condition (S >= threshold)."""
    condition = _producers(model)[choice.input[0]]
    constants = {n.output[0]: n for n in all_nodes(model.graph) if n.op_type == "Constant"}
    return int(onnx.numpy_helper.to_array(constants[condition.input[1]].attribute[0].t))


@pytest.mark.parametrize("kv_cache", ["any", "static", "growing"])
def test_long_prompts_use_causal_row_blocks_and_decode_does_not(kv_cache):
    options = {"static": {"static_kv_cache": True}, "growing": {"growing_kv_cache": True}}.get(kv_cache, {})
    options["fast_paths"] = True
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half")), **options)
    # One choice per layer, S >= the shortest tier's minimum, decided at run time.
    (choice,) = _row_block_ifs(decomposed)
    assert _threshold(decomposed, choice) == row_block_min_queries()
    # A long prompt then picks the longest tier it reaches, through one nested If per further tier.
    branch = choice.attribute[0].g
    for index, (minimum, blocks) in enumerate(ROW_BLOCK_TIERS):
        if index < len(ROW_BLOCK_TIERS) - 1:
            (tier_choice,) = [n for n in branch.node if n.op_type == "If"]
            assert _threshold(decomposed, tier_choice) == max(minimum, blocks)
            blocks_branch, branch = tier_choice.attribute[0].g, tier_choice.attribute[1].g
        else:
            blocks_branch = branch
        # Each block slices its queries, the keys and values it can see, and the mask rows.
        assert [n.op_type for n in blocks_branch.node].count("Softmax") == blocks
        assert [n.op_type for n in blocks_branch.node].count("Slice") >= 4 * blocks
    # Below the shortest tier (decode): one attention, or two behind a cut of a long buffer.
    decode_branch = choice.attribute[1].g
    assert _softmax_count(decode_branch) == (1 if kv_cache == "growing" else 2)
    producers = _producers(decomposed)
    assert "GreaterOrEqual" not in {
        producers[n.input[0]].op_type for n in all_nodes(decode_branch) if n.op_type == "If"
    }


def _ops_run_in_decode(model: onnx.ModelProto) -> int:
    """Ops a decode step runs in the main graph and the else branches of row-block Ifs (no Constants)."""
    row_block_ifs = {node.name for node in _row_block_ifs(model)}

    def count(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            total += 1
            if node.name in row_block_ifs:
                total += count(node.attribute[1].g)
        return total

    return count(model.graph)


@pytest.mark.parametrize("kv_cache", ["static", "growing"])
def test_decode_runs_few_more_ops_with_row_blocks(kv_cache):
    """Decode pays one If per layer and a few vector ops per model for row blocks, not per-block arithmetic."""
    options = {"static": {"static_kv_cache": True}, "growing": {"growing_kv_cache": True}}[kv_cache]
    model = make_gqa_model(GqaConfig(rotary="half"))
    straight = _ops_run_in_decode(gqa_decompose.decompose(model, **options))
    with_blocks = _ops_run_in_decode(gqa_decompose.decompose(model, fast_paths=True, **options))
    # Per model: the largest offset, K as a vector, and per tier its condition and the four
    # vector ops of its bounds; per layer: one If (static adds the cut's If and its scalar ops).
    assert with_blocks - straight <= 2 + 5 * len(ROW_BLOCK_TIERS) + 1 + 4, (straight, with_blocks)


def test_short_static_queries_output_qk_and_the_default_get_no_row_blocks():
    short = gqa_decompose.decompose(make_gqa_model(GqaConfig(static_dims=True)), fast_paths=True)
    assert not _row_block_ifs(short) and _softmax_count(short.graph) == 2  # S = 5: whole or cut buffer only
    for qk_output in (1, 2):
        with_scores = gqa_decompose.decompose(make_gqa_model(GqaConfig(qk_output=qk_output)), fast_paths=True)
        assert not _row_block_ifs(with_scores) and _softmax_count(with_scores.graph) == 1
    non_causal = gqa_decompose.decompose(make_gqa_model(GqaConfig(causal=0)), fast_paths=True)
    assert not _row_block_ifs(non_causal)
    # Without fast paths the graph is straight-line (runtimes such as tract cannot type an If).
    for options in ({}, {"static_kv_cache": True}, {"growing_kv_cache": True}):
        default = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half")), **options)
        assert "If" not in {node.op_type for node in default.graph.node}


def test_max_length_buffers_are_written_in_place_and_cut_at_run_time():
    """present = ScatterND(past, ...): a runtime binding present to past makes it an in-place write."""
    for options in ({}, {"static_kv_cache": True}):
        decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half")), fast_paths=True, **options)
        scatters = [
            n for n in all_nodes(decomposed.graph) if n.op_type == "ScatterND" and n.input[0].startswith("past_")
        ]
        assert sorted(n.input[0] for n in scatters) == ["past_key", "past_value"]
        cuts = [
            n
            for n in all_nodes(decomposed.graph)
            if n.op_type == "If" and _softmax_count(n.attribute[0].g) == 1 and _softmax_count(n.attribute[1].g) == 1
        ]
        assert cuts and all(decomposed.graph.node for _ in cuts)
        producers = _producers(decomposed)
        assert all(producers[n.input[0]].op_type == "Greater" for n in cuts)


def test_fast_cache_update_is_one_concat_or_one_scatter_chosen_at_run_time():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(rotary="half")), fast_paths=True)
    (update,) = [
        n
        for n in decomposed.graph.node
        if n.op_type == "If" and [m.op_type for m in n.attribute[0].g.node] == ["Concat", "Concat"]
    ]
    (scatter_choice,) = [n for n in update.attribute[1].g.node if n.op_type == "If"]
    straight, padded = (scatter_choice.attribute[i].g for i in (0, 1))
    # The Reshape restates the past's static dims, which ONNX's inference loses through the Pad (a view on ORT).
    padded_ops = [n.op_type for n in padded.node if n.op_type != "Constant"]
    assert padded_ops == ["Pad", "Reshape", "ScatterND", "Pad", "Reshape", "ScatterND"]
    # A buffer that fits: into past in a decode step, into zeros in a first prompt (ORT copies no past row).
    (first_prompt_choice,) = straight.node
    into_zeros, into_past = (first_prompt_choice.attribute[i].g for i in (0, 1))
    assert [n.op_type for n in into_past.node] == ["ScatterND", "ScatterND"]
    assert sorted(n.op_type for n in into_zeros.node if n.op_type not in ("Shape", "Constant")) == [
        "Expand",
        "Expand",
        "ScatterND",
        "ScatterND",
    ]


@pytest.mark.parametrize("kv_cache", ["any", "static"])
def test_fp16_cache_is_cast_to_fp32_after_the_cut(kv_cache):
    """A max-length fp16 buffer is cut to the rows read before its cast: casting it whole costs a copy of it."""
    options = {"static": {"static_kv_cache": True}}.get(kv_cache, {})
    decomposed = gqa_decompose.decompose(
        make_gqa_model(GqaConfig(dtype="float16", rotary="half")), fast_paths=True, **options
    )
    producers = _producers(decomposed)
    cache = {"past_key", "past_value", "present_key", "present_value"}
    cache |= {n.output[0] for n in all_nodes(decomposed.graph) if n.op_type == "If" and set(n.output) & cache}
    assert not [n.name for n in decomposed.graph.node if n.op_type == "Cast" and n.input[0] in cache]
    (cut,) = [
        n for n in all_nodes(decomposed.graph) if n.op_type == "If" and producers[n.input[0]].op_type == "Greater"
    ]
    casts = [n for n in cut.attribute[0].g.node if n.op_type == "Cast"]
    assert len(casts) == 2 and all(producers[c.input[0]].op_type == "Slice" for c in casts)


def test_row_block_bounds_are_built_once_per_model_and_chosen_once_per_layer():
    original = onnx.load(TINY_LLAMA)
    layers = sum(node.op_type == "GroupQueryAttention" for node in original.graph.node)
    decomposed = gqa_decompose.decompose(original, fast_paths=True)
    assert len(_row_block_ifs(decomposed)) == layers > 1
    # One condition and one bounds vector per tier for the whole model.
    tier_conditions = [n for n in decomposed.graph.node if n.op_type == "GreaterOrEqual"]
    assert len(tier_conditions) == len(ROW_BLOCK_TIERS)
    assert sum(n.op_type == "Div" and n.name.startswith("gqa_shared/") for n in decomposed.graph.node) == len(
        ROW_BLOCK_TIERS
    )
