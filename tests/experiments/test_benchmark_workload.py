"""The throughput mode's work: POPE-form questions, COCO-sized images, the tokenizer, the batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.benchmark import workload
from experiments.benchmarks.pope import PopeBenchmark
from models.preprocess import Preprocessor, build_prompt
from models.presets import llava15_image_processor, llava_config


@pytest.fixture(scope="module")
def work():
    return workload.build_workload(40, seed=0)


def tokenizer_for(name, work):
    config = llava_config(name)
    texts = [build_prompt("")] + [question.prompt for question in work.questions]
    return config, workload.word_tokenizer(config, texts)


def test_questions_are_the_prompts_the_pope_reader_builds(tmp_path, work):
    records = [
        {"question_id": i, "image": q.image, "text": q.prompt.split("\n")[0], "label": q.answer}
        for i, q in enumerate(work.questions)
    ]
    path = tmp_path / "coco_pope_random.json"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    read = PopeBenchmark().load_questions(path)
    assert [q.prompt for q in read] == [q.prompt for q in work.questions]
    for question in work.questions:
        text = question.prompt.split("\n")[0]
        assert text.startswith("Is there a ") and text.endswith(" in the image?")
        assert text[len("Is there a ") : -len(" in the image?")] in workload.COCO_OBJECTS


def test_six_questions_per_image_half_yes_and_the_same_for_a_seed(work):
    per_image = {}
    for question in work.questions:
        per_image.setdefault(question.image, []).append(question.answer)
    assert all(len(answers) == workload.QUESTIONS_PER_IMAGE for answers in list(per_image.values())[:-1])
    assert per_image["image_0"] == ["yes"] * 3 + ["no"] * 3
    assert workload.pope_style_questions(40, seed=0) == list(work.questions)
    assert workload.pope_style_questions(40, seed=1) != list(work.questions)
    with pytest.raises(ValueError, match="at least one question"):
        workload.pope_style_questions(0, seed=0)


def test_images_are_coco_sized_rgb_and_questions_of_one_image_share_it(work):
    assert len(work.images) >= 2 and "640" in work.image_source
    for image in work.images:
        assert image.mode == "RGB" and max(image.size) == workload.COCO_LONG_SIDE
    assert work.image_of(0) is work.image_of(workload.QUESTIONS_PER_IMAGE - 1)
    assert work.image_of(0) is not work.image_of(workload.QUESTIONS_PER_IMAGE)
    images, prompts = work.batch([0, 7])
    assert images == [work.image_of(0), work.image_of(7)]
    assert prompts == [work.questions[0].prompt, work.questions[7].prompt]


def test_procedural_photographs_vary_and_have_coco_size():
    rng = np.random.default_rng(0)
    first, second = workload.procedural_photo(rng), workload.procedural_photo(rng)
    assert first.size == second.size == (640, 480) and first.mode == "RGB"
    pixels = np.asarray(first, np.float32)
    assert pixels.std() > 10 and not np.array_equal(pixels, np.asarray(second))


def test_tokenizer_fills_llamas_ids_and_knows_every_prompt_word(work):
    config, tokenizer = tokenizer_for("llava-1.5-7b", work)
    assert len(tokenizer) == config.image_token_index + 1 == 32001
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_index
    preprocessor = Preprocessor(config, tokenizer, llava15_image_processor(config))
    for question in work.questions:
        ids = preprocessor.encode(question.prompt)
        assert tokenizer.unk_token_id not in ids
        assert ids.count(config.image_token_index) == 576
    question = work.questions[0].prompt
    decoded = preprocessor.decode(preprocessor.encode(question))
    assert (
        decoded.startswith("a chat between") and question.split("\n")[0][len("Is there a ") : -1] in decoded
    )
    drawn = np.random.default_rng(0).integers(4, config.image_token_index, 50)
    assert all(tokenizer.decode([int(i)]) for i in drawn)  # any drawn id below <image> is a word


def test_a_tiny_preset_keeps_the_first_words_and_the_prompt_lengths(work):
    config, tokenizer = tokenizer_for("tiny", work)
    _, large = tokenizer_for("llava-1.5-7b", work)
    assert len(tokenizer) == config.image_token_index + 1
    prompt = build_prompt(work.questions[0].prompt)
    assert len(tokenizer(prompt)["input_ids"]) == len(large(prompt)["input_ids"])
    assert tokenizer.unk_token_id not in tokenizer(build_prompt(""))["input_ids"]  # the template's words


def test_batches_are_full_consecutive_and_cycle_the_pool():
    assert [workload.batch_indices(5, 3, n) for n in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]
    assert workload.batch_indices(300, 128, 2) == [(256 + row) % 300 for row in range(128)]
    assert workload.timed_batch_count(1, 5, 64) == 64
    assert workload.timed_batch_count(32, 5, 64) == 5
    assert workload.timed_batch_count(128, 5, 64) == 5
    assert workload.timed_batch_count(10, 5, 64) == 7
