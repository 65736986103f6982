"""Evaluate pruning methods on a benchmark: every (method, keep) pair plus the unpruned model, in one run.

    python -m experiments.eval --flagfile=experiments/flags/testbed.flags

One run loads the checkpoint once and, for each pair, answers every question in fixed batches,
appending each answer to `predictions/<method>_<keep>.jsonl` as soon as it exists, so a run that is
killed resumes where it stopped (`experiments.evaluation.generation` says how, and why the batches
are what they are). Then it scores every pair from those files and writes `results.json`,
`results.md`, `accuracy_vs_tokens.png` and `kept_tokens/*.png` (see `experiments.reporting`). A
question whose image is missing or unreadable, or whose prompt holds `<image>` or does not fit the
context (checked before any generation), is skipped with its reason (console and results.json) and
left out of every metric; a missing question file or image folder fails before any work.

`run(EvalConfig(...))` is the programmatic entry point (the tests call it in-process, sharing one
loaded engine); the command line only turns flags into an EvalConfig, whose fields are the flags.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from absl import app, flags

from experiments import flag_config, jax_runtime
from experiments.benchmarks import get_benchmark
from experiments.evaluation.config import (
    PREDICTIONS_DIR,
    RESULTS_JSON,
    RUN_FINGERPRINT_JSON,
    UNPRUNED,
    EvalConfig,
)
from experiments.evaluation.generation import PairProgress, batch_seed, prediction_record, run_pair
from experiments.evaluation.inputs import (
    ImageLoader,
    check_images_exist,
    image_resolver,
    load_question_list,
    overlay_questions,
    unusable_prompts,
)
from experiments.evaluation.pairs import (
    Pair,
    build_pairs,
    check_method_names,
    known_method_names,
    parse_keep,
)
from experiments.evaluation.runner import previous_timings, run, score_pair

__all__ = [
    "PREDICTIONS_DIR",
    "RESULTS_JSON",
    "RUN_FINGERPRINT_JSON",
    "UNPRUNED",
    "EvalConfig",
    "ImageLoader",
    "Pair",
    "PairProgress",
    "batch_seed",
    "build_pairs",
    "check_images_exist",
    "check_method_names",
    "config_from_flags",
    "define_flags",
    "get_benchmark",
    "image_resolver",
    "known_method_names",
    "load_question_list",
    "main",
    "overlay_questions",
    "parse_keep",
    "prediction_record",
    "previous_timings",
    "run",
    "run_pair",
    "score_pair",
    "unusable_prompts",
]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
    """EvalConfig's flags on `flag_values`, defined only when run as a program: importing this module
    for `run` must not claim global flag names other entry points also use, like --seed."""
    return flag_config.define_flags(EvalConfig, flag_values)


def config_from_flags(flag_values: flags.FlagValues, argv: Sequence[str] = ()) -> EvalConfig:
    """The EvalConfig of parsed flags; `argv` (the whole command line) is recorded in results.md."""
    command = " ".join(["python -m experiments.eval", *argv[1:]]) if argv else None
    return flag_config.from_flags(EvalConfig, flag_values, command=command)


def main(argv: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    jax_runtime.quiet_backend_probe()
    del argv  # app.run passes only what is left after the flags; record the whole command line
    with flag_config.one_line_errors("experiments.eval"):
        results = run(config_from_flags(flags.FLAGS, sys.argv))
    from experiments.reporting import summary_table

    print(summary_table(results))


if __name__ == "__main__":
    define_flags()
    # The command line caches compilations by default; an EvalConfig built in code (tests) does not.
    flags.FLAGS.set_default("compile_cache", jax_runtime.DEFAULT_DIR)
    app.run(main)
