"""LLaVA-1.5 and LLaVA-NeXT: CLIP vision tower -> MLP projector -> LLaMA / Mistral, joined by a thin model.

Each prompt row holds one image: its image-token ids, found per row from the ids (rows of a batch may
put them at different offsets). LLaVA-1.5's image gives one crop's features, the same count for every
row, described by the config's token layout (`LlavaModelConfig.image_layout`). LLaVA-NeXT's image gives
several crops, packed into a per-image count of tokens (base grid, high-resolution grid, newlines):
the host computes the packing once (`models.anyres.pack_images`: a gather index and a layout per row),
the model runs every crop of the batch through the tower at once and packs with one gather. Image
features are written into the slots with a gather + select, so shapes stay static for any batch; the
slots and the layout describe the image tokens to the pruning step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import adaptprune_jax as prune
from models.clip import CLIPVisionTower, VisionReadout, activation
from models.config import LlavaModelConfig
from models.layers import EMPTY_POSITION, Dense, normal_param
from models.llama import LlamaForCausalLM, PrefillResult
from models.pruning import ImageTokens


class MultiModalProjector(nnx.Module):
    def __init__(self, cfg: LlavaModelConfig, *, dtype, rngs: nnx.Rngs):
        in_width = cfg.vision.hidden_size * len(cfg.vision_feature_layers)
        width = cfg.text.hidden_size
        self.linear_1 = Dense(in_width, width, use_bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(width, width, use_bias=cfg.projector_bias, dtype=dtype, rngs=rngs)
        self.act = activation(cfg.projector_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class ImageInputs(NamedTuple):
    features: jax.Array  # (B, N, text width) the image features the prompt embeds
    vision: dict[str, jax.Array]  # the vision-tower cues the method asked for (see vision_cues)
    merged_kept: jax.Array | None  # a merging method's passed-through image tokens (B, k)


def check_anyres_method(pruning: prune.PruneConfig | None) -> None:
    """LLaVA-NeXT takes the methods whose cues come from the LLM over the packed span; a method that
    reads the vision tower or merges before the projector would need per-crop cues, not ported."""
    if pruning is None:
        return
    if pruning.vision_layer() is not None or pruning.merges:
        raise ValueError(
            f"{pruning.name} reads the vision tower per crop (or merges before the projector), which the "
            "LLaVA-NeXT port does not provide; on LLaVA-NeXT use a method whose cues come from the LLM "
            "over the packed image tokens (e.g. fastv, random, divprune)"
        )


class LlavaForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: LlavaModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = MultiModalProjector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = LlamaForCausalLM(
            cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, dtype=dtype, rngs=rngs
        )
        # LLaVA-NeXT's learned token after every row of an image's high-resolution grid.
        self.image_newline = normal_param(rngs, (cfg.text.hidden_size,), dtype) if cfg.anyres else None
        # CLIP's text tower and visual projection (``models.clip_text.JointSpace``), loaded beside the
        # checkpoint for methods whose cues read CLIP's joint space (``needs_text_tower``).
        self.joint_space = nnx.data(None)

    def encode_images(
        self, pixel_values: jax.Array, readout_layer: int | None = None
    ) -> tuple[jax.Array, VisionReadout | None]:
        """(B, 3, H, W) -> image features (B, N, text width) and, if asked, the vision tower's readout
        of the encoder layer whose output is hidden_states[readout_layer] ([CLS] included)."""
        states, readout = self.vision_tower.encode(
            pixel_values, self.config.vision_feature_layers, readout_layer
        )
        features = jnp.concatenate(states, axis=-1)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features), readout

    def packed_features(self, pixel_values: jax.Array, image_index: jax.Array) -> jax.Array:
        """LLaVA-NeXT: crops (B, C, 3, H, W) and the packing index (B, N) (`models.anyres.pack_images`)
        -> the LLM's image features (B, N, text width). One tower pass over every crop of the batch
        (a row's padding crops are computed and never read: crops do not see each other), then one
        gather from the flat crop features, whose extra last row is `image_newline`."""
        batch, crops = pixel_values.shape[:2]
        features, _ = self.encode_images(pixel_values.reshape(batch * crops, *pixel_values.shape[2:]))
        flat = features.reshape(-1, features.shape[-1])
        flat = jnp.concatenate([flat, self.image_newline[...][None].astype(flat.dtype)])
        return jnp.take(flat, image_index, axis=0)

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(B, 3, H, W) -> (B, num_image_tokens, text width): selected CLIP layers, [CLS] per strategy."""
        return self.encode_images(pixel_values)[0]

    def image_inputs(
        self,
        pixel_values: jax.Array,
        pruning: prune.PruneConfig | None = None,
        query_ids: jax.Array | None = None,
        query_mask: jax.Array | None = None,
        image_index: jax.Array | None = None,
    ) -> ImageInputs:
        """What the LLM's prompt takes from the images under ``pruning``: the image features (a merging
        method's tokens in the first ``keep`` slots), the vision-tower cues the method asked for (and
        the joint-space ones, from the questions' text-tower segments ``query_ids`` / ``query_mask``
        (B, M, L)), and a merging method's passed-through image tokens. LLaVA-NeXT: the packed crop
        features (``image_index``, `packed_features`)."""
        if self.config.anyres:
            check_anyres_method(pruning)
            if image_index is None:
                raise ValueError("a LLaVA-NeXT batch needs its packing index (models.anyres.pack_images)")
            return ImageInputs(self.packed_features(pixel_values, image_index), {}, None)
        readout_layer = None if pruning is None else pruning.vision_layer()
        features, readout = self.encode_images(pixel_values, readout_layer)
        num_image_tokens = features.shape[1]
        vision = {} if readout is None else self.vision_cues(readout, num_image_tokens)
        if pruning is not None and pruning.needs_text_tower:
            vision.update(self.joint_cues(pruning.name, readout, num_image_tokens, query_ids, query_mask))
        if pruning is None or not pruning.merges:
            return ImageInputs(features, vision, None)
        self._check_merge_layer(readout_layer)
        keep = pruning.resolve_keep(num_image_tokens)
        layout = self.config.image_layout()
        merged = pruning.merge(prune.Cues(**vision, layout=layout.broadcast(features.shape[:1])), keep)
        tokens = self.multi_modal_projector(merged.features).astype(features.dtype)
        features = jnp.zeros_like(features).at[:, :keep].set(tokens)  # select keeps these slots
        return ImageInputs(features, vision, merged.kept)

    def _check_merge_layer(self, readout_layer: int | None) -> None:
        """A merging method's tokens go through the projector, so it must read the one feature layer."""
        count = self.config.vision.num_layers + 1
        layers = tuple(layer % count for layer in self.config.vision_feature_layers)
        if readout_layer is None or len(layers) != 1 or readout_layer % count != layers[0]:
            raise ValueError(
                f"a merging method reads hidden_states[{readout_layer}] but this model's image "
                f"features are hidden_states{list(self.config.vision_feature_layers)}: they must be one "
                "and the same layer"
            )

    def vision_cues(self, readout: VisionReadout, num_image_tokens: int) -> dict[str, jax.Array]:
        """The vision tower's cues over the LLM's N image tokens: [CLS] attention (B, N) over the
        patches, and for merging methods the [CLS]-first tokens and keys (B, 1 + N, .)."""
        offset = readout.cls_attention.shape[1] - num_image_tokens  # 1 under 'default', 0 under 'full'
        return {
            "vision_attention": readout.cls_attention[:, offset:],
            "vision_tokens": readout.hidden,
            "vision_keys": readout.keys,
        }

    def joint_cues(self, name, readout: VisionReadout, num_image_tokens: int, query_ids, query_mask):
        """The image tokens and the questions in CLIP's joint space (``JointEmbeddings``): the read
        layer's tokens through the tower's post_layernorm and visual_projection, and one text-tower
        embedding per question segment, with the segments' mask (B, M)."""
        if self.joint_space is None:
            raise ValueError(
                f"{name} needs the CLIP text tower and visual_projection, which llava checkpoints do not "
                "carry: load them beside the checkpoint (load_checkpoint(..., text_tower=DIR), "
                "--text_tower=DIR in the experiments), DIR a CLIPModel directory such as "
                "openai/clip-vit-large-patch14-336"
            )
        if query_ids is None or query_mask is None:
            raise ValueError(
                f"{name} reads each question through CLIP's text tower: give the batch the questions' "
                "text-tower tokens (make_batch(..., queries=...))"
            )
        offset = readout.hidden.shape[1] - num_image_tokens  # [CLS] as the features have it
        patches = self.vision_tower.post_layernorm(readout.hidden[:, offset:])
        return {
            "image_embeds": self.joint_space.visual_projection(patches),
            "text_embeds": self.joint_space.text_embeds(query_ids, query_mask),
            "text_mask": query_mask[:, :, 0] > 0,
        }

    def embed_prompt(self, input_ids: jax.Array, image_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token embeddings with each row's image tokens replaced by its image features, in order; and
        the image tokens' sequence slots (B, N) int32."""
        num_image_tokens = image_features.shape[1]
        is_image = input_ids == self.config.image_token_index
        image_slots = jax.vmap(lambda row: jnp.nonzero(row, size=num_image_tokens, fill_value=0)[0])(is_image)
        text = self.language_model.embed(input_ids)
        feature_index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, num_image_tokens - 1)
        image = jnp.take_along_axis(image_features, feature_index[..., None], axis=1)
        return jnp.where(is_image[..., None], image.astype(text.dtype), text), image_slots.astype(jnp.int32)

    def image_tokens(self, image_slots: jax.Array, layout: prune.TokenLayout | None = None) -> ImageTokens:
        """The image tokens of a batch: their slots and layout (default: the config's, for every row)."""
        layout = self.config.image_layout() if layout is None else layout
        return ImageTokens(
            image_slots, layout.broadcast(image_slots.shape[:1]) if layout.valid.ndim == 1 else layout
        )

    def prefill(
        self,
        input_ids: jax.Array,
        lengths: jax.Array,
        pixel_values: jax.Array,
        *,
        extra_slots: int,
        pruning: prune.PruneConfig | None = None,
        rng: jax.Array | None = None,
        all_logits: bool = False,
        query_ids: jax.Array | None = None,
        query_mask: jax.Array | None = None,
        image_index: jax.Array | None = None,
        image_layout: prune.TokenLayout | None = None,
    ) -> PrefillResult:
        """Vision tower + projector + LLM prefill (with optional pruning), for right-padded prompts.

        input_ids (B, S) int32 padded on the right; lengths (B,) real prompt lengths; query_ids and
        query_mask (B, M, L): the questions in the text tower's tokens, for a method that reads them.
        LLaVA-NeXT: pixel_values (B, C, 3, H, W) crops, image_index and image_layout (B, N) the packing
        (`models.anyres.pack_images`).
        """
        slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
        positions = jnp.where(slots < lengths[:, None], slots, EMPTY_POSITION)
        inputs = self.image_inputs(pixel_values, pruning, query_ids, query_mask, image_index)
        features, vision = inputs.features, inputs.vision
        x, image_slots = self.embed_prompt(input_ids, features)
        result = self.language_model.prefill(
            x,
            positions,
            lengths - 1,
            self.image_tokens(image_slots, image_layout),
            extra_slots=extra_slots,
            pruning=pruning,
            rng=rng,
            vision=vision,
            all_logits=all_logits,
        )
        return result if inputs.merged_kept is None else result._replace(kept=inputs.merged_kept)
