"""Typed configs, one per pruning method, and the registry that names them.

A config is the single place a method's settings live. It tells the model where to prune (``layer``),
which cues to compute (``needs_*``), how many tokens to keep (``resolve_keep``), and turns those
cues into kept indices (``select``). Configs are frozen and hashable, so a bound ``select`` can be
``jax.jit``-ed with ``keep`` static.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from adaptprune_jax.baselines import divprune_select, random_select, topk_select, uniform_select
from adaptprune_jax.grid import DEFAULT_PRIOR_SIGMA, grid_side
from adaptprune_jax.nms import (
    DEFAULT_DISTANCE_LIMIT,
    DEFAULT_DISTANCE_SIGMA,
    DEFAULT_SIMILARITY_SIGMA,
    NMS_IMPLEMENTATIONS,
    adaptprune_select,
)

DEFAULT_KEEP_RATIO = 0.1  # The released code keeps int(576 * 0.1) = 57 image tokens.
DEFAULT_LAYER = 2  # Prune after layer K - 1 = 1, i.e. layers K.. see the kept tokens.


@struct.dataclass
class Cues:
    """What the model hands to ``select``: each field is filled only if the method needs it.

    attention: (B, N) float32 attention cue restricted to the image tokens.
    keys: (B, N, D) feature keys (AdaptPrune); embeddings: (B, N, D) projected image embeddings
    (DivPrune); rng: a PRNG key (Random; falls back to the config's seed).
    batch_size / num_image_tokens: static sizes, needed only when no array above carries them
    (Random and Uniform use no array cue).
    """

    attention: jax.Array | None = None
    keys: jax.Array | None = None
    embeddings: jax.Array | None = None
    rng: jax.Array | None = None
    batch_size: int | None = struct.field(pytree_node=False, default=None)
    num_image_tokens: int | None = struct.field(pytree_node=False, default=None)

    def batch_and_tokens(self) -> tuple[int, int]:
        """(B, N), from the first array cue present, else from the static fields."""
        for array in (self.attention, self.keys, self.embeddings):
            if array is not None:
                return int(array.shape[0]), int(array.shape[1])
        if self.batch_size is None or self.num_image_tokens is None:
            raise ValueError("Cues carries no array cue, so batch_size and num_image_tokens must be set.")
        return int(self.batch_size), int(self.num_image_tokens)


def _require(cues: Cues, field: str, method: str) -> jax.Array:
    value = getattr(cues, field)
    if value is None:
        raise ValueError(f"{method} needs cues.{field}, which is None.")
    return value


def _check_keep_type(keep: Any) -> None:
    """Checks on ``keep`` that need no token count (also run when a config is built)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(
            f"keep must be an int count or a float ratio in (0, 1], got {type(keep).__name__} {keep!r}."
        )
    if isinstance(keep, numbers.Integral) and keep <= 0:
        raise ValueError(f"keep={keep} must be >= 1: a count of image tokens, or a ratio in (0, 1].")
    if not isinstance(keep, numbers.Integral) and not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep ratio {keep} is outside (0, 1]; pass an int for a token count.")


def resolve_keep(keep: int | float, num_image_tokens: int) -> int:
    """An int count is taken as is; a float is a ratio in (0, 1]: ``int(num_image_tokens * keep)``."""
    _check_keep_type(keep)
    if isinstance(keep, numbers.Integral):
        if keep > num_image_tokens:
            raise ValueError(
                f"keep={int(keep)} exceeds num_image_tokens={num_image_tokens}: allowed counts are "
                f"1..{num_image_tokens}, or a ratio in (0, 1]."
            )
        return int(keep)
    ratio = float(keep)
    count = int(num_image_tokens * ratio)
    if count < 1:
        raise ValueError(
            f"keep ratio {ratio} of num_image_tokens={num_image_tokens} gives int({num_image_tokens} * "
            f"{ratio}) = 0 tokens; allowed ratios keep at least 1 token (>= {1 / num_image_tokens:.4g})."
        )
    return count


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Shared behaviour; subclasses set the class-level facts and implement ``select``."""

    name: ClassVar[str]
    needs_attention: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    needs_embeddings: ClassVar[bool] = False
    needs_square_grid: ClassVar[bool] = False
    min_layer: ClassVar[int] = 0  # 1 for methods that read the attention of layer K - 1.

    keep: int | float = DEFAULT_KEEP_RATIO
    layer: int = DEFAULT_LAYER

    def __post_init__(self):
        _check_keep_type(self.keep)
        if isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral):
            raise ValueError(f"layer must be an int, got {type(self.layer).__name__} {self.layer!r}.")
        if self.layer < self.min_layer:
            raise ValueError(
                f"layer={self.layer} is too small for {self.name}: allowed layer >= {self.min_layer}"
                + (" (the attention cue is read at layer K - 1)." if self.min_layer else ".")
            )

    def resolve_keep(self, num_image_tokens: int) -> int:
        """The number of image tokens to keep for ``num_image_tokens`` image tokens."""
        return resolve_keep(self.keep, num_image_tokens)

    def validate(self, num_image_tokens: int, num_layers: int) -> None:
        """Raise ValueError unless this config fits a model with these sizes."""
        self.resolve_keep(num_image_tokens)
        if not self.min_layer <= self.layer <= num_layers - 1:
            raise ValueError(
                f"layer={self.layer} is out of range for {self.name} with num_layers={num_layers}: "
                f"allowed {self.min_layer}..{num_layers - 1}"
                + (" (the attention cue is read at layer K - 1)." if self.min_layer else ".")
            )
        if self.needs_square_grid:
            try:
                grid_side(num_image_tokens)
            except ValueError as error:
                raise ValueError(f"{self.name}: {error}") from None

    def equivalent_tokens(self, num_image_tokens: int, num_layers: int) -> float:
        """Image tokens per layer averaged over all layers: ``(K * N + (L - K) * keep) / L``."""
        keep = self.resolve_keep(num_image_tokens)
        return (self.layer * num_image_tokens + (num_layers - self.layer) * keep) / num_layers

    def select(self, cues: Cues, keep: int) -> jax.Array:
        """Kept image-token indices, int32 (B, keep), distinct and sorted ascending."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AdaptPruneConfig(PruneConfig):
    """AdaptPrune: attention x centre prior, adaptive NMS over spatial distance and key similarity.

    ``normalize_keys`` asks the model for RMSNorm-ed feature keys (the clean variant); the default
    False reproduces the released code's un-normalised projection (QUIRK). ``nms_implementation``
    picks how the greedy loop runs ('auto' = the Pallas kernel on GPU, else XLA); all select the same tokens.
    """

    name: ClassVar[str] = "adaptprune"
    needs_attention: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True
    needs_square_grid: ClassVar[bool] = True
    min_layer: ClassVar[int] = 1

    prior_sigma: float = DEFAULT_PRIOR_SIGMA
    distance_limit: float = DEFAULT_DISTANCE_LIMIT
    distance_sigma: float = DEFAULT_DISTANCE_SIGMA
    similarity_sigma: float = DEFAULT_SIMILARITY_SIGMA
    normalize_keys: bool = False
    nms_implementation: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.nms_implementation not in NMS_IMPLEMENTATIONS:
            raise ValueError(
                f"nms_implementation must be one of {', '.join(NMS_IMPLEMENTATIONS)}, "
                f"got {self.nms_implementation!r}."
            )
        for field in ("prior_sigma", "distance_sigma", "similarity_sigma"):
            _check_positive(field, getattr(self, field))
        if isinstance(self.distance_limit, bool) or not isinstance(self.distance_limit, numbers.Real):
            raise ValueError(f"distance_limit must be a number, got {self.distance_limit!r}.")
        if not isinstance(self.normalize_keys, bool):
            raise ValueError(f"normalize_keys must be a bool, got {self.normalize_keys!r}.")

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return adaptprune_select(
            _require(cues, "attention", self.name),
            _require(cues, "keys", self.name),
            keep,
            prior_sigma=self.prior_sigma,
            distance_limit=self.distance_limit,
            distance_sigma=self.distance_sigma,
            similarity_sigma=self.similarity_sigma,
            implementation=self.nms_implementation,
        )


@dataclasses.dataclass(frozen=True)
class FastVConfig(PruneConfig):
    """FastV: the top-``keep`` image tokens by the last prompt token's attention, no prior."""

    name: ClassVar[str] = "fastv"
    needs_attention: ClassVar[bool] = True
    min_layer: ClassVar[int] = 1

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return topk_select(_require(cues, "attention", self.name), keep)


@dataclasses.dataclass(frozen=True)
class RandomConfig(PruneConfig):
    """Random: ``keep`` image tokens uniformly at random, from ``cues.rng`` or else ``seed``."""

    name: ClassVar[str] = "random"

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}.")

    def select(self, cues: Cues, keep: int) -> jax.Array:
        batch, num_tokens = cues.batch_and_tokens()
        rng = cues.rng if cues.rng is not None else jax.random.key(self.seed)
        return random_select(rng, num_tokens, keep, (batch,))


@dataclasses.dataclass(frozen=True)
class UniformConfig(PruneConfig):
    """Uniform: a regular sub-grid of the image tokens (see ``uniform_grid_indices``), no scores."""

    name: ClassVar[str] = "uniform"
    needs_square_grid: ClassVar[bool] = True

    def select(self, cues: Cues, keep: int) -> jax.Array:
        batch, num_tokens = cues.batch_and_tokens()
        return jnp.broadcast_to(uniform_select(num_tokens, keep), (batch, keep))


@dataclasses.dataclass(frozen=True)
class DivPruneConfig(PruneConfig):
    """DivPrune: max-min diversity on the projected image embeddings, before the LLM (layer 0).

    ``renumber_positions`` (default True, as the released code behaves): the kept features are cut
    out before the sequence is built, so the shorter sequence gets contiguous RoPE positions. False
    keeps the original positions, as the in-LLM methods do.
    """

    name: ClassVar[str] = "divprune"
    needs_embeddings: ClassVar[bool] = True
    layer: ClassVar[int] = 0  # Fixed: it prunes the LLM's input, so every layer sees the kept set.

    renumber_positions: bool = True

    def __post_init__(self):
        _check_keep_type(self.keep)
        if not isinstance(self.renumber_positions, bool):
            raise ValueError(f"renumber_positions must be a bool, got {self.renumber_positions!r}.")

    def select(self, cues: Cues, keep: int) -> jax.Array:
        return divprune_select(_require(cues, "embeddings", self.name), keep)


@dataclasses.dataclass(frozen=True)
class FixedIndicesConfig(PruneConfig):
    """Prune at ``layer`` to precomputed ``indices`` (the same for every row): no cue, no selection.

    For measuring what selection costs (a prefill with fixed indices against one that selects) and
    for replaying a selection made elsewhere (another framework, another run).
    """

    name: ClassVar[str] = "fixed"

    indices: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        indices = tuple(self.indices)
        if not indices or list(indices) != sorted(set(indices)) or indices[0] < 0:
            raise ValueError(f"indices must be distinct, ascending and >= 0, got {self.indices!r}.")
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "keep", len(indices))

    def validate(self, num_image_tokens: int, num_layers: int) -> None:
        super().validate(num_image_tokens, num_layers)
        if self.indices[-1] >= num_image_tokens:
            raise ValueError(f"index {self.indices[-1]} out of range for {num_image_tokens} image tokens.")

    def select(self, cues: Cues, keep: int) -> jax.Array:
        batch, _ = cues.batch_and_tokens()
        return jnp.broadcast_to(jnp.asarray(self.indices, jnp.int32), (batch, keep))


METHODS: dict[str, type[PruneConfig]] = {
    config.name: config
    for config in (AdaptPruneConfig, FastVConfig, RandomConfig, UniformConfig, DivPruneConfig)
}


def make_config(name: str, **kwargs: Any) -> PruneConfig:
    """Build the config of method ``name`` with the given settings."""
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(sorted(METHODS))}.")
    config_class = METHODS[name]
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} for {name}; known settings: {', '.join(sorted(known))}."
        )
    return config_class(**kwargs)
