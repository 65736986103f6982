"""The Flax LLaVA against transformers' PyTorch LLaVA on the same checkpoint (float32, CPU).

Covers the three on-disk variants (single file, sharded, newer key spelling), grouped-query
attention, the 'full' feature strategy, prompts past 600 positions, greedy generation, batching and
the prefill's bucketed compilation.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from models.generate import SamplingConfig
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5
PRESETS = ("tiny", "tiny-gqa", "tiny-full")


def max_rel_err(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_logits(ckpt, ids: list[int], pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return (
            ckpt.torch_model(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pixels))
            .logits[0]
            .numpy()
        )


@pytest.mark.parametrize("preset", PRESETS)
def test_prefill_logits_match_transformers(tiny_checkpoints, prompt_rng, preset):
    ckpt = tiny_checkpoints(preset)
    ids = make_prompt(ckpt.config, prompt_rng, before=12, after=30)
    assert len(ids) >= 600
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    ours = np.asarray(ckpt.runner.prefill(batch, all_logits=True).logits)[0, : len(ids)]
    reference = torch_logits(ckpt, ids, pixels)
    assert max_rel_err(ours, reference) <= MAX_REL_ERR
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_generation_matches_transformers_generate(tiny_checkpoints, prompt_rng, preset):
    ckpt = tiny_checkpoints(preset)
    ids = make_prompt(ckpt.config, prompt_rng, before=5, after=40)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    new_tokens = 20
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    ours = ckpt.runner.generate(
        ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id, max_new_tokens=new_tokens),
        sampling,
    )
    with torch.no_grad():
        reference = ckpt.torch_model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(pixels),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=ckpt.pad_token_id,
        )
    assert ours.tokens[0].tolist() == reference[0, len(ids) :].tolist()
    assert ours.num_generated[0] == new_tokens


@pytest.mark.slow
def test_batch_of_different_lengths_equals_one_by_one(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny-gqa")
    prompts = [
        make_prompt(ckpt.config, prompt_rng, before, after) for before, after in ((3, 7), (20, 30), (9, 2))
    ]
    pixels = random_pixels(prompt_rng, len(prompts), ckpt.config.vision.image_size)
    sampling = SamplingConfig(max_new_tokens=12, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    batch = ckpt.runner.make_batch(prompts, pixels, pad_token_id=ckpt.pad_token_id, max_new_tokens=12)
    batched = ckpt.runner.generate(batch, sampling)
    # First-token logits from the prefill generate ran (same shapes and settings: no new compilation).
    batched_logits = np.asarray(ckpt.runner.prefill(batch, extra_slots=12).logits)
    for row, ids in enumerate(prompts):
        single_batch = ckpt.runner.make_batch(
            [ids], pixels[row : row + 1], pad_token_id=ckpt.pad_token_id, max_new_tokens=12
        )
        single = ckpt.runner.generate(single_batch, sampling)
        assert batched.tokens[row].tolist() == single.tokens[0].tolist()
        single_logits = np.asarray(ckpt.runner.prefill(single_batch, extra_slots=12).logits)[0]
        np.testing.assert_allclose(batched_logits[row], single_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_bucketed_prompt_lengths_share_one_compilation(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny")
    runner, size = ckpt.runner, ckpt.config.vision.image_size
    pixels = random_pixels(prompt_rng, 1, size)
    base = len(make_prompt(ckpt.config, prompt_rng, 1, 0))
    bucket_end = -(-base // runner.length_bucket) * runner.length_bucket
    room = bucket_end - base  # prompts from base to bucket_end all land in one bucket
    assert room >= 3, "test needs a few free slots in the bucket"

    def prefill_with(extra_words: int):
        ids = make_prompt(ckpt.config, prompt_rng, 1, extra_words)
        runner.prefill(runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id), extra_slots=3)

    before = runner.trace_counts["prefill"]
    for extra in (0, 1, room // 2, room):
        prefill_with(extra)
    assert runner.trace_counts["prefill"] == before + 1  # four lengths, one compilation
    prefill_with(room + 1)  # next bucket
    assert runner.trace_counts["prefill"] == before + 2


def test_swapped_weights_reuse_the_compiled_prefill_and_must_match_the_structure(
    tiny_checkpoints, prompt_rng
):
    ckpt = tiny_checkpoints("tiny")
    runner = ckpt.runner
    ids = make_prompt(ckpt.config, prompt_rng, 2, 3)
    batch = runner.make_batch(
        [ids], random_pixels(prompt_rng, 1, ckpt.config.vision.image_size), pad_token_id=ckpt.pad_token_id
    )
    original = runner.weights
    assert isinstance(original, tuple) and all(isinstance(w, jax.Array) for w in original)
    base = np.asarray(runner.prefill(batch).logits)
    traces = runner.trace_counts["prefill"]
    try:
        runner.state = jax.tree.map(lambda w: w * 2, runner.state)  # through the nnx.State, paths and all
        doubled = np.asarray(runner.prefill(batch).logits)
    finally:
        runner.weights = original
    assert runner.trace_counts["prefill"] == traces  # same structure: the compiled prefill is reused
    assert np.abs(doubled - base).max() > 1e-3  # ...and it did run on the new weights
    np.testing.assert_array_equal(np.asarray(runner.prefill(batch).logits), base)
    with pytest.raises(ValueError, match="structure differs"):  # 3 LLM layers, not 4
        runner.flatten_weights(tiny_checkpoints("tiny-full").runner.state)
    with pytest.raises(
        ValueError,
        match=r"weight \['language_model'\]\['embed_tokens'\].* is float32\[128, 128\]; "
        r"this runner's model has float32\[128, 64\]",
    ):  # same tree, wider
        runner.flatten_weights(tiny_checkpoints("tiny-gqa").runner.state)


@pytest.fixture
def small_attention_budget():
    """A 1 MiB attention-logits budget while the test traces (the tiny models' 600-token prompts split)."""
    from models import layers

    old = layers.set_attention_logits_budget(1 << 20)
    yield 1 << 20
    layers.set_attention_logits_budget(old)


def test_chunked_attention_equals_one_piece(small_attention_budget):
    """Query chunks (uneven: padded, then cut) give the one-piece result, with a position mask that has
    padding rows and grouped-query heads, and without a mask (the CLIP tower)."""
    import jax
    import jax.numpy as jnp

    from models import layers

    rng = np.random.default_rng(0)
    batch, q_len, k_len, heads, kv_heads, head_dim = 2, 301, 301, 8, 2, 16
    q = jnp.asarray(rng.standard_normal((batch, q_len, heads, head_dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((batch, k_len, kv_heads, head_dim)), jnp.float32) for _ in range(2)
    )
    positions = jnp.asarray(
        np.where(np.arange(q_len)[None] < np.array([[q_len], [250]]), np.arange(q_len), -1)
    )
    mask = layers.attention_mask(positions, positions)
    chunks = layers.query_chunks(batch, heads, q_len, k_len)
    assert chunks > 1 and q_len % chunks  # split, unevenly
    assert layers.query_chunks(batch, heads, q_len, k_len, budget_bytes=1 << 40) == 1
    for m in (mask, None):
        chunked = jax.jit(layers.attend)(q, k, v, m)
        whole = jax.jit(layers._attend)(q, k, v, m)
        assert chunked.shape == whole.shape == (batch, q_len, heads * head_dim)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positive number of bytes"):
        layers.set_attention_logits_budget(0)


@pytest.mark.slow
def test_prefill_with_chunked_attention_matches_transformers(
    tiny_checkpoints, prompt_rng, small_attention_budget, monkeypatch
):
    """A fresh runner traced under a small budget runs every attention in query chunks (CLIP and LLaMA)
    and still matches transformers: the chunking is exact."""
    from models import layers
    from models.generate import LlavaRunner

    pieces = []
    one_piece = layers._attend
    monkeypatch.setattr(
        layers,
        "_attend",
        lambda q, k, v, mask: pieces.append((q.shape[1], k.shape[1])) or one_piece(q, k, v, mask),
    )
    ckpt = tiny_checkpoints("tiny-gqa")
    runner = LlavaRunner(ckpt.jax_model)
    ids = make_prompt(ckpt.config, prompt_rng, before=12, after=30)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    batch = runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    ours = np.asarray(runner.prefill(batch, all_logits=True).logits)[0, : len(ids)]
    # every traced self-attention (CLIP's 577 tokens, the LLM's prompt) ran on query chunks of its keys
    assert {k_len for _, k_len in pieces} >= {ckpt.config.vision.num_patches + 1}
    assert len({k_len for _, k_len in pieces}) == 2 and all(q_len < k_len for q_len, k_len in pieces)
    reference = torch_logits(ckpt, ids, pixels)
    assert max_rel_err(ours, reference) <= MAX_REL_ERR
