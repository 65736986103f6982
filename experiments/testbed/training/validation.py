"""Validation and test through the REAL inference path (`LlavaRunner` prefill + greedy decode).

Validation runs on the in-memory weights over a fixed split written with `write_split`; the final
test reloads the exported directory with `LlavaEngine.from_checkpoint`, as the eval harness does.
Questions are scored by the benchmark the caller passes (the eval harness's testbed reader), so
training and evaluation report the same numbers.
"""

from __future__ import annotations

import os
import shutil
import threading

import jax
import numpy as np
from flax import nnx

from experiments.testbed.encoding import make_tokenizer
from experiments.testbed.splits import QUESTIONS_FILE, write_split
from models.engine import LlavaEngine
from models.generate import LlavaRunner, SamplingConfig, tokens_until_eos
from models.preprocess import Preprocessor, load_image
from models.presets import llava15_image_processor

VALIDATION_DIR = "validation"  # the validation split's folder in --work_dir


def ensure_split(directory: str, split: str, num_items: int, scene_config) -> str:
    """Write a fixed split with `write_split` unless `directory` already holds one (atomic rename)."""
    if os.path.isfile(os.path.join(directory, QUESTIONS_FILE)):
        return directory
    partial = directory.rstrip("/") + f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    write_split(partial, split=split, num_items=num_items, seed=0, config=scene_config)
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    os.rename(partial, directory)
    return directory


class SplitWriter:
    """Writes the validation and test splits in a background thread (NumPy rendering and PNG encoding
    take seconds), so they are ready by the first evaluation without holding up training."""

    def __init__(self, jobs: list[tuple[str, str, int]], scene_config):
        self._errors: dict[str, BaseException] = {}
        self._done = {directory: threading.Event() for directory, _, _ in jobs}

        def work():
            for directory, split, items in jobs:
                try:
                    ensure_split(directory, split, items, scene_config)
                except BaseException as error:  # noqa: BLE001 - re-raised in wait()
                    self._errors[directory] = error
                self._done[directory].set()

        threading.Thread(target=work, name="split-writer", daemon=True).start()

    def wait(self, directory: str) -> str:
        self._done[directory].wait()
        if directory in self._errors:
            raise RuntimeError(f"writing the split {directory} failed") from self._errors[directory]
        return directory


class EvalSplit:
    """A fixed split's questions, prompts and pixels, preprocessed once by an engine's preprocessor
    (each image once, though several questions share it). `benchmark` reads and scores the split
    (the eval harness's testbed benchmark: load_questions, image_path, max_new_tokens, score)."""

    def __init__(self, directory: str, preprocessor, benchmark):
        self.benchmark = benchmark
        self.questions = self.benchmark.load_questions(directory)
        self.prompts = [preprocessor.encode(q.prompt) for q in self.questions]
        first_asker = {}
        for question in self.questions:
            first_asker.setdefault(question.image, question)
        index = {name: i for i, name in enumerate(first_asker)}
        self.pixels = np.concatenate(
            [
                preprocessor.pixel_values([load_image(self.benchmark.image_path(directory, question))])
                for question in first_asker.values()
            ]
        )
        self.image_of = np.array([index[q.image] for q in self.questions])


def evaluate(engine, split: EvalSplit, batch_size: int) -> dict:
    """Greedy answers from `engine.runner` (prefill + decode) for every question; the benchmark's scores.

    Batches have one static size (the last is padded with repeats), so the runner compiles once.
    """
    preprocessor = engine.preprocessor
    sampling = SamplingConfig(
        max_new_tokens=split.benchmark.max_new_tokens,
        temperature=0.0,
        eos_token_id=preprocessor.eos_token_id,
        pad_token_id=preprocessor.pad_token_id,
    )
    count = len(split.questions)
    predictions = {}
    for start in range(0, count, batch_size):
        rows = [min(i, count - 1) for i in range(start, start + batch_size)]
        batch = engine.runner.make_batch(
            [split.prompts[i] for i in rows],
            split.pixels[split.image_of[rows]],
            pad_token_id=preprocessor.pad_token_id,
            max_new_tokens=sampling.max_new_tokens,
        )
        output = engine.runner.generate(batch, sampling, rng=jax.random.key(0))
        ids = tokens_until_eos(output.tokens, output.num_generated, preprocessor.eos_token_id)
        for i, row_ids in zip(rows[: count - start], ids):
            predictions[split.questions[i].question_id] = preprocessor.decode(row_ids).strip()
    return split.benchmark.score(split.questions, predictions)


def in_memory_engine(hf_config, graphdef, weights):
    """A `LlavaEngine` over in-memory weights, with the preprocessing the exported checkpoint will
    have (testbed tokenizer, LLaVA-1.5 pad-mode image processor)."""
    runner = LlavaRunner(nnx.merge(graphdef, weights))
    preprocessor = Preprocessor(hf_config, make_tokenizer(), llava15_image_processor(hf_config))
    return LlavaEngine(runner, preprocessor, hf_config)


def summarize_scores(scores: dict) -> dict:
    """Overall and per-kind accuracy, the compact form logged during training."""
    summary = {"accuracy": scores["overall"]["accuracy"]}
    summary.update({f"accuracy/{kind}": m["accuracy"] for kind, m in scores["per_kind"].items()})
    return summary
