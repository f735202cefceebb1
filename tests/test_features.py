"""GQA's classic surface beyond the foundation, each feature and combination against ORT CPU.

Local window, softcap, smooth softmax and head sink, attention bias,
position_ids, partial rotary, qk_output, causal=0 and KV-shared layers (empty
key/value), in fp32 and fp16, over every phase each node admits.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from gqa_models import GqaConfig, make_gqa_model
from test_grid import assert_matches_ort

import gqa_decompose
from gqa_decompose.verify import Phase

DTYPES = ["float32", "float16"]

FEATURES = {
    "window0": GqaConfig(local_window_size=0),
    "window1": GqaConfig(local_window_size=1),
    "window2": GqaConfig(local_window_size=2, rotary="half"),
    "window3": GqaConfig(local_window_size=3, packed=True),
    "window_large": GqaConfig(local_window_size=64),
    "softcap": GqaConfig(softcap=2.0),
    "softcap_small": GqaConfig(softcap=0.5, rotary="half"),
    "softcap_negative_ignored": GqaConfig(softcap=-1.0),
    "smooth_softmax": GqaConfig(smooth_softmax=1),
    "smooth_softmax_0": GqaConfig(smooth_softmax=0),
    "head_sink": GqaConfig(head_sink=True),
    "head_sink_overrides_smooth_0": GqaConfig(head_sink=True, smooth_softmax=0),
    "bias_full": GqaConfig(attention_bias="full"),
    "bias_broadcast": GqaConfig(attention_bias="broadcast"),
    "position_ids": GqaConfig(position_ids=True, rotary="half"),
    "position_ids_interleaved": GqaConfig(position_ids=True, rotary="interleaved"),
    "position_ids_no_rotary": GqaConfig(position_ids=True),
    "partial_rotary_half": GqaConfig(head_size=64, rotary="half", rotary_dim=32),
    "partial_rotary_interleaved": GqaConfig(head_size=64, rotary="interleaved", rotary_dim=16),
    "qk_output_1": GqaConfig(qk_output=1),
    "qk_output_2": GqaConfig(qk_output=2),
    "causal_0": GqaConfig(causal=0),
    "causal_1_explicit": GqaConfig(causal=1),
    "kv_empty": GqaConfig(kv_empty=True),
    "kv_empty_no_present": GqaConfig(kv_empty=True, present=False),
    # Combinations.
    "window_softcap_bias": GqaConfig(local_window_size=2, softcap=1.5, attention_bias="full"),
    "window_sink": GqaConfig(local_window_size=2, head_sink=True),
    "rotary_position_ids_window": GqaConfig(rotary="half", position_ids=True, local_window_size=3),
    "causal0_bias": GqaConfig(causal=0, attention_bias="broadcast"),
    "kv_empty_rotary": GqaConfig(kv_empty=True, rotary="half"),
    "kv_empty_window": GqaConfig(kv_empty=True, local_window_size=2),
    "kv_empty_bias": GqaConfig(kv_empty=True, attention_bias="full"),
    "softcap_sink_qk1": GqaConfig(softcap=1.0, head_sink=True, qk_output=1),
    "window_qk2_partial_rotary": GqaConfig(
        head_size=32, rotary="interleaved", rotary_dim=16, local_window_size=2, qk_output=2
    ),
    "bias_no_present": GqaConfig(attention_bias="full", present=False),
    "window_no_present": GqaConfig(local_window_size=2, present=False),
    "mqa_sink_bias_packed": GqaConfig(kv_num_heads=1, head_sink=True, attention_bias="full", packed=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_matches_ort(feature, dtype):
    assert_matches_ort(dataclasses.replace(FEATURES[feature], dtype=dtype))


@pytest.mark.parametrize("feature", ["window2", "bias_full", "kv_empty", "qk_output_1", "causal_0"])
def test_feature_with_static_dims(feature):
    assert_matches_ort(dataclasses.replace(FEATURES[feature], static_dims=True))


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _prompt_feeds(config: GqaConfig, lengths=(5, 3)):
    rng = np.random.default_rng(3)
    batch, seq = len(lengths), 5
    hidden = config.num_heads * config.head_size
    kv_hidden = config.kv_num_heads * config.head_size
    feeds = {
        "query": rng.standard_normal((batch, seq, hidden)).astype(np.float32),
        "key": rng.standard_normal((batch, seq, kv_hidden)).astype(np.float32),
        "value": rng.standard_normal((batch, seq, kv_hidden)).astype(np.float32),
        "past_key": np.zeros((batch, config.kv_num_heads, 0, config.head_size), np.float32),
        "past_value": np.zeros((batch, config.kv_num_heads, 0, config.head_size), np.float32),
        "seqlens_k": np.array(lengths, np.int32) - 1,
        "total_sequence_length": np.array(seq, np.int32),
    }
    return feeds


def test_fully_masked_bias_row_gives_zero_not_nan():
    config = GqaConfig(attention_bias="full")
    model = make_gqa_model(config)
    feeds = _prompt_feeds(config)
    bias = np.zeros((2, 4, 5, 5), np.float32)
    bias[0, 1, 2, :] = -np.inf  # row (b=0, head 1, query 2) sees only -inf
    feeds["attention_bias"] = bias
    expected = _run(model, feeds)[0]
    got = _run(gqa_decompose.decompose(model), feeds)[0]
    assert not np.isnan(got).any()
    assert np.all(got[0, 2, 16:32] == 0)
    np.testing.assert_allclose(got[0, :, :], expected[0, :, :], atol=1e-5)


def test_window_zero_gives_zero_output():
    config = GqaConfig(local_window_size=0)
    model = make_gqa_model(config)
    feeds = _prompt_feeds(config, lengths=(5, 5))
    expected = _run(model, feeds)[0]
    got = _run(gqa_decompose.decompose(model), feeds)[0]
    assert np.all(expected == 0)
    assert np.all(got == 0)


def test_legacy_window_reproduces_w_plus_one_keys():
    # legacy W means W + 1 keys: a legacy window of 2 equals today's window of 3.
    legacy_model = make_gqa_model(GqaConfig(local_window_size=2))
    current_model = make_gqa_model(GqaConfig(local_window_size=3))
    feeds = _prompt_feeds(GqaConfig())
    expected = _run(current_model, feeds)[0]
    legacy = _run(gqa_decompose.decompose(legacy_model, legacy_window=True), feeds)[0]
    plain = _run(gqa_decompose.decompose(legacy_model), feeds)[0]
    np.testing.assert_allclose(legacy[0], expected[0], atol=1e-5)
    assert np.abs(plain[0] - expected[0]).max() > 1e-3


def test_output_qk_columns_beyond_t_b_are_zero():
    config = GqaConfig(qk_output=1)
    model = make_gqa_model(config)
    feeds = _prompt_feeds(config, lengths=(5, 2))
    output_qk = _run(gqa_decompose.decompose(model), feeds)[3]
    assert np.all(output_qk[1, :, :, 2:] == 0)


def test_kv_empty_long_static_past():
    config = GqaConfig(kv_empty=True, rotary="half", local_window_size=3)
    assert_matches_ort(config, [Phase("decode, static buffer", 2, 1, 16, 12, (12, 5))])


def _windowed(window: int, **fields) -> GqaConfig:
    return GqaConfig(local_window_size=window, extra_attributes=(("sliding_window_cache", 1),), **fields)


WINDOWED_CACHE = {
    "window1": _windowed(1),
    "window3_rotary": _windowed(3, rotary="half"),
    "window4_packed_interleaved": _windowed(4, packed=True, rotary="interleaved"),
    "window2_bias": _windowed(2, attention_bias="full"),
    "window2_bias_broadcast": _windowed(2, attention_bias="broadcast"),
    "window3_softcap_sink": _windowed(3, softcap=1.5, head_sink=True),
    "window2_position_ids": _windowed(2, rotary="half", position_ids=True),
    "window3_no_present": _windowed(3, present=False),
    "window3_static_capacity_8": _windowed(3, static_dims=True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", list(WINDOWED_CACHE))
def test_windowed_cache_matches_ort(feature, dtype):
    """sliding_window_cache=1 (semantics §12): the cache keeps the latest tokens; lengths beyond capacity."""
    config = dataclasses.replace(WINDOWED_CACHE[feature], dtype=dtype)
    assert_matches_ort(config)


@pytest.mark.parametrize("capacity,window", [(4, 4), (6, 2), (9, 3)])
def test_windowed_cache_capacities(capacity, window):
    # Gap G' = C - W + 1 decides how many tokens drop at a time.
    phases = [
        Phase("decode, windowed cache", 3, 1, capacity, capacity + 7, (capacity + 7, capacity + 2, 3)),
        Phase("chunked prefill, windowed cache", 1, capacity + 3, capacity, 2 * capacity + 5, (2 * capacity + 5,)),
    ]
    assert_matches_ort(_windowed(window, rotary="half"), phases)


# Causal row blocks (long prompts) with the minimum lowered so small prompts take that path ------

ROW_BLOCK_FEATURES = [
    "window2",
    "window3",
    "softcap",
    "smooth_softmax",
    "head_sink",
    "bias_full",
    "bias_broadcast",
    "position_ids",
    "partial_rotary_half",
    "kv_empty",
    "kv_empty_bias",
    "window_softcap_bias",
    "window_sink",
]


def _prompt_phases(past_rows: int) -> list[Phase]:
    """First prompts, chunks of a growing cache and of a static buffer, S from 4 to 9."""
    return [
        Phase("first prompt, growing cache", 2, 6, 0, 6, (6, 4)),
        Phase("first prompt, static buffer", 2, 9, past_rows, 9, (9, 5)),
        Phase("chunked prefill, growing cache", 1, 5, 4, 9, (9,)),
        Phase("chunked prefill, static buffer", 1, 7, past_rows, 11, (11,)),
        Phase("chunked prefill of a short buffer", 1, 4, past_rows, 5, (5,)),
    ]


@pytest.fixture(params=[((4, 4),), ((8, 3), (4, 2))], ids=["4 blocks", "3 or 2 blocks"])
def small_row_blocks(request, monkeypatch):
    from gqa_decompose.expansion import mask

    monkeypatch.setattr(mask, "ROW_BLOCK_TIERS", request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", ROW_BLOCK_FEATURES)
def test_causal_row_blocks_match_ort(small_row_blocks, feature, dtype):
    from gqa_models import gqa_node

    from gqa_decompose.spec import DecomposeOptions
    from gqa_decompose.verify import verify_node_model

    config = dataclasses.replace(FEATURES[feature], dtype=dtype)
    phases = _prompt_phases(16)
    if config.kv_empty:
        phases = [p for p in phases if "static" in p.name]
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    result = verify_node_model(node, 21, model.ir_version, DecomposeOptions(fast_paths=True), phases=phases)
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]


@pytest.mark.parametrize("options", [{}, {"static_kv_cache": True}, {"growing_kv_cache": True}])
def test_causal_row_blocks_in_every_cache_form(small_row_blocks, options):
    options = {**options, "fast_paths": True}
    from gqa_models import gqa_node

    from gqa_decompose.spec import DecomposeOptions
    from gqa_decompose.verify import verify_node_model

    model = make_gqa_model(GqaConfig(packed=True, rotary="half", num_heads=8, kv_num_heads=2))
    _, node = gqa_node(model)
    phases = [
        p
        for p in _prompt_phases(40)
        if not (options.get("static_kv_cache") and p.past_length in (0, 4))
        and not (
            options.get("growing_kv_cache")
            and (p.past_length == 40 or p.batch > 1 and p.total_lengths[1] != p.total_length)
        )
    ]
    result = verify_node_model(node, 21, model.ir_version, DecomposeOptions(**options), phases=phases)
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]


@pytest.mark.parametrize("fast_paths", [False, True], ids=["default", "fast paths"])
@pytest.mark.parametrize("query_length", [3, 4, 9])
def test_static_query_length_picks_its_row_blocks_without_an_if(small_row_blocks, query_length, fast_paths):
    """S known in the graph: with --fast-paths the tier it reaches is chosen at rewrite time,
    straight-line; the default graph has no row blocks (tract cannot run them)."""
    from gqa_models import all_nodes, gqa_node

    from gqa_decompose.expansion import mask
    from gqa_decompose.spec import DecomposeOptions
    from gqa_decompose.verify import verify_node_model

    config = GqaConfig(packed=True, rotary="half", num_heads=8, kv_num_heads=2, sizes=(None, query_length, None, None))
    model = make_gqa_model(config)
    decomposed = gqa_decompose.decompose(model, fast_paths=fast_paths)
    reached = [count for lowest, count in mask.ROW_BLOCK_TIERS if query_length >= max(lowest, count)]
    ifs = [  # run-time choices of how attention runs (not of how the cache is written)
        n
        for n in all_nodes(decomposed.graph)
        if n.op_type == "If" and any(m.op_type == "Softmax" for branch in n.attribute for m in all_nodes(branch.g))
    ]
    top_level_softmaxes = [n for n in decomposed.graph.node if n.op_type == "Softmax"]
    if not fast_paths:
        assert not ifs and len(top_level_softmaxes) == 1
    elif reached:
        # The reached tier's blocks, straight-line.
        assert not ifs and len(top_level_softmaxes) == reached[0]
    else:
        assert ifs and not top_level_softmaxes  # only the cut of a long buffer is chosen at run time
    _, node = gqa_node(model)
    result = verify_node_model(node, 21, model.ir_version, DecomposeOptions(fast_paths=fast_paths))
    names = [r.phase.name for r in result.results]
    assert result.results and all(r.passed for r in result.results), [r.failure for r in result.results]
    assert any("prompt" in name for name in names), names
