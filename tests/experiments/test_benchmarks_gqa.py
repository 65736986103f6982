"""GQA: LLaVA's prediction normalisation (strip, trailing periods, lowercase) and exact match."""

import json

import pytest

from experiments.benchmarks import get_benchmark
from experiments.benchmarks.gqa import normalize_gqa_prediction

GQA = get_benchmark("gqa")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("Dog", "dog"),
        ("  dog \n", "dog"),
        ("dog...", "dog"),
        ("Left", "left"),
        ("a dog.", "a dog"),  # articles are kept
        ("dog!", "dog!"),  # only periods are stripped
        ("U.S.", "u.s"),
        ("t-shirt", "t-shirt"),
    ],
)
def test_normalize_gqa_prediction(text, expected):
    assert normalize_gqa_prediction(text) == expected


def test_exact_match_accuracy_per_category(tmp_path):
    rows = [
        {
            "question_id": "1",
            "image": "n1.jpg",
            "text": "What animal is it?",
            "answer": "dog",
            "category": "query",
        },
        {
            "question_id": "2",
            "image": "n1.jpg",
            "text": "Is it black?",
            "answer": "yes",
            "category": "verify",
        },
        {
            "question_id": "3",
            "image": "n2.jpg",
            "text": "What is on the table?",
            "answer": "laptop",
            "category": "query",
        },
        {
            "question_id": "4",
            "image": "n2.jpg",
            "text": "Which side is the cup on?",
            "answer": "left",
            "category": "query",
        },
        {"question_id": "5", "image": "n3.jpg", "text": "How many?", "answer": "2", "category": "verify"},
    ]
    path = tmp_path / "gqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions = GQA.load_questions(path)
    predictions = {
        "1": "Dog.",  # right after normalisation
        "2": "Yes",  # right
        "3": "a laptop",  # wrong: GQA does not remove articles
        "4": "Left.",  # right
        # "5" missing
    }

    report = GQA.score(questions, predictions)

    assert report["overall"]["accuracy"] == pytest.approx(3 / 4)
    assert report["per_category"]["query"]["accuracy"] == pytest.approx(2 / 3)
    assert report["per_category"]["verify"]["accuracy"] == 1.0
    assert report["per_category"]["verify"]["num_missing"] == 1
    assert (report["num_scored"], report["num_missing"]) == (4, 1)
    assert questions[0].prompt == "What animal is it?\nAnswer the question using a single word or phrase."


def test_without_categories_only_overall_is_reported(tmp_path):
    path = tmp_path / "gqa.jsonl"
    path.write_text(
        json.dumps({"question_id": 9, "image": "n.jpg", "text": "Color?", "answer": "red"}) + "\n"
    )
    (question,) = GQA.load_questions(path)
    assert (question.question_id, question.category) == ("9", "")
    report = GQA.score([question], {"9": "Red"})
    assert report["per_category"] == {}
    assert report["overall"]["accuracy"] == 1.0
