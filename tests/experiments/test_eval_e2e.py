"""End to end: `experiments.eval.run` on real POPE question lines with stand-in images and a tiny model.

One tiny checkpoint and one loaded engine serve the whole module (jit compiles once per pair), and
the main run is shared by the output and resume tests. Images are random RGB at several aspect
ratios, named as the POPE lines expect, so the loader, LLaVA's pad-to-square preprocessing and the
overlays see the shapes real COCO images have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from adaptprune_jax import methods
from adaptprune_jax.methods.base import DEFAULT_LAYER
from experiments import eval as eval_lib
from experiments.benchmarks import get_benchmark
from experiments.benchmarks.io import read_predictions
from models.engine import LlavaEngine
from tests.helpers import InterruptAfter

pytestmark = pytest.mark.slow  # end to end: generates with a tiny model for every pair

POPE_DIR = Path("/work/shared/data/pope")
SPLITS = ("random", "popular")
QUESTIONS_PER_SPLIT = 3
METHODS = ("adaptprune", "fastv")
KEEPS = (64, 16)
BATCH_SIZE = 4  # 6 questions -> one full batch and one padded batch
MAX_NEW_TOKENS = 6  # random weights never stop early; a few tokens keep the test fast
# (height, width): wide, tall, square, small and very wide, as COCO images come.
IMAGE_SHAPES = ((240, 320), (360, 200), (300, 300), (120, 160), (150, 400), (333, 250))


def pope_lines(split: str, count: int) -> list[str]:
    """The first `count` lines of a POPE split whose images are all different."""
    lines, images = [], set()
    with open(POPE_DIR / f"coco_pope_{split}.json") as file:
        for line in file:
            image = json.loads(line)["image"]
            if image not in images:
                images.add(image)
                lines.append(line)
            if len(lines) == count:
                break
    return lines


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    """A POPE question folder (two split files, real lines) and an image folder of stand-ins."""
    if not POPE_DIR.is_dir():
        pytest.skip(f"POPE question files not found at {POPE_DIR}")
    root = tmp_path_factory.mktemp("pope")
    questions_dir, image_dir = root / "questions", root / "images"
    questions_dir.mkdir()
    image_dir.mkdir()
    names = []
    for split in SPLITS:
        lines = pope_lines(split, QUESTIONS_PER_SPLIT)
        (questions_dir / f"coco_pope_{split}.json").write_text("".join(lines))
        names += [json.loads(line)["image"] for line in lines]
    rng = np.random.default_rng(0)
    for index, name in enumerate(dict.fromkeys(names)):
        height, width = IMAGE_SHAPES[index % len(IMAGE_SHAPES)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels)
        if index == 1:
            image = image.convert("L")  # a grayscale JPEG, which LLaVA converts to RGB
        image.save(image_dir / name, format="JPEG")
    return questions_dir, image_dir


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return LlavaEngine.from_checkpoint(tiny_checkpoints("tiny").directory)


@pytest.fixture(scope="module")
def base_config(tiny_checkpoints, pope_data, tmp_path_factory):
    questions_dir, image_dir = pope_data
    return eval_lib.EvalConfig(
        checkpoint=tiny_checkpoints("tiny").directory,
        benchmark="pope",
        questions=str(questions_dir),
        image_dir=str(image_dir),
        output_dir=str(tmp_path_factory.mktemp("run") / "out"),
        methods=METHODS,
        keep=KEEPS,
        batch_size=BATCH_SIZE,
        max_new_tokens=MAX_NEW_TOKENS,
    )


@pytest.fixture(scope="module")
def full_run(base_config, engine):
    """The uninterrupted run every other test compares against."""
    return base_config, eval_lib.run(base_config, engine=engine)


def pair_names(num_image_tokens: int) -> list[str]:
    return [f"none_{num_image_tokens}"] + [f"{method}_{keep}" for method in METHODS for keep in KEEPS]


def raw_ids(path) -> list[str]:
    """Question ids of every complete line, duplicates included (read_predictions would merge them)."""
    return [json.loads(line)["question_id"] for line in Path(path).read_text().splitlines() if line.strip()]


def predictions_of(output_dir, name) -> dict[str, str]:
    records = read_predictions(Path(output_dir) / "predictions" / f"{name}.jsonl")
    return {question_id: record["prediction"] for question_id, record in records.items()}


def test_every_output_is_written_and_consistent(full_run, engine):
    config, results = full_run
    output = Path(config.output_dir)
    benchmark = get_benchmark("pope")
    questions = benchmark.load_questions(config.questions)
    num_image_tokens, num_layers = engine.config.num_image_tokens, engine.config.text.num_layers
    names = pair_names(num_image_tokens)
    assert len(questions) == len(SPLITS) * QUESTIONS_PER_SPLIT

    # predictions/: one line per question, each id once, kept indices where recorded.
    assert sorted(os.listdir(output / "predictions")) == sorted(f"{name}.jsonl" for name in names)
    for name in names:
        ids = raw_ids(output / "predictions" / f"{name}.jsonl")
        assert sorted(ids) == sorted(q.question_id for q in questions)
        for record in read_predictions(output / "predictions" / f"{name}.jsonl").values():
            assert {"question_id", "prediction", "answer", "category", "kept_count"} <= set(record)
            keep = int(name.rsplit("_", 1)[1])
            assert record["kept_count"] == keep
            if "kept" in record:
                assert not name.startswith("none")
                assert len(record["kept"]) == keep == len(set(record["kept"]))
                assert all(0 <= index < num_image_tokens for index in record["kept"])

    # results.json: what run() returned, every pair, numbers that re-scoring the files reproduces.
    on_disk = json.loads((output / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["benchmark"] == "pope" and on_disk["primary_metric"] == "f1"
    assert on_disk["num_questions"] == len(questions)
    assert list(on_disk["pairs"]) == names
    for name, result in on_disk["pairs"].items():
        rescored = benchmark.score(questions, predictions_of(output, name))
        assert result["metrics"] == json.loads(json.dumps(rescored))
        assert result["primary"] == rescored["overall"]["f1"]
        assert result["num_scored"] == len(questions) and result["num_skipped"] == 0
        assert set(result["metrics"]["per_category"]) == set(SPLITS)
        timing = result["timing"]
        assert timing["generated_this_run"] == len(questions)
        assert timing["images_per_second"] > 0 and timing["wall_seconds"] > 0
        if result["method"] == "none":
            assert result["keep"] == result["equivalent_tokens"] == num_image_tokens
        else:
            layer = result["layer"]
            assert result["equivalent_tokens"] == pytest.approx(
                (layer * num_image_tokens + (num_layers - layer) * result["keep"]) / num_layers
            )

    # results.md: a header and one row per pair, with the metric as printed percent.
    table = [line for line in (output / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method | keep | equivalent tokens | pope f1 (%)")
    rows = {
        (cells[0], int(cells[1])): cells
        for cells in (
            [cell.strip() for cell in line.strip("|").split("|")] for line in table[1 : len(names) + 1]
        )
    }
    for result in on_disk["pairs"].values():
        assert rows[(result["method"], result["keep"])][3] == f"{100 * result['primary']:.1f}"

    # The plot and one kept-token picture per distinct image (3 requested), all decodable.
    pictures = sorted((output / "kept_tokens").glob("*.png"))
    assert len(pictures) == config.num_overlays
    for path in [output / "accuracy_vs_tokens.png", *pictures]:
        with PIL.Image.open(path) as image:
            image.verify()
        assert path.stat().st_size > 1000


def assert_same_as_full_run(output_dir, full_output_dir, names):
    for name in names:
        ids = raw_ids(Path(output_dir) / "predictions" / f"{name}.jsonl")
        assert len(ids) == len(set(ids)), f"{name}: duplicate question ids {ids}"
        assert predictions_of(output_dir, name) == predictions_of(full_output_dir, name)
    resumed = json.loads((Path(output_dir) / "results.json").read_text())["pairs"]
    full = json.loads((Path(full_output_dir) / "results.json").read_text())["pairs"]
    for name in names:
        assert resumed[name]["metrics"] == full[name]["metrics"]


def test_interrupted_run_resumes_to_the_same_results(full_run, engine, tmp_path):
    config, _ = full_run
    names = pair_names(engine.config.num_image_tokens)
    interrupted = dataclasses.replace(config, output_dir=str(tmp_path / "out"))
    # Unpruned: 2 batches; the third call is the first batch of the second pair.
    with pytest.raises(KeyboardInterrupt):
        eval_lib.run(interrupted, engine=InterruptAfter(engine, calls=3))
    written = {path.stem: len(raw_ids(path)) for path in (tmp_path / "out" / "predictions").glob("*.jsonl")}
    assert written == {names[0]: 6, names[1]: BATCH_SIZE}
    assert not (tmp_path / "out" / "results.json").exists()

    calls = []
    counting = InterruptAfter(engine, calls=10**6)
    original = counting.run
    counting.run = lambda prepared: calls.append(1) or original(prepared)
    eval_lib.run(interrupted, engine=counting)
    # Only the unanswered work ran: 1 batch of the second pair and 2 of each of the other three.
    assert len(calls) == 1 + 2 * (len(names) - 2)
    assert_same_as_full_run(interrupted.output_dir, config.output_dir, names)


def test_half_written_and_lost_lines_are_redone(full_run, engine, tmp_path):
    config, _ = full_run
    names = pair_names(engine.config.num_image_tokens)
    output = tmp_path / "out"
    shutil.copytree(config.output_dir, output)
    damaged = output / "predictions" / f"{names[2]}.jsonl"
    lines = damaged.read_text().splitlines(keepends=True)
    # Keep two lines, then half of the third, as a kill during a write leaves it; the rest is lost.
    damaged.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])
    (output / "predictions" / f"{names[-1]}.jsonl").unlink()

    eval_lib.run(dataclasses.replace(config, output_dir=str(output)), engine=engine)

    assert_same_as_full_run(output, config.output_dir, names)
    results = json.loads((output / "results.json").read_text())["pairs"]
    assert results[names[2]]["timing"]["generated_this_run"] == len(lines) - 2
    # A pair with nothing left to do keeps the timing measured when its answers were made.
    full = json.loads((Path(config.output_dir) / "results.json").read_text())["pairs"]
    assert results[names[1]]["timing"] == full[names[1]]["timing"]


def test_missing_and_unreadable_images_are_skipped_with_reasons(base_config, pope_data, engine, tmp_path):
    questions_dir, image_dir = pope_data
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    questions = get_benchmark("pope").load_questions(questions_dir)
    # POPE splits share images, so a bad image costs every question asked about it.
    missing_image = questions[0].image
    unreadable_image = next(q.image for q in questions if q.image != missing_image)
    (images / missing_image).unlink()
    (images / unreadable_image).write_bytes(b"not a jpeg")
    expected = {q.question_id: q.image for q in questions if q.image in (missing_image, unreadable_image)}
    config = dataclasses.replace(
        base_config, image_dir=str(images), output_dir=str(tmp_path / "out"), methods=("fastv",), keep=(16,)
    )

    results = eval_lib.run(config, engine=engine)

    for result in results["pairs"].values():
        reasons = {item["question_id"]: item["reason"] for item in result["skipped"]}
        assert set(reasons) == set(expected)
        for question_id, image in expected.items():
            wanted = "image file not found" if image == missing_image else "cannot read image"
            assert reasons[question_id].startswith(wanted) and str(images / image) in reasons[question_id]
        assert result["num_skipped"] == len(expected)
        # Skipped questions are not missing answers: every metric is over the other questions alone.
        assert (result["num_scored"], result["num_missing"]) == (len(questions) - len(expected), 0)
        assert len(raw_ids(tmp_path / "out" / result["predictions_file"])) == len(questions) - len(expected)
        kept = [q for q in questions if q.question_id not in expected]
        predictions = predictions_of(tmp_path / "out", Path(result["predictions_file"]).stem)
        assert result["metrics"] == get_benchmark("pope").score(kept, predictions)
        assert all(m["num_missing"] == 0 for m in result["metrics"]["per_category"].values())
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["pairs"]["fastv_16"]["skipped"] == results["pairs"]["fastv_16"]["skipped"]


def test_testbed_split_runs_with_its_own_image_folder(tiny_checkpoints, engine, tmp_path):
    """The testbed benchmark is reachable by name and finds images beside its questions."""
    from experiments.testbed.scenes import write_split

    split = tmp_path / "testbed_test"
    write_split(split, "test", num_items=3, questions_per_image=4)
    config = eval_lib.EvalConfig(
        checkpoint=tiny_checkpoints("tiny").directory,
        benchmark="testbed",
        questions=str(split),
        output_dir=str(tmp_path / "out"),
        methods=("none",),
        batch_size=BATCH_SIZE,
    )
    results = eval_lib.run(config, engine=engine)
    (result,) = results["pairs"].values()
    assert results["primary_metric"] == "accuracy" and results["settings"]["max_new_tokens"] == 4
    assert result["num_scored"] == 3 and result["num_skipped"] == 0
    assert result["published"] == []


class CountingEngine:
    """The engine, counting generation calls."""

    def __init__(self, engine):
        self._engine = engine
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    answer_stream = LlavaEngine.answer_stream  # its prepare and run are this wrapper's

    def run(self, prepared):
        self.calls += 1
        return self._engine.run(prepared)


def test_rerun_reuses_matching_pairs_and_says_so(full_run, engine, tmp_path, caplog):
    """Another spelling of the checkpoint path, a copy of the checkpoint elsewhere and an explicit
    default layer decide nothing: the rerun generates nothing and says how many pairs it reused."""
    config, _ = full_run
    output = tmp_path / "out"
    shutil.copytree(config.output_dir, output)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(config.checkpoint, checkpoint)
    counting = CountingEngine(engine)
    rerun = dataclasses.replace(
        config, output_dir=str(output), checkpoint=str(checkpoint) + "/", layer=DEFAULT_LAYER
    )
    with caplog.at_level(logging.INFO, logger="experiments.evaluation.runner"):
        eval_lib.run(rerun, engine=counting)
    assert counting.calls == 0
    names = pair_names(engine.config.num_image_tokens)
    assert f"reused {len(names)} of {len(names)} pairs" in caplog.text
    assert_same_as_full_run(output, config.output_dir, names)


def test_resume_refused_after_the_weights_change_in_place(full_run, engine, tmp_path):
    from safetensors.numpy import load_file, save_file

    config, _ = full_run
    output = tmp_path / "out"
    shutil.copytree(config.output_dir, output)
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(config.checkpoint, checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    before = {path.name: path.read_bytes() for path in (output / "predictions").iterdir()}
    with pytest.raises(ValueError, match=r"checkpoint file model.safetensors changed.*--overwrite"):
        eval_lib.run(dataclasses.replace(config, output_dir=str(output), checkpoint=str(checkpoint)), engine)
    assert {path.name: path.read_bytes() for path in (output / "predictions").iterdir()} == before


def test_resume_refused_after_the_method_code_changes_and_overwrite_recomputes(full_run, engine, tmp_path):
    config, _ = full_run
    output = tmp_path / "out"
    shutil.copytree(config.output_dir, output)
    # As if fastv's file had been another one when these predictions were made.
    fingerprint_file = output / eval_lib.RUN_FINGERPRINT_JSON
    recorded = json.loads(fingerprint_file.read_text())
    module = type(methods.make_config("fastv")).__module__
    recorded["pairs"]["fastv_64"]["code"][module] = "0" * 64
    fingerprint_file.write_text(json.dumps(recorded))
    rerun = dataclasses.replace(config, output_dir=str(output), methods=("fastv",), keep=(64,))
    with pytest.raises(ValueError, match=rf"fastv_64: code of {module} changed"):
        eval_lib.run(rerun, engine=engine)

    counting = CountingEngine(engine)
    eval_lib.run(dataclasses.replace(rerun, overwrite=True), engine=counting)
    num_batches = -(-2 * QUESTIONS_PER_SPLIT // BATCH_SIZE)
    assert counting.calls == 2 * num_batches  # the unpruned pair and fastv_64, both recomputed
    assert_same_as_full_run(
        output, config.output_dir, [pair_names(engine.config.num_image_tokens)[0], "fastv_64"]
    )


def test_llava_next_checkpoint_through_the_evaluation(tiny_checkpoints, tmp_path):
    """A LLaVA-NeXT checkpoint evaluates without one image layout: the keep is checked against each
    batch's image-token counts, results.json records the most image tokens an image can take."""
    from experiments.testbed.scenes import write_split

    split = tmp_path / "testbed_test"
    write_split(split, "test", num_items=2, questions_per_image=2)
    checkpoint = tiny_checkpoints("tiny-next")
    config = eval_lib.EvalConfig(
        checkpoint=checkpoint.directory,
        benchmark="testbed",
        questions=str(split),
        output_dir=str(tmp_path / "out"),
        methods=("none", "fastv"),
        keep=(64,),
        batch_size=2,
        limit=2,
        max_new_tokens=2,
    )
    results = eval_lib.run(config, engine=LlavaEngine.from_checkpoint(checkpoint.directory))
    most = checkpoint.config.num_image_tokens
    assert results["num_image_tokens"] == most and results["image_tokens_vary"] is True
    assert list(results["pairs"]) == [f"none_{most}", "fastv_64"]
    for result in results["pairs"].values():
        assert result["num_scored"] == 2 and result["num_skipped"] == 0
    kept = read_predictions(tmp_path / "out" / "predictions" / "fastv_64.jsonl")
    assert all(record["kept_count"] == 64 for record in kept.values())
    assert not (tmp_path / "out" / "kept_tokens").exists()  # no single patch grid to draw on
