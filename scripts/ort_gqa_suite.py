"""ONNX Runtime's own GroupQueryAttention test grid through ``gqa_decompose.decompose()``.

ORT tests its CPU kernel in ``onnxruntime/test/python/transformers/test_gqa_cpu.py`` (``TestGQA``): one-node graphs
built with ``onnx.helper``, run with IO binding, compared with a torch reference. That file is not shipped in the
onnxruntime wheel, needs torch, einops and ORT's ``bert_padding`` helper, and is not ours to vendor; this script
re-implements its graph builders and its case sampling compactly with numpy instead:

* the grid of ``pipeline_mode = True`` (what ORT's CI runs): ``test_gqa_no_past`` (prompt; batch 3, (S, Skv) in
  (127, 127), (240, 240), 32/8 heads, head size 128), ``test_gqa_past`` (token generation; batch 1, (1, 128),
  9/3 heads, head size 64) and ``test_gqa_interactive_one_batch`` (a 256-token chunk on a 2048-row buffer, 32/8
  heads, head size 32), each crossed with local window (a random left window in [1, Skv]), rotary (off,
  half, interleaved), packed QKV, softcap 0/50, smooth softmax and custom tree attention (position_ids and an
  additive ``attention_bias``); every grid point runs as the test does, once with a shared KV buffer ("buffer")
  and once without ("no buffer"): 624 cases;
* the graphs as ``create_group_query_attention_graph_prompt`` / ``_past`` write them: static dims, BNSH caches,
  past/present declared with the buffer's rows, and in the prompt graph ``present_key`` / ``present_value``
  declared twice (first with the buffer's rows, then with ``kv_sequence_length``), no ``com.microsoft`` opset
  import. Only the IR version and the default-domain opset are lowered (to 10 / 21): ``onnx.helper.make_model``
  of onnx 1.23 writes 14 / 28, newer than ORT 1.31 reads, so ORT's file fails to load its own graphs there;
* the feeds as ``gqa_prompt_func`` / ``gqa_past_func`` bind them: with a shared buffer, present is bound to the
  past's OrtValue (in place); the lengths (``seqlens_k``, ``total_sequence_length``) and tree-attention inputs
  as the parity checks derive them. Inputs are standard normal (numpy, seeded), not torch's stream.

Each case runs the fused graph and ``decompose()``'s rewrite (default options) on ORT CPU with the same binding and
compares output and presents elementwise (ORT's tolerance: rtol = atol = 1e-3). Outcomes:

* ``passed``; ``mismatch`` (max errors by output); ``refused`` (GqaDecomposeError); ``decompose error`` (any other
  exception); ``load error`` / ``run error`` (ORT rejects the rewrite); ``ORT rejects`` (the fused graph itself
  fails: not counted against the rewrite).

    python scripts/ort_gqa_suite.py                  # the whole grid; failure classes on stdout
    python scripts/ort_gqa_suite.py --sample 20      # every 31st case or so: 20 cases spread over the grid
    python scripts/ort_gqa_suite.py --json out.json  # every case's outcome
    python scripts/ort_gqa_suite.py --adapted-tree   # the 156 tree-attention cases ORT 1.31 rejects, adapted
    python scripts/ort_gqa_suite.py --filter "no_past buffer" --restore-declarations  # without the present defect

ORT 1.31 rejects the grid's tree-attention cases with a shared buffer itself (position_ids [1, 1] for a batch of 3
in a prompt; an attention_bias max(seqlens_k) + 1 wide where total_sequence_length is the buffer's length in a
step). ``--adapted-tree`` runs them with position_ids [B, S] and total_sequence_length = max(seqlens_k) + 1.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gqa_decompose  # noqa: E402

RTOL = ATOL = 1e-3  # the test file's, for float32
IR_VERSION, OPSET = 10, 21


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity check of ORT's grid. ``kv_length``: Skv of a prompt, the past rows of a decode step."""

    test: str  # no_past | past | interactive
    buffer: bool  # share_buffer: present bound to the past buffer
    batch: int
    sequence: int
    kv_length: int
    num_heads: int
    kv_num_heads: int
    head_size: int
    local: bool
    rotary: bool
    interleaved: bool
    packed: bool
    softcap: float
    smooth_softmax: bool
    tree: bool  # do_custom_tree_attention (buffer cases only: the no-buffer checks do not pass it on)
    index: int = 0
    # A tree case changed so that ORT 1.31 runs it (--adapted-tree): position_ids [B, S] (0..S-1) in a prompt,
    # total_sequence_length = max(seqlens_k) + 1 (the bias's width) in a decode step or chunk.
    adapted: bool = False

    @property
    def prompt(self) -> bool:
        return self.test == "no_past"

    @property
    def name(self) -> str:
        flags = [k for k in ("local", "rotary", "interleaved", "packed", "smooth_softmax", "tree") if getattr(self, k)]
        if self.softcap:
            flags.append(f"softcap{self.softcap:g}")
        kind = ("buffer" if self.buffer else "no-buffer") + (" adapted" if self.adapted else "")
        return (
            f"{self.index:03d} {self.test} {kind} B{self.batch} S{self.sequence} Skv{self.kv_length} "
            f"N{self.num_heads}/{self.kv_num_heads} H{self.head_size} {'+'.join(flags) or 'plain'}"
        )


def grid() -> list[Case]:
    """The cases of TestGQA with pipeline_mode = True, in its loop order (buffer check, then no-buffer check)."""
    rotaries = [(False, False), (True, False), (True, True)]
    cases = []

    def add(test, shape, heads, head_size, local, rotary, packed, softcap, smooth, tree):
        batch, sequence, kv_length = shape
        for buffer in (True, False):
            cases.append(
                Case(
                    test,
                    buffer,
                    batch,
                    sequence,
                    kv_length,
                    *heads,
                    head_size,
                    local,
                    *rotary,
                    packed,
                    softcap,
                    smooth,
                    tree and buffer,
                    len(cases),
                )
            )

    for sq, skv in [(127, 127), (240, 240)]:
        for local in (False, True):
            for rotary in rotaries:
                for packed in (False, True):
                    for softcap in (0.0, 50.0):
                        for smooth in (False, True):
                            for tree in (False, True):
                                add("no_past", (3, sq, skv), (32, 8), 128, local, rotary, packed, softcap, smooth, tree)
    for local in (False, True):
        for rotary in rotaries:
            for packed in (False, True):
                for softcap in (0.0, 50.0):
                    for smooth in (False, True):
                        for tree in (False, True):
                            add("past", (1, 1, 128), (9, 3), 64, local, rotary, packed, softcap, smooth, tree)
    for local in (False, True):
        for rotary in rotaries:
            for packed in (False, True):
                for tree in (False, True):
                    add("interactive", (1, 256, 2048), (32, 8), 32, local, rotary, packed, 0.0, False, tree)
    return cases


def adapted_tree_grid() -> list[Case]:
    """The grid's tree-attention cases, adapted so that ORT 1.31 runs them (numbered after the grid)."""
    cases = grid()
    return [
        dataclasses.replace(c, adapted=True, index=len(cases) + i) for i, c in enumerate(c for c in cases if c.tree)
    ]


# Graphs ---------------------------------------------------------------------------------------------------------


def _rows(case: Case) -> tuple[int, int, int]:
    """(past rows, present rows, cos/sin rows) as the test's graph builders declare them."""
    if case.prompt:
        buffer_rows = case.sequence + case.kv_length + 8  # PromptConfig's buffer_sequence_length
        past = buffer_rows if case.buffer else 0
        present = buffer_rows if case.buffer else case.kv_length
        return past, present, buffer_rows if case.buffer else case.kv_length
    present = case.kv_length if case.buffer else case.kv_length + case.sequence
    return case.kv_length, present, case.kv_length + (0 if case.buffer else case.sequence)


def build_graph(case: Case, window: int, max_seqlen: int) -> onnx.ModelProto:
    """The one-node graph of create_group_query_attention_graph_prompt / _past for ``case``."""
    b, s, n, nkv, h = case.batch, case.sequence, case.num_heads, case.kv_num_heads, case.head_size
    kv_new = case.kv_length if case.prompt else s
    past_rows, present_rows, cos_rows = _rows(case)
    has_past = case.buffer or not case.prompt
    node = helper.make_node(
        "GroupQueryAttention",
        [
            "query",
            "" if case.packed else "key",
            "" if case.packed else "value",
            "past_key" if has_past else "",
            "past_value" if has_past else "",
            "seqlens_k",
            "total_sequence_length",
            "cos_cache" if case.rotary else "",
            "sin_cache" if case.rotary else "",
            "pos_ids" if case.tree else "",
            "attention_mask" if case.tree else "",
        ],
        ["output", "present_key", "present_value"],
        "GroupQueryAttention_0",
        num_heads=n,
        kv_num_heads=nkv,
        local_window_size=window,
        do_rotary=int(case.rotary),
        rotary_interleaved=int(case.interleaved),
        softcap=case.softcap,
        smooth_softmax=int(case.smooth_softmax),
        domain="com.microsoft",
    )
    width = (n + 2 * nkv) * h if case.packed else n * h
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("query", f32, [b, s, width]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [b]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [1]),
    ]
    if not case.packed:
        inputs += [helper.make_tensor_value_info(name, f32, [b, kv_new, nkv * h]) for name in ("key", "value")]
    if has_past:
        inputs += [
            helper.make_tensor_value_info(name, f32, [b, nkv, past_rows, h]) for name in ("past_key", "past_value")
        ]
    if case.rotary:
        half = (math.floor(h / 16) * 16) // 2
        inputs += [helper.make_tensor_value_info(name, f32, [cos_rows, half]) for name in ("cos_cache", "sin_cache")]
    if case.tree:
        if case.prompt:
            positions = [b, s] if case.adapted else [1, 1]
            inputs += [
                helper.make_tensor_value_info("pos_ids", TensorProto.INT64, positions),
                helper.make_tensor_value_info("attention_mask", f32, [b, 1, kv_new, kv_new]),
            ]
        else:
            inputs += [
                helper.make_tensor_value_info("pos_ids", TensorProto.INT64, [b, s]),
                helper.make_tensor_value_info("attention_mask", f32, [b, 1, s, max_seqlen]),
            ]
    outputs = [helper.make_tensor_value_info("output", f32, [b, s, n * h])]
    outputs += [
        helper.make_tensor_value_info(name, f32, [b, nkv, present_rows, h]) for name in ("present_key", "present_value")
    ]
    if case.prompt:  # the prompt graph declares present twice; the second with kv_sequence_length rows
        outputs += [
            helper.make_tensor_value_info(name, f32, [b, nkv, case.kv_length, h])
            for name in ("present_key", "present_value")
        ]
    graph = helper.make_graph([node], "GroupQueryAttention_Graph", inputs, outputs)
    return helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])


# Feeds ----------------------------------------------------------------------------------------------------------


def make_feeds(case: Case, rng: np.random.Generator, pyrandom: random.Random):
    """The feeds of one parity check, the local window and max(seqlens_k) + 1 (the tree mask's width)."""
    b, s, n, nkv, h = case.batch, case.sequence, case.num_heads, case.kv_num_heads, case.head_size
    past_rows, _, cos_rows = _rows(case)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    kv_new = case.kv_length if case.prompt else s
    q, k_new, v_new = normal(b, s, n * h), normal(b, kv_new, nkv * h), normal(b, kv_new, nkv * h)
    feeds = {}
    if case.packed:
        feeds["query"] = np.concatenate([q, k_new, v_new], axis=2)
    else:
        feeds.update(query=q, key=k_new, value=v_new)
    window = pyrandom.randint(1, case.kv_length) if case.local else -1
    if case.buffer or not case.prompt:
        feeds["past_key"], feeds["past_value"] = normal(b, nkv, past_rows, h), normal(b, nkv, past_rows, h)
    if case.prompt:
        seqlens = np.full(b, case.kv_length - 1, np.int32)
        total = s
    else:
        high = case.kv_length - s + 1 if case.buffer else case.kv_length
        cache = rng.integers(0, high, b).astype(np.int32)
        if not case.buffer:
            cache[pyrandom.randint(0, b - 1)] = case.kv_length
        seqlens = cache + s - 1
        total = case.kv_length if case.buffer else case.kv_length + s
    feeds["seqlens_k"] = seqlens
    feeds["total_sequence_length"] = np.array([total], np.int32)
    if case.rotary:
        angle = rng.random((cos_rows, (math.floor(h / 16) * 16) // 2), dtype=np.float32) * 2 * np.float32(math.pi)
        feeds["cos_cache"], feeds["sin_cache"] = np.cos(angle), np.sin(angle)
    max_seqlen = int(seqlens.max()) + 1
    if case.adapted and not case.prompt:
        feeds["total_sequence_length"] = np.array([max_seqlen], np.int32)
    if case.tree:
        if case.prompt:
            feeds["pos_ids"] = (
                np.tile(np.arange(s, dtype=np.int64), (b, 1)) if case.adapted else np.zeros((1, 1), np.int64)
            )
            feeds["attention_mask"] = np.triu(rng.random((b, 1, kv_new, kv_new), dtype=np.float32), 1)
        else:
            mask = np.zeros((b, 1, s, max_seqlen), np.float32)
            positions = np.zeros((b, s), np.int64)
            for row in range(b):
                past_length = int(seqlens[row]) + 1 - s
                positions[row] = np.arange(past_length, past_length + s)
                for i in range(s):
                    mask[row, 0, i, past_length + i + 1 :] = -5000
            feeds["pos_ids"], feeds["attention_mask"] = positions, mask
    return feeds, window, max_seqlen


# Running ----------------------------------------------------------------------------------------------------------


def run_bound(session: ort.InferenceSession, feeds: dict, buffer: bool) -> dict[str, np.ndarray]:
    """Run as gqa_prompt_func / gqa_past_func do: IO binding, present bound to the past buffer when shared."""
    binding = session.io_binding()
    names = {i.name for i in session.get_inputs()}
    past = {}
    for name, array in feeds.items():
        if name not in names:
            continue
        if buffer and name in ("past_key", "past_value"):
            past[name] = ort.OrtValue.ortvalue_from_numpy(array.copy(), "cpu", 0)
            binding.bind_input(name, "cpu", 0, np.float32, past[name].shape(), past[name].data_ptr())
        else:
            binding.bind_cpu_input(name, array)
    binding.bind_output("output")
    for output, name in (("present_key", "past_key"), ("present_value", "past_value")):
        if buffer:
            binding.bind_ortvalue_output(output, past[name])
        else:
            binding.bind_output(output)
    session.run_with_iobinding(binding)
    output, present_key, present_value = binding.copy_outputs_to_cpu()
    return {
        "output": np.asarray(output),
        "present_key": np.asarray(present_key),
        "present_value": np.asarray(present_value),
    }


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _first_line(error: Exception) -> str:
    """The message's first line, and the second when ORT puts the detail there ("index: 2 Got: 262 ...")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return " ".join(lines[:2]) if lines[0].endswith("following indices") else lines[0]


def run_case(case: Case, seed: int = 69, restore_declarations: bool = False) -> dict:
    """One case: {"case", "outcome", "detail", "errors"}. ``restore_declarations``: put the original's graph
    output declarations back on the rewrite before running it (to tell that defect from any other)."""
    rng = np.random.default_rng([seed, case.index])
    pyrandom = random.Random(seed * 100003 + case.index)
    feeds, window, max_seqlen = make_feeds(case, rng, pyrandom)
    model = build_graph(case, window, max_seqlen)
    result = {"case": case.name, "outcome": "passed", "detail": "", "errors": {}}
    try:
        expected = run_bound(_session(model), feeds, case.buffer)
    except Exception as error:  # noqa: BLE001 - ORT's own verdict on its own graph
        return {**result, "outcome": "ORT rejects", "detail": _first_line(error)}
    try:
        rewritten = gqa_decompose.decompose(model)
    except gqa_decompose.GqaDecomposeError as error:
        return {**result, "outcome": "refused", "detail": _first_line(error)}
    except Exception as error:  # noqa: BLE001
        return {**result, "outcome": "decompose error", "detail": f"{type(error).__name__}: {_first_line(error)}"}
    if restore_declarations:
        del rewritten.graph.output[:]
        rewritten.graph.output.extend(model.graph.output)
    try:
        session = _session(rewritten)
    except Exception as error:  # noqa: BLE001
        return {**result, "outcome": "load error", "detail": _first_line(error)}
    try:
        got = run_bound(session, feeds, case.buffer)
    except Exception as error:  # noqa: BLE001
        return {**result, "outcome": "run error", "detail": _first_line(error)}
    bad = []
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            bad.append(f"{name} shape {list(have.shape)} != {list(want.shape)}")
            continue
        error = float(np.max(np.abs(have - want))) if want.size else 0.0
        result["errors"][name] = error
        if not np.allclose(have, want, rtol=RTOL, atol=ATOL, equal_nan=True):
            bad.append(f"{name} max error {error:.3g}")
    if bad:
        return {**result, "outcome": "mismatch", "detail": "; ".join(bad)}
    return result


def sample(cases: list[Case], count: int) -> list[Case]:
    """``count`` cases spread evenly over the grid (the first and the last included)."""
    if count >= len(cases):
        return cases
    picks = np.linspace(0, len(cases) - 1, count).round().astype(int)
    return [cases[i] for i in sorted(set(picks))]


def summarize(results: list[dict]) -> str:
    outcomes = collections.Counter(r["outcome"] for r in results)
    for r in results:  # one class for "... got 1938" and "... got 865"
        r["class"] = re.sub(r"got \d+", "got N", re.sub(r"Name:'[^']*' Status Message: ", "", r["detail"]))
    lines = [f"{len(results)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))]
    classes = collections.defaultdict(list)
    for r in results:
        if r["outcome"] != "passed":
            detail = r["class"] if r["outcome"] != "mismatch" else r["detail"].split(" max error")[0]
            classes[(r["outcome"], detail)].append(r["case"])
    for (outcome, detail), names in sorted(classes.items(), key=lambda item: -len(item[1])):
        lines.append(f"  {len(names)} x {outcome}: {detail}")
        lines += [f"      e.g. {name}" for name in names[:3]]
    worst = max((e for r in results for e in r["errors"].values()), default=0.0)
    lines.append(f"max |rewrite - fused| over compared outputs: {worst:.3g}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None, help="run N cases spread over the grid")
    parser.add_argument("--json", type=Path, default=None, help="write every case's outcome here")
    parser.add_argument("--seed", type=int, default=69)
    parser.add_argument(
        "--adapted-tree",
        action="store_true",
        help="run the tree-attention cases adapted so that ORT 1.31 runs them, instead of the grid",
    )
    parser.add_argument(
        "--restore-declarations",
        action="store_true",
        help="give the rewrite the original's graph output declarations before running it",
    )
    parser.add_argument("--filter", default="", help="only the cases whose name contains this")
    args = parser.parse_args()
    cases = adapted_tree_grid() if args.adapted_tree else grid()
    cases = [c for c in cases if args.filter in c.name]
    if args.sample:
        cases = sample(cases, args.sample)
    results = []
    start = time.time()
    for number, case in enumerate(cases, 1):
        results.append(run_case(case, args.seed, args.restore_declarations))
        if results[-1]["outcome"] != "passed":
            print(f"[{number}/{len(cases)}] {case.name}: {results[-1]['outcome']}: {results[-1]['detail']}", flush=True)
        elif number % 50 == 0:
            print(f"[{number}/{len(cases)}] {time.time() - start:.0f} s", flush=True)
    print(summarize(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["outcome"] in ("passed", "ORT rejects") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
