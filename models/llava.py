"""LLaVA-1.5: CLIP vision tower -> MLP projector -> LLaMA, joined by a thin model.

Each prompt row holds exactly one image: a contiguous run of `num_image_tokens` image-token ids,
found per row from the ids (rows of a batch may put it at different offsets). Image features are
written into those slots with a gather + select, so shapes stay static for any batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.clip import CLIPVisionTower, activation
from models.config import LlavaModelConfig
from models.layers import EMPTY_POSITION, Dense
from models.llama import LlamaForCausalLM, PrefillResult


class MultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaModelConfig, *, dtype, rngs: nnx.Rngs):
        in_width = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        width = cfg.text.hidden_size
        self.linear_1 = Dense(in_width, width, use_bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(width, width, use_bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.projector_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: LlavaModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = LlamaForCausalLM(
            cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, dtype=dtype, rngs=rngs
        )

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(B, 3, H, W) -> (B, num_image_tokens, text width): selected CLIP layers, [CLS] per strategy."""
        states = self.vision_tower(pixel_values, self.config.vision_feature_layers)
        features = jnp.concatenate(states, axis=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def embed_prompt(self, input_ids: jax.Array, image_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token embeddings with each row's image span replaced by its image features; + image starts."""
        is_image = input_ids == self.config.image_token_index
        image_start = jnp.argmax(is_image, axis=1).astype(jnp.int32)
        text = self.language_model.embed(input_ids)
        feature_index = jnp.clip(
            jnp.arange(input_ids.shape[1])[None] - image_start[:, None], 0, image_features.shape[1] - 1
        )
        image = jnp.take_along_axis(image_features, feature_index[..., None], axis=1)
        return jnp.where(is_image[..., None], image.astype(text.dtype), text), image_start

    def prefill(
        self,
        input_ids: jax.Array,
        lengths: jax.Array,
        pixel_values: jax.Array,
        *,
        extra_slots: int,
        pruning=None,
        keep: int = 0,
        rng: jax.Array | None = None,
        all_logits: bool = False,
    ) -> PrefillResult:
        """Vision tower + projector + LLM prefill (with optional pruning), for right-padded prompts.

        input_ids (B, S) int32 padded on the right; lengths (B,) real prompt lengths.
        """
        slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
        positions = jnp.where(slots < lengths[:, None], slots, EMPTY_POSITION)
        x, image_start = self.embed_prompt(input_ids, self.image_features(pixel_values))
        return self.language_model.prefill(
            x,
            positions,
            lengths - 1,
            image_start=image_start,
            num_image_tokens=self.config.num_image_tokens,
            extra_slots=extra_slots,
            pruning=pruning,
            keep=keep,
            rng=rng,
            all_logits=all_logits,
        )
