"""Fixed evaluation splits on disk, in the eval harness's layout (`write_split`).

A split is a pure function of (split, seed, config), so it is regenerated rather than committed, and
its first n items are the same for any split size.
"""

from __future__ import annotations

import json
import os

import numpy as np

from experiments.testbed.layout import sample_scenes, split_rng, take_scenes
from experiments.testbed.questions import sample_questions, scene_objects
from experiments.testbed.render import render_scenes_numpy
from experiments.testbed.scene_config import DEFAULT_CONFIG, TestbedConfig
from experiments.testbed.words import COLOUR_NAMES, SHAPE_NAMES

QUESTIONS_FILE = "questions.jsonl"
SCENES_FILE = "scenes.jsonl"
IMAGES_DIR = "images"


def image_file_name(split: str, scene: int) -> str:
    return f"{split}_{scene:06d}.png"


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8), mode="RGB").save(path, format="PNG")


def write_split(
    directory: str | os.PathLike,
    split: str = "test",
    num_items: int = 1000,
    seed: int = 0,
    config: TestbedConfig = DEFAULT_CONFIG,
    questions_per_image: int = 4,
    render_chunk: int = 32,
) -> list[dict]:
    """Write `num_items` questions of a fixed split: `questions.jsonl`, `images/*.png`, `scenes.jsonl`.

    Scenes and questions are a pure function of (split, seed, config). Each image carries up to
    `questions_per_image` distinct questions (as POPE shares images across questions). questions.jsonl
    has one JSON object per line: question_id, image (file name under images/), text, answer,
    category, plus kind and objects (evidence object indices into the scene's line of scenes.jsonl,
    which lists every object's shape, colour and pixel box). Images are rendered with NumPy.
    Returns the question records.
    """
    rng = split_rng(split, seed)
    images_dir = os.path.join(directory, IMAGES_DIR)
    os.makedirs(images_dir, exist_ok=True)
    records, scene_records = [], []
    scene_index = 0
    while len(records) < num_items:
        scenes = sample_scenes(rng, render_chunk, config, split)
        question_lists = sample_questions(rng, scenes, config, per_scene=questions_per_image)
        used, names = [], []
        for local, items in enumerate(question_lists):
            if len(records) >= num_items:
                break
            name = image_file_name(split, scene_index)
            for q_index, item in enumerate(items[: num_items - len(records)]):
                records.append(
                    dict(
                        question_id=f"{split}-{scene_index:06d}-{q_index}",
                        image=name,
                        text=item.text,
                        answer=item.answer,
                        category=item.category,
                        kind=item.kind,
                        objects=list(item.objects),
                    )
                )
            scene_records.append(
                dict(
                    image=name,
                    objects=[
                        dict(
                            index=o.index,
                            shape=SHAPE_NAMES[o.shape],
                            colour=COLOUR_NAMES[o.colour],
                            top=o.top,
                            left=o.left,
                            size=o.size,
                        )
                        for o in scene_objects(scenes, local)
                    ],
                )
            )
            used.append(local)
            names.append(name)
            scene_index += 1
        pixels = render_scenes_numpy(take_scenes(scenes, np.asarray(used)), config)
        for name, image in zip(names, pixels):
            save_png(image, os.path.join(images_dir, name))
    for file_name, lines in ((QUESTIONS_FILE, records), (SCENES_FILE, scene_records)):
        with open(os.path.join(directory, file_name), "w") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
    return records
