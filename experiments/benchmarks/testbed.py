"""The testbed as an eval-harness benchmark: load a written split, score single-word answers.

Implements the harness's benchmark protocol (name, max_new_tokens, primary_metric, load_questions,
score) for splits written by `experiments.testbed.splits.write_split`. Every answer is one word, so
scoring is exact match of the prediction's first word (lowercased, punctuation stripped); accuracy is
reported overall, per question kind (existence / counting / attribute / position) and per category
(existence split by POPE negative type), with POPE's precision / recall / F1 / yes-ratio added
wherever the answers are yes/no. A missing prediction counts as wrong (and is counted).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict

# The harness's record; `prompt` is the bare question, which the engine wraps in the vicuna_v1
# template (`experiments.testbed.encoding.format_prompt`, the same one the trainer uses).
from experiments.benchmarks.base import Question, UniqueIds, iter_jsonl
from experiments.testbed.splits import IMAGES_DIR, QUESTIONS_FILE
from experiments.testbed.words import NO, YES

_REQUIRED_FIELDS = ("question_id", "image", "text", "answer", "category")
_WORD = re.compile(r"[^\W_]+")


def normalize_answer(text: str) -> str:
    """First word of `text`, lowercased, without punctuation ('' when there is none)."""
    match = _WORD.search(str(text).lower())
    return match.group(0) if match else ""


def _kind(category: str) -> str:
    return category.split("/", 1)[0]


class TestbedBenchmark:
    """Benchmark over a testbed split directory (questions.jsonl + images/)."""

    __test__ = False  # not a pytest test class

    name = "testbed"
    max_new_tokens = 4  # one word, </s>, slack
    primary_metric = "accuracy"

    @staticmethod
    def questions_file(path: str | os.PathLike) -> str:
        path = os.fspath(path)
        return os.path.join(path, QUESTIONS_FILE) if os.path.isdir(path) else path

    @classmethod
    def image_path(cls, path: str | os.PathLike, question: Question) -> str:
        """Where `question.image` lives for a split at `path` (questions.jsonl or its directory)."""
        return os.path.join(
            os.path.dirname(os.path.abspath(cls.questions_file(path))), IMAGES_DIR, question.image
        )

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        file_name = self.questions_file(path)
        questions, unique_ids = [], UniqueIds()
        for location, record in iter_jsonl(file_name, self.name):
            missing = [f for f in _REQUIRED_FIELDS if f not in record]
            if missing:
                raise ValueError(f"{location}: missing field(s) {', '.join(missing)}")
            question_id = str(record["question_id"])
            unique_ids.check(question_id, location)
            questions.append(
                Question(
                    question_id=question_id,
                    image=str(record["image"]),
                    prompt=str(record["text"]),
                    answer=str(record["answer"]),
                    category=str(record["category"]),
                )
            )
        return questions

    def score(self, questions: list[Question], predictions: dict[str, str]) -> dict:
        groups: dict[str, dict[str, list]] = {
            "per_category": defaultdict(list),
            "per_kind": defaultdict(list),
        }
        outcomes = []
        for question in questions:
            answered = question.question_id in predictions
            predicted = normalize_answer(predictions[question.question_id]) if answered else None
            outcome = (normalize_answer(question.answer), predicted)
            outcomes.append(outcome)
            groups["per_category"][question.category].append(outcome)
            groups["per_kind"][_kind(question.category)].append(outcome)
        num_scored = sum(predicted is not None for _, predicted in outcomes)
        result = {
            "overall": _metrics(outcomes),
            "num_scored": num_scored,
            "num_missing": len(outcomes) - num_scored,
        }
        for key, grouped in groups.items():
            result[key] = {name: _metrics(items) for name, items in sorted(grouped.items())}
        return result


def _metrics(outcomes: list[tuple[str, str | None]]) -> dict:
    """Accuracy (missing = wrong) and count; POPE's yes/no statistics when every answer is yes/no."""
    count = len(outcomes)
    correct = sum(answer == predicted for answer, predicted in outcomes)
    metrics = {"accuracy": correct / count if count else 0.0, "count": count}
    if count and all(answer in (YES, NO) for answer, _ in outcomes):
        true_positive = sum(a == YES and p == YES for a, p in outcomes)
        predicted_yes = sum(p == YES for _, p in outcomes)
        actual_yes = sum(a == YES for a, _ in outcomes)
        precision = true_positive / predicted_yes if predicted_yes else 0.0
        recall = true_positive / actual_yes if actual_yes else 0.0
        metrics.update(
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            yes_ratio=predicted_yes / count,
        )
    return metrics
