"""TextVQA: the EvalAI answer normalisation and the leave-one-out soft accuracy, by hand."""

import json

import pytest

from experiments.benchmarks import get_benchmark
from experiments.benchmarks.textvqa import normalize_vqa_answer, vqa_accuracy

TEXTVQA = get_benchmark("textvqa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a dog.", "dog"),  # article removed, final period stripped
        ("The Cat", "cat"),
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("dont", "don't"),  # contractions table
        ("couldnt've", "couldn't've"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # commas are dropped first
        ("coca-cola", "coca cola"),  # '-' not next to a space becomes a space
        ("coca - cola", "coca cola"),  # next to a space it is deleted
        ("yes!", "yes"),
        ("what?", "what"),
        ("Nike's", "nike 's"),
        ("  STOP\n", "stop"),
        ("e.g. this", "eg this"),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_two_of_ten_answers_matching_scores_six_tenths():
    # The metric averages, over the 10 subsets that leave one human answer out, min(1, matches/3).
    # With 2 matching answers: leaving out one of the 2 matching answers leaves 1 match -> 1/3
    # (2 such subsets); leaving out one of the 8 others leaves 2 matches -> 2/3 (8 subsets).
    # Mean: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6.
    answers = ["dog", "Dog."] + ["cat"] * 8
    assert vqa_accuracy("a dog.", answers) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("num_matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 1 subset with 0 matches, 9 with 1: (9 * 1/3) / 10
        (3, 0.9),  # 3 subsets with 2 matches, 7 with 3: (3 * 2/3 + 7) / 10
        (4, 1.0),  # every subset keeps at least 3 matches
        (10, 1.0),
    ],
)
def test_soft_accuracy_by_number_of_matching_answers(num_matching, expected):
    answers = ["coke"] * num_matching + ["pepsi"] * (10 - num_matching)
    assert vqa_accuracy("Coke", answers) == pytest.approx(expected)


def test_score_averages_item_accuracies(tmp_path):
    rows = [
        {"question_id": 1, "image": "a.jpg", "text": "What brand?", "answers": ["nike"] * 2 + ["adidas"] * 8},
        {"question_id": 2, "image": "b.jpg", "text": "What number?", "answers": ["2"] * 10},
        {"question_id": 3, "image": "c.jpg", "text": "What word?", "answers": ["stop"] * 10},
    ]
    path = tmp_path / "textvqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions = TEXTVQA.load_questions(path)
    report = TEXTVQA.score(questions, {"1": "Nike", "2": "two"})
    assert report["overall"]["accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert (report["num_scored"], report["num_missing"]) == (2, 1)
    assert questions[0].answer == ("nike", "nike") + ("adidas",) * 8
    assert questions[0].prompt == "What brand?\nAnswer the question using a single word or phrase."


def test_answers_must_be_ten_strings(tmp_path):
    path = tmp_path / "textvqa.jsonl"
    path.write_text(
        json.dumps({"question_id": 1, "image": "a.jpg", "text": "Q?", "answers": ["x"] * 9}) + "\n"
    )
    with pytest.raises(ValueError, match=rf"{path}:1: field 'answers' must hold 10 human answers, got 9"):
        TEXTVQA.load_questions(path)
    path.write_text(
        json.dumps({"question_id": 1, "image": "a.jpg", "text": "Q?", "answers": [1] * 10}) + "\n"
    )
    with pytest.raises(ValueError, match="list of strings"):
        TEXTVQA.load_questions(path)
