"""What every pruning method shares: its config base class, the cues it may ask for, and keep counts.

A method is one frozen dataclass (its settings, validated on construction) that declares what the
model must do for it, and turns the cues it asked for into kept indices:

* where it prunes: ``stages()``, one ``(layer, keep)`` per pruning step; layer 0 prunes the LLM's
  input (before any decoder layer), layer K prunes before decoder layer K;
* which cues it needs: ``cue_requests()``, instances of the cue classes below (computed by the
  model only when asked, with static shapes);
* whether kept tokens keep their RoPE positions (``renumber_positions``), whether it has a layer
  setting (``has_layer``) or a seed (``takes_seed``), whether it builds tokens of its own before the
  LLM (``merges``) or inside it (``merges_in_llm``), and whether a PyTorch reference of its
  selection exists (``has_torch_reference``).

Nothing outside a method's own file tests a method by name.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from flax import struct

from adaptprune_jax.grid import NO_GRID, TokenLayout, grid_side

DEFAULT_KEEP_RATIO = 0.1  # The released AdaptPrune code keeps int(576 * 0.1) = 57 image tokens.
DEFAULT_LAYER = 2  # Prune after layer K - 1 = 1, i.e. layers K.. see the kept tokens.


# --- cues a method can ask for -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LastTokenAttention:
    """Head-mean attention of the last prompt token over the image tokens at layer K - 1: (B, N)."""

    reads_previous_layer: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class StageAttention:
    """Head-mean attention of the last prompt token over the image tokens in the stage's own layer K,
    from the hidden states entering it before the stage prunes: (B, N) in ``attention``
    (PyramidDrop ranks with the layer it prunes in front of)."""

    reads_previous_layer: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class QueryAttention:
    """Head-mean attention rows of every query token over the image tokens at layer K - 1:
    ``query_attention`` (B, S, N) with ``query_mask`` (B, S) marking the text tokens of the prompt
    (the raters of SparseVLM-style methods)."""

    reads_previous_layer: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class FeatureKeys:
    """Layer K's key projection of the image tokens' residual stream, L2-normalised: (B, N, Hkv*D).

    ``normalized`` applies the layer's input RMSNorm first; the released AdaptPrune code does not.
    """

    normalized: bool = False
    reads_previous_layer: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """The hidden states entering layer K at the image tokens: (B, N, d). At K = 0 these are the
    projected image features the LLM receives."""

    reads_previous_layer: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class VisionClsAttention:
    """The vision tower's head-mean [CLS]-to-image-token attention, (B, N), in the encoder layer whose
    output is ``hidden_states[layer]`` (VisionZip, VisPruner and FasterVLM read layer -2)."""

    layer: int = -2
    reads_previous_layer: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    """The image features before the projector, [CLS] included: ``vision_tokens`` (B, 1 + N, d_vision),
    the vision tower's ``hidden_states[layer]`` (LLaVA-1.5's feature layer, -2), and ``vision_keys``
    (B, 1 + N, head_dim), the head-mean key projection of the encoder layer that produced them (what
    VisionZip merges by). Methods that ask for it build the LLM's image tokens themselves (``merges``)."""

    layer: int = -2
    reads_previous_layer: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class JointEmbeddings:
    """The image and the question in CLIP's joint image-text space (what CDPruner's relevance reads):
    ``image_embeds`` (B, N, C_proj), the vision tower's ``hidden_states[layer]`` patches through its
    post_layernorm and visual_projection; ``text_embeds`` (B, M, C_proj), the CLIP text tower's
    projected output for each of the question's segments of ``max_position_embeddings`` tokens, and
    ``text_mask`` (B, M) bool, False on the segments a shorter question leaves empty (every row has
    at least one). The model needs the CLIP text tower to compute it (``needs_text_tower``)."""

    layer: int = -2
    reads_previous_layer: ClassVar[bool] = False
    needs_text_tower: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class LayerView:
    """Everything a method needs to compute a cue of its own: layer K - 1's post-RoPE queries and
    keys, the hidden states entering layer K, the positions and the image tokens' slots.

    ``final_norm``: the hidden states pass through the LLM's final norm first (as the LM head sees
    them; DART compares tokens there)."""

    final_norm: bool = False
    reads_previous_layer: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class InputEmbeddings:
    """The LLM's layer-0 input of the unpruned prompt, and where each slot of the sequence entering
    the stage came from: ``inputs`` (``InputEmbeddingsArrays``). A method that picks tokens of the
    prompt once (SparseVLM's text raters) finds them again in every later, shorter sequence."""

    reads_previous_layer: ClassVar[bool] = False


class InputEmbeddingsArrays(NamedTuple):
    """The arrays behind an ``InputEmbeddings`` request."""

    embeddings: jax.Array  # (B, S0, d) layer-0 input of the unpruned prompt (image features in place)
    positions: jax.Array  # (B, S0) int32 its positions, -1 = padding
    image_slots: jax.Array  # (B, N0) int32 its image tokens' slots
    origin: jax.Array  # (B, S) int32 each current slot's slot in that prompt; -1: a token a method built


class LayerViewArrays(NamedTuple):
    """The arrays behind a ``LayerView`` request."""

    queries: jax.Array  # (B, S, H, D) post-RoPE, layer K - 1
    keys: jax.Array  # (B, S, Hkv, D) post-RoPE, layer K - 1
    hidden: jax.Array  # (B, S, d) entering layer K (after the final norm, if asked)
    positions: jax.Array  # (B, S) int32, -1 = padding
    image_slots: jax.Array  # (B, N) int32 sequence slot of each image token


CUE_TYPES = (
    LastTokenAttention,
    StageAttention,
    QueryAttention,
    FeatureKeys,
    Embeddings,
    VisionClsAttention,
    VisionTokens,
    JointEmbeddings,
    LayerView,
    InputEmbeddings,
)


@struct.dataclass
class Cues:
    """What the model hands to ``select``: each field is filled only if the method asked for it.

    attention: (B, N) float32 (LastTokenAttention, StageAttention); query_attention (B, S, N) and query_mask (B, S)
    (QueryAttention); keys: (B, N, D) (FeatureKeys); embeddings: (B, N, d) (Embeddings);
    vision_attention: (B, N) (VisionClsAttention); vision_tokens (B, 1 + N, d_vision) and vision_keys
    (B, 1 + N, head_dim) (VisionTokens); image_embeds (B, N, C_proj), text_embeds (B, M, C_proj) and
    text_mask (B, M) (JointEmbeddings); view: LayerViewArrays (LayerView); inputs:
    InputEmbeddingsArrays (InputEmbeddings).
    layout: the image tokens' TokenLayout, (B, N); rng: a PRNG key for methods that take a seed.
    batch_size / num_image_tokens: static sizes, for methods that read no array.
    stage: which of the method's stages this is (static).
    """

    attention: jax.Array | None = None
    query_attention: jax.Array | None = None
    query_mask: jax.Array | None = None
    keys: jax.Array | None = None
    embeddings: jax.Array | None = None
    vision_attention: jax.Array | None = None
    vision_tokens: jax.Array | None = None
    vision_keys: jax.Array | None = None
    image_embeds: jax.Array | None = None
    text_embeds: jax.Array | None = None
    text_mask: jax.Array | None = None
    view: LayerViewArrays | None = None
    inputs: InputEmbeddingsArrays | None = None
    layout: TokenLayout | None = None
    rng: jax.Array | None = None
    batch_size: int | None = struct.field(pytree_node=False, default=None)
    num_image_tokens: int | None = struct.field(pytree_node=False, default=None)
    stage: int = struct.field(pytree_node=False, default=0)

    def batch_and_tokens(self) -> tuple[int, int]:
        """(B, N), from the first array cue present, else from the static fields."""
        for array in (self.attention, self.keys, self.embeddings, self.vision_attention, self.image_embeds):
            if array is not None:
                return int(array.shape[0]), int(array.shape[1])
        if self.layout is not None and self.layout.valid.ndim == 2:
            return int(self.layout.valid.shape[0]), int(self.layout.valid.shape[1])
        if self.batch_size is None or self.num_image_tokens is None:
            raise ValueError("Cues carries no array cue, so batch_size and num_image_tokens must be set.")
        return int(self.batch_size), int(self.num_image_tokens)

    def valid(self) -> jax.Array | None:
        """(B, N) bool slots holding an image token, or None when every slot does."""
        return None if self.layout is None or self.layout.dense else self.layout.valid

    def require_dense(self, method: str) -> None:
        """Refuse layouts with padding slots (for methods whose released algorithm has no mask)."""
        if self.valid() is not None:
            raise ValueError(f"{method}: image-token layouts with padding slots are not supported")

    def require(self, field: str, method: str) -> jax.Array:
        value = getattr(self, field)
        if value is None:
            raise ValueError(f"{method} needs cues.{field}, which is None.")
        return value


class MergedTokens(NamedTuple):
    """What a merging method gives the LLM in place of the image features (see ``PruneConfig.merge``)."""

    features: jax.Array  # (B, keep, d_vision): the image tokens the LLM sees, before the projector
    kept: jax.Array  # (B, k) int32, ascending: the image tokens passed through unchanged among them


class KeptAndMerged(NamedTuple):
    """What a method that merges inside the LLM (``PruneConfig.merges_in_llm``) returns at a stage."""

    kept: jax.Array  # (B, k) int32, ascending: the image tokens kept as they are
    merged: jax.Array  # (B, c, d) hidden states of the tokens it built, inserted after the kept ones


class Stage(NamedTuple):
    """One pruning step: before decoder layer ``layer`` (0 = the LLM's input), keep ``keep`` tokens."""

    layer: int
    keep: int


# --- keep counts and checks --------------------------------------------------------------------


class UnsupportedBudget(ValueError):
    """A method has no setting for this budget (its released code ships a table of budgets): a sweep
    over budgets skips the pair instead of failing."""


def check_keep_type(keep: Any) -> None:
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
    check_keep_type(keep)
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


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}.")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}.")


# --- the config base class ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Shared behaviour of every method; subclasses set the class-level facts and implement ``select``."""

    name: ClassVar[str]
    has_layer: ClassVar[bool] = True
    takes_seed: ClassVar[bool] = False
    has_torch_reference: ClassVar[bool] = False
    renumber_positions: ClassVar[bool] = False
    needs_grid: ClassVar[bool] = False  # spatial methods: every image token must sit on a grid
    # ... except tokens on no grid (newline, [CLS]) that the method keeps outright, counted in keep.
    keeps_off_grid_tokens: ClassVar[bool] = False
    # The LLM sees tokens the method builds (``merge``), not a subset of the image tokens.
    merges: ClassVar[bool] = False
    # At each stage the method keeps some image tokens and builds others from the hidden states
    # entering the stage (``select_and_merge``); only with renumbered positions (a built token has no
    # position of its own in the prompt).
    merges_in_llm: ClassVar[bool] = False
    # Its cues need CLIP's text tower and visual projection (``JointEmbeddings``), which LLaVA
    # checkpoints do not carry: the model must be loaded with them and given the questions' tokens.
    needs_text_tower: ClassVar[bool] = False
    # Settings under which the method runs on a small LLM (4 decoder layers, a few dozen image tokens)
    # where its released defaults need LLaVA-1.5-7B's sizes; the tests that build every registered
    # method add them.
    small_model_settings: ClassVar[dict[str, Any]] = {}

    keep: int | float = DEFAULT_KEEP_RATIO
    layer: int = DEFAULT_LAYER

    def __post_init__(self):
        check_keep_type(self.keep)
        if self.has_layer:
            check_int("layer", self.layer)
            if self.layer < self.min_layer:
                raise ValueError(
                    f"layer={self.layer} is too small for {self.name}: allowed layer >= {self.min_layer}"
                    + (" (the attention cue is read at layer K - 1)." if self.min_layer else ".")
                )

    # What the model must do -----------------------------------------------------------------
    def cue_requests(self) -> tuple[Any, ...]:
        """The cues ``select`` reads (instances of the classes in ``CUE_TYPES``)."""
        return ()

    def vision_layer(self) -> int | None:
        """The vision-tower layer the method's cues read (``hidden_states`` index; None: none)."""
        layers = {
            r.layer
            for r in self.cue_requests()
            if isinstance(r, (VisionClsAttention, VisionTokens, JointEmbeddings))
        }
        if len(layers) > 1:
            raise ValueError(f"{self.name} reads the vision tower at several layers {sorted(layers)}")
        return next(iter(layers), None)

    @property
    def min_layer(self) -> int:
        """1 when a cue is read at layer K - 1 (so K = 0 is impossible), else 0."""
        return int(any(request.reads_previous_layer for request in self.cue_requests()))

    def stages(self, num_image_tokens: int, num_layers: int | None = None) -> tuple[Stage, ...]:
        """The pruning steps, in layer order: one ``(layer, keep)`` for a single-step method
        (``num_layers``: the LLM's depth, for methods whose schedule follows it)."""
        return (Stage(self.layer, self.resolve_keep(num_image_tokens)),)

    def resolve_keep(self, num_image_tokens: int) -> int:
        """The number of image tokens the LLM finally sees, of ``num_image_tokens``."""
        return resolve_keep(self.keep, num_image_tokens)

    def validate(self, num_image_tokens: int, num_layers: int, layout: TokenLayout | None = None) -> None:
        """Raise ValueError unless this config fits a model with these sizes (and, for methods that
        need a grid, this host-side layout; without one, the tokens must form one square grid)."""
        if self.needs_grid:
            if layout is None:
                try:
                    grid_side(num_image_tokens)
                except ValueError as error:
                    raise ValueError(f"{self.name}: {error}") from None
            else:
                off_grid_per_row = np.sum(
                    (np.asarray(layout.grid) == NO_GRID) & np.asarray(layout.valid), axis=-1
                )
                off_grid = int(np.sum(off_grid_per_row))
                if off_grid and not self.keeps_off_grid_tokens:
                    raise ValueError(
                        f"{self.name}: needs every image token on a grid, but {off_grid} of the "
                        f"{num_image_tokens} image tokens sit on none (a [CLS] or newline token)."
                    )
                most = int(np.max(off_grid_per_row, initial=0))
                if off_grid and self.resolve_keep(num_image_tokens) <= most:
                    raise ValueError(
                        f"{self.name} keeps every image token on no grid (a [CLS] or newline token) and "
                        f"counts it in keep: keep={self.resolve_keep(num_image_tokens)} must exceed the "
                        f"{most} such tokens of a row, or no grid token is kept."
                    )
        if self.merges_in_llm and not self.renumber_positions:
            raise ValueError(
                f"{self.name} merges tokens inside the LLM, which needs renumber_positions: a merged "
                "token has no position of its own in the prompt."
            )
        stages = self.stages(num_image_tokens, num_layers)
        previous_layer, previous_keep = -1, num_image_tokens
        for stage in stages:
            if not self.min_layer <= stage.layer <= num_layers - 1:
                raise ValueError(
                    f"layer={stage.layer} is out of range for {self.name} with num_layers={num_layers}: "
                    f"allowed {self.min_layer}..{num_layers - 1}"
                    + (" (the attention cue is read at layer K - 1)." if self.min_layer else ".")
                )
            if stage.layer <= previous_layer or not 1 <= stage.keep <= previous_keep:
                raise ValueError(
                    f"{self.name}: stages must prune at increasing layers to non-increasing keep "
                    f"counts, got {stages}."
                )
            previous_layer, previous_keep = stage.layer, stage.keep

    def equivalent_tokens(self, num_image_tokens: int, num_layers: int) -> float:
        """Image tokens per layer averaged over all layers (``(K * N + (L - K) * keep) / L`` for one
        stage), so methods that prune at different depths are compared at equal cost."""
        total, seen, start = 0, num_image_tokens, 0
        for stage in self.stages(num_image_tokens, num_layers):
            total += (stage.layer - start) * seen
            seen, start = stage.keep, stage.layer
        total += (num_layers - start) * seen
        return total / num_layers

    # The selection --------------------------------------------------------------------------
    def select(self, cues: Cues, keep: int) -> jax.Array:
        """Kept image-token indices, int32 (B, keep), distinct and sorted ascending."""
        raise NotImplementedError

    def select_and_merge(self, cues: Cues, keep: int) -> KeptAndMerged:
        """For ``merges_in_llm`` methods: of the ``keep`` image tokens the stage leaves, the kept ones
        (indices into the current image tokens) and the built ones (hidden states). The model puts the
        built tokens right after the last kept image token; later stages see them as image tokens."""
        raise NotImplementedError

    def merge(self, cues: Cues, keep: int) -> MergedTokens:
        """For ``merges`` methods: the ``keep`` tokens the LLM sees in place of the image features,
        before the projector, from the ``VisionTokens`` cue. The model writes them into the first
        ``keep`` image slots and ``select`` keeps those slots."""
        raise NotImplementedError

    # The PyTorch reference (tests and experiments.validate) ---------------------------------
    reference_cues: ClassVar[tuple[str, ...]] = ()  # which of attention / keys / embeddings it reads
    reference_options: ClassVar[tuple[str, ...]] = ()  # settings the reference takes

    def torch_reference_order(self, cues: dict[str, Any], keep: int, grid: int | None):
        """Kept indices in pick order (a torch int64 tensor), as the released code selects them, for
        one image: ``cues`` maps each name in ``reference_cues`` to a float32 torch tensor."""
        raise ValueError(
            f"method {self.name!r} has no reference selection: pass the JAX side's indices "
            "as kept_image_indices to pruned_forward / reference_generate"
        )
