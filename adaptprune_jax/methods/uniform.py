"""Uniform: a regular sub-grid of the image tokens, no scores (a spatial control), pruned at layer K."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adaptprune_jax.baselines import uniform_layout_select, uniform_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, PruneConfig


@register
@dataclasses.dataclass(frozen=True)
class UniformConfig(PruneConfig):
    """Uniform: evenly spaced rows and columns of each grid (see ``uniform_grid_indices``)."""

    name: ClassVar[str] = "uniform"
    needs_grid: ClassVar[bool] = True

    def select(self, cues: Cues, keep: int) -> jax.Array:
        if cues.layout is not None:
            return uniform_layout_select(cues.layout, keep)
        batch, num_tokens = cues.batch_and_tokens()
        return jnp.broadcast_to(uniform_select(num_tokens, keep), (batch, keep))
