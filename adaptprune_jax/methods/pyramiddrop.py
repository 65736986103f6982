"""PyramidDrop: image tokens dropped in stages inside the LLM, each stage keeping those its own layer's
last prompt token attends to most.

What the released code (Cooperx521/PyramidDrop, ``modeling_llama_pdrop.py``) does, and this file
reproduces: before decoder layer b of each stage boundary, layer b's own query and key projections
(input RMSNorm, RoPE at the current positions) are applied to the hidden states entering it; the last
prompt token's softmax row, averaged over heads, ranks the image tokens still present; the top ones
are kept in their order, and the sequence is renumbered 0..L'-1 (so every later layer, and decoding
in it, continues from the shorter numbering). Stage s keeps ``int(N * ratio_s)`` tokens of the
original N, ratios cumulative.

The released scripts ship only boundaries (8, 16, 24) with ratios 0.5, 0.25, 0.125 (72 tokens after
layer 24). Here ``keep`` is the count after the last stage and the ratios are geometric,
``(keep / N) ** (s / S)`` for stage s of S, so the default layers with keep=72 are the released setting;
other budgets follow the paper's lambda, lambda^2, lambda^3 rule (our reading; their settings for 192 /
128 / 64 were not released). ``equivalent_tokens`` gives the cost to compare at.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from adaptprune_jax.baselines import topk_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, PruneConfig, Stage, StageAttention, check_int, check_keep_type

# Float slack for int(N * ratio) when the ratio is an exact fraction computed through a power.
_RATIO_SLACK = 1e-6


@register
@dataclasses.dataclass(frozen=True)
class PyramidDropConfig(PruneConfig):
    """PyramidDrop's settings: ``layers``, the stage boundaries (pruning before each of these layers;
    None: the released boundaries as fractions of the LLM's depth, (8, 16, 24) of 32)."""

    name: ClassVar[str] = "pyramiddrop"
    has_layer: ClassVar[bool] = False
    renumber_positions: ClassVar[bool] = True
    has_torch_reference: ClassVar[bool] = True
    reference_cues: ClassVar[tuple[str, ...]] = ("attention",)
    layer: ClassVar[int | None] = None  # no single layer: its stages carry theirs

    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        check_keep_type(self.keep)
        if self.layers is not None:
            if not isinstance(self.layers, tuple) or not self.layers:
                raise ValueError(f"layers must be a non-empty tuple of ints, got {self.layers!r}.")
            for layer in self.layers:
                check_int("layers", layer)
            if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 1:
                raise ValueError(f"layers must increase from >= 1, got {self.layers}.")

    def boundaries(self, num_layers: int | None) -> tuple[int, ...]:
        """``layers``, or the released (8, 16, 24) of 32 as fractions of the depth: L/4, L/2, 3L/4."""
        if self.layers is not None:
            return self.layers
        if num_layers is None:
            raise ValueError(
                "pyramiddrop's default stages follow the LLM's depth: give num_layers, or layers=."
            )
        return (num_layers // 4, num_layers // 2, 3 * num_layers // 4)

    def cue_requests(self):
        return (StageAttention(),)

    def stages(self, num_image_tokens: int, num_layers: int | None = None) -> tuple[Stage, ...]:
        layers = self.boundaries(num_layers)
        final = self.resolve_keep(num_image_tokens)
        fraction = final / num_image_tokens
        keeps = [
            int(num_image_tokens * fraction ** (s / len(layers)) + _RATIO_SLACK)
            for s in range(1, len(layers))
        ]
        return tuple(Stage(layer, keep) for layer, keep in zip(layers, [*keeps, final]))

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return topk_select(cues.require("attention", self.name), keep, cues.valid())

    def torch_reference_order(self, cues, keep, grid):
        """One stage: ``topk`` of the attention over the tokens still present (ties by first index)."""
        import torch

        return torch.sort(cues["attention"], descending=True, stable=True).indices[:keep]
