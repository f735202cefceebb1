"""Quantized KV cache (semantics §13): int8 and int4, per tensor and per channel, against ORT CPU.

The present caches must match ORT's quantized levels exactly (the comparison tolerance is far below one
level), and the attention runs on exactly the dequantized values.
"""

from __future__ import annotations

import dataclasses
import itertools

import onnx
import pytest
from gqa_models import GqaConfig, gqa_node, make_gqa_model

import gqa_decompose
from gqa_decompose import GqaDecomposeError
from gqa_decompose.verify import verify

LAYOUTS = list(itertools.product([8, 4], ["PER_TENSOR", "PER_CHANNEL"]))

VARIANTS = {
    "plain": GqaConfig(),
    "packed_rotary": GqaConfig(packed=True, rotary="half"),
    "interleaved": GqaConfig(rotary="interleaved"),
    "window_bias": GqaConfig(local_window_size=2, attention_bias="full"),
    "no_present": GqaConfig(present=False),
    "kv_empty": GqaConfig(kv_empty=True),
    # ORT wants head_size % 32 == 0 for a 4-bit windowed cache.
    "windowed_cache": GqaConfig(head_size=32, local_window_size=3, extra_attributes=(("sliding_window_cache", 1),)),
    "static_dims_sink": GqaConfig(static_dims=True, head_sink=True),
}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("bits,layout", LAYOUTS, ids=[f"int{b}-{q.lower()}" for b, q in LAYOUTS])
def test_quantized_cache_matches_ort(bits, layout, variant, dtype):
    """Outputs at the query type's tolerance; the present codes exactly (every phase ORT can run)."""
    config = dataclasses.replace(VARIANTS[variant], kv_quant=layout, kv_bits=bits, dtype=dtype)
    report = verify(make_gqa_model(config))
    results = report.nodes[0].results
    assert report.passed and results, [r.failure for r in results]
    phases = {r.phase.name.split(",")[0] for r in results}
    assert "first prompt" in phases and ("decode" in phases or "chunked prefill" in phases or config.static_dims)
    for result in results:
        for label in ("present_key", "present_value"):
            assert result.max_errors.get(label, 0) == 0, (result.phase.name, label)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_static_kv_cache_matches_ort(bits):
    model = make_gqa_model(GqaConfig(kv_quant="PER_CHANNEL", kv_bits=bits, rotary="half"))
    report = verify(model, static_kv_cache=True)
    assert report.passed, [r.failure for r in report.nodes[0].results]


def test_present_levels_are_exact():
    report = verify(make_gqa_model(GqaConfig(kv_quant="PER_TENSOR", kv_bits=4, rotary="half")))
    assert report.passed
    assert all(r.max_errors["present_key"] == 0 for r in report.nodes[0].results)


def test_int4_windowed_cache_with_head_size_16_is_refused():
    config = GqaConfig(
        kv_quant="PER_TENSOR", kv_bits=4, local_window_size=2, extra_attributes=(("sliding_window_cache", 1),)
    )
    with pytest.raises(GqaDecomposeError, match="head_size % 32"):
        gqa_decompose.decompose(make_gqa_model(config))


def test_quantized_cache_without_past_is_refused():
    with pytest.raises(GqaDecomposeError, match="quantized KV cache needs a past"):
        gqa_decompose.decompose(make_gqa_model(GqaConfig(kv_quant="PER_TENSOR", past=False)))


@pytest.mark.parametrize(
    "attributes,message",
    [
        (
            (("k_quant_type", "PER_TENSOR"), ("v_quant_type", "PER_CHANNEL"), ("kv_cache_bit_width", 8)),
            "!= v_quant_type",
        ),
        ((("k_quant_type", "PER_TENSOR"), ("v_quant_type", "PER_TENSOR"), ("kv_cache_bit_width", 2)), "4 or 8"),
        ((("kv_cache_bit_width", 8),), "must be 0"),
        ((("k_quant_type", "PER_ROW"), ("v_quant_type", "PER_ROW")), "PER_ROW"),
    ],
)
def test_inconsistent_quantization_attributes_are_refused(attributes, message):
    with pytest.raises(GqaDecomposeError, match=message):
        gqa_decompose.decompose(make_gqa_model(GqaConfig(extra_attributes=attributes)))


def test_int4_present_stays_packed_uint8():
    decomposed = gqa_decompose.decompose(make_gqa_model(GqaConfig(kv_quant="PER_TENSOR", kv_bits=4)))
    onnx.checker.check_model(decomposed, full_check=True)
    outputs = {o.name: o.type.tensor_type.elem_type for o in decomposed.graph.output}
    assert outputs["present_key"] == onnx.TensorProto.UINT8


def test_float_past_with_a_quantized_cache_is_refused():
    model = make_gqa_model(GqaConfig(kv_quant="PER_TENSOR"))
    for value in model.graph.input:
        if value.name in ("past_key", "past_value"):
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    with pytest.raises(GqaDecomposeError, match="is not the cache type"):
        gqa_decompose.decompose(model)


def test_only_off_by_one_levels_at_a_few_elements_count_as_rounding_ties():
    import numpy as np

    from gqa_decompose.spec import parse_gqa_node
    from gqa_decompose.verify import Phase, quantization_ties_only

    _, node = gqa_node(make_gqa_model(GqaConfig(kv_quant="PER_TENSOR", kv_bits=8)))
    spec = parse_gqa_node(node)
    phase = Phase("decode", 1, 1, 8, 9, (9,))
    levels = np.random.default_rng(0).integers(-100, 100, (1, 2, 9, 16)).astype(np.int8)
    output = np.zeros((1, 1, 64), np.float32)

    def ties(changed: np.ndarray) -> bool:
        return quantization_ties_only(
            {0: output, 1: levels, 2: levels}, {0: output, 1: changed, 2: levels}, spec, phase
        )

    one_flip, two_steps, many_flips = levels.copy(), levels.copy(), levels.copy()
    one_flip[0, 1, 3, 7] += 1
    two_steps[0, 1, 3, 7] += 2
    many_flips[0, :, :, :4] += 1
    assert ties(one_flip)
    assert not ties(two_steps)
    assert not ties(many_flips)
    assert not ties(levels)  # no flip: a failure elsewhere is a real one


def test_verify_all_passes_on_the_builders_int8_kv_cache_model(tmp_path):
    """onnxruntime-genai's builder with kv_cache_quant_scheme=int8_per_tensor: the model-level comparison of the
    int8 presents covers the rows each sequence defines (rows >= t_b are left undefined by the op, and reported
    "present max error inf" when compared), and the levels there match ORT's exactly."""
    import pathlib
    import re
    import shutil

    from click.testing import CliRunner

    from gqa_decompose.cli import main

    folder = tmp_path / "int8kv"
    shutil.copytree(pathlib.Path(__file__).resolve().parent.parent / "models" / "builder-llama-int8kv", folder)
    result = CliRunner().invoke(main, [str(folder / "model.onnx"), "--verify", "all", "-q", "--steps", "2"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("model verified"))
    assert "batch 2" in line and re.search(r"present max error 0\b", line), line
    assert (folder / "model.decomposed.onnx").exists()
