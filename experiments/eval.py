"""Evaluate pruning methods on a benchmark: every (method, keep) pair plus the unpruned model, in one run.

    python -m experiments.eval --flagfile=experiments/flags/testbed.flags

One run loads the checkpoint once and, for each pair, answers every question in fixed batches,
appending each answer to `predictions/<method>_<keep>.jsonl` as soon as it exists (flushed and
fsynced), so a run that is killed resumes where it stopped: answered questions are skipped, a
half-written last line is dropped. Then it scores every pair from those files and writes
`results.json`, `results.md`, `accuracy_vs_tokens.png` and `kept_tokens/*.png` (see
`experiments.reporting`).

Why the batching is the way it is:
  * batches are fixed slices of the question list (`--batch_size`), the last one padded by repeating
    its own questions and dropping the extra answers, so every call has the same shapes and jit
    compiles once per (pair, prompt-length bucket);
  * a batch with any unanswered question is run whole, even after a resume, and only its missing
    answers are written: each answer then comes from exactly the batch (and, for random pruning,
    the seed) it would have had in an uninterrupted run, so a resumed run gives the same file;
  * a question whose image is missing or unreadable is skipped with its reason (results.json) and
    the run goes on; a missing question file or image folder fails before any work.

`run(EvalConfig(...))` is the programmatic entry point (the tests call it in-process, sharing one
loaded engine); `main` only turns flags into an EvalConfig.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags

from experiments.benchmarks import Question, benchmark_names, get_benchmark
from experiments.benchmarks.io import PredictionWriter, read_predictions

logger = logging.getLogger(__name__)

UNPRUNED = "none"  # method name of the unpruned run, always evaluated once
PREDICTIONS_DIR = "predictions"
RESULTS_JSON = "results.json"
RUN_SETTINGS_JSON = "run_settings.json"
# Settings that change what an answer is: a resumed run must match the one that wrote the files.
_ANSWER_SETTINGS = (
    "checkpoint",
    "benchmark",
    "questions",
    "image_dir",
    "layer",
    "max_new_tokens",
    "seed",
    "dtype",
)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs; `main` fills it from flags, tests build it directly.

    The important ones: checkpoint, benchmark, questions, output_dir, methods, keep.
    To tinker with: layer (None = each method's default), batch_size, max_new_tokens (None = the
    benchmark's), limit (first N questions), num_overlays / record_kept (how many questions get
    kept-token pictures / kept indices in the prediction files).
    """

    checkpoint: str
    benchmark: str
    questions: str
    output_dir: str
    image_dir: str | None = None
    methods: tuple[str, ...] = ("adaptprune", "fastv")
    keep: tuple[int | float, ...] = (64,)
    layer: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    limit: int | None = None
    seed: int = 0
    dtype: str = "float32"
    model_name: str | None = None
    num_overlays: int = 3
    record_kept: int = 8
    command: str | None = None  # the command line, recorded in results.md when run from the CLI


@dataclasses.dataclass(frozen=True)
class Pair:
    """One evaluated setting: a method at a budget (the unpruned model is method 'none')."""

    method: str
    keep: int  # resolved count of image tokens the LLM keeps
    keep_requested: int | float | None
    pruning: Any  # adaptprune_jax config, None when unpruned
    equivalent_tokens: float

    @property
    def name(self) -> str:
        return f"{self.method}_{self.keep}"


@dataclasses.dataclass
class PairProgress:
    """What one pair's generation loop did in this process (for results.json and the log)."""

    generated: int = 0
    wall_seconds: float = 0.0
    generation_seconds: float = 0.0
    first_batch_seconds: float | None = None  # includes jit compilation
    warm_images: int = 0  # images answered after the first (compiling) batch
    warm_seconds: float = 0.0
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # question_id -> reason

    def timing(self) -> dict:
        """Throughput excludes the first batch, which pays for compilation, whenever there is more."""
        if self.warm_images:
            images_per_second = self.warm_images / self.warm_seconds if self.warm_seconds else None
        else:
            images_per_second = self.generated / self.generation_seconds if self.generation_seconds else None
        return {
            "generated_this_run": self.generated,
            "wall_seconds": self.wall_seconds,
            "generation_seconds": self.generation_seconds,
            "first_batch_seconds": self.first_batch_seconds,
            "images_per_second": images_per_second,
        }


# ---------------------------------------------------------------------------------------------
# Settings -> pairs, questions and images (every check that can fail runs before any generation).
# ---------------------------------------------------------------------------------------------


def parse_keep(text: str | int | float) -> int | float:
    """'64' -> 64 (a count), '0.25' -> 0.25 (a ratio); range checks are the pruning config's."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"--keep value {text!r} is neither a token count (int) nor a ratio (float)"
        ) from None


def known_method_names() -> list[str]:
    from adaptprune_jax import METHODS

    return [UNPRUNED, *sorted(METHODS)]


def check_method_names(methods: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated method names; an unknown one raises with the known names."""
    known = known_method_names()
    names = []
    for method in methods:
        name = method.strip().lower()
        if name not in known:
            raise ValueError(f"unknown method {method!r}; known methods: {', '.join(known)}")
        if name not in names:
            names.append(name)
    return names


def build_pairs(config: EvalConfig, num_image_tokens: int, num_layers: int) -> list[Pair]:
    """The unpruned pair first, then every (method, keep), validated against the model's sizes.

    A keep or layer out of range raises the pruning config's own ValueError here, before any work.
    Two requested keeps that resolve to the same count (192 and 1/3) are evaluated once.
    """
    from adaptprune_jax import make_config

    pairs = [Pair(UNPRUNED, num_image_tokens, None, None, float(num_image_tokens))]
    seen = {pairs[0].name}
    for method in check_method_names(config.methods):
        if method == UNPRUNED:
            continue
        for keep in config.keep:
            settings: dict[str, Any] = {"keep": parse_keep(keep)}
            if config.layer is not None and method != "divprune":  # DivPrune acts before the LLM
                settings["layer"] = config.layer
            if method == "random":
                settings["seed"] = config.seed
            pruning = make_config(method, **settings)
            pruning.validate(num_image_tokens, num_layers)
            pair = Pair(
                method,
                pruning.resolve_keep(num_image_tokens),
                settings["keep"],
                pruning,
                pruning.equivalent_tokens(num_image_tokens, num_layers),
            )
            if pair.name in seen:
                logger.warning(
                    "%s: keep=%r resolves to %d tokens, already evaluated", method, keep, pair.keep
                )
                continue
            seen.add(pair.name)
            pairs.append(pair)
    return pairs


def load_question_list(benchmark, path: str, limit: int | None) -> list[Question]:
    """The benchmark's questions (first `limit` of them); a missing file or folder names the path."""
    # POPE also takes 'a.json,b.json'; those parts are checked by its own loader.
    if "," not in path and not os.path.exists(path):
        raise FileNotFoundError(f"question file or directory not found: {path}")
    questions = benchmark.load_questions(path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        questions = questions[:limit]
    return questions


def image_resolver(benchmark, config: EvalConfig):
    """question -> image path: under --image_dir, or where the benchmark keeps its own images."""
    if config.image_dir:
        if not os.path.isdir(config.image_dir):
            raise FileNotFoundError(f"image folder not found: {config.image_dir}")
        return lambda question: os.path.join(config.image_dir, question.image)
    if hasattr(benchmark, "image_path"):  # the testbed: images/ beside questions.jsonl
        return lambda question: benchmark.image_path(config.questions, question)
    raise ValueError(
        f"--image_dir is required for benchmark {benchmark.name!r} (the folder holding the "
        f"images its question file names)"
    )


class ImageLoader:
    """Decodes images (each failure remembered with its reason, so it is reported once per pair,
    not re-decoded) and loads the next batch in a background thread while the model runs."""

    def __init__(self, image_path):
        from models.preprocess import UnreadableImageError, load_image

        self._load_image = load_image
        self._errors = (FileNotFoundError, UnreadableImageError)
        self.image_path = image_path
        self.failures: dict[str, str] = {}  # path -> reason
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def _load(self, questions: Sequence[Question]) -> list:
        images = []
        for question in questions:
            path = self.image_path(question)
            if path in self.failures:
                images.append(None)
                continue
            try:
                images.append(self._load_image(path))
            except self._errors as error:
                self.failures[path] = str(error)
                images.append(None)
        return images

    def submit(self, questions: Sequence[Question]) -> concurrent.futures.Future:
        return self._pool.submit(self._load, list(questions))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def check_images_exist(questions: Sequence[Question], image_path) -> None:
    """Fail fast when not one image is where the questions say (a wrong --image_dir, not a gap)."""
    if questions and not any(os.path.exists(image_path(question)) for question in questions):
        raise FileNotFoundError(
            f"none of the {len(questions)} questions' images exists; e.g. {image_path(questions[0])} "
            f"(is --image_dir right?)"
        )


def check_run_settings(config: EvalConfig, max_new_tokens: int) -> None:
    """Refuse to append to prediction files written with settings that change the answers."""
    settings = {
        **{name: getattr(config, name) for name in _ANSWER_SETTINGS},
        "max_new_tokens": max_new_tokens,
    }
    path = os.path.join(config.output_dir, RUN_SETTINGS_JSON)
    if os.path.exists(path):
        with open(path) as file:
            previous = json.load(file)
        changed = {
            name: (previous.get(name), value)
            for name, value in settings.items()
            if previous.get(name) != value
        }
        if changed:
            details = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
            raise ValueError(
                f"{config.output_dir} holds predictions made with other settings ({details}); "
                f"use another --output_dir or remove it"
            )
    os.makedirs(config.output_dir, exist_ok=True)
    with open(path, "w") as file:
        json.dump(settings, file, indent=2)


def overlay_questions(questions: Sequence[Question], count: int, image_path) -> list[Question]:
    """The first `count` questions with distinct, present images (POPE asks several questions per
    image; different pictures show more about a method than one picture asked three times)."""
    chosen, images = [], set()
    for question in questions:
        if len(chosen) >= count:
            break
        if question.image not in images and os.path.exists(image_path(question)):
            images.add(question.image)
            chosen.append(question)
    return chosen


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """A per-batch seed that depends only on (seed, batch position), so a resumed run reuses it."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0])


def run_pair(
    engine,
    pair: Pair,
    questions: Sequence[Question],
    loader: ImageLoader,
    config: EvalConfig,
    max_new_tokens: int,
    record_kept_ids: set[str],
) -> PairProgress:
    """Answer every unanswered question for one pair, appending each answer to its prediction file."""
    from tqdm import tqdm

    path = os.path.join(config.output_dir, PREDICTIONS_DIR, f"{pair.name}.jsonl")
    done = set(read_predictions(path)) if os.path.exists(path) else set()
    progress = PairProgress()
    batches = [
        list(questions[start : start + config.batch_size])
        for start in range(0, len(questions), config.batch_size)
    ]
    pending = [
        (index, batch)
        for index, batch in enumerate(batches)
        if any(question.question_id not in done for question in batch)
    ]
    already = sum(question.question_id in done for question in questions)
    start_time = time.perf_counter()
    bar = tqdm(
        total=len(questions), initial=already, desc=pair.name, unit="img", dynamic_ncols=True, file=sys.stderr
    )
    with PredictionWriter(path) as writer:
        next_images = loader.submit(pending[0][1]) if pending else None
        for position, (batch_index, batch) in enumerate(pending):
            images = next_images.result()
            next_images = loader.submit(pending[position + 1][1]) if position + 1 < len(pending) else None
            todo = {question.question_id for question in batch if question.question_id not in done}
            readable = [(question, image) for question, image in zip(batch, images) if image is not None]
            for question, image in zip(batch, images):
                if image is None and question.question_id in todo:
                    progress.skipped[question.question_id] = loader.failures[loader.image_path(question)]
            # A batch whose unanswered questions all lack images needs no model call.
            if any(question.question_id in todo for question, _ in readable):
                # Pad to the batch size by repeating this batch's own items: static shapes, one compile.
                padded = [readable[i % len(readable)] for i in range(config.batch_size)]
                tic = time.perf_counter()
                answers = engine.answer(
                    [image for _, image in padded],
                    [q.prompt for q, _ in padded],
                    pruning=pair.pruning,
                    max_new_tokens=max_new_tokens,
                    seed=batch_seed(config.seed, batch_index),
                )
                seconds = time.perf_counter() - tic
                new = 0
                for row, (question, _) in enumerate(readable):
                    if question.question_id not in todo:
                        continue
                    writer.write(
                        prediction_record(
                            question, answers, row, pair, question.question_id in record_kept_ids
                        )
                    )
                    new += 1
                progress.generation_seconds += seconds
                if progress.first_batch_seconds is None:
                    progress.first_batch_seconds = seconds
                else:
                    progress.warm_images += new
                    progress.warm_seconds += seconds
                progress.generated += new
            bar.update(len(todo))
            rate = progress.timing()["images_per_second"]
            if rate:
                bar.set_postfix(model_img_s=f"{rate:.2f}", skipped=len(progress.skipped))
    bar.close()
    progress.wall_seconds = time.perf_counter() - start_time
    return progress


def prediction_record(question: Question, answers, row: int, pair: Pair, record_kept: bool) -> dict:
    """One line of a prediction file; kept indices only for a few questions (files stay small)."""
    record = {
        "question_id": question.question_id,
        "prediction": answers.texts[row],
        "answer": question.answer,
        "category": question.category,
        "image": question.image,
        "kept_count": pair.keep,
        "prompt_tokens": answers.prompt_tokens[row],
    }
    if record_kept and answers.kept is not None:
        record["kept"] = [int(index) for index in np.asarray(answers.kept[row])]
    return record


# ---------------------------------------------------------------------------------------------
# Scoring.
# ---------------------------------------------------------------------------------------------


def score_pair(benchmark, questions: Sequence[Question], pair: Pair, output_dir: str) -> tuple[dict, dict]:
    """(metrics, records) re-scored from the pair's prediction file, restricted to `questions`."""
    path = os.path.join(output_dir, PREDICTIONS_DIR, f"{pair.name}.jsonl")
    records = read_predictions(path) if os.path.exists(path) else {}
    wanted = {question.question_id for question in questions}
    records = {question_id: record for question_id, record in records.items() if question_id in wanted}
    metrics = benchmark.score(
        questions, {question_id: record["prediction"] for question_id, record in records.items()}
    )
    return metrics, records


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


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def run(config: EvalConfig, engine=None) -> dict:
    """Evaluate every pair of `config`; returns what results.json holds. `engine` may be shared."""
    from experiments import reference_numbers, reporting

    if config.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {config.batch_size}")
    benchmark = get_benchmark(config.benchmark)
    check_method_names(config.methods)
    questions = load_question_list(benchmark, config.questions, config.limit)
    image_path = image_resolver(benchmark, config)
    if not os.path.isdir(config.checkpoint):
        raise FileNotFoundError(f"checkpoint directory not found: {config.checkpoint}")
    check_images_exist(questions, image_path)

    if engine is None:
        from models.engine import LlavaEngine

        engine = LlavaEngine.from_checkpoint(config.checkpoint, dtype=config.dtype)
    model = engine.config
    num_image_tokens, num_layers = model.num_image_tokens, model.text.num_layers
    pairs = build_pairs(config, num_image_tokens, num_layers)
    max_new_tokens = config.max_new_tokens or benchmark.max_new_tokens
    check_run_settings(config, max_new_tokens)
    model_name = reference_numbers.canonical_model_name(config.model_name or config.checkpoint)

    overlays = overlay_questions(questions, config.num_overlays, image_path)
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
        "num_layers": num_layers,
        "image_grid": model.image_grid,
        "settings": {
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "command"},
            "max_new_tokens": max_new_tokens,
        },
        "command": config.command,
        "pairs": {},
    }
    try:
        for pair in pairs:
            progress = run_pair(engine, pair, questions, loader, config, max_new_tokens, record_kept_ids)
            metrics, records = score_pair(benchmark, questions, pair, config.output_dir)
            skipped = [
                {"question_id": q.question_id, "image": q.image, "reason": loader.failures[image_path(q)]}
                for q in questions
                if q.question_id not in records and image_path(q) in loader.failures
            ]
            timing = (
                progress.timing() if progress.generated or pair.name not in earlier else earlier[pair.name]
            )
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
    finally:
        loader.close()

    with open(os.path.join(config.output_dir, RESULTS_JSON), "w") as file:
        json.dump(results, file, indent=2)
    reporting.write_report(config.output_dir, results)
    reporting.plot_accuracy_vs_tokens(os.path.join(config.output_dir, "accuracy_vs_tokens.png"), results)
    reporting.write_kept_token_overlays(
        os.path.join(config.output_dir, "kept_tokens"), engine, results, overlays, image_path
    )
    return results


# ---------------------------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
    """Define this entry point's flags on `flag_values` (only when run as a program: importing the
    module for `run` must not claim global flag names other entry points also use, like --seed)."""

    def define(kind, name, default, help_text):
        getattr(flags, f"DEFINE_{kind}")(name, default, help_text, flag_values=flag_values)

    define(
        "string", "checkpoint", None, "llava-hf checkpoint directory (config.json, safetensors, tokenizer)."
    )
    define("string", "benchmark", None, f"Benchmark name; one of {', '.join(benchmark_names())}.")
    define("string", "questions", None, "Question file, or directory of them (POPE splits, a testbed split).")
    define(
        "string",
        "image_dir",
        None,
        "Folder of the images the questions name (default: the benchmark's "
        "own, e.g. <testbed split>/images).",
    )
    define(
        "list",
        "methods",
        ["adaptprune", "fastv"],
        "Pruning methods; 'none' (unpruned) is always evaluated once whether listed or not.",
    )
    define("list", "keep", ["64"], "Budgets: image-token counts (192) or ratios of all image tokens (0.25).")
    define("integer", "layer", None, "Pruning layer K for the in-LLM methods (default: each method's own).")
    define("integer", "batch_size", 8, "Questions per generation call (the last batch is padded).")
    define("integer", "max_new_tokens", None, "Tokens to generate per answer (default: the benchmark's).")
    define("integer", "limit", None, "Evaluate only the first N questions.")
    define(
        "integer", "seed", 0, "Seed of random pruning (per batch: derived from the seed and its position)."
    )
    define("string", "output_dir", None, "Where predictions/, results.json, results.md and the plots go.")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the model.", flag_values=flag_values
    )
    define(
        "string",
        "model_name",
        None,
        "Model name for published-number lookup (default: checkpoint folder name).",
    )
    define("integer", "num_overlays", 3, "How many images get kept-token pictures.")
    define("integer", "record_kept", 8, "How many questions keep their kept-token indices in predictions.")
    return flag_values


def config_from_flags(flag_values: flags.FlagValues, argv: Sequence[str] = ()) -> EvalConfig:
    """The EvalConfig of parsed flags; `argv` (the whole command line) is recorded in results.md."""
    missing = [
        name for name in ("checkpoint", "benchmark", "questions", "output_dir") if not flag_values[name].value
    ]
    if missing:
        raise app.UsageError(f"missing required flag(s): {', '.join('--' + name for name in missing)}")
    return EvalConfig(
        checkpoint=flag_values.checkpoint,
        benchmark=flag_values.benchmark,
        questions=flag_values.questions,
        output_dir=flag_values.output_dir,
        image_dir=flag_values.image_dir,
        methods=tuple(flag_values.methods),
        keep=tuple(parse_keep(keep) for keep in flag_values.keep),
        layer=flag_values.layer,
        batch_size=flag_values.batch_size,
        max_new_tokens=flag_values.max_new_tokens,
        limit=flag_values.limit,
        seed=flag_values.seed,
        dtype=flag_values.dtype,
        model_name=flag_values.model_name,
        num_overlays=flag_values.num_overlays,
        record_kept=flag_values.record_kept,
        command=" ".join(["python -m experiments.eval", *argv[1:]]) if argv else None,
    )


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    del argv  # app.run passes only what is left after the flags; record the whole command line
    results = run(config_from_flags(flags.FLAGS, sys.argv))
    from experiments.reporting import summary_table

    print(summary_table(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
