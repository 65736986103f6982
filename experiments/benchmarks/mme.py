"""MME (Fu et al., 2023): 14 yes/no subtasks, two questions per image (one 'Yes', one 'No').

Follows MME's eval_tool/calculation.py, which LLaVA-1.5 runs on its converted answers:
  * answer parsing (`parse_pred_ans`): lowercase; exactly 'yes'/'no', else 'yes' if 'yes' occurs in
    the first 4 characters, else 'no' if 'no' does, else 'other' (always wrong). This agrees with
    "starts with yes / no" except on answers such as '(no)', '"yes"' or 'snow', which it reads
    as no / yes / no;
  * per subtask, in percent as MME reports them: acc = questions right, acc_plus = images with
    every question right (calculation.py pairs consecutive lines; here questions are grouped by
    image, which is the same on MME's files and does not depend on line order), score = acc +
    acc_plus (0..200);
  * perception_score = sum of the 10 perception subtask scores (0..2000), cognition_score = sum of
    the 4 cognition ones (0..800); a subtask absent from the question file contributes 0.
With missing predictions, acc is over the answered questions and acc_plus over images whose
questions are all answered; `overall` also has pooled acc / acc_plus over all subtasks.

Input: a JSONL file, one object per line with question_id, image, text, answer ('Yes'/'No') and
category (the subtask, spelled as in MME: 'existence', ..., 'OCR', 'commonsense_reasoning', ...).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence

from experiments.benchmarks.base import (
    SHORT_ANSWER_INSTRUCTION,
    Question,
    answered,
    grouped_report,
    iter_records,
    require,
    safe_ratio,
    with_instruction,
)

PERCEPTION_SUBTASKS = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(text: str) -> str:
    """'yes', 'no' or 'other', as calculation.py's parse_pred_ans decides it."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def image_key(question: Question) -> tuple[str, str]:
    """MME's acc+ unit: one image of one subtask."""
    return question.category, question.image


class MmeBenchmark:
    """MME perception/cognition yes/no benchmark; primary metric the perception score."""

    name = "mme"
    # The parser reads the first 4 characters; the instruction elicits one word.
    max_new_tokens = 16
    primary_metric = "perception_score"

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        questions = []
        known_subtasks = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS
        for location, record, question_id in iter_records(path, "MME"):
            answer = require(record, "answer", str, location).strip().lower()
            if answer not in ("yes", "no"):
                raise ValueError(
                    f"{location}: field 'answer' must be 'Yes' or 'No', got {record['answer']!r}"
                )
            subtask = require(record, "category", str, location)
            if subtask not in known_subtasks:
                raise ValueError(
                    f"{location}: unknown MME subtask {subtask!r}; expected one of {', '.join(known_subtasks)}"
                )
            questions.append(
                Question(
                    question_id=question_id,
                    image=require(record, "image", str, location),
                    prompt=with_instruction(require(record, "text", str, location), SHORT_ANSWER_INSTRUCTION),
                    answer=answer,
                    category=subtask,
                )
            )
        return questions

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        _, missing = answered(questions, predictions)
        images_with_missing = {image_key(question) for question in missing}

        def summarize(pairs: list[tuple[Question, str]]) -> dict:
            image_all_right: dict[tuple[str, str], bool] = defaultdict(lambda: True)
            num_right = 0
            for question, prediction in pairs:
                right = parse_mme_answer(prediction) == question.answer
                num_right += right
                key = image_key(question)
                if key not in images_with_missing:
                    image_all_right[key] &= right
            acc = 100.0 * safe_ratio(num_right, len(pairs))
            acc_plus = 100.0 * safe_ratio(sum(image_all_right.values()), len(image_all_right))
            return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}

        report = grouped_report(questions, predictions, summarize)
        subtask_scores = {subtask: metrics["score"] for subtask, metrics in report["per_category"].items()}
        overall = report["overall"]
        del overall["score"]  # a pooled acc + acc_plus is not an MME score; the sums below are
        overall["perception_score"] = sum(subtask_scores.get(s, 0.0) for s in PERCEPTION_SUBTASKS)
        overall["cognition_score"] = sum(subtask_scores.get(s, 0.0) for s in COGNITION_SUBTASKS)
        overall["total_score"] = overall["perception_score"] + overall["cognition_score"]
        return report
