"""The cues the driver computes on request, against transformers' own attention maps (eager, float32):
the vision tower's [CLS] attention (VisionZip-style) and the text queries' attention rows (SparseVLM-style)."""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import torch

import adaptprune_jax as prune
from tests.helpers import make_prompt, random_pixels

KEEP = 48


@dataclasses.dataclass(frozen=True)
class ClsTopK(prune.PruneConfig):
    """The image tokens the vision tower's [CLS] attends to most at hidden_states[-2]."""

    name: ClassVar[str] = "cls_topk"

    def cue_requests(self):
        return (prune.VisionClsAttention(layer=-2),)

    def select(self, cues, keep):
        return prune.topk_select(cues.require("vision_attention", self.name), keep)


@dataclasses.dataclass(frozen=True)
class TextRaters(prune.PruneConfig):
    """The image tokens the prompt's text tokens attend to most at layer K - 1, on average."""

    name: ClassVar[str] = "text_raters"

    def cue_requests(self):
        return (prune.QueryAttention(),)

    def select(self, cues, keep):
        rows, mask = cues.require("query_attention", self.name), cues.require("query_mask", self.name)
        mean = jnp.sum(jnp.where(mask[:, :, None], rows, 0.0), axis=1) / jnp.sum(mask, axis=1, keepdims=True)
        return prune.topk_select(mean, keep)


def _torch_top(scores: torch.Tensor) -> np.ndarray:
    return np.sort(torch.sort(scores, descending=True, stable=True).indices[:KEEP].numpy())


def test_requested_cues_equal_the_torch_attention_maps(tiny_checkpoints, prompt_rng):
    ckpt = tiny_checkpoints("tiny")
    ids = make_prompt(ckpt.config, prompt_rng, before=6, after=8)
    pixels = random_pixels(prompt_rng, 1, ckpt.config.vision.image_size)
    eager = copy.deepcopy(ckpt.torch_model)
    eager.set_attn_implementation("eager")
    ids_t, pixels_t = torch.tensor([ids]), torch.tensor(pixels)
    with torch.no_grad():
        vision = eager.model.vision_tower(pixels_t, output_attentions=True).attentions
        language = eager(input_ids=ids_t, pixel_values=pixels_t, output_attentions=True).attentions
    is_image = ids_t[0] == ckpt.config.image_token_index

    # hidden_states[-2] of a 3-layer tower is the output of its 2nd layer: attentions[1].
    cls_attention = vision[-2][0, :, 0, 1:].mean(dim=0)
    # Layer K - 1 = 1 for pruning before layer 2; text rows over the image columns, head mean.
    text_rows = language[1][0].mean(dim=0)[~is_image][:, is_image].mean(dim=0)

    batch = ckpt.runner.make_batch([ids], pixels, pad_token_id=ckpt.pad_token_id)
    for config, expected in (
        (ClsTopK(keep=KEEP, layer=2), cls_attention),
        (TextRaters(keep=KEEP, layer=2), text_rows),
    ):
        kept = np.asarray(ckpt.runner.prefill(batch, pruning=config).kept[0])
        np.testing.assert_array_equal(kept, _torch_top(expected.float()))
