"""Tests of TestbedBenchmark: loading (with clear errors) and scoring of single-word answers."""

from __future__ import annotations

import json

import pytest

from experiments.benchmarks.testbed import Question, TestbedBenchmark, normalize_answer


def _write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


def _record(i, answer="yes", category="existence/random"):
    return dict(
        question_id=f"q{i}", image=f"img{i // 2}.png", text=f"Question {i}?", answer=answer, category=category
    )


def test_protocol_attributes():
    benchmark = TestbedBenchmark()
    assert benchmark.name == "testbed" and benchmark.primary_metric == "accuracy"
    assert 1 <= benchmark.max_new_tokens <= 8


def test_load_questions_from_file_or_directory(tmp_path):
    _write(tmp_path / "questions.jsonl", [_record(0), "\n", _record(1, "two", "counting")])
    questions = TestbedBenchmark().load_questions(tmp_path)
    assert questions == [
        Question("q0", "img0.png", "Question 0?", "yes", "existence/random"),
        Question("q1", "img0.png", "Question 1?", "two", "counting"),
    ]
    assert TestbedBenchmark().load_questions(str(tmp_path / "questions.jsonl")) == questions


def test_load_questions_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.jsonl"):
        TestbedBenchmark().load_questions(tmp_path)
    path = _write(tmp_path / "questions.jsonl", [_record(0), _record(1), '{"question_id": "q2", \n'])
    with pytest.raises(ValueError, match=r"questions\.jsonl:3: invalid JSON"):
        TestbedBenchmark().load_questions(path)
    bad = dict(_record(0))
    del bad["answer"]
    _write(path, [bad])
    with pytest.raises(ValueError, match=r"questions\.jsonl:1: missing field\(s\) answer"):
        TestbedBenchmark().load_questions(path)
    _write(path, [_record(0), _record(0)])
    with pytest.raises(ValueError, match=r":2: duplicate question_id"):
        TestbedBenchmark().load_questions(path)


def test_normalize_answer():
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("  Two, I think") == "two"
    assert normalize_answer("no,it is not") == "no"
    assert normalize_answer("RED!") == "red"
    assert normalize_answer("...") == "" and normalize_answer("") == ""


def test_score_hand_built_predictions():
    questions = [
        Question("e1", "a.png", "?", "yes", "existence/random"),
        Question("e2", "a.png", "?", "no", "existence/random"),
        Question("e3", "b.png", "?", "no", "existence/adversarial"),
        Question("c1", "b.png", "?", "two", "counting"),
        Question("a1", "c.png", "?", "red", "attribute"),
        Question("p1", "c.png", "?", "yes", "position"),
    ]
    predictions = {"e1": "Yes.", "e2": "yes", "e3": "No", "c1": "two objects", "a1": "Blue", "extra": "yes"}
    result = TestbedBenchmark().score(questions, predictions)
    assert result["num_scored"] == 5 and result["num_missing"] == 1
    assert result["overall"]["accuracy"] == pytest.approx(3 / 6) and result["overall"]["count"] == 6
    per_category = result["per_category"]
    assert per_category["existence/random"]["accuracy"] == pytest.approx(0.5)
    assert per_category["existence/random"]["count"] == 2
    assert per_category["existence/random"]["yes_ratio"] == pytest.approx(1.0)
    assert per_category["existence/random"]["precision"] == pytest.approx(0.5)
    assert per_category["existence/random"]["recall"] == pytest.approx(1.0)
    assert per_category["existence/adversarial"] == dict(
        accuracy=1.0, count=1, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0
    )
    assert per_category["counting"] == {"accuracy": 1.0, "count": 1}
    assert per_category["attribute"] == {"accuracy": 0.0, "count": 1}
    assert per_category["position"]["accuracy"] == 0.0  # missing counts as wrong
    per_kind = result["per_kind"]
    assert per_kind["existence"]["accuracy"] == pytest.approx(2 / 3) and per_kind["existence"]["count"] == 3
    assert set(per_kind) == {"existence", "counting", "attribute", "position"}
