"""Pruning inside the Flax LLaVA at layer K, against the PyTorch reference on the same weights.

The reference (models/torch_reference.py) computes the cues and the selection the way the released
PyTorch code does, and runs the pruned forward on transformers' modules with original positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adaptprune_jax as prune
from models import torch_reference
from models.generate import SamplingConfig
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5


def _prefill(ckpt, prompts, pixels, pruning=None, all_logits=True):
    batch = ckpt.runner.make_batch(prompts, pixels, pad_token_id=ckpt.pad_token_id)
    return ckpt.runner.prefill(batch, pruning=pruning, all_logits=all_logits)


@pytest.mark.parametrize("method", ["adaptprune", "fastv"])
@pytest.mark.parametrize("keep", [0.25, 0.1])
def test_pruned_logits_and_selection_match_pytorch_reference(tiny_checkpoints, prompt_rng, method, keep):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=10, after=25)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config(method, keep=keep, layer=2)
    result = _prefill(ckpt, [ids], pixels, pruning)
    kept = np.array(result.kept[0])
    assert kept.shape == (pruning.resolve_keep(ckpt.config.num_image_tokens),)

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    _, cues = torch_reference.pruned_forward(ckpt.torch_model, ids_t, pixels_t, layer=2, return_cues=True)
    reference_kept = torch_reference.reference_select(
        method, keep=kept.size, attention=cues.attention, keys=cues.keys
    )
    np.testing.assert_array_equal(kept, reference_kept)

    reference = torch_reference.pruned_forward(
        ckpt.torch_model, ids_t, pixels_t, layer=2, kept_image_indices=kept
    )[0].numpy()
    valid = np.asarray(result.positions[0]) >= 0
    ours = np.asarray(result.logits[0])[valid]
    assert (
        ours.shape
        == reference.shape
        == (len(ids) - ckpt.config.num_image_tokens + kept.size, reference.shape[1])
    )
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_keeping_every_image_token_equals_the_unpruned_model(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny")
    ids = make_prompt(ckpt.config, prompt_rng, before=4, after=9)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    unpruned = _prefill(ckpt, [ids], pixels)
    everything = _prefill(
        ckpt, [ids], pixels, prune.make_config("adaptprune", keep=ckpt.config.num_image_tokens)
    )
    np.testing.assert_array_equal(np.asarray(everything.kept[0]), np.arange(ckpt.config.num_image_tokens))
    np.testing.assert_allclose(np.asarray(everything.logits), np.asarray(unpruned.logits), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_pruned_generation_matches_reference_and_continues_at_original_positions(
    tiny_checkpoints, prompt_rng
):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=6, after=20)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("adaptprune", keep=0.1, layer=2)
    result = _prefill(ckpt, [ids], pixels, pruning, all_logits=False)
    assert int(result.next_positions[0]) == len(ids)  # original length, not the pruned length
    new_tokens = 12
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id, max_new_tokens=new_tokens)
    ours = ckpt.runner.generate(batch, sampling, pruning=pruning)
    reference = torch_reference.reference_generate(
        ckpt.torch_model,
        torch.tensor([ids]),
        torch.tensor(pixels),
        layer=2,
        kept_image_indices=np.array(ours.kept[0]),
        max_new_tokens=new_tokens,
        eos_token_id=-1,
    )
    assert ours.tokens[0].tolist() == reference


def test_divprune_renumbers_positions_like_a_shorter_prompt(tiny_checkpoints, prompt_rng):
    """Released DivPrune cuts image features before the LLM: transformers on the gathered embeddings."""
    ckpt = tiny_checkpoints("tiny")
    ids = make_prompt(ckpt.config, prompt_rng, before=5, after=11)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    result = _prefill(ckpt, [ids], pixels, prune.make_config("divprune", keep=0.1))
    kept = np.array(result.kept[0])
    start = ids.index(ckpt.config.image_token_index)
    sequence = [
        i
        for i in range(len(ids))
        if not start <= i < start + ckpt.config.num_image_tokens or (i - start) in set(kept.tolist())
    ]
    with torch.no_grad():
        embeds = torch_reference.embed_inputs(ckpt.torch_model, torch.tensor([ids]), torch.tensor(pixels))
        reference = ckpt.torch_model(inputs_embeds=embeds[:, sequence]).logits[0].numpy()
    valid = np.asarray(result.positions[0]) >= 0
    np.testing.assert_array_equal(np.asarray(result.positions[0])[valid], np.arange(len(sequence)))
    assert int(result.next_positions[0]) == len(sequence)
    ours = np.asarray(result.logits[0])[valid]
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR
