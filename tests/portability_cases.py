"""What "portable" means, case by case: shared by tests/test_portability.py and
scripts/portability_table.py.

A case is a one-GQA-node model (a GqaConfig) with decompose options, in a
feature group; it passes on a runtime when ``verify_node_model`` finds the
expansion, run on that runtime, equal to ORT CPU's fused node over every phase
the node admits (first prompt with a ragged batch, ragged decode, chunked
prefill; growing cache and static buffer). The whole-model case runs
``models/tiny-llama-gqa.onnx`` (standard ops besides GQA) through a ragged
prompt and decode steps, feeding presents back, on ORT (fused) and on the
runtime (rewritten).

tract types a model from its input shapes, so on tract the one-node models read
``total_sequence_length`` from an input's shape, as real producers feed it
(``Runtime.shapes_from_input_shapes``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import onnx
from gqa_models import GqaConfig, gqa_node, make_gqa_model

import gqa_decompose
from gqa_decompose import runtimes
from gqa_decompose.spec import DecomposeOptions
from gqa_decompose.verify import NodeVerification, verify_node_model

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"
TINY_LLAMA = MODELS / "tiny-llama-gqa.onnx"

# Runtimes other than ORT that the rewritten models must run on.
PORTABLE_RUNTIMES = ("reference", "openvino", "tract")


@dataclasses.dataclass(frozen=True)
class Case:
    group: str
    name: str
    config: GqaConfig
    options: tuple[tuple[str, object], ...] = ()
    slow: bool = False  # left out for the reference evaluator (pure Python)

    @property
    def id(self) -> str:
        return f"{self.group}/{self.name}"


def _case(group: str, name: str, slow: bool = False, options: dict | None = None, **config) -> Case:
    return Case(group, name, GqaConfig(**config), tuple(sorted((options or {}).items())), slow)


_SLIDING = (("sliding_window_cache", 1),)

CASES: tuple[Case, ...] = (
    _case("heads & layout", "mha-separate", num_heads=4, kv_num_heads=4),
    _case("heads & layout", "gqa-packed", num_heads=4, kv_num_heads=2, packed=True),
    _case("heads & layout", "mqa-separate", num_heads=4, kv_num_heads=1),
    _case("heads & layout", "gqa8-packed-h64", slow=True, num_heads=8, kv_num_heads=2, head_size=64, packed=True),
    _case("heads & layout", "static-dims", static_dims=True, rotary="half"),
    _case("rotary", "half", rotary="half"),
    _case("rotary", "interleaved-packed", rotary="interleaved", packed=True),
    _case("rotary", "partial", head_size=32, rotary="half", rotary_dim=16),
    _case("rotary", "position-ids", rotary="interleaved", position_ids=True),
    _case("window/softcap/scale", "window", local_window_size=2),
    _case("window/softcap/scale", "softcap-scale", softcap=1.5, scale=0.3),
    _case("window/softcap/scale", "window-softcap-rotary", slow=True, local_window_size=3, softcap=2.0, rotary="half"),
    _case("sink/smooth softmax", "head-sink", head_sink=True),
    _case("sink/smooth softmax", "smooth-softmax", smooth_softmax=1),
    _case("attention bias", "full", attention_bias="full"),
    _case("attention bias", "broadcast-window", attention_bias="broadcast", local_window_size=3),
    _case("causal=0, no past", "causal0", causal=0),
    _case("causal=0, no past", "no-past-packed", past=False, packed=True, rotary="half"),
    _case("causal=0, no past", "kv-empty", kv_empty=True),
    _case("qk output", "qk1", qk_output=1),
    _case("qk output", "qk2-sink", qk_output=2, head_sink=True),
    _case("float16", "rotary", dtype="float16", rotary="half"),
    _case("float16", "packed-window-bias", dtype="float16", packed=True, local_window_size=2, attention_bias="full"),
    _case("float16", "native-precision", dtype="float16", rotary="interleaved", options={"native_precision": True}),
    _case("cache promises", "kv-cache-static", rotary="half", options={"static_kv_cache": True}),
    _case("cache promises", "kv-cache-growing", rotary="half", options={"growing_kv_cache": True}),
    _case("windowed cache", "sliding-window-cache", local_window_size=3, extra_attributes=_SLIDING),
    _case("quantized cache", "int8-per-channel", kv_quant="PER_CHANNEL", kv_bits=8, rotary="half"),
    _case("quantized cache", "int4-per-tensor", slow=True, kv_quant="PER_TENSOR", kv_bits=4),
    _case("q/k norm", "opset-23-rmsnorm", qk_norm="qk", rotary="half", opset=23),
    _case("q/k norm", "opset-21-primitives", qk_norm="qk", packed=True, rotary="interleaved"),
)


# What a runtime gets wrong, by (runtime, case id): the tests expect these to fail
# (strictly: a runtime that learns them fails the test, so the README gets updated).
_TRACT_DYNAMIC_SLICE = (
    "tract 0.23.9 cannot run a Slice whose end is computed from data (max_b t_b, the rows "
    "a static buffer's attention reads): 'Symbol points to an invalid (dead ?) SymbolScope'"
)
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("tract", "cache promises/kv-cache-static"): _TRACT_DYNAMIC_SLICE,
    ("tract", "causal=0, no past/kv-empty"): _TRACT_DYNAMIC_SLICE,
    ("tract", "cache promises/kv-cache-growing"): (
        "tract 0.23.9 refuses a Reshape whose shape is computed from data (the run-time guard "
        "of --kv-cache growing): 'shape input is variable'"
    ),
}


# The Attention target (--target attention) elsewhere than ORT and onnx.reference: the cases
# each runtime runs today; every other case is expected to fail there (strictly, as above).
ATTENTION_TARGET_PASSES: dict[str, frozenset[str]] = {
    # Every case since the rewrite restates static dims after its Pads (OpBuilder.with_static_dims): OpenVINO's
    # fused SDPA needed them (2026.4.1 failed 23 of 31 without, in its shape inference or a MatMul over N query
    # heads against Nkv KV heads).
    "openvino": frozenset(case.id for case in CASES),
    "tract": frozenset(
        {
            "sink/smooth softmax/head-sink",
            "sink/smooth softmax/smooth-softmax",
            "attention bias/full",
            "attention bias/broadcast-window",
            "causal=0, no past/no-past-packed",
            "float16/packed-window-bias",
        }
    ),
}
ATTENTION_TARGET_FAILURES = {
    "tract": (
        "tract 0.23.9: its FlashSDPA refuses a bool mask, it has no softcap or qk_matmul_output_mode, "
        "and RotaryEmbedding with gathered cos/sin fails typing"
    ),
}


PRIMITIVES = "primitives"  # the default target
FUSED = "none (fused GQA)"  # no rewrite: does the runtime run GroupQueryAttention itself?


def targets() -> list[str]:
    """Decomposition targets: the primitive one, and "attention" once DecomposeOptions
    has a ``target`` field."""
    fields = {f.name for f in dataclasses.fields(DecomposeOptions)}
    return [PRIMITIVES, "attention"] if "target" in fields else [PRIMITIVES]


def case_options(case: Case, target: str = PRIMITIVES, profile: str = "portable") -> DecomposeOptions:
    options = dict(case.options)
    if profile != "portable":
        options.update(runtime_profile=profile)
    if target not in (PRIMITIVES, FUSED):
        # The cases (and the tiny Llama) are at opset 21; the Attention op needs 23.
        options.update(target=target, raise_opset=True, strict_target=True)
    return DecomposeOptions(**options)


def run_case(case: Case, runtime: str, target: str = PRIMITIVES, profile: str = "portable") -> NodeVerification:
    """``case``'s expansion (or with FUSED the node itself) on ``runtime`` against ORT CPU's fused node,
    with the forms of runtime ``profile``."""
    model = make_gqa_model(case.config)
    _, node = gqa_node(model)
    opset = case.config.opset
    if target not in (PRIMITIVES, FUSED):
        opset = max(opset, 23)  # what raise_opset gives the one-node model
    return verify_node_model(
        node,
        opset,
        model.ir_version,
        case_options(case, target, profile),
        runtime=runtime,
        total_length_from_shape=runtimes.get_runtime(runtime).shapes_from_input_shapes,
        fused_on_runtime=target == FUSED,
    )


def failures(result: NodeVerification) -> list[str]:
    if result.skipped:
        return [f"skipped: {result.skipped}"]
    if result.refused:
        return [f"refused: {result.refused}"]
    return [f"{r.phase.name}: {r.failure}" for r in result.results if not r.passed]


# Whole model --------------------------------------------------------------------------------


def _past_names(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name.startswith("past_key_values")]


def generate(session: runtimes.Session, model: onnx.ModelProto, steps: int, static_length: int | None, seed: int = 0):
    """A ragged prompt (one right-padded row) then ``steps`` decode steps, presents fed back.

    With ``static_length`` the cache is a max-length buffer fed back whole
    (past_present_share_buffer), otherwise it grows by one row per step.
    Returns [(feeds, outputs)] per step.
    """
    rng = np.random.default_rng(seed)
    batch, prompt = 2, 6
    prompt_mask = np.array([[1] * prompt, [1] * (prompt - 2) + [0, 0]], np.int64)
    past_names = _past_names(model)
    past_rows = static_length or 0
    feeds = {
        "input_ids": rng.integers(0, 64, (batch, prompt)).astype(np.int64),
        "attention_mask": prompt_mask,
        **{name: np.zeros((batch, 2, past_rows, 16), np.float32) for name in past_names},
    }
    lengths = prompt_mask.sum(axis=1)
    mask = np.zeros((batch, static_length), np.int64) if static_length else prompt_mask
    if static_length:
        mask[:, :prompt] = prompt_mask
    history = []
    for _ in range(steps + 1):
        outputs = session.run(feeds)
        history.append((feeds, outputs))
        presents = {name: outputs[name.replace("past_key_values", "present")] for name in past_names}
        if static_length:
            for name, value in presents.items():  # a first prompt's present has T rows
                padded = np.zeros((batch, 2, static_length, 16), np.float32)
                padded[:, :, : value.shape[2]] = value
                presents[name] = padded
            mask[np.arange(batch), lengths] = 1
            lengths = lengths + 1
            step_mask = mask[:, : int(lengths.max())].copy()
        else:
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            lengths = mask.sum(axis=1)
            step_mask = mask
        feeds = {"input_ids": rng.integers(0, 64, (batch, 1)).astype(np.int64), "attention_mask": step_mask, **presents}
    return history


def compare_generations(expected, got) -> float:
    """Max abs difference over the elements ORT defines (valid logits rows, present rows < t_b)."""
    worst = 0.0
    for step, ((feeds, want), (_, have)) in enumerate(zip(expected, got)):
        lengths = feeds["attention_mask"].sum(axis=1)
        query_length = feeds["input_ids"].shape[1]
        for b, length in enumerate(lengths):
            rows = min(length, query_length) if step == 0 else query_length
            worst = max(worst, float(np.abs(want["logits"][b, :rows] - have["logits"][b, :rows]).max()))
            for name in want:
                if name.startswith("present"):
                    difference = want[name][b, :, :length] - have[name][b, :, :length]
                    worst = max(worst, float(np.abs(difference).max()))
    return worst


def run_whole_model(
    runtime: str, cache: str, target: str = PRIMITIVES, steps: int = 3, profile: str = "portable"
) -> float:
    """Max error of the rewritten tiny Llama (forms of runtime ``profile``) on ``runtime`` against the fused
    one on ORT."""
    original = onnx.load(TINY_LLAMA)
    if target == FUSED:
        decomposed = original
    else:
        options = case_options(Case("", "", GqaConfig()), target, profile)
        decomposed = gqa_decompose.decompose(original, options=options)
    static_length = 16 if cache == "static" else None
    expected = generate(runtimes.get_runtime("onnxruntime").load(original), original, steps, static_length)
    got = generate(runtimes.get_runtime(runtime).load(decomposed), decomposed, steps, static_length)
    return compare_generations(expected, got)
