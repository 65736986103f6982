"""The attention implementation option (`models.layers.self_attention`): `auto` resolution, a clear
error for an unknown name, and, on the CPU, the fused path's masking checked through XLA's
implementation of the same `jax.nn.dot_product_attention` call that runs cuDNN on a GPU: it equals
einsum in float32 on the vision tower, on random heads and on decoding steps over padded and pruned
caches (the LLM prefill, padded and pruned by every registered method, is checked in
`test_method_contract.py`, beside the einsum runs it shares)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers
from models.checkpoint import load_checkpoint
from models.config import from_hf_config, with_attention
from tests.helpers import batch_for, make_prompt, random_pixels, small_model_config

UNPRUNED = "none"


def test_auto_resolves_to_cudnn_only_on_a_gpu_in_half_precision():
    resolve = layers.resolve_attention
    assert resolve("auto", jnp.bfloat16, backend="gpu") == "cudnn"
    assert resolve("auto", jnp.float16, backend="gpu") == "cudnn"
    assert resolve("auto", jnp.float32, backend="gpu") == "einsum"
    assert resolve("auto", jnp.bfloat16, backend="cpu") == "einsum"
    assert resolve("auto", jnp.bfloat16, backend="tpu") == "einsum"
    for name in ("einsum", "cudnn", "xla"):
        assert resolve(name, jnp.float32, backend="cpu") == name
    assert jax.default_backend() == "cpu"  # what the next line relies on
    assert resolve("auto", jnp.bfloat16) == "einsum"


def test_loading_resolves_auto_into_the_config(tiny_checkpoints):
    ckpt = tiny_checkpoints("tiny")
    _, model = load_checkpoint(ckpt.directory, dtype="bfloat16")  # auto by default; einsum on a CPU
    assert (model.config.vision.attention, model.config.text.attention) == ("einsum", "einsum")
    cfg = with_attention(from_hf_config(ckpt.hf_config), "xla", jnp.float32)
    assert (cfg.vision.attention, cfg.text.attention) == ("xla", "xla")


def test_an_unknown_implementation_is_refused_with_the_valid_ones(tiny_checkpoints):
    valid = r"valid: einsum, cudnn, xla, auto"
    with pytest.raises(ValueError, match=rf"unknown attention implementation 'flash'; {valid}"):
        layers.resolve_attention("flash", jnp.float32)
    cfg = from_hf_config(tiny_checkpoints("tiny").hf_config)
    with pytest.raises(ValueError, match=valid):
        dataclasses.replace(cfg.text, attention="sdpa")
    with pytest.raises(ValueError, match=valid):
        dataclasses.replace(cfg.vision, attention="Einsum")
    with pytest.raises(ValueError, match=valid):
        load_checkpoint(tiny_checkpoints("tiny").directory, attention="flash")


def _random_qkv(rng, batch, length, heads, kv_heads, head_dim):
    q = rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(batch, length, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_xla_equals_einsum_on_real_rows_and_zeroes_padding_rows(kv_heads):
    """Right-padded rows with gaps in their positions (a pruned sequence), grouped-query heads; and
    no positions (every token sees every token, the vision tower)."""
    rng = np.random.default_rng(0)
    q, k, v = _random_qkv(rng, 3, 20, 4, kv_heads, 8)
    positions = np.full((3, 20), -1, np.int32)
    positions[0, :20] = np.arange(20)
    positions[1, :13] = np.sort(rng.choice(40, 13, replace=False))  # gaps, increasing
    positions[2, :1] = 0
    einsum = np.asarray(layers.self_attention(q, k, v, "einsum", jnp.asarray(positions)))
    fused = np.asarray(layers.self_attention(q, k, v, "xla", jnp.asarray(positions)))
    real = positions >= 0
    np.testing.assert_allclose(fused[real], einsum[real], rtol=0, atol=1e-6)
    assert (fused[~real] == 0).all()
    np.testing.assert_allclose(
        np.asarray(layers.self_attention(q, k, v, "xla")),
        np.asarray(layers.self_attention(q, k, v, "einsum")),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("implementation", ["einsum", "xla"])
@pytest.mark.parametrize("window", [None, 6])
def test_keys_with_empty_cache_slots_give_the_same_attention(implementation, window):
    """A layer's attention reads its cache as written (the prompt's keys, then empty slots for the
    generated tokens): equal to attention over the prompt's keys alone, on every real row, with
    garbage in the empty slots and in the padding slots (so reading one would show)."""
    rng = np.random.default_rng(2)
    q, k, v = _random_qkv(rng, 3, 20, 4, 2, 8)
    positions = np.full((3, 20), -1, np.int32)
    positions[0] = np.arange(20)
    positions[1, :13] = np.arange(13)
    positions[2, :1] = 0
    real = positions >= 0
    garbage = rng.normal(size=(3, 20, 2, 8)).astype(np.float32) * 1e3
    k, v = (jnp.where(jnp.asarray(real)[..., None, None], x, garbage) for x in (k, v))
    extra = rng.normal(size=(3, 7, 2, 8)).astype(np.float32) * 1e3
    k_cache, v_cache = (jnp.concatenate([x, extra], axis=1) for x in (k, v))
    positions = jnp.asarray(positions)
    alone = np.asarray(layers.self_attention(q, k, v, implementation, positions, window))
    cached = np.asarray(layers.self_attention(q, k_cache, v_cache, implementation, positions, window))
    np.testing.assert_allclose(cached[real], alone[real], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="only a causal call may add empty slots"):
        layers.self_attention(q, k_cache, v_cache, implementation)


def test_with_empty_slots_and_the_cache_it_makes():
    k = jnp.ones((2, 5, 3, 4))
    padded = layers.with_empty_slots(k, 3)
    assert padded.shape == (2, 8, 3, 4) and (np.asarray(padded[:, 5:]) == 0).all()
    assert layers.with_empty_slots(k, 0) is k
    positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5))
    cache = layers.new_stage_cache([padded, padded], [padded, padded], positions, 3)
    assert cache["positions"].shape == (2, 8) and (np.asarray(cache["positions"][:, 5:]) == -1).all()
    assert int(cache["end_index"]) == 5 and len(cache["k"]) == len(cache["v"]) == 2
    with pytest.raises(
        ValueError, match=r"needs keys and values of 8 slots, got 5 and 8 \(layer 1 of the run\)"
    ):
        layers.new_stage_cache([padded, k], [padded, padded], positions, 3)
    with pytest.raises(ValueError, match="keys and values for each layer, got 2 and 1"):
        layers.new_stage_cache([padded, padded], [padded], positions, 3)


@pytest.fixture(scope="module")
def xla_model(tiny_checkpoints):
    """The tiny-gqa checkpoint (and its CLIP text tower) loaded with XLA's fused attention."""
    ckpt = tiny_checkpoints("tiny-gqa")
    return ckpt, load_checkpoint(ckpt.directory, text_tower=ckpt.clip_directory, attention="xla")[1]


def test_vision_tower_with_xla_attention_equals_einsum(xla_model):
    ckpt, model = xla_model
    assert model.config.vision.attention == "xla" and ckpt.jax_model.config.vision.attention == "einsum"
    pixels = jnp.asarray(random_pixels(np.random.default_rng(3), 2, model.config.vision.image_size))
    einsum, readout = ckpt.jax_model.encode_images(pixels, -2)
    fused, fused_readout = model.encode_images(pixels, -2)
    scale = np.abs(np.asarray(einsum)).max()
    np.testing.assert_allclose(np.asarray(fused), np.asarray(einsum), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(
        np.asarray(fused_readout.cls_attention), np.asarray(readout.cls_attention), rtol=0, atol=1e-6
    )
    assert (
        fused_readout.keys.shape == readout.keys.shape and fused_readout.hidden.shape == readout.hidden.shape
    )
    np.testing.assert_allclose(
        np.asarray(fused_readout.keys), np.asarray(readout.keys), rtol=0, atol=1e-5 * scale
    )


@pytest.mark.parametrize("method", ["adaptprune", "pyramiddrop"])
def test_decode_with_xla_attention_equals_einsum_over_padded_pruned_caches(xla_model, method):
    """Decoding steps from one padded batch's caches: prompts of different lengths (padding inside a
    row's cache, before its decoded tokens; the layers before the first stage are unpruned), pruned with
    gaps in the positions (AdaptPrune) or over several runs of layers with their own numbering
    (PyramidDrop). The fused decode attention takes the position rule's mask as it is, so it gives
    einsum's logits at every step."""
    ckpt, model = xla_model
    rng = np.random.default_rng(5)
    prompts = [make_prompt(ckpt.config, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1))]
    pixels = random_pixels(rng, len(prompts), ckpt.config.vision.image_size)
    pruning = small_model_config(method, keep=64, layer=2)
    steps = 3
    batch = batch_for(ckpt, prompts, pixels, pruning, max_new_tokens=steps)
    prefill = ckpt.runner.prefill(batch, extra_slots=steps, pruning=pruning)
    if method == "pyramiddrop":
        assert len(prefill.caches) > 2 and any(np.asarray(c["shift"]).any() for c in prefill.caches)
    prompt_slots = np.asarray(prefill.caches[0]["positions"])[:, :-steps]  # the decode slots are empty anyway
    assert (prompt_slots < 0).any()  # padding inside a row's cache, to get wrong
    decode = nnx.jit(lambda m, *args: m.language_model.decode(*args))
    models = {"einsum": ckpt.jax_model, "xla": model}
    assert models["xla"].config.text.attention == "xla" and models["einsum"].config.text.attention == "einsum"
    caches = {name: prefill.caches for name in models}
    tokens = jnp.argmax(prefill.logits, axis=-1).astype(jnp.int32)
    for step in range(steps):
        logits = {}
        for name, m in models.items():
            logits[name], caches[name] = decode(m, tokens, prefill.next_positions + step, caches[name])
        scale = np.abs(np.asarray(logits["einsum"])).max()
        np.testing.assert_allclose(
            np.asarray(logits["xla"]),
            np.asarray(logits["einsum"]),
            rtol=0,
            atol=1e-5 * scale,
            err_msg=str(step),
        )
        tokens = jnp.argmax(logits["einsum"], axis=-1).astype(jnp.int32)
