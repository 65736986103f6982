"""Shared pieces of the benchmark readers: the `Question` record, the `Benchmark` protocol,
strict JSONL reading and the bookkeeping every scorer needs.

Why strict: question files are hand-converted by researchers, and a silently skipped or
mis-typed line changes a published number. Every problem is reported as ``file:line: what``
so it can be fixed in the file rather than debugged in the model.

Conventions shared by all benchmarks (see the package docstring for the per-benchmark ones):
  * predictions are the model's decoded text keyed by ``Question.question_id``; LLaVA strips
    the decoded text before writing it (``outputs.strip()`` in llava/eval/model_vqa_loader.py),
    so every parser strips first;
  * a question without a prediction is *missing*: it is left out of every metric and counted in
    ``num_missing`` (a partial run reports the metric of its completed part, never a silently
    deflated one); predictions for unknown ids are ignored;
  * a ratio whose denominator is zero (no scored question, no predicted positive, ...) is 0.0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# LLaVA-1.5's short-answer instruction (appended by its eval question files for POPE, MME, GQA
# and TextVQA) and its ScienceQA instruction (model_vqa_science.py --single-pred-prompt).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
OPTION_LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
    """One item to answer; `prompt` is exactly the text fed to the model."""

    question_id: str
    image: str
    prompt: str
    answer: Any
    category: str


@runtime_checkable
class Benchmark(Protocol):
    """What `experiments/eval.py` needs from a benchmark."""

    name: str
    max_new_tokens: int
    primary_metric: str

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        """Read a question file; FileNotFoundError / ValueError name the file and line."""
        ...

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        """Return {'overall', 'per_category', 'num_scored', 'num_missing'}."""
        ...


def with_instruction(text: str, instruction: str) -> str:
    """Append `instruction` on a new line unless the text already ends with it (LLaVA's files do)."""
    text = text.rstrip()
    if text.endswith(instruction):
        return text
    return f"{text}\n{instruction}"


def text_tower_query(prompt: str) -> str:
    """The question as the released CDPruner evaluation gives CLIP's text tower: the prompt without
    LLaVA's short-answer instruction (a method reading CLIP's joint space compares the image with it)."""
    return prompt.replace(f"\n{SHORT_ANSWER_INSTRUCTION}", "")


def safe_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is zero."""
    return numerator / denominator if denominator else 0.0


def iter_jsonl(path: str | os.PathLike, benchmark_name: str) -> Iterator[tuple[str, dict]]:
    """Yield (``'file:line'``, record) for each non-blank line of a JSONL question file."""
    path = Path(path)
    if not path.is_file():
        reason = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{benchmark_name} question file {path} {reason}")
    num_records = 0
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            location = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{location}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{location}: expected a JSON object, got {type(record).__name__}")
            num_records += 1
            yield location, record
    if num_records == 0:
        raise ValueError(f"{path}: no questions in the file")


def require(record: dict, key: str, expected: type | tuple[type, ...], location: str) -> Any:
    """record[key], checked to be present and of the expected JSON type."""
    if key not in record:
        raise ValueError(f"{location}: missing field {key!r}")
    value = record[key]
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) or not isinstance(value, expected_types):
        names = " or ".join(t.__name__ for t in expected_types)
        raise ValueError(f"{location}: field {key!r} must be {names}, got {value!r}")
    return value


def require_string_list(record: dict, key: str, location: str) -> tuple[str, ...]:
    """record[key] as a tuple of strings."""
    values = require(record, key, list, location)
    if not all(isinstance(value, str) for value in values):
        raise ValueError(f"{location}: field {key!r} must be a list of strings, got {values!r}")
    return tuple(values)


def optional_string(record: dict, key: str, location: str) -> str:
    """record[key] if present (must be a string), else ''."""
    return require(record, key, str, location) if key in record else ""


class UniqueIds:
    """Rejects a question id seen before, naming both lines."""

    def __init__(self) -> None:
        self._first_seen: dict[str, str] = {}

    def check(self, question_id: str, location: str) -> None:
        if question_id in self._first_seen:
            raise ValueError(
                f"{location}: duplicate question_id {question_id!r} "
                f"(first at {self._first_seen[question_id]})"
            )
        self._first_seen[question_id] = location


def read_question_id(record: dict, location: str) -> str:
    """The record's question_id (int or string in the files), stringified."""
    return str(require(record, "question_id", (int, str), location))


def iter_records(
    path: str | os.PathLike, benchmark_name: str, unique_ids: UniqueIds | None = None, id_prefix: str = ""
) -> Iterator[tuple[str, dict, str]]:
    """(location, record, question_id) for every record of a JSON-lines question file, each id checked
    unique (across files too, when they share ``unique_ids``); ``id_prefix`` is prepended to ids."""
    unique_ids = UniqueIds() if unique_ids is None else unique_ids
    for location, record in iter_jsonl(path, benchmark_name):
        question_id = id_prefix + read_question_id(record, location)
        unique_ids.check(question_id, location)
        yield location, record, question_id


def answered(
    questions: Sequence[Question], predictions: Mapping[str, str]
) -> tuple[list[tuple[Question, str]], list[Question]]:
    """Split questions into (question, prediction) pairs and questions without a prediction."""
    scored, missing = [], []
    for question in questions:
        if question.question_id not in predictions:
            missing.append(question)
            continue
        prediction = predictions[question.question_id]
        if not isinstance(prediction, str):
            raise TypeError(
                f"prediction for question {question.question_id!r} must be the model's text (str), "
                f"got {type(prediction).__name__}"
            )
        scored.append((question, prediction))
    return scored, missing


def categories_in_order(questions: Sequence[Question]) -> list[str]:
    """Non-empty categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions if q.category))


def grouped_report(
    questions: Sequence[Question],
    predictions: Mapping[str, str],
    summarize: Callable[[list[tuple[Question, str]]], dict],
) -> dict:
    """The standard score dict: `summarize` applied to all scored pairs and to each category's.

    Each metrics dict also carries its own num_scored / num_missing.
    """
    scored, missing = answered(questions, predictions)

    def summary(pairs: list[tuple[Question, str]], num_missing: int) -> dict:
        return {**summarize(pairs), "num_scored": len(pairs), "num_missing": num_missing}

    per_category = {
        category: summary(
            [pair for pair in scored if pair[0].category == category],
            sum(question.category == category for question in missing),
        )
        for category in categories_in_order(questions)
    }
    return {
        "overall": summary(scored, len(missing)),
        "per_category": per_category,
        "num_scored": len(scored),
        "num_missing": len(missing),
    }


def mean_score_report(
    questions: Sequence[Question],
    predictions: Mapping[str, str],
    item_score: Callable[[Question, str], float],
) -> dict:
    """Score dict for benchmarks whose metric, 'accuracy', is the mean per-question score in [0, 1]."""

    def summarize(pairs: list[tuple[Question, str]]) -> dict:
        total = sum(item_score(question, prediction) for question, prediction in pairs)
        return {"accuracy": safe_ratio(total, len(pairs))}

    return grouped_report(questions, predictions, summarize)
