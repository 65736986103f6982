"""PyramidDrop inside the Flax LLaVA against its PyTorch reference (written from the released code) on
transformers' LLaVA with the same weights: the kept tokens after every stage, the logits of the
renumbered sequence, greedy decoding that continues each layer's own numbering, and its schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adaptprune_jax as prune
from models import torch_reference
from models.generate import SamplingConfig
from tests.helpers import make_prompt, random_pixels

MAX_REL_ERR = 1e-5
LAYERS = (1, 2, 3)  # the 4-layer tiny model: a stage before each of its last three layers


@pytest.mark.parametrize("keep", [64, 9])
def test_kept_tokens_and_logits_match_the_pytorch_reference(tiny_checkpoints, prompt_rng, keep):
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=9, after=17)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("pyramiddrop", keep=keep, layers=LAYERS)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    result = ckpt.runner.prefill(batch, pruning=pruning, all_logits=True)

    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    stages = torch_reference.staged_selection(ckpt.torch_model, ids_t, pixels_t, pruning)
    assert [(layer, len(kept)) for layer, kept in stages] == list(
        pruning.stages(ckpt.config.num_image_tokens, ckpt.config.text.num_layers)
    )
    np.testing.assert_array_equal(np.asarray(result.kept[0]), stages[-1][1].numpy())
    reference = torch_reference.staged_forward(
        ckpt.torch_model, ids_t, pixels_t, stages, renumber_positions=True
    )
    valid = np.asarray(result.positions[0]) >= 0
    np.testing.assert_array_equal(np.asarray(result.positions[0])[valid], np.arange(valid.sum()))
    ours, reference = np.asarray(result.logits[0])[valid], reference[0].numpy()
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() / np.abs(reference).max() <= MAX_REL_ERR


def test_decoding_continues_each_layers_own_numbering(tiny_checkpoints, prompt_rng):
    """Layers before a stage numbered the full prompt, later ones a shorter one: a new token takes the
    next position of each layer's own sequence, as rerunning the reference on prompt + tokens gives."""
    ckpt = tiny_checkpoints("tiny-gqa")
    ids = make_prompt(ckpt.config, prompt_rng, before=4, after=12)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    pruning = prune.make_config("pyramiddrop", keep=16, layers=LAYERS)
    new_tokens = 8
    sampling = SamplingConfig(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=ckpt.pad_token_id)
    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id, max_new_tokens=new_tokens)
    ours = ckpt.runner.generate(batch, sampling, pruning=pruning).tokens[0].tolist()

    pixels_t = torch.tensor(pixels)
    stages = torch_reference.staged_selection(ckpt.torch_model, torch.tensor([ids]), pixels_t, pruning)
    reference = torch_reference.staged_generate(
        ckpt.torch_model,
        torch.tensor([ids]),
        pixels_t,
        stages,
        max_new_tokens=new_tokens,
        eos_token_id=-1,
        renumber_positions=True,
    )
    assert ours == reference


def test_the_released_schedule_and_bad_layers():
    config = prune.make_config("pyramiddrop", keep=72)
    assert config.stages(576, 32) == ((8, 288), (16, 144), (24, 72))  # the released 0.5 / 0.25 / 0.125
    assert config.stages(576, 4) == ((1, 288), (2, 144), (3, 72))
    assert config.equivalent_tokens(576, 32) == 270.0
    assert prune.make_config("pyramiddrop", keep=64, layers=(2, 8, 16)).stages(576) == (
        (2, 276),
        (8, 133),
        (16, 64),
    )  # 576 (1/9)^(s/3)
    with pytest.raises(ValueError, match="layers must increase from >= 1"):
        prune.make_config("pyramiddrop", layers=(8, 8))
    with pytest.raises(ValueError, match="out of range"):
        prune.make_config("pyramiddrop", keep=64, layers=(8, 16, 24)).validate(576, 16)
    with pytest.raises(ValueError, match="follow the LLM's depth"):
        prune.make_config("pyramiddrop", keep=64).stages(576)
