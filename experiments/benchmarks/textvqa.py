"""TextVQA (Singh et al., 2019) validation: questions about text in images, 10 human answers each.

Follows LLaVA-1.5's llava/eval/m4c_evaluator.py (TextVQAAccuracyEvaluator with the
EvalAIAnswerProcessor, the same normalisation as the official VQA vqaEval.py):
  * normalisation, applied to the prediction and to every human answer: lowercase; drop ',' and
    '?'; "'s" -> " 's"; newlines/tabs -> spaces; each punctuation mark of PUNCTUATION is deleted
    if the text has it next to a space, else replaced by a space; '.' not followed by a digit is
    deleted (at most 32 of them: the official code passes re.UNICODE, 32, as the count); number
    words zero..ten -> digits ('none' -> '0'); articles a/an/the removed; the contractions table
    restores apostrophes ('dont' -> "don't");
  * accuracy of one prediction: the mean, over the 10 ways of leaving one human answer out, of
    min(1, #remaining answers equal to the prediction / 3). E.g. 2 matching answers of 10 give
    (2 * 1/3 + 8 * 2/3) / 10 = 0.6; 4 or more give 1.0.
The official processor's digit-comma test never fires (commas are already gone by then) and its
capitalised contraction keys never match lowercased text and two of its entries map a word to
itself; all are left out here, which changes no result.

Input: a JSONL file, one object per line with question_id, image, text (the question as LLaVA
feeds it, e.g. with its 'Reference OCR token: ...' line), answers (the 10 human answers) and an
optional category.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from experiments.benchmarks.base import (
    SHORT_ANSWER_INSTRUCTION,
    Question,
    iter_records,
    mean_score_report,
    optional_string,
    require,
    require_string_list,
    with_instruction,
)

NUM_HUMAN_ANSWERS = 10
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# A period not followed by a digit ("3.5" keeps its point).
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
OFFICIAL_PERIOD_STRIP_LIMIT = 32

# The official table maps every spelling of these forms with exactly one apostrophe missing back
# to the form ("couldnt've" and "couldn'tve" -> "couldn't've", "dont" -> "don't").
CONTRACTED_FORMS = (
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd've",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
)


def _spellings_missing_one_apostrophe(form: str) -> list[str]:
    return [form[:i] + form[i + 1 :] for i, char in enumerate(form) if char == "'"]


CONTRACTIONS = {
    spelling: form for form in CONTRACTED_FORMS for spelling in _spellings_missing_one_apostrophe(form)
}
CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table has this one backwards


def _process_punctuation(text: str) -> str:
    """Delete or space out punctuation; the test looks at the text before any change."""
    processed = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text:
            processed = processed.replace(mark, "")
        else:
            processed = processed.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", processed, count=OFFICIAL_PERIOD_STRIP_LIMIT)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI / VQA answer normalisation (EvalAIAnswerProcessor.__call__)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of min(1, matching answers / 3), after normalisation."""
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in human_answers]
    num_matches = sum(matches)
    subset_scores = [min(1.0, (num_matches - left_out) / 3) for left_out in matches]
    return sum(subset_scores) / len(subset_scores)


class TextVqaBenchmark:
    """TextVQA soft VQA accuracy."""

    name = "textvqa"
    # Answers are short, but OCR strings (titles, brand names) can run to several words.
    max_new_tokens = 32
    primary_metric = "accuracy"

    def load_questions(self, path: str | os.PathLike) -> list[Question]:
        questions = []
        for location, record, question_id in iter_records(path, "TextVQA"):
            answers = require_string_list(record, "answers", location)
            if len(answers) != NUM_HUMAN_ANSWERS:
                raise ValueError(
                    f"{location}: field 'answers' must hold {NUM_HUMAN_ANSWERS} human answers, got {len(answers)}"
                )
            questions.append(
                Question(
                    question_id=question_id,
                    image=require(record, "image", str, location),
                    prompt=with_instruction(require(record, "text", str, location), SHORT_ANSWER_INSTRUCTION),
                    answer=answers,
                    category=optional_string(record, "category", location),
                )
            )
        return questions

    def score(self, questions: Sequence[Question], predictions: Mapping[str, str]) -> dict:
        return mean_score_report(
            questions, predictions, lambda question, prediction: vqa_accuracy(prediction, question.answer)
        )
