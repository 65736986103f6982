"""Answers of a fixed number of tokens (no stop at EOS), as the throughput benchmark asks for them."""

from __future__ import annotations

import threading

import jax
import numpy as np
import PIL.Image
import pytest

from models.engine import LlavaEngine
from models.generate import LlavaRunner, SamplingConfig
from models.preprocess import Preprocessor
from models.presets import llava15_image_processor, llava_config, random_model, tiny_tokenizer
from tests.helpers import make_prompt, random_pixels

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def engine():
    config = llava_config("tiny")
    runner = LlavaRunner(random_model(config, dtype="float32", seed=3))
    preprocessor = Preprocessor(config, tiny_tokenizer(config), llava15_image_processor(config))
    return LlavaEngine(runner, preprocessor, config)


def test_a_drawn_token_equal_to_the_pad_id_still_counts(engine, prompt_rng):
    runner = engine.runner
    prompts = [make_prompt(runner.config, prompt_rng, 4, 9), make_prompt(runner.config, prompt_rng, 7, 3)]
    batch = runner.make_batch(
        prompts, random_pixels(prompt_rng, 2, 336), pad_token_id=0, max_new_tokens=NEW_TOKENS
    )
    first = runner.generate(batch, SamplingConfig(max_new_tokens=NEW_TOKENS, pad_token_id=0))
    # The same generation with the pad id set to a token the model draws mid-answer.
    drawn = int(first.tokens[0, 1])
    again = runner.generate(batch, SamplingConfig(max_new_tokens=NEW_TOKENS, pad_token_id=drawn))
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert again.num_generated.tolist() == [NEW_TOKENS, NEW_TOKENS]


def test_engine_without_eos_stop_decodes_every_generated_token(engine, prompt_rng):
    images = [PIL.Image.fromarray(prompt_rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    questions = ["Is there a cat in the image?", "Is there a dog in the image?"]
    answers = engine.answer(images, questions, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
    preprocessor = engine.preprocessor
    batch = engine.runner.make_batch(
        [preprocessor.encode(q) for q in questions],
        preprocessor.pixel_values(images),
        pad_token_id=preprocessor.pad_token_id,
        max_new_tokens=NEW_TOKENS,
    )
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, pad_token_id=preprocessor.pad_token_id)
    direct = engine.runner.generate(batch, sampling)
    assert direct.num_generated.tolist() == [NEW_TOKENS, NEW_TOKENS]
    assert answers.texts == [preprocessor.decode(row).strip() for row in direct.tokens]


def test_donated_caches_alias_the_decode_loops_output(engine, prompt_rng):
    """The decode loop returns its caches, so each donated cache buffer is updated in place rather
    than copied into a second cache for the whole decode (the memory that bounds the batch)."""
    runner = LlavaRunner(engine.runner.merge(engine.runner.weights), donate_caches=True)
    batch = runner.make_batch(
        [make_prompt(runner.config, prompt_rng, 4, 9)],
        random_pixels(prompt_rng, 1, 336),
        pad_token_id=0,
        max_new_tokens=NEW_TOKENS,
    )
    result = runner.prefill(batch, extra_slots=NEW_TOKENS)
    lowered = runner.decode_loop.lower(
        runner.weights,
        result.logits,
        result.caches,
        result.next_positions,
        jax.random.key(0),
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS),
    )
    cache_leaves = len(jax.tree_util.tree_leaves(result.caches))
    assert lowered.as_text().count("tf.aliasing_output") == cache_leaves


class OverlapProbe:
    """The engine, with each batch's generation waiting until the next batch's preparation has
    started: only a stream that prepares ahead, on another thread, gets through."""

    answer_stream = LlavaEngine.answer_stream  # its prepare and run are this probe's

    def __init__(self, engine, batches: int):
        self.engine = engine
        self.started = [threading.Event() for _ in range(batches)]
        self.prepared = self.runs = 0

    def prepare(self, images, questions, **options):
        self.started[self.prepared].set()
        self.prepared += 1
        return self.engine.prepare(images, questions, **options)

    def run(self, prepared):
        following = self.runs + 1
        self.runs += 1
        if following < len(self.started):
            assert self.started[following].wait(timeout=30), "the next batch was not prepared meanwhile"
        return self.engine.run(prepared)


def test_answer_stream_prepares_the_next_batch_while_one_generates(engine, prompt_rng):
    images = [PIL.Image.fromarray(prompt_rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(6)]
    questions = [f"Is there a {word} in the image?" for word in ("cat", "dog", "car", "tree", "cup", "man")]
    requests = [
        (
            tag,
            dict(images=images[2 * tag : 2 * tag + 2], questions=questions[2 * tag : 2 * tag + 2], seed=tag),
        )
        for tag in range(3)
    ]
    probe = OverlapProbe(engine, len(requests))
    streamed = list(probe.answer_stream(iter(requests)))
    assert [tag for tag, _ in streamed] == [0, 1, 2]
    for (_, options), (_, answers) in zip(requests, streamed):
        assert answers == engine.answer(**options)
