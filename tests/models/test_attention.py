"""The attention implementation option (`models.layers.self_attention`): `auto` resolution, a clear
error for an unknown name, and, on the CPU, the fused path's masking checked through XLA's
implementation of the same `jax.nn.dot_product_attention` call that runs cuDNN on a GPU: it equals
einsum in float32 on the vision tower and on the LLM prefill, padded and pruned, for every registered
method, because every sequence the pruning driver feeds a layer holds its real tokens as a prefix of
the slots with strictly increasing positions, and nothing reads a padding row's output."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptprune_jax import methods
from models import layers, llama
from models.checkpoint import load_checkpoint
from models.config import from_hf_config, with_attention
from models.generate import LlavaRunner
from tests.helpers import batch_for, make_prompt, make_queries, random_pixels, small_model_config

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


@pytest.fixture(scope="module")
def xla_prefill_model(tiny_checkpoints):
    """tiny-gqa with XLA's fused attention in the LLM prefill only: the vision tower stays einsum, so a
    selection that is chaotic in the vision tower's round-off (VisPruner's diverse half) gets the same
    cues on both sides, and what is compared is the prefill."""
    ckpt = tiny_checkpoints("tiny-gqa")
    model = load_checkpoint(ckpt.directory, text_tower=ckpt.clip_directory, attention="einsum")[1]
    text = dataclasses.replace(model.config.text, attention="xla")
    model.config = dataclasses.replace(model.config, text=text)
    model.language_model.cfg = text
    for layer in model.language_model.layers:
        layer.self_attn.cfg = text
    return ckpt, model


NEW_TOKENS = 4


def _run(runner, ckpt, prompts, pixels, pruning, queries):
    """(first-token logits, kept indices, every layer's cached k and v at its real slots) of one padded
    batch. Decoding runs einsum attention over these caches in both models, so equal caches and logits
    give equal greedy tokens; the caches say so more strictly, without compiling a decode loop."""
    batch = batch_for(ckpt, prompts, pixels, pruning, max_new_tokens=NEW_TOKENS, queries=queries)
    result = runner.prefill(batch, extra_slots=NEW_TOKENS, pruning=pruning)
    cached = [
        np.where((np.asarray(cache["positions"]) >= 0)[..., None, None], np.asarray(cache[name]), 0.0)
        for cache in result.caches
        for name in ("k", "v")
    ]
    kept = None if result.kept is None else np.asarray(result.kept)
    return np.asarray(result.logits), kept, cached


def _check_prefix_and_increasing(positions: np.ndarray, where: str) -> None:
    """In every row, the real tokens (position >= 0) fill the first slots and their positions increase
    strictly: then causal attention over each row's real count is the position rule."""
    for row, row_positions in enumerate(positions):
        count = int((row_positions >= 0).sum())
        assert (row_positions[:count] >= 0).all() and (row_positions[count:] < 0).all(), (
            f"{where}, row {row}: padding among the real tokens: {row_positions.tolist()}"
        )
        assert (np.diff(row_positions[:count]) > 0).all(), (
            f"{where}, row {row}: positions do not increase along the slots: {row_positions[:count].tolist()}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", [UNPRUNED, *methods.names()])
def test_fused_prefill_attention_is_exact_for_every_method(xla_prefill_model, monkeypatch, name):
    """Four prompts of different lengths in one right-padded batch, pruned by ``name`` (or not). The
    XLA-attention model's prefill, with every padding row of every layer's attention output replaced
    by large garbage (what any implementation may leave there), gives einsum's first-token logits,
    kept tokens and KV caches (so its greedy tokens), so no padding row is read; and every sequence the driver fed a
    layer had the form under which the fused path is the position rule."""
    ckpt, model = xla_prefill_model
    rng = np.random.default_rng(1234)
    prompts = [make_prompt(ckpt.config, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1), (25, 12))]
    pixels = random_pixels(rng, len(prompts), ckpt.config.vision.image_size)
    queries = make_queries(ckpt, rng, [3, 40, 9, 20])
    pruning = None if name == UNPRUNED else small_model_config(name, keep=64, layer=2)
    einsum = _run(ckpt.runner, ckpt, prompts, pixels, pruning, queries)

    fed: list[np.ndarray] = []
    original = layers.self_attention

    def garbage_in_padding_rows(q, k, v, implementation, positions=None, *args, **kwargs):
        jax.debug.callback(lambda p: fed.append(np.asarray(p)), positions)
        out = original(q, k, v, implementation, positions, *args, **kwargs)
        noise = 1e3 * jax.random.normal(jax.random.key(len(fed)), out.shape, out.dtype)
        return jnp.where(positions[:, :, None] >= 0, out, noise)

    monkeypatch.setattr(llama, "self_attention", garbage_in_padding_rows)
    fused = _run(LlavaRunner(model), ckpt, prompts, pixels, pruning, queries)  # traced under the patch

    assert fed, "the prefill fed no sequence to a layer's attention"
    for index, positions in enumerate(fed):
        _check_prefix_and_increasing(positions, f"{name}, attention call {index}")
    assert any((positions < 0).any() for positions in fed)  # padding was there to get wrong
    logits, kept, cached = einsum
    np.testing.assert_allclose(fused[0], logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    if kept is None:
        assert fused[1] is None
    else:
        np.testing.assert_array_equal(fused[1], kept)
    for fused_layer, layer in zip(fused[2], cached, strict=True):
        np.testing.assert_allclose(fused_layer, layer, rtol=0, atol=1e-5 * max(np.abs(layer).max(), 1.0))
