"""A run killed (SIGKILL) while it writes a large output leaves nothing under the final names.

What a kill leaves is the run's staging folder ``.<name>.<pid>.<random>.partial`` beside
the target; the next run that writes the same target removes it (its process is dead).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import time

import onnx
from gqa_models import GqaConfig, make_gqa_model
from onnx import helper
from test_model_io import point_at_external_data

WEIGHT_BYTES = 256 * 2**20  # a sparse file: no disk until the output copies it


def sparse_weights_model(folder: pathlib.Path) -> pathlib.Path:
    """A GQA model whose query is Gather(Concat(16 embedding shards), ids), the shards in a sparse data file.

    The weights are 256 MiB, so writing them takes long enough for the kill to land mid-way.
    """
    model = make_gqa_model(GqaConfig())
    shards = 16
    shard_bytes = WEIGHT_BYTES // shards
    rows = shard_bytes // (64 * 4)  # fp32 rows of the query hidden size, 4 heads x 16
    names = []
    for shard in range(shards):
        tensor = onnx.TensorProto(name=f"embedding.{shard}", dims=[rows, 64], data_type=onnx.TensorProto.FLOAT)
        point_at_external_data(tensor, "model.onnx.data", shard_bytes)
        tensor.external_data.add(key="offset", value=str(shard * shard_bytes))
        del tensor.external_data[1]  # point_at_external_data's offset 0
        model.graph.initializer.append(tensor)
        names.append(tensor.name)
    query = next(i for i in model.graph.input if i.name == "query")
    model.graph.input.remove(query)
    model.graph.input.append(helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "sequence"]))
    model.graph.node.insert(0, helper.make_node("Gather", ["embedding", "ids"], ["query"], name="embed"))
    model.graph.node.insert(0, helper.make_node("Concat", names, ["embedding"], name="shards", axis=0))
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with open(folder / "model.onnx.data", "wb") as data:
        data.truncate(WEIGHT_BYTES)
    return path


def staging_folders(folder: pathlib.Path, target: str) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{target}.") and p.name.endswith(".partial"))


def test_a_run_killed_while_writing_leaves_no_partial_output_and_the_next_run_cleans_up(tmp_path):
    source = sparse_weights_model(tmp_path)
    target = tmp_path / "x.onnx"
    command = [sys.executable, "-m", "gqa_decompose", "-q", "--no-verify", str(source), "-o", str(target)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staged: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            # onnx-ir streams the weights into a temporary file inside our staging folder.
            staged = [f.name for folder in staging_folders(tmp_path, "x.onnx") for f in folder.iterdir()]
            if staged:
                break
            time.sleep(0.001)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert staged and "x.onnx" not in staged, staged  # killed while the weights were being written
    left = {p.name for p in tmp_path.iterdir()} - {"model.onnx", "model.onnx.data"}
    (staging,) = staging_folders(tmp_path, "x.onnx")  # the only thing a kill leaves
    assert left == {staging.name}
    assert staging.name.startswith(f".x.onnx.{process.pid}.")

    # The next run for the same target removes the dead run's staging folder.
    rerun = subprocess.run([*command, "--reuse-data"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "model.onnx.data", "x.onnx"}
