"""The companion-op expansions on other runtimes: onnx.reference and OpenVINO agree with ORT CPU's original node."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gqa_decompose.ops.attention import ATTENTION
from gqa_decompose.ops.gather_block_quantized import GATHER_BLOCK_QUANTIZED
from gqa_decompose.ops.matmul_nbits import MATMUL_NBITS
from gqa_decompose.ops.moe import MOE
from gqa_decompose.ops.multi_head_attention import MULTI_HEAD_ATTENTION
from gqa_decompose.ops.qmoe import QMOE
from gqa_decompose.runtimes import get_runtime
from tests.op_harness import expand_model, random_feeds, run
from tests.test_ops_attention import attention_model
from tests.test_ops_gather_block_quantized import gbq_model
from tests.test_ops_matmul_nbits import nbits_model
from tests.test_ops_moe import moe_model
from tests.test_ops_multi_head_attention import mha_model
from tests.test_ops_qmoe import qmoe_models

CASES = {
    "MatMulNBits int4 (DequantizeLinear-21)": (MATMUL_NBITS, lambda: nbits_model(zero_points="none", K=80)),
    "MatMulNBits int8": (MATMUL_NBITS, lambda: nbits_model(bits=8)),
    "MatMulNBits opset 18 (exact fp32 unpack)": (MATMUL_NBITS, lambda: nbits_model(opset=18)),
    "MatMulNBits opset 13 (fp32 floors)": (MATMUL_NBITS, lambda: nbits_model(opset=13, bits=2)),
    "MatMulNBits g_idx, float zero points": (MATMUL_NBITS, lambda: nbits_model(g_idx=True, zero_points="float")),
    "GatherBlockQuantized uint8": (GATHER_BLOCK_QUANTIZED, lambda: gbq_model()),
    "GatherBlockQuantized int4": (GATHER_BLOCK_QUANTIZED, lambda: gbq_model(data="int4")),
    "MoE swiglu": (MOE, lambda: moe_model()),
    "QMoE 4 bits, block 16, opset 18": (QMOE, lambda: qmoe_models(zero_points=True, opset=18, block_size=16)[0]),
    "QMoE 4 bits (DequantizeLinear-21)": (QMOE, lambda: qmoe_models()[0]),
    "MultiHeadAttention decode with past, causal": (
        MULTI_HEAD_ATTENTION,
        lambda: mha_model(P=5, S=1, L=1, unidirectional=1, padding=True),
    ),
    "MultiHeadAttention fp16, attention bias": (
        MULTI_HEAD_ATTENTION,
        lambda: mha_model(dtype=np.float16, attention_bias=True),
    ),
    "Attention with past, causal, 2-D mask": (ATTENTION, lambda: attention_model(P=4, unidirectional=1, mask=2)),
}


@pytest.mark.parametrize("runtime", ["reference", "openvino"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_expansion_runs_on_other_runtimes(case, runtime):
    decomposer, make = CASES[case]
    model = make()
    rng = np.random.default_rng(0)
    expanded = expand_model(model, decomposer, rng)
    feeds = expanded.sampled_feeds or random_feeds(model, rng)
    expected = run(model, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(get_runtime(runtime).load(expanded.model).run(feeds).values())
    for want, have in zip(expected, got, strict=True):
        tolerance = decomposer.tolerance(expanded.spec, _dtype(want))
        np.testing.assert_allclose(
            np.asarray(have, np.float64),
            want.astype(np.float64),
            atol=tolerance.atol + 1e-5,
            rtol=tolerance.rtol + 1e-5,
        )


def _dtype(array: np.ndarray):
    import onnx_ir as ir

    return ir.DataType.from_numpy(array.dtype)
