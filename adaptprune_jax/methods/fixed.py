"""Fixed indices: prune at layer K to a precomputed selection (not a method: a measuring tool).

For measuring what selection costs (a prefill with fixed indices against one that selects) and for
replaying a selection made elsewhere (another framework, another run). Not in the registry.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adaptprune_jax.methods.base import Cues, PruneConfig


@dataclasses.dataclass(frozen=True)
class FixedIndicesConfig(PruneConfig):
    """Prune at ``layer`` to ``indices`` (the same for every row): no cue, no selection."""

    name: ClassVar[str] = "fixed"

    indices: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        indices = tuple(int(index) for index in self.indices)
        if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0:
            raise ValueError(f"indices must be distinct, ascending and >= 0, got {self.indices!r}.")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "keep", len(indices))

    def validate(self, num_image_tokens: int, num_layers: int, layout=None) -> None:
        super().validate(num_image_tokens, num_layers, layout)
        if self.indices[-1] >= num_image_tokens:
            raise ValueError(f"index {self.indices[-1]} out of range for {num_image_tokens} image tokens.")

    def select(self, cues: Cues, keep: int) -> jax.Array:
        batch, _ = cues.batch_and_tokens()
        return jnp.broadcast_to(jnp.asarray(self.indices, jnp.int32), (batch, keep))
