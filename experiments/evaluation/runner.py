"""`run`: every pair of an EvalConfig generated (resumably), scored from its prediction file, reported.

Then it writes `results.json`, `results.md`, `accuracy_vs_tokens.png` and `kept_tokens/*.png` (see
`experiments.reporting`). Scores always come from the prediction files, so a resumed run scores
exactly what an uninterrupted one would. On several devices (`--mesh`) the batches are split over
them; over several processes (`experiments.evaluation.processes`) process 0 alone reads and writes
the output directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from adaptprune_jax import methods
from experiments.benchmarks import Question, get_benchmark
from experiments.benchmarks.io import read_predictions
from experiments.evaluation import fingerprint, processes
from experiments.evaluation.config import PREDICTIONS_DIR, RESULTS_JSON, UNPRUNED, EvalConfig
from experiments.evaluation.generation import predictions_path, run_pair
from experiments.evaluation.inputs import (
    ImageLoader,
    check_images_exist,
    image_resolver,
    load_question_list,
    overlay_questions,
    unusable_prompts,
)
from experiments.evaluation.pairs import Pair, build_pairs, check_method_names
from experiments.jax_runtime import use_compilation_cache

logger = logging.getLogger(__name__)


def pair_records(questions: Sequence[Question], pair: Pair, output_dir: str) -> dict[str, dict]:
    """The pair's prediction records for `questions` (question_id -> record)."""
    path = predictions_path(output_dir, pair)
    records = read_predictions(path) if os.path.exists(path) else {}
    wanted = {question.question_id for question in questions}
    return {question_id: record for question_id, record in records.items() if question_id in wanted}


def skipped_questions(
    questions: Sequence[Question],
    records: Mapping[str, dict],
    unusable: Mapping[str, str],
    loader,
    image_path,
) -> list[dict]:
    """Questions left unanswered because their prompt or image cannot be used, each with its reason."""
    skipped = []
    for question in questions:
        if question.question_id in records:
            continue
        reason = unusable.get(question.question_id) or loader.failures.get(image_path(question))
        if reason is not None:
            skipped.append({"question_id": question.question_id, "image": question.image, "reason": reason})
    return skipped


def score_pair(
    benchmark, questions: Sequence[Question], records: Mapping[str, dict], skipped: Sequence[dict]
) -> dict:
    """The pair's metrics from its records, skipped questions left out before scoring.

    Benchmarks differ in how they count a question without a prediction (the testbed counts it
    wrong, the others as missing); a skipped question is neither, so no scorer ever sees it.
    """
    left_out = {item["question_id"] for item in skipped}
    return benchmark.score(
        [question for question in questions if question.question_id not in left_out],
        {question_id: record["prediction"] for question_id, record in records.items()},
    )


def previous_timings(output_dir: str) -> dict[str, dict]:
    """Timing of each pair in an earlier results.json, kept for pairs this run had nothing to do for."""
    path = os.path.join(output_dir, RESULTS_JSON)
    try:
        with open(path) as file:
            return {
                name: result.get("timing", {}) for name, result in json.load(file).get("pairs", {}).items()
            }
    except (OSError, ValueError):
        return {}


def pair_timing(progress, earlier: dict | None) -> dict:
    """This run's timing of a pair, or the earlier run's when this one generated nothing; a run whose
    only batch was the compiling one keeps the earlier throughput of the same pair (same fingerprint)."""
    if not progress.generated and earlier is not None:
        return earlier
    timing = progress.timing()
    if timing["images_per_second"] is None and earlier and earlier.get("images_per_second"):
        timing["images_per_second"] = earlier["images_per_second"]
        timing["images_per_second_from"] = "an earlier run of this pair"
    return timing


class OverallProgress:
    """The run's progress over all pairs, with a time left estimated from this run's own answers."""

    def __init__(self, num_pairs: int, num_questions: int):
        self.num_pairs, self.num_questions = num_pairs, num_questions
        self.pairs_done = 0
        self.generated = 0
        self.start = time.perf_counter()

    def pair_done(self, progress) -> str:
        self.pairs_done += 1
        self.generated += progress.generated
        elapsed = time.perf_counter() - self.start
        line = f"progress: {self.pairs_done}/{self.num_pairs} pairs, {format_seconds(elapsed)} elapsed"
        left = self.num_pairs - self.pairs_done
        if left and self.generated:
            # Pairs still to do are assumed to need every question (a resume may need fewer).
            seconds_per_question = elapsed / self.generated
            line += f", about {format_seconds(left * self.num_questions * seconds_per_question)} left"
        return line


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def check_text_tower(config: EvalConfig) -> None:
    """A method that reads CLIP's joint space needs --text_tower, and --text_tower a directory."""
    needing = [name for name in config.methods if name != UNPRUNED and methods.get(name).needs_text_tower]
    if needing and not config.text_tower:
        raise ValueError(
            f"--methods {','.join(needing)}: reads CLIP's joint space; give --text_tower=DIR, the CLIPModel "
            "directory of the CLIP the vision tower came from (e.g. openai/clip-vit-large-patch14-336, "
            "or a testbed's <checkpoint>/clip)"
        )
    if config.text_tower and not os.path.isdir(config.text_tower):
        raise FileNotFoundError(f"--text_tower directory not found: {config.text_tower}")


def run(config: EvalConfig, engine=None) -> dict:
    """Evaluate every pair of `config`; returns what results.json holds. `engine` may be shared."""
    from experiments import reference_numbers, reporting
    from experiments.overlays import write_kept_token_overlays
    from models import sharding

    if config.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {config.batch_size}")
    sharding.parse_mesh(config.mesh)  # a malformed --mesh fails before any work
    processes.initialize(config.coordinator_address, config.num_processes, config.process_id)
    benchmark = get_benchmark(config.benchmark)
    methods.import_plugins(config.method_modules)
    check_method_names(config.methods)
    questions = load_question_list(benchmark, config.questions, config.limit)
    image_path = image_resolver(benchmark, config)
    if not os.path.isdir(config.checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {config.checkpoint}")
    check_images_exist(questions, image_path)
    check_text_tower(config)

    use_compilation_cache(config.compile_cache)
    if engine is None:
        from models.engine import LlavaEngine

        mesh = sharding.make_mesh(config.mesh)
        logger.info("devices: %s (%d processes)", sharding.describe_mesh(mesh), processes.count())
        engine = LlavaEngine.from_checkpoint(
            config.checkpoint,
            dtype=config.dtype,
            text_tower=config.text_tower,
            attention=config.attention,
            mesh=mesh if mesh.size > 1 else None,
        )
    model = engine.config
    # LLaVA-NeXT: the count is the most an image can take, and there is no one layout; the runner
    # checks each pair's keep against every batch's own image-token counts.
    num_image_tokens, num_layers = model.num_image_tokens, model.text.num_layers
    pairs = build_pairs(config, num_image_tokens, num_layers, None if model.anyres else model.image_layout())
    if model.anyres:
        for pair in pairs:  # a ratio keep or a method reading the vision tower is refused before any work
            engine.runner.resolve_keep(pair.pruning)
    max_new_tokens = config.max_new_tokens or benchmark.max_new_tokens
    attention = model.text.attention  # as the engine resolved it (auto is no answer-deciding setting)
    shared = fingerprint.shared_fingerprint(config, benchmark, max_new_tokens, attention)
    processes.on_writer(
        lambda: fingerprint.claim_output_dir(config.output_dir, pairs, shared, config.overwrite)
    )
    unusable = unusable_prompts(questions, engine, max_new_tokens)
    for question_id, reason in unusable.items():
        logger.warning("skipping question %s: %s", question_id, reason)
    reported = set(unusable)  # each skipped question is named once on the console
    model_name = reference_numbers.canonical_model_name(config.model_name or config.checkpoint)

    num_overlays = config.num_overlays
    if model.anyres and num_overlays:  # the pictures draw one patch grid; LLaVA-NeXT's crops have several
        logger.info("no kept-token pictures for LLaVA-NeXT: they draw LLaVA-1.5's single patch grid")
        num_overlays = 0
    overlays = overlay_questions(
        [q for q in questions if q.question_id not in unusable], num_overlays, image_path
    )
    record_kept_ids = {q.question_id for q in questions[: config.record_kept]} | {
        q.question_id for q in overlays
    }
    earlier = previous_timings(config.output_dir)
    loader = ImageLoader(image_path)
    results: dict[str, Any] = {
        "benchmark": benchmark.name,
        "primary_metric": benchmark.primary_metric,
        "model_name": model_name,
        "checkpoint": os.path.abspath(config.checkpoint),
        "num_questions": len(questions),
        "num_image_tokens": num_image_tokens,
        "image_tokens_vary": model.anyres,  # LLaVA-NeXT: num_image_tokens is the most an image takes
        "num_layers": num_layers,
        "image_grid": model.image_grid,
        "settings": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "command"},
            "max_new_tokens": max_new_tokens,
            "attention_resolved": attention,
        },
        "command": config.command,
        "pairs": {},
    }
    reused = 0
    overall = OverallProgress(len(pairs), len(questions))
    try:
        for pair in pairs:
            progress = run_pair(
                engine, pair, questions, loader, config, max_new_tokens, record_kept_ids, unusable
            )
            if not processes.is_writer():
                continue  # process 0 scores and reports
            records = pair_records(questions, pair, config.output_dir)
            skipped = skipped_questions(questions, records, unusable, loader, image_path)
            metrics = score_pair(benchmark, questions, records, skipped)
            for item in skipped:
                if item["question_id"] not in reported:
                    reported.add(item["question_id"])
                    logger.warning("skipping question %s: %s", item["question_id"], item["reason"])
            if not progress.generated and records:
                reused += 1
                logger.info("%s: reused its %d predictions from an earlier run", pair.name, len(records))
            timing = pair_timing(progress, earlier.get(pair.name))
            result = {
                "method": pair.method,
                "keep": pair.keep,
                "keep_requested": pair.keep_requested,
                "layer": None if pair.pruning is None else pair.pruning.layer,
                "equivalent_tokens": pair.equivalent_tokens,
                "primary": metrics["overall"][benchmark.primary_metric],
                "metrics": metrics,
                "num_scored": metrics["num_scored"],
                "num_missing": metrics["num_missing"],
                "num_skipped": len(skipped),
                "skipped": skipped,
                "timing": timing,
                "predictions_file": os.path.join(PREDICTIONS_DIR, f"{pair.name}.jsonl"),
            }
            result["published"] = [
                {
                    **dataclasses.asdict(reference),
                    "ours": reference_numbers.comparable_value(reference, result),
                }
                for reference in reference_numbers.lookup(model_name, benchmark.name, pair.method, pair.keep)
            ]
            results["pairs"][pair.name] = result
            logger.info(
                "%s: %s=%.4f over %d scored, %d skipped",
                pair.name,
                benchmark.primary_metric,
                result["primary"],
                result["num_scored"],
                result["num_skipped"],
            )
            logger.info("%s", overall.pair_done(progress))
    finally:
        loader.close()
    if reused:
        logger.info(
            "reused %d of %d pairs from %s (pass --overwrite to recompute them)",
            reused,
            len(pairs),
            config.output_dir,
        )

    if not processes.is_writer():
        return results  # without pairs: process 0 holds them
    reporting.add_intervals(results)
    with open(os.path.join(config.output_dir, RESULTS_JSON), "w") as file:
        json.dump(results, file, indent=2)
    reporting.write_report(config.output_dir, results)
    reporting.plot_accuracy_vs_tokens(os.path.join(config.output_dir, "accuracy_vs_tokens.png"), results)
    write_kept_token_overlays(
        os.path.join(config.output_dir, "kept_tokens"), engine, results, overlays, image_path
    )
    return results
