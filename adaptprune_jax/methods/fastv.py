"""FastV: the image tokens the last prompt token attends to most at layer K - 1, kept from layer K."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from adaptprune_jax.baselines import topk_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, LastTokenAttention, PruneConfig


@register
@dataclasses.dataclass(frozen=True)
class FastVConfig(PruneConfig):
    """FastV: the top-``keep`` image tokens by the last prompt token's attention, no prior."""

    name: ClassVar[str] = "fastv"
    has_torch_reference: ClassVar[bool] = True
    reference_cues: ClassVar[tuple[str, ...]] = ("attention",)

    def cue_requests(self):
        return (LastTokenAttention(),)

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return topk_select(cues.require("attention", self.name), keep, cues.valid())

    def torch_reference_order(self, cues, keep, grid):
        """The ``keep`` highest attention values; a stable sort breaks ties by first index."""
        import torch

        return torch.sort(cues["attention"], descending=True, stable=True).indices[:keep]
