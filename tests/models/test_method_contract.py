"""Every registered method inside the Flax LLaVA, parametrized over the registry: keeping every image
token gives the unpruned logits, and a pruned batch of prompts of different lengths equals its rows
run one by one (kept tokens, first-token logits and the generated tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from adaptprune_jax import methods
from models.generate import SamplingConfig
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


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in methods.names() if not methods.get(n).takes_seed])
def test_pruned_batch_equals_rows_one_by_one(tiny_checkpoints, name):
    """Four prompts of different lengths (grouped-query attention, a sharded checkpoint) in one
    padded batch, and each alone."""
    ckpt = tiny_checkpoints("tiny-gqa")
    rng = np.random.default_rng(1234)
    prompts = [make_prompt(ckpt.config, rng, b, a) for b, a in ((2, 5), (14, 30), (7, 1), (25, 12))]
    pixels = random_pixels(rng, len(prompts), ckpt.config.vision.image_size)
    pruning = small_model_config(name, keep=64, layer=2)
    # (Questions for a method that reads them through CLIP's text tower: one to three segments.)
    queries = make_queries(ckpt, rng, [3, 40, 9, 20])
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
