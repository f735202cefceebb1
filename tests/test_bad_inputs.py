"""A corpus of bad inputs, each through the real CLI process.

Every case must: exit 2, print exactly one ``error:`` line on stderr naming the
problem (and the node, when there is one), print no traceback, leave no output
file or temporary behind, and leave every input file byte-for-byte unchanged.
The corpus is generated into a temporary folder (small; the 2 GiB files are
sparse and cost no disk).
"""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import sys

import onnx
import pytest
from gqa_models import GqaConfig, make_gqa_model
from onnx import helper
from test_model_io import (
    TINY_LLAMA,
    point_at_external_data,
    save_with_external_data,
    write_model_with_external_cos_cache,
)

NODE = "node 'attn/GroupQueryAttention'"
GIB = 2**30


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gqa_decompose", "-q", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def fingerprint(path: pathlib.Path) -> str:
    """sha256 of a file; of its size, head and tail for the sparse multi-GiB ones."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= 64 * 2**20:
            digest.update(file.read())
        else:
            digest.update(str(size).encode())
            digest.update(file.read(2**20))
            file.seek(size - 2**20)
            digest.update(file.read())
    return digest.hexdigest()


def snapshot(folder: pathlib.Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with the fingerprint of each file."""
    return {str(p.relative_to(folder)): fingerprint(p) if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def save(model: onnx.ModelProto, path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(model.SerializeToString())
    return path


def gqa_model(**config) -> onnx.ModelProto:
    return make_gqa_model(GqaConfig(**config))


def set_attribute(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))
    return model


def graph_input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(i for i in model.graph.input if i.name == name)


# The corpus: name -> builder(folder) -> (model path, extra CLI arguments, expected message part).


def not_onnx(folder):
    (folder / "notes.onnx").write_text("definitely not a protobuf\n")
    return folder / "notes.onnx", [], "cannot read .*notes.onnx as an ONNX model"


def empty_file(folder):
    (folder / "empty.onnx").write_bytes(b"")
    return folder / "empty.onnx", [], "empty.onnx is not an ONNX model"


def truncated_protobuf(folder):
    path = folder / "truncated.onnx"
    path.write_bytes(TINY_LLAMA.read_bytes()[:3000])
    return path, [], "cannot read .* as an ONNX model"


def missing_num_heads(folder):
    return (
        save(set_attribute(gqa_model(), "num_heads", None), folder / "m.onnx"),
        [],
        (f"{NODE}: required attribute 'num_heads' is missing"),
    )


def heads_not_a_multiple(folder):
    model = set_attribute(gqa_model(num_heads=6, kv_num_heads=2), "kv_num_heads", 4)
    return save(model, folder / "m.onnx"), [], f"{NODE}: num_heads \\(6\\) is not a multiple of kv_num_heads \\(4\\)"


def hidden_sizes_contradict_head_counts(folder):
    model = gqa_model()
    graph_input(model, "key").type.tensor_type.shape.dim[2].dim_value = 48
    return save(model, folder / "m.onnx"), [], f"{NODE}: key hidden size 48 != kv_num_heads\\*head_size = 32"


def packed_hidden_not_divisible(folder):
    model = gqa_model(packed=True)
    graph_input(model, "query").type.tensor_type.shape.dim[2].dim_value = 100
    return save(model, folder / "m.onnx"), [], f"{NODE}: packed query hidden size 100 is not a multiple"


def query_of_rank_2(folder):
    model = gqa_model()
    del graph_input(model, "query").type.tensor_type.shape.dim[0]
    return save(model, folder / "m.onnx"), [], f"{NODE}: query must be 3-D \\(B, S, hidden\\)"


def past_key_of_rank_3(folder):
    model = gqa_model()
    del graph_input(model, "past_key").type.tensor_type.shape.dim[0]
    return save(model, folder / "m.onnx"), [], f"{NODE}: past_key must be 4-D"


def query_of_type_int32(folder):
    model = gqa_model()
    graph_input(model, "query").type.tensor_type.elem_type = onnx.TensorProto.INT32
    return save(model, folder / "m.onnx"), [], f"{NODE}: query type .* is not float"


def key_of_another_type(folder):
    model = gqa_model()
    graph_input(model, "key").type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    return save(model, folder / "m.onnx"), [], f"{NODE}: key type .* differs from query type"


def seqlens_k_int64(folder):
    model = gqa_model()
    graph_input(model, "seqlens_k").type.tensor_type.elem_type = onnx.TensorProto.INT64
    return save(model, folder / "m.onnx"), [], f"{NODE}: input 'seqlens_k' must be int32"


def seqlens_k_missing(folder):
    model = gqa_model()
    model.graph.node[0].input[5] = ""
    return save(model, folder / "m.onnx"), [], f"{NODE}: required input 'seqlens_k' is missing"


def unknown_attribute(folder):
    return (
        save(set_attribute(gqa_model(), "do_flash", 1), folder / "m.onnx"),
        [],
        (f"{NODE}: unknown attribute\\(s\\) \\['do_flash'\\]"),
    )


def contradictory_attributes(folder):
    model = set_attribute(set_attribute(gqa_model(), "causal", 0), "local_window_size", 4)
    return save(model, folder / "m.onnx"), [], f"{NODE}: local_window_size must be -1 when causal is 0"


def external_data_missing(folder):
    path = write_model_with_external_cos_cache(folder, "weights.data")
    (folder / "weights.data").unlink()
    return path, [], "initializer 'cos_cache' points at external data 'weights.data', which does not exist"


def external_data_truncated(folder):
    path = folder / "tiny.onnx"
    data = save_with_external_data(TINY_LLAMA, path)
    with open(data, "r+b") as file:
        file.truncate(data.stat().st_size // 2)
    return path, [], "initializer '.*' needs bytes .* of external data 'tiny.onnx.data', which holds .* bytes"


def _cos_cache_pointing_at(folder, location: str, length: int):
    """A model whose cos_cache initializer's external data is ``length`` bytes of ``location``."""
    path = write_model_with_external_cos_cache(folder, "weights.data")
    model = onnx.load(path, load_external_data=False)
    cos = next(t for t in model.graph.initializer if t.name == "cos_cache")
    point_at_external_data(cos, location, length)
    return save(model, path)


def external_data_length_contradicts_shape(folder):
    path = _cos_cache_pointing_at(folder, "weights.data", 12)
    return path, [], "initializer 'cos_cache' declares 12 bytes of external data but its type and shape need"


def external_data_escaping_the_folder(folder):
    path = _cos_cache_pointing_at(folder, "../../etc/passwd", 16)
    return path, [], "'../../etc/passwd', outside the model's folder"


def external_data_at_an_absolute_path(folder):
    path = _cos_cache_pointing_at(folder, "/etc/passwd", 16)
    return path, [], "'/etc/passwd', outside the model's folder"


def protobuf_over_2_gib(folder):
    # A real ModelProto followed by a sparse hole: protobuf cannot hold 2 GiB, so the
    # tool must refuse by size instead of reading 2 GiB into memory to find out.
    path = save(gqa_model(), folder / "huge.onnx")
    with open(path, "r+b") as file:
        file.truncate(2 * GIB + 4096)
    return path, [], "huge.onnx is 2.0 GiB: a protobuf file of 2 GiB or more cannot be an ONNX model"


def output_folder_read_only(folder):
    # Root ignores permission bits; sysfs refuses new files even to root.
    return (
        save(gqa_model(), folder / "m.onnx"),
        ["-o", "/sys/out.onnx"],
        ("cannot write the output into /sys: Operation not permitted"),
    )


def output_folder_missing(folder):
    path = save(gqa_model(), folder / "m.onnx")
    return path, ["-o", folder / "missing" / "out.onnx"], "the output folder .*missing does not exist"


def output_folder_is_a_file(folder):
    (folder / "blocker").write_text("a file, not a folder")
    return (
        save(gqa_model(), folder / "m.onnx"),
        ["-o", folder / "blocker" / "sub" / "x.onnx"],
        ("cannot write the output into .*blocker/sub: .*blocker is not a folder"),
    )


def output_equal_to_input(folder):
    path = save(gqa_model(), folder / "m.onnx")
    return path, ["-o", path], "the output path is the input model's own file"


def output_replacing_the_inputs_data_file(folder):
    path = folder / "a.onnx"
    save_with_external_data(TINY_LLAMA, path, location="b.onnx.data")
    return path, ["-o", folder / "b.onnx"], "would replace .*b.onnx.data, a file of the input model"


def output_is_a_link_to_the_input(folder):
    path = save(gqa_model(), folder / "m.onnx")
    (folder / "link.onnx").symlink_to(path)
    return path, ["-o", folder / "link.onnx"], "the output path is the input model's own file"


def model_is_a_folder(folder):
    (folder / "model.onnx").mkdir()
    return folder / "model.onnx", [], "model.onnx is a folder, not a model file"


CORPUS = [
    not_onnx,
    empty_file,
    truncated_protobuf,
    missing_num_heads,
    heads_not_a_multiple,
    hidden_sizes_contradict_head_counts,
    packed_hidden_not_divisible,
    query_of_rank_2,
    past_key_of_rank_3,
    query_of_type_int32,
    key_of_another_type,
    seqlens_k_int64,
    seqlens_k_missing,
    unknown_attribute,
    contradictory_attributes,
    external_data_missing,
    external_data_truncated,
    external_data_length_contradicts_shape,
    external_data_escaping_the_folder,
    external_data_at_an_absolute_path,
    protobuf_over_2_gib,
    output_folder_read_only,
    output_folder_missing,
    output_folder_is_a_file,
    output_equal_to_input,
    output_replacing_the_inputs_data_file,
    output_is_a_link_to_the_input,
    model_is_a_folder,
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.__name__ for c in CORPUS])
def test_a_bad_input_exits_2_with_one_line_and_touches_nothing(tmp_path, case):
    import re

    folder = tmp_path / "corpus"
    folder.mkdir()
    model_path, arguments, message = case(folder)
    before = snapshot(folder)
    result = run_cli(model_path, *arguments)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(message, lines[0]), (message, lines[0])
    assert snapshot(folder) == before  # no output, no temporary, inputs unchanged


def test_a_model_with_over_2_gib_of_external_weights_is_rewritten_without_loading_them(tmp_path):
    """Not bad input: the weights stay on disk (peak memory of the child stays far below 2 GiB)."""
    import resource

    import numpy as np

    model = gqa_model()
    vocabulary = 2 * GIB // (64 * 4) + 1024  # fp32 rows of 64: a little over 2 GiB
    embedding = onnx.TensorProto(name="embedding", dims=[vocabulary, 64], data_type=onnx.TensorProto.FLOAT)
    point_at_external_data(embedding, "model.onnx.data", vocabulary * 64 * 4)
    model.graph.initializer.append(embedding)
    # query = Gather(embedding, ids): the weight is used, so it must be carried over.
    query = graph_input(model, "query")
    model.graph.input.remove(query)
    model.graph.input.append(helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"]))
    model.graph.node.insert(0, helper.make_node("Gather", ["embedding", "ids"], ["query"], name="embed"))
    path = save(model, tmp_path / "model.onnx")
    with open(tmp_path / "model.onnx.data", "wb") as data:
        data.truncate(vocabulary * 64 * 4)
    result = run_cli(path, "--reuse-data", "-o", tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < GIB // 1024, peak_kib
    saved = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    weight = next(t for t in saved.graph.initializer if t.name == "embedding")
    assert {e.key: e.value for e in weight.external_data}["location"] == "model.onnx.data"
    assert np.prod(weight.dims) * 4 > 2 * GIB


@pytest.mark.parametrize("name", [".", ".."])
def test_a_folder_named_by_dots_exits_2_with_one_line(tmp_path, name):
    folder = tmp_path / "work" / "here"
    folder.mkdir(parents=True)
    before = snapshot(tmp_path)
    result = run_cli(name, cwd=folder)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a folder, not a model file" in lines[0], lines
    assert snapshot(tmp_path) == before


# ONNX Runtime's symbolic shape inference cannot type this model's second query (the first node's
# declared outputs contradict its head counts, and the query comes from an op neither ONNX's inference
# nor ORT's knows): it used to save sym_shape_infer_temp.onnx into the working folder.
INCOMPLETE_SYMBOLIC_INFERENCE = """
<ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1, "custom" : 1]>
g (float16[2,seq,8] q0, float16[2,seq,8] k0, float16[2,seq,8] v0, float16[2,1,past,8] pk, float16[2,1,past,8] pv,
   int32[2] seqlens_k, int32 total, float[2,seq,64] x)
  => (float16[2,seq,8] out0, float16[2,1,past,8] present_key, float16[2,1,past,8] present_value, output_qk, float[] attn)
{
  out0, present_key, present_value, output_qk = com.microsoft.GroupQueryAttention
      <num_heads: int = 1, kv_num_heads: int = 2, qk_output: int = 2> (q0, k0, v0, pk, pv, seqlens_k, total)
  query = custom.Mystery (x)
  attn = com.microsoft.GroupQueryAttention <num_heads: int = 4, kv_num_heads: int = 2> (query, query, query, , , seqlens_k, total)
}
"""


@pytest.mark.parametrize("mode", [[], ["--check"]], ids=["decompose", "check"])
def test_nothing_lands_in_the_working_folder(tmp_path, mode):
    model = save(onnx.parser.parse_model(INCOMPLETE_SYMBOLIC_INFERENCE), tmp_path / "m.onnx")
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    result = run_cli(model, *mode, cwd=work)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == (1 if mode else 2), (result.stdout, result.stderr)
    assert snapshot(tmp_path) == before
    assert "typing failed" in result.stdout + result.stderr
