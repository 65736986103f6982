"""Questions, images and prompts: every check that can fail runs before any generation."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

from experiments.benchmarks import Question
from experiments.evaluation.config import EvalConfig


def load_question_list(benchmark, path: str, limit: int | None) -> list[Question]:
    """The benchmark's questions (first `limit` of them); a missing file or folder names the path."""
    # POPE also takes 'a.json,b.json'; those parts are checked by its own loader.
    if "," not in path and not os.path.exists(path):
        raise FileNotFoundError(f"question file or directory not found: {path}")
    questions = benchmark.load_questions(path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        questions = questions[:limit]
    return questions


def image_resolver(benchmark, config: EvalConfig):
    """question -> image path: under --image_dir, or where the benchmark keeps its own images."""
    if config.image_dir:
        if not os.path.isdir(config.image_dir):
            raise FileNotFoundError(f"image folder not found: {config.image_dir}")
        return lambda question: os.path.join(config.image_dir, question.image)
    if hasattr(benchmark, "image_path"):  # the testbed: images/ beside questions.jsonl
        return lambda question: benchmark.image_path(config.questions, question)
    raise ValueError(
        f"--image_dir is required for benchmark {benchmark.name!r} (the folder holding the "
        f"images its question file names)"
    )


class ImageLoader:
    """Decodes images (each failure remembered with its reason, so it is reported once per pair,
    not re-decoded) and loads the next batch in a background thread while the model runs."""

    def __init__(self, image_path):
        from models.preprocess import UnreadableImageError, load_image

        self._load_image = load_image
        self._errors = (FileNotFoundError, UnreadableImageError)
        self.image_path = image_path
        self.failures: dict[str, str] = {}  # path -> reason
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _load(self, questions: Sequence[Question]) -> list:
        images = []
        for question in questions:
            path = self.image_path(question)
            if path in self.failures:
                images.append(None)
                continue
            try:
                images.append(self._load_image(path))
            except self._errors as error:
                self.failures[path] = str(error)
                images.append(None)
        return images

    def submit(self, questions: Sequence[Question]) -> concurrent.futures.Future:
        return self._pool.submit(self._load, list(questions))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def check_images_exist(questions: Sequence[Question], image_path) -> None:
    """Fail fast when not one image is where the questions say (a wrong --image_dir, not a gap)."""
    if questions and not any(os.path.exists(image_path(question)) for question in questions):
        raise FileNotFoundError(
            f"none of the {len(questions)} questions' images exists; e.g. {image_path(questions[0])} "
            f"(is --image_dir right?)"
        )


def unusable_prompts(questions: Sequence[Question], engine, max_new_tokens: int) -> dict[str, str]:
    """question_id -> reason for every prompt the model cannot take, found before any generation.

    A prompt holding its own `<image>` or too long for the context would otherwise stop the whole run
    mid-generation without naming the question; like a bad image, it costs only its own question.
    LLaVA-NeXT prompts are measured with the most image tokens any image takes (images are not read
    here), so a question is kept only if it fits whatever its image.
    """
    from models.anyres import image_token_count
    from models.tokenizer import IMAGE_TOKEN

    positions = engine.config.text.max_position_embeddings
    largest = None  # LLaVA-NeXT: the image size (a pinpoint) that takes the most image tokens
    if engine.config.anyres:
        largest = max(engine.config.image_grid_pinpoints, key=lambda s: image_token_count(s, engine.config))
    unusable = {}
    for question in questions:
        if IMAGE_TOKEN in question.prompt:
            unusable[question.question_id] = (
                f"question text contains the image placeholder {IMAGE_TOKEN!r} (the prompt adds its own)"
            )
            continue
        try:
            length = len(engine.preprocessor.encode(question.prompt, largest))
        except ValueError as error:
            unusable[question.question_id] = f"cannot encode the prompt: {error}"
            continue
        if length + max_new_tokens > positions:
            unusable[question.question_id] = (
                f"prompt too long for the context: {length} prompt tokens"
                f"{' (with the largest image)' if largest else ''} + {max_new_tokens} new tokens "
                f"> {positions} positions"
            )
    return unusable


def overlay_questions(questions: Sequence[Question], count: int, image_path) -> list[Question]:
    """The first `count` questions with distinct, present images (POPE asks several questions per
    image; different pictures show more about a method than one picture asked three times)."""
    chosen, images = [], set()
    for question in questions:
        if len(chosen) >= count:
            break
        if question.image not in images and os.path.exists(image_path(question)):
            images.add(question.image)
            chosen.append(question)
    return chosen
