"""Train the testbed LLaVA from scratch and ship it as a llava-hf checkpoint.

No pretrained LVLM can be downloaded here, so pruning methods are compared on a small LLaVA trained on
the procedural VQA task of `experiments.testbed`. This script trains the project's own Flax modules
(CLIP tower + projector + LLaMA, the `testbed` preset of `models.presets`) end to end and exports
them in llava-hf's layout, so the eval harness loads the result exactly like a released checkpoint.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m experiments.train_testbed --max_minutes=8.5

The committed checkpoint is four such calls on an H200 (one device call each; WORKSPACE.md, issue 5),
each a warm start from the previous export. The coordinate and relation probes came in at stages 3
and 4, so stages 1-2 ran without them (the weights below reproduce that):

    T="PYTHONUNBUFFERED=1 PYTHONPATH=. python3 -m experiments.train_testbed"
    W="--init_from=checkpoints/testbed --learning_rate=3e-4 --warmup_steps=100 --noresume"
    $T --max_minutes=8.5 --coordinate_loss_weight=0 --relation_loss_weight=0                # 0.917
    $T $W --seed=1 --max_minutes=4.6 --train_kind_weights=0.3,0.1,0.1,0.5 \
        --coordinate_loss_weight=0 --relation_loss_weight=0                                  # 0.923
    $T $W --seed=2 --max_minutes=8.9 --train_kind_weights=0.25,0.1,0.05,0.6 --relation_loss_weight=0  # 0.944
    $T $W --seed=3 --max_minutes=8.9 --train_kind_weights=0.15,0.05,0.05,0.75               # 0.999

writes checkpoints/testbed/ (weights, config, tokenizer, processor, training_log.jsonl,
training_curve.png, test_accuracy.json), and, when $OUT is set (the device tool), the same directory
as a tar cut into parts under 16 MiB plus the small result files in $OUT.

Measured on one H200 (jax 0.11.2, 2026-12-01): ~1610 examples/s in bfloat16 at batch 128 with 6
questions per image (577 CLIP tokens through 5 layers, 713 LLaMA tokens through 4), about 30 s of
start-up and 32 s to compile before the first step, 15-18 s for the first validation (it compiles the
inference path), then ~0.5 s per validation, and ~10 s to export and test at the end.

Design, and why:

* Data never touches the disk. Each step's layouts, questions and token ids are drawn on the host
  (`sample_batch(..., render=False)`, 8k-20k examples/s on one core) by a prefetch thread; only the
  small `SceneParams` travel to the device, where the jitted step renders the pixels
  (`render_scenes`, integer-exact) and normalises them like LLaVA-1.5's image processor. The scenes are
  already squares of the tower's input size, so the processor's pad / resize / crop are identities
  and it reduces to a 1/255 rescale and the CLIP mean/std normalisation (checked in the tests
  against `Preprocessor.pixel_values`).
* Batch `s` is a pure function of (seed, s): a resumed or interrupted run sees exactly the batches an
  uninterrupted one does, however far the prefetch thread ran ahead.
* Loss: cross-entropy on the answer words and their `</s>`, by teacher forcing. Each image gets
  --turns questions as one vicuna_v1 conversation (LLaVA-1.5's own multi-turn format: `... ASSISTANT:
  A1</s>USER: Q2 ASSISTANT: A2</s>...`); its first turn is exactly the single-question inference
  prompt. Six answers per image cost ~15% more tokens than one. The forward reuses the inference
  modules (image_features -> embed_prompt -> each layer's `prefill` -> logits), no KV cache.
* Patch probe (training only, not exported): a linear map from each image feature (the projector's
  output, what the LLM reads) to the (colour, shape) of the object covering that patch and to whether
  the patch holds an object's centre, with cross-entropy balanced between object and background
  patches, added to the answer loss (--patch_loss_weight). It hands the vision tower 576 labels per
  image instead of one answer word. With the answer loss alone the model stayed at the question-text
  prior (49% test accuracy after 5.6 H100 minutes; DIAGNOSIS.md); with the probe and 6 turns it reached
  91.7% in 8.5 H200 minutes.
* Coordinate probe (--coordinate_loss_weight): the same linear map also regresses, on object patches,
  the covering object's box-centre (row, column): what position questions compare.
* Relation probe (--relation_loss_weight): a linear map from the LLM's residual stream entering its
  last layer, at a position question's answer slot, to the two named objects' centres. Without it
  left/right questions sat at chance for 5000 steps (the model said "no") while above/below, which
  the raster order of the image tokens gives away, were 100% right; with it position went from 0.75 to
  0.997 in 1000 steps (the probe's error fell first, then the answer followed). It supervises the
  fetch of two coordinates from two objects' tokens, the step the answer word alone did not teach.
* Mixed precision: float32 master weights and AdamW state, bfloat16 compute (the weights are cast
  inside the step); norms, softmax and logits stay float32 inside the modules.
* One compilation: static shapes (fixed batch, prompts padded to the longest template); the step
  donates the parameters and optimizer state, and the host runs at most two steps ahead of the
  device (it reads each step's metrics two steps later), so its clock is the device's.
* The schedule follows the clock as well as the step count: the learning rate is fed to the step,
  with progress = max(step / --steps, fraction of the --max_minutes budget used), so a run cut short
  by its wall-clock budget still anneals to zero before it stops, saves and exports.
* Validation runs the REAL inference path (`LlavaRunner` prefill + greedy decode) on the in-memory
  weights over a fixed split written with `write_split`; the final test reloads the exported
  directory with `LlavaEngine.from_checkpoint`, as the eval harness does.
* Everything needed to continue (params, optimizer state, step, schedule progress, log) is saved in
  --work_dir; --resume continues from it (--stop_at_step splits a run over several commands on one
  machine). On a fresh machine, where only the export came back, --init_from warm-starts from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import queue
import shutil
import tarfile
import threading
import time
from collections import defaultdict, deque
from typing import Any, NamedTuple

# --max_minutes counts from here, so the imports below (JAX, transformers: seconds) are in the budget.
PROCESS_START = time.time()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments.testbed.benchmark import TestbedBenchmark
from experiments.testbed.scenes import (
    COLOURS,
    KINDS,
    QUESTIONS_FILE,
    SHAPES,
    SPLITS,
    TRAINING_NEGATIVE_TYPES,
    TestbedConfig,
    answer_token_ids,
    encode_followup,
    encode_prompt,
    make_tokenizer,
    max_followup_length,
    max_prompt_length,
    render_scenes,
    sample_questions,
    sample_scenes,
    write_split,
)
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import from_hf_config
from models.engine import LlavaEngine
from models.generate import LlavaRunner, SamplingConfig, tokens_until_eos
from models.layers import EMPTY_POSITION
from models.llava import LlavaForConditionalGeneration
from models.preprocess import Preprocessor, load_image
from models.presets import llava15_image_processor, testbed_config


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Every setting of a run: the flags' defaults, and a value the tests can build directly.

    The defaults are the committed checkpoint's first stage (batch 128, 6 questions per image,
    patch-probe weight 1, peak learning rate 5e-4 after 300 warm-up steps, cosine decay on the clock)
    with its last stage's probes (coordinate and relation weights 10); the module docstring lists the
    four stages (WORKSPACE.md). An H200 runs the step at ~1610 examples/s in bfloat16, so an 8.5-minute budget
    trains on about 0.7M images (~5500 steps of 128); --steps only caps the run.
    """

    output_dir: str = "checkpoints/testbed"
    work_dir: str = "runs/testbed"
    steps: int = 20000
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 300
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    patch_loss_weight: float = 1.0
    # Weight of the probe's object-centre coordinate regression (added for the position questions,
    # which lagged at ~0.66 without it; 0 = off, as the checkpoint's first two stages trained).
    coordinate_loss_weight: float = 10.0
    # Weight of the relation probe (the two named objects' centres, read from the LLM at a position
    # question's answer slot); 0 = off.
    relation_loss_weight: float = 10.0
    turns: int = 6
    # Question-kind mixture of the TRAINING batches (None: the testbed's own, as in the evaluation
    # splits). A warm-started run can put more weight on the kind that lags.
    train_kind_weights: tuple[float, ...] | None = None
    seed: int = 0
    eval_every: int = 500
    eval_items: int = 500
    eval_batch_size: int = 250
    log_every: int = 100
    save_every: int = 2000
    max_minutes: float | None = None
    stop_at_step: int | None = None
    resume: bool = True
    dtype: str = "auto"
    eval_dtype: str = "float32"
    save_dtype: str = "float16"
    test_dir: str = "experiments/data/testbed_test"
    test_items: int = 1000
    init_from: str = ""
    compilation_cache_dir: str = ""  # the command line's default is .jax_cache
    prefetch: int = 4  # batches sampled ahead by the host thread
    quiet: bool = False

    @classmethod
    def from_flags(cls) -> TrainOptions:
        names = {field.name for field in dataclasses.fields(cls)}
        values = {name: FLAGS[name].value for name in names if name in FLAGS}
        if "train_kind_weights" in values:
            values["train_kind_weights"] = tuple(map(float, values["train_kind_weights"])) or None
        return cls(**values)


_DEFAULT = TrainOptions()
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when this file runs as a program: other entry points
    (benchmark, validate) define flags of the same names, and tests import them together."""
    flags.DEFINE_string(
        "output_dir",
        _DEFAULT.output_dir,
        "Where the final llava-hf checkpoint (and its training log, curve and test accuracy) is written.",
    )
    flags.DEFINE_string(
        "work_dir", _DEFAULT.work_dir, "Training state (for --resume), validation split and log."
    )
    flags.DEFINE_integer(
        "steps",
        _DEFAULT.steps,
        "Most optimizer steps (the cosine schedule's length in steps; "
        "with --max_minutes the schedule follows the clock when that is sooner).",
    )
    flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Examples per step.")
    flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "Peak AdamW learning rate.")
    flags.DEFINE_integer("warmup_steps", _DEFAULT.warmup_steps, "Linear warm-up steps.")
    flags.DEFINE_float("weight_decay", _DEFAULT.weight_decay, "AdamW weight decay (matrices only).")
    flags.DEFINE_float("grad_clip", _DEFAULT.grad_clip, "Global gradient-norm clip.")
    flags.DEFINE_float(
        "patch_loss_weight",
        _DEFAULT.patch_loss_weight,
        "Weight of the patch probe's loss "
        "(per-patch object class and box centre, predicted linearly from the image features; "
        "training-only, not exported). 0 = answer loss only.",
    )
    flags.DEFINE_float(
        "coordinate_loss_weight",
        _DEFAULT.coordinate_loss_weight,
        "Weight of the probe's "
        "squared error on the (row, column) centre of the object under each object patch, in "
        "[-1, 1] image units (what the position questions compare; training-only). 0 = off.",
    )
    flags.DEFINE_float(
        "relation_loss_weight",
        _DEFAULT.relation_loss_weight,
        "Weight of the relation probe's "
        "squared error on the centres of the two objects a position question names, read linearly "
        "from the LLM's residual stream entering its last layer at the answer slot (training-only). "
        "0 = off.",
    )
    flags.DEFINE_integer(
        "turns",
        _DEFAULT.turns,
        "Questions per training image, asked as one multi-turn "
        "conversation (LLaVA-1.5's format; the first turn is the inference prompt).",
    )
    flags.DEFINE_list(
        "train_kind_weights",
        [],
        f"Question-kind weights of the training batches, one per kind "
        f"{KINDS} (empty: the testbed's own mixture; evaluation splits always use it).",
    )
    flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed of the initial weights and of every training batch.")
    flags.DEFINE_integer(
        "eval_every", _DEFAULT.eval_every, "Validate every this many steps (0 = only at the end)."
    )
    flags.DEFINE_integer(
        "eval_items",
        _DEFAULT.eval_items,
        "Questions in the fixed validation split (4 per image; 0 = no validation).",
    )
    flags.DEFINE_integer(
        "eval_batch_size", _DEFAULT.eval_batch_size, "Questions per generation batch (validation, test)."
    )
    flags.DEFINE_integer(
        "log_every", _DEFAULT.log_every, "Print and log training metrics every this many steps."
    )
    flags.DEFINE_integer(
        "save_every", _DEFAULT.save_every, "Save the training state every this many steps (and at the end)."
    )
    flags.DEFINE_float(
        "max_minutes",
        _DEFAULT.max_minutes,
        "Wall-clock budget of the training loop, from process "
        "start: the learning rate anneals to zero by then, training stops, the state is saved, the "
        "checkpoint exported and the test split evaluated (about 15 s more on an H100).",
    )
    flags.DEFINE_integer(
        "stop_at_step",
        _DEFAULT.stop_at_step,
        "Stop after this step as if interrupted (state saved, "
        "no export); the schedule still spans --steps. For splitting a run over several commands.",
    )
    flags.DEFINE_bool(
        "resume", _DEFAULT.resume, "Continue from the training state in --work_dir, if there is one."
    )
    flags.DEFINE_enum(
        "dtype",
        _DEFAULT.dtype,
        ["auto", "bfloat16", "float32"],
        "Compute dtype of training (auto: bfloat16 on an accelerator, float32 on CPU).",
    )
    flags.DEFINE_enum(
        "eval_dtype", _DEFAULT.eval_dtype, ["bfloat16", "float32"], "Weights dtype of validation and test."
    )
    flags.DEFINE_enum(
        "save_dtype", _DEFAULT.save_dtype, ["float16", "float32"], "Dtype of the exported weights."
    )
    flags.DEFINE_string(
        "test_dir",
        _DEFAULT.test_dir,
        "Test split (the eval harness's --questions and --image_dir); written with write_split if absent.",
    )
    flags.DEFINE_integer(
        "test_items",
        _DEFAULT.test_items,
        "Questions in the test split when it has to be written (4 per image; 0 = no test evaluation).",
    )
    flags.DEFINE_string(
        "init_from",
        _DEFAULT.init_from,
        "Warm start: initialise the weights from this exported "
        "checkpoint (fresh optimizer and schedule; pass another --seed for unseen batches).",
    )
    flags.DEFINE_string("compilation_cache_dir", ".jax_cache", "JAX persistent compilation cache ('' = off).")


# Files of a training state in --work_dir, and of the export.
STATE_ARRAYS = "state.npz"
STATE_META = "state.json"
LOG_FILE = "training_log.jsonl"
CURVE_FILE = "training_curve.png"
TEST_RESULT_FILE = "test_accuracy.json"
VALIDATION_DIR = "validation"
OUT_TAR = "testbed_checkpoint.tar"
OUT_PART_BYTES = 15 << 20  # the device tool returns files of at most 16 MiB


def _print(options: TrainOptions, *args) -> None:
    if not options.quiet:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------------
# Sizes and batches.
# --------------------------------------------------------------------------------------------------


def training_sequence_length(cfg, turns: int = 1) -> int:
    """Tokens per training sequence of `turns` questions: the longest first prompt with its image span
    expanded + its answer word, then per later turn `</s>` + the longest follow-up + its answer word.

    `cfg` is a `models.config.LlavaModelConfig`; prompt lengths come from the testbed's templates.
    """
    return max_prompt_length() - 1 + cfg.num_image_tokens + 1 + (turns - 1) * (max_followup_length() + 2)


class DeviceBatch(NamedTuple):
    """What the jitted step consumes (all arrays; the pixels are rendered inside the step).

    Each row is one image and a conversation of up to `turns` questions about it, teacher-forced:
    `<s>` system USER: <image span> Q1 ASSISTANT: A1 `</s>` USER: Q2 ASSISTANT: A2 ... (LLaVA-1.5's
    multi-turn format). The first turn is exactly the single-question inference prompt. Target j of a
    row is predicted by the logits at target_positions[j]: per turn its answer word, then `</s>`.
    """

    scenes: Any  # SceneParams
    input_ids: Any  # (B, T) int32, right-padded with <pad>
    lengths: Any  # (B,) int32 real tokens per row
    target_positions: Any  # (B, 2 * turns) int32
    target_ids: Any  # (B, 2 * turns) int32: answer word, </s>, answer word, </s>, ...
    target_mask: Any  # (B, 2 * turns) bool: False for turns a scene had no question for
    kind_ids: Any  # (B, turns) int32 index into KINDS, -1 where no question
    # (B, turns, 2) int32: a position question's (subject, reference) object slots in `scenes`, -1 for
    # other turns (the relation probe's targets; training-only)
    relation_objects: Any


def conversation_arrays(
    question_lists,
    *,
    turns: int,
    image_token_index: int,
    num_image_tokens: int,
    pad_token_id: int,
    eos_token_id: int,
    length: int,
) -> tuple[np.ndarray, ...]:
    """Token ids and targets of one conversation per scene (the first `turns` of its questions).

    The first prompt's single `<image>` id is expanded to the image span, as `Preprocessor.encode` does.
    Returns the DeviceBatch fields after `scenes`.
    """
    batch = len(question_lists)
    ids = np.full((batch, length), pad_token_id, np.int32)
    lengths = np.zeros(batch, np.int32)
    positions = np.zeros((batch, 2 * turns), np.int32)
    targets = np.full((batch, 2 * turns), pad_token_id, np.int32)
    mask = np.zeros((batch, 2 * turns), bool)
    kinds = np.full((batch, turns), -1, np.int32)
    relation_objects = np.full((batch, turns, 2), -1, np.int32)
    for row, questions in enumerate(question_lists):
        if not questions:
            raise ValueError(f"scene {row} has no question")
        pieces: list[np.ndarray] = []
        for turn, item in enumerate(questions[:turns]):
            if turn == 0:
                prompt = np.asarray(encode_prompt(item.text), np.int32)
                slots = np.flatnonzero(prompt == image_token_index)
                if slots.size != 1:
                    raise ValueError(f"prompt {row} holds {slots.size} image tokens, expected exactly one")
                slot = int(slots[0])
                pieces += [
                    prompt[:slot],
                    np.full(num_image_tokens, image_token_index, np.int32),
                    prompt[slot + 1 :],
                ]
            else:
                pieces += [
                    np.asarray([eos_token_id], np.int32),
                    np.asarray(encode_followup(item.text), np.int32),
                ]
            answer, eos = answer_token_ids(item.answer)
            asked_at = sum(piece.size for piece in pieces) - 1  # the turn's last prompt token
            pieces.append(np.asarray([answer], np.int32))
            positions[row, 2 * turn : 2 * turn + 2] = asked_at, asked_at + 1
            targets[row, 2 * turn : 2 * turn + 2] = answer, eos
            mask[row, 2 * turn : 2 * turn + 2] = True
            kinds[row, turn] = KINDS.index(item.kind)
            if item.kind == "position":
                relation_objects[row, turn] = item.objects  # (subject, reference), as the question names them
        sequence = np.concatenate(pieces)
        if sequence.size > length:
            raise ValueError(f"sequence of {sequence.size} tokens does not fit the static length {length}")
        ids[row, : sequence.size] = sequence
        lengths[row] = sequence.size
    return ids, lengths, positions, targets, mask, kinds, relation_objects


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of training batch `step`: a pure function of (seed, step), disjoint from the
    evaluation splits' streams (which are `split_rng(split, seed)`, three entropy words)."""
    return np.random.default_rng([0x7E57BED, SPLITS.index("train"), seed, step])


def host_batch(
    seed: int,
    step: int,
    batch_size: int,
    cfg,
    scene_config,
    pad_token_id: int,
    eos_token_id: int,
    turns: int = 1,
    kind_weights: tuple[float, ...] | None = None,
) -> DeviceBatch:
    """Training batch `step` as NumPy arrays (layouts + token ids; no pixels): fresh scenes, each with
    up to `turns` distinct questions (training negatives, see TRAINING_NEGATIVE_TYPES), their kinds
    drawn with `kind_weights` (default: the scene config's)."""
    rng = batch_rng(seed, step)
    scenes = sample_scenes(rng, batch_size, scene_config, "train")
    if kind_weights is not None:
        scene_config = dataclasses.replace(scene_config, kind_weights=tuple(kind_weights))
    question_lists = sample_questions(
        rng, scenes, scene_config, per_scene=turns, negative_types=TRAINING_NEGATIVE_TYPES
    )
    arrays = conversation_arrays(
        question_lists,
        turns=turns,
        image_token_index=cfg.image_token_index,
        num_image_tokens=cfg.num_image_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        length=training_sequence_length(cfg, turns),
    )
    return DeviceBatch(scenes, *arrays)


class Prefetcher:
    """A host thread that samples batches `start, start + 1, ...` ahead and puts them on the device,
    so sampling overlaps the accelerator's step. Errors in the thread surface in `get`."""

    def __init__(self, make_batch, start: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()

        def work():
            step = start
            try:
                while not self._stop.is_set():
                    item = (step, jax.device_put(make_batch(step)))
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    step += 1
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                self._queue.put((None, error))

        self._thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def get(self, step: int):
        got, item = self._queue.get()
        if got is None:
            raise RuntimeError("the batch prefetch thread failed") from item
        if got != step:
            raise RuntimeError(f"prefetch out of order: wanted batch {step}, got {got}")
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------
# Pixels, forward, loss, optimizer.
# --------------------------------------------------------------------------------------------------


class PixelNormalization(NamedTuple):
    """LLaVA-1.5's processor on an image already of the tower's size: x * rescale, then (x - mean) / std."""

    rescale_factor: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_hf_config(cls, hf_config) -> PixelNormalization:
        """Read from the LLaVA-1.5 image processor the checkpoint is saved with (one source of truth)."""
        processor = llava15_image_processor(hf_config)
        return cls(
            float(processor.rescale_factor),
            tuple(map(float, processor.image_mean)),
            tuple(map(float, processor.image_std)),
        )


def normalize_pixels(images, normalization: PixelNormalization):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W), as `Preprocessor.pixel_values` computes it."""
    x = images.astype(jnp.float32) * jnp.float32(normalization.rescale_factor)
    x = (x - jnp.asarray(normalization.mean, jnp.float32)) / jnp.asarray(normalization.std, jnp.float32)
    return x.transpose(0, 3, 1, 2)


def answer_logits(model, image_features, input_ids, lengths, target_positions):
    """Float32 logits (B, J, V) at `target_positions` of the teacher-forced sequences, from the
    inference modules (embed_prompt, then each layer's `prefill`) run over the whole sequence.

    `image_features` is `model.image_features(pixel_values)` (computed once by the caller, which also
    feeds it to the patch probe). Slots at or after `lengths` are padding (empty positions)."""
    return answer_logits_and_hidden(model, image_features, input_ids, lengths, target_positions)[0]


def answer_logits_and_hidden(model, image_features, input_ids, lengths, target_positions):
    """`answer_logits`, and the residual stream (B, J, D) at `target_positions` entering the LAST
    decoder layer (what the relation probe reads: the last layer is left to compare what it holds)."""
    slots = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
    positions = jnp.where(slots < lengths[:, None], slots, EMPTY_POSITION)
    x, _ = model.embed_prompt(input_ids, image_features)
    layers = model.language_model.layers
    for layer in layers[:-1]:
        x = layer.prefill(x, positions)[0]
    before_last = jnp.take_along_axis(x, target_positions[..., None], axis=1)
    x = layers[-1].prefill(x, positions)[0]
    hidden = jnp.take_along_axis(x, target_positions[..., None], axis=1)
    return model.language_model.logits(hidden), before_last


def num_patch_classes() -> int:
    """Classes of the patch probe: background, then one per (colour, shape) pair."""
    return 1 + len(COLOURS) * len(SHAPES)


def patch_targets(scenes, scene_config):
    """Per-patch labels of a batch of layouts, for the patch probe: (classes, centres, coordinates).

    classes (B, N): 0 where no object's box covers the patch centre, else 1 + colour * len(SHAPES) +
    shape of the object that does (boxes never overlap, and every box of >= 1 patch side covers a patch
    centre). centres (B, N): whether the patch holds an object's box centre (one patch per object: what
    counting needs). coordinates (B, N, 2) float32: the covering object's box centre (row, column),
    scaled to [-1, 1] over the image, 0 on the background: the quantity the position questions compare
    (`scenes.relation_holds` uses box centres), so the probe asks every object token to carry it linearly.
    Coordinates are doubled so patch and box centres are integers. Patches in row-major order, as the
    image tokens are.
    """
    grid, patch = scene_config.grid_size, scene_config.patch_size
    patch_centre2 = (2 * patch * jnp.arange(grid, dtype=jnp.int32) + patch)[None, None, :]  # (1, 1, G)
    top, left, size = (a.astype(jnp.int32)[..., None] for a in (scenes.top, scenes.left, scenes.size))
    rows = (2 * top <= patch_centre2) & (patch_centre2 < 2 * (top + size))  # (B, M, G)
    cols = (2 * left <= patch_centre2) & (patch_centre2 < 2 * (left + size))
    covered = rows[..., :, None] & cols[..., None, :] & scenes.valid[..., None, None]  # (B, M, G, G)
    label = 1 + scenes.colour_id.astype(jnp.int32) * len(SHAPES) + scenes.shape_id.astype(jnp.int32)
    classes = (covered * label[..., None, None]).sum(axis=1)
    arange = jnp.arange(grid, dtype=jnp.int32)
    centre_row = (2 * top + size) // (2 * patch) == arange  # (B, M, G)
    centre_col = (2 * left + size) // (2 * patch) == arange
    centres = (centre_row[..., :, None] & centre_col[..., None, :] & scenes.valid[..., None, None]).any(
        axis=1
    )
    coordinates = jnp.einsum("bmrc,bmk->brck", covered.astype(jnp.float32), box_centres(scenes, scene_config))
    batch = classes.shape[0]
    return (
        classes.reshape(batch, grid * grid),
        centres.reshape(batch, grid * grid),
        coordinates.reshape(batch, grid * grid, 2),
    )


def box_centres(scenes, scene_config):
    """(B, M, 2) float32 box centres (row, column) of every object slot, scaled to [-1, 1] over the image
    (from doubled integer coordinates, so the centre of an odd-sized box is exact)."""
    top, left, size = (a.astype(jnp.int32) for a in (scenes.top, scenes.left, scenes.size))
    doubled = jnp.stack([2 * top + size, 2 * left + size], axis=-1).astype(jnp.float32)
    return doubled / jnp.float32(scene_config.image_size) - 1.0


def probe_outputs() -> int:
    """Outputs of the patch probe: the class logits, a box-centre logit, the (row, column) coordinates."""
    return num_patch_classes() + 1 + 2


def init_probe(width: int, seed: int) -> dict:
    """The patch probe: one linear map from an image feature (the projector's output, what the LLM
    reads) to the patch-class logits, a box-centre logit and the object's centre coordinates.
    Training-only: not exported. The coordinate columns start at zero (every prediction at the image
    centre), so their weighted squared error starts small instead of swamping the clipped gradient."""
    kernel = jax.random.normal(jax.random.key(seed), (width, probe_outputs()), jnp.float32) * jnp.float32(
        width**-0.5
    )
    kernel = kernel.at[:, num_patch_classes() + 1 :].set(0.0)
    return {"kernel": kernel, "bias": jnp.zeros((probe_outputs(),), jnp.float32)}


RELATION_OUTPUTS = 4  # (row, column) of a position question's subject, then of its reference object


def init_relation_probe(width: int) -> dict:
    """The relation probe: a linear map from the LLM's residual stream at a position question's answer
    slot, entering the last layer, to the two named objects' box centres (`RELATION_OUTPUTS`, in the
    [-1, 1] units of `patch_targets`). Training-only. Zero-initialised, like the coordinate columns."""
    return {
        "kernel": jnp.zeros((width, RELATION_OUTPUTS), jnp.float32),
        "bias": jnp.zeros((RELATION_OUTPUTS,), jnp.float32),
    }


def initial_trainable(model_params, cfg, seed: int) -> dict:
    """What the optimizer updates and a training state saves: {"model": the LLaVA's nnx state, "probe":
    the patch probe, "relation_probe": the relation probe}; only "model" is exported."""
    return {
        "model": model_params,
        "probe": init_probe(cfg.text.hidden_size, seed),
        "relation_probe": init_relation_probe(cfg.text.hidden_size),
    }


def relation_targets(scenes, relation_objects, scene_config):
    """((B, turns, RELATION_OUTPUTS) box centres of the objects each position question names, in
    [-1, 1] units, (B, turns) mask of the position turns): gathered from the layouts by slot."""
    centres = box_centres(scenes, scene_config)
    mask = (relation_objects >= 0).all(-1)
    slots = jnp.clip(relation_objects, 0).reshape(relation_objects.shape[0], -1)  # (B, turns * 2)
    picked = jnp.take_along_axis(centres, slots[..., None], axis=1)  # (B, turns * 2, 2)
    return picked.reshape(*relation_objects.shape[:2], RELATION_OUTPUTS), mask


def relation_probe_loss(relation_probe: dict, hidden, targets, mask):
    """Squared error (summed over the 4 coordinates) of the relation probe, averaged over the
    position turns; float32. A position question is answered by comparing two coordinates the LLM
    must first fetch from two different objects' tokens; this supervises that fetch directly (the
    answer word alone left left/right at chance while above/below, which raster order gives away,
    reached 100%: WORKSPACE.md)."""
    predicted = hidden.astype(jnp.float32) @ relation_probe["kernel"] + relation_probe["bias"]
    return _masked_mean(((predicted - targets) ** 2).sum(-1), mask)


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds (0 where it never does)."""
    weight = mask.astype(jnp.float32)
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def _balanced_mean(values, positive):
    """Mean over the `positive` entries and mean over the rest, averaged: objects cover a few percent of
    the patches, so a plain mean would be almost all background."""
    return 0.5 * (_masked_mean(values, positive) + _masked_mean(values, jnp.logical_not(positive)))


def patch_probe_losses(probe: dict, image_features, classes, centres, coordinates):
    """(class cross-entropy, centre binary cross-entropy, coordinate squared error, object-patch class
    accuracy), float32. The cross-entropies are balanced between object and background patches
    (`_balanced_mean`); the squared error (summed over row and column, in the [-1, 1] units of
    `patch_targets`) is averaged over the object patches only (the background has no coordinate)."""
    logits = image_features.astype(jnp.float32) @ probe["kernel"] + probe["bias"]
    num_classes = num_patch_classes()
    class_logits, centre_logits = logits[..., :num_classes], logits[..., num_classes]
    predicted_coordinates = logits[..., num_classes + 1 :]
    on_object = classes > 0
    class_nll = _balanced_mean(
        optax.softmax_cross_entropy_with_integer_labels(class_logits, classes), on_object
    )
    centre_nll = _balanced_mean(
        optax.sigmoid_binary_cross_entropy(centre_logits, centres.astype(jnp.float32)), centres
    )
    coordinate_mse = _masked_mean(((predicted_coordinates - coordinates) ** 2).sum(-1), on_object)
    hits = (jnp.argmax(class_logits, axis=-1) == classes) & on_object
    accuracy = hits.sum() / jnp.maximum(on_object.sum(), 1)
    return class_nll, centre_nll, coordinate_mse, accuracy


def make_optimizer(options: TrainOptions):
    """Clip -> Adam moments -> decoupled weight decay on matrices. The step scales by -lr itself (the
    learning rate is an argument of the step, so the schedule can follow the clock)."""
    return _optimizer(options.grad_clip, options.weight_decay)


@functools.cache
def _optimizer(grad_clip: float, weight_decay: float):
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
    )


def learning_rate_at(step: int, progress: float, options: TrainOptions) -> float:
    """Linear warm-up over steps, then cosine decay to zero over `progress` in [0, 1]."""
    warmup = min(1.0, (step + 1) / max(1, options.warmup_steps))
    return options.learning_rate * warmup * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@functools.cache
def make_train_step(
    graphdef,
    optimizer,
    scene_config,
    normalization: PixelNormalization,
    compute_dtype,
    patch_loss_weight: float,
    coordinate_loss_weight: float,
    relation_loss_weight: float,
):
    """The jitted step (trainable, opt_state, batch, lr) -> (trainable, opt_state, metrics); donates the
    state. `trainable` is `initial_trainable(...)`'s pytree.

    Loss: answer cross-entropy + patch_loss_weight * (patch-class + box-centre cross-entropy of the
    probe on the image features) + coordinate_loss_weight * (squared error of the probe's object-centre
    coordinates on object patches) + relation_loss_weight * (squared error of the relation probe's
    coordinates of the two objects a position question names, read at its answer slot). The probe gives the vision tower dense per-patch supervision (576
    labels per image, against one answer word), which is what lets it learn colour, shape and object
    extent quickly from scratch; the answer loss alone sat at the text prior.
    Memoised on its (hashable) arguments, so runs in one process share one compilation.
    """

    def loss_fn(trainable, batch: DeviceBatch):
        compute = jax.tree.map(lambda p: p.astype(compute_dtype), trainable["model"])
        model = nnx.merge(graphdef, compute)
        pixels = normalize_pixels(render_scenes(batch.scenes, scene_config), normalization)
        features = model.image_features(pixels)
        logits, before_last = answer_logits_and_hidden(
            model, features, batch.input_ids, batch.lengths, batch.target_positions
        )
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, batch.target_ids[..., None], axis=-1)[..., 0]
        mask = batch.target_mask.astype(jnp.float32)
        answer_loss = (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        correct = jnp.argmax(logits[:, 0::2], axis=-1) == batch.target_ids[:, 0::2]  # (B, turns) answers
        classes, centres, coordinates = patch_targets(batch.scenes, scene_config)
        class_nll, centre_nll, coordinate_mse, patch_accuracy = patch_probe_losses(
            trainable["probe"], features, classes, centres, coordinates
        )
        targets, relation_mask = relation_targets(batch.scenes, batch.relation_objects, scene_config)
        relation_mse = relation_probe_loss(
            trainable["relation_probe"], before_last[:, 0::2], targets, relation_mask
        )
        total = (
            answer_loss
            + patch_loss_weight * (class_nll + centre_nll)
            + coordinate_loss_weight * coordinate_mse
            + relation_loss_weight * relation_mse
        )
        return total, dict(
            correct=correct,
            answer_loss=answer_loss,
            patch_loss=class_nll + centre_nll,
            patch_accuracy=patch_accuracy,
            coordinate_mse=coordinate_mse,
            relation_mse=relation_mse,
        )

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(trainable, opt_state, batch: DeviceBatch, learning_rate):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = jax.tree.map(lambda p, u: p - learning_rate * u.astype(p.dtype), trainable, updates)
        asked = batch.kind_ids >= 0
        kinds = jax.nn.one_hot(batch.kind_ids, len(KINDS), dtype=jnp.float32)  # -1 -> all zeros
        correct = aux["correct"].astype(jnp.float32)
        metrics = {
            "loss": aux["answer_loss"],
            "accuracy": (correct * asked).sum() / jnp.maximum(asked.sum(), 1),
            "first_turn_accuracy": correct[:, 0].mean(),
            "grad_norm": optax.global_norm(grads),
            "patch_loss": aux["patch_loss"],
            "patch_accuracy": aux["patch_accuracy"],
            "coordinate_mse": aux["coordinate_mse"],
            "relation_mse": aux["relation_mse"],
            "kind_correct": (kinds * correct[..., None]).sum((0, 1)),
            "kind_count": kinds.sum((0, 1)),
        }
        return trainable, opt_state, metrics

    return train_step


# --------------------------------------------------------------------------------------------------
# Training state on disk.
# --------------------------------------------------------------------------------------------------


def config_fingerprint(hf_config, options: TrainOptions, scene_config) -> str:
    """What must match for a saved state to be continued: model, data, batch, optimizer, schedule."""
    keys = (
        "steps",
        "batch_size",
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "grad_clip",
        "seed",
        "init_from",
        "patch_loss_weight",
        "coordinate_loss_weight",
        "relation_loss_weight",
        "turns",
        "train_kind_weights",
    )
    text = json.dumps(
        [hf_config.to_dict(), repr(scene_config), {k: getattr(options, k) for k in keys}],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial_weights(directory: str, cfg, params):
    """Float32 weights of an exported checkpoint, for a warm start (e.g. to continue training in a later
    command on a fresh machine, where only the export came back). The configs must agree."""
    hf_config, model = load_checkpoint(directory, dtype="float32")
    if from_hf_config(hf_config) != cfg:
        raise ValueError(
            f"--init_from checkpoint {directory} has another model configuration than the one trained"
        )
    weights = nnx.state(model)
    if jax.tree.structure(weights) != jax.tree.structure(params):
        raise ValueError(f"--init_from checkpoint {directory} does not match the model's parameter tree")
    return jax.tree.map(jnp.asarray, weights)


def save_state(work_dir: str, params, opt_state, meta: dict) -> None:
    """Atomically write the arrays (params then optimizer leaves, in tree order) and the metadata."""
    leaves = jax.tree.leaves((params, opt_state))
    os.makedirs(work_dir, exist_ok=True)
    arrays_tmp = os.path.join(work_dir, STATE_ARRAYS + ".tmp")
    with open(arrays_tmp, "wb") as handle:
        np.savez(handle, **{f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.device_get(leaves))})
    meta_tmp = os.path.join(work_dir, STATE_META + ".tmp")
    with open(meta_tmp, "w") as handle:
        json.dump(meta, handle, indent=1)
    os.replace(arrays_tmp, os.path.join(work_dir, STATE_ARRAYS))
    os.replace(meta_tmp, os.path.join(work_dir, STATE_META))


def load_state(work_dir: str, params, opt_state):
    """(params, opt_state, meta) from `work_dir`, shaped like the given templates; None if no state."""
    meta_path = os.path.join(work_dir, STATE_META)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as handle:
        meta = json.load(handle)
    templates, treedef = jax.tree.flatten((params, opt_state))
    with np.load(os.path.join(work_dir, STATE_ARRAYS)) as arrays:
        if len(arrays.files) != len(templates):
            raise ValueError(
                f"training state in {work_dir} has {len(arrays.files)} arrays, the model and "
                f"optimizer need {len(templates)}"
            )
        leaves = []
        for i, template in enumerate(templates):
            array = arrays[f"{i:05d}"]
            if array.shape != template.shape or array.dtype != template.dtype:
                raise ValueError(
                    f"training state array {i} is {array.dtype}{array.shape}, expected "
                    f"{template.dtype}{template.shape}"
                )
            leaves.append(jnp.asarray(array))  # uncommitted, like fresh arrays: the same jit cache entry
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    return params, opt_state, meta


def read_log(path: str, up_to_step: int | None = None) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


def write_log(path: str, records: list[dict]) -> None:
    with open(path + ".tmp", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------------
# Evaluation through the inference path.
# --------------------------------------------------------------------------------------------------


def ensure_split(directory: str, split: str, num_items: int, scene_config) -> str:
    """Write a fixed split with `write_split` unless `directory` already holds one (atomic rename)."""
    if os.path.isfile(os.path.join(directory, QUESTIONS_FILE)):
        return directory
    partial = directory.rstrip("/") + f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    write_split(partial, split=split, num_items=num_items, seed=0, config=scene_config)
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    os.rename(partial, directory)
    return directory


class SplitWriter:
    """Writes the validation and test splits in a background thread (NumPy rendering and PNG encoding
    take seconds), so they are ready by the first evaluation without holding up training."""

    def __init__(self, jobs: list[tuple[str, str, int]], scene_config):
        self._errors: dict[str, BaseException] = {}
        self._done = {directory: threading.Event() for directory, _, _ in jobs}

        def work():
            for directory, split, items in jobs:
                try:
                    ensure_split(directory, split, items, scene_config)
                except BaseException as error:  # noqa: BLE001 - re-raised in wait()
                    self._errors[directory] = error
                self._done[directory].set()

        threading.Thread(target=work, name="split-writer", daemon=True).start()

    def wait(self, directory: str) -> str:
        self._done[directory].wait()
        if directory in self._errors:
            raise RuntimeError(f"writing the split {directory} failed") from self._errors[directory]
        return directory


class EvalSplit:
    """A fixed split's questions, prompts and pixels, preprocessed once by an engine's preprocessor
    (each image once, though several questions share it)."""

    def __init__(self, directory: str, preprocessor):
        self.benchmark = TestbedBenchmark()
        self.questions = self.benchmark.load_questions(directory)
        self.prompts = [preprocessor.encode(q.prompt) for q in self.questions]
        first_asker = {}
        for question in self.questions:
            first_asker.setdefault(question.image, question)
        index = {name: i for i, name in enumerate(first_asker)}
        self.pixels = np.concatenate(
            [
                preprocessor.pixel_values([load_image(self.benchmark.image_path(directory, question))])
                for question in first_asker.values()
            ]
        )
        self.image_of = np.array([index[q.image] for q in self.questions])


def evaluate(engine, split: EvalSplit, batch_size: int) -> dict:
    """Greedy answers from `engine.runner` (prefill + decode) for every question; the benchmark's scores.

    Batches have one static size (the last is padded with repeats), so the runner compiles once.
    """
    preprocessor = engine.preprocessor
    sampling = SamplingConfig(
        max_new_tokens=TestbedBenchmark.max_new_tokens,
        temperature=0.0,
        eos_token_id=preprocessor.eos_token_id,
        pad_token_id=preprocessor.pad_token_id,
    )
    count = len(split.questions)
    predictions = {}
    for start in range(0, count, batch_size):
        rows = [min(i, count - 1) for i in range(start, start + batch_size)]
        batch = engine.runner.make_batch(
            [split.prompts[i] for i in rows],
            split.pixels[split.image_of[rows]],
            pad_token_id=preprocessor.pad_token_id,
            max_new_tokens=sampling.max_new_tokens,
        )
        output = engine.runner.generate(batch, sampling, rng=jax.random.key(0))
        ids = tokens_until_eos(output.tokens, output.num_generated, preprocessor.eos_token_id)
        for i, row_ids in zip(rows[: count - start], ids):
            predictions[split.questions[i].question_id] = preprocessor.decode(row_ids).strip()
    return split.benchmark.score(split.questions, predictions)


def in_memory_engine(hf_config, graphdef, weights):
    """A `LlavaEngine` over in-memory weights, with the preprocessing the exported checkpoint will
    have (testbed tokenizer, LLaVA-1.5 pad-mode image processor)."""
    runner = LlavaRunner(nnx.merge(graphdef, weights))
    preprocessor = Preprocessor(hf_config, make_tokenizer(), llava15_image_processor(hf_config))
    return LlavaEngine(runner, preprocessor, hf_config)


def summarize_scores(scores: dict) -> dict:
    """Overall and per-kind accuracy, the compact form logged during training."""
    summary = {"accuracy": scores["overall"]["accuracy"]}
    summary.update({f"accuracy/{kind}": m["accuracy"] for kind, m in scores["per_kind"].items()})
    return summary


# --------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------


def save_processor(hf_config, directory: str) -> None:
    """Tokenizer + LlavaProcessor (LLaVA-1.5 image processor) next to the weights, as llava-hf ships them."""
    from transformers import LlavaProcessor

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(directory)
    LlavaProcessor(
        image_processor=llava15_image_processor(hf_config),
        tokenizer=tokenizer,
        patch_size=hf_config.vision_config.patch_size,
        vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    ).save_pretrained(directory)  # CLIP's [CLS]


def export_checkpoint(model, hf_config, output_dir: str, save_dtype: str) -> str:
    """Write weights + config + tokenizer + processor to a fresh directory, then swap it into place, so
    `output_dir` never mixes files of two exports."""
    output_dir = os.path.abspath(output_dir)
    fresh, old = output_dir + ".new", output_dir + ".old"
    for path in (fresh, old):
        shutil.rmtree(path, ignore_errors=True)
    save_checkpoint(model, hf_config, fresh, dtype=save_dtype)
    save_processor(hf_config, fresh)
    if os.path.exists(output_dir):
        os.rename(output_dir, old)
    os.rename(fresh, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return output_dir


def directory_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names
    )


def plot_curve(records: list[dict], path: str, title: str = "testbed LLaVA trained from scratch") -> None:
    """Training loss and validation accuracy (overall and per kind) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        loss_axis.set_yscale("log")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("cross-entropy (answer word + </s>)")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if evals:
        steps = [r["step"] for r in evals]
        accuracy_axis.plot(steps, [r["accuracy"] for r in evals], "k-o", label="validation (all)")
        for kind in KINDS:
            key = f"accuracy/{kind}"
            if any(key in r for r in evals):
                accuracy_axis.plot(steps, [r.get(key, float("nan")) for r in evals], "--", label=kind)
    accuracy_axis.set_xlabel("step")
    accuracy_axis.set_ylabel("greedy exact-match accuracy")
    accuracy_axis.set_ylim(0, 1.02)
    accuracy_axis.grid(alpha=0.3)
    if evals:
        accuracy_axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def curve_title(options: TrainOptions) -> str:
    """What the curve shows: a run from scratch, or a warm start (its steps count from the warm start)."""
    if options.init_from:
        return f"testbed LLaVA, warm start from {options.init_from} (seed {options.seed})"
    return "testbed LLaVA trained from scratch"


def copy_to_out(output_dir: str, out_dir: str) -> list[str]:
    """The checkpoint directory as one tar, cut into parts the device tool returns (16 MiB per file),
    plus the small result files. Reassemble with: cat testbed_checkpoint.tar.part* | tar -x"""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(output_dir, arcname=os.path.basename(os.path.normpath(output_dir)))
    data = buffer.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for part, start in enumerate(range(0, len(data), OUT_PART_BYTES)):
        path = os.path.join(out_dir, f"{OUT_TAR}.part{part}")
        with open(path, "wb") as handle:
            handle.write(data[start : start + OUT_PART_BYTES])
        written.append(path)
    for name in (TEST_RESULT_FILE, CURVE_FILE, LOG_FILE):
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), out_dir)
            written.append(os.path.join(out_dir, name))
    return written


# --------------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------------


def _compute_dtype(name: str):
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _accumulate(sums: dict, metrics) -> int:
    """Add one step's device metrics to the host sums (waits for that step); returns 1."""
    for key, value in jax.device_get(metrics).items():
        sums[key] = sums[key] + value
    return 1


def _train_record(
    sums: dict,
    steps: int,
    step: int,
    lr: float,
    progress: float,
    rate: float,
    start_time: float,
    grid_size: int,
) -> dict:
    """One log line: metrics averaged over the last `steps` steps; `rate` in examples per second; the
    probes' coordinate errors as RMS per coordinate in patches (of the `grid_size`-patch side)."""
    record = dict(
        type="train",
        step=step,
        loss=float(sums["loss"] / steps),
        accuracy=float(sums["accuracy"] / steps),
        first_turn_accuracy=float(sums["first_turn_accuracy"] / steps),
        grad_norm=float(sums["grad_norm"] / steps),
        patch_loss=float(sums["patch_loss"] / steps),
        patch_accuracy=float(sums["patch_accuracy"] / steps),
        coordinate_rms_patches=float(np.sqrt(sums["coordinate_mse"] / steps / 2) * grid_size / 2),
        relation_rms_patches=float(np.sqrt(sums["relation_mse"] / steps / RELATION_OUTPUTS) * grid_size / 2),
        lr=lr,
        progress=round(progress, 5),
        examples_per_second=round(rate, 1),
        wall_seconds=round(time.time() - start_time, 1),
    )
    for kind, correct, count in zip(KINDS, sums["kind_correct"], sums["kind_count"]):
        record[f"accuracy/{kind}"] = float(correct / max(count, 1))
    return record


def _format_train(record: dict) -> str:
    kinds = " ".join(f"{kind[:4]} {record[f'accuracy/{kind}']:.2f}" for kind in KINDS)
    return (
        f"step {record['step']:6d}  loss {record['loss']:.4f}  acc {record['accuracy']:.3f} ({kinds})  "
        f"patch {record['patch_loss']:.3f}/{record['patch_accuracy']:.2f}/{record['coordinate_rms_patches']:.2f}p  "
        f"rel {record['relation_rms_patches']:.2f}p  "
        f"gnorm {record['grad_norm']:.2f}  lr {record['lr']:.2e}  {record['examples_per_second']:7.0f} ex/s  "
        f"t {record['wall_seconds']:.0f}s"
    )


def run_training(
    options: TrainOptions, hf_config=None, scene_config=None, start_time: float | None = None
) -> dict:
    """Train (or resume), validate, export and test. Returns a summary dict (also printed).

    hf_config: a transformers LlavaConfig (default: the 'testbed' preset); scene_config: the
    TestbedConfig (default: image and patch size from hf_config); start_time: when the --max_minutes
    budget started (default: now).
    """
    start_time = time.time() if start_time is None else start_time
    if options.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(options.compilation_cache_dir))
    hf_config = hf_config if hf_config is not None else testbed_config()
    scene_config = scene_config if scene_config is not None else TestbedConfig.from_llava_config(hf_config)
    cfg = from_hf_config(hf_config)
    if (scene_config.image_size, scene_config.patch_size) != (cfg.vision.image_size, cfg.vision.patch_size):
        raise ValueError(
            f"scenes are {scene_config.image_size} px / patch {scene_config.patch_size}, the vision "
            f"tower takes {cfg.vision.image_size} px / patch {cfg.vision.patch_size}"
        )
    tokenizer = make_tokenizer()
    if cfg.text.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {cfg.text.vocab_size} < tokenizer size {len(tokenizer)}")
    if options.turns < 1:
        raise ValueError(f"turns must be >= 1, got {options.turns}")
    if options.train_kind_weights is not None and len(options.train_kind_weights) != len(KINDS):
        raise ValueError(
            f"train_kind_weights needs one weight per kind {KINDS}, got {options.train_kind_weights}"
        )
    sequence_length = training_sequence_length(cfg, options.turns)
    if sequence_length + 1 > cfg.text.max_position_embeddings:
        raise ValueError(
            f"{sequence_length} training tokens do not fit {cfg.text.max_position_embeddings} positions"
        )
    compute_dtype = _compute_dtype(options.dtype)
    eval_dtype = jnp.dtype(options.eval_dtype)
    deadline = start_time + 60 * options.max_minutes if options.max_minutes else None
    os.makedirs(options.work_dir, exist_ok=True)
    log_path = os.path.join(options.work_dir, LOG_FILE)
    validation_dir = os.path.join(options.work_dir, VALIDATION_DIR)
    splits = SplitWriter(
        [
            job
            for job in (
                (validation_dir, "validation", options.eval_items),
                (options.test_dir, "test", options.test_items),
            )
            if job[2] > 0
        ],
        scene_config,
    )

    # Model, optimizer, state (fresh, warm-started from a checkpoint, or resumed).
    model = LlavaForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(options.seed))
    graphdef, params = nnx.split(model)
    del model
    if options.init_from:
        params = initial_weights(options.init_from, cfg, params)
    trainable = initial_trainable(params, cfg, options.seed)
    del params
    optimizer = make_optimizer(options)
    opt_state = optimizer.init(trainable)
    fingerprint = config_fingerprint(hf_config, options, scene_config)
    step, progress, log = 0, 0.0, []
    loaded = load_state(options.work_dir, trainable, opt_state) if options.resume else None
    if loaded is not None:
        trainable, opt_state, meta = loaded
        if meta["fingerprint"] != fingerprint:
            raise ValueError(
                f"the training state in {options.work_dir} belongs to another configuration "
                f"(model, data or optimizer settings differ); use a fresh --work_dir or --noresume"
            )
        step, progress = meta["step"], meta["progress"]
        log = read_log(log_path, up_to_step=step)
        _print(options, f"resumed from {options.work_dir} at step {step} (schedule progress {progress:.3f})")
    write_log(log_path, log)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(trainable["model"]))
    _print(
        options,
        f"device {jax.devices()[0].device_kind} ({jax.default_backend()}); {num_params / 1e6:.2f}M params; "
        f"{sequence_length} LLM tokens + {cfg.vision.num_patches + 1} CLIP tokens per example; "
        f"compute {jnp.dtype(compute_dtype).name}, batch {options.batch_size}",
    )

    normalization = PixelNormalization.from_hf_config(hf_config)
    train_step = make_train_step(
        graphdef,
        optimizer,
        scene_config,
        normalization,
        compute_dtype,
        options.patch_loss_weight,
        options.coordinate_loss_weight,
        options.relation_loss_weight,
    )
    make_batch = functools.partial(
        host_batch,
        options.seed,
        batch_size=options.batch_size,
        cfg=cfg,
        scene_config=scene_config,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        turns=options.turns,
        kind_weights=options.train_kind_weights,
    )

    def save(reason: str) -> None:
        save_state(
            options.work_dir,
            trainable,
            opt_state,
            dict(step=step, progress=progress, seed=options.seed, fingerprint=fingerprint, reason=reason),
        )
        write_log(log_path, log)

    engine = validation = None

    def validate() -> dict:
        nonlocal engine, validation
        eval_start = time.time()
        weights = jax.tree.map(lambda p: p.astype(eval_dtype), trainable["model"])
        if engine is None:
            engine = in_memory_engine(hf_config, graphdef, weights)
            validation = EvalSplit(splits.wait(validation_dir), engine.preprocessor)
        engine.runner.state = weights  # same tree and shapes: the compiled prefill/decode are reused
        summary = summarize_scores(evaluate(engine, validation, options.eval_batch_size))
        engine.runner.state = None  # the next step donates the training weights
        record = dict(type="eval", step=step, seconds=round(time.time() - eval_start, 2), **summary)
        log.append(record)
        kinds = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in summary.items() if "/" in k)
        _print(
            options,
            f"  validation @ {step}: accuracy {summary['accuracy']:.4f} ({kinds}) [{record['seconds']:.1f}s]",
        )
        return summary

    # Training loop. The host stays at most two steps ahead of the device (it reads each step's
    # metrics two steps later), so the clock it checks is the device's.
    status = "complete"
    if step < options.steps and progress < 1.0:
        prefetcher = Prefetcher(make_batch, step, options.prefetch)
        try:
            batch = prefetcher.get(step)
            compile_start = time.time()
            loop_start, progress_at_start = None, progress
            pending: deque = deque()
            sums: dict[str, Any] = defaultdict(float)
            window_start, window_steps, timed_steps = time.time(), 0, 0
            while True:
                progress = step / options.steps
                if deadline is not None and loop_start is not None:
                    clock = (time.time() - loop_start) / max(1e-9, deadline - loop_start)
                    progress = max(progress, progress_at_start + (1 - progress_at_start) * clock)
                if progress >= 1.0 or (deadline is not None and time.time() >= deadline):
                    status = "complete" if step >= options.steps else "time budget reached"
                    break
                lr = learning_rate_at(step, progress, options)
                trainable, opt_state, metrics = train_step(trainable, opt_state, batch, np.float32(lr))
                step += 1
                pending.append(metrics)
                timed_steps += 1
                if loop_start is None:  # the first step compiled; the clock schedule starts now
                    jax.block_until_ready(metrics)
                    loop_start = window_start = time.time()
                    timed_steps = 0
                    _print(options, f"compiled and ran the first step in {loop_start - compile_start:.1f}s")
                while len(pending) > 2:
                    window_steps += _accumulate(sums, pending.popleft())
                if step % options.log_every == 0 or step == options.steps:
                    while pending:
                        window_steps += _accumulate(sums, pending.popleft())
                    rate = timed_steps * options.batch_size / max(time.time() - window_start, 1e-9)
                    log.append(
                        _train_record(
                            sums, window_steps, step, lr, progress, rate, start_time, scene_config.grid_size
                        )
                    )
                    _print(options, _format_train(log[-1]))
                    sums, window_start, window_steps, timed_steps = defaultdict(float), time.time(), 0, 0
                if (
                    options.eval_every
                    and options.eval_items
                    and step % options.eval_every == 0
                    and step < options.steps
                ):
                    validate()
                    window_start, timed_steps = time.time(), 0
                if options.save_every and step % options.save_every == 0:
                    save("periodic")
                    window_start, timed_steps = time.time(), 0
                if options.stop_at_step is not None and step >= options.stop_at_step:
                    status = "interrupted"
                    break
                if step < options.steps:
                    batch = prefetcher.get(step)
        finally:
            prefetcher.close()
        jax.block_until_ready(trainable)
        save(status)
        if status == "interrupted":
            _print(options, f"stopped at step {step} as asked; state saved in {options.work_dir}")
            return dict(status=status, step=step)
        _print(options, f"training stopped at step {step} ({status}); state saved")

    summary: dict[str, Any] = dict(status=status, step=step, parameters=num_params)
    if options.eval_items and (not log or log[-1]["type"] != "eval" or log[-1]["step"] != step):
        summary["validation"] = validate()

    # Export, reload through the harness's path, test.
    model = nnx.merge(graphdef, trainable["model"])
    export_checkpoint(model, hf_config, options.output_dir, options.save_dtype)
    engine = None
    if options.test_items:
        test_start = time.time()
        reloaded = LlavaEngine.from_checkpoint(options.output_dir, dtype=options.eval_dtype)
        test_split = EvalSplit(splits.wait(options.test_dir), reloaded.preprocessor)
        scores = evaluate(reloaded, test_split, options.eval_batch_size)
        summary["test"] = summarize_scores(scores)
        result = dict(
            checkpoint=options.output_dir,
            test_dir=options.test_dir,
            step=step,
            status=status,
            eval_dtype=options.eval_dtype,
            save_dtype=options.save_dtype,
            **scores,
        )
        with open(os.path.join(options.output_dir, TEST_RESULT_FILE), "w") as handle:
            json.dump(result, handle, indent=1)
        kinds = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in summary["test"].items() if "/" in k)
        _print(
            options,
            f"test accuracy {summary['test']['accuracy']:.4f} ({kinds}) on "
            f"{len(test_split.questions)} questions of {options.test_dir} "
            f"[reload + preprocess + generate {time.time() - test_start:.1f}s]",
        )
    for path in (log_path, os.path.join(options.output_dir, LOG_FILE)):
        write_log(path, log)
    plot_curve(log, os.path.join(options.output_dir, CURVE_FILE), curve_title(options))
    summary["checkpoint_bytes"] = directory_bytes(options.output_dir)
    _print(options, f"checkpoint {options.output_dir}: {summary['checkpoint_bytes'] / 1e6:.1f} MB")
    if os.environ.get("OUT"):
        summary["out_files"] = copy_to_out(options.output_dir, os.environ["OUT"])
        _print(options, f"copied to $OUT: {', '.join(os.path.basename(p) for p in summary['out_files'])}")
    summary["wall_seconds"] = round(time.time() - start_time, 1)
    _print(options, json.dumps(summary))
    return summary


def main(argv):
    del argv
    import warnings

    # The decode loop donates its KV cache; XLA cannot always reuse it in place. Harmless, and noisy.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    run_training(TrainOptions.from_flags(), start_time=PROCESS_START)


if __name__ == "__main__":
    define_flags()
    app.run(main)
