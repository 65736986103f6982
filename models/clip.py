"""CLIP vision transformer (pre-layernorm ViT), as LLaVA uses it: hidden states of chosen layers.

Only the layers up to the deepest selected hidden state run (LLaVA-1.5 reads hidden_states[-2], so the
last encoder layer and the post-layernorm are loaded but never computed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import adaptprune_jax as prune
from models.config import VisionConfig
from models.layers import EINSUM, Dense, FusedDense, LayerNorm, normal_param, self_attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionReadout(NamedTuple):
    """One encoder layer, as pruning methods read it ([CLS] first in every array)."""

    cls_attention: jax.Array  # (B, S) float32 head-mean attention of [CLS] over every token
    keys: jax.Array  # (B, S, head_dim) float32 head-mean key projection
    hidden: jax.Array  # (B, S, d) the layer's output, hidden_states[layer]


class CLIPAttention(nnx.Module):
    """q, k and v projected by one fused kernel with bias (`qkv_proj`: the parts in that order), then
    out_proj; ``implementation``: how the attention runs (`models.layers.self_attention`)."""

    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs, implementation: str = EINSUM):
        width = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.implementation = implementation
        self.qkv_proj = FusedDense(width, (width, width, width), use_bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Dense(width, width, use_bias=True, dtype=dtype, rngs=rngs)

    def heads(self, x: jax.Array, parts: int = 3) -> tuple[jax.Array, ...]:
        """The first ``parts`` of q, k, v of ``x`` (B, S, width), each (B, S, heads, head_dim)."""
        batch, length, width = x.shape
        shape = (batch, length, self.num_heads, width // self.num_heads)
        return tuple(y.reshape(shape) for y in self.qkv_proj.project(x, 0, parts))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_proj(self_attention(*self.heads(x), self.implementation))

    def cls_readout(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, S) float32 head-mean attention of the [CLS] token (position 0) over every token, and
        the head-mean key projection (B, S, head_dim) (VisionZip's merge metric)."""
        q, k = self.heads(x, parts=2)
        attention = prune.last_token_attention(q[:, 0], k, jnp.ones(k.shape[:2], bool))
        return attention, jnp.mean(k.astype(jnp.float32), axis=2)


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = self._attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=True, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.hidden_act)

    def _attention(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs) -> CLIPAttention:
        return CLIPAttention(cfg, dtype=dtype, rngs=rngs, implementation=cfg.attention)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        channels = 3
        self.patch_embedding = normal_param(rngs, (channels * cfg.patch_size**2, cfg.hidden_size), dtype)
        self.class_embedding = normal_param(rngs, (cfg.hidden_size,), dtype)
        self.position_embedding = normal_param(rngs, (cfg.num_patches + 1, cfg.hidden_size), dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """Patchify (a stride-p convolution as one matmul), prepend [CLS], add positions, pre-LN."""
        batch, channels, height, width = pixel_values.shape
        patch = self.cfg.patch_size
        if height != self.cfg.image_size or width != self.cfg.image_size:
            raise ValueError(
                f"pixel_values are {height}x{width}; the vision tower expects "
                f"{self.cfg.image_size}x{self.cfg.image_size}"
            )
        kernel = self.patch_embedding[...]
        patches = pixel_values.astype(kernel.dtype).reshape(
            batch, channels, height // patch, patch, width // patch, patch
        )
        patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * patch * patch)
        tokens = patches @ kernel
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, tokens.shape[-1]))
        tokens = jnp.concatenate([cls, tokens], axis=1) + self.position_embedding[...]
        return self.pre_layrnorm(tokens)

    def __call__(self, pixel_values: jax.Array, feature_layers: tuple[int, ...]) -> list[jax.Array]:
        """hidden_states[i] for each i in feature_layers (0 = after pre-LN, i = after encoder layer i)."""
        return self.encode(pixel_values, feature_layers)[0]

    def encode(
        self, pixel_values: jax.Array, feature_layers: tuple[int, ...], cls_attention_layer: int | None = None
    ) -> tuple[list[jax.Array], VisionReadout | None]:
        """hidden_states[i] for each i in feature_layers and, if `cls_attention_layer` is set, what
        pruning reads in the encoder layer whose output is hidden_states[cls_attention_layer]
        (negative counts from the end, as hidden_states does): its [CLS] attention, head-mean keys
        and output."""
        attention_layer = None
        if cls_attention_layer is not None:
            count = self.cfg.num_layers + 1
            if not -count < cls_attention_layer < count or cls_attention_layer % count == 0:
                raise ValueError(
                    f"cls_attention_layer {cls_attention_layer} names no encoder layer of this "
                    f"{self.cfg.num_layers}-layer tower (hidden_states 1..{self.cfg.num_layers})"
                )
            attention_layer = cls_attention_layer % count
        hidden = self.embed(pixel_values)
        states, readout = [hidden], None
        for index, layer in enumerate(self.layers[: max(max(feature_layers), attention_layer or 0)], start=1):
            if index == attention_layer:
                attention, keys = layer.self_attn.cls_readout(layer.layer_norm1(hidden))
            hidden = layer(hidden)
            if index == attention_layer:
                readout = VisionReadout(attention, keys, hidden)
            states.append(hidden)
        return [states[i] for i in feature_layers], readout
