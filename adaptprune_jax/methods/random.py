"""Random: image tokens drawn uniformly without replacement, pruned at layer K (a control)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adaptprune_jax.baselines import random_select
from adaptprune_jax.methods import register
from adaptprune_jax.methods.base import Cues, PruneConfig, check_int


@register
@dataclasses.dataclass(frozen=True)
class RandomConfig(PruneConfig):
    """Random: ``keep`` image tokens uniformly at random, from ``cues.rng`` or else ``seed``.

    ``cues.rng`` is one key for the whole batch (rows draw independently from it), or a (B,) array
    of keys, one per row: then a row's draw depends on its own key alone, not on the batch it is in.
    """

    name: ClassVar[str] = "random"
    takes_seed: ClassVar[bool] = True

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("seed", self.seed)

    def select(self, cues: Cues, keep: int) -> jax.Array:
        batch, num_tokens = cues.batch_and_tokens()
        rng = cues.rng if cues.rng is not None else jax.random.key(self.seed)
        valid = cues.valid()
        if jnp.ndim(rng) == 1:  # one key per row
            if valid is None:
                return jax.vmap(lambda key: random_select(key, num_tokens, keep))(rng)
            return jax.vmap(lambda key, row: random_select(key, num_tokens, keep, (), row))(rng, valid)
        return random_select(rng, num_tokens, keep, (batch,), valid)
