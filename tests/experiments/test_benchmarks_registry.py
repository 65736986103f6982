"""The uniform interface shared by all benchmarks: registry, protocol, loader errors, empty runs."""

import json

import pytest

from experiments.benchmarks import BENCHMARKS, Benchmark, Question, get_benchmark

# One valid question line per benchmark, and the file name its loader expects.
VALID_ROWS = {
    "pope": (
        "coco_pope_random.json",
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    ),
    "mme": (
        "mme.jsonl",
        {
            "question_id": "existence/1.jpg#0",
            "image": "existence/1.jpg",
            "text": "Is there a dog in this image? Please answer yes or no.",
            "answer": "Yes",
            "category": "existence",
        },
    ),
    "gqa": (
        "gqa.jsonl",
        {"question_id": "201", "image": "n1.jpg", "text": "What animal is it?", "answer": "dog"},
    ),
    "textvqa": (
        "textvqa.jsonl",
        {"question_id": 5, "image": "t.jpg", "text": "What brand is it?", "answers": ["nike"] * 10},
    ),
    "scienceqa": (
        "scienceqa.jsonl",
        {
            "question_id": "7",
            "image": "7/image.png",
            "question": "Which is a mammal?",
            "choices": ["dog", "fish"],
            "answer": 0,
        },
    ),
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_registry_holds_the_five_benchmarks_under_their_names():
    assert sorted(BENCHMARKS) == ["gqa", "mme", "pope", "scienceqa", "textvqa"]
    for name, benchmark in BENCHMARKS.items():
        assert benchmark.name == name
        assert get_benchmark(name) is benchmark


def test_get_benchmark_is_case_insensitive():
    assert get_benchmark(" POPE ") is BENCHMARKS["pope"]


def test_unknown_benchmark_error_lists_known_names():
    with pytest.raises(ValueError) as error:
        get_benchmark("vqav2")
    message = str(error.value)
    assert "vqav2" in message
    for name in BENCHMARKS:
        assert name in message


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_satisfies_protocol(name):
    benchmark = BENCHMARKS[name]
    assert isinstance(benchmark, Benchmark)
    assert isinstance(benchmark.max_new_tokens, int) and 1 <= benchmark.max_new_tokens <= 64
    assert isinstance(benchmark.primary_metric, str)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_loads_a_valid_line_into_a_question(name, tmp_path):
    file_name, row = VALID_ROWS[name]
    path = write_lines(tmp_path / file_name, [json.dumps(row), ""])  # a trailing blank line is fine
    (question,) = BENCHMARKS[name].load_questions(path)
    assert isinstance(question, Question)
    assert isinstance(question.question_id, str)
    assert question.image == row["image"]
    assert question.prompt.startswith(row.get("question", row.get("text")))


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_empty_predictions_give_defined_zero_metrics(name, tmp_path):
    file_name, row = VALID_ROWS[name]
    second = {**row, "question_id": 2 if isinstance(row["question_id"], int) else row["question_id"] + "b"}
    benchmark = BENCHMARKS[name]
    questions = benchmark.load_questions(
        write_lines(tmp_path / file_name, [json.dumps(row), json.dumps(second)])
    )

    report = benchmark.score(questions, {})

    assert report["num_scored"] == 0
    assert report["num_missing"] == 2
    assert report["overall"][benchmark.primary_metric] == 0.0
    for metrics in [report["overall"], *report["per_category"].values()]:
        assert metrics["num_scored"] == 0
        assert all(value == 0 for key, value in metrics.items() if key != "num_missing")


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_missing_file_error_names_the_file(name, tmp_path):
    missing = tmp_path / VALID_ROWS[name][0]
    with pytest.raises(FileNotFoundError, match=str(missing)):
        BENCHMARKS[name].load_questions(missing)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
@pytest.mark.parametrize(
    ("bad_line", "expected_message"),
    [
        ('{"question_id": 3, "image": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ("{}", "missing field 'question_id'"),
    ],
)
def test_malformed_line_error_names_file_and_line(name, bad_line, expected_message, tmp_path):
    file_name, row = VALID_ROWS[name]
    path = write_lines(tmp_path / file_name, [json.dumps(row), bad_line])
    with pytest.raises(ValueError) as error:
        BENCHMARKS[name].load_questions(path)
    assert f"{path}:2" in str(error.value)
    assert expected_message in str(error.value)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_missing_required_field_is_reported(name, tmp_path):
    file_name, row = VALID_ROWS[name]
    path = write_lines(tmp_path / file_name, [json.dumps({k: v for k, v in row.items() if k != "image"})])
    with pytest.raises(ValueError, match=rf"{path}:1: missing field 'image'"):
        BENCHMARKS[name].load_questions(path)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_duplicate_question_id_names_both_lines(name, tmp_path):
    file_name, row = VALID_ROWS[name]
    path = write_lines(tmp_path / file_name, [json.dumps(row), json.dumps(row)])
    with pytest.raises(ValueError, match=rf"{path}:2: duplicate question_id .*first at {path}:1"):
        BENCHMARKS[name].load_questions(path)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_empty_question_file_is_an_error(name, tmp_path):
    path = write_lines(tmp_path / VALID_ROWS[name][0], [""])
    with pytest.raises(ValueError, match="no questions"):
        BENCHMARKS[name].load_questions(path)


def test_wrong_field_type_is_reported(tmp_path):
    path = write_lines(tmp_path / "gqa.jsonl", [json.dumps({**VALID_ROWS["gqa"][1], "answer": 3})])
    with pytest.raises(ValueError, match=rf"{path}:1: field 'answer' must be str, got 3"):
        get_benchmark("gqa").load_questions(path)


def test_non_string_prediction_is_rejected(tmp_path):
    file_name, row = VALID_ROWS["gqa"]
    questions = get_benchmark("gqa").load_questions(write_lines(tmp_path / file_name, [json.dumps(row)]))
    with pytest.raises(TypeError, match="'201'"):
        get_benchmark("gqa").score(questions, {"201": None})


def test_predictions_for_unknown_ids_are_ignored(tmp_path):
    file_name, row = VALID_ROWS["gqa"]
    questions = get_benchmark("gqa").load_questions(write_lines(tmp_path / file_name, [json.dumps(row)]))
    report = get_benchmark("gqa").score(questions, {"201": "dog", "999": "cat"})
    assert report["overall"]["accuracy"] == 1.0
    assert (report["num_scored"], report["num_missing"]) == (1, 0)
