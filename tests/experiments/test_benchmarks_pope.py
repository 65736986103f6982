"""POPE: eval_pope.py's answer parsing, hand-computed metrics, the three ways to give the splits,
and the real question files in /work/shared/data/pope."""

import json
from pathlib import Path

import pytest

from experiments.benchmarks import get_benchmark
from experiments.benchmarks.pope import parse_pope_answer

POPE = get_benchmark("pope")
POPE_DATA = Path("/work/shared/data/pope")
INSTRUCTION = "\nAnswer the question using a single word or phrase."


def write_split(directory, split, labels, first_id=1):
    rows = [
        {
            "question_id": first_id + i,
            "image": f"img{i // 2}.jpg",
            "text": f"Is there a thing {i} in the image?",
            "label": label,
        }
        for i, label in enumerate(labels)
    ]
    path = directory / f"coco_pope_{split}.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a car.", "yes"),
        ("No, there is not.", "no"),
        ("No, there is not", "no"),
        ("no,", "no"),  # comma removed, then 'no' is a word
        ("No.", "no"),
        ("There is no car in the image.", "no"),
        ("Yes", "yes"),
        ("yes\n", "yes"),
        ("  No", "no"),  # LLaVA strips the decoded text first
        ("I see a dog. It is not a cat.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # not one of the three words
        ("Not at all", "yes"),  # 'Not' is not in eval_pope.py's list: case matters
        ("NO", "yes"),
        ("", "yes"),  # anything unparseable counts as yes, as in the original
    ],
)
def test_parse_pope_answer_matches_eval_pope(text, expected):
    assert parse_pope_answer(text) == expected


def test_metrics_per_split_and_pooled_by_hand(tmp_path):
    write_split(tmp_path, "random", ["yes", "yes", "yes", "no", "no", "no"])
    write_split(tmp_path, "popular", ["yes", "no"])
    questions = POPE.load_questions(tmp_path)
    predictions = {
        "random/1": "Yes, there is a car.",  # yes on yes: TP
        "random/2": "Yes.",  # TP
        "random/3": "No, there is not",  # no on yes: FN
        "random/4": "no,",  # TN
        "random/5": "I think so. It is not clear.",  # first sentence has no negation -> yes: FP
        "random/6": "Nope",  # yes: FP
        "popular/1": "yes",  # TP; popular/2 has no prediction
    }

    report = POPE.score(questions, predictions)

    # random: TP 2, FN 1, TN 1, FP 2.
    random = report["per_category"]["random"]
    assert (random["tp"], random["fn"], random["tn"], random["fp"]) == (2, 1, 1, 2)
    assert random["accuracy"] == pytest.approx(3 / 6)
    assert random["precision"] == pytest.approx(2 / 4)
    assert random["recall"] == pytest.approx(2 / 3)
    assert random["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # = 4/7
    assert random["f1"] == pytest.approx(4 / 7)
    assert random["yes_ratio"] == pytest.approx(4 / 6)
    assert (random["num_scored"], random["num_missing"]) == (6, 0)

    popular = report["per_category"]["popular"]
    assert (popular["accuracy"], popular["precision"], popular["recall"], popular["f1"]) == (
        1.0,
        1.0,
        1.0,
        1.0,
    )
    assert (popular["num_scored"], popular["num_missing"]) == (1, 1)

    # Pooled over both splits: TP 3, FN 1, TN 1, FP 2.
    overall = report["overall"]
    assert overall["accuracy"] == pytest.approx(4 / 7)
    assert overall["precision"] == pytest.approx(3 / 5)
    assert overall["recall"] == pytest.approx(3 / 4)
    assert overall["f1"] == pytest.approx(2 / 3)
    assert overall["yes_ratio"] == pytest.approx(5 / 7)
    assert (report["num_scored"], report["num_missing"]) == (7, 1)


def test_no_predicted_yes_gives_zero_precision_and_f1(tmp_path):
    questions = POPE.load_questions(write_split(tmp_path, "adversarial", ["yes", "no"]))
    report = POPE.score(questions, {"adversarial/1": "No.", "adversarial/2": "No, there is not."})
    overall = report["overall"]
    assert (overall["precision"], overall["recall"], overall["f1"], overall["yes_ratio"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert overall["accuracy"] == 0.5


def test_loading_ids_prompts_and_categories(tmp_path):
    (question,) = POPE.load_questions(write_split(tmp_path, "random", ["no"], first_id=42))
    assert question.question_id == "random/42"
    assert question.category == "random"
    assert question.answer == "no"
    assert question.image == "img0.jpg"
    assert question.prompt == "Is there a thing 0 in the image?" + INSTRUCTION


def test_instruction_already_in_the_text_is_not_repeated(tmp_path):
    row = {
        "question_id": 1,
        "image": "a.jpg",
        "text": "Is there a dog in the image?" + INSTRUCTION,
        "label": "Yes",
    }
    path = tmp_path / "coco_pope_random.json"
    path.write_text(json.dumps(row) + "\n")
    (question,) = POPE.load_questions(path)
    assert question.prompt == row["text"]
    assert question.answer == "yes"


def test_splits_from_directory_or_comma_separated_list_give_the_same_questions(tmp_path):
    random_file = write_split(tmp_path, "random", ["yes", "no"])
    popular_file = write_split(tmp_path, "popular", ["no", "yes"])
    from_directory = POPE.load_questions(tmp_path)
    from_list = POPE.load_questions(f"{popular_file}, {random_file}")
    assert sorted(from_directory, key=lambda q: q.question_id) == sorted(
        from_list, key=lambda q: q.question_id
    )
    assert {q.question_id for q in from_directory} == {"random/1", "random/2", "popular/1", "popular/2"}


def test_bad_label_is_reported_with_its_line(tmp_path):
    path = write_split(tmp_path, "random", ["yes", "maybe"])
    with pytest.raises(ValueError, match=rf"{path}:2: field 'label' must be 'yes' or 'no', got 'maybe'"):
        POPE.load_questions(path)


def test_directory_without_question_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.json"):
        POPE.load_questions(tmp_path)


def test_missing_file_in_comma_separated_list_is_named(tmp_path):
    random_file = write_split(tmp_path, "random", ["yes"])
    missing = tmp_path / "coco_pope_popular.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        POPE.load_questions(f"{random_file},{missing}")


@pytest.mark.skipif(not POPE_DATA.is_dir(), reason="POPE question files not available")
def test_real_pope_files_load_and_score_a_hand_built_prediction_set():
    questions = POPE.load_questions(POPE_DATA)

    by_split = {
        split: [q for q in questions if q.category == split] for split in ("random", "popular", "adversarial")
    }
    assert len(questions) == 9000
    for split_questions in by_split.values():
        assert len(split_questions) == 3000
        assert sum(q.answer == "yes" for q in split_questions) == 1500
        assert len({q.image for q in split_questions}) == 500
    assert all(q.prompt.endswith(INSTRUCTION) for q in questions)
    assert questions[0].image.startswith("COCO_val2014_")

    # random: always right; popular: always "Yes"; adversarial: always "No, there is not."
    predictions = {q.question_id: q.answer.capitalize() + "." for q in by_split["random"]}
    predictions |= {q.question_id: "Yes" for q in by_split["popular"]}
    predictions |= {q.question_id: "No, there is not." for q in by_split["adversarial"]}
    report = POPE.score(questions, predictions)

    per_split = report["per_category"]
    assert per_split["random"]["f1"] == 1.0 and per_split["random"]["accuracy"] == 1.0
    # popular: TP 1500, FP 1500 -> precision 1/2, recall 1, f1 2/3
    assert per_split["popular"]["f1"] == pytest.approx(2 / 3)
    assert per_split["popular"]["yes_ratio"] == 1.0
    # adversarial: nothing predicted yes -> precision, recall and f1 0, accuracy 1/2
    assert per_split["adversarial"]["f1"] == 0.0
    assert per_split["adversarial"]["accuracy"] == 0.5
    # pooled: TP 3000, FP 1500, TN 3000, FN 1500 -> every ratio 2/3, yes_ratio 1/2
    overall = report["overall"]
    assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (3000, 1500, 3000, 1500)
    for metric in ("accuracy", "precision", "recall", "f1"):
        assert overall[metric] == pytest.approx(2 / 3)
    assert overall["yes_ratio"] == pytest.approx(0.5)
    assert (report["num_scored"], report["num_missing"]) == (9000, 0)
