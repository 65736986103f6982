"""LLaMA decoder with a static, position-addressed KV cache and an optional pruning step at layer K.

The cache is an explicit pytree, one dict per layer: `k`, `v` (B, C, Hkv, D), `positions` (B, C) int32
(-1 for an empty slot) and `end_index` (the next slot to write). Layers below the pruning layer hold
the full prompt, layers from K on hold only the kept tokens: capacities differ per layer, and the
stored positions (with gaps) give every layer its attention mask.

Pruning (prefill only): the library (`adaptprune_jax`) scores and selects image tokens from cues the
decoder computes on the way (layer K-1's last-token attention, layer K's key projection, or the input
embeddings for pre-LLM methods); the decoder then compacts the sequence to the kept tokens with their
ORIGINAL positions and continues on the shorter sequence.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import adaptprune_jax as prune
from models.config import TextConfig
from models.layers import EMPTY_POSITION, Dense, RMSNorm, apply_rope, attend, attention_mask, normal_param

LayerCache = dict[str, jax.Array]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Dense(cfg.hidden_size, q_width, use_bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(cfg.hidden_size, kv_width, use_bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(cfg.hidden_size, kv_width, use_bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(q_width, cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Post-RoPE queries (B, S, H, D) and keys, and values (B, S, Hkv, D)."""
        batch, length, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        bias = cfg.mlp_bias
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(cfg, dtype=dtype, rngs=rngs)

    def _finish(self, x: jax.Array, attention_out: jax.Array) -> jax.Array:
        x = x + self.self_attn.o_proj(attention_out)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x: jax.Array, positions: jax.Array):
        """Full-sequence step from an empty cache: returns (x, q, k, v) with post-RoPE q and k."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        out = attend(q, k, v, attention_mask(positions, positions))
        return self._finish(x, out), q, k, v

    def decode(self, x: jax.Array, positions: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """One new token per row (x (B, 1, d), positions (B, 1)), written at the cache's end_index."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        slot = cache["end_index"]
        cache = {
            "k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k, slot, axis=1),
            "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v, slot, axis=1),
            "positions": jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions, slot, axis=1),
            "end_index": slot + 1,
        }
        out = attend(q, cache["k"], cache["v"], attention_mask(positions, cache["positions"]))
        return self._finish(x, out), cache


def new_layer_cache(k: jax.Array, v: jax.Array, positions: jax.Array, extra_slots: int) -> LayerCache:
    """A layer's cache holding the prefill keys/values plus `extra_slots` empty slots for decoding."""
    pad = ((0, 0), (0, extra_slots), (0, 0), (0, 0))
    return {
        "k": jnp.pad(k, pad),
        "v": jnp.pad(v, pad),
        "positions": jnp.pad(positions, ((0, 0), (0, extra_slots)), constant_values=EMPTY_POSITION),
        "end_index": jnp.asarray(positions.shape[1], jnp.int32),
    }


class PrefillResult(NamedTuple):
    logits: jax.Array  # (B, V) at the last prompt token, or (B, S', V) with all_logits
    caches: list[LayerCache]
    next_positions: jax.Array  # (B,) the RoPE position of the first generated token (original length)
    kept: jax.Array | None  # (B, keep) kept indices into the image span, ascending; None unpruned
    positions: jax.Array  # (B, S') positions of the sequence the last layer saw (-1 = padding)


def _rows_take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b, ...]] for every row b (index (B, n) into axis 1)."""
    expand = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, expand, axis=1)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None
            if tie_word_embeddings
            else Dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        )

    def embed(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], token_ids, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        """Float32 logits of the final-norm hidden states."""
        x = self.norm(x)
        weight = self.lm_head.kernel[...] if self.lm_head is not None else self.embed_tokens[...].T
        return jnp.matmul(x, weight, preferred_element_type=jnp.float32)

    def prefill(
        self,
        x: jax.Array,
        positions: jax.Array,
        last_index: jax.Array,
        *,
        image_start: jax.Array,
        num_image_tokens: int,
        extra_slots: int,
        pruning: Any = None,
        keep: int = 0,
        rng: jax.Array | None = None,
        all_logits: bool = False,
    ) -> PrefillResult:
        """Run the prompt through every layer, pruning image tokens before layer `pruning.layer`.

        x (B, S, d) input embeddings (image features already in place); positions (B, S) (-1 = padding);
        last_index (B,) slot of each row's last prompt token; image_start (B,) first image slot.
        """
        image_slots = image_start[:, None] + jnp.arange(num_image_tokens)
        prune_layer = pruning.layer if pruning is not None else -1
        caches, kept, attention_cue = [], None, None
        for layer_index, layer in enumerate(self.layers):
            if layer_index == prune_layer:
                cues = self._cues(pruning, layer, x, image_slots, attention_cue, rng)
                kept = pruning.select(cues, keep)
                x, positions, last_index = _compact(
                    x, positions, last_index, image_start, kept, num_image_tokens
                )
                if getattr(pruning, "renumber_positions", False):  # pre-LLM methods: a shorter prompt
                    positions = jnp.where(
                        positions >= 0, jnp.arange(positions.shape[1])[None], EMPTY_POSITION
                    )
            x, q, k, v = layer.prefill(x, positions)
            if pruning is not None and pruning.needs_attention and layer_index == prune_layer - 1:
                last_query = _rows_take(q, last_index[:, None])[:, 0]
                key_mask = attention_mask(_rows_take(positions, last_index[:, None]), positions)[:, 0]
                attention_cue = _rows_take(prune.last_token_attention(last_query, k, key_mask), image_slots)
            caches.append(new_layer_cache(k, v, positions, extra_slots))
        hidden = x if all_logits else _rows_take(x, last_index[:, None])[:, 0]
        next_positions = _rows_take(positions, last_index[:, None])[:, 0] + 1
        return PrefillResult(self.logits(hidden), caches, next_positions, kept, positions)

    def _cues(self, pruning, layer: LlamaDecoderLayer, x, image_slots, attention_cue, rng):
        """The cues the method asks for, restricted to the image tokens (static choice per method)."""
        image_hidden = _rows_take(x, image_slots)
        keys = embeddings = None
        if pruning.needs_features:
            projection = layer.self_attn.k_proj
            norm_scale = (
                layer.input_layernorm.scale[...] if getattr(pruning, "normalize_keys", False) else None
            )
            keys = prune.feature_keys(
                image_hidden,
                projection.kernel[...],
                projection.bias[...] if projection.bias is not None else None,
                norm_scale=norm_scale,
                norm_eps=self.cfg.rms_norm_eps,
            )
        if pruning.needs_embeddings:
            embeddings = image_hidden
        return prune.Cues(
            attention=attention_cue,
            keys=keys,
            embeddings=embeddings,
            rng=rng,
            batch_size=x.shape[0],
            num_image_tokens=image_slots.shape[1],
        )

    def decode(self, token_ids: jax.Array, positions: jax.Array, caches: list[LayerCache]):
        """One decoding step: token_ids (B,), positions (B,) -> float32 logits (B, V), new caches."""
        x = self.embed(token_ids[:, None])
        positions = positions[:, None]
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            x, cache = layer.decode(x, positions, cache)
            new_caches.append(cache)
        return self.logits(x[:, 0]), new_caches


def _compact(x, positions, last_index, image_start, kept, num_image_tokens):
    """Keep every non-image slot and the kept image slots, in their original order (static length).

    Every row keeps exactly S - num_image_tokens + keep slots (padding included, still marked -1), so
    the result has a static shape; a row's last prompt token moves to the count of kept slots before it.
    """
    batch, length = positions.shape
    slots = jnp.arange(length)
    in_image = (slots >= image_start[:, None]) & (slots < image_start[:, None] + num_image_tokens)
    kept_slots = image_start[:, None] + kept
    kept_image = jnp.zeros((batch, length), bool).at[jnp.arange(batch)[:, None], kept_slots].set(True)
    keep_mask = ~in_image | kept_image
    new_length = length - num_image_tokens + kept.shape[1]
    order = jnp.argsort(jnp.where(keep_mask, slots, slots + length), axis=1)[:, :new_length]
    new_last = jnp.take_along_axis(jnp.cumsum(keep_mask, axis=1), last_index[:, None], axis=1)[:, 0] - 1
    return _rows_take(x, order), _rows_take(positions, order), new_last
