"""Fused projections (q/k/v and gate/up, `models.layers.FusedDense`) join transformers' separate
tensors at load and split them back at save: the fused parameters hold exactly those tensors, in order;
what we save is what transformers saved (names and values) and transformers loads it; every reader of
a single projection (feature keys, the vision tower's [CLS] readout, queries and keys) sees its own
part; a bad tensor is named by its transformers name. Biases are on (attention_bias, mlp_bias) and
random, so the fused biases are checked too."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import presets
from models.checkpoint import CheckpointError, canonical_name, load_checkpoint, save_checkpoint
from models.generate import LlavaRunner
from models.layers import FusedDense
from tests.helpers import exact_torch, make_prompt, random_pixels


@pytest.fixture(scope="module")
def with_biases(tmp_path_factory):
    """(directory, hf_config, torch model, JAX model, transformers tensors by canonical name) of a tiny
    grouped-query checkpoint with random q/k/v/o and MLP biases (transformers initialises them to 0)."""
    exact_torch()
    config = presets.llava_config("tiny-gqa")
    config.text_config.attention_bias = True
    config.text_config.mlp_bias = True
    torch_model = presets.random_torch_model(config, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    directory = str(tmp_path_factory.mktemp("with-biases"))
    presets.write_random_checkpoint(config, directory, model=torch_model)
    _, model = load_checkpoint(directory)
    tensors = {canonical_name(k): v.detach().numpy() for k, v in torch_model.state_dict().items()}
    return directory, config, torch_model, model, tensors


def test_fused_parameters_hold_the_transformers_tensors_joined_in_order(with_biases):
    _, _, _, model, tensors = with_biases
    for index, layer in enumerate(model.language_model.layers):
        prefix = f"language_model.layers.{index}"
        for fused, parts in (
            (layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
        ):
            expected = [tensors[f"{prefix}.{part}.weight"].T for part in parts]
            np.testing.assert_array_equal(np.asarray(fused.kernel[...]), np.concatenate(expected, axis=1))
            assert fused.sizes == tuple(part.shape[1] for part in expected)
            biases = [tensors[f"{prefix}.{part}.bias"] for part in parts]
            np.testing.assert_array_equal(np.asarray(fused.bias[...]), np.concatenate(biases))
            for position, part in enumerate(parts):
                kernel, bias = fused.part(position)
                np.testing.assert_array_equal(np.asarray(kernel), tensors[f"{prefix}.{part}.weight"].T)
                np.testing.assert_array_equal(np.asarray(bias), tensors[f"{prefix}.{part}.bias"])
    for index, layer in enumerate(model.vision_tower.layers):
        prefix = f"vision_tower.encoder.layers.{index}.self_attn"
        parts = ("q_proj", "k_proj", "v_proj")
        np.testing.assert_array_equal(
            np.asarray(layer.self_attn.qkv_proj.kernel[...]),
            np.concatenate([tensors[f"{prefix}.{p}.weight"].T for p in parts], axis=1),
        )
        np.testing.assert_array_equal(
            np.asarray(layer.self_attn.qkv_proj.bias[...]),
            np.concatenate([tensors[f"{prefix}.{p}.bias"] for p in parts]),
        )


def test_logits_with_fused_biases_match_transformers(with_biases):
    _, config, torch_model, model, _ = with_biases
    runner = LlavaRunner(model)
    rng = np.random.default_rng(5)
    ids = make_prompt(model.config, rng, before=7, after=20)
    pixels = random_pixels(rng, 1, model.config.vision.image_size)
    batch = runner.make_batch([ids], pixels, pad_token_id=config.text_config.pad_token_id)
    ours = np.asarray(runner.prefill(batch, all_logits=True).logits)[0, : len(ids)]
    with torch.no_grad():
        reference = (
            torch_model(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pixels)).logits[0].numpy()
        )
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()


def test_single_projection_readers_see_their_own_part(with_biases):
    """Feature keys (the k part with its bias), queries and keys (q and k of the fused matmul) and the
    vision tower's [CLS] readout, against transformers' separate tensors in float64."""
    _, _, _, model, tensors = with_biases
    rng = np.random.default_rng(0)
    layer = model.language_model.layers[1]
    width = model.config.text.hidden_size
    hidden = rng.normal(size=(2, 9, width)).astype(np.float32)
    k_weight = tensors["language_model.layers.1.self_attn.k_proj.weight"].astype(np.float64)
    k_bias = tensors["language_model.layers.1.self_attn.k_proj.bias"].astype(np.float64)
    keys = hidden.astype(np.float64) @ k_weight.T + k_bias
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(layer.feature_keys(jnp.asarray(hidden), normalized=False)), keys, atol=1e-5
    )

    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    q, k = layer.queries_keys(jnp.asarray(hidden), positions)
    full_q, full_k, _ = layer.self_attn.qkv(layer.input_layernorm(jnp.asarray(hidden)), positions)
    np.testing.assert_allclose(np.asarray(q), np.asarray(full_q), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(k), np.asarray(full_k), rtol=0, atol=1e-6)

    attention = model.vision_tower.layers[0].self_attn
    vision_width = model.config.vision.hidden_size
    x = rng.normal(size=(1, 5, vision_width)).astype(np.float32)
    _, head_mean_keys = attention.cls_readout(jnp.asarray(x))
    prefix = "vision_tower.encoder.layers.0.self_attn.k_proj"
    vision_keys = (
        x.astype(np.float64) @ tensors[f"{prefix}.weight"].T.astype(np.float64) + tensors[f"{prefix}.bias"]
    )
    expected = vision_keys.reshape(1, 5, attention.num_heads, -1).mean(axis=2)
    np.testing.assert_allclose(np.asarray(head_mean_keys), expected, atol=1e-5)


def test_save_writes_what_transformers_saved_and_transformers_loads_it(with_biases, tmp_path):
    directory, config, torch_model, model, _ = with_biases
    save_checkpoint(model, config, tmp_path)
    # Compared by canonical name: transformers writes the vision tower as vision_tower.encoder.*, we
    # as the released llava-hf files have it (vision_tower.vision_model.*); both load.
    theirs = {
        canonical_name(k): v for k, v in load_file(os.path.join(directory, "model.safetensors")).items()
    }
    ours = {canonical_name(k): v for k, v in load_file(os.path.join(tmp_path, "model.safetensors")).items()}
    assert sorted(ours) == sorted(theirs)  # the same tensors, nothing fused among them
    for name, array in theirs.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    from transformers import LlavaForConditionalGeneration

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for name, tensor in torch_model.state_dict().items():
        np.testing.assert_array_equal(reloaded[name].numpy(), tensor.numpy(), err_msg=name)
    _, again = load_checkpoint(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_parts_of_a_fused_parameter_are_named_by_their_transformers_names(with_biases, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(with_biases[0], directory)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors["language_model.model.layers.0.self_attn.q_proj.weight"]
    del tensors["language_model.model.layers.2.mlp.up_proj.bias"]
    k_name = "language_model.model.layers.1.self_attn.k_proj.weight"
    tensors[k_name] = tensors[k_name][:-1]
    v_name = "vision_tower.encoder.layers.0.self_attn.v_proj.bias"
    tensors[v_name] = tensors[v_name][:-2]
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    message = str(error.value)
    assert (
        "missing keys (2): language_model.layers.0.self_attn.q_proj.weight, language_model.layers.2.mlp.up_proj.bias"
        in message
    )
    width = with_biases[1].text_config.hidden_size
    kv_width = with_biases[3].config.text.num_kv_heads * with_biases[3].config.text.head_dim
    assert f"language_model.layers.1.self_attn.k_proj.weight: checkpoint ({kv_width - 1}, {width})" in message
    assert f"expects ({width}, {kv_width})" in message
    assert "vision_tower.encoder.layers.0.self_attn.v_proj.bias: checkpoint" in message
    assert "shape mismatches (2)" in message and "unexpected keys" not in message


def test_fused_dense_parts_are_the_columns_of_one_projection():
    dense = FusedDense(6, (4, 2, 3), use_bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    dense.bias[...] = jnp.arange(9, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 6)), jnp.float32)
    whole = x @ dense.kernel[...] + dense.bias[...]
    parts = dense(x)
    assert [p.shape[-1] for p in parts] == [4, 2, 3]
    np.testing.assert_allclose(np.concatenate(parts, axis=-1), whole, rtol=1e-6, atol=1e-6)
    first_two = dense.project(x, 0, 2)
    np.testing.assert_allclose(np.concatenate(first_two, axis=-1), whole[..., :6], rtol=1e-6, atol=1e-6)
    kernel, bias = dense.part(2)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(dense.kernel[...])[:, 6:])
    np.testing.assert_array_equal(np.asarray(bias), np.arange(6, 9, dtype=np.float32))
