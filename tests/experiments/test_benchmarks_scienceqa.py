"""ScienceQA-IMG: the prompt format, eval_science_qa.py's letter parsing and accuracy."""

import json

import pytest

from experiments.benchmarks import get_benchmark
from experiments.benchmarks.scienceqa import FAILED, build_prompt, parse_science_qa_answer

SCIENCEQA = get_benchmark("scienceqa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        (" C\n", "C"),  # LLaVA strips the decoded text first
        ("B. dog", "B"),
        ("The answer is B.", "B"),
        ("I think so. The answer is D.", "D"),
        ("B.", FAILED),  # a bare letter with a period is not accepted by eval_science_qa.py
        ("b", FAILED),
        ("The answer is B", FAILED),  # the pattern needs one more character after the letter
        ("the answer is B.", FAILED),  # case-sensitive
        ("The answer is A. The answer is B.", FAILED),  # two matches
        ("F", FAILED),
        ("", FAILED),
    ],
)
def test_parse_science_qa_answer_matches_eval_science_qa(text, expected):
    assert parse_science_qa_answer(text) == expected


def test_prompt_with_and_without_hint():
    instruction = "Answer with the option's letter from the given choices directly."
    assert build_prompt("Which is a mammal?", ["dog", "fish", "frog"], "") == (
        f"Which is a mammal?\nA. dog\nB. fish\nC. frog\n{instruction}"
    )
    assert build_prompt("Which is heavier?", ["rock", "leaf"], "Select the best answer.") == (
        f"Context: Select the best answer.\nWhich is heavier?\nA. rock\nB. leaf\n{instruction}"
    )


def write_questions(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_accuracy_by_hand(tmp_path):
    rows = [
        {
            "question_id": "1",
            "image": "1/image.png",
            "question": "Which is a mammal?",
            "choices": ["fish", "dog", "frog"],
            "answer": 1,
            "hint": "",
            "category": "natural science",
        },
        {
            "question_id": "2",
            "image": "2/image.png",
            "text": "Which is a verb?",
            "choices": ["run", "blue"],
            "answer": 0,
            "category": "language science",
        },
        {
            "question_id": "3",
            "image": "3/image.png",
            "question": "Which is a state?",
            "choices": ["Ohio", "Paris", "Nile"],
            "answer": 0,
            "category": "social science",
        },
        {
            "question_id": "4",
            "image": "4/image.png",
            "question": "Which is hot?",
            "choices": ["ice", "fire"],
            "answer": 1,
            "category": "natural science",
        },
    ]
    questions = SCIENCEQA.load_questions(write_questions(tmp_path / "sqa.jsonl", rows))
    predictions = {
        "1": "The answer is B.",  # right
        "2": "A",  # right ("text" works as the question field)
        "3": "E",  # a letter beyond the 3 choices: wrong
        "4": "B.",  # unparseable: wrong
    }

    report = SCIENCEQA.score(questions, predictions)

    assert report["overall"]["accuracy"] == pytest.approx(2 / 4)
    assert report["per_category"]["natural science"]["accuracy"] == pytest.approx(1 / 2)
    assert report["per_category"]["language science"]["accuracy"] == 1.0
    assert report["per_category"]["social science"]["accuracy"] == 0.0
    assert [q.answer for q in questions] == ["B", "A", "A", "B"]
    assert questions[1].prompt.startswith("Which is a verb?\nA. run\nB. blue\n")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer": 3}, "field 'answer' must index the 3 choices, got 3"),
        ({"answer": "B"}, "field 'answer' must be int"),
        ({"choices": ["only"]}, "field 'choices' must hold 2 to 5 options, got 1"),
        ({"choices": list("abcdef")}, "field 'choices' must hold 2 to 5 options, got 6"),
    ],
)
def test_invalid_items_are_reported(tmp_path, changes, message):
    row = {"question_id": "1", "image": "1.png", "question": "Q?", "choices": ["x", "y", "z"], "answer": 0}
    path = write_questions(tmp_path / "sqa.jsonl", [{**row, **changes}])
    with pytest.raises(ValueError, match=rf"{path}:1: {message}"):
        SCIENCEQA.load_questions(path)


def test_missing_question_text_names_the_question_field(tmp_path):
    path = write_questions(
        tmp_path / "sqa.jsonl", [{"question_id": "1", "image": "1.png", "choices": ["x", "y"], "answer": 0}]
    )
    with pytest.raises(ValueError, match="missing field 'question'"):
        SCIENCEQA.load_questions(path)
