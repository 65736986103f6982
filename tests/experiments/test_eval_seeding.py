"""Random pruning seeded per question: the same answers and kept tokens at any batch size, and a
resume with another batch size gives the uninterrupted run's file (testbed checkpoint, CPU).

The runs go through the per-pair generation loop (`run_pair`, what `experiments.eval` runs for each
pair) for the random pair alone: the unpruned pair a whole eval run adds has no seed to test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import eval as eval_lib
from experiments.benchmarks import get_benchmark
from experiments.benchmarks.io import read_predictions
from experiments.evaluation.generation import predictions_path, run_pair
from experiments.evaluation.inputs import ImageLoader, image_resolver, load_question_list
from experiments.evaluation.pairs import build_pairs
from models.engine import LlavaEngine
from tests.helpers import once_per_session

pytestmark = pytest.mark.slow  # end to end: generates with the testbed model

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "testbed"
NUM_QUESTIONS = 16


@pytest.fixture(scope="module")
def engine():
    return LlavaEngine.from_checkpoint(str(CHECKPOINT))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    from experiments.testbed.scenes import write_split

    directory = tmp_path_factory.mktemp("testbed") / "split"
    write_split(directory, "test", num_items=NUM_QUESTIONS, questions_per_image=4)
    return directory


def _run(split, output_dir, engine, batch_size, limit=None):
    """Generate the random pair's answers at `batch_size` (the first `limit` questions) into
    output_dir, resuming whatever its prediction file holds; returns the file's records."""
    config = eval_lib.EvalConfig(
        checkpoint=str(CHECKPOINT),
        benchmark="testbed",
        questions=str(split),
        output_dir=str(output_dir),
        methods=("random",),
        keep=(32,),
        batch_size=batch_size,
        limit=limit,
    )
    benchmark = get_benchmark(config.benchmark)
    questions = load_question_list(benchmark, config.questions, config.limit)
    model = engine.config
    unpruned, pair = build_pairs(config, model.num_image_tokens, model.text.num_layers, model.image_layout())
    assert (unpruned.method, pair.method, pair.keep) == ("none", "random", 32)
    loader = ImageLoader(image_resolver(benchmark, config))
    try:
        progress = run_pair(
            engine,
            pair,
            questions,
            loader,
            config,
            benchmark.max_new_tokens,
            record_kept_ids={question.question_id for question in questions},
        )
    finally:
        loader.close()
    assert not progress.skipped
    return read_predictions(predictions_path(str(output_dir), pair))


def _answers(records):
    return {qid: (record["prediction"], tuple(record["kept"])) for qid, record in records.items()}


@pytest.fixture(scope="module")
def by_batch(split, engine, tmp_path_factory):
    """Random pruning's answers and kept tokens at batch sizes 1, 8 and 16 (the whole split)."""

    def compute():
        root = tmp_path_factory.mktemp("seeding")
        return {
            str(size): {
                qid: [text, list(kept)]
                for qid, (text, kept) in _answers(_run(split, root / f"b{size}", engine, size)).items()
            }
            for size in (1, 8, 16)
        }

    stored = once_per_session(tmp_path_factory, "seeding_by_batch", compute)  # as JSON
    return {
        int(size): {qid: (text, tuple(kept)) for qid, (text, kept) in answers.items()}
        for size, answers in stored.items()
    }


def test_random_answers_do_not_depend_on_the_batch_size(by_batch):
    assert len(by_batch[1]) == NUM_QUESTIONS
    assert by_batch[1] == by_batch[8] == by_batch[16]
    kept = [kept for _, kept in by_batch[1].values()]
    assert len(set(kept)) == NUM_QUESTIONS  # each question draws its own tokens


def test_a_resume_with_another_batch_size_gives_the_uninterrupted_answers(split, engine, by_batch, tmp_path):
    assert len(_run(split, tmp_path / "resumed", engine, 8, limit=6)) == 6  # "killed" after 6 questions
    resumed = _answers(_run(split, tmp_path / "resumed", engine, 16))
    assert resumed == by_batch[8]
