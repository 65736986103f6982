"""VisPruner: important tokens by the vision tower's [CLS] attention, diverse tokens by removing
near-duplicates from the rest, before the LLM.

What the released code (Theia-4869/VisPruner, ``llava/model/llava_arch.py``, ``encode_images``) does,
and this file reproduces:
1. The [CLS] row of the attention in CLIP's feature layer (head mean) orders the patches, highest
   first; the first ``keep * important_ratio`` are the important tokens, the rest (still in that
   order) the residual.
2. While the residual holds more than the diverse count: split it by list position into even (a) and
   odd (b) entries, score each a by its highest cosine similarity to any b (on the image features
   before the projector, L2-normalised), drop the ``min(8, surplus)`` highest-scoring a, and rebuild
   the residual as [surviving a in descending score order] + [b in their order]. The reorder matters:
   the next round splits the new list.
3. The kept tokens are important + residual, in ascending token order; the LLM sees a shorter prompt
   with contiguous positions.

The released code needs an even residual at every round and ``R / 2 >= r`` in its last one; settings
where it fails are refused here with the reason. Its sorts are unstable (ties unspecified); here ties
go to the lower index.

Here the rounds run as one loop over arrays of the first round's size (the residual's live entries a
prefix, the rest masked), so a prefill compiles one round instead of ~60 of shrinking shapes; each
pair's cosine similarity is computed once, before the loop, and read by every round.
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
    PruneConfig,
    VisionClsAttention,
    VisionTokens,
    check_keep_type,
)
from adaptprune_jax.nms import SIMILARITY_PRECISION

FEATURE_LAYER = -2  # LLaVA-1.5's vision feature layer, where the released code reads both cues
PRUNED_PER_ROUND = 8


def removal_rounds(residual: int, diverse: int) -> list[int]:
    """How many residual tokens each duplicate-removal round drops, as the released loop runs."""
    rounds = []
    while diverse > 0 and residual - diverse > 0:
        dropped = min(PRUNED_PER_ROUND, residual - diverse)
        rounds.append(dropped)
        residual -= dropped
    return rounds


@register
@dataclasses.dataclass(frozen=True)
class VisPrunerConfig(PruneConfig):
    """VisPruner's settings. ``important_ratio``: the share of ``keep`` chosen by [CLS] attention."""

    name: ClassVar[str] = "vispruner"
    has_layer: ClassVar[bool] = False
    renumber_positions: ClassVar[bool] = True  # a shorter prompt, as released
    has_torch_reference: ClassVar[bool] = True
    layer: ClassVar[int] = 0  # the LLM's input
    reference_cues: ClassVar[tuple[str, ...]] = ("vision_attention", "vision_features")
    reference_options: ClassVar[tuple[str, ...]] = ("important_ratio",)

    important_ratio: float = 0.5

    def __post_init__(self):
        check_keep_type(self.keep)
        if isinstance(self.important_ratio, bool) or not 0.0 <= float(self.important_ratio) <= 1.0:
            raise ValueError(f"important_ratio must be in [0, 1], got {self.important_ratio!r}.")

    def cue_requests(self):
        return (VisionClsAttention(FEATURE_LAYER), VisionTokens(FEATURE_LAYER))

    def split(self, keep: int, num_image_tokens: int) -> tuple[int, int]:
        """(important, diverse) for ``keep`` tokens; ValueError where the released loop would fail."""
        important = int(keep * self.important_ratio)
        diverse = keep - important
        residual = num_image_tokens - important
        if diverse and residual % 2:
            raise ValueError(
                f"vispruner: {num_image_tokens} - {important} important tokens leaves an odd residual "
                f"({residual}), which the released even/odd matching cannot split; change keep or "
                "important_ratio."
            )
        for dropped in removal_rounds(residual, diverse):
            if residual // 2 < dropped:
                raise ValueError(
                    f"vispruner: a round would drop {dropped} of the {residual // 2} even-position residual "
                    f"tokens (diverse={diverse} is too small for the released matching)."
                )
            residual -= dropped
        return important, diverse

    def validate(self, num_image_tokens, num_layers, layout=None):
        super().validate(num_image_tokens, num_layers, layout)
        self.split(self.resolve_keep(num_image_tokens), num_image_tokens)

    def select(self, cues: Cues, keep: int) -> jax.Array:
        attention = cues.require("vision_attention", self.name)
        tokens = cues.require("vision_tokens", self.name)
        cues.require_dense(self.name)
        batch, num_patches = attention.shape
        important, diverse = self.split(keep, num_patches)
        features = tokens[:, tokens.shape[1] - num_patches :].astype(jnp.float32)  # the image tokens
        unit = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
        order = jnp.argsort(-attention.astype(jnp.float32), axis=1, stable=True)
        chosen, residual = order[:, :important], order[:, important:]
        if not diverse:
            return jnp.sort(chosen, axis=1).astype(jnp.int32)
        dropped_per_round = removal_rounds(residual.shape[1], diverse)
        if dropped_per_round:
            vectors = jnp.take_along_axis(unit, residual[..., None], axis=1)
            similarity = jnp.einsum("bic,bjc->bij", vectors, vectors, precision=SIMILARITY_PRECISION)
            survivors = _remove_duplicates(similarity, jnp.asarray(dropped_per_round, jnp.int32))
            residual = jnp.take_along_axis(residual, survivors[:, :diverse], axis=1)
        return jnp.sort(jnp.concatenate([chosen, residual], axis=1), axis=1).astype(jnp.int32)

    def torch_reference_order(self, cues, keep, grid):
        """The released selection for one image: ``vision_attention`` (N,) head-mean [CLS] attention,
        ``vision_features`` (N, C) the image features before the projector."""
        import torch

        attention, features = cues["vision_attention"], cues["vision_features"]
        important, diverse = self.split(keep, attention.shape[0])
        order = torch.argsort(attention, descending=True, stable=True)
        chosen, residual = order[:important], order[important:]
        unit = features / features.norm(dim=-1, keepdim=True)
        while diverse > 0:
            count = residual.shape[0]
            dropped = min(PRUNED_PER_ROUND, count - diverse)
            if dropped <= 0:
                break
            vectors = unit[residual]
            scores = (vectors[::2] @ vectors[1::2].T).max(dim=-1).values
            distinct = torch.argsort(scores, descending=True, stable=True)[dropped:]
            residual = torch.cat([residual[::2][distinct], residual[1::2]])
        return torch.cat([chosen, residual]) if diverse > 0 else chosen


def _remove_duplicates(similarity: jax.Array, dropped_per_round: jax.Array) -> jax.Array:
    """The released duplicate-removal rounds on the residual list, at a fixed shape.

    ``similarity`` (B, R, R): the cosine similarity of every pair of residual tokens, by their place in
    the first round's list. Returns (B, R) places into that list: the list the last round left, as a
    prefix (the rest is padding). Each round reads the live prefix of the list (``count`` entries, even
    at every round), pairs its even entries with its odd ones, ranks the even ones by their highest
    similarity to a live odd one (descending, ties to the earlier entry, as a stable sort does), and
    writes [the surviving even entries in rank order] + [the odd entries] as the next list.
    """
    batch, width = similarity.shape[:2]
    half = width // 2
    pair = jnp.arange(half)
    slot = jnp.arange(width)
    rows = jnp.arange(batch)[:, None, None]

    def one_round(round_index, state):
        places, count = state
        dropped = dropped_per_round[round_index]
        evens, odds = places[:, ::2], places[:, 1::2]
        live = pair < count // 2
        pairs = similarity[rows, evens[:, :, None], odds[:, None, :]]
        scores = jnp.max(jnp.where(live, pairs, -jnp.inf), axis=-1)
        # Live entries first, then by descending score, ties in list order: the released ranking of
        # the live entries, whatever their scores (NaN included).
        dead = jnp.broadcast_to(~live, scores.shape)
        ranked = lax.sort(
            (dead, -scores, jnp.broadcast_to(pair, scores.shape)), dimension=1, is_stable=True, num_keys=2
        )[2]
        ranked_evens = jnp.take_along_axis(evens, ranked, axis=1)
        surviving = count // 2 - dropped
        from_evens = ranked_evens[:, jnp.clip(slot + dropped, 0, half - 1)]
        from_odds = odds[:, jnp.clip(slot - surviving, 0, half - 1)]
        return jnp.where(slot < surviving, from_evens, from_odds), count - dropped

    start = jnp.broadcast_to(slot, (batch, width))
    places, _ = lax.fori_loop(0, dropped_per_round.shape[0], one_round, (start, jnp.int32(width)))
    return places
