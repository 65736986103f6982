"""CDPruner: the image tokens that maximise a conditional determinantal point process, whose kernel
weights the features' similarity by each token's relevance to the question, before the LLM.

What the released code (Theia-4869/CDPruner, ``llava/model/llava_arch.py``, ``encode_images``) does,
and this file reproduces:
1. Relevance: the cosine of each image token's CLIP joint-space embedding (the feature layer's patches
   through post_layernorm and visual_projection) with each text segment's CLIP text embedding,
   negated, averaged over the segments, then min-max normalised: ``(r - min + 1e-6) / (max - min)``.
2. Similarity: the cosine of the projected image features (the LLM's inputs), float32.
3. Kernel ``L_ij = r_i * S_ij * r_j``, and the fast greedy MAP inference of the DPP (Chen et al.,
   2018) for ``keep`` steps: pick ``j = argmax d_i^2``, ``e_i = (L_j - sum_t c_t[j] * c_t) / d_j``,
   ``d_i^2 -= e_i^2``, ``d_j^2 = -inf``.
4. The kept tokens in ascending order; the LLM sees a shorter prompt with contiguous positions.

Ours: rows are independent (the released min-max runs over the whole batch tensor; at batch 1, as
its evaluation runs, that is the row), and the text segments of a row carry a mask, so rows with
questions of different lengths share one batch. Two guards where the released code yields noise,
inf or NaN: a row whose relevance is constant is divided by 1 instead of 0; and once every remaining
``d_i^2`` is round-off (below ``SPENT_GAIN`` of the largest ``L_ii``: the kernel's rank, at most the
feature width, is spent, the released picks follow float32 noise and its square roots of negative
numbers give NaN, which can pick a token twice) the remaining picks go by relevance (``L_ii``),
highest first, ties to the lower index, so every kept token is distinct and the picks do not depend
on how XLA orders a sum.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import (
    Cues,
    Embeddings,
    JointEmbeddings,
    PruneConfig,
    check_bool,
    check_keep_type,
)

FEATURE_LAYER = -2  # LLaVA-1.5's vision feature layer: the released image embeds are its patches
RELEVANCE_OFFSET = 1e-6  # the released min-max normalisation's offset, so no token weighs 0
# Ours: once every remaining d_i^2 is below this share of the row's largest kernel diagonal, the
# kernel's rank is spent and d^2 holds float32 round-off only (the released picks follow that noise,
# and its square roots of negative numbers give NaN); the remaining picks go by relevance instead.
SPENT_GAIN = 1e-6


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def query_relevance(
    image_embeds: jax.Array, text_embeds: jax.Array, text_mask: jax.Array, negate: bool = True
) -> jax.Array:
    """(B, N) float32: each token's negated (``negate``, as released) cosine to the question,
    averaged over the row's text segments, min-max normalised per row."""
    cosine = jnp.einsum(
        "bnc,bmc->bnm",
        _unit(image_embeds.astype(jnp.float32)),
        _unit(text_embeds.astype(jnp.float32)),
        precision=lax.Precision.HIGHEST,
    )
    mask = text_mask[:, None, :]
    signed = -cosine if negate else cosine
    relevance = jnp.sum(jnp.where(mask, signed, 0.0), axis=-1) / jnp.sum(mask, axis=-1)
    low = jnp.min(relevance, axis=-1, keepdims=True)
    span = jnp.max(relevance, axis=-1, keepdims=True) - low
    return (relevance - low + RELEVANCE_OFFSET) / jnp.where(span > 0, span, 1.0)


def conditional_kernel(features: jax.Array, relevance: jax.Array) -> jax.Array:
    """(B, N, N) float32 ``r_i * cos(f_i, f_j) * r_j``."""
    unit = _unit(features.astype(jnp.float32))
    similarity = jnp.einsum("bic,bjc->bij", unit, unit, precision=lax.Precision.HIGHEST)
    return relevance[:, :, None] * similarity * relevance[:, None, :]


def greedy_dpp_order(kernel: jax.Array, keep: int) -> jax.Array:
    """(B, keep) int32 picks of the fast greedy MAP inference on ``kernel`` (B, N, N), in pick order.

    The state has fixed sizes: ``c`` (keep, B, N) holds the rows computed so far and zeros after them,
    so the sum over all ``keep`` rows is the released sum over the first ``i``."""
    batch, num_tokens, _ = kernel.shape
    diagonal = jnp.diagonal(kernel, axis1=1, axis2=2)
    gains = diagonal  # d_i^2
    spent_below = SPENT_GAIN * jnp.max(diagonal, axis=-1, keepdims=True)  # (B, 1)
    rows = jnp.zeros((keep, batch, num_tokens), jnp.float32)
    picks = jnp.zeros((keep, batch), jnp.int32)

    def step(i, state):
        rows, gains, picks = state
        spent = jnp.max(gains, axis=-1, keepdims=True) <= spent_below  # (B, 1): only round-off is left
        by_relevance = jnp.where(jnp.isneginf(gains), -jnp.inf, diagonal)
        j = jnp.argmax(jnp.where(spent, by_relevance, gains), axis=-1).astype(jnp.int32)  # (B,)
        kernel_j = jnp.take_along_axis(kernel, j[:, None, None], axis=1)[:, 0]  # (B, N)
        rows_j = jnp.take_along_axis(rows, jnp.broadcast_to(j[None, :, None], (keep, batch, 1)), axis=2)
        projected = jnp.einsum("tb,tbn->bn", rows_j[..., 0], rows, precision=lax.Precision.HIGHEST)
        gain_j = jnp.take_along_axis(gains, j[:, None], axis=1)  # (B, 1)
        row = jnp.where(spent, 0.0, (kernel_j - projected) / jnp.sqrt(jnp.where(spent, 1.0, gain_j)))
        gains = gains - jnp.square(row)
        gains = jnp.where(jnp.arange(num_tokens)[None] == j[:, None], -jnp.inf, gains)
        return rows.at[i].set(row), gains, picks.at[i].set(j)

    _, _, picks = lax.fori_loop(0, keep, step, (rows, gains, picks))
    return picks.T


@register
@dataclasses.dataclass(frozen=True)
class CDPrunerConfig(PruneConfig):
    """CDPruner's settings: ``keep`` (the released ``visual_token_num``) and, ours, an ablation:
    ``negate_relevance=False`` ranks the tokens by the cosine itself, for a joint space whose image
    tokens align positively with the question (the released negation follows openai CLIP's, whose
    patch embeddings are anti-aligned)."""

    name: ClassVar[str] = "cdpruner"
    has_layer: ClassVar[bool] = False
    renumber_positions: ClassVar[bool] = True  # a shorter prompt, as released
    needs_text_tower: ClassVar[bool] = True
    has_torch_reference: ClassVar[bool] = True
    layer: ClassVar[int] = 0  # the LLM's input
    reference_cues: ClassVar[tuple[str, ...]] = ("image_embeds", "text_embeds", "embeddings")

    negate_relevance: bool = True

    def __post_init__(self):
        check_keep_type(self.keep)
        check_bool("negate_relevance", self.negate_relevance)

    def cue_requests(self):
        return (JointEmbeddings(FEATURE_LAYER), Embeddings())

    def select(self, cues: Cues, keep: int) -> jax.Array:
        image_embeds = cues.require("image_embeds", self.name)
        text_embeds = cues.require("text_embeds", self.name)
        text_mask = cues.require("text_mask", self.name)
        features = cues.require("embeddings", self.name)
        cues.require_dense(self.name)
        num_tokens = features.shape[1]
        if not 1 <= keep <= num_tokens:
            raise ValueError(f"{self.name}: keep={keep} is outside 1..{num_tokens} (the image tokens).")
        if image_embeds.shape[:2] != features.shape[:2]:
            raise ValueError(
                f"{self.name}: image_embeds {image_embeds.shape} and embeddings {features.shape} must "
                "cover the same (batch, image tokens)."
            )
        relevance = query_relevance(image_embeds, text_embeds, text_mask, self.negate_relevance)
        kernel = conditional_kernel(features, relevance)
        return jnp.sort(greedy_dpp_order(kernel, keep), axis=1).astype(jnp.int32)

    def torch_reference_order(self, cues, keep, grid):
        """The released selection for one image: ``image_embeds`` (N, C) joint-space image embeds,
        ``text_embeds`` (M, C) one per text segment, ``embeddings`` (N, d) projected image features."""
        import torch

        image_embeds, text_embeds = cues["image_embeds"][None], cues["text_embeds"]
        image_features = cues["embeddings"][None]
        batch, num_tokens = image_features.shape[:2]

        image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
        similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
        relevance = (relevance - relevance.min() + RELEVANCE_OFFSET) / (relevance.max() - relevance.min())
        kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)

        rows = torch.zeros((keep, batch, num_tokens))
        gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        picks = torch.empty((keep, batch), dtype=torch.long)
        every_row = torch.arange(batch)
        for i in range(keep):
            j = torch.argmax(gains, dim=-1)
            picks[i] = j
            row = (
                kernel[every_row, j] - torch.einsum("tb,tbn->bn", rows[:i, every_row, j], rows[:i])
            ) / torch.sqrt(gains[every_row, j]).unsqueeze(-1)
            rows[i, :, :] = row
            gains -= torch.square(row)
            gains[every_row, j] = -float("inf")
        return picks[:, 0]
