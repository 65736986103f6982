"""Named LLaVA configurations and a writer of random-weight checkpoints in the llava-hf layout.

The full-size presets reproduce llava-hf/llava-1.5-{7b,13b}-hf's and llava-v1.6-{vicuna,mistral}-7b-hf's
config.json, so speed and memory can be measured with random weights (they depend on shapes, not values). The tiny presets keep
LLaVA-1.5's 336 px / patch-14 / 24 x 24 image grid but shrink every width, so parity tests exercise
the real token counts and RoPE positions past 600 on a 2-core CPU.

`write_random_checkpoint` saves through transformers' own `save_pretrained` (or, for the newer key
spelling, its in-memory state dict), so the loader is tested on exactly what transformers writes.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    MistralConfig,
)

from models.tokenizer import build_clip_word_tokenizer, build_word_tokenizer, vocabulary_from_texts

# CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-1.5.
_CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# A narrow CLIP with the same image and patch size (so the same 24 x 24 grid).
_CLIP_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=336,
    patch_size=14,
    projection_dim=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# The text tower of openai/clip-vit-large-patch14-336 (the CLIP LLaVA-1.5's vision tower comes from).
_CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)
# A narrow text tower whose short segments (16 tokens) make test questions span several.
_CLIP_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)

# llava-hf's LLaVA-1.5 vocabulary: 32000 LLaMA tokens + <image> (32000) + <pad> (32001), padded to 32064.
_LLAVA15_VOCAB = 32064
_LLAVA15_IMAGE_TOKEN = 32000
_LLAVA15_PAD_TOKEN = 32001

# Words of the vicuna_v1 system prompt plus filler, enough for test prompts of any length.
_TINY_TEXTS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT:",
    "Is there a cat dog car person bird in the image? Answer the question using a single word or "
    "phrase. yes no what color is it red green blue how many one two three left right of above below "
    "describe picture please tell me more about this scene",
)
TINY_VOCABULARY = tuple(vocabulary_from_texts(_TINY_TEXTS))
_TINY_IMAGE_TOKEN = len(TINY_VOCABULARY) + 4  # right after the 4 special tokens and the words
_TINY_VOCAB_SIZE = 128


# llava-hf's LLaVA-NeXT (v1.6) resolutions, (height, width).
_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava(vision: dict[str, Any], text: dict[str, Any], **top: Any) -> LlavaConfig:
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **top)


def _llava_next(
    vision: dict[str, Any], text: dict[str, Any], *, mistral: bool, **top: Any
) -> LlavaNextConfig:
    text_config = MistralConfig(**text) if mistral else LlamaConfig(**text)
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_grid_pinpoints=_V16_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        **top,
    )


def _tiny_text(**overrides: Any) -> dict[str, Any]:
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=_TINY_VOCAB_SIZE,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    text.update(overrides)
    return text


def _next_text(**overrides: Any) -> dict[str, Any]:
    """The tiny text model of the LLaVA-NeXT presets: room for a 2,928-token image, and three layers
    (prompts are five times LLaVA-1.5's, so attention costs the CPU tests 25 times more per layer)."""
    return _tiny_text(num_hidden_layers=3, max_position_embeddings=4096, **overrides)


def _make(name: str) -> LlavaConfig:
    if name in ("llava-1.5-7b", "llava-1.5-13b"):
        width, mlp, layers = (4096, 11008, 32) if name == "llava-1.5-7b" else (5120, 13824, 40)
        text = dict(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=width // 128,
            num_key_value_heads=width // 128,
            vocab_size=_LLAVA15_VOCAB,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=_LLAVA15_PAD_TOKEN,
        )
        return _llava(
            _CLIP_L_336, text, image_token_index=_LLAVA15_IMAGE_TOKEN, pad_token_id=_LLAVA15_PAD_TOKEN
        )
    if name in ("llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b"):
        mistral = name == "llava-v1.6-mistral-7b"
        text = dict(
            hidden_size=4096,
            intermediate_size=14336 if mistral else 11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8 if mistral else 32,
            vocab_size=_LLAVA15_VOCAB,
            max_position_embeddings=32768 if mistral else 4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=_LLAVA15_PAD_TOKEN,
        )
        if mistral:  # Mistral-7B-Instruct-v0.2's: no sliding window, rope_theta 1e6
            text.update(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return _llava_next(
            _CLIP_L_336,
            text,
            mistral=mistral,
            image_token_index=_LLAVA15_IMAGE_TOKEN,
            pad_token_id=_LLAVA15_PAD_TOKEN,
            projector_hidden_act="gelu",
        )
    tiny = dict(image_token_index=_TINY_IMAGE_TOKEN, pad_token_id=3)
    if name == "tiny":
        return _llava(_CLIP_TINY, _tiny_text(), **tiny)
    if name == "tiny-gqa":  # grouped-query attention, wider heads, rope_theta changed
        return _llava(
            _CLIP_TINY,
            _tiny_text(
                num_attention_heads=8,
                num_key_value_heads=2,
                hidden_size=128,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            ),
            **tiny,
        )
    if name == "tiny-full":  # [CLS] kept (577 image tokens), features from the last layer, tied embeddings
        return _llava(
            _CLIP_TINY,
            _tiny_text(num_hidden_layers=3, tie_word_embeddings=True),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=True,
            **tiny,
        )
    if name == "tiny-next":  # LLaVA-NeXT over the tiny LLaMA: anyres crops, image_newline
        return _llava_next(_CLIP_TINY, _next_text(), mistral=False, **tiny)
    if name == "tiny-next-mistral":  # ...over a tiny Mistral: grouped-query heads, a 64-position window
        return _llava_next(
            _CLIP_TINY,
            _next_text(num_key_value_heads=2, sliding_window=64),
            mistral=True,
            **tiny,
        )
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")


PRESET_NAMES = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-v1.6-vicuna-7b",
    "llava-v1.6-mistral-7b",
    "tiny",
    "tiny-gqa",
    "tiny-full",
    "tiny-next",
    "tiny-next-mistral",
)


def llava_config(name: str) -> LlavaConfig | LlavaNextConfig:
    """The transformers `LlavaConfig` of a named preset (see PRESET_NAMES)."""
    return _make(name)


def tiny_tokenizer(config: LlavaConfig):
    """The word-level tokenizer that goes with the tiny presets (`<image>` at the config's index)."""
    return build_word_tokenizer(TINY_VOCABULARY, image_token_index=config.image_token_index)


def tiny_clip_tokenizer():
    """The word-level CLIP-convention tokenizer of the tiny presets' text towers."""
    return build_clip_word_tokenizer(TINY_VOCABULARY)


def clip_config(config: LlavaConfig, text: CLIPTextConfig | None = None) -> CLIPConfig:
    """The CLIP a LLaVA's vision tower comes from: its vision config and the text tower ``text``
    (default: openai/clip-vit-large-patch14-336's under CLIP-L, else a tiny one over the tiny
    vocabulary). The text tower's projection_dim is the joint width, set in the vision config too,
    so a CLIPVisionModelWithProjection built from it fits the visual_projection."""
    vision = config.vision_config.to_dict()
    if text is None and vision["hidden_size"] == _CLIP_L_336["hidden_size"]:
        text = CLIPTextConfig(**_CLIP_L_TEXT, projection_dim=vision["projection_dim"])
    elif text is None:
        tokenizer = tiny_clip_tokenizer()
        text = CLIPTextConfig(
            **_CLIP_TINY_TEXT,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=vision["projection_dim"],
        )
    vision["projection_dim"] = text.projection_dim
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=text.projection_dim)


def write_random_clip(config: LlavaConfig, directory: str | os.PathLike, *, seed: int = 0):
    """Write a CLIPModel directory with random weights beside a preset (``save_pretrained``, as
    openai's CLIP ships) and the tiny CLIP tokenizer; returns transformers' model."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(config)).float().eval()
    model.save_pretrained(directory)
    tiny_clip_tokenizer().save_pretrained(directory)
    return model


def llava15_image_processor(config: LlavaConfig):
    """LLaVA-1.5's preprocessing: pad to square with the mean colour, bicubic resize, CLIP normalisation.

    transformers' LLaVA image processor does it with do_pad=True (its default is False); the size comes
    from the vision config so there is one source of truth for the image size. The PIL backend is named
    explicitly: where torchvision is installed, the default backend resizes differently from LLaVA's PIL.
    """
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = config.vision_config.image_size
    return LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def anyres_image_processor(config: LlavaNextConfig):
    """LLaVA-NeXT's preprocessing as llava-hf saves it: transformers' LLaVA-NeXT image processor (PIL
    backend, see `llava15_image_processor`) with the config's pinpoints and crop size."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = config.vision_config.image_size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=[list(point) for point in config.image_grid_pinpoints],
    )


def random_torch_model(config: LlavaConfig | LlavaNextConfig, *, seed: int = 0, dtype: str = "float32"):
    """transformers' PyTorch LlavaForConditionalGeneration (LlavaNextForConditionalGeneration for a
    llava_next config) with its own random initialisation."""
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model_class = (
        LlavaNextForConditionalGeneration
        if config.model_type == "llava_next"
        else LlavaForConditionalGeneration
    )
    model = model_class(config)
    return model.to(getattr(torch, dtype)).eval()


def write_random_checkpoint(
    config: LlavaConfig,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    key_spelling: str = "saved",
    tokenizer=None,
    model=None,
) -> str:
    """Write a llava-hf checkpoint directory with random weights; returns the directory.

    key_spelling: 'saved' = what `save_pretrained` writes (transformers converts to the on-disk
    `language_model.model.*` layout); 'state_dict' = the newer in-memory spelling
    (`model.language_model.*`, `lm_head.*`) written straight from `state_dict()`.
    The tokenizer (default: the tiny word-level one) and LLaVA-1.5 processor are saved alongside.
    """
    from safetensors.torch import save_file
    from transformers import LlavaNextProcessor, LlavaProcessor

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model = model if model is not None else random_torch_model(config, seed=seed, dtype=dtype)
    if key_spelling == "saved":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(directory, **kwargs)
    elif key_spelling == "state_dict":
        if max_shard_size:
            raise ValueError("max_shard_size is only supported with key_spelling='saved'")
        config.save_pretrained(directory)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        raise ValueError(f"key_spelling must be 'saved' or 'state_dict', got {key_spelling!r}")
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer(config)
    processor_class, image_processor = (
        (LlavaNextProcessor, anyres_image_processor(config))
        if config.model_type == "llava_next"
        else (LlavaProcessor, llava15_image_processor(config))
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )  # CLIP's [CLS], as llava-hf saves it
    processor.save_pretrained(directory)
    return directory


_RANDOM_GENERATORS: dict = {}


def random_state(abstract_state, seed: int, *, compile_only: bool = False):
    """Random weights for an abstract model state, drawn on the device leaf by leaf: normal * INIT_STD,
    norm scales 1 (speed and memory depend on shapes, not values; no detour through transformers).

    One small compiled generator per distinct (shape, dtype) (about twenty for LLaVA), called once per
    leaf, so the peak is the weights plus one leaf, and compiling is cheap (a single jitted fill of
    every leaf would be one large program, and stacking leaves by shape would copy them).
    """
    import jax
    import jax.numpy as jnp

    from models.layers import INIT_STD

    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    key, filled = jax.random.key(seed), []
    for i, (path, leaf) in enumerate(leaves):
        ones = "scale" in jax.tree_util.keystr(path)
        signature = (leaf.shape, jnp.dtype(leaf.dtype).name, ones)
        if signature not in _RANDOM_GENERATORS:

            def generate(k, shape=leaf.shape, dtype=leaf.dtype, ones=ones):
                if ones:
                    return jnp.ones(shape, dtype)
                return jax.random.normal(k, shape, dtype) * jnp.asarray(INIT_STD, dtype)

            _RANDOM_GENERATORS[signature] = jax.jit(generate).lower(key_shape).compile()
        if not compile_only:
            filled.append(_RANDOM_GENERATORS[signature](jax.random.fold_in(key, i)))
    return None if compile_only else treedef.unflatten(filled)


def random_model(config: LlavaConfig, *, dtype: str = "bfloat16", seed: int = 0, attention: str = "auto"):
    """The Flax LLaVA of a transformers config with random weights made directly on the device;
    ``attention`` as `models.checkpoint.load_checkpoint` takes it."""
    import jax.numpy as jnp
    from flax import nnx

    from models.config import from_hf_config, with_attention
    from models.llava import LlavaForConditionalGeneration

    cfg = with_attention(from_hf_config(config), attention, jnp.dtype(dtype))
    abstract = nnx.eval_shape(
        lambda: LlavaForConditionalGeneration(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    )
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, random_state(abstract_state, seed))
