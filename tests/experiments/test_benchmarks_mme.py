"""MME: calculation.py's answer parsing, acc / acc+ per subtask and the perception/cognition sums,
all computed by hand."""

import json

import pytest

from experiments.benchmarks import get_benchmark
from experiments.benchmarks.mme import parse_mme_answer

MME = get_benchmark("mme")


def write_questions(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair(subtask, image):
    """MME's two questions about one image: ground truth Yes, then No."""
    return [
        {
            "question_id": f"{subtask}/{image}#yes",
            "image": f"{subtask}/{image}",
            "text": f"Is it {image}? Please answer yes or no.",
            "answer": "Yes",
            "category": subtask,
        },
        {
            "question_id": f"{subtask}/{image}#no",
            "image": f"{subtask}/{image}",
            "text": f"Is it not {image}? Please answer yes or no.",
            "answer": "No",
            "category": subtask,
        },
    ]


@pytest.fixture
def questions(tmp_path):
    rows = (
        pair("existence", "1.jpg")
        + pair("existence", "2.jpg")
        + pair("OCR", "3.jpg")
        + pair("code_reasoning", "4.png")
    )
    return MME.load_questions(write_questions(tmp_path / "mme.jsonl", rows))


PREDICTIONS = {
    "existence/1.jpg#yes": "Yes",  # right
    "existence/1.jpg#no": "No.",  # right  -> image 1: both right
    "existence/2.jpg#yes": "yes, it is",  # right
    "existence/2.jpg#no": "Yes",  # wrong  -> image 2: 1 of 2
    "OCR/3.jpg#yes": "I am not sure",  # 'other': wrong
    "OCR/3.jpg#no": "no",  # right  -> image 3: 1 of 2
    "code_reasoning/4.png#yes": "YES",  # right
    "code_reasoning/4.png#no": "no",  # right -> image 4: both right
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, there is", "yes"),
        ("  NO ", "no"),
        ("not really", "no"),
        ("(no)", "no"),  # 'no' within the first 4 characters
        ('"yes"', "yes"),
        ("snow", "no"),  # calculation.py's substring test, quirk kept
        ("I am not sure", "other"),
        ("There is no dog", "other"),  # 'no' only after the first 4 characters
        ("", "other"),
    ],
)
def test_parse_mme_answer_matches_calculation_py(text, expected):
    assert parse_mme_answer(text) == expected


def test_acc_acc_plus_and_scores_by_hand(questions):
    report = MME.score(questions, PREDICTIONS)

    existence = report["per_category"]["existence"]
    assert existence["acc"] == pytest.approx(75.0)  # 3 of 4 questions
    assert existence["acc_plus"] == pytest.approx(50.0)  # image 1 of images 1, 2 has both right
    assert existence["score"] == pytest.approx(125.0)

    ocr = report["per_category"]["OCR"]
    assert (ocr["acc"], ocr["acc_plus"], ocr["score"]) == (50.0, 0.0, 50.0)

    code = report["per_category"]["code_reasoning"]
    assert (code["acc"], code["acc_plus"], code["score"]) == (100.0, 100.0, 200.0)

    overall = report["overall"]
    assert overall["perception_score"] == pytest.approx(125.0 + 50.0)
    assert overall["cognition_score"] == pytest.approx(200.0)
    assert overall["total_score"] == pytest.approx(375.0)
    assert overall["acc"] == pytest.approx(100 * 6 / 8)  # pooled over all subtasks
    assert overall["acc_plus"] == pytest.approx(100 * 2 / 4)  # images 1 and 4
    assert "score" not in overall
    assert (report["num_scored"], report["num_missing"]) == (8, 0)


def test_image_with_a_missing_answer_is_left_out_of_acc_plus(questions):
    predictions = dict(PREDICTIONS)
    del predictions["existence/1.jpg#no"]

    existence = MME.score(questions, predictions)["per_category"]["existence"]

    assert existence["acc"] == pytest.approx(100 * 2 / 3)  # 2 of the 3 answered questions
    assert existence["acc_plus"] == 0.0  # only image 2 is complete, and it has 1 of 2 right
    assert (existence["num_scored"], existence["num_missing"]) == (3, 1)


def test_loader_normalises_answers_and_adds_the_instruction(questions):
    first = questions[0]
    assert first.answer == "yes"
    assert first.category == "existence"
    assert first.prompt == (
        "Is it 1.jpg? Please answer yes or no.\nAnswer the question using a single word or phrase."
    )


def test_unknown_subtask_is_reported(tmp_path):
    rows = pair("existance", "1.jpg")
    path = write_questions(tmp_path / "mme.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path}:1: unknown MME subtask 'existance'"):
        MME.load_questions(path)


def test_answer_must_be_yes_or_no(tmp_path):
    rows = pair("count", "1.jpg")
    rows[1]["answer"] = "Maybe"
    path = write_questions(tmp_path / "mme.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path}:2: field 'answer' must be 'Yes' or 'No'"):
        MME.load_questions(path)
