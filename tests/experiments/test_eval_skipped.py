"""Skipped questions on the trained testbed checkpoint: bad images and prompts the model cannot take
are left out of every metric, counted and named, and the rest of the run completes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from experiments import eval as eval_lib
from experiments.benchmarks import get_benchmark
from experiments.benchmarks.io import read_predictions
from models.engine import LlavaEngine

pytestmark = pytest.mark.slow  # end to end: generates with the testbed model

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "testbed"
NUM_QUESTIONS = 8  # the checkpoint answers the first 8 test questions right (reference_answers.json)


class RecordingEngine:
    """The real engine, with every model call noted in `events` (to see what ran before it)."""

    def __init__(self, engine, events: list):
        self._engine, self.events = engine, events

    answer_stream = LlavaEngine.answer_stream  # its prepare and run are this wrapper's

    def prepare(self, images, questions, **kwargs):
        self.events.append(("answer", list(questions)))
        return self._engine.prepare(images, questions, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class EventHandler(logging.Handler):
    def __init__(self, events: list):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record):
        self.events.append(("log", record.getMessage()))


@pytest.fixture(scope="module")
def engine():
    return LlavaEngine.from_checkpoint(str(CHECKPOINT))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """An 8-question testbed split (two images, four questions each)."""
    from experiments.testbed.scenes import write_split

    directory = tmp_path_factory.mktemp("testbed") / "split"
    write_split(directory, "test", num_items=NUM_QUESTIONS, questions_per_image=4)
    return directory


def write_questions(directory: Path, records: list[dict]) -> None:
    (directory / "questions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def split_records(split: Path) -> list[dict]:
    return [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()]


def copy_split(split: Path, tmp_path: Path, records: list[dict]) -> Path:
    directory = tmp_path / "split"
    (directory / "images").mkdir(parents=True)
    for image in (split / "images").iterdir():
        (directory / "images" / image.name).write_bytes(image.read_bytes())
    write_questions(directory, records)
    return directory


def run_testbed(directory: Path, tmp_path: Path, engine, events: list | None = None) -> dict:
    config = eval_lib.EvalConfig(
        checkpoint=str(CHECKPOINT),
        benchmark="testbed",
        questions=str(directory),
        output_dir=str(tmp_path / "out"),
        methods=("none",),
        batch_size=4,
    )
    if events is None:
        return eval_lib.run(config, engine=engine)
    handler = EventHandler(events)
    logging.getLogger("experiments").addHandler(handler)
    try:
        return eval_lib.run(config, engine=RecordingEngine(engine, events))
    finally:
        logging.getLogger("experiments").removeHandler(handler)


def assert_left_out(result: dict, questions, skipped_ids: set[str], output: Path, benchmark) -> None:
    """Every metric is what the benchmark reports for the other questions alone."""
    kept = [q for q in questions if q.question_id not in skipped_ids]
    predictions = {
        qid: record["prediction"]
        for qid, record in read_predictions(output / result["predictions_file"]).items()
    }
    assert set(predictions) == {q.question_id for q in kept}
    assert result["metrics"] == benchmark.score(kept, predictions)
    assert result["num_skipped"] == len(skipped_ids) and result["num_missing"] == 0
    assert result["num_scored"] == len(kept)
    saved = json.loads((output / "results.json").read_text())
    assert saved["pairs"][next(iter(saved["pairs"]))]["skipped"] == result["skipped"]


def test_unpruned_testbed_with_one_missing_image_is_right_on_the_other_seven(split, engine, tmp_path):
    records = split_records(split)
    records[5] = {**records[5], "image": "absent.png"}
    directory = copy_split(split, tmp_path, records)

    results = run_testbed(directory, tmp_path, engine)

    (result,) = results["pairs"].values()
    assert result["primary"] == 1.0
    assert result["metrics"]["overall"] == {**result["metrics"]["overall"], "accuracy": 1.0, "count": 7}
    assert (result["num_scored"], result["num_skipped"], result["num_missing"]) == (7, 1, 0)
    (item,) = result["skipped"]
    assert item["question_id"] == records[5]["question_id"] and "absent.png" in item["reason"]
    assert sum(m["count"] for m in result["metrics"]["per_kind"].values()) == 7


def test_missing_and_unreadable_testbed_images_are_left_out_of_every_metric(split, engine, tmp_path):
    records = split_records(split)
    records[2] = {**records[2], "image": "absent.png"}
    records[6] = {**records[6], "image": "corrupt.png"}
    directory = copy_split(split, tmp_path, records)
    (directory / "images" / "corrupt.png").write_bytes(b"not a png")
    events: list = []

    results = run_testbed(directory, tmp_path, engine, events)

    (result,) = results["pairs"].values()
    reasons = {item["question_id"]: item["reason"] for item in result["skipped"]}
    missing_id, corrupt_id = records[2]["question_id"], records[6]["question_id"]
    assert set(reasons) == {missing_id, corrupt_id}
    assert reasons[missing_id].startswith("image file not found")
    assert reasons[corrupt_id].startswith("cannot read image")
    questions = get_benchmark("testbed").load_questions(directory)
    assert_left_out(result, questions, set(reasons), tmp_path / "out", get_benchmark("testbed"))
    assert result["primary"] == 1.0
    logged = [message for kind, message in events if kind == "log"]
    for question_id in reasons:
        assert any(question_id in message for message in logged)


def test_unusable_prompts_are_skipped_before_any_generation(split, engine, tmp_path):
    records = split_records(split)
    positions = engine.config.text.max_position_embeddings
    long_text = " ".join(["is"] * positions)
    records += [
        {**records[0], "question_id": "with-image-token", "text": "<image>\nIs there a red circle?"},
        {**records[1], "question_id": "too-long", "text": long_text},
    ]
    directory = copy_split(split, tmp_path, records)
    events: list = []

    results = run_testbed(directory, tmp_path, engine, events)

    (result,) = results["pairs"].values()
    reasons = {item["question_id"]: item["reason"] for item in result["skipped"]}
    assert set(reasons) == {"with-image-token", "too-long"}
    assert "<image>" in reasons["with-image-token"]
    assert (
        "prompt too long for the context" in reasons["too-long"] and f"> {positions}" in reasons["too-long"]
    )
    # Both are named on the console before the first model call, and never reach the model.
    first_answer = next(index for index, (kind, _) in enumerate(events) if kind == "answer")
    before = [message for kind, message in events[:first_answer] if kind == "log"]
    assert any("with-image-token" in message for message in before)
    assert any("too-long" in message for message in before)
    prompts = [prompt for kind, batch in events if kind == "answer" for prompt in batch]
    assert "<image>" not in "".join(prompts) and long_text not in prompts
    questions = get_benchmark("testbed").load_questions(directory)
    assert_left_out(result, questions, set(reasons), tmp_path / "out", get_benchmark("testbed"))
    assert result["primary"] == 1.0 and result["num_scored"] == NUM_QUESTIONS
