"""Procedural VQA testbed: a small LLaVA is trained on it, then token-pruning methods are compared.

Answers hinge on objects 1 to 3 patches wide on a textured 336 x 336 background, so pruning that
drops the wrong visual tokens visibly costs accuracy. See `scenes` (generation, rendering, splits,
vocabulary) and `benchmark` (the eval-harness benchmark over a written split).
"""

from experiments.testbed.benchmark import Question, TestbedBenchmark, normalize_answer
from experiments.testbed.scenes import (
    COLOURS,
    DEFAULT_CONFIG,
    IMAGE_TOKEN_INDEX,
    KINDS,
    NEGATIVE_TYPES,
    SHAPES,
    SPLITS,
    TOKENIZER_SIZE,
    TRAINING_NEGATIVE_TYPES,
    VOCABULARY,
    QuestionItem,
    SceneParams,
    TestbedConfig,
    TrainingBatch,
    format_prompt,
    make_tokenizer,
    render_scenes,
    render_scenes_numpy,
    sample_batch,
    sample_questions,
    sample_scenes,
    split_rng,
    write_split,
)

__all__ = [
    "COLOURS",
    "DEFAULT_CONFIG",
    "IMAGE_TOKEN_INDEX",
    "KINDS",
    "NEGATIVE_TYPES",
    "SHAPES",
    "SPLITS",
    "TOKENIZER_SIZE",
    "TRAINING_NEGATIVE_TYPES",
    "VOCABULARY",
    "Question",
    "QuestionItem",
    "SceneParams",
    "TestbedBenchmark",
    "TestbedConfig",
    "TrainingBatch",
    "format_prompt",
    "make_tokenizer",
    "normalize_answer",
    "render_scenes",
    "render_scenes_numpy",
    "sample_batch",
    "sample_questions",
    "sample_scenes",
    "split_rng",
    "write_split",
]
