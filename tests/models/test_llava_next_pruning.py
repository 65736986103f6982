"""Pruning on LLaVA-NeXT's packed image span (tiny LLaMA, CPU float32): FastV and DivPrune select over
each row's base grid, high-resolution grid and newline tokens together, as their released LLaVA-NeXT
code does, and keep exactly what the PyTorch references keep; rows of different counts in one batch
(padded slots never kept), and keeping a row's every token gives its unpruned logits. The torch
reference has no sliding window, so the LLaMA preset serves."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

import adaptprune_jax as prune
from models import anyres
from models.preprocess import Preprocessor
from models.torch_reference import embed_inputs, pruned_forward, reference_select
from tests.models.test_model_parity import MAX_REL_ERR, max_rel_err

SIZES = ((1000, 300), (336, 336))  # (height, width): 2,232 and 1,176 image tokens, 4 and 3 crops
KEEP = 64


class Rows:
    def __init__(self, ckpt):
        self.ckpt = ckpt
        preprocessor = Preprocessor.from_checkpoint(ckpt.directory)
        rng = np.random.default_rng(1)
        images = [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]
        self.sizes = preprocessor.image_sizes(images)
        self.prompts = [
            preprocessor.encode(question, size)
            for question, size in zip(("is there a cat in the image", "how many dogs"), self.sizes)
        ]
        self.batch = ckpt.runner.make_batch(
            self.prompts,
            preprocessor.pixel_values(images),
            pad_token_id=ckpt.pad_token_id,
            image_sizes=self.sizes,
        )
        self.counts = np.asarray(self.batch.image_layout.valid).sum(axis=1)

    def torch_row(self, row):
        crops = anyres.num_crops(self.sizes[row], self.ckpt.config)
        ids = torch.tensor([self.prompts[row]])
        pixels = torch.tensor(self.batch.pixel_values[row : row + 1, :crops])
        sizes = torch.tensor(self.sizes[row : row + 1])
        return ids, pixels, embed_inputs(self.ckpt.torch_model, ids, pixels, sizes)

    def kept(self, pruning):
        result = self.ckpt.runner.prefill(self.batch, pruning=pruning)
        return np.asarray(result.kept), np.asarray(result.logits)


@pytest.fixture(scope="module")
def rows(tiny_checkpoints):
    return Rows(tiny_checkpoints("tiny-next"))


def test_fastv_keeps_the_references_tokens_over_the_packed_span(rows):
    kept, _ = rows.kept(prune.make_config("fastv", keep=KEEP, layer=2))
    for row in range(len(SIZES)):
        ids, pixels, embeds = rows.torch_row(row)
        _, cues = pruned_forward(
            rows.ckpt.torch_model, ids, pixels, layer=2, return_cues=True, inputs_embeds=embeds
        )
        assert cues.attention.shape[0] == rows.counts[row]  # newlines among the candidates
        np.testing.assert_array_equal(
            kept[row], reference_select("fastv", keep=KEEP, attention=cues.attention)
        )


def test_keeping_a_rows_every_token_gives_its_unpruned_logits(rows):
    """FastV keeping the smaller row's count: that row keeps every token, and its next-token logits
    are transformers' unpruned ones; the larger row keeps real tokens only."""
    keep = int(rows.counts.min())
    kept, logits = rows.kept(prune.make_config("fastv", keep=keep, layer=2))
    small = int(np.argmin(rows.counts))
    np.testing.assert_array_equal(kept[small], np.arange(keep))
    assert (kept < rows.counts[:, None]).all()
    ids, pixels, _ = rows.torch_row(small)
    with torch.no_grad():
        reference = (
            rows.ckpt.torch_model(
                input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor(rows.sizes[small : small + 1])
            )
            .logits[0, -1]
            .numpy()
        )
    assert max_rel_err(logits[small], reference) <= MAX_REL_ERR


def test_divprune_keeps_the_references_tokens_over_the_packed_span(rows):
    kept, _ = rows.kept(prune.make_config("divprune", keep=KEEP))
    for row in range(len(SIZES)):
        ids, pixels, embeds = rows.torch_row(row)
        features = embeds[0, ids[0] == rows.ckpt.config.image_token_index]
        np.testing.assert_array_equal(kept[row], reference_select("divprune", keep=KEEP, embeddings=features))
    assert (kept < rows.counts[:, None]).all()  # padded slots (image_newline's features) never kept
