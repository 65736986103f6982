"""GQA (Hudson & Manning, 2019) balanced test-dev: open questions with one short answer each.

Follows LLaVA-1.5's pipeline exactly: scripts/convert_gqa_for_eval.py turns the (already
stripped) model text into ``text.rstrip('.').lower()`` and GQA's own eval.py counts
``prediction == gold`` ("accuracy"). Nothing else is normalised: 'a dog' does not match 'dog', nor
'dog!' or 'two' vs '2'. This is deliberately narrower than a generic "strip punctuation and
whitespace" rule, so the numbers stay comparable with LLaVA-1.5 and the pruning papers that use
its scripts.

Input: a JSONL file, one object per line with question_id, image, text, answer (a string) and an
optional category (e.g. GQA's structural type) for per-category accuracy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from experiments.benchmarks.base import (
    SHORT_ANSWER_INSTRUCTION,
    Question,
    iter_records,
    mean_score_report,
    optional_string,
    require,
    with_instruction,
)


def normalize_gqa_prediction(text: str) -> str:
    """LLaVA's GQA conversion: strip, drop trailing periods, lowercase."""
    return text.strip().rstrip(".").lower()


class GqaBenchmark:
    """GQA exact-match accuracy."""

    name = "gqa"
    # Gold answers are one to three words; anything much longer cannot match.
    max_new_tokens = 16
    primary_metric = "accuracy"

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        questions = []
        for location, record, question_id in iter_records(path, "GQA"):
            questions.append(
                Question(
                    question_id=question_id,
                    image=require(record, "image", str, location),
                    prompt=with_instruction(require(record, "text", str, location), SHORT_ANSWER_INSTRUCTION),
                    answer=require(record, "answer", str, location),
                    category=optional_string(record, "category", location),
                )
            )
        return questions

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        return mean_score_report(
            questions,
            predictions,
            lambda question, prediction: float(normalize_gqa_prediction(prediction) == question.answer),
        )
