"""A pruning method defined only in the tests, to show that a method is one file.

KeyNorm-FastV: FastV's last-token attention at layer K - 1, times the norm of each image token's key
at that layer, read from the layer view. Registering it here (imported by tests/conftest.py, or by
`--method_modules=tests.keynorm_method` on the command line) is all it takes for it to appear in
`experiments.eval --methods`, `experiments.validate --method`, the benchmark's configurations and
the registry-parametrized contract tests.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from adaptprune_jax import LastTokenAttention, LayerView, PruneConfig, register, topk_select


@register
@dataclasses.dataclass(frozen=True)
class KeyNormFastVConfig(PruneConfig):
    """The top-``keep`` image tokens by attention x key norm."""

    name: ClassVar[str] = "keynorm_fastv"

    def cue_requests(self):
        return (LastTokenAttention(), LayerView())

    def select(self, cues, keep: int) -> jax.Array:
        view = cues.require("view", self.name)
        image_keys = jnp.take_along_axis(view.keys, view.image_slots[:, :, None, None], axis=1)
        norms = jnp.sqrt(jnp.sum(jnp.square(image_keys.astype(jnp.float32)), axis=(-2, -1)))
        return topk_select(cues.require("attention", self.name) * norms, keep, cues.valid())
