"""VisionZip inside the Flax LLaVA against its PyTorch reference (written from the released code) on
transformers' LLaVA with the same weights: the dominant tokens chosen, the merged tokens, the logits of
the shorter prompt, and the first generated tokens; plus the split of a budget and its errors."""

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


@pytest.mark.parametrize("keep", [64, 192, 11])
def test_tokens_logits_and_dominant_indices_match_the_pytorch_reference(tiny_checkpoints, prompt_rng, keep):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=8, after=20)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("visionzip", keep=keep)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)

    reference, reference_kept = torch_reference.merged_forward(
        ckpt.torch_model, torch.tensor([ids]), torch.tensor(pixels), pruning
    )
    dominant, _ = pruning.split(keep, ckpt.config.num_image_tokens)
    assert np.asarray(result.kept[0]).shape == (dominant,)
    np.testing.assert_array_equal(np.asarray(result.kept[0]), reference_kept.numpy())
    valid = np.asarray(result.positions[0]) >= 0
    np.testing.assert_array_equal(np.asarray(result.positions[0])[valid], np.arange(valid.sum()))
    ours, reference = np.asarray(result.logits[0])[valid], reference[0].numpy()
    assert (
        ours.shape == reference.shape == (len(ids) - ckpt.config.num_image_tokens + keep, reference.shape[1])
    )
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_merged_tokens_equal_the_reference_merge_on_random_inputs():
    """The library's merge alone, batched, on random cues: each row equals the torch transcription."""
    rng = np.random.default_rng(3)
    batch, patches, width, heads, head_dim, keep = 3, 100, 12, 4, 6, 40
    attentions = rng.dirichlet(np.ones(patches + 1), size=(batch, heads, patches + 1)).astype(np.float32)
    hidden = rng.normal(size=(batch, patches + 1, width)).astype(np.float32)
    keys = rng.normal(size=(batch, heads, patches + 1, head_dim)).astype(np.float32)
    config = prune.make_config("visionzip", keep=keep)
    cues = prune.Cues(
        vision_attention=jnp.asarray(attentions[:, :, 0, 1:].mean(axis=1)),
        vision_tokens=jnp.asarray(hidden),
        vision_keys=jnp.asarray(keys.mean(axis=1)),
    )
    merged = jax.jit(config.merge, static_argnums=1)(cues, keep)
    assert merged.features.shape == (batch, keep, width)
    for row in range(batch):
        tokens, kept = config.torch_reference_merge(
            torch.tensor(attentions[row]), torch.tensor(hidden[row]), torch.tensor(keys[row]), keep
        )
        np.testing.assert_array_equal(np.asarray(merged.kept[row]), kept.numpy())
        np.testing.assert_allclose(np.asarray(merged.features[row]), tokens.numpy(), rtol=1e-6, atol=1e-6)


def test_the_released_budgets_and_bad_splits():
    config = prune.make_config("visionzip", keep=64)
    assert [config.split(keep, 576) for keep in (64, 128, 192)] == [(53, 10), (107, 20), (161, 30)]
    assert prune.make_config("visionzip", keep=64, contextual=0).split(64, 576) == (63, 0)
    with pytest.raises(ValueError, match="no room for the \\[CLS\\] token"):
        prune.make_config("visionzip", keep=8, contextual=8).validate(576, 32)
    with pytest.raises(ValueError, match="contextual=-1 must be >= 0"):
        prune.make_config("visionzip", keep=8, contextual=-1)
    assert prune.make_config("visionzip", keep=64).equivalent_tokens(576, 32) == 64.0
