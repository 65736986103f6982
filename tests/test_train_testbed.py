"""Tests of the testbed trainer at a tiny scale on the CPU.

The trainer's claims, each checked here: its in-step pixels equal the image processor's, its token
sequences equal the preprocessor's prompt + answer, the model learns (a fixed batch is overfitted),
an interrupted run resumed from its saved state ends bit-identical to an uninterrupted one, and the
export is a llava-hf checkpoint that both this project's loader and transformers load with no
missing or unexpected keys. The full-size preset is checked for its size budget and shapes only.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments import train_testbed as T
from experiments.testbed import scenes as S
from experiments.testbed.benchmark import TestbedBenchmark
from models import presets
from models.config import from_hf_config
from models.llava import LlavaForConditionalGeneration
from models.preprocess import Preprocessor

# A model small enough to train in seconds: 112 px images (8 x 8 patches), two narrow towers.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=112)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 num_key_value_heads=2)
TOTAL_STEPS = 6
INTERRUPT_AT = 4  # a multiple of log_every, so both runs average the same steps in each log line


@pytest.fixture(scope="module")
def tiny():
    hf_config = presets.testbed_config(vision=TINY_VISION, text=TINY_TEXT)
    # Fewer, smaller objects fit the 112 px canvas.
    scene_config = S.TestbedConfig.from_llava_config(hf_config, max_objects=3, max_object_patches=2.0)
    return hf_config, scene_config


def _options(root, name: str, **overrides) -> T.TrainOptions:
    settings = dict(output_dir=os.path.join(root, name, "checkpoint"), work_dir=os.path.join(root, name, "work"),
                    steps=TOTAL_STEPS, batch_size=4, learning_rate=3e-3, warmup_steps=2, eval_every=3,
                    eval_items=8, eval_batch_size=4, log_every=2, save_every=0,
                    test_dir=os.path.join(root, "test_split"), test_items=8, quiet=True)
    settings.update(overrides)
    return T.TrainOptions(**settings)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """An uninterrupted run (validated, exported, tested), and the same run interrupted then resumed
    (evaluation off: it is the training state that must match)."""
    hf_config, scene_config = tiny
    root = str(tmp_path_factory.mktemp("train_testbed"))
    quick = dict(eval_items=0, test_items=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        full = T.run_training(_options(root, "full"), hf_config, scene_config)
        interrupted = T.run_training(_options(root, "resumed", stop_at_step=INTERRUPT_AT, **quick), hf_config,
                                     scene_config)
        resumed = T.run_training(_options(root, "resumed", **quick), hf_config, scene_config)
    return dict(root=root, full=full, interrupted=interrupted, resumed=resumed)


def test_pixels_normalised_in_step_equal_the_image_processor():
    hf_config = presets.testbed_config()
    scene_config = S.TestbedConfig.from_llava_config(hf_config)
    scenes = S.sample_scenes(S.split_rng("validation", 5), 2, scene_config, "validation")
    preprocessor = Preprocessor(hf_config, S.make_tokenizer(), presets.llava15_image_processor(hf_config))
    expected = preprocessor.pixel_values([Image.fromarray(image) for image in S.render_scenes_numpy(scenes)])
    normalization = T.PixelNormalization.from_hf_config(hf_config)
    got = jax.jit(lambda s: T.normalize_pixels(S.render_scenes(s, scene_config), normalization))(scenes)
    assert got.shape == expected.shape == (2, 3, 336, 336)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def test_training_tokens_are_the_preprocessors_prompt_plus_answer(tiny):
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    preprocessor = Preprocessor(hf_config, S.make_tokenizer(), presets.llava15_image_processor(hf_config))
    batch = T.host_batch(0, 7, 6, cfg, scene_config, preprocessor.pad_token_id)
    questions = S.sample_batch(T.batch_rng(0, 7), 6, scene_config, render=False).questions
    for row, question in enumerate(questions):
        prompt = preprocessor.encode(question.text)
        answer = preprocessor.tokenizer(question.answer, add_special_tokens=False)["input_ids"]
        assert batch.prompt_lengths[row] == len(prompt)
        expected = prompt + answer + [preprocessor.pad_token_id] * (T.training_sequence_length(cfg) - len(prompt) - 1)
        assert batch.input_ids[row].tolist() == expected
        assert batch.answer_ids[row].tolist() == answer + [preprocessor.eos_token_id]


def test_training_logits_are_the_inference_prefills_and_see_the_image(tiny):
    """The teacher-forced training forward is the inference path: its logits at the last prompt token
    equal `LlavaForConditionalGeneration.prefill`'s on the same batch, and they change with the image
    (the image features reach the answer position). Diagnosis of the testbed run stuck at the text
    prior (experiments/results/testbed_training/DIAGNOSIS.md) started here; this is its wiring check."""
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    pad = S.make_tokenizer().pad_token_id
    batch = T.host_batch(0, 3, 4, cfg, scene_config, pad)
    pixels = T.normalize_pixels(S.render_scenes(batch.scenes, scene_config), T.PixelNormalization.from_hf_config(hf_config))
    logits = T.answer_logits(model, pixels, jnp.asarray(batch.input_ids), jnp.asarray(batch.prompt_lengths))
    prompts = np.array(batch.input_ids)
    for row, length in enumerate(batch.prompt_lengths):
        prompts[row, length:] = pad  # drop the teacher-forced answer word
    inference = model.prefill(jnp.asarray(prompts), jnp.asarray(batch.prompt_lengths), pixels, extra_slots=2).logits
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(inference), rtol=1e-5, atol=1e-5)
    other = T.answer_logits(model, pixels[::-1], jnp.asarray(batch.input_ids), jnp.asarray(batch.prompt_lengths))
    assert float(jnp.abs(other[:, 0] - logits[:, 0]).max()) > 1e-3


def test_loss_falls_when_overfitting_one_batch(tiny):
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    options = T.TrainOptions()
    graphdef, params = nnx.split(LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    optimizer = T.make_optimizer(options)
    opt_state = optimizer.init(params)
    step = T.make_train_step(graphdef, optimizer, scene_config, T.PixelNormalization.from_hf_config(hf_config),
                             jnp.float32)
    batch = jax.device_put(T.host_batch(0, 0, 4, cfg, scene_config, S.make_tokenizer().pad_token_id))
    losses = []
    for _ in range(30):
        params, opt_state, metrics = step(params, opt_state, batch, np.float32(1e-2))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses


def test_interrupted_run_resumes_to_the_same_parameters(runs):
    assert runs["interrupted"] == dict(status="interrupted", step=INTERRUPT_AT)
    assert runs["full"]["step"] == runs["resumed"]["step"] == TOTAL_STEPS
    states = []
    for name in ("full", "resumed"):
        with np.load(os.path.join(runs["root"], name, "work", T.STATE_ARRAYS)) as arrays:
            states.append({key: arrays[key] for key in arrays.files})
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key], err_msg=f"state array {key}")
    logs = [T.read_log(os.path.join(runs["root"], name, "checkpoint", T.LOG_FILE)) for name in ("full", "resumed")]
    train = [[{k: v for k, v in r.items() if k not in ("examples_per_second", "wall_seconds")}
              for r in records if r["type"] == "train"] for records in logs]  # timings differ, values must not
    assert train[0] == train[1] and [r["step"] for r in train[0]] == [2, 4, 6]
    assert [r["step"] for r in logs[0] if r["type"] == "eval"] == [3, TOTAL_STEPS]


def test_export_loads_here_and_in_transformers(runs, tiny):
    import torch
    from transformers import LlavaForConditionalGeneration as TorchLlava

    from models.checkpoint import load_checkpoint

    directory = os.path.join(runs["root"], "full", "checkpoint")
    hf_config, model = load_checkpoint(directory)
    assert from_hf_config(hf_config) == from_hf_config(tiny[0])
    torch_model, info = TorchLlava.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    # The exported (float16) weights are the trained float32 ones, rounded.
    graphdef, template = nnx.split(LlavaForConditionalGeneration(from_hf_config(hf_config), rngs=nnx.Rngs(1)))
    optimizer_state = T.make_optimizer(T.TrainOptions()).init(template)
    trained, _, meta = T.load_state(os.path.join(runs["root"], "full", "work"), template, optimizer_state)
    assert meta["step"] == TOTAL_STEPS
    for exported, saved in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(exported), np.asarray(saved).astype(np.float16).astype(np.float32))
    preprocessor = Preprocessor.from_checkpoint(directory)
    assert preprocessor.tokenizer.get_vocab() == S.make_tokenizer().get_vocab()
    result = json.load(open(os.path.join(directory, T.TEST_RESULT_FILE)))
    assert result["num_scored"] == 8 and set(result["per_kind"]) <= set(S.KINDS)
    assert os.path.getsize(os.path.join(directory, T.CURVE_FILE)) > 0
    assert runs["full"]["test"]["accuracy"] == result["overall"]["accuracy"]


def test_warm_start_reads_the_exported_weights(runs, tiny):
    from models.checkpoint import load_checkpoint

    directory = os.path.join(runs["root"], "full", "checkpoint")
    cfg = from_hf_config(tiny[0])
    _, template = nnx.split(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(3)))
    weights = T.initial_weights(directory, cfg, template)
    _, exported = load_checkpoint(directory)
    for got, expected in zip(jax.tree.leaves(weights), jax.tree.leaves(nnx.state(exported))):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    other = from_hf_config(presets.testbed_config(vision=TINY_VISION, text=dict(TINY_TEXT, num_hidden_layers=2)))
    with pytest.raises(ValueError, match="another model configuration"):
        T.initial_weights(directory, other, template)


def test_copy_to_out_splits_the_tar_under_the_tool_limit(runs, tmp_path, monkeypatch):
    import io
    import tarfile

    monkeypatch.setattr(T, "OUT_PART_BYTES", 50_000)
    directory = os.path.join(runs["root"], "full", "checkpoint")
    written = T.copy_to_out(directory, str(tmp_path))
    parts = sorted(p for p in written if ".tar.part" in p)
    assert len(parts) > 1 and all(os.path.getsize(p) <= 50_000 for p in parts)
    data = b"".join(open(p, "rb").read() for p in sorted(parts, key=lambda p: int(p.rsplit("part", 1)[1])))
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert "checkpoint/model.safetensors" in names and "checkpoint/config.json" in names


def test_testbed_preset_fits_the_size_budget_and_the_prompt():
    hf_config = presets.testbed_config()
    cfg = from_hf_config(hf_config)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.num_image_tokens) == (336, 14, 576)
    assert cfg.text.vocab_size >= S.TOKENIZER_SIZE and cfg.text.vocab_size % 8 == 0
    assert cfg.image_token_index == S.IMAGE_TOKEN_INDEX and cfg.text.num_layers >= 3
    longest = T.training_sequence_length(cfg) - 1 + TestbedBenchmark.max_new_tokens  # prompt + generation
    assert longest <= cfg.text.max_position_embeddings
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract)))
    assert num_params * 2 < 24e6  # float16 weights; tokenizer, processor and logs add well under 1 MB
