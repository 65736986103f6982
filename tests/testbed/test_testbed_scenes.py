"""Tests of the procedural testbed: determinism, split separation, renderer agreement, geometry, the
truth of every answer (recomputed here from the object list by parsing the question text), POPE
negative-type definitions, vocabulary coverage, the on-disk split layout, and yes/no balance."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from experiments.benchmarks.testbed import TestbedBenchmark
from experiments.testbed import scenes as S

CONFIG = S.DEFAULT_CONFIG


@pytest.fixture(scope="module")
def sample():
    """300 validation scenes with 4 questions each (generation only, no rendering)."""
    rng = S.split_rng("validation", 7)
    scenes = S.sample_scenes(rng, 300, CONFIG, "validation")
    questions = S.sample_questions(rng, scenes, CONFIG, per_scene=4)
    return scenes, questions


def _objects(scenes, index):
    """Objects of one scene as dicts, straight from the arrays (independent of S.scene_objects)."""
    return [
        dict(
            shape=S.SHAPE_NAMES[scenes.shape_id[index, m]],
            colour=S.COLOUR_NAMES[scenes.colour_id[index, m]],
            cy=scenes.top[index, m] + scenes.size[index, m] / 2,
            cx=scenes.left[index, m] + scenes.size[index, m] / 2,
        )
        for m in range(scenes.valid.shape[1])
        if scenes.valid[index, m]
    ]


def _arrays_equal(a: S.SceneParams, b: S.SceneParams) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def _leaves(scenes):
    for field in scenes:
        yield from (field if isinstance(field, tuple) else (field,))


def test_same_seed_same_scenes_questions_and_pixels():
    runs = []
    for _ in range(2):
        rng = S.split_rng("test", 3)
        scenes = S.sample_scenes(rng, 4, CONFIG, "test")
        runs.append(
            (scenes, S.sample_questions(rng, scenes, CONFIG, per_scene=3), S.render_scenes_numpy(scenes))
        )
    assert _arrays_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    other = S.sample_scenes(S.split_rng("test", 4), 4, CONFIG, "test")
    assert not _arrays_equal(runs[0][0], other)


def test_splits_share_no_scene():
    fingerprints, noise_ranges = {}, {}
    for split in S.SPLITS:
        scenes = S.sample_scenes(S.split_rng(split, 0), 400, CONFIG, split)
        layouts = {
            tuple(
                np.concatenate(
                    [
                        a[i].ravel()
                        for a in (scenes.shape_id, scenes.colour_id, scenes.top, scenes.left, scenes.size)
                    ]
                ).tolist()
            )
            for i in range(400)
        }
        assert len(layouts) == 400
        fingerprints[split] = layouts
        noise_ranges[split] = (int(scenes.noise_seed.min()), int(scenes.noise_seed.max()))
    for a in S.SPLITS:
        for b in S.SPLITS:
            if a < b:
                assert not fingerprints[a] & fingerprints[b]
                assert noise_ranges[a][1] < noise_ranges[b][0] or noise_ranges[b][1] < noise_ranges[a][0]


def test_geometry_objects_inside_and_apart():
    scenes = S.sample_scenes(S.split_rng("train", 1), 2000, CONFIG)
    counts = scenes.valid.sum(axis=1)
    assert counts.min() >= CONFIG.min_objects and counts.max() <= CONFIG.max_objects
    assert set(counts.tolist()) == set(range(CONFIG.min_objects, CONFIG.max_objects + 1))
    valid = scenes.valid
    sizes = scenes.size[valid]
    assert sizes.min() >= CONFIG.patch_size and sizes.max() <= 3 * CONFIG.patch_size
    assert scenes.top[valid].min() >= 0 and scenes.left[valid].min() >= 0
    assert (scenes.top + scenes.size)[valid].max() <= CONFIG.image_size
    assert (scenes.left + scenes.size)[valid].max() <= CONFIG.image_size
    gap = CONFIG.patch_size
    top, left, size = scenes.top[:, :, None], scenes.left[:, :, None], scenes.size[:, :, None]
    t2, l2, s2 = (a.transpose(0, 2, 1) for a in (top, left, size))
    apart = (
        (top >= t2 + s2 + gap)
        | (t2 >= top + size + gap)
        | (left >= l2 + s2 + gap)
        | (l2 >= left + size + gap)
    )
    both = valid[:, :, None] & valid[:, None, :] & ~np.eye(valid.shape[1], dtype=bool)[None]
    assert apart[both].all()


def test_jax_renderer_matches_numpy_and_draws_objects_where_the_params_say():
    scenes = S.sample_scenes(S.split_rng("validation", 2), 6, CONFIG, "validation")
    with_numpy = S.render_scenes_numpy(scenes, CONFIG)
    with_jax = np.asarray(S.render_scenes(scenes, CONFIG))
    assert with_numpy.dtype == np.uint8 and with_numpy.shape == (6, 336, 336, 3)
    np.testing.assert_array_equal(with_jax, with_numpy)
    slack = CONFIG.pixel_noise
    for b in range(6):
        for m in np.flatnonzero(scenes.valid[b]):
            top, left, size = scenes.top[b, m], scenes.left[b, m], scenes.size[b, m]
            centre = with_numpy[b, top + size // 2, left + size // 2].astype(int)
            assert np.abs(centre - scenes.rgb[b, m]).max() <= slack + 1
            corner = with_numpy[b, top, left].astype(int)  # a box corner is background for round shapes
            if scenes.shape_id[b, m] in (S.CIRCLE, S.DIAMOND, S.TRIANGLE, S.CROSS):
                assert np.abs(corner - scenes.rgb[b, m]).max() > slack
    # The background is textured, not flat: many distinct values and patch-to-patch variation.
    background = with_numpy[0].astype(float)
    patch_means = background.reshape(24, 14, 24, 14, 3).mean(axis=(1, 3))
    assert patch_means.std(axis=(0, 1)).min() > 2 and background.std() > 5


def _truth(item: S.QuestionItem, objects: list[dict]):
    """The answer recomputed from the object list by parsing the question; also checks it was askable."""
    text = item.text
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", text):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return S.NUMBER_WORDS[sum(o["colour"] == m[1] for o in objects)]
    if m := re.fullmatch(r"How many (\w+) are there\?", text):
        return S.NUMBER_WORDS[sum(S.SHAPE_PLURALS[S.SHAPE_NAMES.index(o["shape"])] == m[1] for o in objects)]
    if m := re.fullmatch(r"What color is the (\w+)\?", text):
        matching = [o for o in objects if o["shape"] == m[1]]
        assert len(matching) == 1, "attribute question about a shape that is not unique"
        return matching[0]["colour"]
    if m := re.fullmatch(
        r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", text
    ):
        first = [o for o in objects if (o["colour"], o["shape"]) == (m[1], m[2])]
        second = [o for o in objects if (o["colour"], o["shape"]) == (m[4], m[5])]
        assert len(first) == 1 and len(second) == 1, "position question about a non-unique object"
        (a,), (b,) = first, second
        axis = "cx" if "left" in m[3] or "right" in m[3] else "cy"
        assert abs(a[axis] - b[axis]) >= CONFIG.patch_size, "relation not unambiguous"
        holds = {
            "to the left of": a["cx"] < b["cx"],
            "to the right of": a["cx"] > b["cx"],
            "above": a["cy"] < b["cy"],
            "below": a["cy"] > b["cy"],
        }[m[3]]
        return "yes" if holds else "no"
    raise AssertionError(f"unrecognised question {text!r}")


def test_every_answer_is_true_of_its_scene(sample):
    scenes, question_lists = sample
    kinds = Counter()
    for index, items in enumerate(question_lists):
        objects = _objects(scenes, index)
        assert len(items) == 4 and len({q.text for q in items}) == 4
        for item in items:
            assert _truth(item, objects) == item.answer, (item, objects)
            kinds[item.category] += 1
            # Evidence objects really are the ones the question is about.
            if item.kind == "existence" and item.answer == "yes" or item.kind == "attribute":
                assert item.objects and all(scenes.valid[index, i] for i in item.objects)
    assert set(kinds) == {f"existence/{t}" for t in S.NEGATIVE_TYPES} | {"counting", "attribute", "position"}
    answers = Counter(q.answer for items in question_lists for q in items if q.kind == "counting")
    assert {"zero", "one", "two"} <= set(answers)


def test_negative_types_satisfy_their_definitions(sample):
    scenes, question_lists = sample
    priors = {
        (c, s): CONFIG.colour_prior[S.COLOUR_NAMES.index(c)] * CONFIG.shape_prior[S.SHAPE_NAMES.index(s)]
        for c in S.COLOUR_NAMES
        for s in S.SHAPE_NAMES
    }
    checked = Counter()
    for index, items in enumerate(question_lists):
        objects = _objects(scenes, index)
        present = {(o["colour"], o["shape"]) for o in objects}
        for item in items:
            if item.kind != "existence":
                continue
            pair = tuple(re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", item.text).groups())
            negative_type = item.category.split("/")[1]
            if item.answer == "yes":
                assert pair in present
                continue
            assert pair not in present
            if negative_type == "popular":  # among the top-k most frequent absent pairs
                more_frequent = [p for p in priors if p not in present and priors[p] > priors[pair]]
                assert len(more_frequent) < CONFIG.popular_top_k
            if negative_type == "adversarial":  # shares its colour or its shape with a present object
                assert any(pair[0] == c or pair[1] == s for c, s in present)
            checked[negative_type] += 1
    assert all(checked[t] >= 15 for t in S.NEGATIVE_TYPES), checked


def test_yes_no_balance(sample):
    _, question_lists = sample
    items = [q for qs in question_lists for q in qs]
    for kind in ("existence", "position"):
        answers = [q.answer for q in items if q.kind == kind]
        assert len(answers) >= 150 and set(answers) == {"yes", "no"}
        assert 0.4 <= answers.count("yes") / len(answers) <= 0.6, (kind, Counter(answers))
    for negative_type in S.NEGATIVE_TYPES:
        answers = [q.answer for q in items if q.category == f"existence/{negative_type}"]
        assert 0.35 <= answers.count("yes") / len(answers) <= 0.65


def test_vocabulary_covers_every_prompt_and_answer(sample):
    _, question_lists = sample
    tokenizer = S.make_tokenizer()
    unk = tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids("<image>") == S.IMAGE_TOKEN_INDEX == len(S.VOCABULARY) + 4
    assert len(tokenizer) == S.TOKENIZER_SIZE
    texts = [S.format_prompt(q.text) for qs in question_lists for q in qs]
    texts += [q.answer for qs in question_lists for q in qs] + list(S.SHORT_ANSWER_INSTRUCTIONS)
    texts += S.all_texts()  # every template filled in every way
    for ids in tokenizer(texts)["input_ids"]:
        assert unk not in ids
    prompt_ids = tokenizer(S.format_prompt(question_lists[0][0].text))["input_ids"]
    assert prompt_ids.count(S.IMAGE_TOKEN_INDEX) == 1 and prompt_ids[0] == tokenizer.bos_token_id
    assert "{" not in S.VOCABULARY and "}" not in S.VOCABULARY


def test_training_token_ids_match_the_tokenizer():
    """What the trainer encodes (`encode_prompt`, `answer_token_ids`) is what the tokenizer encodes."""
    rng = S.split_rng("train", 5)
    scenes = S.sample_scenes(rng, 12, CONFIG, "train")
    questions = [
        items[0]
        for items in S.sample_questions(rng, scenes, CONFIG, negative_types=S.TRAINING_NEGATIVE_TYPES)
    ]
    assert all(q.category in ("existence/frequency", "counting", "attribute", "position") for q in questions)
    tokenizer = S.make_tokenizer()
    for question in questions:
        expected = tokenizer(S.format_prompt(question.text))["input_ids"]
        assert list(S.encode_prompt(question.text)) == expected
        assert len(expected) <= S.max_prompt_length()
        assert tokenizer.convert_ids_to_tokens(list(S.answer_token_ids(question.answer))) == [
            question.answer,
            "</s>",
        ]
        assert question.kind in S.KINDS


def test_write_split_layout_is_readable_and_pixels_match_the_jax_renderer(tmp_path):
    records = S.write_split(
        tmp_path, split="test", num_items=14, seed=11, questions_per_image=3, render_chunk=8
    )
    assert len(records) == 14
    questions = TestbedBenchmark().load_questions(tmp_path)
    assert questions == TestbedBenchmark().load_questions(tmp_path / "questions.jsonl")
    assert [q.question_id for q in questions] == [r["question_id"] for r in records]
    assert len({q.question_id for q in questions}) == 14
    images = sorted({q.image for q in questions})
    assert len(images) == 5  # 3 + 3 + 3 + 3 + 2 questions: images are shared
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == images
    for question, record in zip(questions, records):
        assert (question.prompt, question.answer, question.category) == (
            record["text"],
            record["answer"],
            record["category"],
        )
        assert TestbedBenchmark.image_path(tmp_path, question) == str(tmp_path / "images" / question.image)

    # Regenerate the scenes the way write_split did and render them with JAX: same pixels as the PNGs.
    rng = S.split_rng("test", 11)
    scenes = S.sample_scenes(rng, 8, CONFIG, "test")
    rendered = np.asarray(S.render_scenes(S.take_scenes(scenes, np.arange(5)), CONFIG))
    scene_lines = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    for index, name in enumerate(images):
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "images" / name).convert("RGB")), rendered[index]
        )
        assert scene_lines[index]["image"] == name
        assert [(o["shape"], o["colour"]) for o in scene_lines[index]["objects"]] == [
            (o["shape"], o["colour"]) for o in _objects(scenes, index)
        ]

    # Deterministic: writing again gives identical files.
    again = tmp_path / "again"
    S.write_split(again, split="test", num_items=14, seed=11, questions_per_image=3, render_chunk=8)
    assert (again / "questions.jsonl").read_bytes() == (tmp_path / "questions.jsonl").read_bytes()
    assert (again / "images" / images[0]).read_bytes() == (tmp_path / "images" / images[0]).read_bytes()


def test_config_from_llava_config_and_validation():
    from models.presets import llava_config

    config = S.TestbedConfig.from_llava_config(llava_config("tiny"))
    assert (config.image_size, config.patch_size, config.grid_size) == (336, 14, 24)
    small = S.TestbedConfig(image_size=224, patch_size=14, max_object_patches=2.0)
    scenes = S.sample_scenes(S.split_rng("train", 0), 2, small)
    assert S.render_scenes_numpy(scenes, small).shape == (2, 224, 224, 3)
    with pytest.raises(ValueError):
        S.TestbedConfig(image_size=330, patch_size=14)
    with pytest.raises(ValueError):
        S.TestbedConfig(max_objects=len(S.NUMBER_WORDS))


def test_training_existence_questions_do_not_leak_their_answer_through_the_text():
    """Training negatives are frequency-matched: even the most frequent pairs are ~half yes, so the
    question text alone cannot answer it (POPE's popular negatives in training would make them ~no)."""
    config = S.TestbedConfig(kind_weights=(1.0, 0.0, 0.0, 0.0))
    rng = S.split_rng("train", 9)
    scenes = S.sample_scenes(rng, 6000, config)
    items = S.sample_questions(rng, scenes, config, negative_types=S.TRAINING_NEGATIVE_TYPES)
    answers_by_text = {}
    for index, (item,) in enumerate(items):
        assert item.category == "existence/frequency"
        assert _truth(item, _objects(scenes, index)) == item.answer
        answers_by_text.setdefault(item.text, []).append(item.answer)
    for colour, shape in S.popular_ranking(config)[:3]:
        answers = answers_by_text[f"Is there a {S.COLOUR_NAMES[colour]} {S.SHAPE_NAMES[shape]} in the image?"]
        assert len(answers) >= 100 and 0.35 <= answers.count("yes") / len(answers) <= 0.65
