"""The configuration grid of the foundation, each cell against ONNX Runtime CPU.

Every cell builds a one-GQA-node model, decomposes it, and compares both on ORT
CPU over every phase its shapes admit (first prompt with a ragged batch, ragged
decode, chunked prefill; growing cache and static buffer) via
``verify_node_model``, which only looks at elements ORT defines.
"""

from __future__ import annotations

import itertools

import pytest
from gqa_models import GqaConfig, gqa_node, make_gqa_model

from gqa_decompose.spec import DecomposeOptions, parse_gqa_node
from gqa_decompose.verify import NodeVerification, Phase, phases_for, verify_node_model

HEAD_RATIOS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "gqa8": (8, 2)}


def assert_matches_ort(config: GqaConfig, phases=None, options: DecomposeOptions | None = None) -> NodeVerification:
    model = make_gqa_model(config)
    ir_model, node = gqa_node(model)
    result = verify_node_model(node, config.opset, model.ir_version, options, phases=phases)
    assert result.skipped is None, result.skipped
    assert result.results, "no phase ran"
    failures = [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]
    assert not failures, failures
    return result


GRID = list(
    itertools.product(
        ["mha", "gqa", "mqa", "gqa8"],
        [16, 64, 256],
        [False, True],  # packed QKV
        ["off", "half", "interleaved"],
        ["float32", "float16"],
        [False, True],  # static dims
    )
)


# The other runtime profiles (each keeps the whole contract) on a slice of the grid: every layout,
# rotary, type and dims choice, at one head size and two head ratios.
PROFILE_CELLS = [
    (*cell, profile)
    for profile in ("onnxruntime", "openvino")
    for cell in GRID
    if cell[0] in ("gqa", "mqa") and cell[1] == 64
] + [(*cell, "webnn") for cell in GRID if cell[0] == "gqa" and cell[1] == 64]
CELLS = [(*cell, "portable") for cell in GRID] + PROFILE_CELLS


@pytest.mark.parametrize(
    "ratio,head_size,packed,rotary,dtype,static_dims,profile",
    CELLS,
    ids=["-".join(str(p) for p in cell if p != "portable") for cell in CELLS],
)
def test_grid_matches_ort(ratio, head_size, packed, rotary, dtype, static_dims, profile):
    heads, kv_heads = HEAD_RATIOS[ratio]
    config = GqaConfig(
        num_heads=heads,
        kv_num_heads=kv_heads,
        head_size=head_size,
        packed=packed,
        rotary=rotary,
        dtype=dtype,
        static_dims=static_dims,
    )
    assert_matches_ort(config, options=DecomposeOptions(runtime_profile=profile))


@pytest.mark.parametrize("head_size", [32, 128, 512])
@pytest.mark.parametrize("rotary", ["off", "half"])
def test_large_and_odd_head_sizes(head_size, rotary):
    assert_matches_ort(GqaConfig(num_heads=2, kv_num_heads=1, head_size=head_size, rotary=rotary))


@pytest.mark.parametrize("head_size", [24, 40])
def test_head_sizes_multiple_of_8_without_rotary(head_size):
    assert_matches_ort(GqaConfig(head_size=head_size))


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("rotary", ["off", "interleaved"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ragged_batches(batch, rotary, dtype):
    config = GqaConfig(rotary=rotary, dtype=dtype)
    lengths_prompt = tuple([6, 1, 4][:batch])
    lengths_decode = tuple([9, 3, 6][:batch])
    phases = [
        Phase("first prompt, growing cache", batch, 6, 0, 6, lengths_prompt),
        Phase("first prompt, static buffer", batch, 6, 12, 6, lengths_prompt),
        Phase("decode, growing cache", batch, 1, 8, 9, lengths_decode),
        Phase("decode, static buffer", batch, 1, 12, 9, lengths_decode),
    ]
    assert_matches_ort(config, phases)


@pytest.mark.parametrize("packed", [False, True])
def test_no_past(packed):
    config = GqaConfig(past=False, packed=packed, rotary="half")
    model = make_gqa_model(config)
    _, node = gqa_node(model)
    assert [p.name for p in phases_for(node, parse_gqa_node(node))] == ["first prompt"]
    assert_matches_ort(config)


@pytest.mark.parametrize("scale", [0.05, -0.3, 1.0])
def test_scale_attribute(scale):
    assert_matches_ort(GqaConfig(scale=scale, rotary="half"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rotary", ["off", "half"])
def test_present_outputs_omitted(dtype, rotary):
    # The oracle needs present outputs (ORT bug 3); the candidate has none.
    assert_matches_ort(GqaConfig(present=False, dtype=dtype, rotary=rotary))


def test_total_length_one_first_prompt_with_static_buffer():
    # S == T == 1 is a first prompt even with a static buffer.
    config = GqaConfig(rotary="half")
    assert_matches_ort(config, [Phase("first prompt, static buffer", 2, 1, 6, 1, (1, 1))])


def test_decode_past_longer_than_total_lengths():
    # Static buffer where rows' t_b vary widely and T < P.
    config = GqaConfig(rotary="interleaved")
    assert_matches_ort(config, [Phase("decode, static buffer", 3, 1, 20, 11, (11, 1, 7))])


def test_chunked_prefill_static_buffer_long():
    config = GqaConfig(rotary="half", packed=True)
    assert_matches_ort(config, [Phase("chunked prefill, static buffer", 1, 4, 30, 17, (17,))])


KEY_LENGTH_GRID = list(
    itertools.product(
        ["gqa", "mqa"],
        [16, 64],
        ["off", "half", "interleaved"],
        ["float32", "float16"],
        [True, False],  # present read
    )
)


def _key_length_model(config: GqaConfig, dim: str | None):
    """The grid model with key/value's sequence dim named unlike the query's, or unknown (None)."""
    model = make_gqa_model(config)
    for value in model.graph.input:
        if value.name in ("key", "value"):
            entry = value.type.tensor_type.shape.dim[1]
            entry.Clear()
            if dim is not None:
                entry.dim_param = dim
    return model


@pytest.mark.parametrize("dim", ["kv_sequence", None], ids=["symbolic", "unknown"])
@pytest.mark.parametrize(
    "ratio,head_size,rotary,dtype,present",
    KEY_LENGTH_GRID,
    ids=["-".join(str(p) for p in cell) for cell in KEY_LENGTH_GRID],
)
def test_grid_with_key_length_unlike_the_query(ratio, head_size, rotary, dtype, present, dim):
    """ORT decides at run time whether such a key has 0 rows (a KV-shared layer) or S: each cell runs
    both, every phase (verify adds the shared-KV phases of a static buffer)."""
    heads, kv_heads = HEAD_RATIOS[ratio]
    config = GqaConfig(
        num_heads=heads, kv_num_heads=kv_heads, head_size=head_size, rotary=rotary, dtype=dtype, present=present
    )
    model = _key_length_model(config, dim)
    _, node = gqa_node(model)
    spec = parse_gqa_node(node)
    assert spec.kv_maybe_empty
    phases = phases_for(node, spec)
    assert {p.kv_empty for p in phases} == {False, True}
    result = verify_node_model(node, config.opset, model.ir_version)
    failures = [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]
    assert result.results and not failures, failures
