"""The model on meshes of 8 fake CPU devices (data-parallel, data x model, model alone) against one
device, in a subprocess of its own (`tests/models/mesh_checks.py`: the device count is fixed before
JAX starts): logits, kept indices and greedy tokens; where each weight and the KV cache live; the
Pallas NMS under shard_map; the refusal of a model axis that does not divide the KV heads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICES = 8
# The language model's large weights: split over the model axis, never whole on a device.
TENSOR_PARALLEL = ("qkv_proj.kernel", "o_proj.kernel", "gate_up_proj.kernel", "down_proj.kernel")


def fake_device_env(count: int) -> dict[str, str]:
    """The environment of a subprocess whose CPU backend shows ``count`` devices."""
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
        "PYTHONPATH": str(REPO_ROOT),
        "JAX_PLATFORMS": "cpu",
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The checks' output folder: checks.json, the checkpoint, the question split, the evaluations."""
    work = tmp_path_factory.mktemp("mesh")
    process = subprocess.run(
        [sys.executable, "-m", "tests.models.mesh_checks", str(work)],
        cwd=REPO_ROOT,
        env=fake_device_env(DEVICES),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def checks(work):
    return json.loads((work / "checks.json").read_text())


def mesh_sizes(spec: str) -> dict[str, int]:
    sizes = {"data": 1, "model": 1}
    sizes.update({name: int(size) for name, size in (item.split(":") for item in spec.split(","))})
    return sizes


@pytest.mark.slow  # the checks' subprocess (or two of its own)
def test_every_mesh_answers_as_one_device(checks):
    assert checks["devices"] == DEVICES
    assert set(checks["meshes"]) == {"data:8", "data:2,model:4", "model:2"}
    for spec, entry in checks["meshes"].items():
        assert (
            set(entry["methods"]) == {"none", "adaptprune-pallas"} if spec == "data:2,model:4" else {"none"}
        )
        for name, result in entry["methods"].items():
            where = f"{spec} {name}"
            assert result["logits_max_abs_diff"] <= 1e-5, where
            assert result["logits_scale"] > 0.1, where  # real logits, not zeros
            assert result["tokens_equal"], where
            assert result["kept_equal"] is (None if name == "none" else True), where
        assert entry["nms_in_shard_map"], spec
        window = entry["window_nms"]  # the window form, its band in groups of blocks over sharded rows
        assert set(window["kept_equal"]) == {
            f"{case} {impl}" for case in ("row_major", "shuffled") for impl in ("xla", "pallas")
        }
        assert all(window["kept_equal"].values()) and all(window["loops_equal"].values()), spec
        assert window["fallback_equals_dense"], spec  # shuffled rows: the dense fallback, row by row
        assert window["kept_differing_from_top_k"] > 0, spec  # suppression acted


@pytest.mark.slow  # the checks' subprocess (or two of its own)
def test_weights_and_cache_are_sharded_as_the_table_says(checks):
    for spec, entry in checks["meshes"].items():
        sizes = mesh_sizes(spec)
        layout = entry["layout"]
        for name, item in layout.items():
            if name == "cache.k":
                continue
            split = sizes["model"] if "'model'" in item["spec"] else 1
            assert item["device_bytes"] * split == item["bytes"], (spec, name, item)
            if name.startswith(("vision_tower.", "joint_space.")):
                assert "model" not in item["spec"], (spec, name)  # the CLIP towers stay whole
        tensor_parallel = [
            n for n in layout if n.startswith("language_model.") and n.endswith(TENSOR_PARALLEL)
        ]
        assert len(tensor_parallel) == 4 * len(TENSOR_PARALLEL)  # every layer of the 4-layer LLM
        for name in [*tensor_parallel, "language_model.embed_tokens", "language_model.lm_head.kernel"]:
            assert "'model'" in layout[name]["spec"], (spec, name)
        # The KV cache (B, C, Hkv, D): rows over data, heads over model, one share per device.
        cache = layout["cache.k"]
        assert ("'data'" in cache["spec"]) == (sizes["data"] > 1), (spec, cache)
        assert ("'model'" in cache["spec"]) == (sizes["model"] > 1), (spec, cache)
        assert cache["device_bytes"] * sizes["data"] * sizes["model"] == cache["bytes"], (spec, cache)
        if sizes["model"] > 1:  # no silent replication: a device holds far less than the whole
            whole = sum(item["bytes"] for name, item in layout.items() if name != "cache.k")
            held = sum(item["device_bytes"] for name, item in layout.items() if name != "cache.k")
            assert held < 0.6 * whole, (spec, held, whole)


@pytest.mark.slow  # the checks' subprocess (or two of its own)
def test_a_model_axis_that_does_not_divide_the_kv_heads_is_refused(checks):
    assert checks["refused"] == (
        "a model axis of 8 devices does not divide the language model's 4 KV heads: each device must "
        "hold whole heads (the KV cache is split by head); use model:1 / 2 / 4"
    )


def raw_predictions(output_dir) -> list[tuple[str, str]]:
    """(question_id, prediction) of every line of the unpruned pair's file, duplicates included."""
    (path,) = (Path(output_dir) / "predictions").glob("none_*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(record["question_id"], record["prediction"]) for record in records]


@pytest.mark.slow  # the checks' subprocess (or two of its own)
def test_eval_on_eight_devices_interrupted_and_rerun_answers_as_one_device(checks):
    """Batches of 5 questions on a data axis of 8 (padded rows), stopped after its first batch and
    rerun in the same folder: every question once, each answer as on one device."""
    one_device = raw_predictions(checks["eval"]["one_device"])
    assert checks["eval"]["interrupted"]
    assert len(one_device) == len({question_id for question_id, _ in one_device}) == 11
    assert sorted(raw_predictions(checks["eval"]["mesh"])) == sorted(one_device)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # the checks' subprocess (or two of its own)
def test_two_processes_answer_as_one_device(work, checks):
    """`experiments.eval` as two processes joined by jax.distributed (one CPU device each: one global
    data axis of 2, collectives between the processes): process 0 writes every answer once."""
    port = free_port()
    output = work / "two_processes"
    flags = [
        f"--checkpoint={work / 'checkpoint'}",
        "--benchmark=testbed",
        f"--questions={work / 'testbed_test'}",
        f"--output_dir={output}",
        "--methods=none",
        "--batch_size=5",
        "--num_overlays=0",
        "--compile_cache=",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "experiments.eval", *flags, f"--process_id={index}"],
            cwd=REPO_ROOT,
            env=fake_device_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    logs = [process.communicate(timeout=600)[0] for process in processes]
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-3000:]
    assert "devices: data:2,model:1 (2 processes)" in logs[0]
    assert sorted(raw_predictions(output)) == sorted(raw_predictions(checks["eval"]["one_device"]))


# --- in this process: layouts and settings, no devices needed ------------------------------------


def test_fused_blocks_project_and_save_as_the_side_by_side_layout(tiny_checkpoints):
    """Fused kernels in two blocks (a model axis of 2 on tiny-gqa's 2 KV heads): every projection
    and the saved tensors are those of the side-by-side layout; only the columns' order differs."""
    import numpy as np
    from flax import nnx

    from models import sharding
    from models.checkpoint import checkpoint_parts, hf_name_for

    model = nnx.clone(tiny_checkpoints("tiny-gqa").jax_model)
    model.joint_space = None  # (saved apart, as CLIP's)
    blocked = nnx.clone(model)
    sharding.relayout_fused(blocked, 2)
    x = np.random.default_rng(0).normal(size=(2, 5, model.config.text.hidden_size)).astype(np.float32)
    for plain, split in zip(model.language_model.layers, blocked.language_model.layers):
        for name in ("qkv_proj", "gate_up_proj"):
            one = getattr(plain.self_attn if name == "qkv_proj" else plain.mlp, name)
            two = getattr(split.self_attn if name == "qkv_proj" else split.mlp, name)
            assert two.blocks == 2 and not np.array_equal(one.kernel[...], two.kernel[...])
            for a, b in zip(one(x), two(x)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
            for a, b in zip(one.project(x, 1, 1), two.project(x, 1, 1)):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(one.part(1)[0], two.part(1)[0])
    saved, saved_blocked = checkpoint_parts(model, hf_name_for), checkpoint_parts(blocked, hf_name_for)
    assert [name for name, _, _ in saved] == [name for name, _, _ in saved_blocked]
    for (name, _, a), (_, _, b) in zip(saved, saved_blocked):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-full"])
def test_every_weight_has_logical_axes(tiny_checkpoints, name):
    """Every preset's weights (the text tower's too) have an entry in the table, one name per axis."""
    from flax import nnx

    from models import sharding

    state = nnx.state(tiny_checkpoints(name).jax_model)
    shardings = sharding.weight_shardings(state, sharding.make_mesh("data:1"))
    assert len(shardings) == len(jax_leaves(state)) > 0


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_bad_meshes_are_refused_with_the_reason():
    from models import sharding

    assert sharding.parse_mesh("model:4, data:2") == {"model": 4, "data": 2}
    for spec, message in (
        ("data:2,pipe:2", "unknown axis 'pipe'; axes: data, model"),
        ("data:2,data:4", "axis 'data' given twice"),
        ("model:0", "axis 'model' needs a positive size"),
        ("data", "axis 'data' needs a positive size"),
        ("data:64", "needs 64 devices; 1 are available"),
    ):
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(spec)
