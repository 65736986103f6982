"""Prefill with visual-token pruning, once for every decoder family.

A decoder family supplies its layers through a small protocol (``DecoderLayer``); this module runs
the prompt through them, and at each of a method's stages computes the cues the method asked for,
lets the method select, and compacts the sequence to the text tokens plus the kept image tokens.
Kept tokens keep their ORIGINAL positions (or are renumbered, if the method says so), so the one
masking rule of ``models.layers`` (a key is visible when 0 <= its position <= the query's) still
gives every layer its causal mask over a sequence with gaps. A method that merges inside the LLM
(``merges_in_llm``) also builds tokens at a stage: they go right after the last kept image token
and are image tokens of the later stages.

Image tokens are data, not a count: ``ImageTokens`` holds each row's image-token slots in the
sequence and their ``TokenLayout`` (coordinates, grid, validity), so rows may hold image tokens at
different places and in different numbers while shapes stay static. A compacted row keeps ``S - N +
keep`` slots, so a row's text must fit in ``S - N`` slots (the prompt batcher pads to that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

import adaptprune_jax as prune
from models.layers import EINSUM, EMPTY_POSITION, StageCache, attention_mask, new_stage_cache, rows_take


class DecoderLayer(Protocol):
    """What the pruning driver needs of a decoder layer."""

    sliding_window: int | None
    """Keys less than this many positions before a query are seen (None: all earlier keys)."""

    def prefill(
        self, x: jax.Array, positions: jax.Array, *, attention: str | None = None, cache_slots: int = 0
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """Full-sequence step: (x out, post-RoPE q (B, S, H, D), k and v (B, S + cache_slots, Hkv, D),
        the prompt's keys and values followed by ``cache_slots`` empty slots, as the cache holds them);
        ``attention``: an implementation other than the layer's own, for this call."""

    def queries_keys(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Post-RoPE q (B, S, H, D) and k (B, S, Hkv, D) of this layer on its input, without running it."""

    def feature_keys(self, hidden: jax.Array, *, normalized: bool) -> jax.Array:
        """This layer's key projection of ``hidden`` (B, N, d) as unit float32 rows (B, N, Hkv * D)."""


class ImageTokens(NamedTuple):
    """Where each row's image tokens are: ``slots`` (B, N) int32 into the sequence, ``layout`` (B, N)."""

    slots: jax.Array
    layout: prune.TokenLayout


class PrefillState(NamedTuple):
    x: jax.Array  # (B, S', d) hidden states after the last layer
    positions: jax.Array  # (B, S') positions of the sequence the last layer saw (-1 = padding)
    last_index: jax.Array  # (B,) slot of each row's last prompt token in that sequence
    caches: list[StageCache]  # one per run of layers between stages, in layer order
    # (B, keep) kept indices into the original image tokens, ascending, then -1 for each token a
    # method merged inside the LLM (those follow the kept ones in the sequence)
    kept: jax.Array | None


def prefill(
    layers: Sequence[DecoderLayer],
    x: jax.Array,
    positions: jax.Array,
    last_index: jax.Array,
    image: ImageTokens,
    *,
    extra_slots: int,
    pruning: prune.PruneConfig | None = None,
    rng: jax.Array | None = None,
    vision: dict[str, jax.Array] | None = None,
    final_norm: Callable[[jax.Array], jax.Array] | None = None,
) -> PrefillState:
    """Run the prompt through ``layers``, pruning image tokens at each of the method's stages.

    x (B, S, d) input embeddings (image features in place); positions (B, S) (-1 = padding);
    last_index (B,) slot of each row's last prompt token; vision: the vision tower's cues the method
    asked for (``vision_attention`` (B, N); ``vision_tokens`` and ``vision_keys`` (B, 1 + N, .), which
    describe the unpruned image and so serve a method's first stage; ``image_embeds``, ``text_embeds``
    and ``text_mask``, CLIP's joint space); final_norm: the LLM's final
    norm, for a ``LayerView(final_norm=True)`` cue.
    """
    vision = dict(vision or {})
    num_image_tokens = image.slots.shape[1]
    stages = {} if pruning is None else dict(pruning.stages(num_image_tokens, len(layers)))
    requests = () if pruning is None else pruning.cue_requests()
    reads_previous = any(request.reads_previous_layer for request in requests)
    # Runs of layers between stages: (positions, last_index, keys, values) of each.
    runs: list[tuple[jax.Array, jax.Array, list[jax.Array], list[jax.Array]]] = []
    renumbers = pruning is not None and pruning.renumber_positions
    merges = pruning is not None and pruning.merges_in_llm
    if merges and not renumbers:
        raise ValueError(
            f"{pruning.name} merges tokens inside the LLM, which needs renumber_positions: a merged "
            "token has no position of its own in the prompt."
        )
    kept = None
    previous = None  # (q, k, positions) of the layer before a stage, when a cue reads it
    # The unpruned prompt, and each current slot's slot in it (for an InputEmbeddings cue).
    original = (x, positions, image.slots)
    origin = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
    gapped = False  # positions skip the pruned tokens' (a windowed fused kernel counts slots: einsum then)
    for layer_index, layer in enumerate(layers):
        if layer_index in stages:
            stage = sorted(stages).index(layer_index)
            cues = _cues(
                pruning,
                layer,
                x,
                positions,
                image,
                previous,
                last_index,
                rng,
                vision,
                stage,
                final_norm,
                prune.InputEmbeddingsArrays(*original, origin),
            )
            if merges:
                selected, merged = pruning.select_and_merge(cues, stages[layer_index])
            else:
                selected, merged = pruning.select(cues, stages[layer_index]), None
            x, positions, last_index, image, origin = _compact(
                x, positions, last_index, image, origin, selected, merged
            )
            kept = selected if kept is None else rows_take(kept, selected)
            if merged is not None:
                kept = jnp.concatenate([kept, jnp.full(merged.shape[:2], -1, kept.dtype)], axis=1)
            gapped = not renumbers
            if renumbers:  # pre-LLM methods as released: a shorter prompt
                positions = jnp.where(positions >= 0, jnp.arange(positions.shape[1])[None], EMPTY_POSITION)
            if "vision_attention" in vision:
                if merged is not None:
                    raise ValueError(f"{pruning.name}: a merged token has no vision-tower attention")
                vision["vision_attention"] = rows_take(vision["vision_attention"], selected)
        exact_only = gapped and layer.sliding_window is not None
        x, q, k, v = layer.prefill(
            x, positions, attention=EINSUM if exact_only else None, cache_slots=extra_slots
        )
        if reads_previous and layer_index + 1 in stages:
            previous = (q, k[:, : positions.shape[1]], positions)
        if layer_index == 0 or layer_index in stages:
            runs.append((positions, last_index, [], []))
        runs[-1][2].append(k)
        runs[-1][3].append(v)
    caches = []
    for run_positions, run_last_index, keys, values in runs:
        shift = None
        if renumbers:  # each run continues its own numbering from its own last prompt token
            shift = _last_position(run_positions, run_last_index) - _last_position(positions, last_index)
        caches.append(new_stage_cache(keys, values, run_positions, extra_slots, shift))
    return PrefillState(x, positions, last_index, caches, kept)


def _last_position(positions: jax.Array, last_index: jax.Array) -> jax.Array:
    """(B,) each row's position of its last prompt token."""
    return rows_take(positions, last_index[:, None])[:, 0]


def _last_token_attention(q, k, positions, last_index, image, sliding_window):
    """Head-mean attention of each row's last prompt token over its image tokens (B, N), float32."""
    last_query = rows_take(q, last_index[:, None])[:, 0]
    key_mask = attention_mask(rows_take(positions, last_index[:, None]), positions, sliding_window)[:, 0]
    return rows_take(prune.last_token_attention(last_query, k, key_mask), image.slots)


def _cues(
    pruning,
    layer,
    x,
    positions,
    image,
    previous,
    last_index,
    rng,
    vision,
    stage,
    final_norm,
    inputs,
):
    """The cues the method asked for, restricted to the image tokens (a static choice per method)."""
    fields = {}
    image_hidden = rows_take(x, image.slots)
    for request in pruning.cue_requests():
        if isinstance(request, prune.LastTokenAttention):
            fields["attention"] = _last_token_attention(*previous, last_index, image, layer.sliding_window)
        elif isinstance(request, prune.StageAttention):
            fields["attention"] = _last_token_attention(
                *layer.queries_keys(x, positions), positions, last_index, image, layer.sliding_window
            )
        elif isinstance(request, prune.QueryAttention):
            q, k, _ = previous  # the same positions: nothing is pruned between the two layers
            fields["query_attention"] = rows_take(
                _head_mean_attention(q, k, positions, layer.sliding_window).swapaxes(1, 2), image.slots
            ).swapaxes(1, 2)
            is_image = _slot_mask(image.slots, image.layout.valid, positions.shape[1])
            fields["query_mask"] = (positions >= 0) & ~is_image
        elif isinstance(request, prune.FeatureKeys):
            fields["keys"] = layer.feature_keys(image_hidden, normalized=request.normalized)
        elif isinstance(request, prune.Embeddings):
            fields["embeddings"] = image_hidden
        elif isinstance(request, prune.VisionClsAttention):
            fields["vision_attention"] = vision["vision_attention"]
        elif isinstance(request, prune.VisionTokens):
            fields["vision_tokens"], fields["vision_keys"] = vision["vision_tokens"], vision["vision_keys"]
        elif isinstance(request, prune.JointEmbeddings):
            for name in ("image_embeds", "text_embeds", "text_mask"):
                fields[name] = vision[name]
        elif isinstance(request, prune.LayerView):
            q, k, _ = previous  # the same positions: nothing is pruned between the two layers
            hidden = final_norm(x) if request.final_norm else x
            fields["view"] = prune.LayerViewArrays(q, k, hidden, positions, image.slots)
        elif isinstance(request, prune.InputEmbeddings):
            fields["inputs"] = inputs
        else:
            raise ValueError(f"{pruning.name} asks for an unknown cue {request!r}")
    return prune.Cues(
        **fields,
        layout=image.layout,
        rng=rng,
        batch_size=x.shape[0],
        num_image_tokens=image.slots.shape[1],
        stage=stage,
    )


def _head_mean_attention(
    q: jax.Array, k: jax.Array, positions: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """(B, S, S) float32 attention probabilities of every query over every key, averaged over heads."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, k.astype(jnp.float32)) * head_dim**-0.5
    mask = attention_mask(positions, positions, sliding_window)[:, None, None]
    probabilities = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.mean(jnp.where(mask, probabilities, 0.0), axis=(1, 2))


def _slot_mask(slots: jax.Array, valid: jax.Array, length: int) -> jax.Array:
    """(B, length) bool: True at the sequence slots in ``slots`` whose ``valid`` is set."""
    batch = slots.shape[0]
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, length), bool).at[rows, jnp.where(valid, slots, length)].set(True, mode="drop")


def _compact(x, positions, last_index, image: ImageTokens, origin, kept: jax.Array, merged=None):
    """Keep every non-image slot and the kept image slots, in their original order (static length);
    a merging method's ``merged`` tokens (B, c, d) go right after the last kept image token.

    Every row keeps exactly ``S - N + keep (+ c)`` slots (padding included, still marked -1), so the
    result has a static shape; a row's last prompt token moves to its slot in the new sequence.
    Merged tokens get position 0 here (renumbering follows) and origin -1; they join the image tokens
    after the kept ones, valid and on no grid.
    """
    batch, length = positions.shape
    num_image_tokens, keep = image.slots.shape[1], kept.shape[1]
    count = 0 if merged is None else merged.shape[1]
    slots = jnp.arange(length)
    in_image = _slot_mask(image.slots, image.layout.valid, length)
    kept_slots = rows_take(image.slots, kept)
    kept_image = _slot_mask(kept_slots, jnp.ones_like(kept, bool), length)
    keep_mask = ~in_image | kept_image
    new_length = length - num_image_tokens + keep + count
    # Sort keys: slot s at s * (c + 1), merged token m right after the last kept image slot, dropped
    # slots beyond every kept one.
    stride = count + 1
    keys = jnp.where(keep_mask, slots * stride, (slots + length) * stride)
    new_slot = jnp.cumsum(keep_mask, axis=1) - 1
    kept_layout = jax.tree_util.tree_map(lambda a: rows_take(jnp.asarray(a), kept), image.layout)
    new_image_slots = rows_take(new_slot, kept_slots)
    if count:
        last_kept = jnp.max(kept_slots, axis=1, keepdims=True)
        keys = jnp.concatenate([keys, last_kept * stride + 1 + jnp.arange(count)[None]], axis=1)
        new_slot = new_slot + count * (slots[None] > last_kept)
        merged_slots = rows_take(new_slot, last_kept) + 1 + jnp.arange(count)[None]
        new_image_slots = jnp.concatenate([new_image_slots, merged_slots], axis=1)
        kept_layout = _with_merged_tokens(kept_layout, count)
        x = jnp.concatenate([x, merged.astype(x.dtype)], axis=1)
        positions = jnp.concatenate([positions, jnp.zeros((batch, count), positions.dtype)], axis=1)
        origin = jnp.concatenate([origin, jnp.full((batch, count), -1, origin.dtype)], axis=1)
    order = jnp.argsort(keys, axis=1)[:, :new_length]
    new_last = jnp.take_along_axis(new_slot, last_index[:, None], axis=1)[:, 0]
    new_image = ImageTokens(new_image_slots.astype(jnp.int32), kept_layout)
    return (
        rows_take(x, order),
        rows_take(positions, order),
        new_last,
        new_image,
        rows_take(origin, order),
    )


def _with_merged_tokens(layout: prune.TokenLayout, count: int) -> prune.TokenLayout:
    """``layout`` (B, k) followed by ``count`` merged tokens: valid, on no grid."""
    batch = layout.valid.shape[0]

    def append(field, value):
        return jnp.concatenate([field, jnp.full((batch, count), value, field.dtype)], axis=1)

    return layout.replace(
        row=append(layout.row, 0),
        col=append(layout.col, 0),
        grid=append(layout.grid, prune.NO_GRID),
        grid_rows=append(layout.grid_rows, 0),
        grid_cols=append(layout.grid_cols, 0),
        valid=append(layout.valid, True),
    )
