"""Training batches: fresh scenes and multi-turn conversations, drawn on the host, never on disk.

Each step's layouts, questions and token ids are drawn on the host by a prefetch thread (`Prefetcher`);
only the small `SceneParams` travel to the device, where the jitted step renders the pixels. Batch
`s` is a pure function of (seed, s) (`batch_rng`), so a resumed or interrupted run sees exactly the
batches an uninterrupted one does, however far the prefetch thread ran ahead.

Each image gets `turns` questions as one vicuna_v1 conversation (LLaVA-1.5's own multi-turn format:
`... ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>...`), whose first turn is exactly the single-question
inference prompt: several answers per image for little more than one image's tokens.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments.testbed.encoding import (
    answer_token_ids,
    encode_followup,
    encode_prompt,
    max_followup_length,
    max_prompt_length,
)
from experiments.testbed.layout import sample_scenes
from experiments.testbed.questions import sample_questions
from experiments.testbed.words import KINDS, SPLITS, TRAINING_NEGATIVE_TYPES


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
