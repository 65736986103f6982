"""Every registered method inside the Flax LLaVA, parametrized over the registry: keeping every image
token gives the unpruned logits; a pruned batch of prompts of different lengths equals its rows run
one by one (kept tokens, first-token logits and the generated tokens); and the fused attention path
(XLA's `jax.nn.dot_product_attention`, the call that runs cuDNN on a GPU) gives that batch's einsum
results, because every sequence the pruning driver feeds a layer holds its real tokens as a prefix of
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
from models.generate import LlavaRunner, SamplingConfig
from tests.helpers import batch_for, make_prompt, make_queries, random_pixels, small_model_config


def _last_logits(ckpt, prompts, pixels, pruning):
    batch = batch_for(ckpt, prompts, pixels, pruning)
    result = ckpt.runner.prefill(batch, pruning=pruning)
    return np.asarray(result.logits), None if result.kept is None else np.asarray(result.kept)


@pytest.fixture(scope="module")
def inputs(tiny_checkpoints):
    ckpt = tiny_checkpoints("tiny")
    rng = np.random.default_rng(7)
    prompts = [
        make_prompt(ckpt.config, rng, before=3, after=6),
        make_prompt(ckpt.config, rng, before=9, after=2),
    ]
    pixels = random_pixels(rng, 2, ckpt.config.vision.image_size)
    unpruned, _ = _last_logits(ckpt, prompts, pixels, None)
    return ckpt, prompts, pixels, unpruned


UNPRUNED = "none"


def _builds_tokens(name) -> bool:
    return methods.get(name).merges or methods.get(name).merges_in_llm


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in methods.names() if not _builds_tokens(n)])
def test_keeping_every_token_equals_unpruned(inputs, name):
    """(Methods that merge build tokens of their own, so keeping all of them is not the unpruned
    input; one that merges inside the LLM prunes and merges at least one token at every stage.)"""
    ckpt, prompts, pixels, unpruned = inputs
    pruning = small_model_config(name, keep=1.0, layer=2)
    logits, kept = _last_logits(ckpt, prompts, pixels, pruning)
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(ckpt.config.num_image_tokens), kept.shape))
    np.testing.assert_allclose(logits, unpruned, rtol=0, atol=1e-5 * np.abs(unpruned).max())


NEW_TOKENS = 6


def _generate(ckpt, prompts, pixels, pruning, queries):
    """(first-token logits, kept indices, generated tokens) of one batch, greedy."""
    runner = ckpt.runner
    batch = batch_for(ckpt, prompts, pixels, pruning, max_new_tokens=NEW_TOKENS, queries=queries)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    generated = runner.generate(batch, sampling, pruning=pruning)
    # The prefill generate ran (same shapes and settings: the compiled program is reused), for its logits.
    logits = runner.prefill(batch, extra_slots=NEW_TOKENS, pruning=pruning).logits
    return np.asarray(logits), generated.kept, generated.tokens


def _padded_batch(ckpt):
    """Four prompts of different lengths, their images, and questions for a method that reads them
    through CLIP's text tower (one to three segments)."""
    rng = np.random.default_rng(1234)
    prompts = [make_prompt(ckpt.config, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1), (25, 12))]
    pixels = random_pixels(rng, len(prompts), ckpt.config.vision.image_size)
    return prompts, pixels, make_queries(ckpt, rng, [3, 40, 9, 20])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in methods.names() if not methods.get(n).takes_seed])
def test_pruned_batch_equals_rows_one_by_one(tiny_checkpoints, name):
    """Four prompts of different lengths (grouped-query attention, a sharded checkpoint) in one
    padded batch, and each alone."""
    ckpt = tiny_checkpoints("tiny-gqa")
    prompts, pixels, queries = _padded_batch(ckpt)
    pruning = small_model_config(name, keep=64, layer=2)
    logits, kept, tokens = _generate(ckpt, prompts, pixels, pruning, queries)
    # A merging method reports the image tokens it passed through unchanged, fewer than it keeps.
    keep = pruning.resolve_keep(ckpt.config.num_image_tokens)
    assert kept.shape[0] == len(prompts) and (pruning.merges or kept.shape[1] == keep)
    assert tokens.shape == (len(prompts), NEW_TOKENS)
    for row in range(len(prompts)):
        one_logits, one_kept, one_tokens = _generate(
            ckpt, prompts[row : row + 1], pixels[row : row + 1], pruning, queries[row : row + 1]
        )
        np.testing.assert_array_equal(one_kept[0], kept[row])
        np.testing.assert_allclose(one_logits[0], logits[row], rtol=0, atol=1e-5 * np.abs(logits).max())
        assert one_tokens[0].tolist() == tokens[row].tolist()


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


def _prefill_outputs(runner, ckpt, prompts, pixels, pruning, queries):
    """(first-token logits, kept indices, every layer's cached k and v at its real slots) of one padded
    batch. Decoding runs einsum attention over these caches in both models, so equal caches and logits
    give equal greedy tokens; the caches say so more strictly, without compiling a decode loop."""
    batch = batch_for(ckpt, prompts, pixels, pruning, max_new_tokens=NEW_TOKENS, queries=queries)
    result = runner.prefill(batch, extra_slots=NEW_TOKENS, pruning=pruning)
    cached = [
        np.where((np.asarray(cache["positions"]) >= 0)[..., None, None], np.asarray(layer_cache), 0.0)
        for cache in result.caches
        for name in ("k", "v")
        for layer_cache in cache[name]
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
    prompts, pixels, queries = _padded_batch(ckpt)  # the batch above: its einsum prefill is compiled
    pruning = None if name == UNPRUNED else small_model_config(name, keep=64, layer=2)
    einsum = _prefill_outputs(ckpt.runner, ckpt, prompts, pixels, pruning, queries)

    fed: list[np.ndarray] = []
    original = layers.self_attention

    def garbage_in_padding_rows(q, k, v, implementation, positions=None, *args, **kwargs):
        jax.debug.callback(lambda p: fed.append(np.asarray(p)), positions)
        out = original(q, k, v, implementation, positions, *args, **kwargs)
        noise = 1e3 * jax.random.normal(jax.random.key(len(fed)), out.shape, out.dtype)
        return jnp.where(positions[:, :, None] >= 0, out, noise)

    monkeypatch.setattr(llama, "self_attention", garbage_in_padding_rows)
    fused = _prefill_outputs(
        LlavaRunner(model), ckpt, prompts, pixels, pruning, queries
    )  # traced under the patch

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
