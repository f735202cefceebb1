"""--runtime-profile webnn, without a browser: what the WebNN execution provider receives.

onnxruntime-web hands the WebNN EP the graph after ONNX Runtime's level-1 optimizations, which run after
freeDimensionOverrides fixed the dims: constant folding folds Shape of a static tensor and inlines an If whose
condition became constant. The webnn profile chooses by Ifs on conditions read from shapes only, so with an
empty past (a first prompt) the branch that would read it is gone before partitioning. ORT CPU does the same
folding here (``ORT_ENABLE_BASIC`` with the same overrides); the checks are what the WebNN EP refuses
(onnxruntime-web 1.30): a node with a zero-size input, an If, RMSNormalization, an int64 Div, a GatherND
with batch_dims. tests/test_browser.py runs the fixtures on WebNN itself; exactness against ORT CPU is
tests/test_static_cache.py's and tests/test_grid.py's.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
from gqa_models import make_gqa_model
from portability_cases import CASES

import gqa_decompose
from gqa_decompose import runtimes

# A ragged first prompt, as verify's: batch 2, 5 tokens, no past.
PROMPT_DIMS = {"batch": 2, "sequence": 5, "past_sequence": 0, "T": 5}
# The windowed cache's past is its capacity, never empty; a KV-shared layer's past is the only keys.
PROMPT_CASES = [case for case in CASES if case.group != "windowed cache" and case.name != "kv-empty"]


def _as_webnn_sees_it(model: onnx.ModelProto, dims: dict[str, int], tmp_path) -> onnx.ModelProto:
    """``model`` after ORT's level-1 optimizations with ``dims`` fixed, its shapes inferred."""
    model = runtimes.total_length_from_shape(model, "total_sequence_length")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    for name, size in dims.items():
        options.add_free_dimension_override_by_name(name, size)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.shape_inference.infer_shapes(onnx.load(tmp_path / "optimized.onnx"))


def _refused(model: onnx.ModelProto) -> list[str]:
    """The nodes of ``model`` the WebNN EP would leave to the CPU, for the reasons in the module docstring."""
    graph = model.graph
    values = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    values.update(
        {t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type for t in graph.initializer}
    )

    def zero_size(name: str) -> bool:
        dims = values[name].shape.dim if name in values else ()
        return any(d.HasField("dim_value") and d.dim_value == 0 for d in dims)

    refused = []
    for node in graph.node:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if any(name and zero_size(name) for name in node.input):
            refused.append(f"{node.op_type} {node.name}: zero-size input")
        elif node.op_type in ("If", "RMSNormalization"):
            refused.append(f"{node.op_type} {node.name}")
        elif node.op_type == "GatherND" and attributes.get("batch_dims", 0):
            refused.append(f"GatherND {node.name}: batch_dims")
        elif (
            node.op_type == "Div"
            and values.get(node.input[0])
            and values[node.input[0]].elem_type == onnx.TensorProto.INT64
        ):
            refused.append(f"Div {node.name}: int64")
    return refused


@pytest.mark.parametrize("case", PROMPT_CASES, ids=[case.id for case in PROMPT_CASES])
def test_an_empty_past_prompt_leaves_nothing_webnn_refuses(case, tmp_path):
    options = dict(case.options)
    model = gqa_decompose.decompose(make_gqa_model(case.config), runtime_profile="webnn", **options)
    dims = {**PROMPT_DIMS, "past_sequence": 8} if options.get("static_kv_cache") else PROMPT_DIMS  # a buffer
    assert _refused(_as_webnn_sees_it(model, dims, tmp_path)) == []


def test_the_portable_default_reads_the_empty_past(tmp_path):
    """What the check catches: the portable default pads the 0-row past (and a decode step folds alike)."""
    model = make_gqa_model(CASES[0].config)
    refused = _refused(_as_webnn_sees_it(gqa_decompose.decompose(model), PROMPT_DIMS, tmp_path))
    assert [entry.split(" ")[0] for entry in refused] == ["Pad", "Pad"], refused
    decode = {**PROMPT_DIMS, "sequence": 1, "past_sequence": 6, "T": 7}
    assert _refused(_as_webnn_sees_it(gqa_decompose.decompose(model, runtime_profile="webnn"), decode, tmp_path)) == []


def test_the_windowed_cache_divides_and_gathers_as_webnn_takes(tmp_path):
    case = next(case for case in CASES if case.group == "windowed cache")
    dims = {**PROMPT_DIMS, "past_sequence": 5}
    portable = _refused(_as_webnn_sees_it(gqa_decompose.decompose(make_gqa_model(case.config)), dims, tmp_path))
    assert {entry.split(":")[-1].strip() for entry in portable} == {"int64", "batch_dims"}, portable
    webnn = gqa_decompose.decompose(make_gqa_model(case.config), runtime_profile="webnn")
    assert _refused(_as_webnn_sees_it(webnn, dims, tmp_path)) == []
