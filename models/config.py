"""Typed model configuration, derived once from transformers' `LlavaConfig` / `LlavaNextConfig`.

transformers' config classes are the source of truth for a checkpoint's shapes; this module reads them
into small frozen dataclasses (hashable, so they can be static arguments of `jax.jit`) and refuses
what the port does not implement, with a message saying what is supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import adaptprune_jax as prune
from models.layers import EINSUM, check_attention, resolve_attention

SUPPORTED_MODEL_TYPES = {
    "llava": "LlavaForConditionalGeneration (LLaVA-1.5 style)",
    "llava_next": "LlavaNextForConditionalGeneration (LLaVA-NeXT / v1.6, anyres crops)",
}
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_VISION_MODEL_TYPES = ("clip_vision_model",)
SUPPORTED_ROPE_TYPES = ("default",)
SUPPORTED_FEATURE_STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    projection_dim: int | None = None  # CLIP's joint image-text width (visual_projection's output)
    # How the encoder's self-attention runs (models.layers.ATTENTION_IMPLEMENTATIONS; a static choice).
    attention: str = EINSUM

    def __post_init__(self):
        check_attention(self.attention)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool = False
    mlp_bias: bool = False
    # Mistral's sliding window: a query sees the keys less than this many positions before it (None:
    # every earlier key). Static, part of the jitted program.
    sliding_window: int | None = None
    # How the prefill's and the decode step's attention run (models.layers.ATTENTION_IMPLEMENTATIONS);
    # the pruning cues always use einsum.
    attention: str = EINSUM

    def __post_init__(self):
        check_attention(self.attention)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"sliding_window must be a positive number of positions, got {self.sliding_window}"
            )


@dataclasses.dataclass(frozen=True)
class LlavaModelConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int
    vision_feature_layers: tuple[int, ...]  # indices into CLIP's hidden_states tuple (0 = embeddings)
    vision_feature_select_strategy: str
    projector_bias: bool
    projector_act: str
    tie_word_embeddings: bool
    # LLaVA-NeXT's anyres resolutions, (height, width) each; empty for LLaVA-1.5 (one crop per image).
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT: each image is a base crop plus high-resolution crops, packed with newline tokens
        (`models.anyres`), so the image-token count differs per image."""
        return bool(self.image_grid_pinpoints)

    @property
    def features_per_crop(self) -> int:
        """Image features one crop gives: the patch grid, plus [CLS] in 'full' mode."""
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image in the LLM's sequence: LLaVA-1.5's fixed count; under anyres the most
        any image can take (`models.anyres.max_image_tokens`)."""
        if self.anyres:
            from models.anyres import max_image_tokens

            return max_image_tokens(self)
        return self.features_per_crop

    @property
    def image_grid(self) -> int | None:
        """Side of the square grid of image tokens, or None when the count is not a square ('full')."""
        side = math.isqrt(self.num_image_tokens)
        return side if side * side == self.num_image_tokens else None

    def image_layout(self) -> prune.TokenLayout:
        """Where each image token sits: the patch grid, row-major, after [CLS] under 'full' (on no grid).
        Under anyres the layout is each image's own (`models.anyres.pack_images`)."""
        if self.anyres:
            raise ValueError(
                "a LLaVA-NeXT (anyres) model has no single image layout: each image's comes with its "
                "batch (models.anyres.pack_images)"
            )
        patches = prune.grid_layout(self.vision.grid_size, self.vision.grid_size)
        if self.vision_feature_select_strategy == "full":
            return prune.concat_layouts(prune.off_grid_layout(1), patches)
        return patches

    @property
    def vision_layers_needed(self) -> int:
        """How many CLIP encoder layers must run to produce the selected hidden states."""
        return max(self.vision_feature_layers)


def with_attention(cfg: LlavaModelConfig, attention: str, dtype) -> LlavaModelConfig:
    """``cfg`` with both towers attending through ``attention`` (`models.layers.self_attention`),
    ``auto`` resolved for ``dtype`` on this backend (`models.layers.resolve_attention`), so the model
    records the implementation it runs."""
    resolved = resolve_attention(attention, dtype)
    return dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, attention=resolved),
        text=dataclasses.replace(cfg.text, attention=resolved),
    )


class CheckpointFileError(ValueError):
    """A checkpoint file exists but cannot be read (empty, truncated, not JSON): names the file and why,
    so a damaged download is not mistaken for a bug in the loader."""


def read_json_object(path: str) -> dict:
    """The JSON object in `path`; anything else raises CheckpointFileError naming the file."""
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(f"{path} is empty (0 bytes); expected a JSON object")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFileError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except UnicodeDecodeError as e:
        raise CheckpointFileError(f"{path} is not valid JSON: not UTF-8 text ({e.reason})") from e
    if not isinstance(data, dict):
        raise CheckpointFileError(f"{path} holds a JSON {type(data).__name__}, expected a JSON object")
    return data


def _read_model_type(directory: str) -> str:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory!r}")
    return read_json_object(path).get("model_type", "<missing>")


def _rope_theta(text_config: Any) -> float:
    params = getattr(text_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    if theta is None:
        raise ValueError("text config has no rope_theta")
    return float(theta)


def _sliding_window(text_config: Any) -> int | None:
    """Mistral's window (None when unset or for LLaMA); a per-layer mix of window and full layers is refused."""
    window = getattr(text_config, "sliding_window", None) if text_config.model_type == "mistral" else None
    layer_types = getattr(text_config, "layer_types", None)
    if window is not None and layer_types and len(set(layer_types)) > 1:
        raise ValueError(
            f"text model mixes attention layer types {sorted(set(layer_types))}; supported: one sliding "
            "window for every layer, or none"
        )
    return None if window is None else int(window)


def _grid_pinpoints(hf_config: Any) -> tuple[tuple[int, int], ...]:
    """LLaVA-NeXT's pinpoints as (height, width) tuples; () for LLaVA-1.5."""
    if hf_config.model_type != "llava_next":
        return ()
    pinpoints = tuple(tuple(int(side) for side in point) for point in hf_config.image_grid_pinpoints)
    size = hf_config.vision_config.image_size
    for point in pinpoints:
        if len(point) != 2 or point[0] % size or point[1] % size or min(point) < size:
            raise ValueError(
                f"image_grid_pinpoints entry {list(point)} must be (height, width), both positive "
                f"multiples of the vision tower's image size {size}"
            )
    if not pinpoints:
        raise ValueError("a llava_next config needs at least one image_grid_pinpoints entry")
    return pinpoints


def from_hf_config(hf_config: Any) -> LlavaModelConfig:
    """Read a transformers `LlavaConfig` / `LlavaNextConfig` into a `LlavaModelConfig`, refusing
    unsupported variants."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        )
    text, vision = hf_config.text_config, hf_config.vision_config
    if text.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"unsupported language model type {text.model_type!r}; supported: "
            f"{', '.join(SUPPORTED_TEXT_MODEL_TYPES)}"
        )
    if vision.model_type not in SUPPORTED_VISION_MODEL_TYPES:
        raise ValueError(
            f"unsupported vision tower type {vision.model_type!r}; supported: "
            f"{', '.join(SUPPORTED_VISION_MODEL_TYPES)}"
        )
    strategy = hf_config.vision_feature_select_strategy
    if model_type == "llava_next" and strategy != "default":
        raise ValueError(
            f"unsupported vision_feature_select_strategy {strategy!r} for llava_next; supported: default "
            "(the crops are packed as patch grids, without [CLS])"
        )
    if strategy not in SUPPORTED_FEATURE_STRATEGIES:
        raise ValueError(
            f"unsupported vision_feature_select_strategy {strategy!r}; supported: "
            f"{', '.join(SUPPORTED_FEATURE_STRATEGIES)}"
        )
    hidden_states_count = vision.num_hidden_layers + 1
    layers = hf_config.vision_feature_layer
    layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
    for layer in layers:
        if not -hidden_states_count <= layer < hidden_states_count:
            raise ValueError(
                f"vision_feature_layer {layer} out of range for {vision.num_hidden_layers} CLIP layers"
            )
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return LlavaModelConfig(
        vision=VisionConfig(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            layer_norm_eps=vision.layer_norm_eps,
            hidden_act=vision.hidden_act,
            projection_dim=getattr(vision, "projection_dim", None),
        ),
        text=TextConfig(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            rms_norm_eps=text.rms_norm_eps,
            rope_theta=_rope_theta(text),
            max_position_embeddings=text.max_position_embeddings,
            attention_bias=bool(getattr(text, "attention_bias", False)),
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            sliding_window=_sliding_window(text),
        ),
        image_token_index=hf_config.image_token_index,
        vision_feature_layers=tuple(layer % hidden_states_count for layer in layers),
        vision_feature_select_strategy=strategy,
        projector_bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
        projector_act=hf_config.projector_hidden_act,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        image_grid_pinpoints=_grid_pinpoints(hf_config),
    )


def load_hf_config(directory: str | os.PathLike):
    """transformers' LlavaConfig / LlavaNextConfig of a checkpoint directory, after checking its model_type."""
    from transformers import LlavaConfig, LlavaNextConfig

    directory = os.fspath(directory)
    model_type = _read_model_type(directory)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {directory}/config.json; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        )
    return {"llava": LlavaConfig, "llava_next": LlavaNextConfig}[model_type].from_pretrained(directory)
