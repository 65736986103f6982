"""The per-pair answer loop: fixed batches, each answer appended to the pair's prediction file at once.

Why the batching is the way it is:
  * batches are fixed slices of the question list (`--batch_size`), the last one padded by repeating
    its own questions and dropping the extra answers, so every call has the same shapes and jit
    compiles once per (pair, prompt-length bucket);
  * a batch with any unanswered question is run whole, even after a resume, and only its missing
    answers are written: each answer then comes from exactly the batch it would have had in an
    uninterrupted run, so a resumed run gives the same file;
  * a question whose image is missing or unreadable, or whose prompt the model cannot take (found
    before any generation), is skipped with its reason and the run goes on; its batch keeps its
    slice, so the other questions' answers do not depend on it;
  * a seeded pruning method (random) draws each question's tokens from a seed of its own
    (`question_seed`), so its answers do not depend on the batch size either.

Each answer is flushed and fsynced as soon as it exists, so a run that is killed resumes where it
stopped: answered questions are skipped, a half-written last line is dropped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from experiments.benchmarks import Question
from experiments.benchmarks.base import text_tower_query
from experiments.benchmarks.io import read_predictions
from experiments.evaluation import processes
from experiments.evaluation.config import PREDICTIONS_DIR, EvalConfig
from experiments.evaluation.inputs import ImageLoader
from experiments.evaluation.pairs import Pair


@dataclasses.dataclass
class PairProgress:
    """What one pair's generation loop did in this process (for results.json and the log)."""

    generated: int = 0
    wall_seconds: float = 0.0
    generation_seconds: float = 0.0
    first_batch_seconds: float | None = None  # includes jit compilation
    warm_images: int = 0  # images answered after the first (compiling) batch
    warm_seconds: float = 0.0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # question_id -> reason

    def timing(self) -> dict:
        """Throughput counts only the batches after the first, which pays for compilation: a run that
        generated one batch (a short resume, a small --limit) has no throughput of its own."""
        images_per_second = self.warm_images / self.warm_seconds if self.warm_seconds else None
        return {
            "generated_this_run": self.generated,
            "wall_seconds": self.wall_seconds,
            "generation_seconds": self.generation_seconds,
            "first_batch_seconds": self.first_batch_seconds,
            "images_per_second": images_per_second,
        }


def predictions_path(output_dir: str, pair: Pair) -> str:
    return os.path.join(output_dir, PREDICTIONS_DIR, f"{pair.name}.jsonl")


def batch_seed(seed: int, batch_index: int) -> int:
    """A per-batch seed (for sampling) that depends only on (seed, batch position)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def question_seed(seed: int, question_id: str) -> int:
    """The seed of a seeded pruning method for one question: a function of (seed, question id) alone,
    so the answer does not depend on the batch size, the question order or a resume."""
    return int(np.random.SeedSequence([seed, zlib.crc32(question_id.encode())]).generate_state(1)[0])


def run_pair(
    engine,
    pair: Pair,
    questions: Sequence[Question],
    loader: ImageLoader,
    config: EvalConfig,
    max_new_tokens: int,
    record_kept_ids: set[str],
    unusable: Mapping[str, str] | None = None,
) -> PairProgress:
    """Answer every unanswered question for one pair, appending each answer to its prediction file.

    `unusable`: question_id -> reason for questions whose prompt is never given to the model.
    In a multi-process run every process runs every batch; process 0 decides which are left (from
    its prediction file) and writes the answers (`experiments.evaluation.processes`).
    """
    from tqdm import tqdm

    unusable = unusable or {}
    path = predictions_path(config.output_dir, pair)
    done = processes.answered(path, [question.question_id for question in questions], read_predictions)
    progress = PairProgress()
    batches = [
        list(questions[start : start + config.batch_size])
        for start in range(0, len(questions), config.batch_size)
    ]
    pending = [
        (index, batch)
        for index, batch in enumerate(batches)
        if any(question.question_id not in done for question in batch)
    ]
    already = sum(question.question_id in done for question in questions)
    start_time = time.perf_counter()
    bar = tqdm(
        total=len(questions),
        initial=already,
        desc=pair.name,
        unit="img",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not processes.is_writer(),
    )
    with processes.prediction_writer(path) as writer:
        # The engine prepares the next batch while this one generates: requests are planned one batch
        # ahead (skips and progress of batches that need no model call are recorded on the way).
        batch_start = time.perf_counter()
        for (readable, todo), answers in engine.answer_stream(
            _requests(pending, loader, done, unusable, config, pair, max_new_tokens, progress, bar)
        ):
            seconds = time.perf_counter() - batch_start
            new = 0
            for row, (question, _) in enumerate(readable):
                if question.question_id not in todo:
                    continue
                writer.write(
                    prediction_record(question, answers, row, pair, question.question_id in record_kept_ids)
                )
                new += 1
            progress.generation_seconds += seconds
            if progress.first_batch_seconds is None:
                progress.first_batch_seconds = seconds
            else:
                progress.warm_images += new
                progress.warm_seconds += seconds
            progress.generated += new
            bar.update(len(todo))
            rate = progress.timing()["images_per_second"]
            if rate:
                bar.set_postfix(model_img_s=f"{rate:.2f}", skipped=len(progress.skipped))
            batch_start = time.perf_counter()
    bar.close()
    progress.wall_seconds = time.perf_counter() - start_time
    return progress


def _requests(pending, loader, done, unusable, config, pair, max_new_tokens, progress, bar):
    """The batches that need a model call, as ``engine.answer_stream`` requests tagged with
    ``(readable (question, image) pairs, unanswered ids)``; each batch's skipped questions
    are recorded, and a batch with nothing to generate only advances the progress bar."""
    next_images = loader.submit(pending[0][1]) if pending else None
    for position, (batch_index, batch) in enumerate(pending):
        images = next_images.result()
        next_images = loader.submit(pending[position + 1][1]) if position + 1 < len(pending) else None
        todo = {question.question_id for question in batch if question.question_id not in done}
        readable = [
            (question, image)
            for question, image in zip(batch, images)
            if image is not None and question.question_id not in unusable
        ]
        for question, image in zip(batch, images):
            if question.question_id not in todo:
                continue
            if question.question_id in unusable:
                progress.skipped[question.question_id] = unusable[question.question_id]
            elif image is None:
                progress.skipped[question.question_id] = loader.failures[loader.image_path(question)]
        # A batch whose unanswered questions all lack images needs no model call.
        if not any(question.question_id in todo for question, _ in readable):
            bar.update(len(todo))
            continue
        # Pad to the batch size by repeating this batch's own items: static shapes, one compile.
        padded = [readable[i % len(readable)] for i in range(config.batch_size)]
        options = dict(
            images=[image for _, image in padded],
            questions=[q.prompt for q, _ in padded],
            pruning=pair.pruning,
            max_new_tokens=max_new_tokens,
            seed=batch_seed(config.seed, batch_index),
            row_seeds=[question_seed(config.seed, q.question_id) for q, _ in padded],
            queries=[text_tower_query(q.prompt) for q, _ in padded],
        )
        yield (readable, todo), options


def prediction_record(question: Question, answers, row: int, pair: Pair, record_kept: bool) -> dict:
    """One line of a prediction file; kept indices only for a few questions (files stay small)."""
    record = {
        "question_id": question.question_id,
        "prediction": answers.texts[row],
        "answer": question.answer,
        "category": question.category,
        "image": question.image,
        "kept_count": pair.keep,
        "prompt_tokens": answers.prompt_tokens[row],
    }
    if record_kept and answers.kept is not None:
        record["kept"] = [int(index) for index in np.asarray(answers.kept[row])]
    return record
