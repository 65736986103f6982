"""The deep testbed model and the trainer settings that start it: a vision tower taken from another
checkpoint (`init_vision_from`) and kept fixed (`freeze_vision`), as LLaVA-1.5 keeps CLIP's."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.testbed import model as testbed_model
from experiments.testbed import scenes as S
from experiments.testbed.training.config import TrainOptions
from experiments.train_testbed import run_training
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import from_hf_config
from models.llava import LlavaForConditionalGeneration

MAX_EXPORT_BYTES = 22 * 2**20  # the deep checkpoint must stay this small: every device call carries it

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
)


def parameter_count(hf_config) -> int:
    cfg = from_hf_config(hf_config)
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_deep_testbed_has_llava15_depth_and_geometry_and_fits_the_size_budget():
    deep, shallow = testbed_model.testbed_config("testbed-deep"), testbed_model.testbed_config()
    deep_cfg, shallow_cfg = from_hf_config(deep), from_hf_config(shallow)
    assert deep_cfg.text.num_layers == 32 and shallow_cfg.text.num_layers == 4
    assert deep_cfg.num_image_tokens == shallow_cfg.num_image_tokens == 24 * 24
    assert deep_cfg.vision == shallow_cfg.vision  # one tower: a deep run starts from the shallow one's
    assert deep.vision_feature_layer == -2 and deep.vision_feature_select_strategy == "default"
    assert 2 * parameter_count(deep) <= MAX_EXPORT_BYTES  # float16 export
    with pytest.raises(
        ValueError, match="unknown testbed model 'testbed-wide'; known: testbed, testbed-deep"
    ):
        testbed_model.testbed_config("testbed-wide")


def _tiny(text=TINY_TEXT):
    hf_config = testbed_model.testbed_config(vision=TINY_VISION, text=text)
    scene_config = S.TestbedConfig.from_llava_config(hf_config, max_objects=3, max_object_patches=2.0)
    return hf_config, scene_config


def _options(tmp_path, **settings) -> TrainOptions:
    """A short run with no validation or test evaluation, under tmp_path."""
    return TrainOptions(
        output_dir=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        eval_items=0,
        test_items=0,
        quiet=True,
        **settings,
    )


def _params(directory):
    _, model = load_checkpoint(directory)
    return {
        part: [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(getattr(model, part), nnx.Param))]
        for part in ("vision_tower", "multi_modal_projector", "language_model")
    }


def test_a_frozen_tower_from_another_checkpoint_stays_bit_identical_while_the_rest_trains(tmp_path):
    # The source: a model with the same tower and another LLM (3 layers instead of 2).
    source_config, _ = _tiny(dict(TINY_TEXT, num_hidden_layers=3))
    source = LlavaForConditionalGeneration(from_hf_config(source_config), dtype=jnp.float32, rngs=nnx.Rngs(7))
    save_checkpoint(source, source_config, tmp_path / "source")
    hf_config, scene_config = _tiny()
    options = _options(
        tmp_path,
        steps=2,
        batch_size=2,
        learning_rate=1e-2,
        warmup_steps=1,
        save_every=0,
        save_dtype="float32",
        seed=1,
        init_vision_from=str(tmp_path / "source"),
        freeze_vision=True,
    )
    run_training(options, hf_config, scene_config)
    fresh = LlavaForConditionalGeneration(from_hf_config(hf_config), dtype=jnp.float32, rngs=nnx.Rngs(1))
    save_checkpoint(fresh, hf_config, tmp_path / "initial")
    source_params, trained, initial = (
        _params(tmp_path / "source"),
        _params(options.output_dir),
        _params(tmp_path / "initial"),
    )
    for ours, theirs in zip(trained["vision_tower"], source_params["vision_tower"], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    for part in ("multi_modal_projector", "language_model"):  # trained from the seed's initial weights
        assert any(not np.array_equal(a, b) for a, b in zip(trained[part], initial[part], strict=True))


def test_init_vision_from_refuses_another_tower_and_init_from_together(tmp_path):
    other_config = testbed_model.testbed_config(vision=dict(TINY_VISION, hidden_size=16), text=TINY_TEXT)
    other = LlavaForConditionalGeneration(from_hf_config(other_config), dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_checkpoint(other, other_config, tmp_path / "other")
    hf_config, scene_config = _tiny()
    options = _options(tmp_path, steps=1, init_vision_from=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="has another vision tower configuration"):
        run_training(options, hf_config, scene_config)
    both = dataclasses.replace(options, init_from=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="give it or --init_vision_from, not both"):
        run_training(both, hf_config, scene_config)
    assert not os.path.exists(options.output_dir)


def test_fused_causal_attention_gives_the_exact_training_logits():
    """`fused_attention` trains through `jax.nn.dot_product_attention` (causal over each row's real
    tokens; XLA's implementation in float32): on the slot-ordered, right-padded training sequences its
    logits and hidden states at every answer slot equal the inference mask's."""
    from experiments.testbed.training import step as training_step
    from experiments.testbed.training.batches import host_batch

    hf_config, scene_config = _tiny()
    cfg = from_hf_config(hf_config)
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tokenizer = S.make_tokenizer()
    batch = host_batch(0, 0, 3, cfg, scene_config, tokenizer.pad_token_id, tokenizer.eos_token_id, turns=3)
    assert len(set(np.asarray(batch.lengths).tolist())) > 1  # rows of different lengths: real padding
    normalization = training_step.PixelNormalization.from_hf_config(hf_config)
    pixels = training_step.scene_pixels(batch.scenes, scene_config, normalization)

    @nnx.jit(static_argnums=2)
    def forward(model, pixel_values, attention):
        return training_step.answer_logits_and_hidden(
            model,
            model.image_features(pixel_values),
            jnp.asarray(batch.input_ids),
            jnp.asarray(batch.lengths),
            jnp.asarray(batch.target_positions),
            attention,
        )

    (exact_logits, exact_hidden), (fused_logits, fused_hidden) = (
        forward(model, pixels, None),
        forward(model, pixels, training_step.fused_attention_implementation(jnp.float32)),
    )
    np.testing.assert_allclose(np.asarray(fused_logits), np.asarray(exact_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused_hidden), np.asarray(exact_hidden), rtol=1e-5, atol=1e-5)
