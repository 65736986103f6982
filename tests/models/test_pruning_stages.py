"""Several pruning stages through the one driver, against the PyTorch reference pruning stage by stage."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import torch

import adaptprune_jax as prune
from models import torch_reference
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5


@dataclasses.dataclass(frozen=True)
class TwoStageFixed(prune.PruneConfig):
    """Prunes to every 3rd image token before layer 1, then to every 2nd of those before layer 3."""

    name: ClassVar[str] = "two_stage_fixed"

    def stages(self, num_image_tokens, num_layers=None):
        first = len(range(0, num_image_tokens, 3))
        return (prune.Stage(1, first), prune.Stage(3, len(range(0, first, 2))))

    def select(self, cues, keep):
        batch, num_tokens = cues.batch_and_tokens()
        step = 3 if cues.stage == 0 else 2
        return jnp.broadcast_to(jnp.arange(0, num_tokens, step, dtype=jnp.int32)[:keep], (batch, keep))


def test_two_stages_match_the_reference_and_compose_kept_indices(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny")
    ids = make_prompt(ckpt.config, prompt_rng, before=5, after=7)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = TwoStageFixed(keep=1.0)
    pruning.validate(ckpt.config.num_image_tokens, ckpt.config.text.num_layers)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)

    first = np.arange(0, ckpt.config.num_image_tokens, 3)
    second = first[::2]
    np.testing.assert_array_equal(np.asarray(result.kept[0]), second)  # indices into the original span
    # One cache per run of layers between stages (layers 0 | 1-2 | 3), each run's layers alike.
    assert [len(cache["k"]) for cache in result.caches] == [1, 2, 1]
    slots = [{k.shape[1] for k in cache["k"]} | {cache["positions"].shape[1]} for cache in result.caches]
    text = len(ids) - ckpt.config.num_image_tokens
    without_image = batch.input_ids.shape[1] - ckpt.config.num_image_tokens
    assert slots[0] == {batch.input_ids.shape[1]} and batch.input_ids.shape[1] >= len(ids)
    assert slots[1] == {without_image + first.size} and slots[2] == {without_image + second.size} and text > 0

    reference = torch_reference.staged_forward(
        ckpt.torch_model, torch.tensor([ids]), torch.tensor(pixels), [(1, first), (3, second)]
    )[0].numpy()
    valid = np.asarray(result.positions[0]) >= 0
    ours = np.asarray(result.logits[0])[valid]
    assert ours.shape == reference.shape == (text + second.size, reference.shape[1])
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_equivalent_tokens_sum_the_stages():
    config = TwoStageFixed(keep=1.0)
    # 1 layer at 576, 2 layers at 192, then 1 layer at 96 of a 4-layer model.
    assert config.equivalent_tokens(576, 4) == (576 + 2 * 192 + 96) / 4
