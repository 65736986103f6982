"""The LLaVA configuration trained from scratch on the testbed (`testbed_config`).

It lives with the testbed, not in `models.presets`, because its vocabulary and special ids come from
the testbed's tokenizer (one source of truth): the model layer must not import experiments.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from experiments.testbed.encoding import IMAGE_TOKEN_INDEX, TOKENIZER_SIZE, make_tokenizer

# The testbed models: LLaVA-1.5's input geometry and the same CLIP tower, LLaMAs of two depths.
#   testbed       4 x 256 (4 heads of 64): fast, the default of `make eval` and CI.
#   testbed-deep  32 x 128 (4 heads of 32, MLP 256): LLaVA-1.5-7B's depth, so in-LLM and multi-stage
#                 methods prune at their real layers; the width is what keeps the float16 export
#                 within 22 MB beside the shared 5.0M-parameter tower.
TESTBED_LANGUAGE_MODELS: dict[str, dict[str, Any]] = {
    "testbed": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    "testbed-deep": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=32, num_attention_heads=4),
}


def testbed_config(
    name: str = "testbed", *, vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None
) -> LlavaConfig:
    """A LLaVA the trainer (`experiments.train_testbed`) trains and the testbed evaluates.

    LLaVA-1.5's input geometry is kept exactly (CLIP 336 px / patch 14 = a 24 x 24 grid, 576 image
    tokens, features from hidden_states[-2] without [CLS], 2-layer GELU projector, untied LLaMA
    head), so pruning sees the real token counts and positions; only widths and depths shrink. The
    vocab is the testbed tokenizer's, padded to a multiple of 8. A 6-layer, 256-wide CLIP (5 layers
    run, the 6th is LLaVA's unused last layer) shared by both models, and the LLaMA of
    `TESTBED_LANGUAGE_MODELS[name]`. 1024 positions hold the 622-token prompt, the answer and
    generation slack. `vision` / `text` override CLIP / LLaMA settings (tests shrink both, and the
    image, to train in seconds on a CPU).
    """
    if name not in TESTBED_LANGUAGE_MODELS:
        raise ValueError(f"unknown testbed model {name!r}; known: {', '.join(TESTBED_LANGUAGE_MODELS)}")
    tokenizer = make_tokenizer()
    vision_config = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=256,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    vision_config.update(vision or {})
    language_model = TESTBED_LANGUAGE_MODELS[name]
    text_config = dict(
        **language_model,
        num_key_value_heads=language_model["num_attention_heads"],
        vocab_size=-(-TOKENIZER_SIZE // 8) * 8,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    text_config.update(text or {})
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_config),
        text_config=LlamaConfig(**text_config),
        image_token_index=IMAGE_TOKEN_INDEX,
        pad_token_id=tokenizer.pad_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
