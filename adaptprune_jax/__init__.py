"""adaptprune_jax: AdaptPrune and baseline visual-token pruning as pure, jittable JAX functions.

Arrays in, arrays out: the model computes the cues a method asks for and calls its ``select``;
nothing in this package imports model code. Every selection is int32 (..., keep), distinct, sorted
ascending. Methods live one per file in ``adaptprune_jax.methods`` and are read from its registry.
"""

from adaptprune_jax import methods
from adaptprune_jax.baselines import (
    divprune_select,
    random_select,
    topk_select,
    uniform_grid_indices,
    uniform_layout_select,
    uniform_select,
)
from adaptprune_jax.cues import feature_keys, last_token_attention, rms_norm
from adaptprune_jax.grid import (
    NO_GRID,
    TokenLayout,
    center_prior,
    concat_layouts,
    grid_layout,
    grid_side,
    layout_center_prior,
    newline_grid_layout,
    off_grid_layout,
    square_layout,
    stack_layouts,
)
from adaptprune_jax.methods import METHODS, make_config, register
from adaptprune_jax.methods.adaptprune import AdaptPruneConfig
from adaptprune_jax.methods.base import (
    CUE_TYPES,
    Cues,
    Embeddings,
    FeatureKeys,
    InputEmbeddings,
    InputEmbeddingsArrays,
    JointEmbeddings,
    KeptAndMerged,
    LastTokenAttention,
    LayerView,
    LayerViewArrays,
    MergedTokens,
    PruneConfig,
    QueryAttention,
    Stage,
    StageAttention,
    UnsupportedBudget,
    VisionClsAttention,
    VisionTokens,
    resolve_keep,
)
from adaptprune_jax.methods.cdpruner import CDPrunerConfig
from adaptprune_jax.methods.divprune import DivPruneConfig
from adaptprune_jax.methods.fastv import FastVConfig
from adaptprune_jax.methods.fixed import FixedIndicesConfig
from adaptprune_jax.methods.pyramiddrop import PyramidDropConfig
from adaptprune_jax.methods.random import RandomConfig
from adaptprune_jax.methods.sparsevlm import SparseVLMConfig
from adaptprune_jax.methods.uniform import UniformConfig
from adaptprune_jax.methods.visionzip import VisionZipConfig
from adaptprune_jax.methods.vispruner import VisPrunerConfig
from adaptprune_jax.nms import (
    NMS_FORMS,
    NMS_IMPLEMENTATIONS,
    adaptive_nms,
    adaptive_nms_order,
    adaptprune_scores,
    adaptprune_select,
    l2_normalize,
    pair_factor,
    suppression_factors,
    window_suppression_factors,
)

__all__ = [
    "CUE_TYPES",
    "METHODS",
    "NMS_FORMS",
    "NMS_IMPLEMENTATIONS",
    "NO_GRID",
    "AdaptPruneConfig",
    "CDPrunerConfig",
    "Cues",
    "DivPruneConfig",
    "Embeddings",
    "FastVConfig",
    "FeatureKeys",
    "FixedIndicesConfig",
    "InputEmbeddings",
    "InputEmbeddingsArrays",
    "JointEmbeddings",
    "KeptAndMerged",
    "UnsupportedBudget",
    "LastTokenAttention",
    "LayerView",
    "LayerViewArrays",
    "MergedTokens",
    "PruneConfig",
    "PyramidDropConfig",
    "QueryAttention",
    "RandomConfig",
    "SparseVLMConfig",
    "Stage",
    "StageAttention",
    "TokenLayout",
    "UniformConfig",
    "VisionClsAttention",
    "VisionTokens",
    "VisionZipConfig",
    "VisPrunerConfig",
    "adaptive_nms",
    "adaptive_nms_order",
    "adaptprune_scores",
    "adaptprune_select",
    "center_prior",
    "concat_layouts",
    "divprune_select",
    "feature_keys",
    "grid_layout",
    "grid_side",
    "l2_normalize",
    "last_token_attention",
    "layout_center_prior",
    "make_config",
    "methods",
    "newline_grid_layout",
    "off_grid_layout",
    "pair_factor",
    "random_select",
    "register",
    "resolve_keep",
    "rms_norm",
    "square_layout",
    "stack_layouts",
    "suppression_factors",
    "topk_select",
    "uniform_grid_indices",
    "uniform_layout_select",
    "uniform_select",
    "window_suppression_factors",
]
