"""DART inside the Flax LLaVA against its PyTorch reference (the released loop, Python sets included)
on transformers' LLaVA with the same weights: CPython's set order, the batched library selection on
random inputs, the kept tokens and logits of the tiny checkpoint, and the settings it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import adaptprune_jax as prune
from adaptprune_jax.methods.dart import set_iteration_order
from models import torch_reference
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5


@pytest.mark.parametrize("count, high", [(8, 700), (8, 40), (5, 20), (12, 3000), (3, 9)])
def test_set_iteration_order_is_cpythons(count, high):
    rng = np.random.default_rng(count * high)
    rows = np.stack([rng.choice(high, size=count, replace=False) for _ in range(300)]).astype(np.int32)
    order = np.asarray(jax.jit(set_iteration_order)(jnp.asarray(rows)))
    for row, row_order in zip(rows, order):
        assert row[row_order].tolist() == list(set(row.tolist()))


def _random_view(rng, batch, length, start, num_image, heads, kv_heads, dim):
    slots = np.broadcast_to(np.arange(start, start + num_image, dtype=np.int32), (batch, num_image))
    keys = rng.normal(size=(batch, length, kv_heads, 4)).astype(np.float32)
    return prune.LayerViewArrays(
        rng.normal(size=(batch, length, heads, 4)).astype(np.float32),
        keys,
        rng.normal(size=(batch, length, dim)).astype(np.float32),
        np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        slots.copy(),
    )


@pytest.mark.parametrize("keep, pivots", [(36, (4, 4)), (40, (4, 4)), (29, (2, 3)), (5, (0, 3))])
def test_batched_selection_equals_the_released_loop_on_random_inputs(keep, pivots):
    rng = np.random.default_rng(keep)
    batch, length, start, num_image = 3, 160, 20, 128
    view = _random_view(rng, batch, length, start, num_image, heads=4, kv_heads=2, dim=16)
    config = prune.make_config("dart", keep=keep, pivot_image_tokens=pivots[0], pivot_text_tokens=pivots[1])
    kept = np.asarray(jax.jit(config.select, static_argnums=1)(prune.Cues(view=view), keep))
    assert kept.shape == (batch, keep) and np.all(np.diff(kept, axis=1) > 0)
    for row in range(batch):
        reference = torch_reference.reference_select(
            "dart",
            keep=keep,
            pivot_image_tokens=pivots[0],
            pivot_text_tokens=pivots[1],
            layer_keys=np.repeat(view.keys[row], 2, axis=1).reshape(length, -1),
            normed_hidden=view.hidden[row],
            image_positions=np.arange(start, start + num_image),
        )
        np.testing.assert_array_equal(kept[row], reference)


@pytest.mark.parametrize("keep", [68, 100])  # the released budget 64 exactly, and a remainder of 4
def test_kept_tokens_and_logits_match_the_pytorch_reference(tiny_checkpoints, prompt_rng, keep):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=6, after=14)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("dart", keep=keep)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)
    kept = np.array(result.kept[0])

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    cues = torch_reference.layer_reference_cues(ckpt.torch_model, ids_t, pixels_t, pruning.layer)
    reference_kept = torch_reference.reference_select("dart", keep=keep, **cues)
    np.testing.assert_array_equal(kept, reference_kept)

    reference = torch_reference.pruned_forward(
        ckpt.torch_model, ids_t, pixels_t, layer=pruning.layer, kept_image_indices=kept
    )[0].numpy()
    valid = np.asarray(result.positions[0]) >= 0
    ours = np.asarray(result.logits[0])[valid]
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_per_pivot_shares_and_refused_settings():
    config = prune.make_config("dart", keep=68)
    assert config.per_pivot(68) == [8] * 8  # the released budget 64: 4 pivots + 8 x 8
    assert config.per_pivot(64) == [8, 8, 8, 8, 7, 7, 7, 7]
    with pytest.raises(ValueError, match="too small"):
        prune.make_config("dart", keep=3).resolve_keep(576)
    with pytest.raises(ValueError, match="not both 0"):
        prune.make_config("dart", pivot_image_tokens=0, pivot_text_tokens=0)
    with pytest.raises(ValueError, match="pivot_text_tokens must be an int"):
        prune.make_config("dart", pivot_text_tokens=2.5)
