"""Quantized KV cache (semantics §13): int8 and int4, per tensor and per channel, against ORT CPU.

The present caches must match ORT's quantized levels exactly (the comparison tolerance is far below one
level), and the attention runs on exactly the dequantized values.
"""

from __future__ import annotations

import dataclasses
import itertools

import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model

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
    config = GqaConfig(kv_quant="PER_TENSOR", kv_bits=4, local_window_size=2, extra_attributes=(("sliding_window_cache", 1),))
    with pytest.raises(GqaDecomposeError, match="head_size % 32"):
        gqa_decompose.decompose(make_gqa_model(config))


def test_quantized_cache_without_past_is_refused():
    with pytest.raises(GqaDecomposeError, match="quantized KV cache needs a past"):
        gqa_decompose.decompose(make_gqa_model(GqaConfig(kv_quant="PER_TENSOR", past=False)))


@pytest.mark.parametrize(
    "attributes,message",
    [
        ((("k_quant_type", "PER_TENSOR"), ("v_quant_type", "PER_CHANNEL"), ("kv_cache_bit_width", 8)), "!= v_quant_type"),
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
