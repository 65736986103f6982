"""Damaged checkpoint files are refused with the file named and the damage said, not a library exception."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.checkpoint import CheckpointError, StateDictSource, load_checkpoint, load_params
from models.config import CheckpointFileError


@pytest.fixture
def single(tiny_checkpoints, tmp_path):
    target = tmp_path / "single"
    shutil.copytree(tiny_checkpoints("tiny").directory, target)
    return target


@pytest.fixture
def sharded(tiny_checkpoints, tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints("tiny-gqa").directory, target)
    return target


def _shards(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _refused(directory, path, what):
    with pytest.raises(CheckpointFileError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert str(path) in message, message
    assert what in message, message
    return message


def test_truncated_weights_name_the_file(single):
    path = single / "model.safetensors"
    _truncate(path, 0.5)
    _refused(single, path, "truncated or corrupt")


def test_empty_weights_name_the_file(single):
    path = single / "model.safetensors"
    path.write_bytes(b"")
    _refused(single, path, "is empty (0 bytes)")


def test_truncated_shard_names_the_shard(sharded):
    path = sharded / _shards(sharded)[1]
    _truncate(path, 0.5)
    _refused(sharded, path, "truncated or corrupt")


@pytest.mark.parametrize(
    "text, what",
    [
        ('{"model_type": "llava", ', "is not valid JSON"),
        ("", "is empty (0 bytes)"),
        ("[1, 2]", "holds a JSON list, expected a JSON object"),
    ],
)
def test_damaged_config_names_the_file(single, text, what):
    path = single / "config.json"
    path.write_text(text)
    _refused(single, path, what)


def test_config_that_is_not_text_names_the_file(single):
    path = single / "config.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    _refused(single, path, "is not valid JSON")


@pytest.mark.parametrize(
    "text, what",
    [("not json {", "is not valid JSON"), ('{"metadata": {}}', 'no "weight_map" object')],
)
def test_damaged_shard_index_names_the_file(sharded, text, what):
    path = sharded / "model.safetensors.index.json"
    path.write_text(text)
    _refused(sharded, path, what)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_with_the_tensor_named(single, bad):
    path = single / "model.safetensors"
    tensors = load_file(path)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 5] = bad
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=rf"tensor {key} in {path} holds non-finite values") as error:
        load_checkpoint(single)
    expected = "1 NaN, 0 inf" if np.isnan(bad) else "0 NaN, 1 inf"
    assert expected in str(error.value)


def test_non_finite_weights_in_a_shard_and_in_memory(sharded, tiny_checkpoints):
    shard = sharded / _shards(sharded)[0]
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    tensors[key].reshape(-1)[0] = np.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {key} in {shard} holds non-finite values"):
        load_checkpoint(sharded)

    ckpt = tiny_checkpoints("tiny")
    state = {k: v.detach().float().numpy().copy() for k, v in ckpt.torch_model.state_dict().items()}
    name = next(k for k in state if k.endswith("multi_modal_projector.linear_1.weight"))
    state[name][0, 0] = np.inf
    with pytest.raises(
        CheckpointError, match="tensor multi_modal_projector.linear_1.weight holds non-finite"
    ):
        load_params(ckpt.config, StateDictSource(state))
