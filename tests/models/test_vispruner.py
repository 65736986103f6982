"""VisPruner inside the Flax LLaVA against its PyTorch reference (written from the released code) on
transformers' LLaVA with the same weights: the kept tokens, the logits of the shorter prompt, the
batched library selection against the reference on random inputs and on exactly tied full-size ones,
and the settings it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adaptprune_jax as prune
from models import torch_reference
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5


# The released selection is numerically chaotic in its diverse part: each of its ~60 matching rounds
# sorts ~270 cosine scores and splits the survivors by rank, so a 1e-7 difference in one score sends
# the later rounds elsewhere (the PyTorch reference itself, on the same cues in float32 and float64,
# keeps different diverse tokens). Index-exactness of the diverse tokens is therefore tested on
# identical cue values (below); inside the model, the cues are held to transformers' and the
# important tokens, which depend only on a well-separated attention order, to the reference's.
MIN_ATTENTION_GAP = 5e-9  # ten times the JAX-vs-PyTorch difference of the attention values (~4e-10)


def _separated_image(ckpt, pruning, seed):
    """Random pixels whose reference [CLS] attention has no two values closer than the gap (a random
    tiny tower's attention is nearly flat: 576 values within ~1e-3)."""
    for attempt in range(40):
        pixels = random_pixels(np.random.default_rng([seed, attempt]), 1, ckpt.config.vision.image_size)
        cues = torch_reference.vision_reference_cues(ckpt.torch_model, torch.tensor(pixels), pruning)
        if np.diff(np.sort(cues["vision_attention"].numpy())).min() > MIN_ATTENTION_GAP:
            return pixels, cues
    raise AssertionError("no test image with a well-separated [CLS] attention order")


@pytest.mark.parametrize("keep", [64, 128])
def test_cues_important_tokens_and_logits_match_the_pytorch_reference(tiny_checkpoints, prompt_rng, keep):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=6, after=14)
    pruning = prune.make_config("vispruner", keep=keep)
    pixels, cues = _separated_image(ckpt, pruning, keep)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)
    kept = np.array(result.kept[0])
    assert kept.shape == (keep,) and np.all(np.diff(kept) > 0)

    _, readout = ckpt.jax_model.encode_images(jnp.asarray(pixels), -2)
    ours = ckpt.jax_model.vision_cues(readout, ckpt.config.num_image_tokens)
    reference_attention, reference_features = (
        cues[name].numpy() for name in ("vision_attention", "vision_features")
    )
    attention = np.asarray(ours["vision_attention"][0])
    features = np.asarray(ours["vision_tokens"][0, 1:])
    assert np.abs(attention - reference_attention).max() <= 1e-6 * np.abs(reference_attention).max()
    assert np.abs(features - reference_features).max() <= 1e-5 * np.abs(reference_features).max()
    important, _ = pruning.split(keep, ckpt.config.num_image_tokens)
    reference_important = np.argsort(-reference_attention, kind="stable")[:important]
    assert set(reference_important.tolist()) <= set(kept.tolist())

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    reference = torch_reference.pruned_forward(
        ckpt.torch_model, ids_t, pixels_t, layer=0, kept_image_indices=kept, renumber_positions=True
    )[0].numpy()
    valid = np.asarray(result.positions[0]) >= 0
    ours = np.asarray(result.logits[0])[valid]
    assert (
        ours.shape == reference.shape == (len(ids) - ckpt.config.num_image_tokens + keep, reference.shape[1])
    )
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


@pytest.mark.parametrize("keep, ratio", [(64, 0.5), (96, 0.75), (40, 1.0)])
def test_batched_selection_equals_the_reference_on_random_inputs(keep, ratio):
    """Random features with near-duplicates (so the matching has work to do), three rows at once."""
    rng = np.random.default_rng(keep)
    batch, patches, width = 3, 144, 16
    base = rng.normal(size=(batch, 40, width))
    features = base[:, rng.integers(0, 40, size=patches)] + 0.05 * rng.normal(size=(batch, patches, width))
    tokens = np.concatenate([rng.normal(size=(batch, 1, width)), features], axis=1).astype(np.float32)
    attention = rng.dirichlet(np.ones(patches), size=batch).astype(np.float32)
    config = prune.make_config("vispruner", keep=keep, important_ratio=ratio)
    cues = prune.Cues(vision_attention=jnp.asarray(attention), vision_tokens=jnp.asarray(tokens))
    kept = np.asarray(jax.jit(config.select, static_argnums=1)(cues, keep))
    assert kept.shape == (batch, keep) and np.all(np.diff(kept, axis=1) > 0)
    for row in range(batch):
        reference = torch_reference.reference_select(
            "vispruner",
            keep=keep,
            important_ratio=ratio,
            vision_attention=attention[row],
            vision_features=tokens[row, 1:],
        )
        np.testing.assert_array_equal(kept[row], reference)


@pytest.mark.parametrize("keep", [64, 192])
def test_ties_resolve_as_the_reference_does_at_full_size(keep):
    """576 image tokens (LLaVA-1.5's), features with four +-1 entries: every cosine similarity is a
    multiple of 1/4, exact in float32 on both sides, so the ~60 matching rounds are full of exact ties
    and the kept tokens depend only on how each ranking breaks them, not on round-off."""
    rng = np.random.default_rng(keep)
    batch, patches, width, nonzero = 2, 576, 32, 4
    tokens = np.zeros((batch, 1 + patches, width), np.float32)
    for row in range(batch):
        for token in range(1 + patches):
            tokens[row, token, rng.choice(width, nonzero, replace=False)] = rng.choice([-1.0, 1.0], nonzero)
    attention = rng.integers(0, 5, size=(batch, patches)).astype(np.float32)  # tied attention too
    config = prune.make_config("vispruner", keep=keep)
    cues = prune.Cues(vision_attention=jnp.asarray(attention), vision_tokens=jnp.asarray(tokens))
    kept = np.asarray(jax.jit(config.select, static_argnums=1)(cues, keep))
    for row in range(batch):
        reference = torch_reference.reference_select(
            "vispruner", keep=keep, vision_attention=attention[row], vision_features=tokens[row, 1:]
        )
        np.testing.assert_array_equal(kept[row], reference)


def test_settings_the_released_matching_cannot_run_are_refused():
    with pytest.raises(ValueError, match="odd residual"):
        prune.make_config("vispruner", keep=65, important_ratio=0.6).validate(576, 32)  # 576 - 39
    with pytest.raises(ValueError, match="diverse=4 is too small"):
        prune.make_config("vispruner", keep=64, important_ratio=0.95).validate(576, 32)
    with pytest.raises(ValueError, match="important_ratio must be in"):
        prune.make_config("vispruner", important_ratio=1.5)
    assert prune.make_config("vispruner", keep=64).split(64, 576) == (32, 32)
