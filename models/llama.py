"""LLaMA decoder with a static, position-addressed KV cache; pruning runs through `models.pruning`.

The cache is an explicit pytree, one dict per run of layers between pruning stages
(`models.layers.StageCache`). Layers below a stage hold the full prompt, later layers only the kept
tokens: capacities differ per run, and the run's stored positions (with gaps) give its layers their
attention mask. This file holds only what is LLaMA's: the layer (which implements
`models.pruning.DecoderLayer`), embeddings and the head.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import adaptprune_jax as prune
from models import pruning as pruning_driver
from models.config import TextConfig
from models.layers import (
    Dense,
    FusedDense,
    RMSNorm,
    StageCache,
    apply_rope,
    attention_mask,
    cache_attention,
    normal_param,
    rows_take,
    self_attention,
    with_empty_slots,
    zero_rows,
)


class LlamaAttention(nnx.Module):
    """q, k and v projected by one fused kernel (`qkv_proj`: the parts in that order), then o_proj."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias
        self.qkv_proj = FusedDense(
            cfg.hidden_size, (q_width, kv_width, kv_width), use_bias=bias, dtype=dtype, rngs=rngs
        )
        self.o_proj = Dense(q_width, cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Post-RoPE queries (B, S, H, D) and keys, and values (B, S, Hkv, D)."""
        q, k, v = self.qkv_proj(x)
        q, k = self._rotate(q, k, positions)
        return q, k, v.reshape(k.shape)

    def queries_keys(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Post-RoPE queries and keys alone (the values' columns are not computed)."""
        return self._rotate(*self.qkv_proj.project(x, 0, 2), positions)

    def _rotate(self, q: jax.Array, k: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        batch, length, _ = q.shape
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta)


class LlamaMLP(nnx.Module):
    """SwiGLU with the gate and up projections as one fused kernel (`gate_up_proj`)."""

    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        bias = cfg.mlp_bias
        width = cfg.intermediate_size
        self.gate_up_proj = FusedDense(cfg.hidden_size, (width, width), use_bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(width, cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = LlamaMLP(cfg, dtype=dtype, rngs=rngs)

    def _finish(self, x: jax.Array, attention_out: jax.Array, real: jax.Array | None = None) -> jax.Array:
        """The rest of the layer after attention; ``real`` (B, S): the attention output of the other
        rows (padding) is dropped after o_proj, where the mask fuses into the residual add."""
        update = self.self_attn.o_proj(attention_out)
        if real is not None:
            update = zero_rows(update, real)
        x = x + update
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(
        self, x: jax.Array, positions: jax.Array, *, attention: str | None = None, cache_slots: int = 0
    ):
        """Full-sequence step from an empty cache: returns (x, q, k, v) with post-RoPE q (B, S, H, D)
        and k, v (B, S + cache_slots, Hkv, D): the keys and values as the layer's cache holds them,
        ``cache_slots`` empty slots after the prompt's (`new_layer_cache` takes them as they are).
        ``attention``: an implementation other than the config's
        (`models.layers.self_attention`; the trainer's fused attention), for this call."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        k, v = with_empty_slots(k, cache_slots), with_empty_slots(v, cache_slots)
        implementation = self.self_attn.cfg.attention if attention is None else attention
        out = self_attention(q, k, v, implementation, positions, self.sliding_window, zero_padding_rows=False)
        return self._finish(x, out, real=positions >= 0), q, k, v

    @property
    def sliding_window(self) -> int | None:
        return self.self_attn.cfg.sliding_window

    def queries_keys(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Post-RoPE q and k this layer would attend with on its input `x`, without running it."""
        return self.self_attn.queries_keys(self.input_layernorm(x), positions)

    def feature_keys(self, hidden: jax.Array, *, normalized: bool) -> jax.Array:
        """This layer's key projection of `hidden` as unit float32 rows (input RMSNorm if `normalized`)."""
        kernel, bias = self.self_attn.qkv_proj.part(1)
        return prune.feature_keys(
            hidden,
            kernel,
            bias,
            norm_scale=self.input_layernorm.scale[...] if normalized else None,
            norm_eps=self.input_layernorm.eps,
        )

    def decode(
        self,
        x: jax.Array,
        positions: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        slot: jax.Array,
        mask: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One new token per row (x (B, 1, d), positions (B, 1) in this layer's numbering), its key and
        value written at ``slot`` of this layer's cache; ``mask`` (B, 1, C): which cache slots it sees,
        the new one included (`attention_mask` of the run's positions). Returns (x, k_cache, v_cache)."""
        q, k, v = self.self_attn.qkv(self.input_layernorm(x), positions)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, slot, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, slot, axis=1)
        out = cache_attention(q, k_cache, v_cache, mask, self.self_attn.cfg.attention)
        return self._finish(x, out), k_cache, v_cache


class PrefillResult(NamedTuple):
    logits: jax.Array  # (B, V) at the last prompt token, or (B, S', V) with all_logits
    caches: list[StageCache]
    next_positions: jax.Array  # (B,) the RoPE position of the first generated token (original length)
    kept: jax.Array | None  # (B, keep) kept indices into the image span, ascending; None unpruned
    positions: jax.Array  # (B, S') positions of the sequence the last layer saw (-1 = padding)


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
        image: pruning_driver.ImageTokens,
        *,
        extra_slots: int,
        pruning: prune.PruneConfig | None = None,
        rng: jax.Array | None = None,
        vision: dict[str, jax.Array] | None = None,
        all_logits: bool = False,
    ) -> PrefillResult:
        """Run the prompt through every layer, pruning image tokens at the method's stages.

        x (B, S, d) input embeddings (image features already in place); positions (B, S) (-1 = padding);
        last_index (B,) slot of each row's last prompt token; image: the image tokens' slots and layout.
        """
        state = pruning_driver.prefill(
            self.layers,
            x,
            positions,
            last_index,
            image,
            extra_slots=extra_slots,
            pruning=pruning,
            rng=rng,
            vision=vision,
            final_norm=self.norm,
        )
        last = state.last_index[:, None]
        hidden = state.x if all_logits else rows_take(state.x, last)[:, 0]
        next_positions = rows_take(state.positions, last)[:, 0] + 1
        return PrefillResult(self.logits(hidden), state.caches, next_positions, state.kept, state.positions)

    def decode(self, token_ids: jax.Array, positions: jax.Array, caches: list[StageCache]):
        """One decoding step: token_ids (B,), positions (B,) -> float32 logits (B, V), new caches.
        Each run of layers writes the new token's position once, at its own numbering (``positions``
        plus the run's shift), and its layers share that write and the mask built from it."""
        x = self.embed(token_ids[:, None])
        layers = iter(self.layers)
        new_caches = []
        for cache in caches:
            run_positions = positions[:, None] + cache["shift"][:, None]
            slot = cache["end_index"]
            key_positions = jax.lax.dynamic_update_slice_in_dim(
                cache["positions"], run_positions, slot, axis=1
            )
            mask = attention_mask(run_positions, key_positions, self.cfg.sliding_window)
            keys, values = [], []
            for k_cache, v_cache in zip(cache["k"], cache["v"]):
                x, k_cache, v_cache = next(layers).decode(x, run_positions, k_cache, v_cache, slot, mask)
                keys.append(k_cache)
                values.append(v_cache)
            new_caches.append(
                {
                    "k": keys,
                    "v": values,
                    "positions": key_positions,
                    "end_index": slot + 1,
                    "shift": cache["shift"],
                }
            )
        return self.logits(x[:, 0]), new_caches
