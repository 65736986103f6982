"""POPE (Li et al., 2023): object-hallucination yes/no questions on COCO.

Follows LLaVA-1.5's llava/eval/eval_pope.py (adapted from POPE's own evaluate.py):
  * answer parsing: keep the text before the first '.', drop commas, split on single spaces; the
    answer is 'no' if one of the words is exactly 'No', 'not' or 'no', otherwise 'yes' (so an
    unparseable answer counts as 'yes', as in the original);
  * metrics with 'yes' as the positive class: accuracy, precision, recall, f1, yes_ratio, plus the
    confusion counts tp/fp/tn/fn that eval_pope.py prints. The original divides by zero when no
    'yes' is predicted; here such ratios are 0.0.
  * per split ('random', 'popular', 'adversarial', from the file name as eval_pope.py derives it);
    `overall` pools all scored questions of all splits (as lmms-eval does); the mean over splits,
    which some papers quote, is the mean of the per-category values.

Input: POPE's own files (coco_pope_{split}.json, one object per line with question_id, image,
text, label), given as one file, a directory (every *.json / *.jsonl in it), or a
comma-separated list of files. Labels must be 'yes' or 'no' (any case). POPE's
ids restart at 1 in every split, so question ids are '<split>/<id>' whichever way the files are
given (a prediction file stays valid when the splits are loaded differently).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from experiments.benchmarks.base import (
    SHORT_ANSWER_INSTRUCTION,
    Question,
    UniqueIds,
    grouped_report,
    iter_records,
    require,
    safe_ratio,
    with_instruction,
)

SPLIT_FILE_PATTERNS = ("*.json", "*.jsonl")


def parse_pope_answer(text: str) -> str:
    """'yes' or 'no' exactly as eval_pope.py decides it."""
    text = text.strip()
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def split_name(path: Path) -> str:
    """'coco_pope_adversarial.json' -> 'adversarial' (the part after 'pope_'; else the stem)."""
    stem = path.stem
    marker = "pope_"
    return stem[stem.rindex(marker) + len(marker) :] if marker in stem else stem


def question_files(path: str | os.PathLike) -> list[Path]:
    """The split files named by `path`: a file, a directory of them, or 'a.json,b.json'."""
    if Path(path).is_dir():
        directory = Path(path)
        files = sorted({f for pattern in SPLIT_FILE_PATTERNS for f in directory.glob(pattern)})
        if not files:
            raise FileNotFoundError(f"POPE: no *.json / *.jsonl question files in directory {directory}")
        return files
    text = os.fspath(path)
    if Path(text).exists() or "," not in text:
        return [Path(text)]
    return [Path(part.strip()) for part in text.split(",") if part.strip()]


def binary_metrics(predicted_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict:
    """POPE's metrics with 'yes' as the positive class; zero denominators give 0.0."""
    pairs = list(zip(predicted_yes, label_yes))
    tp = sum(p and y for p, y in pairs)
    fp = sum(p and not y for p, y in pairs)
    tn = sum(not p and not y for p, y in pairs)
    fn = sum(not p and y for p, y in pairs)
    precision = safe_ratio(tp, tp + fp)
    recall = safe_ratio(tp, tp + fn)
    return {
        "accuracy": safe_ratio(tp + tn, len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": safe_ratio(2 * precision * recall, precision + recall),
        "yes_ratio": safe_ratio(tp + fp, len(pairs)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


class PopeBenchmark:
    """POPE yes/no hallucination benchmark; primary metric F1 (pooled over the loaded splits)."""

    name = "pope"
    # The parser reads only the first sentence; the instruction elicits one word.
    max_new_tokens = 32
    primary_metric = "f1"

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        questions = []
        unique_ids = UniqueIds()
        for split_file in question_files(path):
            split = split_name(split_file)
            for location, record, question_id in iter_records(split_file, "POPE", unique_ids, f"{split}/"):
                label = require(record, "label", str, location).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(
                        f"{location}: field 'label' must be 'yes' or 'no', got {record['label']!r}"
                    )
                questions.append(
                    Question(
                        question_id=question_id,
                        image=require(record, "image", str, location),
                        prompt=with_instruction(
                            require(record, "text", str, location), SHORT_ANSWER_INSTRUCTION
                        ),
                        answer=label,
                        category=split,
                    )
                )
        return questions

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        def summarize(pairs: list[tuple[Question, str]]) -> dict:
            return binary_metrics(
                [parse_pope_answer(prediction) == "yes" for _, prediction in pairs],
                [question.answer == "yes" for question, _ in pairs],
            )

        return grouped_report(questions, predictions, summarize)
