"""ScienceQA-IMG (Lu et al., 2022): multiple-choice science questions with an image.

Prompt, as LLaVA-1.5's llava_test_CQM-A.json + model_vqa_science.py --single-pred-prompt build it
(reproduced the same way by lmms-eval's scienceqa 'default' format): an optional
'Context: <hint>' line when the item has a non-empty hint, the question, one 'A. <choice>' line per
choice, then "Answer with the option's letter from the given choices directly."

Answer parsing and metric follow LLaVA-1.5's llava/eval/eval_science_qa.py on the stripped text:
  * exactly one of 'A'..'E' -> that letter;
  * else a letter 'A'..'E' followed by '. ' at the very start ('B. dog') -> that letter (a bare
    'B.' is not accepted, as in the original);
  * else the pattern 'The answer is X.' (any capital letter, then any one character) found
    exactly once -> X;
  * else 'FAILED'. FAILED, or a letter beyond the item's choices, is wrong.
accuracy = fraction of answered questions whose letter is the ground truth. (LLaVA's script counts
a question without a prediction as FAILED; here it is reported in num_missing instead.)

Input: a JSONL file, one object per line with question_id, image, question (or text), choices (2
to 5 strings), answer (index into choices), and optional hint and category (e.g. the subject).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from experiments.benchmarks.base import (
    OPTION_LETTER_INSTRUCTION,
    Question,
    iter_records,
    mean_score_report,
    optional_string,
    require,
    require_string_list,
)

OPTION_LETTERS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
ANSWER_IS_PATTERN = re.compile(r"The answer is ([A-Z]).")


def parse_science_qa_answer(text: str) -> str:
    """The option letter eval_science_qa.py reads from the model's text, or 'FAILED'."""
    text = text.strip()
    if text in OPTION_LETTERS:
        return text
    if len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS_PATTERN.findall(text)
    return found[0] if len(found) == 1 else FAILED


def build_prompt(question: str, choices: Sequence[str], hint: str) -> str:
    """LLaVA-1.5's CQM-A prompt with the single-letter instruction."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(OPTION_LETTERS, choices))
    return f"{context}{question}\n{options}\n{OPTION_LETTER_INSTRUCTION}"


class ScienceQaBenchmark:
    """ScienceQA-IMG multiple-choice accuracy."""

    name = "scienceqa"
    # One letter is expected; 'The answer is X.' still fits comfortably.
    max_new_tokens = 16
    primary_metric = "accuracy"

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        questions = []
        for location, record, question_id in iter_records(path, "ScienceQA"):
            question_field = "text" if "question" not in record and "text" in record else "question"
            choices = require_string_list(record, "choices", location)
            if not 2 <= len(choices) <= len(OPTION_LETTERS):
                raise ValueError(f"{location}: field 'choices' must hold 2 to 5 options, got {len(choices)}")
            answer_index = require(record, "answer", int, location)
            if not 0 <= answer_index < len(choices):
                raise ValueError(
                    f"{location}: field 'answer' must index the {len(choices)} choices, got {answer_index}"
                )
            questions.append(
                Question(
                    question_id=question_id,
                    image=require(record, "image", str, location),
                    prompt=build_prompt(
                        require(record, question_field, str, location),
                        choices,
                        optional_string(record, "hint", location).strip(),
                    ),
                    answer=OPTION_LETTERS[answer_index],
                    category=optional_string(record, "category", location),
                )
            )
        return questions

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        return mean_score_report(
            questions,
            predictions,
            lambda question, prediction: float(parse_science_qa_answer(prediction) == question.answer),
        )
