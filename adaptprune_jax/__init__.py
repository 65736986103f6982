"""adaptprune_jax: AdaptPrune and baseline visual-token pruning as pure, jittable JAX functions.

Arrays in, arrays out: the model computes the cues at prefill and calls ``select`` here; nothing in
this package imports model code. Every selection is int32 (..., keep), distinct, sorted ascending.
"""

from adaptprune_jax.baselines import (
    divprune_select,
    random_select,
    topk_select,
    uniform_grid_indices,
    uniform_select,
)
from adaptprune_jax.configs import (
    METHODS,
    AdaptPruneConfig,
    Cues,
    DivPruneConfig,
    FastVConfig,
    FixedIndicesConfig,
    PruneConfig,
    RandomConfig,
    UniformConfig,
    make_config,
    resolve_keep,
)
from adaptprune_jax.cues import feature_keys, last_token_attention, rms_norm
from adaptprune_jax.grid import center_prior, grid_side
from adaptprune_jax.nms import (
    NMS_IMPLEMENTATIONS,
    adaptive_nms,
    adaptive_nms_order,
    adaptprune_select,
    l2_normalize,
    suppression_factors,
)

__all__ = [
    "METHODS",
    "NMS_IMPLEMENTATIONS",
    "AdaptPruneConfig",
    "Cues",
    "DivPruneConfig",
    "FastVConfig",
    "FixedIndicesConfig",
    "PruneConfig",
    "RandomConfig",
    "UniformConfig",
    "adaptive_nms",
    "adaptive_nms_order",
    "adaptprune_select",
    "center_prior",
    "divprune_select",
    "feature_keys",
    "grid_side",
    "l2_normalize",
    "last_token_attention",
    "make_config",
    "random_select",
    "resolve_keep",
    "rms_norm",
    "suppression_factors",
    "topk_select",
    "uniform_grid_indices",
    "uniform_select",
]
