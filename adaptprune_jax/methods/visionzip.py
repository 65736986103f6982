"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity,
built from the vision tower's features before the projector, so the LLM's input is already short.

What the released code (dvlab-research/VisionZip, LLaVA-1.5 path) does, and this file reproduces:
1. In the encoder layer whose output is LLaVA's feature layer (``hidden_states[-2]``), the [CLS] row
   of the attention probabilities, summed over heads, ranks the patches; the top ``dominant - 1``
   patches and the [CLS] token itself are the dominant tokens, in ascending token order ([CLS] first).
2. The other patches, in ascending order, are matched by the same layer's head-mean key projection
   (bias included, L2-normalised): every ``R // contextual``-th of them (R = their count) is a target,
   each remaining one joins its most similar target (first on ties), and a target's contextual token
   is its own feature plus the mean of the features that joined it (not the mean of the group).
3. The LLM receives [dominant tokens, contextual tokens] through the projector, as a shorter prompt
   with contiguous positions.

``keep`` is the number of image tokens the LLM sees, ``dominant + contextual``, [CLS] counted among
the dominant ones as the released ``visionzip(model, dominant=54, contextual=10)`` counts it. The
released budgets (54 + 10, 108 + 20, 162 + 30 for 64, 128, 192) are ``contextual = keep * 5 // 32``,
the default here for every budget. Head mean instead of head sum ranks identically.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import (
    Cues,
    MergedTokens,
    PruneConfig,
    VisionClsAttention,
    VisionTokens,
    check_int,
    check_keep_type,
)

FEATURE_LAYER = -2  # LLaVA-1.5's vision feature layer, where the released code reads everything


def released_contextual(keep: int) -> int:
    """The released split's contextual count for a budget: 10 of 64, 20 of 128, 30 of 192."""
    return keep * 5 // 32


@register
@dataclasses.dataclass(frozen=True)
class VisionZipConfig(PruneConfig):
    """VisionZip's settings. ``contextual``: merged tokens among the ``keep`` (None: the released split)."""

    name: ClassVar[str] = "visionzip"
    has_layer: ClassVar[bool] = False
    merges: ClassVar[bool] = True
    renumber_positions: ClassVar[bool] = True  # a shorter prompt, as released
    has_torch_reference: ClassVar[bool] = True
    layer: ClassVar[int] = 0  # the LLM's input

    contextual: int | None = None

    def __post_init__(self):
        check_keep_type(self.keep)
        if self.contextual is not None:
            check_int("contextual", self.contextual)
            if self.contextual < 0:
                raise ValueError(f"contextual={self.contextual} must be >= 0.")

    def cue_requests(self):
        return (VisionClsAttention(FEATURE_LAYER), VisionTokens(FEATURE_LAYER))

    def split(self, keep: int, num_image_tokens: int) -> tuple[int, int]:
        """(dominant patches, contextual tokens) for ``keep`` tokens: keep = 1 + dominant + contextual."""
        contextual = released_contextual(keep) if self.contextual is None else self.contextual
        dominant = keep - 1 - contextual
        if dominant < 0:
            raise ValueError(
                f"visionzip: contextual={contextual} leaves no room for the [CLS] token in keep={keep}; "
                f"allowed contextual 0..{keep - 1}."
            )
        if contextual > num_image_tokens - dominant:
            raise ValueError(
                f"visionzip: contextual={contextual} exceeds the {num_image_tokens - dominant} patches "
                "left after the dominant ones."
            )
        return dominant, contextual

    def validate(self, num_image_tokens, num_layers, layout=None):
        super().validate(num_image_tokens, num_layers, layout)
        self.split(self.resolve_keep(num_image_tokens), num_image_tokens)

    def select(self, cues: Cues, keep: int) -> jax.Array:
        """The merged tokens sit in the first ``keep`` image slots (see ``merge``)."""
        batch, _ = cues.batch_and_tokens()
        return jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (batch, keep))

    def merge(self, cues: Cues, keep: int) -> MergedTokens:
        attention = cues.require("vision_attention", self.name)
        tokens = cues.require("vision_tokens", self.name)
        keys = cues.require("vision_keys", self.name)
        cues.require_dense(self.name)
        batch, num_patches = attention.shape
        dominant, contextual = self.split(keep, num_patches)
        rows = jnp.arange(batch)[:, None]
        top = jax.lax.top_k(attention.astype(jnp.float32), dominant)[1]
        is_dominant = jnp.zeros((batch, num_patches), bool).at[rows, top].set(True)
        patch_index = jnp.arange(num_patches)
        kept = jnp.sort(top, axis=1).astype(jnp.int32)
        rest = jnp.argsort(jnp.where(is_dominant, num_patches + patch_index, patch_index), axis=1)
        rest = rest[:, : num_patches - dominant]
        patches = tokens[:, 1:]
        parts = [tokens[:, :1], jnp.take_along_axis(patches, kept[..., None], axis=1)]
        if contextual:
            rest_tokens = jnp.take_along_axis(patches, rest[..., None], axis=1)
            rest_keys = jnp.take_along_axis(keys[:, 1:], rest[..., None], axis=1).astype(jnp.float32)
            unit = rest_keys / jnp.linalg.norm(rest_keys, axis=-1, keepdims=True)
            count = num_patches - dominant
            targets = np.arange(0, count, max(1, count // contextual))[:contextual]
            others = np.setdiff1d(np.arange(count), targets)
            similarity = jnp.einsum("bod,btd->bot", unit[:, others], unit[:, targets])
            assign = jax.nn.one_hot(jnp.argmax(similarity, axis=-1), contextual, dtype=jnp.float32)
            counts = jnp.maximum(assign.sum(axis=1), 1.0)[..., None]
            joined = jnp.einsum("bot,bod->btd", assign, rest_tokens[:, others].astype(jnp.float32))
            merged = rest_tokens[:, targets].astype(jnp.float32) + joined / counts
            parts.append(merged.astype(tokens.dtype))
        return MergedTokens(jnp.concatenate(parts, axis=1), kept)

    def torch_reference_merge(self, attentions, hidden, keys, keep: int):
        """The released selection and merge for one image, in torch: ``attentions`` (H, S, S) the
        layer's attention probabilities, ``hidden`` (S, d) its output, ``keys`` (H, S, D) its raw key
        states, S = 1 + N with [CLS] first. Returns (tokens (keep, d), dominant patch indices)."""
        import torch

        num_tokens = hidden.shape[0]
        dominant, contextual = self.split(keep, num_tokens - 1)
        cls_attention = attentions[:, 0, 1:].sum(dim=0)
        chosen = torch.cat([torch.zeros(1, dtype=torch.long), cls_attention.topk(dominant).indices + 1])
        left = torch.ones(num_tokens, dtype=torch.bool)
        left[chosen] = False
        dominant_tokens = hidden[~left]
        if not contextual:
            return dominant_tokens, torch.sort(chosen[1:] - 1).values
        metric = keys.mean(dim=0)[left]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        rest = hidden[left]
        step = max(1, metric.shape[0] // contextual)
        targets = torch.arange(0, metric.shape[0], step)[:contextual]
        is_target = torch.isin(torch.arange(metric.shape[0]), targets)
        similarity = metric[~is_target] @ metric[targets].T
        assign = torch.zeros(similarity.shape[0], contextual, dtype=rest.dtype)
        assign.scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
        counts = assign.sum(dim=0).clamp(min=1)[:, None]
        contextual_tokens = rest[targets] + (assign.T @ rest[~is_target]) / counts
        return torch.cat([dominant_tokens, contextual_tokens]), torch.sort(chosen[1:] - 1).values
