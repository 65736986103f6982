"""DivPrune: max-min diversity on the projected image embeddings, before the LLM (layer 0)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from adaptprune_jax.baselines import divprune_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, Embeddings, PruneConfig, check_bool, check_keep_type


@register
@dataclasses.dataclass(frozen=True)
class DivPruneConfig(PruneConfig):
    """DivPrune's settings.

    ``renumber_positions`` (default True, as the released code behaves): the kept features are cut
    out before the sequence is built, so the shorter sequence gets contiguous RoPE positions. False
    keeps the original positions, as the in-LLM methods do.
    """

    name: ClassVar[str] = "divprune"
    has_layer: ClassVar[bool] = False
    has_torch_reference: ClassVar[bool] = True
    reference_cues: ClassVar[tuple[str, ...]] = ("embeddings",)
    layer: ClassVar[int] = 0  # Fixed: it prunes the LLM's input, so every layer sees the kept set.

    renumber_positions: bool = True

    def __post_init__(self):
        check_keep_type(self.keep)
        check_bool("renumber_positions", self.renumber_positions)

    def cue_requests(self):
        return (Embeddings(),)

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return divprune_select(cues.require("embeddings", self.name), keep, valid=cues.valid())

    def torch_reference_order(self, cues, keep, grid):
        """The released DivPrune loop: greedy max-min diversity under cosine distance.

        First pick: the token whose nearest other token is farthest (each column's 2nd smallest
        distance, the smallest being its distance 0 to itself). Then repeatedly the token farthest from
        the kept set. Unlike the released code, kept tokens are excluded from later picks, which only
        matters when tokens have identical features (the released code could then return an index
        twice).
        """
        import torch

        embeddings = cues["embeddings"]
        if embeddings.shape[0] < 2:
            raise ValueError("DivPrune needs at least two image tokens")
        unit = embeddings / embeddings.norm(dim=1, keepdim=True)
        distance = 1.0 - unit @ unit.T
        order = [int(torch.argmax(torch.topk(distance, 2, dim=0, largest=False).values[1]))]
        selected = torch.zeros(embeddings.shape[0], dtype=torch.bool)
        selected[order[0]] = True
        for _ in range(keep - 1):
            farthest = distance[order].min(dim=0).values.masked_fill(selected, float("-inf"))
            chosen = int(torch.argmax(farthest))
            selected[chosen] = True
            order.append(chosen)
        return torch.tensor(order)
