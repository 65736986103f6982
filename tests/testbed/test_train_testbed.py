"""Tests of the testbed trainer at a tiny scale on the CPU.

The trainer's claims, each checked here: its in-step pixels equal the image processor's, its token
sequences equal the preprocessor's prompt + answer, the model learns (a fixed batch is overfitted),
an interrupted run resumed from its saved state ends bit-identical to an uninterrupted one, and the
export is a llava-hf checkpoint that both this project's loader and transformers load with no
missing or unexpected keys. The full-size preset is checked for its size budget and shapes only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from experiments.benchmarks.testbed import TestbedBenchmark
from experiments.testbed import model as testbed_model
from experiments.testbed import scenes as S
from experiments.testbed.training import batches, export, probes, state
from experiments.testbed.training import step as training_step
from experiments.testbed.training.config import TrainOptions
from experiments.train_testbed import run_training
from models import presets
from models.config import from_hf_config
from models.llava import LlavaForConditionalGeneration
from models.preprocess import Preprocessor
from tests.helpers import once_per_session

# A model small enough to train in seconds: 112 px images (8 x 8 patches), two narrow towers.
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=112
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2
)
TOTAL_STEPS = 6
INTERRUPT_AT = 4  # a multiple of log_every, so both runs average the same steps in each log line
# Questions per training image in every training test: the trainer's runs then take the step of the
# overfitting test, compiled once for the shapes they share (batch 4, two turns).
TURNS = 2


@pytest.fixture(scope="module")
def tiny():
    hf_config = testbed_model.testbed_config(vision=TINY_VISION, text=TINY_TEXT)
    # Fewer, smaller objects fit the 112 px canvas.
    scene_config = S.TestbedConfig.from_llava_config(hf_config, max_objects=3, max_object_patches=2.0)
    return hf_config, scene_config


def _options(root, name: str, **overrides) -> TrainOptions:
    settings = dict(
        output_dir=os.path.join(root, name, "checkpoint"),
        work_dir=os.path.join(root, name, "work"),
        steps=TOTAL_STEPS,
        batch_size=4,
        turns=TURNS,
        learning_rate=3e-3,
        warmup_steps=2,
        eval_every=3,
        eval_items=8,
        eval_batch_size=4,
        log_every=2,
        save_every=0,
        test_dir=os.path.join(root, "test_split"),
        test_items=8,
        quiet=True,
    )
    settings.update(overrides)
    return TrainOptions(**settings)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """An uninterrupted run (validated, exported, tested), and the same run interrupted then resumed
    (evaluation off: it is the training state that must match)."""
    hf_config, scene_config = tiny

    def compute():
        root = str(tmp_path_factory.mktemp("train_testbed"))
        quick = dict(eval_items=0, test_items=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            full = run_training(_options(root, "full"), hf_config, scene_config)
            interrupted = run_training(
                _options(root, "resumed", stop_at_step=INTERRUPT_AT, **quick), hf_config, scene_config
            )
            resumed = run_training(_options(root, "resumed", **quick), hf_config, scene_config)
        return dict(root=root, full=full, interrupted=interrupted, resumed=resumed)

    return once_per_session(tmp_path_factory, "train_testbed_runs", compute)


def test_pixels_normalised_in_step_equal_the_image_processor():
    hf_config = testbed_model.testbed_config()
    scene_config = S.TestbedConfig.from_llava_config(hf_config)
    scenes = S.sample_scenes(S.split_rng("validation", 5), 2, scene_config, "validation")
    preprocessor = Preprocessor(hf_config, S.make_tokenizer(), presets.llava15_image_processor(hf_config))
    expected = preprocessor.pixel_values([Image.fromarray(image) for image in S.render_scenes_numpy(scenes)])
    normalization = training_step.PixelNormalization.from_hf_config(hf_config)
    got = jax.jit(lambda s: training_step.scene_pixels(s, scene_config, normalization))(scenes)
    assert got.shape == expected.shape == (2, 3, 336, 336)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def _host_batch(cfg, scene_config, step: int, batch_size: int, turns: int, **kwargs) -> batches.DeviceBatch:
    tokenizer = S.make_tokenizer()
    return batches.host_batch(
        0,
        step,
        batch_size,
        cfg,
        scene_config,
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        turns=turns,
        **kwargs,
    )


def _batch_questions(scene_config, step: int, batch_size: int, turns: int, kind_weights=None):
    """The questions host_batch draws for batch `step` (same generator, same order of draws)."""
    rng = batches.batch_rng(0, step)
    scenes = S.sample_scenes(rng, batch_size, scene_config, "train")
    if kind_weights is not None:
        scene_config = dataclasses.replace(scene_config, kind_weights=kind_weights)
    return S.sample_questions(
        rng, scenes, scene_config, per_scene=turns, negative_types=S.TRAINING_NEGATIVE_TYPES
    )


@pytest.mark.parametrize("turns", [1, 4])
def test_training_tokens_are_the_preprocessors_conversation(tiny, turns):
    """Row = the preprocessor's prompt for the first question + its answer, then per later question
    `</s>` + the vicuna_v1 follow-up turn as the tokenizer encodes it + its answer; each target sits at
    the position whose logits predict it (last prompt token -> answer, answer -> `</s>`)."""
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    preprocessor = Preprocessor(hf_config, S.make_tokenizer(), presets.llava15_image_processor(hf_config))
    tokenizer, pad, eos = preprocessor.tokenizer, preprocessor.pad_token_id, preprocessor.eos_token_id
    batch = _host_batch(cfg, scene_config, 7, 6, turns)
    length = batches.training_sequence_length(cfg, turns)
    assert batch.input_ids.shape == (6, length) and batch.target_ids.shape == (6, 2 * turns)
    for row, questions in enumerate(_batch_questions(scene_config, 7, 6, turns)):
        assert 1 <= len(questions) <= turns
        expected, targets = [], []
        for turn, question in enumerate(questions):
            if turn == 0:
                expected += preprocessor.encode(question.text)
            else:
                expected += [eos] + tokenizer(f"USER: {question.text} ASSISTANT:", add_special_tokens=False)[
                    "input_ids"
                ]
            answer = tokenizer(question.answer, add_special_tokens=False)["input_ids"]
            assert len(answer) == 1
            targets += [(len(expected) - 1, answer[0]), (len(expected), eos)]
            expected += answer
        assert batch.lengths[row] == len(expected)
        assert batch.input_ids[row].tolist() == expected + [pad] * (length - len(expected))
        used = 2 * len(questions)
        assert batch.target_mask[row].tolist() == [True] * used + [False] * (2 * turns - used)
        assert (
            list(zip(batch.target_positions[row, :used].tolist(), batch.target_ids[row, :used].tolist()))
            == targets
        )
        assert batch.kind_ids[row].tolist() == [S.KINDS.index(q.kind) for q in questions] + [-1] * (
            turns - len(questions)
        )
        expected_relations = [list(q.objects) if q.kind == "position" else [-1, -1] for q in questions]
        assert batch.relation_objects[row].tolist() == expected_relations + [[-1, -1]] * (
            turns - len(questions)
        )


def test_relation_targets_are_the_named_objects_centres(tiny):
    """The relation probe's targets: per position turn, the subject's then the reference object's box
    centre (row, column) in [-1, 1], read from the layout by slot; other turns are masked out."""
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    batch = _host_batch(cfg, scene_config, 5, 8, 4, kind_weights=(0.1, 0.1, 0.1, 0.7))
    targets, mask = jax.jit(probes.relation_targets, static_argnums=2)(
        batch.scenes, batch.relation_objects, scene_config
    )
    half = scene_config.image_size / 2
    questions = _batch_questions(scene_config, 5, 8, 4, (0.1, 0.1, 0.1, 0.7))
    position_turns = 0
    for row, row_questions in enumerate(questions):
        objects = {o.index: o for o in S.scene_objects(batch.scenes, row)}
        for turn in range(4):
            is_position = turn < len(row_questions) and row_questions[turn].kind == "position"
            assert bool(mask[row, turn]) == is_position
            if not is_position:
                continue
            position_turns += 1
            subject, reference = (objects[i] for i in row_questions[turn].objects)
            expected = [
                c / half - 1 for o in (subject, reference) for c in (o.top + o.size / 2, o.left + o.size / 2)
            ]
            np.testing.assert_allclose(np.asarray(targets[row, turn]), expected, atol=1e-6)
            relation = re.search(r"(left|right|above|below)", row_questions[turn].text).group(1)
            # the answer is a comparison of these targets, as relation_holds defines it
            assert S.relation_holds(relation, subject, reference) == (row_questions[turn].answer == S.YES)
    assert position_turns >= 8


def test_training_kind_weights_change_only_the_training_mixture(tiny):
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    mostly_position = (0.05, 0.0, 0.0, 0.95)  # existence always works: the fallback of a scene without a pair
    weighted = _host_batch(cfg, scene_config, 3, 16, 1, kind_weights=mostly_position)
    expected = [S.KINDS.index(qs[0].kind) for qs in _batch_questions(scene_config, 3, 16, 1, mostly_position)]
    assert weighted.kind_ids[:, 0].tolist() == expected
    position = S.KINDS.index("position")
    # A scene that cannot support a position question falls back to another kind; most can.
    assert (weighted.kind_ids[:, 0] == position).mean() > 0.5
    assert (_host_batch(cfg, scene_config, 3, 16, 1).kind_ids[:, 0] == position).mean() < 0.5
    with pytest.raises(ValueError, match="one weight per kind"):
        run_training(TrainOptions(train_kind_weights=(1.0, 1.0), quiet=True), hf_config, scene_config)


@pytest.mark.slow
def test_training_logits_are_the_inference_prefills_and_see_the_image(tiny):
    """The teacher-forced training forward is the inference path: its logits at the last prompt token
    equal `LlavaForConditionalGeneration.prefill`'s on the same batch, and they change with the image
    (the image features reach the answer position). Diagnosis of the testbed run stuck at the text
    prior (experiments/results/testbed_training/DIAGNOSIS.md) started here; this is its wiring check."""
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    pad = S.make_tokenizer().pad_token_id
    batch = _host_batch(cfg, scene_config, 3, 4, 3)
    # The forward passes jitted, as training and inference run them (eagerly, each operation compiles
    # on its own).
    normalization = training_step.PixelNormalization.from_hf_config(hf_config)
    pixels = jax.jit(lambda scenes: training_step.scene_pixels(scenes, scene_config, normalization))(
        batch.scenes
    )

    @nnx.jit
    def logits_of(model, pixel_values):
        return training_step.answer_logits_and_hidden(
            model,
            model.image_features(pixel_values),
            jnp.asarray(batch.input_ids),
            jnp.asarray(batch.lengths),
            jnp.asarray(batch.target_positions),
        )[0]

    logits = logits_of(model, pixels)
    first_prompt_lengths = batch.target_positions[:, 0] + 1
    prompts = np.array(batch.input_ids)
    for row, length in enumerate(first_prompt_lengths):
        prompts[row, length:] = pad  # keep only the first turn's prompt
    inference = nnx.jit(
        lambda model, ids, lengths, pixel_values: (
            model.prefill(ids, lengths, pixel_values, extra_slots=2).logits
        )
    )(model, jnp.asarray(prompts), jnp.asarray(first_prompt_lengths), pixels)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(inference), rtol=1e-5, atol=1e-5)
    other = logits_of(model, pixels[::-1])
    assert float(jnp.abs(other[:, 0] - logits[:, 0]).max()) > 1e-3


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_batch(tiny):
    hf_config, scene_config = tiny
    cfg = from_hf_config(hf_config)
    options = TrainOptions()
    graphdef, params = nnx.split(LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    trainable = probes.initial_trainable(params, cfg, 0)
    optimizer = training_step.make_optimizer(options)
    opt_state = optimizer.init(trainable)
    step = training_step.make_train_step(
        graphdef,
        optimizer,
        scene_config,
        training_step.PixelNormalization.from_hf_config(hf_config),
        jnp.float32,
        1.0,
        options.coordinate_loss_weight,
        options.relation_loss_weight,
        options.freeze_vision,  # the trainer's arguments, all given: its runs reuse this compiled step
    )
    batch = jax.device_put(_host_batch(cfg, scene_config, 0, 4, TURNS, kind_weights=(0.2, 0.2, 0.1, 0.5)))
    assert int((np.asarray(batch.relation_objects) >= 0).all(-1).sum()) >= 2  # the relation probe has targets
    losses, patch_losses, coordinate_losses, relation_losses = [], [], [], []
    for _ in range(50):
        trainable, opt_state, metrics = step(trainable, opt_state, batch, np.float32(1e-2))
        losses.append(float(metrics["loss"]))
        patch_losses.append(float(metrics["patch_loss"]))
        coordinate_losses.append(float(metrics["coordinate_mse"]))
        relation_losses.append(float(metrics["relation_mse"]))
    assert losses[-1] < 0.1 * losses[0], losses
    assert patch_losses[-1] < 0.5 * patch_losses[0], patch_losses
    assert coordinate_losses[-1] < 0.5 * coordinate_losses[0], coordinate_losses
    assert relation_losses[-1] < 0.5 * relation_losses[0], relation_losses


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_parameters(runs):
    assert runs["interrupted"] == dict(status="interrupted", step=INTERRUPT_AT)
    assert runs["full"]["step"] == runs["resumed"]["step"] == TOTAL_STEPS
    states = []
    for name in ("full", "resumed"):
        with np.load(os.path.join(runs["root"], name, "work", state.STATE_ARRAYS)) as arrays:
            states.append({key: arrays[key] for key in arrays.files})
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key], err_msg=f"state array {key}")
    logs = [
        state.read_log(os.path.join(runs["root"], name, "checkpoint", state.LOG_FILE))
        for name in ("full", "resumed")
    ]
    train = [
        [
            {k: v for k, v in r.items() if k not in ("examples_per_second", "wall_seconds")}
            for r in records
            if r["type"] == "train"
        ]
        for records in logs
    ]  # timings differ, values must not
    assert train[0] == train[1] and [r["step"] for r in train[0]] == [2, 4, 6]
    assert [r["step"] for r in logs[0] if r["type"] == "eval"] == [3, TOTAL_STEPS]


@pytest.mark.slow
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
    cfg = from_hf_config(hf_config)
    graphdef, template = nnx.split(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(1)))
    template = probes.initial_trainable(template, cfg, 1)
    optimizer_state = training_step.make_optimizer(TrainOptions()).init(template)
    trained, _, meta = state.load_state(os.path.join(runs["root"], "full", "work"), template, optimizer_state)
    assert meta["step"] == TOTAL_STEPS
    for exported, saved in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(trained["model"])):
        np.testing.assert_array_equal(
            np.asarray(exported), np.asarray(saved).astype(np.float16).astype(np.float32)
        )
    preprocessor = Preprocessor.from_checkpoint(directory)
    assert preprocessor.tokenizer.get_vocab() == S.make_tokenizer().get_vocab()
    result = json.load(open(os.path.join(directory, export.TEST_RESULT_FILE)))
    assert result["num_scored"] == 8 and set(result["per_kind"]) <= set(S.KINDS)
    assert os.path.getsize(os.path.join(directory, export.CURVE_FILE)) > 0
    assert runs["full"]["test"]["accuracy"] == result["overall"]["accuracy"]


@pytest.mark.slow
def test_warm_start_reads_the_exported_weights(runs, tiny):
    from models.checkpoint import load_checkpoint

    directory = os.path.join(runs["root"], "full", "checkpoint")
    cfg = from_hf_config(tiny[0])
    _, template = nnx.split(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(3)))
    weights = state.initial_weights(directory, cfg, template)
    _, exported = load_checkpoint(directory)
    for got, expected in zip(jax.tree.leaves(weights), jax.tree.leaves(nnx.state(exported))):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    other = from_hf_config(
        testbed_model.testbed_config(vision=TINY_VISION, text=dict(TINY_TEXT, num_hidden_layers=2))
    )
    with pytest.raises(ValueError, match="another model configuration"):
        state.initial_weights(directory, other, template)


@pytest.mark.slow
def test_copy_to_out_splits_the_tar_under_the_tool_limit(runs, tmp_path, monkeypatch):
    import io
    import tarfile

    monkeypatch.setattr(export, "OUT_PART_BYTES", 50_000)
    directory = os.path.join(runs["root"], "full", "checkpoint")
    written = export.copy_to_out(directory, str(tmp_path))
    parts = sorted(p for p in written if ".tar.part" in p)
    assert len(parts) > 1 and all(os.path.getsize(p) <= 50_000 for p in parts)
    data = b"".join(open(p, "rb").read() for p in sorted(parts, key=lambda p: int(p.rsplit("part", 1)[1])))
    names = tarfile.open(fileobj=io.BytesIO(data)).getnames()
    assert "checkpoint/model.safetensors" in names and "checkpoint/config.json" in names


def test_testbed_preset_fits_the_size_budget_and_the_prompt():
    hf_config = testbed_model.testbed_config()
    cfg = from_hf_config(hf_config)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.num_image_tokens) == (336, 14, 576)
    assert cfg.text.vocab_size >= S.TOKENIZER_SIZE and cfg.text.vocab_size % 8 == 0
    assert cfg.image_token_index == S.IMAGE_TOKEN_INDEX and cfg.text.num_layers >= 3
    # prompt + generation
    longest = batches.training_sequence_length(cfg) - 1 + TestbedBenchmark.max_new_tokens
    assert longest <= cfg.text.max_position_embeddings
    abstract = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract)))
    assert num_params * 2 < 24e6  # float16 weights; tokenizer, processor and logs add well under 1 MB


def _patch_targets_by_loops(scenes, scene_config):
    """patch_targets written out per object and per patch, in plain Python (the reference)."""
    grid, patch = scene_config.grid_size, scene_config.patch_size
    batch = scenes.valid.shape[0]
    classes = np.zeros((batch, grid, grid), np.int64)
    centres = np.zeros((batch, grid, grid), bool)
    coordinates = np.zeros((batch, grid, grid, 2), np.float32)
    half = scene_config.image_size / 2
    for b in range(batch):
        for obj in S.scene_objects(scenes, b):
            centre_y, centre_x = obj.top + obj.size / 2, obj.left + obj.size / 2
            for r in range(grid):
                for c in range(grid):
                    y, x = r * patch + patch / 2, c * patch + patch / 2  # the patch's centre point
                    if obj.top <= y < obj.top + obj.size and obj.left <= x < obj.left + obj.size:
                        assert classes[b, r, c] == 0, "boxes overlap"
                        classes[b, r, c] = 1 + obj.colour * len(S.SHAPES) + obj.shape
                        coordinates[b, r, c] = (centre_y / half - 1, centre_x / half - 1)
            centres[b, int(centre_y // patch), int(centre_x // patch)] = True
    return classes.reshape(batch, -1), centres.reshape(batch, -1), coordinates.reshape(batch, -1, 2)


def test_patch_targets_label_each_object_where_it_lies():
    """Full-size scenes: the jitted labels equal a per-patch loop, every object covers at least one
    patch centre and owns exactly one centre patch, and the class decodes to its colour and shape."""
    scene_config = S.TestbedConfig()
    scenes = S.sample_scenes(S.split_rng("validation", 11), 8, scene_config, "validation")
    classes, centres, coordinates = jax.jit(probes.patch_targets, static_argnums=1)(scenes, scene_config)
    expected_classes, expected_centres, expected_coordinates = _patch_targets_by_loops(scenes, scene_config)
    np.testing.assert_array_equal(np.asarray(classes), expected_classes)
    np.testing.assert_array_equal(np.asarray(centres), expected_centres)
    np.testing.assert_allclose(np.asarray(coordinates), expected_coordinates, atol=1e-6)
    assert float(np.abs(expected_coordinates).max()) <= 1.0
    assert classes.shape == (8, scene_config.grid_size**2)
    for b in range(8):
        objects = S.scene_objects(scenes, b)
        assert int(np.asarray(centres[b]).sum()) == len(objects)
        labels = set(np.asarray(classes[b]).tolist()) - {0}
        assert labels == {1 + o.colour * len(S.SHAPES) + o.shape for o in objects}
    assert int(classes.max()) < probes.num_patch_classes()


@pytest.mark.slow
def test_patch_probe_loss_balances_objects_and_background():
    """A probe that is right on the background and uniform on objects loses ~half its class loss to
    the objects, however few patches they cover (a plain mean would hide them)."""
    classes = jnp.zeros((1, 100), jnp.int32).at[0, :2].set(5)  # 2 object patches of 100
    centres = jnp.zeros((1, 100), bool).at[0, 0].set(True)
    width = 4
    features = jnp.zeros((1, 100, width)).at[0, 2:, 0].set(1.0)  # background patches get feature 0
    probe = {
        "kernel": jnp.zeros((width, probes.probe_outputs())).at[0, 0].set(50.0),
        "bias": jnp.zeros(probes.probe_outputs()),
    }
    coordinates = jnp.zeros((1, 100, 2)).at[0, :2].set(jnp.asarray([0.5, -0.25]))
    coordinates_off_objects = coordinates.at[0, 2:].set(0.9)  # background coordinates must not count
    class_nll, centre_nll, coordinate_mse, accuracy = jax.jit(probes.patch_probe_losses)(
        probe, features, classes, centres, coordinates_off_objects
    )
    uniform = np.log(probes.num_patch_classes())
    np.testing.assert_allclose(float(class_nll), 0.5 * uniform, rtol=1e-4)
    np.testing.assert_allclose(float(centre_nll), np.log(2.0), rtol=1e-4)  # all centre logits are 0
    np.testing.assert_allclose(float(coordinate_mse), 0.5**2 + 0.25**2, rtol=1e-5)  # predictions are 0
    assert float(accuracy) == 0.0  # argmax of a uniform row is class 0, never the object's 5
